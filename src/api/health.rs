//! `/healthz` (the process answers) and `/readyz` (its dependencies do).

use http::{Response, StatusCode};
use serde_json::json;

use crate::accounts::MIGRATOR;
use crate::body::{self, Body};
use crate::state::AppState;

pub fn healthz() -> Response<Body> {
    body::json(StatusCode::OK, &json!({"status": "ok"}))
}

/// How much `/readyz` tells. Error text names hosts and versions, so it is
/// for operators only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// The metrics port: each check's error text.
    Full,
    /// The public port without a metrics port: "ok" or "unavailable" per check.
    Checks,
    /// The public port when a metrics port exists: the verdict alone.
    Status,
}

/// 200 when Redis answers PING and Postgres answers with every migration
/// applied; 503 otherwise, with as much detail as `detail` allows.
pub async fn readyz(state: &AppState, detail: Detail) -> Response<Body> {
    let (redis, database) = tokio::join!(state.billing.meter().ping(), database_ready(state));
    let ready = redis.is_ok() && database.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let verdict = if ready { "ready" } else { "not_ready" };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let body = match detail {
        Detail::Status => json!({"status": verdict}),
        Detail::Checks => json!({
            "status": verdict,
            "checks": {"redis": word(redis.is_ok()), "database": word(database.is_ok())},
        }),
        Detail::Full => json!({
            "status": verdict,
            "checks": {
                "redis": redis.map_or_else(|e| e.to_string(), |()| "ok".to_owned()),
                "database": database.err().unwrap_or_else(|| "ok".to_owned()),
            },
        }),
    };
    body::json(status, &body)
}

async fn database_ready(state: &AppState) -> Result<(), String> {
    let applied = state
        .billing
        .accounts()
        .migrations_applied()
        .await
        .map_err(|e| format!("unavailable: {e}"))?;
    let expected = MIGRATOR.iter().count() as i64;
    if applied < expected {
        return Err(format!(
            "{applied} of {expected} migrations applied; run `creditgate migrate`"
        ));
    }
    Ok(())
}
