//! The admin actions trail.

use std::sync::Arc;

use axum::extract::State;
use serde::Deserialize;

use super::super::extract::Query;
use super::super::schema::{AuditEntry, AuditList, ErrorBody};
use super::super::{ApiResult, Page, ok, parse_user};
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    user_id: Option<String>,
    page: Option<i64>,
    per_page: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/audit",
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
pub(super) async fn list_audit(
    State(state): State<Arc<AppState>>,
    Query(q): Query<AuditQuery>,
) -> ApiResult {
    let page = Page::parse(q.page, q.per_page)?;
    let user = q
        .user_id
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(parse_user)
        .transpose()?;
    let (entries, total) = state
        .billing
        .accounts()
        .audit_trail(user.as_ref(), page.per_page, page.offset())
        .await?;
    ok(&AuditList {
        entries: entries
            .into_iter()
            .map(|e| AuditEntry {
                id: e.id,
                at: e.at,
                actor: e.actor,
                action: e.action,
                user_id: e.user_id,
                details: e.details,
            })
            .collect(),
        page: page.page,
        per_page: page.per_page,
        total,
    })
}
