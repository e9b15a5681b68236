//! The admin API's view of webhook deliveries: list them by status, and
//! send one again (`POST …/deliveries/{id}/retry`).

use http::Request;
use hyper::body::Incoming;
use serde::Deserialize;

use super::schema::{DeliveryList, DeliveryView, ErrorBody};
use super::{ApiResult, Page, ok, query};
use crate::error::{ApiError, InvalidCode, MissingCode};
use crate::startup::AppState;

const STATUSES: [&str; 3] = ["pending", "delivered", "failed"];

/// A query of [`DeliveryView`]s, ending with `$tail`.
macro_rules! view {
    ($tail:expr) => {
        concat!(
            "SELECT d.id, d.event_id, e.type, e.user_id, d.endpoint, d.status, d.attempts,
                d.next_attempt_at, d.last_attempt_at, d.last_status, d.last_error,
                d.delivered_at, d.created_at
             FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id ",
            $tail
        )
    };
}

/// The list's filter: `$1` status, `$2` user, either NULL for any.
macro_rules! filtered {
    ($tail:expr) => {
        concat!(
            "WHERE ($1::text IS NULL OR d.status = $1) AND ($2::text IS NULL OR e.user_id = $2) ",
            $tail
        )
    };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveriesQuery {
    status: Option<String>,
    user_id: Option<String>,
    page: Option<i64>,
    per_page: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/admin/billing/webhooks/deliveries",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("status" = Option<String>, Query, description = "pending, delivered or failed"),
        ("user_id" = Option<String>, Query,),
        ("page" = Option<i64>, Query, minimum = 1),
        ("per_page" = Option<i64>, Query, minimum = 1, maximum = 200),
    ),
    responses(
        (status = 200, description = "Webhook deliveries, newest first", body = DeliveryList),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub async fn list_deliveries(state: &AppState, req: Request<Incoming>) -> ApiResult {
    let q: DeliveriesQuery = query(&req)?;
    let page = Page::parse(q.page, q.per_page)?;
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    if let Some(s) = status
        && !STATUSES.contains(&s)
    {
        return Err(ApiError::bad_request(
            InvalidCode::Query,
            format!("status must be one of {}", STATUSES.join(", ")),
        ));
    }
    let user = q
        .user_id
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(super::parse_user)
        .transpose()?;
    let deliveries: Vec<DeliveryView> =
        sqlx::query_as(view!(filtered!("ORDER BY d.id DESC LIMIT $3 OFFSET $4")))
            .bind(status)
            .bind(user.as_ref().map(|u| u.as_str()))
            .bind(page.per_page)
            .bind(page.offset())
            .fetch_all(state.accounts.pool())
            .await?;
    let total: i64 = sqlx::query_scalar(concat!(
        "SELECT count(*) FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id ",
        filtered!("")
    ))
    .bind(status)
    .bind(user.as_ref().map(|u| u.as_str()))
    .fetch_one(state.accounts.pool())
    .await?;
    ok(&DeliveryList {
        deliveries,
        page: page.page,
        per_page: page.per_page,
        total,
    })
}

#[utoipa::path(
    post,
    path = "/api/admin/billing/webhooks/deliveries/{id}/retry",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("id" = i64, Path, minimum = 1),
    ),
    responses(
        (status = 200, description = "Queued for an attempt now, whatever its status was (a delivered event is sent again, with the same webhook-id)", body = DeliveryView),
        (status = 400, description = "Invalid input, or its endpoint is no longer configured; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such delivery", body = ErrorBody),
        (status = 503, description = "Redis or Postgres unavailable", body = ErrorBody),
    )
)]
pub async fn retry_delivery(state: &AppState, id: &str, actor: &str) -> ApiResult {
    let not_found =
        || ApiError::missing(MissingCode::Delivery, format!("no webhook delivery {id:?}"));
    let id: i64 = id.parse().ok().filter(|n| *n > 0).ok_or_else(not_found)?;
    let mut tx = state.accounts.pool().begin().await?;
    let endpoint: Option<String> =
        sqlx::query_scalar("SELECT endpoint FROM webhook_deliveries WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let endpoint = endpoint.ok_or_else(not_found)?;
    if !state
        .outbox
        .hooks()
        .endpoints
        .iter()
        .any(|e| e.url == endpoint)
    {
        return Err(ApiError::bad_request(
            InvalidCode::EndpointNotConfigured,
            format!("{endpoint} is not in this gateway's [[webhooks]] any more"),
        ));
    }
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    let view: DeliveryView = sqlx::query_as(view!("WHERE d.id = $1"))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    crate::accounts::audit_in(
        &mut *tx,
        actor,
        "webhook_retry",
        None,
        serde_json::json!({"delivery_id": id, "event_id": view.event_id, "endpoint": endpoint}),
    )
    .await?;
    tx.commit().await?;
    state.outbox.committed();
    ok(&view)
}
