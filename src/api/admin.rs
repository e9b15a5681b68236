//! The admin API (`X-Admin-Key`): users, keys, plans, grants, blocks,
//! stats, CSV exports and the audit trail. Every change is recorded in
//! `admin_audit` with the name of the key used, never the key.
//!
//! Account changes are written to Postgres first (the authority for plan,
//! status and keys, with their ledger row and audit row in one
//! transaction), then mirrored into Redis, which every charge reads: a
//! block or revocation is effective on every instance at once. If Redis is
//! unreachable the call answers 503 after the Postgres change; repeating it
//! is harmless and completes the mirror.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{Datelike, Days, NaiveDate, Utc};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::schema::{
    AdminCredits, AdminDaily, AuditEntry, AuditList, Consumption, CreateUserBody, CreatedUser,
    ErrorBody, GrantAnswer, GrantBody, KeyView, ModuleUsage, MonthRevenueView, NewKeyAnswer,
    PlanBody, PlanChanged, PlanView, ReasonBody, Revenue, RevokedAnswer, StatsAnswer, StatusAnswer,
    TopConsumer, UserDetail, UserList, UserRow, UserSummary, UsersStats,
};
use super::user::{account_state, fill_days, view};
use super::{ApiResult, Page, auth, json, ok, parse_user, query, read_json};
use crate::accounts::{self, Created, NewUser};
use crate::billing::BillingError;
use crate::body::{Body, BoxError};
use crate::domain::{Credits, UserId};
use crate::error::{ApiError, InvalidCode};
use crate::ledger::store;
use crate::metering::{Grant, GrantOutcome};
use crate::startup::AppState;

/// Largest single grant: a typo of a few zeros must not mint a fortune.
pub const MAX_GRANT: i64 = 1_000_000;

pub async fn route(state: &AppState, req: Request<Incoming>, rest: &[&str]) -> ApiResult {
    let actor = auth::admin(state, req.headers())?;
    let method = req.method().clone();
    match (method, rest) {
        (Method::GET, ["users"]) => list_users(state, req).await,
        (Method::POST, ["users"]) => create_user(state, req, &actor).await,
        (Method::GET, ["users", id]) => get_user(state, &parse_user(id)?).await,
        (Method::POST, ["users", id, "keys"]) => create_key(state, &parse_user(id)?, &actor).await,
        (Method::DELETE, ["users", id, "keys", key]) => {
            revoke_key(state, &parse_user(id)?, key, &actor).await
        }
        (Method::PUT, ["users", id, "plan"]) => {
            change_plan(state, req, &parse_user(id)?, &actor).await
        }
        (Method::POST, ["users", id, "block"]) => block(state, req, &parse_user(id)?, &actor).await,
        (Method::POST, ["users", id, "unblock"]) => {
            unblock(state, req, &parse_user(id)?, &actor).await
        }
        (Method::POST, ["grant"]) => grant(state, req, &actor).await,
        (Method::GET, ["stats"]) => stats(state, req).await,
        (Method::GET, ["export.csv"]) => export_users(state),
        (Method::GET, ["usage.csv"]) => export_usage(state, req),
        (Method::GET, ["audit"]) => list_audit(state, req).await,
        (Method::GET, ["users", id, "invoices"]) => {
            super::invoices::admin_list(state, &parse_user(id)?).await
        }
        (Method::GET, ["users", id, "invoices", file]) => {
            super::invoices::admin_pdf(state, &parse_user(id)?, file).await
        }
        (Method::GET, ["webhooks", "deliveries"]) => {
            super::webhooks::list_deliveries(state, req).await
        }
        (Method::POST, ["webhooks", "deliveries", id, "retry"]) => {
            super::webhooks::retry_delivery(state, id, &actor).await
        }
        (
            _,
            ["users"]
            | ["users", _]
            | ["users", _, "keys"]
            | ["users", _, "keys", _]
            | ["users", _, "plan" | "block" | "unblock"]
            | ["grant" | "stats" | "export.csv" | "usage.csv" | "audit"]
            | ["webhooks", "deliveries"]
            | ["webhooks", "deliveries", _, "retry"]
            | ["users", _, "invoices"]
            | ["users", _, "invoices", _],
        ) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound),
    }
}

// ------------------------------------------------------------------ users

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    plan: Option<String>,
    status: Option<String>,
    q: Option<String>,
    page: Option<i64>,
    per_page: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/admin/billing/users",
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
async fn list_users(state: &AppState, req: Request<Incoming>) -> ApiResult {
    let q: ListQuery = query(&req)?;
    let page = Page::parse(q.page, q.per_page)?;
    let unknown_plan = q
        .plan
        .as_deref()
        .filter(|p| !p.is_empty() && state.catalog.plan(p).is_none());
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
    let search = q.q.as_deref().filter(|s| !s.is_empty()).map(|s| {
        format!(
            "%{}%",
            s.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });
    let stamp = state.calendar.now();
    let month_start = stamp
        .local_date()
        .with_day0(0)
        .unwrap_or_else(|| stamp.local_date());
    type Row = (
        String,
        String,
        Option<String>,
        String,
        String,
        chrono::DateTime<Utc>,
        i64,
        i64,
        Option<i64>,
        Option<i64>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT u.id, u.name, u.email, u.plan, u.status, u.created_at,
                COALESCE((SELECT m.charged_credits - m.refunded_credits FROM usage_monthly m
                          WHERE m.user_id = u.id AND m.month = $4), 0)::bigint,
                count(*) OVER (),
                s.monthly, s.bonus, s.period
         FROM users u LEFT JOIN account_snapshots s ON s.user_id = u.id
         WHERE ($1::text IS NULL OR u.plan = $1)
           AND ($2::text IS NULL OR u.status = $2)
           AND ($3::text IS NULL OR u.name ILIKE $3 OR u.email ILIKE $3 OR u.id ILIKE $3)
         ORDER BY u.created_at DESC, u.id
         LIMIT $5 OFFSET $6",
    )
    .bind(q.plan.as_deref().filter(|p| !p.is_empty()))
    .bind(status)
    .bind(search)
    .bind(month_start)
    .bind(page.per_page)
    .bind(page.offset())
    .fetch_all(state.accounts.pool())
    .await?;
    let total = rows.first().map_or(0, |r| r.7);
    let mut users = Vec::with_capacity(rows.len());
    for (id, name, email, plan, status, created_at, used, _, s_monthly, s_bonus, s_period) in rows {
        let plan_def = state.catalog.plan(&plan);
        let allowance = plan_def.map_or(0, |p| p.monthly_credits.get());
        // Redis when it holds the account, else the ledger snapshot, else
        // a fresh allowance: the same answer the account would give.
        let hot = match UserId::parse(&id) {
            Ok(uid) => state.meter.account(&uid).await?,
            Err(_) => None,
        };
        let remaining = match hot {
            Some(a) => {
                let v = view(&a, plan_def, &stamp.day, &stamp.period);
                v.monthly + v.bonus
            }
            None => match (s_monthly, s_bonus, s_period) {
                (Some(m), Some(b), Some(p)) if p == stamp.period => m + b,
                (_, Some(b), _) => allowance + b,
                _ => allowance,
            },
        };
        users.push(UserRow {
            id,
            name,
            email,
            plan,
            status,
            created_at,
            credits_remaining: remaining,
            used_this_month: used,
        });
    }
    ok(&UserList {
        users,
        page: page.page,
        per_page: page.per_page,
        total,
    })
}

fn check_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid_request(
            "name must be 1 to 100 characters, no control characters",
        ));
    }
    Ok(name)
}

fn check_email(email: Option<&str>) -> Result<Option<&str>, ApiError> {
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
    path = "/api/admin/billing/users",
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
async fn create_user(state: &AppState, req: Request<Incoming>, actor: &str) -> ApiResult {
    let idempotency_key = super::idempotency_key(req.headers())?;
    let body: CreateUserBody = read_json(req).await?;
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
        .accounts
        .create_user(NewUser {
            id,
            name,
            email,
            plan: &body.plan,
            actor,
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
        response.headers_mut().insert(
            "idempotent-replayed",
            http::HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

/// What makes two admin writes "the same" under one Idempotency-Key.
fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

#[utoipa::path(
    get,
    path = "/api/admin/billing/users/{id}",
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
async fn get_user(state: &AppState, id: &UserId) -> ApiResult {
    let user = state
        .accounts
        .get_user(id)
        .await?
        .ok_or_else(|| ApiError::UnknownUser(id.to_string()))?;
    let account = account_state(state, id).await?;
    let stamp = state.calendar.now();
    let plan = state.catalog.plan(user.plan.as_str());
    let v = view(&account, plan, &stamp.day, &stamp.period);
    let keys = state.accounts.keys_of(id, true).await?;
    let month_start = stamp
        .local_date()
        .with_day0(0)
        .unwrap_or_else(|| stamp.local_date());
    let totals = store::totals_by_module(&state.reports, id.as_str(), month_start).await?;
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

#[utoipa::path(
    post,
    path = "/api/admin/billing/users/{id}/keys",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("id" = String, Path,),
    ),
    responses(
        (status = 201, description = "A new API key (shown once)", body = NewKeyAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn create_key(state: &AppState, id: &UserId, actor: &str) -> ApiResult {
    let key = state
        .billing
        .create_key(id, &accounts::KeySpec::default(), None, actor)
        .await?;
    json(
        StatusCode::CREATED,
        &NewKeyAnswer {
            key_id: key.id,
            api_key: key.key.reveal().to_owned(),
        },
    )
}

#[utoipa::path(
    delete,
    path = "/api/admin/billing/users/{id}/keys/{key_id}",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("id" = String, Path,),
        ("key_id" = String, Path,),
    ),
    responses(
        (status = 200, description = "Revoked on every instance", body = RevokedAnswer),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn revoke_key(state: &AppState, id: &UserId, key: &str, actor: &str) -> ApiResult {
    let key_id = super::parse_key_id(key)?;
    state.billing.revoke_key(id, key_id, actor).await?;
    ok(&RevokedAnswer {
        revoked: true,
        key_id,
    })
}

fn check_reason(reason: Option<&str>) -> Result<Option<String>, ApiError> {
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
    path = "/api/admin/billing/users/{id}/plan",
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
async fn change_plan(
    state: &AppState,
    req: Request<Incoming>,
    id: &UserId,
    actor: &str,
) -> ApiResult {
    let body: PlanBody = read_json(req).await?;
    let plan = state.catalog.plan(&body.plan).ok_or_else(|| {
        ApiError::bad_request(InvalidCode::UnknownPlan, format!("no plan {:?}", body.plan))
    })?;
    state.billing.change_plan(id, &plan.id, actor).await?;
    ok(&PlanChanged {
        user_id: id.to_string(),
        plan: PlanView::from(plan),
    })
}

#[utoipa::path(
    post,
    path = "/api/admin/billing/users/{id}/block",
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
async fn block(state: &AppState, req: Request<Incoming>, id: &UserId, actor: &str) -> ApiResult {
    set_blocked(state, req, id, true, actor).await
}

#[utoipa::path(
    post,
    path = "/api/admin/billing/users/{id}/unblock",
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
async fn unblock(state: &AppState, req: Request<Incoming>, id: &UserId, actor: &str) -> ApiResult {
    set_blocked(state, req, id, false, actor).await
}

async fn set_blocked(
    state: &AppState,
    req: Request<Incoming>,
    id: &UserId,
    blocked: bool,
    actor: &str,
) -> ApiResult {
    let has_body = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|l| l != "0")
        || req.headers().contains_key(http::header::TRANSFER_ENCODING);
    let body: ReasonBody = if has_body {
        read_json(req).await?
    } else {
        ReasonBody::default()
    };
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
    path = "/api/admin/billing/grant",
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
async fn grant(state: &AppState, req: Request<Incoming>, actor: &str) -> ApiResult {
    let idempotency_key = super::idempotency_key(req.headers())?;
    let body: GrantBody = read_json(req).await?;
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
    if state.accounts.get_user(&id).await?.is_none() {
        return Err(ApiError::UnknownUser(id.to_string()));
    }
    let fingerprint = fingerprint(&["grant", &body.credits.to_string(), &reason]);
    let outcome = state
        .billing
        .grant(&Grant {
            user: &id,
            credits,
            reason: &reason,
            actor,
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
        response.headers_mut().insert(
            "idempotent-replayed",
            http::HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

// ------------------------------------------------------------------ stats

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    days: Option<i64>,
    months: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/api/admin/billing/stats",
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
async fn stats(state: &AppState, req: Request<Incoming>) -> ApiResult {
    let q: StatsQuery = query(&req)?;
    let window = q.days.map(|d| super::days(Some(d), d)).transpose()?;
    if q.months.is_some_and(|m| !(1..=24).contains(&m)) {
        return Err(ApiError::invalid_request("months must be between 1 and 24"));
    }
    let pool = &state.reports;
    let stamp = state.calendar.now();
    let today = stamp.local_date();
    let month_start = today.with_day0(0).unwrap_or(today);

    let counts: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT plan, status, count(*) FROM users GROUP BY plan, status")
            .fetch_all(pool)
            .await?;
    let mut by_plan: BTreeMap<String, i64> = BTreeMap::new();
    let mut by_status: BTreeMap<String, i64> = BTreeMap::new();
    let mut revenue = 0i64;
    for (plan, status, n) in &counts {
        *by_plan.entry(plan.clone()).or_default() += n;
        *by_status.entry(status.clone()).or_default() += n;
        if status == "active" {
            revenue += state.catalog.plan(plan).map_or(0, |p| p.price_dzd) * n;
        }
    }
    let per_module = |from: NaiveDate| {
        sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT module, SUM(charged_credits - refunded_credits)::bigint,
                    SUM(charges - refunds)::bigint
             FROM usage_module_daily WHERE day >= $1 GROUP BY module ORDER BY module",
        )
        .bind(from)
        .fetch_all(pool)
    };
    let to_map = |rows: Vec<(String, i64, i64)>| -> BTreeMap<String, ModuleUsage> {
        rows.into_iter()
            .map(|(m, credits, requests)| (m, ModuleUsage { credits, requests }))
            .collect()
    };
    let consumed_today = to_map(per_module(today).await?);
    let consumed_month = to_map(per_module(month_start).await?);
    let top: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT m.user_id, u.name, u.plan, (m.charged_credits - m.refunded_credits) AS c
         FROM usage_monthly m JOIN users u ON u.id = m.user_id
         WHERE m.month = $1
         ORDER BY c DESC, m.user_id LIMIT 10",
    )
    .bind(month_start)
    .fetch_all(pool)
    .await?;
    let daily = match window {
        Some(days) => {
            let from = today
                .checked_sub_days(Days::new(days as u64 - 1))
                .unwrap_or(today);
            let recorded = store::usage_by_day(pool, None, from).await?;
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
                        &state.catalog,
                        &state.calendar,
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
            .map(|(user_id, name, plan, credits)| TopConsumer {
                user_id,
                name,
                plan,
                credits,
            })
            .collect(),
        timezone: state.calendar.timezone().name().to_owned(),
        daily,
    })
}

// ------------------------------------------------------------------ exports

/// A cell for CSV: text that a spreadsheet would run as a formula is
/// prefixed with an apostrophe, and a cell is quoted when it holds a comma,
/// a quote, a line break or a semicolon (French Excel splits on `;`).
pub fn csv_cell(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r', ';']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

/// A CSV download whose body is streamed as `lines` yields rows: the
/// export is never held in memory. `lines` runs on its own task, fed with
/// its own pool handle so the query outlives the handler.
fn csv_response<F>(filename: &str, header: &'static str, pool: PgPool, lines: F) -> ApiResult
where
    F: for<'a> FnOnce(&'a PgPool) -> BoxStream<'a, Result<String, sqlx::Error>> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    tokio::spawn(async move {
        let mut rows = lines(&pool);
        let mut chunk = String::from(header);
        loop {
            match rows.try_next().await {
                Ok(Some(line)) => {
                    chunk.push_str(&line);
                    chunk.push('\n');
                    if chunk.len() > 16 * 1024 {
                        let full = Bytes::from(std::mem::take(&mut chunk));
                        if tx.send(Ok(Frame::data(full))).await.is_err() {
                            return; // the client went away
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e) as BoxError)).await;
                    return;
                }
            }
        }
        let _ = tx.send(Ok(Frame::data(Bytes::from(chunk)))).await;
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let body: Body = StreamBody::new(stream).boxed_unsync();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(http::header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/api/admin/billing/export.csv",
    tag = "admin",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Users as CSV, streamed", content_type = "text/csv", body = String),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
    )
)]
fn export_users(state: &AppState) -> ApiResult {
    type Row = (
        String,
        String,
        Option<String>,
        String,
        String,
        chrono::DateTime<Utc>,
    );
    csv_response(
        "users.csv",
        "id,name,email,plan,status,created_at\n",
        state.reports.clone(),
        |pool| {
            sqlx::query_as::<_, Row>(
                "SELECT id, name, email, plan, status, created_at FROM users
                 ORDER BY created_at, id",
            )
            .fetch(pool)
            .map_ok(|(id, name, email, plan, status, created)| {
                format!(
                    "{},{},{},{},{},{}",
                    csv_cell(&id),
                    csv_cell(&name),
                    csv_cell(email.as_deref().unwrap_or("")),
                    plan,
                    status,
                    created.to_rfc3339()
                )
            })
            .boxed()
        },
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageCsvQuery {
    from: Option<String>,
    to: Option<String>,
}

fn parse_date(field: &str, value: Option<&str>) -> Result<Option<NaiveDate>, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            NaiveDate::parse_from_str(v, "%Y-%m-%d").map_err(|_| {
                ApiError::bad_request(
                    InvalidCode::Query,
                    format!("{field} must be a date like 2026-11-01"),
                )
            })
        })
        .transpose()
}

#[utoipa::path(
    get,
    path = "/api/admin/billing/usage.csv",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("from" = Option<String>, Query, description = "YYYY-MM-DD, default: first of the month"),
        ("to" = Option<String>, Query, description = "YYYY-MM-DD, default: today"),
    ),
    responses(
        (status = 200, description = "Ledger rows as CSV, streamed", content_type = "text/csv", body = String),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
    )
)]
fn export_usage(state: &AppState, req: Request<Incoming>) -> ApiResult {
    let q: UsageCsvQuery = query(&req)?;
    let today = state.calendar.now().local_date();
    let from = parse_date("from", q.from.as_deref())?
        .unwrap_or_else(|| today.with_day0(0).unwrap_or(today));
    let to = parse_date("to", q.to.as_deref())?.unwrap_or(today);
    if to < from {
        return Err(ApiError::bad_request(
            InvalidCode::Query,
            "to must not be before from",
        ));
    }
    type Row = (
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        i64,
        Option<i64>,
        Option<i64>,
        Option<String>,
        String,
        NaiveDate,
        chrono::DateTime<Utc>,
    );
    csv_response(
        "usage.csv",
        "event_id,user_id,kind,module,action,amount,monthly_after,bonus_after,request_id,actor,local_day,occurred_at\n",
        state.reports.clone(),
        move |pool| {
            let opt = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
            sqlx::query_as::<_, Row>(
                "SELECT event_id, user_id, kind, module, action, amount, monthly_after,
                        bonus_after, request_id, actor, local_day, occurred_at
                 FROM ledger_events WHERE local_day BETWEEN $1 AND $2
                 ORDER BY occurred_at, stream_ms, stream_seq",
            )
            .bind(from)
            .bind(to)
            .fetch(pool)
            .map_ok(
                move |(eid, uid, kind, module, action, amount, m, b, rid, actor, day, at)| {
                    format!(
                        "{},{},{},{},{},{},{},{},{},{},{},{}",
                        csv_cell(&eid),
                        csv_cell(&uid),
                        kind,
                        csv_cell(module.as_deref().unwrap_or("")),
                        csv_cell(action.as_deref().unwrap_or("")),
                        amount,
                        opt(m),
                        opt(b),
                        csv_cell(rid.as_deref().unwrap_or("")),
                        csv_cell(&actor),
                        day,
                        at.to_rfc3339()
                    )
                },
            )
            .boxed()
        },
    )
}

// ------------------------------------------------------------------ audit

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    user_id: Option<String>,
    page: Option<i64>,
    per_page: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/admin/billing/audit",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("user_id" = Option<String>, Query,),
        ("page" = Option<i64>, Query, minimum = 1),
        ("per_page" = Option<i64>, Query, minimum = 1, maximum = 200),
    ),
    responses(
        (status = 200, description = "The admin actions trail, newest first", body = AuditList),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
async fn list_audit(state: &AppState, req: Request<Incoming>) -> ApiResult {
    let q: AuditQuery = query(&req)?;
    let page = Page::parse(q.page, q.per_page)?;
    let user = q
        .user_id
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(parse_user)
        .transpose()?;
    type Row = (
        i64,
        chrono::DateTime<Utc>,
        String,
        String,
        Option<String>,
        serde_json::Value,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, at, actor, action, user_id, details, count(*) OVER ()
         FROM admin_audit WHERE ($1::text IS NULL OR user_id = $1)
         ORDER BY at DESC, id DESC LIMIT $2 OFFSET $3",
    )
    .bind(user.as_ref().map(UserId::as_str))
    .bind(page.per_page)
    .bind(page.offset())
    .fetch_all(state.accounts.pool())
    .await?;
    let total = rows.first().map_or(0, |r| r.6);
    ok(&AuditList {
        entries: rows
            .into_iter()
            .map(|(id, at, actor, action, user_id, details, _)| AuditEntry {
                id,
                at,
                actor,
                action,
                user_id,
                details,
            })
            .collect(),
        page: page.page,
        per_page: page.per_page,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::csv_cell;

    #[test]
    fn csv_cells_never_become_formulas_or_split_on_semicolons() {
        let table = [
            ("plain", "plain"),
            ("=1+2", "'=1+2"),
            ("+33 6", "'+33 6"),
            ("-2", "'-2"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("a;b", "\"a;b\""),
            ("=a;b", "\"'=a;b\""),
            ("say \"hi\", ok", "\"say \"\"hi\"\", ok\""),
        ];
        for (raw, cell) in table {
            assert_eq!(csv_cell(raw), cell, "{raw:?}");
        }
    }
}
