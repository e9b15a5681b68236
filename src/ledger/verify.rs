//! `creditgate ledger verify`: proof that Redis and the ledger agree.
//!
//! Run after draining the streams. Four checks:
//! 1. every account's Redis balance (allowance, bonus) equals the balance
//!    after its latest ledger event (or the plan's fresh allowance when it
//!    has none);
//! 2. each account's events form an unbroken chain: every event's balance
//!    after equals the previous one's plus or minus what the event moved;
//! 3. the daily aggregates equal the sums of the rows they summarise;
//! 4. each snapshot equals its account's latest event;
//! 5. each credit lease adds up: the calls spent from it plus what it gave
//!    back equal what it took, and one that was neither settled nor lost
//!    is still open in Redis.

use std::collections::HashMap;

use futures_util::TryStreamExt;
use futures_util::future::join_all;
use sqlx::PgPool;
use thiserror::Error;

use crate::catalog::Catalog;
use crate::metering::{KeyLayout, RedisConn};

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    pub user: String,
    pub what: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub accounts: u64,
    pub events: u64,
    pub drifts: Vec<Drift>,
}

pub async fn verify(
    con: &mut RedisConn,
    keys: &KeyLayout,
    pool: &PgPool,
    catalog: &Catalog,
) -> Result<Report, VerifyError> {
    let mut report = Report::default();
    let redis_accounts = read_redis_accounts(con, keys).await?;
    report.accounts = redis_accounts.len() as u64;

    let last: HashMap<String, (i64, i64)> = sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT DISTINCT ON (user_id) user_id, monthly_after, bonus_after
         FROM ledger_events WHERE monthly_after IS NOT NULL
         ORDER BY user_id, stream_ms DESC, stream_seq DESC",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(u, m, b)| (u, (m, b)))
    .collect();

    // 1. Redis against the ledger.
    for (user, acct) in &redis_accounts {
        let expected = match last.get(user) {
            Some(balance) => *balance,
            None => (
                catalog
                    .plan(&acct.plan)
                    .map_or(0, |p| p.monthly_credits.get()),
                0,
            ),
        };
        if (acct.monthly, acct.bonus) != expected {
            report.drifts.push(Drift {
                user: user.clone(),
                what: format!(
                    "redis holds monthly={} bonus={}, ledger says monthly={} bonus={}",
                    acct.monthly, acct.bonus, expected.0, expected.1
                ),
            });
        }
    }

    // 2. The chain of each account's events.
    let mut rows = sqlx::query_as::<_, (String, String, String, i64, i64, i64, i64, i64)>(
        "SELECT user_id, event_id, kind, amount, from_monthly, from_bonus,
                monthly_after, bonus_after
         FROM ledger_events WHERE monthly_after IS NOT NULL AND bonus_after IS NOT NULL
         ORDER BY user_id, stream_ms, stream_seq",
    )
    .fetch(pool);
    let mut prev: Option<(String, i64, i64)> = None;
    while let Some((user, event, kind, amount, fm, fb, m, b)) = rows.try_next().await? {
        report.events += 1;
        let previous = prev.as_ref().filter(|(u, _, _)| u == &user);
        if let Some((_, pm, pb)) = previous {
            let expected = match kind.as_str() {
                "charge" => Some((pm - fm, pb - fb)),
                "refund" => Some((pm + fm, pb + fb)),
                "grant" => Some((*pm, pb + amount)),
                "reset" => Some((amount, *pb)),
                "lease" => Some((pm - fm, pb - fb)),
                "lease_return" => Some((pm + fm, pb + fb)),
                "lease_lost" => Some((*pm, *pb)),
                _ => None,
            };
            if let Some(exp) = expected.filter(|exp| *exp != (m, b)) {
                report.drifts.push(Drift {
                    user: user.clone(),
                    what: format!(
                        "event {event} ({kind} {amount}) leaves monthly={m} bonus={b}, \
                         the previous balance implies monthly={} bonus={}",
                        exp.0, exp.1
                    ),
                });
            }
        }
        prev = Some((user, m, b));
    }
    drop(rows);

    // 3. Aggregates against rows.
    let mismatched: Vec<(String, chrono::NaiveDate, String, i64, i64)> = sqlx::query_as(
        "WITH truth AS (
            SELECT user_id, local_day AS day, module,
                COALESCE(SUM(amount) FILTER (WHERE kind = 'charge'), 0)::bigint AS charged,
                COALESCE(SUM(amount) FILTER (WHERE kind = 'refund'), 0)::bigint AS refunded
            FROM ledger_events
            WHERE kind IN ('charge', 'refund') AND module IS NOT NULL
            GROUP BY 1, 2, 3)
         SELECT COALESCE(t.user_id, u.user_id), COALESCE(t.day, u.day),
                COALESCE(t.module, u.module),
                COALESCE(t.charged, 0) - COALESCE(t.refunded, 0),
                COALESCE(u.charged_credits, 0) - COALESCE(u.refunded_credits, 0)
         FROM truth t FULL JOIN usage_daily u
           ON t.user_id = u.user_id AND t.day = u.day AND t.module = u.module
         WHERE t.charged IS DISTINCT FROM u.charged_credits
            OR t.refunded IS DISTINCT FROM u.refunded_credits",
    )
    .fetch_all(pool)
    .await?;
    for (user, day, module, rows_net, agg_net) in mismatched {
        report.drifts.push(Drift {
            user,
            what: format!(
                "usage_daily {day} {module}: aggregate {agg_net}, ledger rows {rows_net}"
            ),
        });
    }

    // 3b. The roll-ups the admin stats read, against usage_daily.
    let rollups: Vec<(String, String, String, i64, i64)> = sqlx::query_as(
        "WITH d AS (
            SELECT day, module, SUM(charged_credits)::bigint AS c, SUM(refunded_credits)::bigint AS r
            FROM usage_daily GROUP BY 1, 2),
         m AS (
            SELECT day, module, SUM(charged_credits)::bigint AS c, SUM(refunded_credits)::bigint AS r
            FROM usage_module_daily GROUP BY 1, 2)
         SELECT 'usage_module_daily', COALESCE(d.day, m.day)::text, COALESCE(d.module, m.module),
                COALESCE(d.c - d.r, 0), COALESCE(m.c - m.r, 0)
         FROM d FULL JOIN m ON d.day = m.day AND d.module = m.module
         WHERE d.c IS DISTINCT FROM m.c OR d.r IS DISTINCT FROM m.r
         UNION ALL
         SELECT 'usage_monthly', COALESCE(d.month, m.month)::text, COALESCE(d.user_id, m.user_id),
                COALESCE(d.c - d.r, 0), COALESCE(m.charged_credits - m.refunded_credits, 0)
         FROM (SELECT user_id, date_trunc('month', day)::date AS month,
                      SUM(charged_credits)::bigint AS c, SUM(refunded_credits)::bigint AS r
               FROM usage_daily GROUP BY 1, 2) d
         FULL JOIN usage_monthly m ON d.user_id = m.user_id AND d.month = m.month
         WHERE d.c IS DISTINCT FROM m.charged_credits OR d.r IS DISTINCT FROM m.refunded_credits",
    )
    .fetch_all(pool)
    .await?;
    for (table, when, what, daily_net, rollup_net) in rollups {
        report.drifts.push(Drift {
            user: if table == "usage_monthly" {
                what.clone()
            } else {
                String::new()
            },
            what: format!("{table} {when} {what}: roll-up {rollup_net}, usage_daily {daily_net}"),
        });
    }

    // 4. Snapshots against the latest events.
    let snapshots: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT user_id, monthly, bonus FROM account_snapshots")
            .fetch_all(pool)
            .await?;
    for (user, m, b) in snapshots {
        if last.get(&user).is_some_and(|l| *l != (m, b)) {
            report.drifts.push(Drift {
                user,
                what: format!("snapshot monthly={m} bonus={b} differs from the latest event"),
            });
        }
    }
    // 5. Leases.
    // (user, lease, taken, times taken, spent, returned, times lost)
    type LeaseRow = (String, String, Option<i64>, i64, i64, Option<i64>, i64);
    let leases: Vec<LeaseRow> = sqlx::query_as(
        "SELECT MIN(user_id), lease_id,
                SUM(amount) FILTER (WHERE kind = 'lease')::bigint,
                COUNT(*) FILTER (WHERE kind = 'lease'),
                (COALESCE(SUM(amount) FILTER (WHERE kind = 'charge'), 0)
                 - COALESCE(SUM(amount) FILTER (WHERE kind = 'refund'), 0))::bigint,
                SUM(amount) FILTER (WHERE kind = 'lease_return')::bigint,
                COUNT(*) FILTER (WHERE kind = 'lease_lost')
         FROM ledger_events WHERE lease_id IS NOT NULL
         GROUP BY lease_id",
    )
    .fetch_all(pool)
    .await?;
    for (user, lease, taken, takes, spent, returned, lost) in leases {
        let what = match (taken, returned) {
            (None, _) => Some(format!("lease {lease}: {spent} spent, but no lease event")),
            (Some(_), _) if takes > 1 || lost > 1 || (returned.is_some() && lost > 0) => Some(
                format!("lease {lease}: taken {takes}x, lost {lost}x, returned {returned:?}"),
            ),
            (Some(t), _) if spent > t => Some(format!("lease {lease}: {spent} spent of {t}")),
            (Some(t), Some(r)) if spent + r != t => Some(format!(
                "lease {lease}: took {t}, {spent} spent, {r} returned"
            )),
            (Some(_), None) if lost == 0 && !lease_open(con, keys, &user, &lease).await? => Some(
                format!("lease {lease}: neither returned nor lost, and not open in Redis"),
            ),
            _ => None,
        };
        if let Some(what) = what {
            report.drifts.push(Drift { user, what });
        }
    }
    Ok(report)
}

/// Whether the account still holds `lease` in Redis (open, in a gateway).
async fn lease_open(
    con: &mut RedisConn,
    keys: &KeyLayout,
    user: &str,
    lease: &str,
) -> Result<bool, VerifyError> {
    let Ok(user) = crate::domain::UserId::parse(user) else {
        return Ok(false);
    };
    let open: bool = redis::cmd("HEXISTS")
        .arg(keys.account(&user))
        .arg(format!("lease:{lease}"))
        .query_async(con)
        .await?;
    Ok(open)
}

struct RedisAccount {
    plan: String,
    monthly: i64,
    bonus: i64,
}

/// Every account hash in Redis: SCAN on every master (a cluster spreads
/// accounts over all of them), then HMGET per account.
async fn read_redis_accounts(
    con: &mut RedisConn,
    keys: &KeyLayout,
) -> Result<HashMap<String, RedisAccount>, VerifyError> {
    let mut names = Vec::new();
    for node in con.masters().await? {
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(keys.account_pattern())
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) =
                redis::from_redis_value(con.on_node(&node, &scan).await?)
                    .map_err(redis::RedisError::from)?;
            names.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    let mut accounts = HashMap::new();
    for chunk in names.chunks(500) {
        // One command per account (each in its own slot on a cluster),
        // sent together: pipelined on one connection either way.
        let replies = join_all(chunk.iter().map(|name| {
            let mut con = con.clone();
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(name).arg("plan").arg("monthly").arg("bonus");
            async move {
                cmd.query_async::<(Option<String>, Option<i64>, Option<i64>)>(&mut con)
                    .await
            }
        }))
        .await;
        for (name, reply) in chunk.iter().zip(replies) {
            let (plan, monthly, bonus) = reply?;
            if let Some(user) = keys.user_of_account_key(name) {
                accounts.insert(
                    user.to_owned(),
                    RedisAccount {
                        plan: plan.unwrap_or_default(),
                        monthly: monthly.unwrap_or(0),
                        bonus: bonus.unwrap_or(0),
                    },
                );
            }
        }
    }
    Ok(accounts)
}
