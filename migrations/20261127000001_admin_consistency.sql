-- Admin writes that Postgres and Redis must agree on.

-- Accounts whose Redis mirror (plan, block, key set) may be behind Postgres.
-- A row is written in the same transaction as the change and deleted once
-- Redis has applied that version; the reconciler retries what is left, so
-- the two stores agree within a second of Redis being reachable again.
-- Versions come from one sequence, so they only ever grow for an account
-- and Redis can refuse to apply an older state over a newer one.
CREATE SEQUENCE account_sync_version;
CREATE TABLE account_sync (
    user_id      TEXT PRIMARY KEY,
    version      BIGINT NOT NULL DEFAULT nextval('account_sync_version'),
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Idempotency-Key of `POST /api/admin/billing/users`: a retried creation
-- returns the first one instead of a second user. Scoped by admin key name;
-- kept 24 h.
CREATE TABLE admin_idempotency (
    actor       TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    key_id      UUID NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (actor, key)
);
CREATE INDEX admin_idempotency_created_idx ON admin_idempotency (created_at);

-- Grants are audited by the ledger flusher, from the grant's own event:
-- exactly one audit row per grant, whatever the API saw of Postgres.
ALTER TABLE admin_audit ADD COLUMN event_id TEXT UNIQUE;
