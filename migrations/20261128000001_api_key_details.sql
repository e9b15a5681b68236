-- Keys users manage themselves: a name, an optional expiry and module
-- scope (both enforced by charge.lua, mirrored to Redis with the key), and
-- a coarse last use (written in batches, never per request).
ALTER TABLE api_keys
    ADD COLUMN name         TEXT NOT NULL DEFAULT '',
    ADD COLUMN expires_at   TIMESTAMPTZ,
    ADD COLUMN modules      TEXT[],
    ADD COLUMN last_used_at TIMESTAMPTZ;
