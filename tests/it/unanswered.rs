//! Charges whose answer was lost between Redis and the gateway: the caller
//! heard 503 "nothing was charged", so a charge Redis did make is given
//! back, once, and one it never made costs nothing. Redis is reached
//! through a chaos proxy that lets commands through and drops their
//! answers (mute), or swallows the commands (stall).

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::chaos::ChaosProxy;
use common::{Account, TestApp, error_code, metric, wait_until};
use serde_json::json;

const OUTCOME: &str = "creditgate_unanswered_charges_total";

/// A gateway that reaches Redis through a chaos proxy, and a free user
/// whose first call (2 credits of `park`) went through: its account is in
/// Redis and the clocks are compared.
async fn warmed() -> (TestApp, Arc<ChaosProxy>, Account) {
    let app = TestApp::builder().redis_via_chaos().start().await;
    let chaos = app.redis_chaos.clone().expect("chaos proxy");
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/park/q").await.status(), 200);
    (app, chaos, user)
}

async fn outcome(app: &TestApp, outcome: &str) -> f64 {
    metric(app, &format!("{OUTCOME}{{outcome=\"{outcome}\"}}")).await
}

async fn wait_outcome(app: &TestApp, what: &str) {
    wait_until(
        &format!("one unanswered charge {what}"),
        Duration::from_secs(15),
        || async { outcome(app, what).await == 1.0 },
    )
    .await;
}

/// The refund rows of `user` that name the charge they void.
async fn voids(app: &TestApp, user: &creditgate::domain::UserId) -> Vec<(i64, String)> {
    app.wait_flushed(Duration::from_secs(10)).await;
    sqlx::query_as(
        "SELECT amount, reason FROM ledger_events
         WHERE user_id = $1 AND kind = 'refund' AND reason LIKE 'unanswered charge %'",
    )
    .bind(user.as_str())
    .fetch_all(&app.pool().await)
    .await
    .expect("refund rows")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_charge_redis_made_whose_answer_was_lost_is_given_back_once() {
    let (app, chaos, user) = warmed().await;

    // Redis runs the charge; its answer never comes back.
    chaos.mute();
    let lost = app.call(&user.key, "/park/q").await;
    assert_eq!(lost.status(), 503);
    assert_eq!(error_code(lost).await, "metering_unavailable");
    chaos.restore_networking();

    wait_outcome(&app, "refunded").await;
    assert_eq!(app.upstream.hits(), 1, "the lost call was never forwarded");
    // One call served, one charge standing: 2 credits of the park module.
    assert_eq!(app.balance(&user.id).await, (98, 0, 2));
    let events = app.events(&user.id).await;
    assert_eq!(
        events,
        [
            ("charge".to_owned(), 2),
            ("charge".to_owned(), 2),
            ("refund".to_owned(), 2)
        ]
    );
    let voids = voids(&app, &user.id).await;
    assert_eq!(voids.len(), 1, "{voids:?}");
    assert_eq!(outcome(&app, "not_charged").await, 0.0);
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_charge_that_never_reached_redis_gives_nothing_back() {
    let (app, chaos, user) = warmed().await;

    // The call is written to a Redis that swallows it: the gateway cannot
    // tell this from a lost answer, and must not refund what was not made.
    chaos.stall();
    assert_eq!(app.call(&user.key, "/park/q").await.status(), 503);
    chaos.restore_networking();

    wait_outcome(&app, "not_charged").await;
    assert_eq!(outcome(&app, "refunded").await, 0.0);
    assert_eq!(app.balance(&user.id).await, (98, 0, 2));
    assert_eq!(app.events(&user.id).await, [("charge".to_owned(), 2)]);
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_charge_already_flushed_to_the_ledger_is_found_there() {
    let (app, chaos, user) = warmed().await;

    chaos.mute();
    assert_eq!(app.call(&user.key, "/park/q").await.status(), 503);
    // While the gateway cannot hear Redis, another flusher (another
    // gateway's) moves the charge's row to the ledger and deletes it from
    // the stream.
    let mut flusher = app.flusher_on("other-gateway", &app.redis.url()).await;
    let flushed = flusher.drain().await.expect("drain");
    assert!(flushed >= 1, "{flushed} events flushed");
    let pool = app.pool().await;
    let charges: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_events WHERE user_id = $1 AND kind = 'charge'",
    )
    .bind(user.id.as_str())
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(charges, 2, "the lost charge is in the ledger");
    let mut con = app.redis.connection().await;
    for stream in app.state.billing.meter().keys().streams() {
        let len: i64 = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut con)
            .await
            .expect("XLEN");
        assert_eq!(len, 0, "{stream} still holds rows");
    }
    chaos.restore_networking();

    wait_outcome(&app, "refunded").await;
    assert_eq!(app.balance(&user.id).await, (98, 0, 2));
    assert_eq!(voids(&app, &user.id).await.len(), 1);
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_charge_under_an_idempotency_key_frees_the_key_for_the_retry() {
    let (app, chaos, user) = warmed().await;

    let keyed = || app.call_with(&user.key, "/park/q", &[("idempotency-key", "order-7")]);
    chaos.mute();
    assert_eq!(keyed().await.status(), 503);
    chaos.restore_networking();
    wait_outcome(&app, "refunded").await;

    // Without the void, the key would be "in progress", then a
    // duplicate_request for a call that was never forwarded.
    let retry = keyed().await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-credits-charged"], "2");
    assert_eq!(app.upstream.hits(), 2);
    assert_eq!(app.balance(&user.id).await, (96, 0, 4));
    let replay = keyed().await;
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.headers()["x-credits-charged"], "0");
    assert_eq!(app.upstream.hits(), 2);
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_credits_api_charge_is_given_back_and_its_retry_charged_once() {
    let app = TestApp::builder().redis_via_chaos().start().await;
    let chaos = app.redis_chaos.clone().expect("chaos proxy");
    let user = app.create_user("starter").await;
    let consume =
        json!({"user_id": user.id.as_str(), "module": "legal", "request_id": "hub-req-9"});
    let check = json!({"user_id": user.id.as_str(), "module": "legal"});
    assert_eq!(app.service("/check", check).await.status(), 200);
    assert_eq!(app.balance(&user.id).await, (500, 0, 0));

    chaos.mute();
    let lost = app.service("/consume", consume.clone()).await;
    assert_eq!(lost.status(), 503);
    chaos.restore_networking();
    wait_outcome(&app, "refunded").await;
    assert_eq!(app.balance(&user.id).await, (500, 0, 0));

    let retry: serde_json::Value = app
        .service("/consume", consume)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        retry,
        json!({"success": true, "charged": 3, "credits_remaining": 497, "duplicate": false})
    );
    assert_eq!(app.balance(&user.id).await, (497, 0, 3));
    app.assert_verify_clean();
}
