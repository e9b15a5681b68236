//! The metering proxy, end to end: real redis-server, real Postgres, a stub
//! upstream, the gateway on a real socket.

use crate::common;

use std::time::Duration;

use common::{TestApp, error_code, wait_until};
use creditgate::domain::ApiKey;
use futures_util::StreamExt;

type Fut = std::pin::Pin<Box<dyn std::future::Future<Output = reqwest::Response> + Send>>;

/// Fires `n` requests at once and returns their statuses.
async fn burst(n: usize, make: impl Fn(usize) -> Fut) -> Vec<u16> {
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let mut statuses = Vec::with_capacity(n);
    for t in tasks {
        statuses.push(t.await.expect("task").status().as_u16());
    }
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daily_limit_holds_exactly_under_300_parallel_calls() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let statuses = burst(300, |_| {
        let (c, url, key) = (app.client.clone(), app.url("/rag/q"), user.key.clone());
        Box::pin(async move { c.get(url).bearer_auth(key).send().await.expect("send") })
    })
    .await;
    assert_eq!(count(&statuses, 200), 20, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 280);
    assert_eq!(app.upstream.hits_on("/rag/q"), 20);
    assert_eq!(app.balance(&user.id).await, (80, 0, 20));
    let r = app.call(&user.key, "/rag/q").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=86_400).contains(&retry), "{retry}");
    assert_eq!(error_code(r).await, "daily_limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_credits_buy_exactly_three_legal_calls_under_50_parallel() {
    let app = TestApp::spawn().await;
    let user = app.create_user("tiny").await; // 10 credits, no daily limit
    let statuses = burst(50, |_| {
        let (c, url, key) = (app.client.clone(), app.url("/legal/ask"), user.key.clone());
        Box::pin(async move { c.get(url).bearer_auth(key).send().await.expect("send") })
    })
    .await;
    assert_eq!(count(&statuses, 200), 3, "{statuses:?}");
    assert_eq!(count(&statuses, 402), 47);
    assert_eq!(app.upstream.hits_on("/legal/ask"), 3);
    assert_eq!(app.balance(&user.id).await, (1, 0, 9));
    let r = app.call(&user.key, "/legal/ask").await;
    assert_eq!(r.status(), 402);
    assert_eq!(error_code(r).await, "insufficient_credits");
}

#[tokio::test(flavor = "multi_thread")]
async fn success_carries_credit_headers_and_identity_reaches_upstream() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let r = app.call(&user.key, "/park/echo?plate=16-123").await;
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-credits-charged"], "2");
    assert_eq!(h["x-credits-remaining"], "98");
    assert_eq!(h["x-daily-remaining"], "18");
    let rid = h["x-request-id"].to_str().expect("ascii").to_owned();
    let echo: serde_json::Value = r.json().await.expect("json");
    assert_eq!(echo["query"], "plate=16-123");
    assert_eq!(echo["headers"]["x-user-id"], user.id.as_str());
    assert_eq!(echo["headers"]["x-plan"], "free");
    assert_eq!(echo["headers"]["x-request-id"], rid.as_str());
    assert!(echo["headers"].get("authorization").is_none());
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn unlimited_plans_omit_the_daily_header_and_actions_have_their_price() {
    let app = TestApp::spawn().await;
    let user = app.create_user("enterprise").await;
    let r = app
        .client
        .get(app.url("/legal/x"))
        .header("x-api-key", &user.key)
        .header("x-action", "draft")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-credits-charged"], "5");
    assert!(r.headers().get("x-daily-remaining").is_none());
    assert_eq!(app.balance(&user.id).await, (99_995, 0, 5));
}

#[tokio::test(flavor = "multi_thread")]
async fn module_outside_the_plan_is_403_uncharged_and_not_forwarded() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let r = app.call(&user.key, "/legal/ask").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "module_not_in_plan");
    assert_eq!(app.upstream.hits(), 0);
    assert_eq!(app.balance(&user.id).await, (100, 0, 0));
    assert!(app.events(&user.id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_unknown_malformed_and_revoked_keys_are_401() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let none = app
        .client
        .get(app.url("/rag/q"))
        .send()
        .await
        .expect("send");
    assert_eq!(none.status(), 401);
    assert_eq!(error_code(none).await, "unauthenticated");
    let unknown = app
        .call(
            "cg_000000000000000000000000000000000000000000000000",
            "/rag/q",
        )
        .await;
    assert_eq!(unknown.status(), 401);
    let basic = app
        .client
        .get(app.url("/rag/q"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .expect("send");
    assert_eq!(basic.status(), 401);
    assert_eq!(error_code(basic).await, "unauthenticated");

    // The key works, is cached, then is revoked: the very next call fails.
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    app.state
        .billing
        .accounts()
        .revoke_key(&user.id, user.key_id, "test")
        .await
        .expect("revoke");
    app.state
        .billing
        .sync_account(&user.id)
        .await
        .expect("sync");
    let revoked = app.call(&user.key, "/rag/q").await;
    assert_eq!(revoked.status(), 401);
    assert_eq!(error_code(revoked).await, "unauthenticated");
    assert_eq!(app.upstream.hits(), 1);
    assert_eq!(app.balance(&user.id).await, (99, 0, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_created_after_the_account_reached_redis_works_at_once() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    // Created in Postgres only (as the CLI does): the proxy repairs Redis.
    let second = app
        .state
        .billing
        .accounts()
        .create_key(&user.id, "cli")
        .await
        .expect("key");
    let r = app.call(second.key.reveal(), "/rag/q").await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.balance(&user.id).await, (98, 0, 2));
    // The repair mirrored the account's whole access state under a version
    // of its own (both keys among its live keys) and cleared the account's
    // sync mark, rather than adding the one key unversioned.
    let mut live: Vec<String> = redis::cmd("HKEYS")
        .arg(app.state.billing.meter().keys().api_keys(&user.id))
        .query_async(&mut app.redis.connection().await)
        .await
        .expect("HKEYS");
    live.sort();
    let mut expected = vec![
        ApiKey::parse(&user.key)
            .expect("key")
            .hash()
            .as_str()
            .to_owned(),
        second.key.hash().as_str().to_owned(),
    ];
    expected.sort();
    assert_eq!(live, expected);
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM account_sync WHERE user_id = $1")
        .bind(user.id.as_str())
        .fetch_one(&app.pool().await)
        .await
        .expect("account_sync");
    assert_eq!(pending, 0);
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
}

/// Keys with an expiry or a module scope: enforced by the charge on every
/// call (401 `key_expired`, 403 `key_scope`), never charged when refused,
/// and refused at creation when they could never be used.
#[tokio::test(flavor = "multi_thread")]
async fn expired_and_out_of_scope_keys_are_refused_and_not_charged() {
    use creditgate::accounts::KeySpec;
    use creditgate::domain::ModuleId;
    let app = TestApp::spawn().await;
    let user = app.create_user("starter").await;
    let accounts = &app.state.billing.accounts();
    let scoped = accounts
        .create_key_with(
            &user.id,
            &KeySpec {
                name: "RAG only".into(),
                expires_at: None,
                modules: Some(vec![ModuleId::parse("rag").expect("module")]),
            },
            None,
            "test",
        )
        .await
        .expect("scoped key");
    let expiring = accounts
        .create_key_with(
            &user.id,
            &KeySpec {
                name: "for an hour".into(),
                expires_at: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
                modules: None,
            },
            None,
            "test",
        )
        .await
        .expect("expiring key");
    assert_eq!(app.call(scoped.key.reveal(), "/rag/q").await.status(), 200);
    let r = app.call(scoped.key.reveal(), "/legal/q").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "key_scope");
    assert_eq!(
        app.call(expiring.key.reveal(), "/legal/q").await.status(),
        200
    );

    // Its hour is over (moved back in Postgres, mirrored as any change is).
    let pool = app.pool().await;
    let mut tx = pool.begin().await.expect("transaction");
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(expiring.id)
        .execute(&mut *tx)
        .await
        .expect("expire");
    creditgate::accounts::mark_for_sync(&mut tx, &user.id)
        .await
        .expect("mark");
    tx.commit().await.expect("commit");
    app.state
        .billing
        .sync_account(&user.id)
        .await
        .expect("sync");
    let r = app.call(expiring.key.reveal(), "/legal/q").await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(r).await, "key_expired");
    // The user API refuses it too: an expired key cannot mint a new one.
    let r = app.user_get(expiring.key.reveal(), "/me").await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(r).await, "key_expired");
    assert_eq!(app.upstream.hits(), 2);
    assert_eq!(app.balance(&user.id).await, (496, 0, 4), "rag 1 + legal 3");

    // Keys that could never be used are refused when asked for.
    for spec in [
        KeySpec {
            name: "outside the plan".into(),
            expires_at: None,
            modules: Some(vec![ModuleId::parse("fiscal").expect("module")]),
        },
        KeySpec {
            name: "already over".into(),
            expires_at: Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
            modules: None,
        },
        KeySpec {
            name: "no module at all".into(),
            expires_at: None,
            modules: Some(vec![]),
        },
    ] {
        let err = accounts
            .create_key_with(&user.id, &spec, None, "test")
            .await;
        assert!(
            matches!(err, Err(creditgate::accounts::AccountError::InvalidKey(_))),
            "{}",
            spec.name
        );
    }
}

/// An account mirrored by a build before key details has its keys in a
/// set only: its first call mirrors it again, details included, and is
/// served.
#[tokio::test(flavor = "multi_thread")]
async fn an_account_mirrored_before_key_details_is_served_and_brought_up_to_date() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let keys = app.state.billing.meter().keys();
    let mut con = app.redis.connection().await;
    let _: () = redis::cmd("DEL")
        .arg(keys.api_keys(&user.id))
        .query_async(&mut con)
        .await
        .expect("DEL");
    let set: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.legacy_key_set(&user.id))
        .query_async(&mut con)
        .await
        .expect("SMEMBERS");
    assert_eq!(set.len(), 1, "older builds still find the key");
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let details: Option<String> = redis::cmd("HGET")
        .arg(keys.api_keys(&user.id))
        .arg(&set[0])
        .query_async(&mut con)
        .await
        .expect("HGET");
    assert_eq!(details.as_deref(), Some("|"));
    assert_eq!(app.balance(&user.id).await, (98, 0, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_accounts_are_403_at_once() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let path = format!("/users/{}/block", user.id);
    let r = app.admin(reqwest::Method::POST, &path, None).await;
    assert_eq!(r.status(), 200);
    let r = app.call(&user.key, "/rag/q").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "blocked");
    assert_eq!(app.upstream.hits(), 1);
    let path = format!("/users/{}/unblock", user.id);
    let r = app.admin(reqwest::Method::POST, &path, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_account_stays_blocked_when_rebuilt_from_postgres() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    // Blocked before Redis ever held the account.
    let path = format!("/users/{}/block", user.id);
    assert_eq!(
        app.admin(reqwest::Method::POST, &path, None).await.status(),
        200
    );
    let r = app.call(&user.key, "/rag/q").await;
    assert_eq!(r.status(), 403);
    assert_eq!(app.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_under_50_parallel_calls_reaches_the_upstream_once() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (c, url, key) = (app.client.clone(), app.url("/rag/unique"), user.key.clone());
            tokio::spawn(async move {
                let r = c
                    .get(url)
                    .bearer_auth(key)
                    .header("idempotency-key", "order-42")
                    .send()
                    .await
                    .expect("send");
                let status = r.status().as_u16();
                let replayed = r.headers().contains_key("idempotent-replayed");
                let body = r.text().await.expect("body");
                (status, replayed, body)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    // One first call; the others are replays of it or told it is in progress.
    let firsts: Vec<_> = answers.iter().filter(|(s, r, _)| *s == 201 && !r).collect();
    assert_eq!(firsts.len(), 1, "{answers:?}");
    for (status, replayed, body) in &answers {
        match status {
            201 => assert_eq!(body, &firsts[0].2, "a replay is the first answer"),
            409 => {
                assert!(!replayed);
                assert!(body.contains("request_in_progress"), "{body}");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(app.upstream.hits(), 1);
    assert_eq!(app.balance(&user.id).await, (99, 0, 1));
    let charges = app.count_events(&user.id, "charge").await;
    assert_eq!(charges, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_500_passes_through_and_is_refunded() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let r = app.call(&user.key, "/rag/status/500").await;
    assert_eq!(r.status(), 500);
    assert_eq!(r.headers()["x-credits-charged"], "0");
    assert_eq!(r.headers()["x-credits-remaining"], "100");
    assert_eq!(r.headers()["x-daily-remaining"], "20");
    assert_eq!(app.balance(&user.id).await, (100, 0, 0));
    assert_eq!(
        app.events(&user.id).await,
        vec![("charge".to_owned(), 1), ("refund".to_owned(), 1)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_5xx_is_kept_when_the_module_says_so() {
    let app = TestApp::spawn().await;
    let user = app.create_user("starter").await;
    let r = app.call(&user.key, "/api/v1/status/503").await;
    assert_eq!(r.status(), 503);
    assert_eq!(app.balance(&user.id).await, (499, 0, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_is_502_and_refunded() {
    let app = TestApp::spawn().await;
    let user = app.create_user("starter").await;
    let r = app.call(&user.key, "/voice/tts").await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "upstream_unavailable");
    assert_eq!(app.balance(&user.id).await, (500, 0, 0));
    assert_eq!(
        app.events(&user.id).await,
        vec![("charge".to_owned(), 2), ("refund".to_owned(), 2)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_is_504_and_refunded() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let started = std::time::Instant::now();
    let r = app.call(&user.key, "/park/slow").await; // park: timeout 500 ms
    let took = started.elapsed();
    assert_eq!(r.status(), 504);
    // At the timeout, not at the connection driver's next check (up to a
    // second out) nor at the upstream's answer (3 s).
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(900),
        "{took:?}"
    );
    assert_eq!(error_code(r).await, "upstream_timeout");
    assert_eq!(app.balance(&user.id).await, (100, 0, 0));
    assert_eq!(
        app.events(&user.id).await,
        vec![("charge".to_owned(), 2), ("refund".to_owned(), 2)]
    );
}

/// A timeout of a second or more is kept by the connection driver's
/// check without being told: the check comes at least once a second and
/// then sets itself for the deadline.
#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_longer_than_the_drivers_check_is_kept_to_the_deadline() {
    let app = TestApp::builder()
        .env("CREDITGATE_MODULES__PARK__TIMEOUT_MS", "1400")
        .start()
        .await;
    let user = app.create_user("free").await;
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let r = app.call(&user.key, "/park/slow").await;
        let took = started.elapsed();
        assert_eq!(r.status(), 504);
        assert_eq!(error_code(r).await, "upstream_timeout");
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_millis(1850),
            "{took:?}"
        );
    }
    assert_eq!(app.balance(&user.id).await, (100, 0, 0));
}

/// A client that hangs up leaves its call to a task of its own, where the
/// connection's driver no longer keeps the deadline: the call still times
/// out and is refunded, before the upstream's late 200 could keep it.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_whose_client_left_still_times_out_and_is_refunded() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let started = std::time::Instant::now();
    let r = app
        .client
        .get(app.url("/park/slow")) // timeout 500 ms, answered after 3 s
        .bearer_auth(&user.key)
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up");
    wait_until(
        "the call to be refunded",
        Duration::from_secs(10),
        || async { app.balance(&user.id).await == (100, 0, 0) },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    wait_until(
        "the charge and refund in the ledger",
        Duration::from_secs(10),
        || async {
            app.events(&user.id).await == vec![("charge".to_owned(), 2), ("refund".to_owned(), 2)]
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refunded_idempotent_call_can_be_retried_and_is_charged_again() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let send = |path: &'static str| {
        app.client
            .get(app.url(path))
            .bearer_auth(&user.key)
            .header("idempotency-key", "retry-me")
            .send()
    };
    assert_eq!(send("/rag/status/502").await.expect("send").status(), 502);
    assert_eq!(app.balance(&user.id).await, (100, 0, 0));
    assert_eq!(send("/rag/q").await.expect("send").status(), 200);
    assert_eq!(app.balance(&user.id).await, (99, 0, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_events_reach_the_client_while_the_upstream_is_still_sending() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let r = app.call(&user.key, "/rag/sse").await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("first event before the upstream finished")
        .expect("a chunk")
        .expect("bytes");
    assert_eq!(&first[..], b"data: first\n\n");
    // The upstream has not sent its second event: it is waiting for us.
    app.upstream.release();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(rest, b"data: second\n\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_are_413_and_not_charged() {
    let app = TestApp::spawn().await; // max_body_bytes = 1024
    let user = app.create_user("free").await;
    let r = app
        .client
        .post(app.url("/rag/echo"))
        .bearer_auth(&user.key)
        .body(vec![b'x'; 2048])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "payload_too_large");
    assert_eq!(app.upstream.hits(), 0);

    // Chunked (no Content-Length): cut off while streaming, then refunded.
    let chunks = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 512]))),
    );
    let r = app
        .client
        .post(app.url("/rag/echo"))
        .bearer_auth(&user.key)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    assert_eq!(app.balance(&user.id).await.0, 100);
    // A body within the limit goes through.
    let ok = app
        .client
        .post(app.url("/rag/echo"))
        .bearer_auth(&user.key)
        .body(vec![b'z'; 1000])
        .send()
        .await
        .expect("send");
    let echo: serde_json::Value = ok.json().await.expect("json");
    assert_eq!(echo["body_len"], 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_headers_are_400_json_and_not_charged() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let cases = [
        ("idempotency-key", "has space".to_owned()),
        ("idempotency-key", "x".repeat(200)),
        ("x-request-id", "é".to_owned()),
        ("x-action", "DROP TABLE".to_owned()),
    ];
    for (name, value) in cases {
        let r = app
            .client
            .get(app.url("/rag/q"))
            .bearer_auth(&user.key)
            .header(name, value.as_bytes())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{name}");
        assert_eq!(error_code(r).await, "invalid_header");
    }
    assert_eq!(app.upstream.hits(), 0);
    assert!(app.events(&user.id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_are_404_json_and_prefixes_match_whole_segments() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    for path in ["/nope", "/ragx/q", "/api/v2/x"] {
        let r = app.call(&user.key, path).await;
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(error_code(r).await, "not_found");
    }
    assert_eq!(app.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn x_user_id_counts_only_when_enabled_and_from_a_trusted_network() {
    let off = TestApp::spawn().await;
    let user = off.create_user("free").await;
    let r = off
        .client
        .get(off.url("/rag/q"))
        .header("x-user-id", user.id.as_str())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);

    // Enabled, but this peer (127.0.0.1) is not in auth.trusted_networks.
    let untrusted = TestApp::builder()
        .env("CREDITGATE_AUTH__TRUST_USER_ID_HEADER", "true")
        .env("CREDITGATE_AUTH__TRUSTED_NETWORKS", "[\"10.0.0.0/8\"]")
        .start()
        .await;
    let user = untrusted.create_user("free").await;
    for path in ["/rag/q", "/api/billing/me"] {
        let r = untrusted
            .client
            .get(untrusted.url(path))
            .header("x-user-id", user.id.as_str())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401, "{path}");
    }
    assert_eq!(untrusted.upstream.hits(), 0);

    let on = TestApp::builder()
        .env("CREDITGATE_AUTH__TRUST_USER_ID_HEADER", "true")
        .env("CREDITGATE_AUTH__TRUSTED_NETWORKS", "[\"127.0.0.0/8\"]")
        .start()
        .await;
    let user = on.create_user("free").await;
    for path in ["/rag/q", "/api/billing/me"] {
        let r = on
            .client
            .get(on.url(path))
            .header("x-user-id", user.id.as_str())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{path}");
    }
    let unknown = on
        .client
        .get(on.url("/rag/q"))
        .header("x-user-id", "nobody")
        .send()
        .await
        .expect("send");
    assert_eq!(unknown.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_is_a_fast_503_and_service_resumes_when_it_returns() {
    let mut app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);

    app.redis.kill();
    let started = std::time::Instant::now();
    let r = app.call(&user.key, "/rag/q").await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_code(r).await, "metering_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        app.upstream.hits(),
        1,
        "nothing forwarded while Redis is down"
    );
    let ready = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("send");
    assert_eq!(ready.status(), 503);

    // Redis comes back empty; the account is rebuilt from Postgres.
    app.redis.restart().await;
    let (client, url, key) = (app.client.clone(), app.url("/rag/q"), user.key.clone());
    wait_until("the gateway to reconnect", Duration::from_secs(10), || {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        async move {
            client
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    assert_eq!(app.upstream.hits(), 2);
    let ready = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("send");
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_answers_without_dependencies() {
    let mut app = TestApp::spawn().await;
    app.redis.kill();
    let r = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["status"], "ok");
    let ready = app.get_json("/readyz").await;
    assert_eq!(ready["checks"]["database"], "ok");
    assert_ne!(ready["checks"]["redis"], "ok");
}

async fn raw(app: &TestApp, request: &[u8]) -> (String, String) {
    common::raw(app.addr, request).await
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_header_bytes_are_refused_before_any_charge() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    // Non-ASCII credentials: our JSON 401.
    let mut req = b"GET /rag/q HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xff\xfe\r\n\r\n".to_vec();
    let (status, body) = raw(&app, &req).await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    assert!(body.contains("\"unauthenticated\""), "{body}");
    // A header line HTTP itself forbids: refused by the parser with 400.
    req = format!(
        "GET /rag/q HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nBad Header: 1\r\n\r\n",
        user.key
    )
    .into_bytes();
    let (status, _) = raw(&app, &req).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    // A Content-Length that is not a number.
    req = format!(
        "POST /rag/q HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: ten\r\n\r\n",
        user.key
    )
    .into_bytes();
    let (status, _) = raw(&app, &req).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert_eq!(app.upstream.hits(), 0);
    assert!(app.events(&user.id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn().await; // header_read_timeout_ms = 2000
    let mut s = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /rag/q HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 6 s");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
    assert_eq!(app.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn past_max_in_flight_the_gateway_answers_503_at_once_instead_of_queueing() {
    let app = TestApp::builder()
        .env("CREDITGATE_SERVER__MAX_IN_FLIGHT", "2")
        .start()
        .await;
    let user = app.create_user("enterprise").await;
    // Two streams held open occupy both slots until their bodies finish.
    let first = app.call(&user.key, "/rag/sse").await;
    let second = app.call(&user.key, "/rag/sse").await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let started = std::time::Instant::now();
    let third = app.call(&user.key, "/rag/q").await;
    assert_eq!(third.status(), 503);
    assert!(third.headers().contains_key("retry-after"));
    assert_eq!(error_code(third).await, "overloaded");
    assert!(started.elapsed() < Duration::from_secs(1));
    // Finishing the streams frees the slots.
    app.upstream.release();
    let (a, b) = (first.bytes().await, second.bytes().await);
    assert!(a.is_ok() && b.is_ok());
    wait_until("a free slot", Duration::from_secs(5), || {
        let (c, url, key) = (app.client.clone(), app.url("/rag/q"), user.key.clone());
        async move {
            c.get(url)
                .bearer_auth(key)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
}

/// The "limited" test plan: 30 calls a minute with a burst of 5 (GCRA).
/// Whatever the concurrency, exactly the burst passes; the served answers
/// count the burst down in their `RateLimit` headers, and a refusal says
/// exactly when the next call fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_plans_rate_limit_holds_exactly_under_parallel_calls() {
    let app = TestApp::spawn().await;
    let user = app.create_user("limited").await;
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let (c, url, key) = (app.client.clone(), app.url("/rag/q"), user.key.clone());
            tokio::spawn(async move { c.get(url).bearer_auth(key).send().await.expect("send") })
        })
        .collect();
    let mut statuses = Vec::new();
    let mut remaining = Vec::new();
    for t in tasks {
        let r = t.await.expect("task");
        statuses.push(r.status().as_u16());
        if r.status() == 200 {
            let header = |name: &str| {
                r.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .unwrap_or_default()
            };
            assert_eq!(header("ratelimit-policy"), "\"default\";q=5;w=10");
            let now = header("ratelimit");
            let r_part = now
                .strip_prefix("\"default\";r=")
                .and_then(|rest| rest.split(';').next())
                .and_then(|r| r.parse::<u32>().ok());
            remaining.push(r_part.expect(&now));
        }
    }
    assert_eq!(count(&statuses, 200), 5, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 25);
    // Each served call says what is left of the burst after it, as of its
    // own arrival: the last one leaves nothing. (Concurrent calls are
    // stamped when they arrive, not in the order Redis decides them, so
    // two may say the same.)
    remaining.sort_unstable();
    assert_eq!(remaining.first(), Some(&0), "{remaining:?}");
    assert!(remaining.iter().all(|r| *r <= 4), "{remaining:?}");
    let r = app.call(&user.key, "/rag/q").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After");
    // One call every 2 s: the next one fits within 2 s.
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(error_code(r).await, "rate_limited");
    assert_eq!(app.upstream.hits(), 5);
    assert_eq!(
        app.balance(&user.id).await,
        (995, 0, 5),
        "refused calls are not charged"
    );
}

/// The limit lives in Redis with the account: two instances share it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_rate_limit() {
    let app = TestApp::spawn().await;
    let user = app.create_user("limited").await;
    let (other, _stop) = app.second_instance().await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        let url = if i % 2 == 0 {
            app.url("/rag/q")
        } else {
            format!("http://{other}/rag/q")
        };
        let r = app
            .client
            .get(url)
            .bearer_auth(&user.key)
            .send()
            .await
            .expect("send");
        statuses.push(r.status().as_u16());
    }
    // The burst of 5 across both, alternating: then both refuse.
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(app.balance(&user.id).await, (995, 0, 5));
}

/// An upstream that drops each keep-alive connection right after answering
/// (as servers do at their keep-alive timeout or request limit): a pooled
/// connection found closed, or closing before the request goes out, is
/// replaced by a new one. A request already written when the close arrives
/// is never sent again (docs/CONFIGURATION.md): that call alone fails, 502,
/// and is refunded. The race is lost rarely, and only by a call that
/// follows the last answer at once; after a pause, never.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_closing_its_idle_connections_fails_no_call() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Keep-alive as far as HTTP says, then gone.
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    let app = TestApp::builder()
        .env(
            "CREDITGATE_MODULES__RAG__UPSTREAM",
            &format!("http://{addr}"),
        )
        .start()
        .await;
    let user = app.create_user("enterprise").await;
    let (mut ok, mut raced) = (0, 0);
    for i in 0..60 {
        let response = app.call(&user.key, "/rag/q").await;
        // Half the calls find the connection already closed (after a
        // pause), half race its close (right after the last answer).
        let after_pause = i % 2 == 1;
        match response.status().as_u16() {
            200 => ok += 1,
            502 if !after_pause => raced += 1,
            other => panic!("call {i} ({after_pause}): {other}"),
        }
        if !after_pause {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(ok >= 50, "{ok} of 60 answered, {raced} lost the race");
    // None sent twice: at most one request a call, and every answered one.
    let seen = requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (ok..=60).contains(&seen),
        "{seen} requests for {ok} answers"
    );
    let (_, _, used_today) = app.balance(&user.id).await;
    assert_eq!(
        used_today, ok as i64,
        "each answered call charged once, each failed one refunded"
    );
}
