//! The user billing API: the caller's own balance and history, and the
//! public plan and price tables. History comes from the Postgres ledger and
//! its daily aggregates, never from scanning Redis.

use std::sync::Arc;

use axum::extract::State;
use chrono::{Days, NaiveDate};
use http::StatusCode;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{Caller, Json, KeyManager, Query, Segments};
use super::schema::{
    CreatedKeyAnswer, CreditCost, CreditCostsAnswer, Credits, Daily, ErrorBody, KeyView,
    KeysAnswer, MeAnswer, NewKeyBody, Period, PlanView, PlansAnswer, RevokedAnswer, Transactions,
    UsageAnswer,
};
use super::{ApiResult, Group, Page, json, ok};
use crate::accounts::KeySpec;
use crate::domain::ModuleId;
use crate::error::{ApiError, InvalidCode};
use crate::ledger::reports;
use crate::state::AppState;

/// `/api/billing/*`: the price tables are public; the rest names the
/// caller by its API key.
pub fn routes() -> Group {
    OpenApiRouter::new()
        .routes(routes!(plans))
        .routes(routes!(credit_costs))
        .routes(routes!(me))
        .routes(routes!(usage))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
        .routes(routes!(super::invoices::user_list))
        .routes(routes!(super::invoices::user_pdf))
}

#[utoipa::path(
    get,
    path = "/keys",
    tag = "billing",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The caller's live API keys (never the keys themselves)", body = KeysAnswer),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    )
)]
async fn list_keys(State(state): State<Arc<AppState>>, Caller(id): Caller) -> ApiResult {
    let keys = state.billing.accounts().keys_of(&id, false).await?;
    ok(&KeysAnswer {
        keys: keys.into_iter().map(KeyView::from).collect(),
        max_keys: state.api_keys.max_keys_per_user,
    })
}

#[utoipa::path(
    post,
    path = "/keys",
    tag = "billing",
    security(("api_key" = [])),
    request_body = NewKeyBody,
    responses(
        (status = 201, description = "The new key, shown this once", body = CreatedKeyAnswer),
        (status = 400, description = "Invalid input, or auth.max_keys_per_user live keys already; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "The caller's key is limited to some modules", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable (a key created in Postgres reaches Redis within a second of it answering)", body = ErrorBody),
    )
)]
async fn create_key(
    State(state): State<Arc<AppState>>,
    KeyManager(id): KeyManager,
    Json(body): Json<NewKeyBody>,
) -> ApiResult {
    let name = body.name.trim();
    if name.is_empty() {
        return Err(ApiError::bad_request(
            InvalidCode::Key,
            "name the key (1 to 64 characters)",
        ));
    }
    let modules = body
        .modules
        .map(|m| {
            m.iter()
                .map(|m| {
                    ModuleId::parse(m).map_err(|_| {
                        ApiError::bad_request(InvalidCode::Key, format!("{m:?} is not a module id"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let spec = KeySpec {
        name: name.to_owned(),
        expires_at: body.expires_at,
        modules,
    };
    let actor = format!("user:{id}");
    let key = state
        .billing
        .create_key(&id, &spec, Some(state.api_keys.max_keys_per_user), &actor)
        .await?;
    let view = state
        .billing
        .accounts()
        .keys_of(&id, false)
        .await?
        .into_iter()
        .find(|k| k.id == key.id)
        .map(KeyView::from)
        .ok_or(ApiError::Internal)?;
    json(
        StatusCode::CREATED,
        &CreatedKeyAnswer {
            api_key: key.key.reveal().to_owned(),
            key: view,
        },
    )
}

#[utoipa::path(
    delete,
    path = "/keys/{key_id}",
    tag = "billing",
    security(("api_key" = [])),
    params(
        ("key_id" = String, Path,),
    ),
    responses(
        (status = 200, description = "Revoked on every instance", body = RevokedAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "The caller's key is limited to some modules", body = ErrorBody),
        (status = 404, description = "None of the caller's keys", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn revoke_key(
    State(state): State<Arc<AppState>>,
    KeyManager(id): KeyManager,
    Segments(key_id): Segments<String>,
) -> ApiResult {
    let key_id = super::parse_key_id(&key_id)?;
    state
        .billing
        .revoke_key(&id, key_id, &format!("user:{id}"))
        .await?;
    ok(&RevokedAnswer {
        revoked: true,
        key_id,
    })
}

#[utoipa::path(
    get,
    path = "/plans",
    tag = "billing",
    responses(
        (status = 200, description = "The plans table", body = PlansAnswer),
    )
)]
async fn plans(State(state): State<Arc<AppState>>) -> ApiResult {
    ok(&PlansAnswer {
        plans: state
            .billing
            .catalog()
            .plans()
            .iter()
            .map(PlanView::from)
            .collect(),
    })
}

#[utoipa::path(
    get,
    path = "/credit-costs",
    tag = "billing",
    responses(
        (status = 200, description = "Credits per call of each module", body = CreditCostsAnswer),
    )
)]
async fn credit_costs(State(state): State<Arc<AppState>>) -> ApiResult {
    let modules = state
        .billing
        .catalog()
        .modules()
        .iter()
        .map(|m| CreditCost {
            module: m.id.to_string(),
            label: m.label.clone(),
            description: m.description.clone(),
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

#[utoipa::path(
    get,
    path = "/me",
    tag = "billing",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The caller's balance", body = MeAnswer),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn me(State(state): State<Arc<AppState>>, Caller(id): Caller) -> ApiResult {
    let user = state
        .billing
        .accounts()
        .get_user(&id)
        .await?
        .ok_or(ApiError::Unauthenticated("unknown user"))?;
    let account = state.billing.account(&id).await?;
    let stamp = state.billing.calendar().now();
    let plan = state.billing.catalog().plan(user.plan.as_str());
    let v = account.as_of(plan, &stamp);
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
            id: stamp.period.to_string(),
            start: stamp.period_starts,
            resets_at: stamp.period_ends,
            renews_on: stamp
                .period_ends
                .with_timezone(&state.billing.calendar().timezone())
                .date_naive(),
        },
        timezone: state.billing.calendar().timezone().name().to_owned(),
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
    path = "/usage",
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
async fn usage(
    State(state): State<Arc<AppState>>,
    Query(q): Query<UsageQuery>,
    Caller(id): Caller,
) -> ApiResult {
    let days = super::days(q.days, 30)?;
    let page = Page::parse(q.page, q.per_page)?;
    let pool = &state.reports;
    let today = state.billing.calendar().now().local_date();
    let from = today
        .checked_sub_days(Days::new(days as u64 - 1))
        .unwrap_or(today);
    let recorded = reports::usage_by_day(pool, Some(&id), from).await?;
    let series = fill_days(from, today, recorded);
    let totals = reports::totals_by_module(pool, &id, from).await?;
    let (items, total) = reports::transactions(pool, &id, page.per_page, page.offset()).await?;
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
    recorded: Vec<reports::DayUsage>,
) -> Vec<reports::DayUsage> {
    let mut out = Vec::new();
    let mut recorded = recorded.into_iter().peekable();
    let mut day = from;
    while day <= to {
        match recorded.next_if(|r| r.date == day) {
            Some(r) => out.push(r),
            None => out.push(reports::DayUsage {
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
