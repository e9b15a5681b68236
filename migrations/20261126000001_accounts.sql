-- Accounts and API keys. Plans live in the configuration file; `plan` holds
-- a plan id that the gateway validates against it.
CREATE TABLE users (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    email          TEXT,
    plan           TEXT NOT NULL,
    status         TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked')),
    blocked_reason TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX users_plan_idx ON users (plan);
CREATE INDEX users_status_idx ON users (status);

-- Keys are stored only as SHA-256 digests: they are 192-bit random strings,
-- so a fast hash is enough and lets the hot path look them up by equality.
CREATE TABLE api_keys (
    id         UUID PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_hash   TEXT NOT NULL UNIQUE,
    prefix     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id);
