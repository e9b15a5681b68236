//! Admin handlers for users: list, create, detail, plan, block, grant.

use std::sync::Arc;

use axum::extract::State;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::super::extract::{Actor, Json, PathUser, Query};
use super::super::schema::{
    AdminCredits, AdminDaily, CreateUserBody, CreatedUser, ErrorBody, KeyView, PlanView,
    UserDetail, UserList, UserRow, UserSummary,
};
use super::super::{ApiResult, Page, json, ok, parse_user};
use crate::accounts::directory::UserFilter;
use crate::accounts::{Created, NewUser};
use crate::domain::{IdempotencyKey, UserId};
use crate::error::{ApiError, InvalidCode};
use crate::ledger::reports;
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    plan: Option<String>,
    status: Option<String>,
    q: Option<String>,
    page: Option<i64>,
    per_page: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/users",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("plan" = Option<String>, Query,),
        ("status" = Option<String>, Query, description = "active or blocked"),
        ("q" = Option<String>, Query, description = "search in name, email, id"),
        ("page" = Option<i64>, Query, minimum = 1),
        ("per_page" = Option<i64>, Query, minimum = 1, maximum = 200),
    ),
    responses(
        (status = 200, description = "A page of users", body = UserList),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub(super) async fn list_users(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let page = Page::parse(q.page, q.per_page)?;
    let unknown_plan = q
        .plan
        .as_deref()
        .filter(|p| !p.is_empty() && state.billing.catalog().plan(p).is_none());
    if let Some(plan) = unknown_plan {
        return Err(ApiError::bad_request(
            InvalidCode::UnknownPlan,
            format!("no plan {plan:?}"),
        ));
    }
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    if status.is_some_and(|s| s != "active" && s != "blocked") {
        return Err(ApiError::invalid_request(
            "status must be active or blocked",
        ));
    }
    if q.q
        .as_deref()
        .is_some_and(|s| s.chars().count() > 100 || s.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            InvalidCode::Query,
            "q must be at most 100 characters, no control characters",
        ));
    }
    let stamp = state.billing.calendar().now();
    let month_start = stamp.period_first_day();
    let filter = UserFilter {
        plan: q.plan.as_deref().filter(|p| !p.is_empty()),
        status,
        search: q.q.as_deref().filter(|s| !s.is_empty()),
    };
    let (rows, total) = state
        .billing
        .accounts()
        .list_users(filter, month_start, page.per_page, page.offset())
        .await?;
    let mut users = Vec::with_capacity(rows.len());
    for row in rows {
        let plan_def = state.billing.catalog().plan(&row.plan);
        let allowance = plan_def.map_or(0, |p| p.monthly_credits.get());
        // Redis when it holds the account, else the ledger snapshot, else
        // a fresh allowance: the same answer the account would give.
        let hot = match UserId::parse(&row.id) {
            Ok(uid) => state.billing.meter().account(&uid).await?,
            Err(_) => None,
        };
        let remaining = match hot {
            Some(a) => {
                let v = a.as_of(plan_def, &stamp);
                v.monthly + v.bonus
            }
            None => match row.snapshot {
                Some((m, b, p)) if p == stamp.period => m + b,
                Some((_, b, _)) => allowance + b,
                None => allowance,
            },
        };
        users.push(UserRow {
            id: row.id,
            name: row.name,
            email: row.email,
            plan: row.plan,
            status: row.status,
            created_at: row.created_at,
            credits_remaining: remaining,
            used_this_month: row.used_this_month,
        });
    }
    ok(&UserList {
        users,
        page: page.page,
        per_page: page.per_page,
        total,
    })
}

pub(super) fn check_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid_request(
            "name must be 1 to 100 characters, no control characters",
        ));
    }
    Ok(name)
}

pub(super) fn check_email(email: Option<&str>) -> Result<Option<&str>, ApiError> {
    let Some(email) = email.map(str::trim).filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if !valid {
        return Err(ApiError::invalid_request("email is not a valid address"));
    }
    Ok(Some(email))
}

#[utoipa::path(
    post,
    path = "/users",
    tag = "admin",
    security(("admin_key" = [])),
    request_body = CreateUserBody,
    responses(
        (status = 201, description = "The user and its first API key (shown once)", body = CreatedUser),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub(super) async fn create_user(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    headers: HeaderMap,
    Json(body): Json<CreateUserBody>,
) -> ApiResult {
    let idempotency_key = ApiError::idempotency_key(&headers)?;
    let name = check_name(&body.name)?;
    let email = check_email(body.email.as_deref())?;
    let id = body.id.as_deref().map(parse_user).transpose()?;
    let fingerprint = fingerprint(&[
        "create_user",
        name,
        email.unwrap_or(""),
        &body.plan,
        body.id.as_deref().unwrap_or(""),
    ]);
    let created = state
        .billing
        .accounts()
        .create_user(NewUser {
            id,
            name,
            email,
            plan: &body.plan,
            actor: &actor,
            idempotency: idempotency_key.as_ref().map(|k| (k, fingerprint.as_str())),
        })
        .await?;
    let (user, api_key, key_id, replayed) = match created {
        Created::New(user, key) => (user, Some(key.key.reveal().to_owned()), key.id, false),
        Created::Replayed(user, key_id) => (user, None, key_id, true),
    };
    let mut response = json(
        StatusCode::CREATED,
        &CreatedUser {
            user: UserSummary {
                id: user.id.to_string(),
                name: user.name,
                email: user.email,
                plan: user.plan.to_string(),
                status: if user.blocked { "blocked" } else { "active" }.into(),
            },
            api_key,
            key_id,
        },
    )?;
    if replayed {
        IdempotencyKey::mark_replayed(response.headers_mut());
    }
    Ok(response)
}

/// What makes two admin writes "the same" under one Idempotency-Key.
pub(super) fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

#[utoipa::path(
    get,
    path = "/users/{id}",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("id" = String, Path,),
    ),
    responses(
        (status = 200, description = "One user", body = UserDetail),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub(super) async fn get_user(
    State(state): State<Arc<AppState>>,
    PathUser(id): PathUser,
) -> ApiResult {
    let id = &id;
    let user = state
        .billing
        .accounts()
        .get_user(id)
        .await?
        .ok_or_else(|| ApiError::UnknownUser(id.to_string()))?;
    let account = state.billing.account(id).await?;
    let stamp = state.billing.calendar().now();
    let plan = state.billing.catalog().plan(user.plan.as_str());
    let v = account.as_of(plan, &stamp);
    let keys = state.billing.accounts().keys_of(id, true).await?;
    let month_start = stamp.period_first_day();
    let totals = reports::totals_by_module(&state.reports, id, month_start).await?;
    ok(&UserDetail {
        id: id.to_string(),
        name: user.name,
        email: user.email,
        plan: plan.map(PlanView::from),
        status: if user.blocked { "blocked" } else { "active" }.into(),
        auto_blocked: v.auto_blocked,
        credits: AdminCredits {
            remaining: v.monthly + v.bonus,
            monthly_remaining: v.monthly,
            bonus: v.bonus,
        },
        daily: AdminDaily {
            used: v.day_used,
            limit: plan.and_then(|p| p.daily_limit.map(|l| l.get())),
        },
        usage_this_month: totals,
        keys: keys.into_iter().map(KeyView::from).collect(),
    })
}
