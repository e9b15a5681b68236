-- The permanent record. Redis decides balances; every change it makes is
-- appended to a usage stream in the same script, and the flusher copies the
-- stream here in batches (see src/ledger/).

CREATE TABLE ledger_events (
    event_id      TEXT PRIMARY KEY,          -- unique per event; redelivery inserts nothing
    user_id       TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN
                    ('charge', 'refund', 'grant', 'reset', 'plan_change', 'block', 'unblock')),
    module        TEXT,
    action        TEXT,
    amount        BIGINT NOT NULL,           -- credits moved (always >= 0; kind gives the sign)
    from_monthly  BIGINT NOT NULL DEFAULT 0, -- part of amount taken from / returned to the allowance
    from_bonus    BIGINT NOT NULL DEFAULT 0, -- part of amount taken from / returned to bonus
    monthly_after BIGINT,
    bonus_after   BIGINT,
    plan          TEXT,
    request_id    TEXT,
    actor         TEXT NOT NULL,
    local_day     DATE NOT NULL,             -- the day the amount counts for (server.timezone)
    occurred_at   TIMESTAMPTZ NOT NULL,
    stream_ms     BIGINT NOT NULL DEFAULT 0, -- Redis stream entry id: orders one account's events
    stream_seq    BIGINT NOT NULL DEFAULT 0,
    reason        TEXT,
    recorded_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ledger_events_user_idx ON ledger_events (user_id, stream_ms, stream_seq);
CREATE INDEX ledger_events_time_idx ON ledger_events (occurred_at);
CREATE INDEX ledger_events_request_idx ON ledger_events (user_id, request_id);

-- Per user, module and local day; maintained in the same transaction as the
-- inserts, from the rows actually inserted.
CREATE TABLE usage_daily (
    user_id          TEXT NOT NULL,
    day              DATE NOT NULL,
    module           TEXT NOT NULL,
    charged_credits  BIGINT NOT NULL DEFAULT 0,
    charges          BIGINT NOT NULL DEFAULT 0,
    refunded_credits BIGINT NOT NULL DEFAULT 0,
    refunds          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day, module)
);
CREATE INDEX usage_daily_day_idx ON usage_daily (day);

-- Each account's state after its latest flushed event: what Redis is
-- rebuilt from when it has lost an account.
CREATE TABLE account_snapshots (
    user_id     TEXT PRIMARY KEY,
    monthly     BIGINT NOT NULL,
    bonus       BIGINT NOT NULL,
    period      TEXT NOT NULL,
    day         TEXT NOT NULL,
    day_used    BIGINT NOT NULL,
    stream_ms   BIGINT NOT NULL,
    stream_seq  BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Stream entries that could not be parsed: kept, not retried forever.
CREATE TABLE ledger_rejects (
    stream      TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    fields      JSONB NOT NULL,
    error       TEXT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);
