//! `Billing`'s account operations called directly, as the admin and user
//! APIs call them: Postgres first (with its ledger, audit and webhook rows),
//! then Redis, so that a change bites on the very next charge.

use crate::common;

use common::TestApp;
use creditgate::billing::BillingError;
use creditgate::domain::{Credits, PlanId, UserId};
use creditgate::metering::{Grant, GrantOutcome};

async fn ledger_kinds(app: &TestApp, user: &UserId) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT kind FROM ledger_events WHERE user_id = $1 AND kind <> 'charge' ORDER BY occurred_at",
    )
    .bind(user.as_str())
    .fetch_all(&app.pool().await)
    .await
    .expect("ledger")
}

async fn audit_actions(app: &TestApp, user: &UserId) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT action FROM admin_audit WHERE user_id = $1 AND action <> 'create_user' ORDER BY id",
    )
    .bind(user.as_str())
    .fetch_all(&app.pool().await)
    .await
    .expect("audit")
}

#[tokio::test(flavor = "multi_thread")]
async fn set_blocked_bites_on_the_next_call_and_is_recorded_once() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let billing = &app.state.billing;
    billing
        .set_blocked(&user.id, true, Some("fraud review"), "admin:test")
        .await
        .expect("block");
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 403);
    let stored = billing
        .accounts()
        .get_user(&user.id)
        .await
        .expect("read")
        .expect("user");
    assert!(stored.blocked);
    billing
        .set_blocked(&user.id, false, None, "admin:test")
        .await
        .expect("unblock");
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    assert_eq!(ledger_kinds(&app, &user.id).await, ["block", "unblock"]);
    assert_eq!(audit_actions(&app, &user.id).await, ["block", "unblock"]);
    let ghost = UserId::parse("ghost").expect("id");
    assert!(matches!(
        billing.set_blocked(&ghost, true, None, "admin:test").await,
        Err(BillingError::UnknownUser(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn change_plan_opens_the_new_plans_modules_at_once() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    // The test catalog's free plan has no legal module; starter has.
    assert_eq!(app.call(&user.key, "/legal/q").await.status(), 403);
    let starter = PlanId::parse("starter").expect("plan");
    app.state
        .billing
        .change_plan(&user.id, &starter, "admin:test")
        .await
        .expect("change plan");
    assert_eq!(app.call(&user.key, "/legal/q").await.status(), 200);
    assert_eq!(ledger_kinds(&app, &user.id).await, ["plan_change"]);
    assert_eq!(audit_actions(&app, &user.id).await, ["plan_change"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_is_refused_on_the_next_call() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    app.state
        .billing
        .revoke_key(&user.id, user.key_id, "admin:test")
        .await
        .expect("revoke");
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_rebuilds_an_account_redis_lacks() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    // Never charged: Redis does not hold the account yet.
    let outcome = app
        .state
        .billing
        .grant(&Grant {
            user: &user.id,
            credits: Credits::new(25).expect("credits"),
            reason: "welcome",
            actor: "admin:test",
            idempotency: None,
        })
        .await
        .expect("grant");
    assert_eq!(
        outcome,
        GrantOutcome::Granted {
            monthly: 100,
            bonus: 25
        }
    );
    let account = app.state.billing.account(&user.id).await.expect("account");
    assert_eq!((account.monthly, account.bonus), (100, 25));
}
