-- Roll-ups the admin stats read instead of summing usage_daily (a row per
-- user, day and module: millions of rows a month at scale). Maintained by
-- the flusher in the same transaction as the events, from the rows it
-- actually inserted, like usage_daily.

-- Per local day and module, everyone's usage: "today", "this month" and
-- the daily chart of the admin stats. One row per flusher shard (`shard`,
-- the usage stream the events came from), so that flusher workers, which
-- own disjoint streams, never wait on each other's rows; readers sum them.
CREATE TABLE usage_module_daily (
    day              DATE NOT NULL,
    module           TEXT NOT NULL,
    shard            SMALLINT NOT NULL,
    charged_credits  BIGINT NOT NULL DEFAULT 0,
    charges          BIGINT NOT NULL DEFAULT 0,
    refunded_credits BIGINT NOT NULL DEFAULT 0,
    refunds          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, module, shard)
);

-- Per user and local month (`month` is its first day): the top users of
-- the month and each user's month total in the admin list.
CREATE TABLE usage_monthly (
    user_id          TEXT NOT NULL,
    month            DATE NOT NULL,
    charged_credits  BIGINT NOT NULL DEFAULT 0,
    charges          BIGINT NOT NULL DEFAULT 0,
    refunded_credits BIGINT NOT NULL DEFAULT 0,
    refunds          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, month)
);
-- The month's top users without sorting every user of the month.
CREATE INDEX usage_monthly_top_idx
    ON usage_monthly (month, (charged_credits - refunded_credits) DESC, user_id);

INSERT INTO usage_module_daily (day, module, shard, charged_credits, charges, refunded_credits, refunds)
SELECT day, module, 0, SUM(charged_credits), SUM(charges), SUM(refunded_credits), SUM(refunds)
FROM usage_daily GROUP BY day, module;

INSERT INTO usage_monthly (user_id, month, charged_credits, charges, refunded_credits, refunds)
SELECT user_id, date_trunc('month', day)::date, SUM(charged_credits), SUM(charges),
       SUM(refunded_credits), SUM(refunds)
FROM usage_daily GROUP BY 1, 2;
