//! Test harness: every test gets its own redis-server, its own Postgres
//! database, its own stub upstream and its own gateway on port 0.
//! Logs stay silent unless `TEST_LOG` is set.

pub mod chaos;
pub mod cluster;
pub mod process;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use creditgate::config::Settings;
use creditgate::domain::UserId;
use creditgate::startup::Application;
use creditgate::state::AppState;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,creditgate=debug")
            .with_test_writer()
            .try_init();
    }
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `check` until it returns true or the deadline passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---------------------------------------------------------------- Redis

/// A private redis-server on a free port, killed on drop.
pub struct TestRedis {
    pub port: u16,
    child: Option<Child>,
}

impl TestRedis {
    pub async fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            child: None,
        };
        redis.spawn().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let url = self.url();
        wait_until("redis-server to answer", Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                let Ok(client) = redis::Client::open(url) else {
                    return false;
                };
                match client.get_multiplexed_async_connection().await {
                    Ok(mut c) => redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
    }

    /// SIGKILL: the data is gone, like a crash without persistence.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- Postgres

/// A fresh database on the local PostgreSQL, dropped at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

fn pg_base() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl TestDb {
    /// A unique name and URL; the database itself is left to the test
    /// (`creditgate migrate` creates it). Still dropped at the end.
    pub fn named_but_not_created() -> Self {
        let name = format!("cg_test_{}", uuid::Uuid::new_v4().simple());
        let url = format!("{}/{name}", pg_base());
        Self { name, url }
    }

    /// Creates this (named) database without running the migrations.
    pub async fn create_empty(&self) -> sqlx::PgPool {
        let admin = sqlx::PgPool::connect(&format!("{}/postgres", pg_base()))
            .await
            .expect("PostgreSQL");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            self.name
        )))
        .execute(&admin)
        .await
        .expect("create test database");
        admin.close().await;
        sqlx::PgPool::connect(&self.url)
            .await
            .expect("connect test db")
    }

    pub async fn create() -> Self {
        let base = pg_base();
        let name = format!("cg_test_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&format!("{base}/postgres"))
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (set TEST_DATABASE_URL otherwise)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = format!("{base}/{name}");
        let pool = sqlx::PgPool::connect(&url).await.expect("connect test db");
        creditgate::accounts::MIGRATOR
            .run(&pool)
            .await
            .expect("migrations");
        pool.close().await;
        Self { name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------- Upstream

/// One request as the upstream received it: the request target exactly as
/// sent (no normalisation) and every header.
#[derive(Clone, Debug)]
pub struct Captured {
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Captured {
    /// Every value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A stub upstream that counts and captures what reaches it. Behaviour by
/// path: `/.../status/NNN` answers NNN, `/.../slow` sleeps 3 s,
/// `/.../slowfail` answers 500 after 1.5 s, `/.../sse` sends one event then
/// waits for [`Upstream::release`], `/.../echo` returns the request headers
/// and body length as JSON, `/.../unique` a fresh UUID, `/.../big` 100 kB;
/// anything else answers 200 "ok".
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    by_path: Arc<Mutex<HashMap<String, usize>>>,
    captured: Arc<Mutex<Vec<Captured>>>,
    release: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let by_path = Arc::new(Mutex::new(HashMap::new()));
        let captured = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(Notify::new());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (h, p, r) = (hits.clone(), by_path.clone(), release.clone());
        let c = captured.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = &mut stopped => return,
                };
                let (h, p, r, c) = (h.clone(), p.clone(), r.clone(), c.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (h, p, r) = (h.clone(), p.clone(), r.clone());
                        if let Ok(mut all) = c.lock() {
                            all.push(Captured {
                                target: req.uri().to_string(),
                                headers: req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.as_str().to_owned(),
                                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                        )
                                    })
                                    .collect(),
                            });
                        }
                        async move { Ok::<_, std::convert::Infallible>(stub(req, h, p, r).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            hits,
            by_path,
            captured,
            release,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn hits_on(&self, path: &str) -> usize {
        self.by_path
            .lock()
            .map(|m| m.get(path).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Every request received so far, in arrival order.
    pub fn captured(&self) -> Vec<Captured> {
        self.captured.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Lets a waiting `/sse` response send its remaining events and end.
    pub fn release(&self) {
        self.release.notify_waiters();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

async fn stub(
    req: Request<Incoming>,
    hits: Arc<AtomicUsize>,
    by_path: Arc<Mutex<HashMap<String, usize>>>,
    release: Arc<Notify>,
) -> Response<TestBody> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    if let Ok(mut m) = by_path.lock() {
        *m.entry(path.clone()).or_default() += 1;
    }
    if let Some(code) = path.split("/status/").nth(1) {
        let code: u16 = code.parse().unwrap_or(500);
        return full(
            StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
            "status",
        );
    }
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
        return full(StatusCode::OK, "slow");
    }
    if path.ends_with("/slowfail") {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        return full(StatusCode::INTERNAL_SERVER_ERROR, "failed slowly");
    }
    if path.ends_with("/unique") {
        let _ = req.into_body().collect().await;
        let mut r = full(StatusCode::CREATED, uuid::Uuid::new_v4().to_string());
        r.headers_mut()
            .insert("x-upstream", http::HeaderValue::from_static("unique"));
        return r;
    }
    if path.ends_with("/big") {
        return full(StatusCode::OK, vec![b'x'; 100_000]);
    }
    if path.ends_with("/sse") {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let notified = release.clone();
        tokio::spawn(async move {
            let wait = notified.notified();
            let _ = tx
                .send(Ok(Frame::data(Bytes::from("data: first\n\n"))))
                .await;
            wait.await;
            let _ = tx
                .send(Ok(Frame::data(Bytes::from("data: second\n\n"))))
                .await;
        });
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
        r.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("text/event-stream"),
        );
        return r;
    }
    if path.ends_with("/drip") {
        // Four chunks, 250 ms apart: a response that takes a second to stream.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        tokio::spawn(async move {
            for i in 0..4 {
                if tx
                    .send(Ok(Frame::data(Bytes::from(format!("chunk {i}\n")))))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        return Response::new(StreamBody::new(stream).boxed_unsync());
    }
    if path.ends_with("/echo") {
        let headers: HashMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or("<binary>").to_owned(),
                )
            })
            .collect();
        let query = req.uri().query().map(str::to_owned);
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes().len())
            .unwrap_or(0);
        let json =
            serde_json::json!({"path": path, "query": query, "headers": headers, "body_len": body});
        return full(StatusCode::OK, json.to_string());
    }
    // Drain the body so the connection stays reusable.
    let _ = req.into_body().collect().await;
    full(StatusCode::OK, "ok")
}

// ---------------------------------------------------------------- Gateway

pub const ADMIN_KEY: &str = "test-admin-key-0123";
pub const SERVICE_KEY: &str = "test-service-key-0123";

/// The configuration every test starts from; `{UP}`, `{DEAD}`, `{REDIS}`,
/// `{DB}` are replaced with the test's own addresses.
pub const TEST_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
timezone = "Africa/Algiers"
max_body_bytes = 1024
header_read_timeout_ms = 2000

[upstream]
connect_timeout_ms = 500
timeout_ms = 5000

[redis]
url = "{REDIS}"
command_timeout_ms = 300
connect_timeout_ms = 300

[database]
url = "{DB}"

[ledger]
block_ms = 100
claim_idle_ms = 1000
drain_timeout_ms = 5000
consumer = "test"

[auth]
admin_keys = [{ name = "ops", key = "test-admin-key-0123" }]
service_keys = [{ name = "hub", key = "test-service-key-0123" }]

[invoices]
seller = { name = "iaFactory Algérie", address = "Cyberparc, Sidi Abdellah, Alger", nif = "000016001234567", nis = "000016019876543", rc = "16/00-0123456 B 20" }
vat_rate = 0.19

[modules.rag]
prefix = "/rag"
upstream = "{UP}"
cost = 1
label = "Recherche documentaire"
description = "Questions sur vos documents, réponses sourcées"

[modules.legal]
prefix = "/legal"
upstream = "{UP}"
cost = 3
[modules.legal.actions]
draft = 5

[modules.park]
prefix = "/park"
upstream = "{UP}"
cost = 2
timeout_ms = 500

[modules.api]
prefix = "/api/v1"
upstream = "{UP}"
cost = 1
refund_on_5xx = false

[modules.voice]
prefix = "/voice"
upstream = "{DEAD}"
cost = 2

[plans.free]
name = "Free"
monthly_credits = 100
daily_limit = 20
price_dzd = 0
modules = ["rag", "park"]

[plans.starter]
name = "Starter"
monthly_credits = 500
daily_limit = 100
price_dzd = 2000
modules = ["rag", "park", "legal", "voice", "api"]

[plans.tiny]
name = "Tiny"
monthly_credits = 10
price_dzd = 0
modules = ["rag", "legal"]

[plans.limited]
name = "Limited"
monthly_credits = 1000
price_dzd = 0
modules = ["rag"]
rate_limit_per_minute = 30
rate_limit_burst = 5

[plans.enterprise]
name = "Enterprise"
monthly_credits = 100000
price_dzd = 50000
modules = ["rag", "park", "legal", "voice", "api"]
"#;

pub struct TestApp {
    /// The configuration the gateway runs with, addresses filled in.
    pub config: String,
    pub addr: SocketAddr,
    /// Between the gateway and Redis, when built with `redis_via_chaos`.
    pub redis_chaos: Option<Arc<chaos::ChaosProxy>>,
    /// The Redis Cluster the gateway uses instead of `redis`, when built
    /// with `cluster`.
    pub cluster: Option<cluster::TestCluster>,
    pub state: Arc<AppState>,
    pub client: reqwest::Client,
    pub upstream: Upstream,
    pub redis: TestRedis,
    pub db: TestDb,
    /// Held for its drop: the gateway task shuts down when the test's
    /// `TestApp` goes away.
    _stop: oneshot::Sender<()>,
}

pub struct TestAppBuilder {
    config: String,
    env: Vec<(String, String)>,
    database_via: Option<SocketAddr>,
    redis_via_chaos: bool,
    cluster: bool,
}

impl TestAppBuilder {
    /// Applies a `CREDITGATE_*`-style override (exercises the env layer).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Adds TOML at the end of the configuration (`[[webhooks]]`, ...).
    pub fn config_append(mut self, extra: &str) -> Self {
        self.config.push('\n');
        self.config.push_str(extra);
        self
    }

    /// Reach Postgres through this address (a chaos proxy) instead.
    pub fn database_via(mut self, addr: SocketAddr) -> Self {
        self.database_via = Some(addr);
        self
    }

    /// Reach the test's Redis through a chaos proxy ([`TestApp::redis_chaos`]).
    pub fn redis_via_chaos(mut self) -> Self {
        self.redis_via_chaos = true;
        self
    }

    /// Credit leases on, quick to take and short: an account is hot after
    /// 4 charges in a second, a lease holds 20 calls, is granted with 5
    /// leases' room and lasts 300 ms; a lease nobody settles is lost 5 s
    /// after its end. Spend log segments of 4 KiB (about twenty lines), so
    /// that every test crosses segments. The spend log is the test's own directory
    /// ([`TestApp::spend_dir`]). Tune with `CREDITGATE_METERING__LEASES__*`.
    pub fn leases(self) -> Self {
        self.config_append(
            "[metering.leases]\nenabled = true\ndir = \"{SPEND}\"\nafter_calls = 4\n\
             calls = 20\nmax_calls = 40\nroom = 5\nttl_ms = 300\nlost_after_secs = 5\nsegment_bytes = 4096\n",
        )
    }

    /// Run against a private Redis Cluster ([`TestApp::cluster`]).
    pub fn cluster(mut self) -> Self {
        self.cluster = true;
        self
    }

    pub async fn start(self) -> TestApp {
        init_logs();
        let cluster = if self.cluster {
            Some(cluster::TestCluster::start().await)
        } else {
            None
        };
        let (redis, db, upstream) = (
            TestRedis::start().await,
            TestDb::create().await,
            Upstream::start().await,
        );
        let dead = format!("http://127.0.0.1:{}", free_port());
        let redis_chaos = if self.redis_via_chaos {
            let target: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().expect("addr");
            Some(chaos::ChaosProxy::start(target).await)
        } else {
            None
        };
        let redis_url = match (&redis_chaos, &cluster) {
            (Some(c), _) => format!("redis://{}", c.addr),
            (None, Some(cluster)) => cluster.url(),
            (None, None) => redis.url(),
        };
        let db_url = match self.database_via {
            Some(addr) => db.url.replace("127.0.0.1:5432", &addr.to_string()),
            None => db.url.clone(),
        };
        let text = self
            .config
            .replace("{UP}", &upstream.url())
            .replace("{DEAD}", &dead)
            .replace("{REDIS}", &redis_url)
            .replace("{DB}", &db_url)
            .replace("{SPEND}", &spend_dir(&db.name).display().to_string());
        let settings = Settings::from_toml(&text, "test config", self.env).expect("test config");
        let app = Application::build(settings).await.expect("build app");
        let addr: SocketAddr = format!("127.0.0.1:{}", app.port()).parse().expect("addr");
        let state = app.state();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = app
                .run_until_stopped(async {
                    let _ = stopped.await;
                })
                .await;
        });
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        TestApp {
            config: text,
            addr,
            redis_chaos,
            cluster,
            state,
            client,
            upstream,
            redis,
            db,
            _stop: stop,
        }
    }
}

#[derive(Clone)]
pub struct Account {
    pub id: UserId,
    pub key: String,
    pub key_id: uuid::Uuid,
}

/// The spend log directory of the test whose database is `db`.
fn spend_dir(db: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cg-spend-{db}"))
}

impl TestApp {
    /// Where this app's gateways keep their spend logs
    /// ([`TestAppBuilder::leases`]).
    pub fn spend_dir(&self) -> std::path::PathBuf {
        spend_dir(&self.db.name)
    }

    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            config: TEST_CONFIG.to_owned(),
            env: Vec::new(),
            database_via: None,
            redis_via_chaos: false,
            cluster: false,
        }
    }

    pub async fn spawn() -> Self {
        Self::builder().start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn create_user(&self, plan: &str) -> Account {
        let created = self
            .state
            .billing
            .accounts()
            .create_user(creditgate::accounts::NewUser {
                id: None,
                name: "Test User",
                email: None,
                plan,
                actor: "test",
                idempotency: None,
            })
            .await
            .expect("create user");
        let creditgate::accounts::Created::New(user, key) = created else {
            panic!("a replay without an idempotency key");
        };
        Account {
            id: user.id,
            key: key.key.reveal().to_owned(),
            key_id: key.id,
        }
    }

    /// GET through the proxy with the account's key.
    pub async fn call(&self, key: &str, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("request reaches the gateway")
    }

    /// The account's hot state: (monthly, bonus, used today).
    pub async fn balance(&self, user: &UserId) -> (i64, i64, i64) {
        let key = self.state.billing.meter().keys().account(user);
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key).arg("monthly").arg("bonus").arg("used");
        let (m, b, u): (Option<i64>, Option<i64>, Option<i64>) = if self.cluster.is_some() {
            cmd.query_async(&mut self.state.billing.meter().connection())
                .await
        } else {
            cmd.query_async(&mut self.redis.connection().await).await
        }
        .expect("HMGET");
        (m.unwrap_or(-1), b.unwrap_or(-1), u.unwrap_or(-1))
    }

    /// Another gateway instance on the same Redis and Postgres (as a second
    /// replica behind a load balancer would be). Its flusher is off.
    pub async fn second_instance(&self) -> (SocketAddr, oneshot::Sender<()>) {
        let (addr, stop, _running) = self.second_instance_running().await;
        (addr, stop)
    }

    /// The same, with the task that serves it: it ends once the instance
    /// has stopped.
    pub async fn second_instance_running(
        &self,
    ) -> (
        SocketAddr,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let settings = Settings::from_toml(
            &self.config,
            "second instance",
            [("CREDITGATE_LEDGER__FLUSHER".to_owned(), "false".to_owned())],
        )
        .expect("config");
        let app = Application::build(settings).await.expect("build");
        let addr: SocketAddr = format!("127.0.0.1:{}", app.port()).parse().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        (addr, stop, running)
    }

    /// An admin API call with the test admin key.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .request(method, self.url(&format!("/api/admin/billing{path}")))
            .header("x-admin-key", ADMIN_KEY);
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.expect("admin API answers")
    }

    /// A credits API call with the test service key.
    pub async fn service(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.credits_as(Some(SERVICE_KEY), path, body).await
    }

    /// A credits API call with this service key, or none at all.
    pub async fn credits_as(
        &self,
        service_key: Option<&str>,
        path: &str,
        body: serde_json::Value,
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url(&format!("/api/credits{path}")));
        if let Some(key) = service_key {
            req = req.header("x-service-key", key);
        }
        req.json(&body).send().await.expect("credits API answers")
    }

    /// A user API GET with the given key.
    pub async fn user_get(&self, key: &str, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/api/billing{path}")))
            .bearer_auth(key)
            .send()
            .await
            .expect("user API answers")
    }

    /// The user's ledger rows as (kind, amount), oldest first, once the
    /// flusher has emptied the usage streams.
    pub async fn events(&self, user: &UserId) -> Vec<(String, i64)> {
        self.wait_flushed(Duration::from_secs(10)).await;
        let pool = self.pool().await;
        let rows = sqlx::query_as(
            "SELECT kind, amount FROM ledger_events WHERE user_id = $1
             ORDER BY stream_ms, stream_seq",
        )
        .bind(user.as_str())
        .fetch_all(&pool)
        .await
        .expect("ledger rows");
        pool.close().await;
        rows
    }

    /// How many of the user's ledger rows are of `kind`, once flushed.
    pub async fn count_events(&self, user: &UserId, kind: &str) -> usize {
        self.events(user)
            .await
            .iter()
            .filter(|(k, _)| k == kind)
            .count()
    }

    /// GET a path of the gateway (no credentials) and parse its JSON body.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("the gateway answers")
            .json()
            .await
            .expect("a JSON body")
    }

    /// GET through the proxy with the account's key and extra headers.
    pub async fn call_with(
        &self,
        key: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.client.get(self.url(path)).bearer_auth(key);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.send().await.expect("request reaches the gateway")
    }

    /// Sends `n` calls at once, spread over `targets` (url, key), and
    /// returns their statuses (0: no answer).
    pub async fn burst(&self, targets: &[(String, String)], n: usize) -> Vec<u16> {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (url, key) = targets[i % targets.len()].clone();
                let c = self.client.clone();
                tokio::spawn(async move {
                    c.get(url)
                        .bearer_auth(key)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0)
                })
            })
            .collect();
        let mut statuses = Vec::with_capacity(n);
        for t in tasks {
            statuses.push(t.await.expect("task"));
        }
        statuses
    }

    /// `creditgate ledger verify` exits 0 and reports no drift.
    pub fn assert_verify_clean(&self) {
        let out = self.cli(&["ledger", "verify"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ledger verify failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(", 0 drifts"), "{stdout}");
    }

    /// Ledger rows of `kind`, every user.
    pub async fn ledger_rows(&self, kind: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ledger_events WHERE kind = $1")
            .bind(kind)
            .fetch_one(&self.pool().await)
            .await
            .expect("count")
    }

    /// Unflushed entries in the usage streams.
    pub async fn backlog(&self) -> i64 {
        // Through the gateway's own connection: a single Redis or the cluster.
        let con = self.state.billing.meter().connection();
        let streams: Vec<String> = self.state.billing.meter().keys().streams().collect();
        creditgate::ledger::backlog(&con, &streams)
            .await
            .map(|b| b.entries)
            .unwrap_or(-1)
    }

    /// Waits until the in-process flusher has emptied the streams.
    pub async fn wait_flushed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.backlog().await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("ledger backlog not drained: {}", self.backlog().await);
    }

    /// Writes the configuration to a file, for the binary.
    pub fn config_file(&self) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("cg-{}.toml", self.db.name));
        std::fs::write(&path, &self.config).expect("write config");
        path
    }

    /// `creditgate <args>` against this app's Redis and database.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_with_env(args, &[])
    }

    /// [`Self::cli`] with environment overrides.
    pub fn cli_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let config = self.config_file();
        Command::new(env!("CARGO_BIN_EXE_creditgate"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .output()
            .expect("run creditgate")
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.db.url).await.expect("db")
    }

    /// A ledger flusher of this app's configuration, on its Redis and
    /// Postgres, reading as consumer `consumer`.
    pub async fn flusher(&self, consumer: &str) -> creditgate::ledger::Flusher {
        let settings = self.settings();
        let url = settings.redis.url.clone();
        self.flusher_with(settings, consumer, &url).await
    }

    /// The same, reaching Redis at `redis_url` (past the chaos proxy, say).
    pub async fn flusher_on(&self, consumer: &str, redis_url: &str) -> creditgate::ledger::Flusher {
        self.flusher_with(self.settings(), consumer, redis_url)
            .await
    }

    fn settings(&self) -> Settings {
        Settings::from_toml(&self.config, "test", Vec::<(String, String)>::new()).expect("settings")
    }

    async fn flusher_with(
        &self,
        settings: Settings,
        consumer: &str,
        redis_url: &str,
    ) -> creditgate::ledger::Flusher {
        let mut config = creditgate::ledger::FlusherConfig::from_settings(&settings.ledger);
        config.consumer = consumer.into();
        creditgate::ledger::Flusher::new(
            redis_url,
            self.state.billing.meter().keys(),
            self.pool().await,
            config,
        )
        .expect("flusher")
        .with_hook(self.state.billing.outbox().clone())
    }
}

/// Sends raw bytes to `addr` (paths exactly as written, no client-side
/// normalisation) and returns the status line and body of the answer.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// The value of an unlabelled gauge or counter on `/metrics`.
pub async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Reads `{"error": {"code": ...}}` from a response.
pub async fn error_code(response: reqwest::Response) -> String {
    let json: serde_json::Value = response.json().await.expect("JSON error body");
    json["error"]["code"].as_str().unwrap_or("").to_owned()
}
