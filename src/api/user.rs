//! The user billing API: the caller's own balance and history, and the
//! public plan and price tables. History comes from the Postgres ledger and
//! its daily aggregates, never from scanning Redis.

use chrono::{Days, NaiveDate};
use http::{Method, Request};
use hyper::body::Incoming;
use serde::Deserialize;

use super::schema::{
    CreditCost, CreditCostsAnswer, Credits, Daily, ErrorBody, MeAnswer, Period, PlanView,
    PlansAnswer, Transactions, UsageAnswer,
};
use super::{ApiResult, Page, auth, ok, query, require};
use crate::catalog::Plan;
use crate::error::ApiError;
use crate::ledger::store;
use crate::metering::AccountState;
use crate::startup::AppState;

pub async fn route(state: &AppState, req: Request<Incoming>, rest: &[&str]) -> ApiResult {
    require(&req, Method::GET)?;
    match rest {
        ["plans"] => plans(state),
        ["credit-costs"] => credit_costs(state),
        ["me"] => me(state, req).await,
        ["usage"] => usage(state, req).await,
        _ => Err(ApiError::NotFound),
    }
}

#[utoipa::path(
    get,
    path = "/api/billing/plans",
    tag = "billing",
    responses(
        (status = 200, description = "The plans table", body = PlansAnswer),
    )
)]
fn plans(state: &AppState) -> ApiResult {
    ok(&PlansAnswer {
        plans: state.catalog.plans().iter().map(PlanView::from).collect(),
    })
}

#[utoipa::path(
    get,
    path = "/api/billing/credit-costs",
    tag = "billing",
    responses(
        (status = 200, description = "Credits per call of each module", body = CreditCostsAnswer),
    )
)]
fn credit_costs(state: &AppState) -> ApiResult {
    let modules = state
        .catalog
        .modules()
        .iter()
        .map(|m| CreditCost {
            module: m.id.to_string(),
            cost: m.cost.get(),
            prefix: m.prefix.clone(),
            actions: m
                .actions
                .iter()
                .map(|(a, c)| (a.to_string(), c.get()))
                .collect(),
        })
        .collect();
    ok(&CreditCostsAnswer { modules })
}

/// The account as the user should see it now: a new day or period that no
/// call has started yet is shown as started (what the next call will do).
pub struct View {
    pub monthly: i64,
    pub bonus: i64,
    pub day_used: i64,
    /// Blocked by the auto-block policy and still without credits.
    pub auto_blocked: bool,
}

pub fn view(account: &AccountState, plan: Option<&Plan>, day: &str, period: &str) -> View {
    let monthly = if account.period == period {
        account.monthly
    } else {
        plan.map_or(0, |p| p.monthly_credits.get())
    };
    View {
        monthly,
        bonus: account.bonus,
        day_used: if account.day == day {
            account.day_used
        } else {
            0
        },
        auto_blocked: account.exhausted && monthly + account.bonus <= 0,
    }
}

/// The account's Redis state, rebuilding it from Postgres if needed.
pub async fn account_state(
    state: &AppState,
    user: &crate::domain::UserId,
) -> Result<AccountState, ApiError> {
    if let Some(a) = state.meter.account(user).await? {
        return Ok(a);
    }
    state.billing.rebuild(user).await?;
    state
        .meter
        .account(user)
        .await?
        .ok_or(ApiError::MeteringUnavailable)
}

#[utoipa::path(
    get,
    path = "/api/billing/me",
    tag = "billing",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The caller's balance", body = MeAnswer),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn me(state: &AppState, req: Request<Incoming>) -> ApiResult {
    let id = auth::user(state, &req).await?;
    let user = state
        .accounts
        .get_user(&id)
        .await?
        .ok_or(ApiError::Unauthenticated("unknown user"))?;
    let account = account_state(state, &id).await?;
    let stamp = state.calendar.now();
    let plan = state.catalog.plan(user.plan.as_str());
    let v = view(&account, plan, &stamp.day, &stamp.period);
    let allowance = plan.map_or(0, |p| p.monthly_credits.get());
    ok(&MeAnswer {
        user_id: id.to_string(),
        name: user.name,
        email: user.email,
        plan: plan.map(PlanView::from),
        status: if user.blocked { "blocked" } else { "active" }.into(),
        auto_blocked: v.auto_blocked,
        credits: Credits {
            remaining: v.monthly + v.bonus,
            monthly_remaining: v.monthly,
            monthly_allowance: allowance,
            bonus: v.bonus,
        },
        daily: Daily {
            used: v.day_used,
            limit: plan.and_then(|p| p.daily_limit.map(|l| l.get())),
            resets_at: stamp.day_ends,
        },
        period: Period {
            id: stamp.period.clone(),
            start: stamp.period_starts,
            resets_at: stamp.period_ends,
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    days: Option<i64>,
    page: Option<i64>,
    per_page: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/billing/usage",
    tag = "billing",
    security(("api_key" = [])),
    params(
        ("days" = Option<i64>, Query, minimum = 1, maximum = 366, description = "default 30"),
        ("page" = Option<i64>, Query, minimum = 1),
        ("per_page" = Option<i64>, Query, minimum = 1, maximum = 200, description = "default 50"),
    ),
    responses(
        (status = 200, description = "Usage series, totals and latest transactions", body = UsageAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn usage(state: &AppState, req: Request<Incoming>) -> ApiResult {
    let q: UsageQuery = query(&req)?;
    let id = auth::user(state, &req).await?;
    let days = super::days(q.days, 30)?;
    let page = Page::parse(q.page, q.per_page)?;
    let pool = &state.reports;
    let today = state.calendar.now().local_date();
    let from = today
        .checked_sub_days(Days::new(days as u64 - 1))
        .unwrap_or(today);
    let recorded = store::usage_by_day(pool, Some(id.as_str()), from).await?;
    let series = fill_days(from, today, recorded);
    let totals = store::totals_by_module(pool, id.as_str(), from).await?;
    let (items, total) =
        store::transactions(pool, id.as_str(), page.per_page, page.offset()).await?;
    ok(&UsageAnswer {
        days,
        from,
        totals,
        series,
        transactions: Transactions {
            items,
            page: page.page,
            per_page: page.per_page,
            total,
        },
    })
}

/// One entry per day from `from` to `to`, zeros where nothing was used,
/// so charts need no gap logic.
pub fn fill_days(
    from: NaiveDate,
    to: NaiveDate,
    recorded: Vec<store::DayUsage>,
) -> Vec<store::DayUsage> {
    let mut out = Vec::new();
    let mut recorded = recorded.into_iter().peekable();
    let mut day = from;
    while day <= to {
        match recorded.next_if(|r| r.date == day) {
            Some(r) => out.push(r),
            None => out.push(store::DayUsage {
                date: day,
                credits: 0,
                requests: 0,
                by_module: Default::default(),
            }),
        }
        day = match day.succ_opt() {
            Some(d) => d,
            None => break,
        };
    }
    out
}
