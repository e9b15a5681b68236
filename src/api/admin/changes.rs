//! Admin changes to an account: plan, block, unblock, bonus grants. Each
//! is one `Billing` operation; this file only checks the input.

use std::sync::Arc;

use axum::extract::State;
use http::HeaderMap;

use super::super::extract::{Actor, Json, OptionalJson, PathUser};
use super::super::schema::{
    AdminCredits, ErrorBody, GrantAnswer, GrantBody, PlanBody, PlanChanged, PlanView, ReasonBody,
    StatusAnswer,
};
use super::super::{ApiResult, ok, parse_user};
use super::MAX_GRANT;
use super::users::fingerprint;
use crate::billing::BillingError;
use crate::domain::{Credits, IdempotencyKey, UserId};
use crate::error::{ApiError, InvalidCode};
use crate::metering::{Grant, GrantOutcome};
use crate::state::AppState;

pub(super) fn check_reason(reason: Option<&str>) -> Result<Option<String>, ApiError> {
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    if reason.is_some_and(|r| r.chars().count() > 500) {
        return Err(ApiError::invalid_request(
            "reason must be at most 500 characters",
        ));
    }
    // Postgres text cannot hold NUL; other control characters are noise.
    if reason.is_some_and(|r| r.chars().any(|c| c.is_control() && c != '\n' && c != '\t')) {
        return Err(ApiError::invalid_request(
            "reason must not contain control characters",
        ));
    }
    Ok(reason.map(str::to_owned))
}

#[utoipa::path(
    put,
    path = "/users/{id}/plan",
    tag = "admin",
    security(("admin_key" = [])),
    request_body = PlanBody,
    params(
        ("id" = String, Path,),
    ),
    responses(
        (status = 200, description = "Plan changed", body = PlanChanged),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub(super) async fn change_plan(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    PathUser(id): PathUser,
    Json(body): Json<PlanBody>,
) -> ApiResult {
    let plan = state.billing.catalog().plan(&body.plan).ok_or_else(|| {
        ApiError::bad_request(InvalidCode::UnknownPlan, format!("no plan {:?}", body.plan))
    })?;
    state.billing.change_plan(&id, &plan.id, &actor).await?;
    ok(&PlanChanged {
        user_id: id.to_string(),
        plan: PlanView::from(plan),
    })
}

#[utoipa::path(
    post,
    path = "/users/{id}/block",
    tag = "admin",
    security(("admin_key" = [])),
    request_body = Option<ReasonBody>,
    params(
        ("id" = String, Path,),
    ),
    responses(
        (status = 200, description = "Blocked on every instance", body = StatusAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub(super) async fn block(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    PathUser(id): PathUser,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> ApiResult {
    set_blocked(&state, &id, true, body, &actor).await
}

#[utoipa::path(
    post,
    path = "/users/{id}/unblock",
    tag = "admin",
    security(("admin_key" = [])),
    request_body = Option<ReasonBody>,
    params(
        ("id" = String, Path,),
    ),
    responses(
        (status = 200, description = "Unblocked", body = StatusAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub(super) async fn unblock(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    PathUser(id): PathUser,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> ApiResult {
    set_blocked(&state, &id, false, body, &actor).await
}

async fn set_blocked(
    state: &AppState,
    id: &UserId,
    blocked: bool,
    body: ReasonBody,
    actor: &str,
) -> ApiResult {
    let reason = check_reason(body.reason.as_deref())?;
    state
        .billing
        .set_blocked(id, blocked, reason.as_deref(), actor)
        .await?;
    ok(&StatusAnswer {
        user_id: id.to_string(),
        status: if blocked { "blocked" } else { "active" }.into(),
    })
}

#[utoipa::path(
    post,
    path = "/grant",
    tag = "admin",
    security(("admin_key" = [])),
    request_body = GrantBody,
    responses(
        (status = 200, description = "Bonus credits added", body = GrantAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub(super) async fn grant(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    headers: HeaderMap,
    Json(body): Json<GrantBody>,
) -> ApiResult {
    let idempotency_key = ApiError::idempotency_key(&headers)?;
    let id = parse_user(&body.user_id)?;
    if !(1..=MAX_GRANT).contains(&body.credits) {
        return Err(ApiError::bad_request(
            InvalidCode::Amount,
            format!("credits must be a whole number from 1 to {MAX_GRANT}"),
        ));
    }
    let reason = check_reason(Some(&body.reason))?
        .ok_or_else(|| ApiError::invalid_request("reason is required"))?;
    let credits =
        Credits::new(body.credits).map_err(|e| ApiError::invalid_request(e.to_string()))?;
    if state.billing.accounts().get_user(&id).await?.is_none() {
        return Err(ApiError::UnknownUser(id.to_string()));
    }
    let fingerprint = fingerprint(&["grant", &body.credits.to_string(), &reason]);
    let outcome = state
        .billing
        .grant(&Grant {
            user: &id,
            credits,
            reason: &reason,
            actor: &actor,
            idempotency: idempotency_key.as_ref().map(|k| (k, fingerprint.as_str())),
        })
        .await
        .map_err(|e| match e {
            BillingError::Meter(e) => {
                tracing::warn!(user = %id, error = %e, "grant not confirmed by Redis");
                ApiError::RedisUnavailable(
                    "Redis did not confirm the grant: it may or may not be applied; repeat the call with the same Idempotency-Key to apply it exactly once",
                )
            }
            e => e.into(),
        })?;
    let (monthly, bonus, replayed) = match outcome {
        GrantOutcome::Granted { monthly, bonus } => (monthly, bonus, false),
        GrantOutcome::Repeat { monthly, bonus } => (monthly, bonus, true),
        GrantOutcome::KeyReused => return Err(ApiError::AdminIdempotencyKeyReused),
        GrantOutcome::OverLimit { bonus } => {
            return Err(ApiError::bad_request(
                InvalidCode::BonusLimit,
                format!(
                    "granting {} would take the bonus from {bonus} past the maximum of {} credits",
                    body.credits,
                    Credits::MAX
                ),
            ));
        }
        GrantOutcome::Missing => return Err(BillingError::RebuildFailed(id).into()),
    };
    let mut response = ok(&GrantAnswer {
        user_id: id.to_string(),
        granted: body.credits,
        credits: AdminCredits {
            remaining: monthly + bonus,
            monthly_remaining: monthly,
            bonus,
        },
    })?;
    if replayed {
        IdempotencyKey::mark_replayed(response.headers_mut());
    }
    Ok(response)
}
