//! The delivery queue as the admin API sees it: deliveries listed by
//! status and user, and one delivery queued again. The deliverer's own
//! claims and outcomes are in [`super::deliver`].

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

use super::Outbox;
use crate::domain::UserId;

/// The delivery statuses, as stored and as the API filters them.
pub const STATUSES: [&str; 3] = ["pending", "delivered", "failed"];

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

/// One event's delivery to one endpoint.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct DeliveryView {
    pub id: i64,
    /// The `webhook-id` the receiver sees (the same on every attempt).
    pub event_id: String,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    pub user_id: String,
    pub endpoint: String,
    /// pending, delivered or failed.
    pub status: String,
    pub attempts: i32,
    /// When a pending delivery is next attempted.
    pub next_attempt_at: DateTime<Utc>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The receiver's HTTP status at the last attempt, if it answered.
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// What a retry did.
#[derive(Debug)]
pub enum Retried {
    /// Queued for an attempt now.
    Queued(DeliveryView),
    NoSuchDelivery,
    /// Its endpoint has left the configuration: nothing to send it to.
    EndpointGone(String),
}

/// A page of deliveries, newest first, and how many match in all.
pub async fn deliveries(
    pool: &PgPool,
    status: Option<&str>,
    user: Option<&UserId>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<DeliveryView>, i64), sqlx::Error> {
    let user = user.map(UserId::as_str);
    let deliveries: Vec<DeliveryView> =
        sqlx::query_as(view!(filtered!("ORDER BY d.id DESC LIMIT $3 OFFSET $4")))
            .bind(status)
            .bind(user)
            .bind(limit)
            .bind(offset)
            .fetch_all(pool)
            .await?;
    let total: i64 = sqlx::query_scalar(concat!(
        "SELECT count(*) FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id ",
        filtered!("")
    ))
    .bind(status)
    .bind(user)
    .fetch_one(pool)
    .await?;
    Ok((deliveries, total))
}

/// Queues delivery `id` for an attempt now, whatever its status (a
/// delivered event is sent again, with the same `webhook-id`), with its
/// audit row, in one transaction.
pub async fn retry(
    pool: &PgPool,
    outbox: &Outbox,
    id: i64,
    actor: &str,
) -> Result<Retried, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let endpoint: Option<String> =
        sqlx::query_scalar("SELECT endpoint FROM webhook_deliveries WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(endpoint) = endpoint else {
        return Ok(Retried::NoSuchDelivery);
    };
    if !outbox.hooks().endpoints.iter().any(|e| e.url == endpoint) {
        return Ok(Retried::EndpointGone(endpoint));
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
    outbox.committed();
    Ok(Retried::Queued(view))
}
