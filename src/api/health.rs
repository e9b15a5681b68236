//! `/healthz` (the process answers) and `/readyz` (its dependencies do).

use http::{Response, StatusCode};
use serde_json::json;

use crate::accounts::MIGRATOR;
use crate::body::{self, Body};
use crate::startup::AppState;

pub fn healthz() -> Response<Body> {
    body::json(StatusCode::OK, &json!({"status": "ok"}))
}

/// 200 when Redis answers PING and Postgres answers with every migration
/// applied; 503 naming what is not ready otherwise.
pub async fn readyz(state: &AppState) -> Response<Body> {
    let (redis, database) = tokio::join!(state.meter.ping(), database_ready(state));
    let redis = match redis {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    let database = match database {
        Ok(()) => "ok".to_owned(),
        Err(e) => e,
    };
    let ready = redis == "ok" && database == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    body::json(
        status,
        &json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": {"redis": redis, "database": database},
        }),
    )
}

async fn database_ready(state: &AppState) -> Result<(), String> {
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(state.accounts.pool())
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
