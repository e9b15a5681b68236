//! Admin writes keep Postgres and Redis in agreement: a change is in
//! effect everywhere when it answers 2xx, or it answers an error in admin
//! words and the stores agree within a second of Redis answering again.
//! Retried grants and user creations apply once under an Idempotency-Key.

use crate::common;

use std::time::{Duration, Instant};

use common::{TestApp, error_code, wait_until};
use reqwest::Method;
use serde_json::json;

async fn json_of(r: reqwest::Response) -> serde_json::Value {
    r.json().await.expect("JSON body")
}

async fn account_field(app: &TestApp, user: &creditgate::domain::UserId, field: &str) -> String {
    let mut con = app.redis.connection().await;
    let v: Option<String> = redis::cmd("HGET")
        .arg(app.state.billing.meter().keys().account(user))
        .arg(field)
        .query_async(&mut con)
        .await
        .expect("HGET");
    v.unwrap_or_default()
}

async fn pause_writes(app: &TestApp, ms: u64) {
    let mut con = app.redis.connection().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("WRITE")
        .query_async(&mut con)
        .await
        .expect("CLIENT PAUSE");
}

#[tokio::test(flavor = "multi_thread")]
async fn block_revoke_and_plan_change_during_a_redis_write_pause_land_within_a_second() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let spare = app
        .state
        .billing
        .accounts()
        .create_key(&user.id, "test")
        .await
        .expect("second key");
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let id = user.id.as_str();

    let pause = Duration::from_millis(2500);
    pause_writes(&app, pause.as_millis() as u64).await;
    let paused_at = Instant::now();
    let changes = [
        (Method::POST, format!("/users/{id}/block"), None),
        (
            Method::PUT,
            format!("/users/{id}/plan"),
            Some(json!({"plan": "starter"})),
        ),
        (
            Method::DELETE,
            format!("/users/{id}/keys/{}", spare.id),
            None,
        ),
    ];
    for (method, path, body) in changes {
        let r = app.admin(method, &path, body).await;
        assert_eq!(r.status(), 503, "{path}");
        let body = json_of(r).await;
        assert_eq!(body["error"]["code"], "redis_unavailable", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("saved") && !message.contains("charged"),
            "admin wording: {message}"
        );
    }
    assert!(
        paused_at.elapsed() < pause,
        "each answered within the budget"
    );
    // Postgres has all three.
    let pool = app.pool().await;
    let (status, plan): (String, String) =
        sqlx::query_as("SELECT status, plan FROM users WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("user row");
    assert_eq!((status.as_str(), plan.as_str()), ("blocked", "starter"));

    wait_until("Redis to agree", Duration::from_secs(5), || async {
        account_field(&app, &user.id, "blocked").await == "1"
            && account_field(&app, &user.id, "plan").await == "starter"
    })
    .await;
    assert!(
        paused_at.elapsed() < pause + Duration::from_secs(1),
        "agreed {:?} after the pause began",
        paused_at.elapsed()
    );
    let r = app.call(&user.key, "/rag/q").await;
    assert_eq!(error_code(r).await, "blocked");
    let mut con = app.redis.connection().await;
    let live: Vec<String> = redis::cmd("HKEYS")
        .arg(app.state.billing.meter().keys().api_keys(&user.id))
        .query_async(&mut con)
        .await
        .expect("HKEYS");
    assert!(!live.contains(&spare.key.hash().as_str().to_owned()));
    assert_eq!(live.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_repeated_with_its_idempotency_key_applies_once_even_after_an_unconfirmed_try() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let grant = |credits: i64| {
        app.client
            .post(app.url("/api/admin/billing/grant"))
            .header("x-admin-key", common::ADMIN_KEY)
            .header("idempotency-key", "grant-7")
            .json(&json!({"user_id": user.id.as_str(), "credits": credits, "reason": "geste"}))
            .send()
    };
    // Redis cannot confirm: the caller cannot know whether the grant was
    // applied (the script may still run when the pause ends).
    pause_writes(&app, 1000).await;
    let first = grant(50).await.expect("send");
    assert_eq!(first.status(), 503);
    assert_eq!(error_code(first).await, "redis_unavailable");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Whichever it was, retries with the key add the credits exactly once.
    for _ in 0..3 {
        let again = grant(50).await.expect("send");
        assert_eq!(again.status(), 200);
        assert_eq!(json_of(again).await["credits"]["bonus"], 50);
    }
    let replayed = grant(50).await.expect("send");
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(app.balance(&user.id).await, (99, 50, 1));
    // Another grant under the same key is refused.
    let other = grant(60).await.expect("send");
    assert_eq!(other.status(), 422);
    assert_eq!(error_code(other).await, "idempotency_key_reused");

    // One ledger row and one audit row, written from the grant's event.
    let grants = app.count_events(&user.id, "grant").await;
    assert_eq!(grants, 1);
    let pool = app.pool().await;
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM admin_audit WHERE action = 'grant' AND user_id = $1
           AND details->>'idempotency_key' = 'grant-7' AND actor = 'admin:ops'",
    )
    .bind(user.id.as_str())
    .fetch_one(&pool)
    .await
    .expect("audit");
    assert_eq!(audited, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_with_postgres_down_changes_nothing_and_its_retry_applies_once() {
    let chaos = common::chaos::ChaosProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let app = TestApp::builder().database_via(chaos.addr).start().await;
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let grant = || {
        app.client
            .post(app.url("/api/admin/billing/grant"))
            .header("x-admin-key", common::ADMIN_KEY)
            .header("idempotency-key", "pg-down")
            .json(&json!({"user_id": user.id.as_str(), "credits": 30, "reason": "panne"}))
            .send()
    };
    chaos.break_networking();
    let r = grant().await.expect("send");
    assert_eq!(r.status(), 503);
    assert_eq!(app.balance(&user.id).await, (99, 0, 1), "nothing granted");
    chaos.restore_networking();
    wait_until(
        "the retry to go through",
        Duration::from_secs(10),
        || async { grant().await.is_ok_and(|r| r.status() == 200) },
    )
    .await;
    assert_eq!(grant().await.expect("send").status(), 200);
    assert_eq!(app.balance(&user.id).await, (99, 30, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_user_creation_with_its_idempotency_key_makes_one_user() {
    let app = TestApp::spawn().await;
    let create = |name: &'static str| {
        app.client
            .post(app.url("/api/admin/billing/users"))
            .header("x-admin-key", common::ADMIN_KEY)
            .header("idempotency-key", "signup-42")
            .json(&json!({"name": name, "plan": "free"}))
            .send()
    };
    let first = create("Amina").await.expect("send");
    assert_eq!(first.status(), 201);
    let first = json_of(first).await;
    assert!(first["api_key"].is_string());
    let again = create("Amina").await.expect("send");
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again = json_of(again).await;
    assert_eq!(again["user"]["id"], first["user"]["id"]);
    assert_eq!(again["key_id"], first["key_id"]);
    assert!(
        again.get("api_key").is_none(),
        "the key is shown once: {again}"
    );
    let other = create("Someone Else").await.expect("send");
    assert_eq!(other.status(), 422);
    assert_eq!(error_code(other).await, "idempotency_key_reused");
    let pool = app.pool().await;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(users, 1);
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(keys, 1);
    // The key from the first answer works.
    let key = first["api_key"].as_str().expect("key");
    assert_eq!(app.call(key, "/rag/q").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_past_the_bonus_ceiling_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let mut con = app.redis.connection().await;
    let _: () = redis::cmd("HSET")
        .arg(app.state.billing.meter().keys().account(&user.id))
        .arg("bonus")
        .arg(999_999_990_i64)
        .query_async(&mut con)
        .await
        .expect("HSET");
    let r = app
        .admin(
            Method::POST,
            "/grant",
            Some(json!({"user_id": user.id.as_str(), "credits": 20, "reason": "trop"})),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "bonus_limit");
    assert_eq!(app.balance(&user.id).await, (99, 999_999_990, 1));
    let r = app
        .admin(
            Method::POST,
            "/grant",
            Some(json!({"user_id": user.id.as_str(), "credits": 10, "reason": "juste"})),
        )
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_the_ledger_holds_past_todays_bounds_is_still_rebuilt() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let stamp = app.state.billing.calendar().now();
    let pool = app.pool().await;
    // As an older release could have left it: a bonus over 1e9.
    sqlx::query(
        "INSERT INTO account_snapshots (user_id, monthly, bonus, period, day, day_used,
            stream_ms, stream_seq) VALUES ($1, 100, 1500000000, $2, $3, 0, 1, 0)",
    )
    .bind(user.id.as_str())
    .bind(stamp.period.as_str())
    .bind(stamp.day.as_str())
    .execute(&pool)
    .await
    .expect("snapshot");
    let me = app.user_get(&user.key, "/me").await;
    assert_eq!(me.status(), 200);
    assert_eq!(json_of(me).await["credits"]["bonus"], 1_500_000_000_i64);
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
}

/// The flusher hands events to Postgres as COPY text: a reason with a tab,
/// a line break and a backslash is stored exactly as given, in the ledger
/// and in the audit log.
#[tokio::test]
async fn a_grant_reason_with_tabs_newlines_and_backslashes_is_stored_exactly() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let reason = "ligne 1\nligne 2\tcolonne \\N fin \\";
    let r = app
        .client
        .post(app.url("/api/admin/billing/grant"))
        .header("x-admin-key", common::ADMIN_KEY)
        .json(&json!({"user_id": user.id.as_str(), "credits": 5, "reason": reason}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    app.wait_flushed(Duration::from_secs(10)).await;
    let pool = app.pool().await;
    let stored: Option<String> = sqlx::query_scalar(
        "SELECT reason FROM ledger_events WHERE user_id = $1 AND kind = 'grant'",
    )
    .bind(user.id.as_str())
    .fetch_one(&pool)
    .await
    .expect("grant row");
    assert_eq!(stored.as_deref(), Some(reason));
    let audited: String = sqlx::query_scalar(
        "SELECT details->>'reason' FROM admin_audit WHERE user_id = $1 AND action = 'grant'",
    )
    .bind(user.id.as_str())
    .fetch_one(&pool)
    .await
    .expect("audit row");
    assert_eq!(audited, reason);
    app.assert_verify_clean();
}
