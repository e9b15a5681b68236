//! Operations: metrics, dashboards and alerts, health, graceful shutdown,
//! logs without secrets, deployment files.

use crate::common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::chaos::ChaosProxy;
use common::process::Gateway;
use common::{ADMIN_KEY, SERVICE_KEY, TestApp, free_port, wait_until};
use creditgate::telemetry::metrics;
use futures_util::StreamExt;

/// The value of one sample line `name{labels} value` in exposition text.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `/metrics` once the flusher has recorded at least `flushed` events
/// (the counter moves just after the streams empty).
async fn metrics_after_flush(app: &TestApp, flushed: f64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        if sample(&text, metrics::LEDGER_FLUSHED, &[]).is_some_and(|n| n >= flushed) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ledger metrics never moved:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).expect("stdin");
    }
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_known_sequence_exactly_and_pass_promtool() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    for _ in 0..3 {
        assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    }
    assert_eq!(app.call(&user.key, "/rag/status/500").await.status(), 500);
    assert_eq!(app.call(&user.key, "/legal/q").await.status(), 403);
    assert_eq!(app.call(&user.key, "/park/q").await.status(), 200);
    let text = metrics_after_flush(&app, 6.0).await; // 4 charges, 1 refund, 1 more charge
    let req = |module, outcome| {
        sample(
            &text,
            metrics::REQUESTS,
            &[("module", module), ("outcome", outcome)],
        )
    };
    assert_eq!(req("rag", "ok"), Some(3.0), "{text}");
    assert_eq!(req("rag", "upstream_5xx"), Some(1.0));
    assert_eq!(req("legal", "module_not_in_plan"), Some(1.0));
    assert_eq!(req("park", "ok"), Some(1.0));
    let charged = |module| {
        sample(
            &text,
            metrics::CREDITS_CHARGED,
            &[("module", module), ("plan", "free")],
        )
    };
    assert_eq!(charged("rag"), Some(4.0));
    assert_eq!(charged("park"), Some(2.0));
    assert_eq!(
        sample(
            &text,
            metrics::CREDITS_REFUNDED,
            &[("module", "rag"), ("plan", "free")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &format!("{text}\n"),
            &format!("{}_count", metrics::REQUEST_DURATION),
            &[("module", "rag")]
        ),
        Some(4.0)
    );
    assert!(
        sample(
            &text,
            &format!("{}_count", metrics::REDIS_SCRIPT_DURATION),
            &[("script", "charge")]
        )
        .is_some_and(|n| n >= 6.0)
    );
    assert_eq!(sample(&text, metrics::REDIS_ERRORS, &[]), Some(0.0));
    // Sequential calls reuse one pooled keep-alive connection per module.
    let open = |module| sample(&text, metrics::UPSTREAM_CONNECTIONS, &[("module", module)]);
    assert_eq!((open("rag"), open("park")), (Some(1.0), Some(1.0)));
    assert!(text.contains(&format!(
        "{}_bucket{{module=\"rag\",le=\"0.005\"}}",
        metrics::REQUEST_DURATION
    )));
    for forbidden in [user.id.as_str(), "/rag/q"] {
        assert!(
            !text.contains(forbidden),
            "label value {forbidden} leaked into metrics"
        );
    }
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(ok, "promtool check metrics: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_can_listen_on_their_own_port() {
    let port = free_port();
    let mut app = TestApp::builder()
        .env(
            "CREDITGATE_SERVER__METRICS_LISTEN",
            &format!("127.0.0.1:{port}"),
        )
        .start()
        .await;
    let client = app.client.clone();
    wait_until("the metrics listener", Duration::from_secs(5), || {
        let client = client.clone();
        async move {
            client
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    let other = app
        .client
        .get(format!("http://127.0.0.1:{port}/rag/q"))
        .send()
        .await
        .expect("send");
    assert_eq!(other.status(), 404);

    // With a metrics port, the public port keeps /metrics and the
    // dependencies' details to itself.
    let public = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("send");
    assert_eq!(public.status(), 404);
    app.redis.kill();
    let public = app.get_json("/readyz").await;
    assert_eq!(public, serde_json::json!({"status": "not_ready"}));
    let detailed = app
        .client
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .expect("send");
    assert_eq!(detailed.status(), 503);
    let detailed: serde_json::Value = detailed.json().await.expect("json");
    assert_eq!(detailed["checks"]["database"], "ok");
    let redis = detailed["checks"]["redis"].as_str().unwrap_or("");
    assert!(redis.contains("redis"), "operators see the error: {redis}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_public_readyz_never_echoes_dependency_errors() {
    let mut app = TestApp::spawn().await;
    app.redis.kill();
    let body = app.get_json("/readyz").await;
    assert_eq!(
        body,
        serde_json::json!({
            "status": "not_ready",
            "checks": {"redis": "unavailable", "database": "ok"},
        })
    );
}

/// Metric names an expression mentions, without histogram suffixes.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("creditgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_count", "_sum"] {
            name = name.strip_suffix(suffix).unwrap_or(name);
        }
        names.insert(name.to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboards_and_alerts_use_only_metrics_the_gateway_exports() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard =
        std::fs::read_to_string(format!("{root}/deploy/grafana/dashboards/creditgate.json"))
            .expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut exprs = String::new();
    for panel in json["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push_str(target["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    let alerts =
        std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).expect("alerts");
    let used: BTreeSet<String> = referenced(&exprs)
        .into_iter()
        .chain(referenced(&alerts))
        .collect();
    assert!(used.len() >= 10, "{used:?}");

    // Exported means: in the code's list, and present on /metrics of a
    // gateway that served a little traffic.
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    app.call(&user.key, "/rag/q").await;
    app.call(&user.key, "/rag/status/500").await;
    let text = metrics_after_flush(&app, 3.0).await;
    for name in &used {
        assert!(
            metrics::ALL.contains(&name.as_str()),
            "{name} is not a metric the gateway defines"
        );
        assert!(
            text.contains(&format!("\n{name}")) || text.starts_with(name.as_str()),
            "{name} absent from /metrics"
        );
    }
    let (ok, out) = promtool(
        &[
            "check",
            "rules",
            &format!("{root}/deploy/prometheus/alerts.yml"),
        ],
        None,
    );
    assert!(ok, "{out}");
    let (ok, out) = promtool(
        &[
            "check",
            "config",
            &format!("{root}/deploy/prometheus/prometheus.yml"),
        ],
        None,
    );
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_names_what_is_down_and_recovers() {
    let chaos = ChaosProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let mut app = TestApp::builder().database_via(chaos.addr).start().await;
    let ready = |app: &TestApp| {
        let client = app.client.clone();
        let url = app.url("/readyz");
        async move {
            let r = client.get(url).send().await.expect("send");
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.expect("json"))
        }
    };
    let (status, body) = ready(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["checks"],
        serde_json::json!({"redis": "ok", "database": "ok"})
    );

    chaos.break_networking();
    let (status, body) = ready(&app).await;
    assert_eq!(status, 503);
    assert_ne!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["redis"], "ok");
    chaos.restore_networking();
    wait_until(
        "readyz after Postgres returns",
        Duration::from_secs(10),
        || {
            let r = ready(&app);
            async move { r.await.0 == 200 }
        },
    )
    .await;

    app.redis.kill();
    let (status, body) = ready(&app).await;
    assert_eq!(status, 503);
    assert_ne!(body["checks"]["redis"], "ok");
    app.redis.restart().await;
    wait_until(
        "readyz after Redis returns",
        Duration::from_secs(10),
        || {
            let r = ready(&app);
            async move { r.await.0 == 200 }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_streaming_response_finish_then_flushes_the_ledger() {
    let app = TestApp::builder()
        .env("CREDITGATE_LEDGER__FLUSHER", "false")
        .start()
        .await;
    let user = app.create_user("free").await;
    // A long block so only the shutdown drain can flush the events in time.
    let mut gateway = Gateway::start(
        &app,
        free_port(),
        &[("CREDITGATE_LEDGER__BLOCK_MS", "30000")],
    )
    .await;
    let r = app
        .client
        .get(gateway.url("/rag/drip"))
        .bearer_auth(&user.key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.expect("chunk").expect("bytes");
    assert_eq!(&first[..], b"chunk 0\n");

    gateway.sigterm();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.expect("the stream completes"));
    }
    assert_eq!(rest, b"chunk 1\nchunk 2\nchunk 3\n");
    let status = gateway.exit_status(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status:?}");
    // New connections are refused once it is gone.
    assert!(
        app.client
            .get(gateway.url("/healthz"))
            .send()
            .await
            .is_err()
    );

    let pool = app.pool().await;
    let charges: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_events WHERE kind = 'charge' AND user_id = $1",
    )
    .bind(user.id.as_str())
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(charges, 1, "the charge reached Postgres before exit");
    assert_eq!(app.backlog().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_never_contain_key_material() {
    let app = TestApp::builder()
        .env("CREDITGATE_LEDGER__FLUSHER", "false")
        .start()
        .await;
    let user = app.create_user("starter").await;
    let mut gateway = Gateway::start(
        &app,
        free_port(),
        &[
            ("RUST_LOG", "trace,hyper=debug,h2=off"),
            ("CREDITGATE_LOG__FORMAT", "json"),
        ],
    )
    .await;
    let c = &app.client;
    let _ = c
        .get(gateway.url("/rag/q"))
        .bearer_auth(&user.key)
        .send()
        .await;
    let _ = c
        .get(gateway.url("/rag/q"))
        .header("x-api-key", &user.key)
        .send()
        .await;
    let _ = c
        .get(gateway.url("/rag/q"))
        .bearer_auth("cg_wrong_key_material_1234")
        .send()
        .await;
    let _ = c
        .get(gateway.url("/api/billing/me"))
        .bearer_auth(&user.key)
        .send()
        .await;
    let _ = c
        .get(gateway.url("/api/admin/billing/users"))
        .header("x-admin-key", ADMIN_KEY)
        .send()
        .await;
    let _ = c
        .get(gateway.url("/api/admin/billing/users"))
        .header("x-admin-key", "wrong-admin-key-material")
        .send()
        .await;
    let _ = c
        .post(gateway.url("/api/credits/check"))
        .header("x-service-key", SERVICE_KEY)
        .json(&serde_json::json!({"user_id": user.id.as_str(), "module": "rag"}))
        .send()
        .await;
    let created = c
        .post(gateway.url("/api/admin/billing/users"))
        .header("x-admin-key", ADMIN_KEY)
        .json(&serde_json::json!({"name": "Logged", "plan": "free"}))
        .send()
        .await
        .expect("send")
        .json::<serde_json::Value>()
        .await
        .expect("json");
    let new_key = created["api_key"].as_str().expect("key").to_owned();
    gateway.sigterm();
    let _ = gateway.exit_status(Duration::from_secs(20)).await;
    let logs = gateway.logs();
    assert!(
        logs.lines().count() > 10,
        "too few log lines to mean anything:\n{logs}"
    );
    assert!(
        logs.contains("\"request_id\""),
        "JSON logs with request ids expected"
    );
    for secret in [
        user.key.as_str(),
        &user.key[3..],
        new_key.as_str(),
        ADMIN_KEY,
        SERVICE_KEY,
        "cg_wrong_key_material_1234",
        "wrong-admin-key-material",
    ] {
        assert!(
            !logs.contains(secret),
            "key material {secret} found in the logs"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn access_lines_go_to_a_file_without_colour_codes_and_can_be_switched_off() {
    let app = TestApp::builder()
        .env("CREDITGATE_LEDGER__FLUSHER", "false")
        .start()
        .await;
    let user = app.create_user("starter").await;
    for (access, expected) in [("true", 2), ("false", 0)] {
        let mut gateway = Gateway::start(
            &app,
            free_port(),
            &[("CREDITGATE_LOG__ACCESS", access), ("RUST_LOG", "info")],
        )
        .await;
        for _ in 0..2 {
            let r = app
                .client
                .get(gateway.url("/rag/q"))
                .bearer_auth(&user.key)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
        }
        gateway.sigterm();
        let _ = gateway.exit_status(Duration::from_secs(20)).await;
        let logs = gateway.logs();
        assert!(logs.contains("creditgate listening"), "{logs}");
        assert!(!logs.contains('\x1b'), "ANSI codes in a log file:\n{logs}");
        assert_eq!(
            logs.lines().filter(|l| l.contains("proxied")).count(),
            expected,
            "log.access = {access}:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thread_per_core_workers_share_the_port_keep_limits_exact_and_stop_cleanly() {
    let app = TestApp::builder()
        .env("CREDITGATE_LEDGER__FLUSHER", "false")
        .start()
        .await;
    let user = app.create_user("free").await; // 20 credits a day
    let mut gateway = Gateway::start(
        &app,
        free_port(),
        // More runtimes than this machine's cores: `workers` is obeyed,
        // not the core count.
        &[
            ("CREDITGATE_SERVER__RUNTIME", "thread_per_core"),
            ("CREDITGATE_SERVER__WORKERS", "3"),
        ],
    )
    .await;
    let statuses = app
        .burst(&[(gateway.url("/rag/q"), user.key.clone())], 300)
        .await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 20);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 280);
    gateway.sigterm();
    let status = gateway.exit_status(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}\n{}", gateway.logs());
    assert!(gateway.logs().contains("one runtime per core"));
    let listening = gateway.logs().matches("creditgate listening").count();
    assert_eq!(listening, 3, "{}", gateway.logs());
    // The first worker's flusher drained the ledger before exiting.
    assert_eq!(app.backlog().await, 0, "{}", gateway.logs());
    assert_eq!(app.balance(&user.id).await, (80, 0, 20));
}

#[test]
fn the_compose_file_validates_where_docker_compose_exists() {
    let root = env!("CARGO_MANIFEST_DIR");
    let compose =
        std::fs::read_to_string(format!("{root}/docker-compose.yml")).expect("compose file");
    for service in [
        "creditgate:",
        "cron:",
        "creditgate reset-monthly",
        "redis:",
        "postgres:",
        "prometheus:",
        "grafana:",
        "appendonly",
    ] {
        assert!(
            compose.contains(service),
            "{service} missing from docker-compose.yml"
        );
    }
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("USER 10001") && dockerfile.contains("HEALTHCHECK"));
    let has_compose = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_compose {
        println!("SKIPPED docker compose config: the docker compose plugin is not installed here");
        return;
    }
    let out = Command::new("docker")
        .args(["compose", "--env-file", ".env.example", "config", "--quiet"])
        .current_dir(root)
        .output()
        .expect("docker compose");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Paths the build reads at compile time (`include_str!`, `include_bytes!`,
/// `sqlx::migrate!`), relative to the repository.
fn embedded_paths(root: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source");
            for (marker, relative_to_file) in [
                ("include_str!(\"", true),
                ("include_bytes!(\"", true),
                ("sqlx::migrate!(\"", false),
            ] {
                for piece in text.split(marker).skip(1) {
                    let Some(arg) = piece.split('"').next() else {
                        continue;
                    };
                    let base = if relative_to_file {
                        path.parent().expect("parent").to_path_buf()
                    } else {
                        root.to_path_buf()
                    };
                    let full = base.join(arg);
                    let mut parts: Vec<String> = Vec::new();
                    for c in full
                        .strip_prefix(root)
                        .expect("inside the repo")
                        .components()
                    {
                        match c {
                            std::path::Component::ParentDir => {
                                parts.pop();
                            }
                            std::path::Component::Normal(p) => {
                                parts.push(p.to_string_lossy().into_owned())
                            }
                            _ => {}
                        }
                    }
                    found.push(parts.join("/"));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn the_docker_build_copies_every_file_the_build_embeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let build_stage = dockerfile
        .split("\nFROM ")
        .find(|stage| stage.contains("cargo build"))
        .expect("a build stage");
    let copied: Vec<&str> = build_stage
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len().saturating_sub(1)].to_vec()
        })
        .collect();
    let ignored: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    let under = |path: &str, dir: &str| path == dir || path.starts_with(&format!("{dir}/"));
    let embedded = embedded_paths(root);
    assert!(
        embedded.iter().any(|p| p.starts_with("web/")) && embedded.contains(&"migrations".into()),
        "the scan found the panels and migrations: {embedded:?}"
    );
    for path in &embedded {
        assert!(root.join(path).exists(), "{path} does not exist");
        assert!(
            copied.iter().any(|c| under(path, c.trim_end_matches('/'))),
            "{path} is embedded at build time but the Dockerfile does not COPY it"
        );
        assert!(
            !ignored.iter().any(|i| under(path, i)),
            "{path} is embedded at build time but .dockerignore leaves it out"
        );
    }
}
