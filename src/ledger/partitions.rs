//! The ledger's monthly partitions: created ahead, detached when old.
//!
//! `ledger_events` is partitioned by month of `local_day` (see the
//! migration `ledger_partitions`). Inserting a row for a month without a
//! partition fails, so partitions are created [`AHEAD`] months in advance
//! when the gateway starts and every day after, and the flusher creates one
//! on demand when a batch still hits a missing month (an event replayed
//! from long ago). `ledger.retention_months` detaches months that old: the
//! table stays, outside the ledger, for the operator to archive or drop.

use chrono::{Datelike, Months, NaiveDate};
use sqlx::PgPool;

/// Months created ahead of the current one.
pub const AHEAD: u32 = 3;

/// Creates the partitions of `today`'s month and the [`AHEAD`] next ones.
pub async fn ensure_ahead(pool: &PgPool, today: NaiveDate) -> Result<(), sqlx::Error> {
    for m in 0..=AHEAD {
        if let Some(day) = today.checked_add_months(Months::new(m)) {
            ensure(pool, day).await?;
        }
    }
    Ok(())
}

/// Creates the partition of the month holding `day` unless it exists;
/// safe to race from several gateways. Returns its name.
pub async fn ensure(pool: &PgPool, day: NaiveDate) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT ledger_ensure_partition($1)")
        .bind(day)
        .fetch_one(pool)
        .await
}

/// The partitions attached now, oldest first: (name, first day).
pub async fn list<'e>(
    db: impl sqlx::PgExecutor<'e>,
) -> Result<Vec<(String, NaiveDate)>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'ledger_events'::regclass",
    )
    .fetch_all(db)
    .await?;
    let mut out: Vec<(String, NaiveDate)> = names
        .into_iter()
        .filter_map(|n| {
            let first = month_of(&n)?;
            Some((n, first))
        })
        .collect();
    out.sort_by_key(|(_, first)| *first);
    Ok(out)
}

/// Detaches every partition whose month ended more than `keep_months`
/// months before `today`'s month. Returns the names detached.
pub async fn detach_older_than(
    pool: &PgPool,
    today: NaiveDate,
    keep_months: u32,
) -> Result<Vec<String>, sqlx::Error> {
    let this_month = today.with_day(1).unwrap_or(today);
    let Some(oldest_kept) = this_month.checked_sub_months(Months::new(keep_months)) else {
        return Ok(Vec::new());
    };
    let mut detached = Vec::new();
    for (_, first) in list(pool).await? {
        if first < oldest_kept {
            // Rebuilt from the parsed month: digits and underscores only.
            let name = partition_name(first);
            let sql = format!("ALTER TABLE ledger_events DETACH PARTITION {name}");
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
            detached.push(name);
        }
    }
    Ok(detached)
}

fn partition_name(first: NaiveDate) -> String {
    format!("ledger_events_{:04}_{:02}", first.year(), first.month())
}

/// `ledger_events_2026_11` → 2026-11-01.
fn month_of(name: &str) -> Option<NaiveDate> {
    let rest = name.strip_prefix("ledger_events_")?;
    let (y, m) = rest.split_once('_')?;
    NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)
}

/// Whether `e` is Postgres refusing a row no partition accepts.
pub fn is_missing_partition(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| {
        d.code().as_deref() == Some("23514") && d.message().contains("no partition")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_give_their_month() {
        assert_eq!(
            month_of("ledger_events_2026_11"),
            NaiveDate::from_ymd_opt(2026, 11, 1)
        );
        assert_eq!(month_of("ledger_events_unpartitioned"), None);
        assert_eq!(month_of("users"), None);
        let first = NaiveDate::from_ymd_opt(2027, 2, 1).expect("date");
        assert_eq!(month_of(&partition_name(first)), Some(first));
    }
}
