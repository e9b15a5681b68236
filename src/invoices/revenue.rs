//! Monthly recurring revenue over time, from plan prices and the history
//! of plans and blocks in the audit trail: for each month, the price of
//! the plan every account held at the month's end (now, for the current
//! month), counting the accounts that existed and were not blocked then.
//! The current month's figure is the stats' `monthly_dzd`.
//!
//! Computed in memory: admin actions are few next to accounts, and one
//! pass over the accounts per month is cheaper than a correlated query per
//! account and month.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::catalog::Catalog;
use crate::metering::Calendar;

#[derive(Debug, PartialEq, Eq)]
pub struct MonthRevenue {
    /// `YYYY-MM`.
    pub month: String,
    pub dzd: i64,
}

/// user, at, action, details' from and to.
type AuditRow = (
    String,
    DateTime<Utc>,
    String,
    Option<String>,
    Option<String>,
);

struct Event {
    at: DateTime<Utc>,
    action: String,
    from: Option<String>,
    to: Option<String>,
}

/// The last `months` months, oldest first, the current one last.
pub async fn by_month(
    pool: &PgPool,
    catalog: &Catalog,
    calendar: &Calendar,
    months: u32,
) -> Result<Vec<MonthRevenue>, sqlx::Error> {
    let users: Vec<(String, String, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, plan, status, created_at FROM users")
            .fetch_all(pool)
            .await?;
    let rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT user_id, at, action, details->>'from', details->>'to' FROM admin_audit
             WHERE action IN ('plan_change', 'block', 'unblock') AND user_id IS NOT NULL
             ORDER BY at, id",
    )
    .fetch_all(pool)
    .await?;
    let mut history: HashMap<String, Vec<Event>> = HashMap::new();
    for (user, at, action, from, to) in rows {
        history.entry(user).or_default().push(Event {
            at,
            action,
            from,
            to,
        });
    }
    let now = Utc::now();
    let mut period = calendar.now().period;
    let mut periods = Vec::new();
    for _ in 0..months.max(1) {
        periods.push(period.clone());
        period = previous(&period);
    }
    periods.reverse();
    let mut out = Vec::with_capacity(periods.len());
    for month in periods {
        let Some((_, ends)) = calendar.period_bounds(&month) else {
            continue;
        };
        let at = ends.min(now);
        let mut dzd = 0i64;
        for (id, plan, status, created_at) in &users {
            if *created_at >= at {
                continue;
            }
            let events = history.get(id).map_or(&[][..], Vec::as_slice);
            let (plan, active) = state_at(events, at, plan, status == "active");
            if active {
                dzd += catalog.plan(&plan).map_or(0, |p| p.price_dzd);
            }
        }
        out.push(MonthRevenue { month, dzd });
    }
    Ok(out)
}

/// The plan and whether the account was active at `at`, from its history
/// (oldest first) and its state now.
fn state_at(
    events: &[Event],
    at: DateTime<Utc>,
    plan_now: &str,
    active_now: bool,
) -> (String, bool) {
    let plans = || events.iter().filter(|e| e.action == "plan_change");
    let blocks = || events.iter().filter(|e| e.action != "plan_change");
    let plan = match (plans().rev().find(|e| e.at < at), plans().next()) {
        (Some(e), _) => e.to.clone(),
        (None, Some(first)) => first.from.clone(),
        (None, None) => None,
    }
    .unwrap_or_else(|| plan_now.to_owned());
    let active = match (blocks().rev().find(|e| e.at < at), blocks().next()) {
        (Some(e), _) => e.action == "unblock",
        // Before its first block or unblock, the account was the opposite.
        (None, Some(first)) => first.action == "block",
        (None, None) => active_now,
    };
    (plan, active)
}

fn previous(period: &str) -> String {
    let (y, m) = period
        .split_once('-')
        .and_then(|(y, m)| Some((y.parse::<i32>().ok()?, m.parse::<u32>().ok()?)))
        .unwrap_or((1970, 1));
    if m <= 1 {
        format!("{:04}-12", y - 1)
    } else {
        format!("{y:04}-{:02}", m - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(days_ago: i64, action: &str, from: Option<&str>, to: Option<&str>) -> Event {
        Event {
            at: Utc::now() - chrono::Duration::days(days_ago),
            action: action.into(),
            from: from.map(Into::into),
            to: to.map(Into::into),
        }
    }

    #[test]
    fn the_state_at_an_instant_follows_the_history() {
        let events = vec![
            event(60, "plan_change", Some("free"), Some("starter")),
            event(40, "block", None, None),
            event(20, "unblock", None, None),
            event(10, "plan_change", Some("starter"), Some("pro")),
        ];
        let at = |d: i64| Utc::now() - chrono::Duration::days(d);
        assert_eq!(
            state_at(&events, at(70), "pro", true),
            ("free".into(), true)
        );
        assert_eq!(
            state_at(&events, at(50), "pro", true),
            ("starter".into(), true)
        );
        assert_eq!(
            state_at(&events, at(30), "pro", true),
            ("starter".into(), false)
        );
        assert_eq!(
            state_at(&events, at(15), "pro", true),
            ("starter".into(), true)
        );
        assert_eq!(state_at(&events, at(0), "pro", true), ("pro".into(), true));
        assert_eq!(
            state_at(&[], at(5), "business", false),
            ("business".into(), false)
        );
        assert_eq!(previous("2026-01"), "2025-12");
        assert_eq!(previous("2026-11"), "2026-10");
    }
}
