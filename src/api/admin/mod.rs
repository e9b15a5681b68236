//! The admin API (`X-Admin-Key`): users, keys, plans, grants, blocks,
//! stats, CSV exports and the audit trail. Every change is recorded in
//! `admin_audit` with the name of the key used, never the key.
//!
//! HTTP only: each handler extracts and checks its input, calls one
//! operation of `Billing` (account changes: Postgres first, then mirrored
//! into Redis) or one query of `accounts`/`ledger::reports`, and maps the
//! result. If Redis is unreachable a change answers 503 after the Postgres
//! change; repeating it is harmless and completes the mirror.

mod audit;
mod changes;
mod export;
mod keys;
mod stats;
mod users;

use http::{Method, Request};
use hyper::body::Incoming;

use super::{ApiResult, auth, parse_user};
use crate::error::ApiError;
use crate::state::AppState;
pub(crate) use audit::*;
pub(crate) use changes::*;
pub(crate) use export::*;
pub(crate) use keys::*;
pub(crate) use stats::*;
pub(crate) use users::*;

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
