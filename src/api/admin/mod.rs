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

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::Group;
pub(crate) use audit::*;
pub(crate) use changes::*;
pub(crate) use export::*;
pub(crate) use keys::*;
pub(crate) use stats::*;
pub(crate) use users::*;

/// Largest single grant: a typo of a few zeros must not mint a fortune.
pub const MAX_GRANT: i64 = 1_000_000;

/// `/api/admin/billing/*`, every route behind `X-Admin-Key` (the layer is
/// put on by [`super::router`]).
pub fn routes() -> Group {
    OpenApiRouter::new()
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user))
        .routes(routes!(create_key))
        .routes(routes!(revoke_key))
        .routes(routes!(change_plan))
        .routes(routes!(block))
        .routes(routes!(unblock))
        .routes(routes!(grant))
        .routes(routes!(stats))
        .routes(routes!(export_users))
        .routes(routes!(export_usage))
        .routes(routes!(list_audit))
        .routes(routes!(super::invoices::admin_list))
        .routes(routes!(super::invoices::admin_pdf))
        .routes(routes!(super::webhooks::list_deliveries))
        .routes(routes!(super::webhooks::retry_delivery))
}
