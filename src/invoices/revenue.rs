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

use super::{PlanChange, plan_in_force, previous_period};
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

/// An account's history: its plan changes, and its blocks (`true`) and
/// unblocks, each oldest first.
#[derive(Default)]
struct History {
    plans: Vec<PlanChange>,
    blocks: Vec<(DateTime<Utc>, bool)>,
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
    let mut history: HashMap<String, History> = HashMap::new();
    for (user, at, action, from, to) in rows {
        let h = history.entry(user).or_default();
        if action == "plan_change" {
            h.plans.push(PlanChange { at, from, to });
        } else {
            h.blocks.push((at, action == "block"));
        }
    }
    let none = History::default();
    let now = Utc::now();
    let mut period = calendar.now().period.to_string();
    let mut periods = Vec::new();
    for _ in 0..months.max(1) {
        periods.push(period.clone());
        period = previous_period(&period);
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
            let h = history.get(id).unwrap_or(&none);
            let (plan, active) = state_at(h, at, plan, status == "active");
            if active {
                dzd += catalog.plan(&plan).map_or(0, |p| p.price_dzd);
            }
        }
        out.push(MonthRevenue { month, dzd });
    }
    Ok(out)
}

/// The plan and whether the account was active at `at`, from its history
/// and its state now.
fn state_at(h: &History, at: DateTime<Utc>, plan_now: &str, active_now: bool) -> (String, bool) {
    let plan = plan_in_force(&h.plans, plan_now, |t| t < at);
    let active = match (
        h.blocks.iter().rev().find(|(t, _)| *t < at),
        h.blocks.first(),
    ) {
        (Some((_, blocked)), _) => !blocked,
        // Before its first block or unblock, the account was the opposite.
        (None, Some((_, blocked))) => *blocked,
        (None, None) => active_now,
    };
    (plan, active)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days_ago(d: i64) -> DateTime<Utc> {
        Utc::now() - chrono::Duration::days(d)
    }

    #[test]
    fn the_state_at_an_instant_follows_the_history() {
        let change = |d: i64, from: &str, to: &str| PlanChange {
            at: days_ago(d),
            from: Some(from.into()),
            to: Some(to.into()),
        };
        let h = History {
            plans: vec![change(60, "free", "starter"), change(10, "starter", "pro")],
            blocks: vec![(days_ago(40), true), (days_ago(20), false)],
        };
        assert_eq!(
            state_at(&h, days_ago(70), "pro", true),
            ("free".into(), true)
        );
        assert_eq!(
            state_at(&h, days_ago(50), "pro", true),
            ("starter".into(), true)
        );
        assert_eq!(
            state_at(&h, days_ago(30), "pro", true),
            ("starter".into(), false)
        );
        assert_eq!(
            state_at(&h, days_ago(15), "pro", true),
            ("starter".into(), true)
        );
        assert_eq!(state_at(&h, days_ago(0), "pro", true), ("pro".into(), true));
        assert_eq!(
            state_at(&History::default(), days_ago(5), "business", false),
            ("business".into(), false)
        );
    }
}
