//! Postgres side of the ledger: the batch write (events, aggregates and
//! snapshots in one transaction) and the read queries that history and
//! stats are served from.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use super::event::LedgerEvent;

/// An entry that could not be parsed, kept for people to look at.
pub struct Reject {
    pub stream: String,
    pub entry_id: String,
    pub fields: serde_json::Value,
    pub error: String,
}

/// What an insert does with an event already in the ledger.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Present {
    /// Fail the batch: the common case has no such event, and a plain
    /// INSERT skips `ON CONFLICT`'s look into the primary key before each
    /// row (11 % of Postgres's CPU under `bench/proxy.sh`).
    Fail,
    /// Skip it (`ON CONFLICT DO NOTHING`).
    Skip,
}

/// Writes one batch atomically and returns how many events were new.
///
/// Events already present (a redelivered batch, two flushers racing on a
/// reclaimed entry) are skipped, and only the rows actually inserted feed
/// the aggregates, so replaying a batch changes nothing. Snapshots only
/// move forward in stream order.
pub async fn write_batch(
    pool: &PgPool,
    events: &[LedgerEvent],
    rejects: &[Reject],
) -> Result<u64, sqlx::Error> {
    let mut present = Present::Fail;
    let mut created = false;
    loop {
        match write_batch_once(pool, events, rejects, present).await {
            // Some event is stored already: the batch again, skipping those.
            Err(e) if present == Present::Fail && is_unique_violation(&e) => {
                present = Present::Skip;
            }
            // A month without a partition (an event replayed from long ago,
            // or a gateway that has not run its daily check): create, retry.
            Err(e) if !created && super::partitions::is_missing_partition(&e) => {
                let months: std::collections::BTreeSet<NaiveDate> =
                    events.iter().map(|e| e.local_day).collect();
                for day in months {
                    super::partitions::ensure(pool, day).await?;
                }
                created = true;
            }
            other => return other,
        }
    }
}

/// Only the events' primary key can raise it: every other insert of the
/// batch has its own `ON CONFLICT`.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("23505"))
}

async fn write_batch_once(
    pool: &PgPool,
    events: &[LedgerEvent],
    rejects: &[Reject],
    present: Present,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let inserted = insert_events(&mut tx, events, present).await?;
    upsert_snapshots(&mut tx, events).await?;
    for r in rejects {
        sqlx::query(
            "INSERT INTO ledger_rejects (stream, entry_id, fields, error) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(&r.stream)
        .bind(&r.entry_id)
        .bind(&r.fields)
        .bind(&r.error)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// The batch insert, with `{present}` in place of its `ON CONFLICT` clause.
const INSERT_EVENTS: &str = "WITH ins AS (
            INSERT INTO ledger_events (event_id, user_id, kind, module, action, amount,
                from_monthly, from_bonus, monthly_after, bonus_after, plan, request_id, actor,
                local_day, occurred_at, stream_ms, stream_seq, reason)
            SELECT event_id, user_id, kind, module, action, amount, from_monthly,
                from_bonus, monthly_after, bonus_after, plan, request_id, actor, local_day,
                occurred_at, stream_ms, stream_seq, reason
            FROM ledger_stage
            {present}
            RETURNING event_id, user_id, local_day, module, kind, amount, actor, reason,
                request_id, occurred_at
         ), audit AS (
            -- A grant's audit row comes from its event, so it exists exactly
            -- when the grant does, whatever the API saw of Postgres.
            INSERT INTO admin_audit (at, actor, action, user_id, details, event_id)
            SELECT occurred_at, actor, 'grant', user_id,
                jsonb_strip_nulls(jsonb_build_object('credits', amount, 'reason', reason,
                    'idempotency_key', request_id)),
                event_id
            FROM ins WHERE kind = 'grant'
            ON CONFLICT (event_id) DO NOTHING
         ), agg AS (
            INSERT INTO usage_daily AS u (user_id, day, module, charged_credits, charges,
                refunded_credits, refunds)
            SELECT user_id, local_day, module,
                COALESCE(SUM(amount) FILTER (WHERE kind = 'charge'), 0),
                COUNT(*) FILTER (WHERE kind = 'charge'),
                COALESCE(SUM(amount) FILTER (WHERE kind = 'refund'), 0),
                COUNT(*) FILTER (WHERE kind = 'refund')
            FROM ins
            WHERE kind IN ('charge', 'refund') AND module IS NOT NULL
            GROUP BY user_id, local_day, module
            ON CONFLICT (user_id, day, module) DO UPDATE SET
                charged_credits = u.charged_credits + EXCLUDED.charged_credits,
                charges = u.charges + EXCLUDED.charges,
                refunded_credits = u.refunded_credits + EXCLUDED.refunded_credits,
                refunds = u.refunds + EXCLUDED.refunds
         ), usage AS (
            SELECT ins.*, s.shard FROM ins
            JOIN (SELECT DISTINCT event_id, shard FROM ledger_stage) s USING (event_id)
            WHERE kind IN ('charge', 'refund') AND module IS NOT NULL
         ), by_module AS (
            -- Rows in key order: two writers never lock them crosswise.
            INSERT INTO usage_module_daily AS u (day, module, shard, charged_credits, charges,
                refunded_credits, refunds)
            SELECT local_day, module, shard,
                COALESCE(SUM(amount) FILTER (WHERE kind = 'charge'), 0),
                COUNT(*) FILTER (WHERE kind = 'charge'),
                COALESCE(SUM(amount) FILTER (WHERE kind = 'refund'), 0),
                COUNT(*) FILTER (WHERE kind = 'refund')
            FROM usage GROUP BY local_day, module, shard ORDER BY local_day, module, shard
            ON CONFLICT (day, module, shard) DO UPDATE SET
                charged_credits = u.charged_credits + EXCLUDED.charged_credits,
                charges = u.charges + EXCLUDED.charges,
                refunded_credits = u.refunded_credits + EXCLUDED.refunded_credits,
                refunds = u.refunds + EXCLUDED.refunds
         ), by_month AS (
            INSERT INTO usage_monthly AS u (user_id, month, charged_credits, charges,
                refunded_credits, refunds)
            SELECT user_id, date_trunc('month', local_day)::date,
                COALESCE(SUM(amount) FILTER (WHERE kind = 'charge'), 0),
                COUNT(*) FILTER (WHERE kind = 'charge'),
                COALESCE(SUM(amount) FILTER (WHERE kind = 'refund'), 0),
                COUNT(*) FILTER (WHERE kind = 'refund')
            FROM usage GROUP BY 1, 2
            ON CONFLICT (user_id, month) DO UPDATE SET
                charged_credits = u.charged_credits + EXCLUDED.charged_credits,
                charges = u.charges + EXCLUDED.charges,
                refunded_credits = u.refunded_credits + EXCLUDED.refunded_credits,
                refunds = u.refunds + EXCLUDED.refunds
         )
         SELECT count(*) FROM ins";

static INSERT_NEW: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| INSERT_EVENTS.replace("{present}", ""));
static INSERT_SKIPPING: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    INSERT_EVENTS.replace("{present}", "ON CONFLICT (event_id, local_day) DO NOTHING")
});

/// The batch's events go to Postgres by `COPY` into this temporary table,
/// then into the ledger with one statement: `COPY` parses rows for less
/// than `UNNEST` of nineteen arrays, which Postgres materialises first.
/// The table lives as long as the connection and empties at each commit.
const STAGE: &str = "SET LOCAL client_min_messages = warning;
    CREATE TEMP TABLE IF NOT EXISTS ledger_stage (
        event_id text NOT NULL, user_id text NOT NULL, kind text NOT NULL, module text,
        action text, amount bigint NOT NULL, from_monthly bigint NOT NULL,
        from_bonus bigint NOT NULL, monthly_after bigint, bonus_after bigint, plan text,
        request_id text, actor text NOT NULL, local_day date NOT NULL,
        occurred_at timestamptz NOT NULL, stream_ms bigint NOT NULL, stream_seq bigint NOT NULL,
        reason text, shard smallint NOT NULL
    ) ON COMMIT DELETE ROWS";

async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    events: &[LedgerEvent],
    present: Present,
) -> Result<u64, sqlx::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    sqlx::raw_sql(STAGE).execute(&mut **tx).await?;
    let mut copy = tx
        .copy_in_raw(
            "COPY ledger_stage (event_id, user_id, kind, module, action, amount, from_monthly,
                from_bonus, monthly_after, bonus_after, plan, request_id, actor, local_day,
                occurred_at, stream_ms, stream_seq, reason, shard) FROM STDIN",
        )
        .await?;
    copy.send(copy_rows(events)).await?;
    copy.finish().await?;
    let sql = match present {
        Present::Fail => INSERT_NEW.as_str(),
        Present::Skip => INSERT_SKIPPING.as_str(),
    };
    let inserted: i64 = sqlx::query_scalar(sql).fetch_one(&mut **tx).await?;
    Ok(inserted as u64)
}

/// The events as `COPY` text rows: tab-separated, `\N` for NULL, and
/// backslash, tab, newline and carriage return escaped in text.
fn copy_rows(events: &[LedgerEvent]) -> Vec<u8> {
    use std::io::Write;
    fn text(out: &mut Vec<u8>, value: &str) {
        for &b in value.as_bytes() {
            match b {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ => out.push(b),
            }
        }
        out.push(b'\t');
    }
    fn optional(out: &mut Vec<u8>, value: Option<&str>) {
        match value {
            Some(v) => text(out, v),
            None => out.extend_from_slice(b"\\N\t"),
        }
    }
    fn number(out: &mut Vec<u8>, n: i64) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.push(b'\t');
    }
    let mut out = Vec::with_capacity(events.len() * 256);
    for e in events {
        text(&mut out, &e.event_id);
        text(&mut out, &e.user_id);
        text(&mut out, &e.kind);
        optional(&mut out, e.module.as_deref());
        optional(&mut out, e.action.as_deref());
        number(&mut out, e.amount);
        number(&mut out, e.from_monthly);
        number(&mut out, e.from_bonus);
        number(&mut out, e.monthly_after);
        number(&mut out, e.bonus_after);
        optional(&mut out, e.plan.as_deref());
        optional(&mut out, e.request_id.as_deref());
        text(&mut out, &e.actor);
        // Writing into a Vec cannot fail.
        // Display is ISO 8601 (`YYYY-MM-DD`) without a format string to
        // parse per row.
        let _ = write!(out, "{}\t", e.local_day);
        let _ = write!(
            out,
            "{}\t",
            e.occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        number(&mut out, e.stream_ms);
        number(&mut out, e.stream_seq);
        optional(&mut out, e.reason.as_deref());
        out.extend_from_slice(itoa::Buffer::new().format(e.shard).as_bytes());
        out.push(b'\n');
    }
    out
}

async fn upsert_snapshots(
    tx: &mut Transaction<'_, Postgres>,
    events: &[LedgerEvent],
) -> Result<(), sqlx::Error> {
    // Latest event per user in this batch.
    let mut latest: HashMap<&str, &LedgerEvent> = HashMap::new();
    for e in events.iter().filter(|e| !e.account_period.is_empty()) {
        let newer = latest
            .get(e.user_id.as_str())
            .is_none_or(|cur| (e.stream_ms, e.stream_seq) > (cur.stream_ms, cur.stream_seq));
        if newer {
            latest.insert(&e.user_id, e);
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let mut users = Vec::new();
    let (mut monthly, mut bonus, mut period, mut day, mut used, mut ms, mut seq) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (user, e) in latest {
        users.push(user.to_owned());
        monthly.push(e.monthly_after);
        bonus.push(e.bonus_after);
        period.push(e.account_period.clone());
        day.push(e.account_day.clone());
        used.push(e.account_day_used);
        ms.push(e.stream_ms);
        seq.push(e.stream_seq);
    }
    sqlx::query(
        "INSERT INTO account_snapshots AS s (user_id, monthly, bonus, period, day, day_used,
            stream_ms, stream_seq)
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
            $6::bigint[], $7::bigint[], $8::bigint[])
         ON CONFLICT (user_id) DO UPDATE SET
            monthly = EXCLUDED.monthly, bonus = EXCLUDED.bonus, period = EXCLUDED.period,
            day = EXCLUDED.day, day_used = EXCLUDED.day_used, stream_ms = EXCLUDED.stream_ms,
            stream_seq = EXCLUDED.stream_seq, updated_at = now()
         WHERE (s.stream_ms, s.stream_seq) < (EXCLUDED.stream_ms, EXCLUDED.stream_seq)",
    )
    .bind(users)
    .bind(monthly)
    .bind(bonus)
    .bind(period)
    .bind(day)
    .bind(used)
    .bind(ms)
    .bind(seq)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An account's state after its latest flushed event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub monthly: i64,
    pub bonus: i64,
    pub period: String,
    pub day: String,
    pub day_used: i64,
}

pub async fn snapshot(pool: &PgPool, user: &str) -> Result<Option<Snapshot>, sqlx::Error> {
    let row: Option<(i64, i64, String, String, i64)> = sqlx::query_as(
        "SELECT monthly, bonus, period, day, day_used FROM account_snapshots WHERE user_id = $1",
    )
    .bind(user)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(monthly, bonus, period, day, day_used)| Snapshot {
        monthly,
        bonus,
        period,
        day,
        day_used,
    }))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DayUsage {
    pub date: NaiveDate,
    /// Net credits: charged minus refunded.
    pub credits: i64,
    /// Net requests: charges minus refunds.
    pub requests: i64,
    pub by_module: std::collections::BTreeMap<String, i64>,
}

/// Per-day usage from `from` (inclusive), from the aggregates: one user's,
/// or everyone's with `None`.
pub async fn usage_by_day(
    pool: &PgPool,
    user: Option<&str>,
    from: NaiveDate,
) -> Result<Vec<DayUsage>, sqlx::Error> {
    // Everyone's usage from the per-module roll-up (a few rows a day),
    // never by summing every user's rows.
    let sql = match user {
        Some(_) => {
            "SELECT day, module, SUM(charged_credits - refunded_credits)::bigint,
                    SUM(charges - refunds)::bigint
             FROM usage_daily WHERE user_id = $1 AND day >= $2
             GROUP BY day, module ORDER BY day, module"
        }
        None => {
            "SELECT day, module, SUM(charged_credits - refunded_credits)::bigint,
                    SUM(charges - refunds)::bigint
             FROM usage_module_daily WHERE $1::text IS NULL AND day >= $2
             GROUP BY day, module ORDER BY day, module"
        }
    };
    let rows: Vec<(NaiveDate, String, i64, i64)> = sqlx::query_as(sql)
        .bind(user)
        .bind(from)
        .fetch_all(pool)
        .await?;
    let mut days: Vec<DayUsage> = Vec::new();
    for (date, module, credits, requests) in rows {
        if days.last().is_none_or(|d| d.date != date) {
            days.push(DayUsage {
                date,
                credits: 0,
                requests: 0,
                by_module: Default::default(),
            });
        }
        if let Some(d) = days.last_mut() {
            d.credits += credits;
            d.requests += requests;
            d.by_module.insert(module, credits);
        }
    }
    Ok(days)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ModuleTotal {
    pub module: String,
    pub credits: i64,
    pub requests: i64,
}

/// Net credits and requests per module of one user since `from`.
pub async fn totals_by_module(
    pool: &PgPool,
    user: &str,
    from: NaiveDate,
) -> Result<Vec<ModuleTotal>, sqlx::Error> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT module, SUM(charged_credits - refunded_credits)::bigint,
                SUM(charges - refunds)::bigint
         FROM usage_daily WHERE user_id = $1 AND day >= $2 GROUP BY module ORDER BY module",
    )
    .bind(user)
    .bind(from)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(module, credits, requests)| ModuleTotal {
            module,
            credits,
            requests,
        })
        .collect())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LedgerRow {
    pub event_id: String,
    pub kind: String,
    pub module: Option<String>,
    pub action: Option<String>,
    pub amount: i64,
    pub monthly_after: Option<i64>,
    pub bonus_after: Option<i64>,
    pub request_id: Option<String>,
    pub actor: String,
    pub occurred_at: DateTime<Utc>,
}

/// One user's ledger rows, newest first.
pub async fn transactions(
    pool: &PgPool,
    user: &str,
    limit: i64,
    offset: i64,
) -> Result<(Vec<LedgerRow>, i64), sqlx::Error> {
    type Row = (
        String,
        String,
        Option<String>,
        Option<String>,
        i64,
        Option<i64>,
        Option<i64>,
        Option<String>,
        String,
        DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_id, kind, module, action, amount, monthly_after, bonus_after, request_id,
                actor, occurred_at
         FROM ledger_events WHERE user_id = $1
         ORDER BY stream_ms DESC, stream_seq DESC LIMIT $2 OFFSET $3",
    )
    .bind(user)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_events WHERE user_id = $1")
        .bind(user)
        .fetch_one(pool)
        .await?;
    let items = rows
        .into_iter()
        .map(
            |(event_id, kind, module, action, amount, m, b, request_id, actor, occurred_at)| {
                LedgerRow {
                    event_id,
                    kind,
                    module,
                    action,
                    amount,
                    monthly_after: m,
                    bonus_after: b,
                    request_id,
                    actor,
                    occurred_at,
                }
            },
        )
        .collect();
    Ok((items, total))
}
