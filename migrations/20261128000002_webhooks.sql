-- Webhooks: an outbox of events, written in the same transaction as the
-- ledger rows that cause them, and one delivery row per subscribed endpoint.
--
-- `dedupe_key` makes production exactly-once: a flusher that writes the
-- same batch twice, or two thresholds crossed by racing batches, insert
-- the event once. `id` is the Standard Webhooks `webhook-id`, the same on
-- every attempt and every endpoint.
CREATE TABLE webhook_events (
    id          TEXT PRIMARY KEY,
    dedupe_key  TEXT NOT NULL UNIQUE,
    type        TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    body        TEXT NOT NULL,            -- the JSON delivered, byte for byte
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_user_idx ON webhook_events (user_id, created_at);

-- Claimed by pushing `next_attempt_at` past the attempt's deadline (a
-- lease): an instance killed mid-delivery leaves the row to be retried by
-- any instance once the lease is over, with the same event id.
CREATE TABLE webhook_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    event_id        TEXT NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    endpoint        TEXT NOT NULL,        -- the endpoint's URL, as configured
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_attempt_at TIMESTAMPTZ,
    last_status     INTEGER,              -- the receiver's HTTP status, if it answered
    last_error      TEXT,
    delivered_at    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (event_id, endpoint)
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (endpoint, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_age_idx ON webhook_deliveries (created_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_status_idx ON webhook_deliveries (status, id);
