//! Postgres side of the ledger, reading: an account's snapshot, a user's
//! history, the admin stats and the CSV export of events. Every report
//! reads the aggregates the flusher keeps (`usage_daily`, `usage_monthly`,
//! `usage_module_daily`), never a scan of raw events, except the export,
//! which is the events themselves.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use sqlx::PgPool;

use super::partitions;
use crate::domain::UserId;

/// An account's state after its latest flushed event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub monthly: i64,
    pub bonus: i64,
    pub period: String,
    pub day: String,
    pub day_used: i64,
}

/// A charge event's split (credits from the monthly allowance, from bonus),
/// if the ledger has it; `day` is the local day it counts for (the table's
/// partition key, so one partition is read).
pub async fn charge_split(
    pool: &PgPool,
    event_id: &str,
    day: NaiveDate,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT from_monthly, from_bonus FROM ledger_events
         WHERE event_id = $1 AND local_day = $2 AND kind = 'charge'",
    )
    .bind(event_id)
    .bind(day)
    .fetch_optional(pool)
    .await
}

pub async fn snapshot(pool: &PgPool, user: &UserId) -> Result<Option<Snapshot>, sqlx::Error> {
    let row: Option<(i64, i64, String, String, i64)> = sqlx::query_as(
        "SELECT monthly, bonus, period, day, day_used FROM account_snapshots WHERE user_id = $1",
    )
    .bind(user.as_str())
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
    user: Option<&UserId>,
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
        .bind(user.map(UserId::as_str))
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
    user: &UserId,
    from: NaiveDate,
) -> Result<Vec<ModuleTotal>, sqlx::Error> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT module, SUM(charged_credits - refunded_credits)::bigint,
                SUM(charges - refunds)::bigint
         FROM usage_daily WHERE user_id = $1 AND day >= $2 GROUP BY module ORDER BY module",
    )
    .bind(user.as_str())
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
    user: &UserId,
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
    .bind(user.as_str())
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_events WHERE user_id = $1")
        .bind(user.as_str())
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

/// Accounts per plan and status, every user counted once.
pub async fn users_by_plan_and_status(
    pool: &PgPool,
) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT plan, status, count(*) FROM users GROUP BY plan, status")
        .fetch_all(pool)
        .await
}

/// Per module since `from` (a local day): net credits and net calls.
pub async fn module_usage_since(
    pool: &PgPool,
    from: NaiveDate,
) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT module, SUM(charged_credits - refunded_credits)::bigint,
                SUM(charges - refunds)::bigint
         FROM usage_module_daily WHERE day >= $1 GROUP BY module ORDER BY module",
    )
    .bind(from)
    .fetch_all(pool)
    .await
}

/// One of the month's biggest consumers.
pub struct Consumer {
    pub user_id: String,
    pub name: String,
    pub plan: String,
    pub credits: i64,
}

/// The `limit` accounts that used the most net credits in the month
/// starting `month`, biggest first.
pub async fn top_consumers(
    pool: &PgPool,
    month: NaiveDate,
    limit: i64,
) -> Result<Vec<Consumer>, sqlx::Error> {
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT m.user_id, u.name, u.plan, (m.charged_credits - m.refunded_credits) AS c
         FROM usage_monthly m JOIN users u ON u.id = m.user_id
         WHERE m.month = $1
         ORDER BY c DESC, m.user_id LIMIT $2",
    )
    .bind(month)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(user_id, name, plan, credits)| Consumer {
            user_id,
            name,
            plan,
            credits,
        })
        .collect())
}

/// One ledger row as the usage export writes it.
#[derive(sqlx::FromRow)]
pub struct ExportedEvent {
    pub event_id: String,
    pub user_id: String,
    pub kind: String,
    pub module: Option<String>,
    pub action: Option<String>,
    pub amount: i64,
    pub monthly_after: Option<i64>,
    pub bonus_after: Option<i64>,
    pub request_id: Option<String>,
    pub actor: String,
    pub local_day: NaiveDate,
    pub occurred_at: DateTime<Utc>,
}

/// Every event booked on the local days `from..=to`, streamed day by day:
/// the days in order, a day's rows as the ledger stored them (the order
/// they were flushed, close to the order they happened, but not sorted).
///
/// Not sorting is the point: at 137,000 events a day, one day read in
/// storage order takes 29–38 ms in Postgres, and the same day sorted by
/// time 90–160 ms (a sort copies every row before the first one leaves);
/// a month sorted would spill about a gigabyte to disk before its first
/// byte (docs/BENCHMARKS.md, the one-day export). A query per day keeps
/// each query to one partition and the days in order without a sort, and
/// all of them run in one read-only `REPEATABLE READ` transaction, so the
/// export is one consistent view of the ledger, as a single query was.
/// Only days of attached partitions are asked, so a range reaching back
/// centuries costs no more than the ledger holds.
///
/// The rows are read on a task of their own, which owns the transaction,
/// and handed over through a short channel: a slow client holds the
/// transaction open, never more than a few rows in memory.
pub fn events_between(
    pool: PgPool,
    from: NaiveDate,
    to: NaiveDate,
) -> BoxStream<'static, Result<ExportedEvent, sqlx::Error>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        if let Err(e) = export_days(&pool, from, to, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

async fn export_days(
    pool: &PgPool,
    from: NaiveDate,
    to: NaiveDate,
    out: &tokio::sync::mpsc::Sender<Result<ExportedEvent, sqlx::Error>>,
) -> Result<(), sqlx::Error> {
    let mut db = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *db)
        .await?;
    let days: Vec<NaiveDate> = partitions::list(&mut *db)
        .await?
        .into_iter()
        .flat_map(|(_, first)| {
            first
                .iter_days()
                .take_while(move |d| d.month() == first.month())
        })
        .filter(|d| (from..=to).contains(d))
        .collect();
    for day in days {
        let mut rows = sqlx::query_as::<_, ExportedEvent>(
            "SELECT event_id, user_id, kind, module, action, amount, monthly_after,
                    bonus_after, request_id, actor, local_day, occurred_at
             FROM ledger_events WHERE local_day = $1",
        )
        .bind(day)
        .fetch(&mut *db);
        while let Some(row) = rows.try_next().await? {
            if out.send(Ok(row)).await.is_err() {
                return Ok(()); // the client went away
            }
        }
    }
    db.commit().await
}
