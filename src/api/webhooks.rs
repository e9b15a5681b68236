//! The admin API's view of webhook deliveries: list them by status, and
//! send one again (`POST …/deliveries/{id}/retry`).

use std::sync::Arc;

use axum::extract::State;
use serde::Deserialize;

use super::extract::{Actor, Query, Segments};
use super::schema::{DeliveryList, DeliveryView, ErrorBody};
use super::{ApiResult, Page, ok};
use crate::error::{ApiError, InvalidCode, MissingCode};
use crate::state::AppState;
use crate::webhooks::queue::{self, Retried, STATUSES};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeliveriesQuery {
    status: Option<String>,
    user_id: Option<String>,
    page: Option<i64>,
    per_page: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/webhooks/deliveries",
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
pub(crate) async fn list_deliveries(
    State(state): State<Arc<AppState>>,
    Query(q): Query<DeliveriesQuery>,
) -> ApiResult {
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
    let (deliveries, total) = queue::deliveries(
        state.billing.accounts().pool(),
        status,
        user.as_ref(),
        page.per_page,
        page.offset(),
    )
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
    path = "/webhooks/deliveries/{id}/retry",
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
pub(crate) async fn retry_delivery(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    Segments(id): Segments<String>,
) -> ApiResult {
    let not_found =
        || ApiError::missing(MissingCode::Delivery, format!("no webhook delivery {id:?}"));
    let id: i64 = id.parse().ok().filter(|n| *n > 0).ok_or_else(not_found)?;
    match queue::retry(
        state.billing.accounts().pool(),
        state.billing.outbox(),
        id,
        &actor,
    )
    .await?
    {
        Retried::Queued(view) => ok(&view),
        Retried::NoSuchDelivery => Err(not_found()),
        Retried::EndpointGone(endpoint) => Err(ApiError::bad_request(
            InvalidCode::EndpointNotConfigured,
            format!("{endpoint} is not in this gateway's [[webhooks]] any more"),
        )),
    }
}
