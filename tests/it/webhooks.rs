//! Webhooks against the real gateway, Redis and Postgres: events produced
//! exactly once (thresholds under concurrency, flusher replays), delivered
//! at least once with the same id (receivers that fail, refuse, hang or
//! answer garbage, a gateway killed mid-delivery, two instances), signed
//! as the Standard Webhooks reference library verifies.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{TestApp, free_port, process::Gateway, wait_until};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ALL_EVENTS: &str = r#"["credits.low", "credits.exhausted", "account.blocked", "account.unblocked", "plan.changed", "credits.granted"]"#;

/// What a receiver does with its n-th connection (one per attempt).
#[derive(Clone, Copy, Debug)]
enum Reply {
    Status(u16),
    /// Reads the request and never answers.
    Hang,
    /// Answers bytes that are not HTTP, then closes.
    Garbage,
}

#[derive(Clone, Debug)]
struct Delivery {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("the body is JSON")
    }

    fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap_or("").to_owned()
    }
}

/// A webhook receiver whose behaviour is scripted per attempt.
struct Receiver {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<Delivery>>>,
}

type Plan = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

impl Receiver {
    async fn start(plan: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_on(
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            Arc::new(plan),
        )
    }

    fn start_on(listener: TcpListener, plan: Plan) -> Self {
        Self::start_with(listener, plan, None)
    }

    /// A receiver behind TLS, with the certificate `acceptor` holds.
    async fn start_tls(acceptor: tokio_rustls::TlsAcceptor) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_with(listener, Arc::new(|_| Reply::Status(200)), Some(acceptor))
    }

    fn start_with(
        listener: TcpListener,
        plan: Plan,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let addr = listener.local_addr().expect("addr");
        let got = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let g = Arc::clone(&got);
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let reply = plan(connections.fetch_add(1, Ordering::SeqCst));
                let g = Arc::clone(&g);
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Reply::Garbage = reply {
                        let mut buf = [0u8; 4096];
                        let _ = stream.read(&mut buf).await;
                        let _ = stream.write_all(b"ceci n'est pas HTTP\r\n\r\n").await;
                        return;
                    }
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, reply, g).await;
                            }
                        }
                        None => serve(stream, reply, g).await,
                    }
                });
            }
        });
        Self { addr, got }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    fn got(&self) -> Vec<Delivery> {
        self.got.lock().expect("lock").clone()
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Delivery> {
        wait_until(&format!("{n} webhook requests"), timeout, || async {
            self.got().len() >= n
        })
        .await;
        self.got()
    }
}

/// One connection: records each request, answers per `reply`.
async fn serve<S>(stream: S, reply: Reply, got: Arc<Mutex<Vec<Delivery>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let got = Arc::clone(&got);
        async move {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let (id, timestamp, signature) = (
                header("webhook-id"),
                header("webhook-timestamp"),
                header("webhook-signature"),
            );
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let body = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
            got.lock().expect("lock").push(Delivery {
                id,
                timestamp,
                signature,
                body,
            });
            let status = match reply {
                Reply::Status(s) => s,
                _ => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    200
                }
            };
            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
            *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

fn endpoint(url: &str, events: &str) -> String {
    format!("[[webhooks]]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\nevents = {events}\n")
}

/// Fast retries and short attempts, so the tests see several attempts.
const FAST: &str = "[webhook_delivery]\ntimeout_ms = 1000\nfirst_retry_ms = 100\nmax_retry_ms = 400\npoll_ms = 100\n";

/// Verifies every delivery with the Standard Webhooks reference library
/// (Python `standardwebhooks`), and checks it rejects a tampered body.
fn verify_with_reference_library(deliveries: &[Delivery]) {
    let file = std::env::temp_dir().join(format!("cg-webhooks-{}.json", uuid::Uuid::new_v4()));
    let list: Vec<Value> = deliveries
        .iter()
        .map(|d| json!({"id": d.id, "timestamp": d.timestamp, "signature": d.signature, "body": d.body}))
        .collect();
    std::fs::write(&file, serde_json::to_vec(&list).expect("json")).expect("write");
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
wh = Webhook(sys.argv[1])
deliveries = json.load(open(sys.argv[2]))
for d in deliveries:
    headers = {"webhook-id": d["id"], "webhook-timestamp": d["timestamp"], "webhook-signature": d["signature"]}
    wh.verify(d["body"], headers)
    try:
        wh.verify(d["body"] + " ", headers)
        sys.exit("a tampered body verified")
    except WebhookVerificationError:
        pass
print("verified", len(deliveries))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, SECRET])
        .arg(&file)
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "standardwebhooks refused a signature: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("verified {}", deliveries.len())
    );
}

async fn deliveries(app: &TestApp, query: &str) -> Vec<Value> {
    let r = app
        .admin(Method::GET, &format!("/webhooks/deliveries{query}"), None)
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    body["deliveries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_is_produced_once_and_verifies_with_the_reference_library() {
    let receiver = Receiver::start(|_| Reply::Status(200)).await;
    let app = TestApp::builder()
        .config_append(&endpoint(&receiver.url(), ALL_EVENTS))
        .config_append(FAST)
        .start()
        .await;
    let user = app.create_user("tiny").await;
    let path = |p: &str| format!("/users/{}/{p}", user.id.as_str());
    assert_eq!(
        app.admin(
            Method::POST,
            &path("block"),
            Some(json!({"reason": "fraud check"}))
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        app.admin(Method::POST, &path("unblock"), None)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.admin(Method::PUT, &path("plan"), Some(json!({"plan": "starter"})))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.admin(Method::PUT, &path("plan"), Some(json!({"plan": "tiny"})))
            .await
            .status(),
        200
    );
    let grant = json!({"user_id": user.id.as_str(), "credits": 50, "reason": "geste commercial"});
    assert_eq!(
        app.admin(Method::POST, "/grant", Some(grant))
            .await
            .status(),
        200
    );

    // 60 credits (10 monthly, 50 bonus) raced for by 300 calls at once:
    // the line is crossed by many batches' charges, the event comes once.
    let statuses =
        futures_util::future::join_all((0..300).map(|_| app.call(&user.key, "/rag/q"))).await;
    let ok = statuses.iter().filter(|r| r.status() == 200).count();
    assert_eq!(ok, 60, "exactly the account's credits were spent");
    app.wait_flushed(Duration::from_secs(10)).await;
    receiver.wait_for(7, Duration::from_secs(10)).await;
    // Nothing more trickles in.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = receiver.got();
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for d in &all {
        *kinds.entry(d.kind()).or_default() += 1;
        assert_eq!(d.json()["data"]["user_id"], user.id.as_str(), "{}", d.body);
    }
    let expected: HashMap<String, usize> = [
        ("account.blocked", 1),
        ("account.unblocked", 1),
        ("plan.changed", 2),
        ("credits.granted", 1),
        ("credits.low", 1),
        ("credits.exhausted", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(kinds, expected);
    let ids: std::collections::HashSet<&str> = all.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "every event has its own webhook-id");
    let blocked = all
        .iter()
        .find(|d| d.kind() == "account.blocked")
        .expect("blocked");
    assert_eq!(blocked.json()["data"]["reason"], "fraud check");
    assert_eq!(blocked.json()["data"]["actor"], "admin:ops");
    let low = all.iter().find(|d| d.kind() == "credits.low").expect("low");
    let data = &low.json()["data"];
    let (used, remaining) = (
        data["used"].as_i64().unwrap_or(0),
        data["remaining"].as_i64().unwrap_or(-1),
    );
    assert!(used >= 4 * remaining && remaining >= 0, "past 80 %: {data}");
    verify_with_reference_library(&all);

    let listed = deliveries(&app, "?status=delivered&per_page=200").await;
    assert_eq!(listed.len(), all.len());
    assert!(
        listed
            .iter()
            .all(|d| d["attempts"] == 1 && d["last_status"] == 200)
    );
    assert!(deliveries(&app, "?status=pending").await.is_empty());
    let delivered = common::metric(
        &app,
        "creditgate_webhook_deliveries_total{event=\"plan.changed\",outcome=\"delivered\"}",
    )
    .await;
    assert_eq!(delivered, 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_receiver_gets_the_event_later_with_the_same_id() {
    // 500, 503, timeout-free garbage, 429, then 200.
    let receiver = Receiver::start(|n| match n {
        0 => Reply::Status(500),
        1 => Reply::Status(503),
        2 => Reply::Status(429),
        3 => Reply::Status(301),
        _ => Reply::Status(204),
    })
    .await;
    let app = TestApp::builder()
        .config_append(&endpoint(&receiver.url(), r#"["account.blocked"]"#))
        .config_append(FAST)
        .start()
        .await;
    let user = app.create_user("free").await;
    let r = app
        .admin(
            Method::POST,
            &format!("/users/{}/block", user.id.as_str()),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    let got = receiver.wait_for(5, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 5);
    assert!(
        got.iter().all(|d| d.id == got[0].id),
        "one webhook-id for every attempt"
    );
    assert!(
        got.iter().all(|d| d.body == got[0].body),
        "the same body every time"
    );
    verify_with_reference_library(&got);
    wait_until(
        "the delivery is recorded",
        Duration::from_secs(5),
        || async { deliveries(&app, "?status=delivered").await.len() == 1 },
    )
    .await;
    let d = &deliveries(&app, "").await[0];
    assert_eq!(d["attempts"], 5);
    assert_eq!(d["last_status"], 204);
    assert_eq!(d["event_id"], got[0].id.as_str());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.got().len(), 5, "nothing after the success");
    assert_eq!(
        common::metric(
            &app,
            "creditgate_webhook_deliveries_total{event=\"account.blocked\",outcome=\"retry\"}"
        )
        .await,
        4.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusing_receiver_is_not_retried_until_an_admin_retries() {
    let receiver = Receiver::start(|n| {
        if n == 0 {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let app = TestApp::builder()
        .config_append(&endpoint(&receiver.url(), r#"["plan.changed"]"#))
        .config_append(FAST)
        .start()
        .await;
    let user = app.create_user("free").await;
    let r = app
        .admin(
            Method::PUT,
            &format!("/users/{}/plan", user.id.as_str()),
            Some(json!({"plan": "starter"})),
        )
        .await;
    assert_eq!(r.status(), 200);
    receiver.wait_for(1, Duration::from_secs(10)).await;
    wait_until(
        "the refusal is recorded",
        Duration::from_secs(5),
        || async { deliveries(&app, "?status=failed").await.len() == 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.got().len(), 1, "a 400 is not retried");
    let failed = deliveries(&app, "?status=failed").await;
    assert_eq!(failed[0]["last_status"], 400);
    let id = failed[0]["id"].as_i64().expect("id");

    let r = app
        .admin(
            Method::POST,
            &format!("/webhooks/deliveries/{id}/retry"),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    let got = receiver.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(got[1].id, got[0].id);
    wait_until(
        "delivered after the retry",
        Duration::from_secs(5),
        || async { deliveries(&app, "?status=delivered").await.len() == 1 },
    )
    .await;
    let audit: Value = app
        .admin(Method::GET, "/audit", None)
        .await
        .json()
        .await
        .expect("json");
    assert!(
        audit["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["action"] == "webhook_retry"),
        "{audit}"
    );

    // Bad input changes nothing.
    for (path, status) in [
        ("/webhooks/deliveries/999999/retry", 404),
        ("/webhooks/deliveries/abc/retry", 404),
        ("/webhooks/deliveries/-1/retry", 404),
    ] {
        assert_eq!(
            app.admin(Method::POST, path, None).await.status(),
            status,
            "{path}"
        );
    }
    for query in ["?status=lost", "?per_page=0", "?user_id=%00", "?colour=red"] {
        let r = app
            .admin(Method::GET, &format!("/webhooks/deliveries{query}"), None)
            .await;
        assert_eq!(r.status(), 400, "{query}");
        let code = common::error_code(r).await;
        assert!(code.starts_with("invalid"), "{query}: {code}");
    }
    assert_eq!(
        app.admin(Method::DELETE, "/webhooks/deliveries", None)
            .await
            .status(),
        405
    );
    assert_eq!(receiver.got().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_or_garbage_receiver_holds_up_only_its_own_queue() {
    let hanging = Receiver::start(|_| Reply::Hang).await;
    let garbage = Receiver::start(|_| Reply::Garbage).await;
    let healthy = Receiver::start(|_| Reply::Status(200)).await;
    let events = r#"["account.blocked", "account.unblocked"]"#;
    let app = TestApp::builder()
        .config_append(&endpoint(&hanging.url(), events))
        .config_append(&endpoint(&garbage.url(), events))
        .config_append(&endpoint(&healthy.url(), events))
        .config_append(FAST)
        .start()
        .await;
    let user = app.create_user("free").await;
    let started = std::time::Instant::now();
    for i in 0..10 {
        let action = if i % 2 == 0 { "block" } else { "unblock" };
        let r = app
            .admin(
                Method::POST,
                &format!("/users/{}/{action}", user.id.as_str()),
                None,
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let got = healthy.wait_for(10, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 10);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the healthy receiver waited for the others: {:?}",
        started.elapsed()
    );
    // The hanging one is cut off after timeout_ms and retried.
    wait_until(
        "the hanging receiver's attempts time out",
        Duration::from_secs(10),
        || async {
            deliveries(&app, "?status=pending&per_page=200")
                .await
                .iter()
                .any(|d| {
                    d["endpoint"] == hanging.url().as_str()
                        && d["last_error"]
                            .as_str()
                            .unwrap_or("")
                            .contains("no answer within 1000 ms")
                })
        },
    )
    .await;
    wait_until(
        "the garbage receiver's attempts fail",
        Duration::from_secs(10),
        || async {
            deliveries(&app, "?status=pending&per_page=200")
                .await
                .iter()
                .any(|d| {
                    d["endpoint"] == garbage.url().as_str()
                        && d["attempts"].as_i64().unwrap_or(0) >= 2
                        && d["last_error"].as_str().unwrap_or("").starts_with("http")
                })
        },
    )
    .await;
    assert!(!garbage.got().is_empty() || hanging.got().len() >= 2);
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("health")
            .status(),
        200
    );
    assert_eq!(healthy.got().len(), 10, "each event once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_killed_mid_delivery_delivers_after_restart_with_the_same_id() {
    // The in-process app has no webhooks: only the child process delivers.
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(|n| {
        if n == 0 {
            Reply::Hang
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let config = std::env::temp_dir().join(format!("cg-{}-hooks.toml", app.db.name));
    let text = format!(
        "{}\n{}\n[webhook_delivery]\ntimeout_ms = 1000\nfirst_retry_ms = 100\npoll_ms = 100\n",
        app.config,
        endpoint(&receiver.url(), r#"["account.blocked"]"#)
    );
    std::fs::write(&config, text).expect("config");
    let user = app.create_user("free").await;
    let port = free_port();
    let mut gateway = Gateway::start_with(&app, &config, port, &[]).await;
    let r = app
        .client
        .post(gateway.url(&format!(
            "/api/admin/billing/users/{}/block",
            user.id.as_str()
        )))
        .header("x-admin-key", common::ADMIN_KEY)
        .send()
        .await
        .expect("admin");
    assert_eq!(r.status(), 200);
    let first = receiver.wait_for(1, Duration::from_secs(10)).await;
    gateway.sigkill();
    let killed = std::time::Instant::now();
    let pool = app.pool().await;
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM webhook_deliveries")
            .fetch_one(&pool)
            .await
            .expect("delivery");
    assert_eq!(
        (status.as_str(), attempts),
        ("pending", 1),
        "claimed, not finished"
    );

    let _gateway = Gateway::start_with(&app, &config, free_port(), &[]).await;
    let got = receiver.wait_for(2, Duration::from_secs(15)).await;
    assert_eq!(
        got[1].id, first[0].id,
        "the same webhook-id after the restart"
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "not before the lease ran out"
    );
    wait_until("delivered", Duration::from_secs(5), || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM webhook_deliveries")
            .fetch_one(&pool)
            .await
            .is_ok_and(|s| s == "delivered")
    })
    .await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(events, 1);
    verify_with_reference_library(&got);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_deliver_each_event_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let receiver = Receiver::start_on(listener, Arc::new(|_| Reply::Status(200)));
    let app = TestApp::builder()
        .config_append(&endpoint(
            &receiver.url(),
            r#"["account.blocked", "account.unblocked"]"#,
        ))
        .config_append(FAST)
        .start()
        .await;
    let (second, _stop) = app.second_instance().await;
    let users = futures_util::future::join_all((0..4).map(|_| app.create_user("free"))).await;
    let mut calls = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for j in 0..10 {
            let action = if j % 2 == 0 { "block" } else { "unblock" };
            let base = if (i + j) % 2 == 0 {
                app.url("")
            } else {
                format!("http://{second}")
            };
            calls.push(
                app.client
                    .post(format!(
                        "{base}/api/admin/billing/users/{}/{action}",
                        user.id.as_str()
                    ))
                    .header("x-admin-key", common::ADMIN_KEY)
                    .send(),
            );
        }
    }
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.expect("admin").status(), 200);
    }
    receiver.wait_for(40, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let all = receiver.got();
    assert_eq!(all.len(), 40);
    let ids: std::collections::HashSet<&str> = all.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids.len(),
        40,
        "each event delivered once by one of the instances"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_flush_produces_each_event_once() {
    let receiver = Receiver::start(|_| Reply::Status(200)).await;
    let app = TestApp::builder()
        .env("CREDITGATE_LEDGER__FLUSHER", "false")
        .config_append(&endpoint(&receiver.url(), ALL_EVENTS))
        .config_append(FAST)
        .start()
        .await;
    let user = app.create_user("tiny").await;
    let grant = json!({"user_id": user.id.as_str(), "credits": 5, "reason": "test"});
    assert_eq!(
        app.admin(Method::POST, "/grant", Some(grant))
            .await
            .status(),
        200
    );
    for _ in 0..15 {
        assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    }
    let first = app.flusher("a").await;
    first
        .crash_after_next_commit()
        .store(true, Ordering::SeqCst);
    // A hang guard, not a timing: on a loaded box a few failed reads
    // back the flusher off (100 ms doubling to 5 s) before it commits.
    tokio::time::timeout(Duration::from_secs(30), first.run(std::future::pending()))
        .await
        .expect("the injected crash stops the flusher");
    assert!(app.backlog().await > 0, "committed but not acknowledged");
    let mut second = app.flusher("b").await;
    second.drain().await.expect("drain");
    let pool = app.pool().await;
    let kinds: Vec<(String, i64)> =
        sqlx::query_as("SELECT type, count(*) FROM webhook_events GROUP BY type ORDER BY type")
            .fetch_all(&pool)
            .await
            .expect("events");
    assert_eq!(
        kinds,
        vec![
            ("credits.exhausted".to_owned(), 1),
            ("credits.granted".to_owned(), 1),
            ("credits.low".to_owned(), 1),
        ]
    );
    let got = receiver.wait_for(3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);
    app.assert_verify_clean();

    // Retention: finished events older than keep_days go, with their
    // deliveries; a pending one stays whatever its age.
    wait_until("all delivered", Duration::from_secs(5), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'",
        )
        .fetch_one(&pool)
        .await
        .is_ok_and(|n| n == 0)
    })
    .await;
    sqlx::query("UPDATE webhook_events SET created_at = now() - interval '40 days'")
        .execute(&pool)
        .await
        .expect("age");
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now() + interval '1 hour'
         WHERE event_id =
            (SELECT id FROM webhook_events WHERE type = 'credits.low')",
    )
    .execute(&pool)
    .await
    .expect("pending");
    let pruned = creditgate::webhooks::deliver::prune(&pool, 30)
        .await
        .expect("prune");
    assert_eq!(pruned, 2);
    let left: Vec<String> = sqlx::query_scalar("SELECT type FROM webhook_events")
        .fetch_all(&pool)
        .await
        .expect("left");
    assert_eq!(left, vec!["credits.low".to_owned()]);
    assert_eq!(
        creditgate::webhooks::deliver::prune(&pool, 30)
            .await
            .expect("prune"),
        0
    );
}

#[test]
fn a_bad_webhook_config_is_refused_at_start_naming_the_key() {
    let cases = [
        (
            "url = \"hooks.example/x\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"plan.changed\"]",
            "webhooks[0].url",
        ),
        (
            "url = \"https://hooks.example/x\"\nsecret = \"hunter2\"\nevents = [\"plan.changed\"]",
            "webhooks[0].secret",
        ),
        (
            "url = \"https://hooks.example/x\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"credits.stolen\"]",
            "webhooks[0].events",
        ),
    ];
    for (entry, key) in cases {
        let config = format!(
            "{}\n[[webhooks]]\n{entry}\n",
            common::TEST_CONFIG
                .replace("{UP}", "http://127.0.0.1:1")
                .replace("{DEAD}", "http://127.0.0.1:1")
                .replace("{REDIS}", "redis://127.0.0.1:1")
                .replace("{DB}", "postgres://postgres@127.0.0.1:1/x")
        );
        let path = std::env::temp_dir().join(format!("cg-badhook-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, config).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .output()
            .expect("run");
        let _ = std::fs::remove_file(&path);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
}

/// A test CA and a `localhost` certificate it signed, made with openssl:
/// (the CA's PEM path, the server's acceptor).
fn test_pki(dir: &std::path::Path) -> (std::path::PathBuf, tokio_rustls::TlsAcceptor) {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=creditgate test CA",
        "-days",
        "2",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("leaf.pem"))
        .expect("leaf")
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(dir.join("leaf.key")).expect("key");
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    (
        dir.join("ca.pem"),
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn https_endpoints_are_delivered_only_to_a_trusted_certificate() {
    let app = TestApp::spawn().await;
    let dir = std::env::temp_dir().join(format!("cg-{}-pki", app.db.name));
    let (ca, acceptor) = test_pki(&dir);
    let receiver = Receiver::start_tls(acceptor).await;
    let url = format!("https://localhost:{}/hooks", receiver.addr.port());
    let config = dir.join("hooks.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n{}\n{FAST}",
            app.config,
            endpoint(&url, r#"["account.blocked"]"#)
        ),
    )
    .expect("config");
    let user = app.create_user("free").await;
    let pool = app.pool().await;

    // A gateway that does not trust the test CA refuses the receiver.
    let empty = dir.join("no-roots.pem");
    std::fs::write(&empty, "").expect("empty");
    let empty = empty.to_string_lossy().into_owned();
    let mut untrusting = Gateway::start_with(
        &app,
        &config,
        free_port(),
        &[("SSL_CERT_FILE", empty.as_str())],
    )
    .await;
    let r = app
        .client
        .post(untrusting.url(&format!(
            "/api/admin/billing/users/{}/block",
            user.id.as_str()
        )))
        .header("x-admin-key", common::ADMIN_KEY)
        .send()
        .await
        .expect("admin");
    assert_eq!(r.status(), 200);
    wait_until(
        "a TLS failure is recorded",
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, Option<String>>("SELECT last_error FROM webhook_deliveries")
                .fetch_one(&pool)
                .await
                .ok()
                .flatten()
                .is_some_and(|e| e.starts_with("tls"))
        },
    )
    .await;
    untrusting.sigkill();
    assert!(
        receiver.got().is_empty(),
        "nothing reached an untrusted receiver"
    );

    // One that trusts it delivers, with the same id the first one signed.
    let ca = ca.to_string_lossy().into_owned();
    let _trusting = Gateway::start_with(
        &app,
        &config,
        free_port(),
        &[("SSL_CERT_FILE", ca.as_str())],
    )
    .await;
    let got = receiver.wait_for(1, Duration::from_secs(15)).await;
    verify_with_reference_library(&got);
    wait_until("delivered over https", Duration::from_secs(5), || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM webhook_deliveries")
            .fetch_one(&pool)
            .await
            .is_ok_and(|s| s == "delivered")
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
