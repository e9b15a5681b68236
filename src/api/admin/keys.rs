//! Admin handlers for a user's API keys.

use std::sync::Arc;

use axum::extract::State;
use http::StatusCode;
use serde::Deserialize;

use super::super::extract::{Actor, PathUser, Segments};
use super::super::schema::{ErrorBody, NewKeyAnswer, RevokedAnswer};
use super::super::{ApiResult, json, ok};
use crate::accounts::KeySpec;
use crate::state::AppState;

#[utoipa::path(
    post,
    path = "/users/{id}/keys",
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
pub(super) async fn create_key(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    PathUser(id): PathUser,
) -> ApiResult {
    let key = state
        .billing
        .create_key(&id, &KeySpec::default(), None, &actor)
        .await?;
    json(
        StatusCode::CREATED,
        &NewKeyAnswer {
            key_id: key.id,
            api_key: key.key.reveal().to_owned(),
        },
    )
}

#[derive(Deserialize)]
pub(crate) struct KeySegment {
    key_id: String,
}

#[utoipa::path(
    delete,
    path = "/users/{id}/keys/{key_id}",
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
pub(super) async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Actor(actor): Actor,
    PathUser(id): PathUser,
    Segments(KeySegment { key_id }): Segments<KeySegment>,
) -> ApiResult {
    let key_id = super::super::parse_key_id(&key_id)?;
    state.billing.revoke_key(&id, key_id, &actor).await?;
    ok(&RevokedAnswer {
        revoked: true,
        key_id,
    })
}
