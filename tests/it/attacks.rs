//! The holes an outside review found, each closed and proven with the real
//! binary's code, a real Redis and Postgres, and a capturing upstream:
//! free calls through idempotency keys, dot segments crossing modules,
//! hang-ups escaping settlement, credentials and spoofable headers reaching
//! upstreams, stalled bodies, and trust that came from the network alone.

use crate::common;

use std::time::Duration;

use common::{TestApp, error_code, metric, raw, wait_until};

async fn keyed(
    app: &TestApp,
    key: &str,
    method: reqwest::Method,
    path: &str,
    idempotency_key: &str,
) -> reqwest::Response {
    app.client
        .request(method, app.url(path))
        .bearer_auth(key)
        .header("idempotency-key", idempotency_key)
        .send()
        .await
        .expect("gateway answers")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_idempotency_key_is_never_forwarded_again() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let get = reqwest::Method::GET;

    let first = keyed(&app, &user.key, get.clone(), "/rag/unique", "k1").await;
    assert_eq!(first.status(), 201);
    assert_eq!(first.headers()["x-credits-charged"], "1");
    assert!(!first.headers().contains_key("idempotent-replayed"));
    let first_id = first.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let body = first.text().await.expect("body");

    for _ in 0..2 {
        let again = keyed(&app, &user.key, get.clone(), "/rag/unique", "k1").await;
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.headers()["x-credits-charged"], "0");
        assert_eq!(again.headers()["x-credits-remaining"], "99");
        assert_eq!(again.headers()["x-upstream"], "unique");
        assert_eq!(again.text().await.expect("body"), body);
    }
    assert_eq!(app.upstream.hits_on("/rag/unique"), 1);

    // The same key on another module, path or method: refused, not forwarded.
    for (method, path) in [
        (get.clone(), "/park/unique"),
        (get.clone(), "/rag/other"),
        (reqwest::Method::POST, "/rag/unique"),
    ] {
        let r = keyed(&app, &user.key, method, path, "k1").await;
        assert_eq!(r.status(), 422, "{path}");
        let json: serde_json::Value = r.json().await.expect("json");
        assert_eq!(json["error"]["code"], "idempotency_key_reused");
        let message = json["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(&first_id), "{message}");
    }
    assert_eq!(app.upstream.hits(), 1);
    assert_eq!(app.balance(&user.id).await, (99, 0, 1));

    // Past the daily limit the key still buys nothing.
    for _ in 0..19 {
        assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    }
    assert_eq!(app.call(&user.key, "/rag/over").await.status(), 429);
    let after = keyed(&app, &user.key, get.clone(), "/rag/after-limit", "k1").await;
    assert_eq!(after.status(), 422);
    assert_eq!(app.upstream.hits_on("/rag/after-limit"), 0);
    let replay = keyed(&app, &user.key, get.clone(), "/rag/unique", "k1").await;
    assert_eq!(
        replay.status(),
        201,
        "a replay costs nothing, even at the limit"
    );
    assert_eq!(app.upstream.hits_on("/rag/unique"), 1);
    assert_eq!(app.balance(&user.id).await, (80, 0, 20));

    // X-Request-Id is a trace id: the same one twice is two calls, both
    // charged, and it reaches the upstream as sent.
    let other = app.create_user("free").await;
    for _ in 0..2 {
        let r = app
            .call_with(&other.key, "/park/q", &[("x-request-id", "same")])
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-credits-charged"], "2");
        assert_eq!(r.headers()["x-request-id"], "same");
    }
    assert_eq!(app.upstream.hits_on("/park/q"), 2);
    assert_eq!(app.balance(&other.id).await, (96, 0, 4));
    let seen: Vec<_> = app
        .upstream
        .captured()
        .into_iter()
        .filter(|c| c.target == "/park/q")
        .collect();
    assert!(seen.iter().all(|c| c.header("x-request-id") == ["same"]));

    let charges = app.count_events(&user.id, "charge").await;
    assert_eq!(charges, 20, "one charge for k1, 19 plain calls");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_too_long_to_keep_makes_a_repeat_409_naming_the_first_request() {
    let app = TestApp::builder()
        .env("CREDITGATE_METERING__REPLAY_MAX_BYTES", "1000")
        .start()
        .await;
    let user = app.create_user("free").await;
    let first = app
        .call_with(
            &user.key,
            "/rag/big",
            &[("idempotency-key", "big-1"), ("x-request-id", "orig-77")],
        )
        .await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.bytes().await.expect("body").len(), 100_000);
    let again = keyed(&app, &user.key, reqwest::Method::GET, "/rag/big", "big-1").await;
    assert_eq!(again.status(), 409);
    let json: serde_json::Value = again.json().await.expect("json");
    assert_eq!(json["error"]["code"], "duplicate_request");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("orig-77")),
        "{json}"
    );
    assert_eq!(app.upstream.hits(), 1);
    assert_eq!(app.balance(&user.id).await, (99, 0, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_segments_and_encoded_slashes_are_refused_before_routing() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await; // rag and park only
    for path in [
        "/rag/../legal/draft",
        "/rag/%2e%2e/legal/draft",
        "/rag/..%2flegal/draft",
        "/rag/%2E%2E/legal",
        "/rag/./q",
        "/rag/a%2Fb",
        "/rag/a%5cb",
        "/rag/%252e%252e/legal",
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
            user.key
        );
        let (status, body) = raw(app.addr, request.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{path}: {status}");
        assert!(body.contains("\"bad_path\""), "{path}: {body}");
    }
    assert!(app.upstream.captured().is_empty(), "nothing forwarded");
    assert!(app.events(&user.id).await.is_empty(), "nothing charged");
    // An honest path still works.
    assert_eq!(app.call(&user.key, "/rag/file.v2..txt").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_still_gets_its_failed_call_refunded_and_leaves_no_gauge() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    for _ in 0..3 {
        // The upstream answers 500 after 1.5 s; the client leaves after 300 ms.
        let r = app
            .client
            .get(app.url("/rag/slowfail"))
            .bearer_auth(&user.key)
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(r.is_err(), "the client gave up");
    }
    wait_until(
        "the three failed calls to be refunded",
        Duration::from_secs(10),
        || async { app.balance(&user.id).await == (100, 0, 0) && app.upstream.hits() == 3 },
    )
    .await;
    let kinds: Vec<String> = app
        .events(&user.id)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "charge").count(), 3);
    assert_eq!(kinds.iter().filter(|k| *k == "refund").count(), 3);
    // Only the /metrics request itself is in flight; nothing upstream.
    assert_eq!(metric(&app, "creditgate_in_flight_requests").await, 1.0);
    assert_eq!(
        metric(&app, "creditgate_upstream_in_flight_requests").await,
        0.0
    );
}

const SPOOFED: [(&str, &str); 8] = [
    ("x-admin-key", "test-admin-key-0123"),
    ("x-service-key", "test-service-key-0123"),
    ("forwarded", "for=1.2.3.4"),
    ("x-real-ip", "6.6.6.6"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-for", "1.2.3.4"),
    ("x-user-id", "someone-else"),
];

async fn send_spoofed(app: &TestApp, key: &str) -> common::Captured {
    let mut req = app.client.get(app.url("/rag/capture")).bearer_auth(key);
    for (name, value) in SPOOFED {
        req = req.header(name, value);
    }
    assert_eq!(req.send().await.expect("send").status(), 200);
    app.upstream
        .captured()
        .into_iter()
        .find(|c| c.target == "/rag/capture")
        .expect("forwarded")
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_never_reach_an_upstream_and_forwarding_headers_are_the_gateways() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let seen = send_spoofed(&app, &user.key).await;
    for secret in ["authorization", "x-api-key", "x-admin-key", "x-service-key"] {
        assert!(
            seen.header(secret).is_empty(),
            "{secret} reached the upstream"
        );
    }
    let host = format!("127.0.0.1:{}", app.addr.port());
    assert_eq!(seen.header("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.header("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(seen.header("x-forwarded-host"), [host.as_str()]);
    assert_eq!(seen.header("x-forwarded-proto"), ["http"]);
    assert_eq!(
        seen.header("forwarded"),
        [format!("for=127.0.0.1;proto=http;host=\"{host}\"").as_str()]
    );
    assert_eq!(seen.header("x-user-id"), [user.id.as_str()]);
    assert_eq!(seen.header("x-plan"), ["free"]);
    // The upstream is addressed as itself, in origin form.
    let upstream = app.upstream.addr.to_string();
    assert_eq!(seen.header("host"), [upstream.as_str()]);
    assert_eq!(seen.target, "/rag/capture");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_proxy_keeps_its_forwarding_headers_but_never_the_credentials() {
    let app = TestApp::builder()
        .env("CREDITGATE_SERVER__TRUSTED_PROXIES", "[\"127.0.0.1\"]")
        .start()
        .await;
    let user = app.create_user("free").await;
    let seen = send_spoofed(&app, &user.key).await;
    for secret in ["authorization", "x-admin-key", "x-service-key"] {
        assert!(
            seen.header(secret).is_empty(),
            "{secret} reached the upstream"
        );
    }
    assert_eq!(seen.header("x-forwarded-for"), ["1.2.3.4, 127.0.0.1"]);
    assert_eq!(seen.header("x-real-ip"), ["6.6.6.6"]);
    assert_eq!(seen.header("x-forwarded-host"), ["evil.example"]);
    assert_eq!(seen.header("x-forwarded-proto"), ["https"]);
    let forwarded = seen.header("forwarded");
    assert!(
        forwarded.len() == 1 && forwarded[0].starts_with("for=1.2.3.4, for=127.0.0.1;"),
        "{forwarded:?}"
    );
    assert_eq!(seen.header("x-user-id"), [user.id.as_str()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_that_stalls_is_408_and_refunded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::builder()
        .env("CREDITGATE_SERVER__BODY_IDLE_TIMEOUT_MS", "300")
        .start()
        .await;
    let user = app.create_user("free").await;
    let mut s = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /rag/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 100\r\n\r\n0123456789",
        user.key
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered before the client's body ever finished")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"request_timeout\""), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(app.balance(&user.id).await, (100, 0, 0));
    let kinds: Vec<String> = app
        .events(&user.id)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(kinds, ["charge", "refund"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_not_in_the_issued_format_are_401_without_a_database_query() {
    let chaos = common::chaos::ChaosProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let app = TestApp::builder().database_via(chaos.addr).start().await;
    chaos.break_networking();
    // A well-formed unknown key needs the database: with it cut, 503.
    let well_formed = app
        .call(
            "cg_0123456789abcdef0123456789abcdef0123456789abcdef",
            "/rag/q",
        )
        .await;
    assert_eq!(well_formed.status(), 503);
    // Junk is refused from its shape alone, database or not.
    for junk in [
        "cg_short",
        "sk_live_0123456789",
        "cg_0123456789ABCDEF0123456789abcdef0123456789abcdef",
    ] {
        let r = app.call(junk, "/rag/q").await;
        assert_eq!(r.status(), 401, "{junk}");
        assert_eq!(error_code(r).await, "unauthenticated");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_credits_api_needs_no_key_from_a_trusted_network_only() {
    let closed = TestApp::spawn().await;
    let user = closed.create_user("free").await;
    let check = serde_json::json!({"user_id": user.id.as_str(), "module": "rag"});
    let r = closed.credits_as(None, "/check", check).await;
    assert_eq!(r.status(), 401);

    let open = TestApp::builder()
        .env("CREDITGATE_AUTH__TRUSTED_NETWORKS", "[\"127.0.0.1/32\"]")
        .start()
        .await;
    let user = open.create_user("free").await;
    let consume = serde_json::json!({
        "user_id": user.id.as_str(), "module": "rag", "request_id": "hub-1"
    });
    let r = open.credits_as(None, "/consume", consume).await;
    assert_eq!(r.status(), 200);
    // A wrong key is still wrong, even from the trusted network.
    let check = serde_json::json!({"user_id": user.id.as_str(), "module": "rag"});
    let r = open
        .credits_as(Some("wrong-service-key"), "/check", check)
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(open.balance(&user.id).await, (99, 0, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_cells_cannot_become_formulas_or_split_in_french_excel() {
    let app = TestApp::spawn().await;
    for name in ["=HYPERLINK(\"http://x\")", "Dupont; Ali"] {
        let body = serde_json::json!({"name": name, "plan": "free"});
        let created = app.admin(reqwest::Method::POST, "/users", Some(body)).await;
        assert_eq!(created.status(), 201);
    }
    let text = app
        .admin(reqwest::Method::GET, "/export.csv", None)
        .await
        .text()
        .await
        .expect("csv");
    assert!(text.contains("\"Dupont; Ali\""), "{text}");
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let names: Vec<String> = reader
        .records()
        .map(|r| r.expect("row").get(1).unwrap_or("").to_owned())
        .collect();
    assert!(
        names.contains(&"'=HYPERLINK(\"http://x\")".to_owned()),
        "{names:?}"
    );
    assert!(names.contains(&"Dupont; Ali".to_owned()), "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with('=')));

    // A request id chosen by a client lands in the usage export too.
    let user = app.create_user("free").await;
    let r = app
        .call_with(&user.key, "/rag/q", &[("x-request-id", "=cmd|calc!A0")])
        .await;
    assert_eq!(r.status(), 200);
    app.wait_flushed(Duration::from_secs(10)).await;
    let usage = app
        .admin(reqwest::Method::GET, "/usage.csv", None)
        .await
        .text()
        .await
        .expect("csv");
    assert!(usage.contains(",'=cmd|calc!A0,"), "{usage}");
    assert!(!usage.contains(",=cmd"), "{usage}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_accepts_but_never_answers_is_a_503_within_the_budget_and_recovers() {
    let app = TestApp::builder().redis_via_chaos().start().await; // budget 300 ms
    let chaos = app.redis_chaos.clone().expect("chaos proxy");
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    chaos.stall();
    for _ in 0..10 {
        let started = std::time::Instant::now();
        let r = app.call(&user.key, "/rag/q").await;
        let elapsed = started.elapsed();
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        assert_eq!(error_code(r).await, "metering_unavailable");
        assert!(
            elapsed < Duration::from_millis(900),
            "answered after {elapsed:?}, past the 300 ms budget"
        );
    }
    assert_eq!(
        app.upstream.hits(),
        1,
        "nothing forwarded while Redis hangs"
    );
    chaos.restore_networking();
    wait_until(
        "service without a restart",
        Duration::from_secs(5),
        || async { app.call(&user.key, "/rag/q").await.status() == 200 },
    )
    .await;
    assert_eq!(app.balance(&user.id).await.0, 98);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unknown_keys_holds_at_most_half_the_database_pool() {
    let chaos = common::chaos::ChaosProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let app = TestApp::builder().database_via(chaos.addr).start().await; // pool of 10
    // Postgres hangs: every lookup that gets a turn waits; the others must
    // be shed quickly instead of queueing behind them.
    chaos.stall();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (c, url) = (app.client.clone(), app.url("/rag/q"));
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let r = c
                    .get(url)
                    .bearer_auth(format!("cg_{i:048x}"))
                    .send()
                    .await
                    .expect("send");
                (r.status().as_u16(), started.elapsed())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    chaos.restore_networking();
    let shed: Vec<_> = answers
        .iter()
        .filter(|(_, elapsed)| *elapsed < Duration::from_millis(1500))
        .collect();
    assert_eq!(
        shed.len(),
        45,
        "5 lookups at once, the rest shed: {answers:?}"
    );
    assert!(shed.iter().all(|(status, _)| *status == 503));
    assert!(
        answers.iter().all(|(status, _)| *status == 503),
        "{answers:?}"
    );
    assert_eq!(
        metric(&app, "creditgate_key_lookups_total{result=\"shed\"}").await,
        45.0
    );
    // Once Postgres answers, unknown keys are plain 401s, counted.
    wait_until("Postgres back", Duration::from_secs(10), || async {
        app.call(&format!("cg_{:048x}", 999), "/rag/q")
            .await
            .status()
            == 401
    })
    .await;
    assert!(metric(&app, "creditgate_key_lookups_total{result=\"unknown\"}").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_charge_redis_runs_after_the_gateway_gave_up_on_it_is_not_applied() {
    let app = TestApp::spawn().await; // budget 300 ms
    let user = app.create_user("free").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    // Redis holds every write for 1.5 s: the gateway gives up after 300 ms
    // and answers "nothing was charged"; the scripts it sent still wait in
    // Redis and would run when the pause ends.
    let mut con = app.redis.connection().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("WRITE")
        .query_async(&mut con)
        .await
        .expect("CLIENT PAUSE");
    for _ in 0..3 {
        let r = app.call(&user.key, "/rag/q").await;
        assert_eq!(r.status(), 503);
        assert_eq!(error_code(r).await, "metering_unavailable");
    }
    tokio::time::sleep(Duration::from_millis(1700)).await;
    wait_until(
        "service after the pause",
        Duration::from_secs(5),
        || async { app.call(&user.key, "/rag/q").await.status() == 200 },
    )
    .await;
    // Two calls served: exactly two charges, whatever Redis ran late.
    assert_eq!(app.upstream.hits(), 2);
    assert_eq!(app.balance(&user.id).await, (98, 0, 2));
    let charges = app.count_events(&user.id, "charge").await;
    assert_eq!(charges, 2);
}

/// charge.lua writes events by concatenation: the client's request id is
/// escaped by the gateway, so one that looks like JSON stays a string and
/// the event stays the one charge it was.
#[tokio::test]
async fn a_request_id_that_looks_like_json_stays_a_string_in_the_ledger() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    let sneaky = r#"x","k":"grant","n":-999,"fb":0,"z":"\"#;
    let r = app
        .call_with(&user.key, "/rag/q", &[("x-request-id", sneaky)])
        .await;
    assert_eq!(r.status(), 200);
    app.wait_flushed(Duration::from_secs(10)).await;
    let rows: Vec<(String, i64, Option<String>)> =
        sqlx::query_as("SELECT kind, amount, request_id FROM ledger_events WHERE user_id = $1")
            .bind(user.id.as_str())
            .fetch_all(&app.pool().await)
            .await
            .expect("rows");
    let charges: Vec<_> = rows.iter().filter(|(kind, ..)| kind == "charge").collect();
    assert_eq!(charges.len(), 1, "{rows:?}");
    assert_eq!(charges[0].1, 1, "{rows:?}");
    assert_eq!(charges[0].2.as_deref(), Some(sneaky));
    assert!(rows.iter().all(|(kind, ..)| kind != "grant"), "{rows:?}");
    app.assert_verify_clean();
}
