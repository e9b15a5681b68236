//! The credits integration API (service to service, `X-Service-Key`),
//! kept compatible with the platform's existing callers:
//! `check` → `consume` (idempotent on `request_id`) → `refund`, and the
//! monthly reset for cron. The same scripts and rules as the proxy.

use std::sync::Arc;

use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{Actor, Json};
use super::parse_user;
use super::schema::{
    CheckAnswer, CheckBody, ConsumeAnswer, ConsumeBody, ErrorBody, RefundAnswer, RefundBody,
    ResetAnswer,
};
use super::{ApiResult, Group, ok};
use crate::billing::Decision;
use crate::catalog::Module;
use crate::domain::{ActionId, Credits, RequestId};
use crate::error::{ApiError, InvalidCode, MissingCode};
use crate::metering::{ChargeRequest, Idempotency, Mode, RefundOf, RefundOutcome, Refusal};
use crate::state::AppState;

/// `/api/credits/*`, every route behind `X-Service-Key` or a trusted
/// network (the layer is put on by [`super::router`]).
pub fn routes() -> Group {
    OpenApiRouter::new()
        .routes(routes!(check))
        .routes(routes!(consume))
        .routes(routes!(refund))
        .routes(routes!(reset_monthly))
}

fn parse_module<'a>(state: &'a AppState, s: &str) -> Result<&'a Module, ApiError> {
    state.billing.catalog().module(s).ok_or_else(|| {
        ApiError::bad_request(InvalidCode::UnknownModule, format!("no module {s:?}"))
    })
}

fn parse_action(s: Option<&str>) -> Result<Option<ActionId>, ApiError> {
    s.map(|a| ActionId::parse(a).map_err(|e| ApiError::invalid_field("action", e.why)))
        .transpose()
}

#[utoipa::path(
    post,
    path = "/check",
    tag = "credits",
    security(("service_key" = [])),
    request_body = CheckBody,
    responses(
        (status = 200, description = "Whether the call would be allowed; charges nothing", body = CheckAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn check(State(state): State<Arc<AppState>>, Json(body): Json<CheckBody>) -> ApiResult {
    let user = parse_user(&body.user_id)?;
    let module = parse_module(&state, &body.module)?;
    let action = parse_action(body.action.as_deref())?;
    let cost = module.cost_of(action.as_ref()).get();
    let stamp = state.billing.calendar().now();
    let rid = RequestId::generate();
    let decision = state
        .billing
        .charge(&ChargeRequest {
            user: &user,
            key_hash: None,
            module,
            action: action.as_ref(),
            request_id: &rid,
            idempotency: Idempotency::None,
            actor: "check",
            stamp: &stamp,
            mode: Mode::Check,
        })
        .await?;
    let (can_proceed, balance, reason) = match decision {
        // In check mode the receipt's balance is the account as it is.
        Decision::Charged(r) => (true, Some(r.balance), None),
        Decision::Duplicate { balance, .. } => (true, Some(balance), None),
        // Only proxy Idempotency-Keys produce repeats.
        Decision::Repeat(_) => return Err(ApiError::Internal),
        Decision::Refused(Refusal::DailyLimit(b)) => (false, Some(b), Some("daily_limit")),
        Decision::Refused(Refusal::InsufficientCredits(b)) => {
            (false, Some(b), Some("insufficient_credits"))
        }
        Decision::Refused(Refusal::Blocked) => (false, None, Some("blocked")),
        Decision::Refused(Refusal::ModuleNotInPlan) => (false, None, Some("module_not_in_plan")),
        // The credits API names users, never keys: these cannot happen.
        Decision::Refused(Refusal::UnknownKey | Refusal::KeyExpired | Refusal::KeyScope) => {
            (false, None, Some("unauthenticated"))
        }
        Decision::Refused(Refusal::RateLimited(_)) => (false, None, Some("rate_limited")),
    };
    let (remaining, used, limit) = match balance {
        Some(b) => (
            b.remaining(),
            b.day_used.get(),
            b.daily_limit.map(Credits::get),
        ),
        None => match state.billing.meter().account(&user).await? {
            Some(a) => {
                let plan = state.billing.catalog().plan(&a.plan);
                let v = a.as_of(plan, &stamp);
                (
                    v.remaining(),
                    v.day_used,
                    plan.and_then(|p| p.daily_limit.map(|l| l.get())),
                )
            }
            None => (0, 0, None),
        },
    };
    ok(&CheckAnswer {
        can_proceed,
        cost,
        credits_remaining: remaining,
        daily_used: used,
        daily_limit: limit,
        reason: reason.map(str::to_owned),
    })
}

#[utoipa::path(
    post,
    path = "/consume",
    tag = "credits",
    security(("service_key" = [])),
    request_body = ConsumeBody,
    responses(
        (status = 200, description = "Charged, or a duplicate of an earlier charge", body = ConsumeAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 402, description = "Not enough credits", body = ErrorBody),
        (status = 403, description = "Blocked or module not in plan", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 429, description = "Daily limit or per-plan rate limit reached", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn consume(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    Json(body): Json<ConsumeBody>,
) -> ApiResult {
    let user = parse_user(&body.user_id)?;
    let module = parse_module(&state, &body.module)?;
    let action = parse_action(body.action.as_deref())?;
    let rid = RequestId::parse(&body.request_id)
        .map_err(|e| ApiError::invalid_field("request_id", e.why))?;
    let stamp = state.billing.calendar().now();
    let cost = module.cost_of(action.as_ref()).get();
    let decision = state
        .billing
        .charge(&ChargeRequest {
            user: &user,
            key_hash: None,
            module,
            action: action.as_ref(),
            request_id: &rid,
            idempotency: Idempotency::RequestId,
            actor: &actor,
            stamp: &stamp,
            mode: Mode::Charge,
        })
        .await?;
    match decision {
        Decision::Charged(r) => ok(&ConsumeAnswer {
            success: true,
            charged: r.charged,
            credits_remaining: r.balance.remaining(),
            duplicate: false,
        }),
        Decision::Duplicate { balance, .. } => ok(&ConsumeAnswer {
            success: true,
            charged: 0,
            credits_remaining: balance.remaining(),
            duplicate: true,
        }),
        Decision::Refused(refusal) => Err(ApiError::refusal(refusal, &module.id, cost, &stamp)),
        // Only proxy Idempotency-Keys produce repeats.
        Decision::Repeat(_) => Err(ApiError::Internal),
    }
}

#[utoipa::path(
    post,
    path = "/refund",
    tag = "credits",
    security(("service_key" = [])),
    request_body = RefundBody,
    responses(
        (status = 200, description = "Refunded", body = RefundAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No refundable charge", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn refund(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    Json(body): Json<RefundBody>,
) -> ApiResult {
    let user = parse_user(&body.user_id)?;
    let rid = RequestId::parse(&body.request_id)
        .map_err(|e| ApiError::invalid_field("request_id", e.why))?;
    let now = state.billing.calendar().now();
    match state
        .billing
        .meter()
        .refund(&user, &rid, RefundOf::Record, &actor, &now)
        .await?
    {
        RefundOutcome::Refunded {
            amount,
            monthly,
            bonus,
            ..
        } => ok(&RefundAnswer {
            success: true,
            refunded: amount,
            credits_remaining: monthly + bonus,
        }),
        RefundOutcome::NotFound | RefundOutcome::Missing => Err(ApiError::missing(
            MissingCode::Charge,
            format!(
                "no refundable charge {} for user {user} (never charged, already refunded, or older than 24 h)",
                rid
            ),
        )),
    }
}

#[utoipa::path(
    post,
    path = "/reset-monthly",
    tag = "credits",
    security(("service_key" = [])),
    responses(
        (status = 200, description = "Accounts moved to the current period", body = ResetAnswer),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn reset_monthly(State(state): State<Arc<AppState>>, Actor(actor): Actor) -> ApiResult {
    let report = state.billing.reset_monthly(&actor).await?;
    // The period just ended gets its invoices numbered, in the background
    // (one transaction per account: minutes for a large base, longer than
    // a caller should wait); one that fails is numbered when first listed
    // or downloaded.
    let invoices = state.invoices.clone();
    tokio::spawn(async move {
        let closed = invoices.previous_period();
        match invoices.close_period(&closed).await {
            Ok(n) => tracing::info!(period = %closed, invoices = n, "invoices issued"),
            Err(crate::invoices::InvoiceError::NotConfigured) => {}
            Err(e) => tracing::warn!(period = %closed, error = %e, "invoices not issued"),
        }
    });
    state
        .billing
        .accounts()
        .audit(
            &actor,
            "reset_monthly",
            None,
            serde_json::json!({"period": report.period, "reset": report.reset}),
        )
        .await?;
    ok(&ResetAnswer {
        period: report.period,
        accounts: report.accounts,
        reset: report.reset,
        already_current: report.already_current,
    })
}
