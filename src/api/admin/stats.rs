//! The admin dashboard's numbers: accounts, revenue, consumption.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use chrono::Days;
use serde::Deserialize;

use super::super::extract::Query;
use super::super::schema::{
    Consumption, ErrorBody, ModuleUsage, MonthRevenueView, Revenue, StatsAnswer, TopConsumer,
    UsersStats,
};
use super::super::user::fill_days;
use super::super::{ApiResult, ok};
use crate::error::ApiError;
use crate::ledger::reports;
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatsQuery {
    days: Option<i64>,
    months: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/stats",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("days" = Option<i64>, Query, minimum = 1, maximum = 366, description = "adds a daily series"),
        ("months" = Option<u32>, Query, minimum = 1, maximum = 24, description = "adds the monthly recurring revenue of the last N months"),
    ),
    responses(
        (status = 200, description = "Users, revenue, consumption", body = StatsAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub(super) async fn stats(
    State(state): State<Arc<AppState>>,
    Query(q): Query<StatsQuery>,
) -> ApiResult {
    let window = q.days.map(|d| super::super::days(Some(d), d)).transpose()?;
    if q.months.is_some_and(|m| !(1..=24).contains(&m)) {
        return Err(ApiError::invalid_request("months must be between 1 and 24"));
    }
    let pool = &state.reports;
    let stamp = state.billing.calendar().now();
    let today = stamp.local_date();
    let month_start = stamp.period_first_day();

    let counts = reports::users_by_plan_and_status(pool).await?;
    let mut by_plan: BTreeMap<String, i64> = BTreeMap::new();
    let mut by_status: BTreeMap<String, i64> = BTreeMap::new();
    let mut revenue = 0i64;
    for (plan, status, n) in &counts {
        *by_plan.entry(plan.clone()).or_default() += n;
        *by_status.entry(status.clone()).or_default() += n;
        if status == "active" {
            revenue += state
                .billing
                .catalog()
                .plan(plan)
                .map_or(0, |p| p.price_dzd)
                * n;
        }
    }
    let to_map = |rows: Vec<(String, i64, i64)>| -> BTreeMap<String, ModuleUsage> {
        rows.into_iter()
            .map(|(m, credits, requests)| (m, ModuleUsage { credits, requests }))
            .collect()
    };
    let consumed_today = to_map(reports::module_usage_since(pool, today).await?);
    let consumed_month = to_map(reports::module_usage_since(pool, month_start).await?);
    let top = reports::top_consumers(pool, month_start, 10).await?;
    let daily = match window {
        Some(days) => {
            let from = today
                .checked_sub_days(Days::new(days as u64 - 1))
                .unwrap_or(today);
            let recorded = reports::usage_by_day(pool, None, from).await?;
            Some(fill_days(from, today, recorded))
        }
        None => None,
    };
    ok(&StatsAnswer {
        users: UsersStats {
            total: by_status.values().sum(),
            by_plan,
            by_status,
        },
        revenue: Revenue {
            monthly_dzd: revenue,
            by_month: match q.months {
                Some(months) => Some(
                    crate::invoices::revenue::by_month(
                        pool,
                        state.billing.catalog(),
                        state.billing.calendar(),
                        months,
                    )
                    .await?
                    .into_iter()
                    .map(|m| MonthRevenueView {
                        month: m.month,
                        dzd: m.dzd,
                    })
                    .collect(),
                ),
                None => None,
            },
        },
        consumption: Consumption {
            today: consumed_today,
            this_month: consumed_month,
        },
        top_consumers: top
            .into_iter()
            .map(|c| TopConsumer {
                user_id: c.user_id,
                name: c.name,
                plan: c.plan,
                credits: c.credits,
            })
            .collect(),
        timezone: state.billing.calendar().timezone().name().to_owned(),
        daily,
    })
}
