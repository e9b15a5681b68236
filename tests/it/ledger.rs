//! The durable ledger: every charge and refund reaches Postgres exactly
//! once, whatever crashes, and `ledger verify` proves Redis agrees.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::chaos::ChaosProxy;
use common::process::{Gateway, Load};
use common::{Account, TestApp, free_port, wait_until};
use creditgate::ledger::{reports, store};

/// (request id, status) of every answered request.
type Outcomes = Vec<(String, u16)>;

/// `n` requests over `concurrency` connections, alternating the users and
/// paths given, each with a unique X-Request-Id.
async fn load(app: &TestApp, users: &[Account], paths: &[&str], n: usize) -> Outcomes {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, next) = (app.client.clone(), next.clone());
        let users: Vec<String> = users.iter().map(|u| u.key.clone()).collect();
        let paths: Vec<String> = paths.iter().map(|p| app.url(p)).collect();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return seen;
                }
                let rid = format!("load-{i}");
                let r = client
                    .get(&paths[i % paths.len()])
                    .bearer_auth(&users[i % users.len()])
                    .header("x-request-id", &rid)
                    .send()
                    .await
                    .expect("gateway answers");
                seen.push((rid, r.status().as_u16()));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

/// kind per request id, from the ledger.
async fn ledger_kinds(pool: &sqlx::PgPool) -> HashMap<String, Vec<String>> {
    let rows: Vec<(Option<String>, String)> =
        sqlx::query_as("SELECT request_id, kind FROM ledger_events WHERE kind IN ('charge', 'refund') ORDER BY stream_ms, stream_seq")
            .fetch_all(pool)
            .await
            .expect("ledger rows");
    let mut by_request: HashMap<String, Vec<String>> = HashMap::new();
    for (rid, kind) in rows {
        by_request
            .entry(rid.unwrap_or_default())
            .or_default()
            .push(kind);
    }
    by_request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_requests_land_in_the_ledger_exactly_once() {
    let app = TestApp::spawn().await;
    let mut users = Vec::new();
    for plan in ["enterprise", "enterprise", "starter", "tiny"] {
        users.push(app.create_user(plan).await);
    }
    // rag ok, legal ok (402 for tiny soon), rag 500 (refunded), voice down (refunded).
    let paths = ["/rag/q", "/legal/ask", "/rag/status/500", "/voice/x"];
    let outcomes = load(&app, &users, &paths, 3000).await;
    app.wait_flushed(Duration::from_secs(30)).await;

    let pool = app.pool().await;
    let ledger = ledger_kinds(&pool).await;
    let mut expected_rows = 0;
    for (rid, status) in &outcomes {
        let kinds = ledger.get(rid).cloned().unwrap_or_default();
        let expected: &[&str] = match status {
            200 => &["charge"],
            500 | 502 => &["charge", "refund"],
            402 | 403 | 429 => &[],
            other => panic!("unexpected status {other} for {rid}"),
        };
        assert_eq!(kinds, expected, "{rid} answered {status}");
        expected_rows += expected.len();
    }
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_events WHERE kind IN ('charge', 'refund')")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(total as usize, expected_rows);
    assert!(outcomes.iter().filter(|(_, s)| *s == 200).count() > 1000);
    // Aggregates equal the sum of rows (and Redis the ledger): verify.
    let agg: i64 =
        sqlx::query_scalar("SELECT COALESCE(SUM(charges + refunds), 0)::bigint FROM usage_daily")
            .fetch_one(&pool)
            .await
            .expect("agg");
    assert_eq!(agg as usize, expected_rows);
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_committed_but_not_acknowledged_is_not_inserted_twice() {
    let app = TestApp::builder()
        .env("CREDITGATE_LEDGER__FLUSHER", "false")
        .start()
        .await;
    let user = app.create_user("enterprise").await;
    for _ in 0..25 {
        assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    }
    assert_eq!(app.backlog().await, 25);
    let pool = app.pool().await;
    let first = app.flusher("a").await;
    first
        .crash_after_next_commit()
        .store(true, Ordering::SeqCst);
    // Returns by itself: committed, then "crashed" before XACK.
    // A hang guard, not a timing: on a loaded box a few failed reads
    // back the flusher off (100 ms doubling to 5 s) before it commits.
    tokio::time::timeout(Duration::from_secs(30), first.run(std::future::pending()))
        .await
        .expect("the injected crash stops the flusher");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 25, "the batch was committed");
    assert_eq!(app.backlog().await, 25, "but not acknowledged");

    let mut second = app.flusher("b").await;
    let stats = second.stats();
    assert_eq!(second.drain().await.expect("drain"), 25);
    assert_eq!(stats.flushed_total.load(Ordering::SeqCst), 0);
    assert_eq!(stats.duplicates_total.load(Ordering::SeqCst), 25);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 25);
    let charges: i64 = sqlx::query_scalar("SELECT charges FROM usage_daily")
        .fetch_one(&pool)
        .await
        .expect("aggregate");
    assert_eq!(charges, 25, "aggregates not double counted");
    assert_eq!(app.backlog().await, 0);
    app.assert_verify_clean();
}

/// An entry nobody can read is kept in `ledger_rejects` with its fields,
/// acknowledged, and never stops the events after it.
#[tokio::test]
async fn an_unreadable_entry_is_kept_aside_and_the_stream_goes_on() {
    let app = TestApp::builder()
        .env("CREDITGATE_LEDGER__FLUSHER", "false")
        .start()
        .await;
    let user = app.create_user("enterprise").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let stream = app.state.billing.meter().keys().stream_of(&user.id);
    let mut con = app.redis.connection().await;
    let bad: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("v")
        .arg("{not json")
        .arg("x")
        .arg("1")
        .query_async(&mut con)
        .await
        .expect("XADD");
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let pool = app.pool().await;
    let mut flusher = app.flusher("reader").await;
    assert_eq!(flusher.drain().await.expect("drain"), 3);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_events WHERE kind = 'charge'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 2, "both charges around the bad entry are stored");
    let (entry, fields, error): (String, serde_json::Value, String) =
        sqlx::query_as("SELECT entry_id, fields, error FROM ledger_rejects WHERE stream = $1")
            .bind(&stream)
            .fetch_one(&pool)
            .await
            .expect("reject");
    assert_eq!(entry, bad);
    assert_eq!(fields, serde_json::json!({"v": "{not json", "x": "1"}));
    assert!(error.starts_with("field v:"), "{error}");
    assert_eq!(app.backlog().await, 0, "the bad entry is acknowledged too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_for_20s_refuses_nothing_and_the_backlog_drains_after() {
    let chaos = ChaosProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let app = TestApp::builder().database_via(chaos.addr).start().await;
    let users = [
        app.create_user("enterprise").await,
        app.create_user("enterprise").await,
    ];
    for u in &users {
        assert_eq!(app.call(&u.key, "/rag/q").await.status(), 200); // warm caches
    }
    app.wait_flushed(Duration::from_secs(10)).await;

    chaos.break_networking();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (client, url, key, stop) = (
            app.client.clone(),
            app.url("/rag/q"),
            users[w % 2].key.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let r = client
                    .get(&url)
                    .bearer_auth(&key)
                    .send()
                    .await
                    .expect("send");
                statuses.push(r.status().as_u16());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    let backlog_during = app.backlog().await;
    chaos.restore_networking();
    stop.store(true, Ordering::SeqCst);
    let mut served = 0;
    for t in tasks {
        let statuses = t.await.expect("task");
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        served += statuses.len();
    }
    assert!(started.elapsed() >= Duration::from_secs(20));
    assert!(served > 100, "only {served} requests during the outage");
    assert!(backlog_during > 0, "events waited in Redis");

    app.wait_flushed(Duration::from_secs(30)).await;
    let pool = app.pool().await;
    let charges: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_events WHERE kind = 'charge'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(charges as usize, served + 2);
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_empty_rebuilds_balances_and_day_counters_from_the_ledger() {
    let mut app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    for _ in 0..5 {
        assert_eq!(app.call(&user.key, "/park/q").await.status(), 200); // 2 credits each
    }
    app.wait_flushed(Duration::from_secs(10)).await;
    app.redis.restart().await; // empty: no persistence

    let (client, url, key) = (app.client.clone(), app.url("/rag/q"), user.key.clone());
    wait_until(
        "service after the Redis restart",
        Duration::from_secs(10),
        || {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            async move {
                client
                    .get(url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        },
    )
    .await;
    // 100 - 5*2 - 1 = 89 monthly; day counter 10 + 1.
    assert_eq!(app.balance(&user.id).await, (89, 0, 11));
    app.wait_flushed(Duration::from_secs(10)).await;
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_balance_changed_behind_the_gateways_back_is_reported_as_drift() {
    let app = TestApp::spawn().await;
    let honest = app.create_user("free").await;
    let tampered = app.create_user("free").await;
    for u in [&honest, &tampered] {
        assert_eq!(app.call(&u.key, "/rag/q").await.status(), 200);
    }
    app.wait_flushed(Duration::from_secs(10)).await;
    app.assert_verify_clean();

    let mut con = app.redis.connection().await;
    let _: () = redis::cmd("HSET")
        .arg(app.state.billing.meter().keys().account(&tampered.id))
        .arg("monthly")
        .arg(5000)
        .query_async(&mut con)
        .await
        .expect("HSET");
    let out = app.cli(&["ledger", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("DRIFT user={}", tampered.id)),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&format!("DRIFT user={}", honest.id)),
        "{stdout}"
    );
    assert!(stdout.contains("1 drifts"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn history_is_served_from_the_ledger_aggregates() {
    let app = TestApp::spawn().await;
    let user = app.create_user("starter").await;
    for path in ["/rag/a", "/rag/b", "/legal/c", "/rag/status/500"] {
        app.call(&user.key, path).await;
    }
    app.wait_flushed(Duration::from_secs(10)).await;
    let pool = app.pool().await;
    let today = app.state.billing.calendar().now().day;
    let from = today.date();
    let days = reports::usage_by_day(&pool, Some(&user.id), from)
        .await
        .expect("days");
    assert_eq!(days.len(), 1);
    assert_eq!((days[0].credits, days[0].requests), (5, 3));
    assert_eq!(days[0].by_module.get("legal"), Some(&3));
    let totals = reports::totals_by_module(&pool, &user.id, from)
        .await
        .expect("totals");
    let rag = totals.iter().find(|t| t.module == "rag").expect("rag");
    assert_eq!((rag.credits, rag.requests), (2, 2));
    let (page, total) = reports::transactions(&pool, &user.id, 2, 0)
        .await
        .expect("page");
    assert_eq!(total, 5); // 4 charges + 1 refund
    assert_eq!(page.len(), 2);
    assert_eq!(page[0].kind, "refund"); // newest first
}

// ------------------------------------------------------------ SIGKILL

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_load_loses_no_event_and_duplicates_none() {
    // The in-process gateway only serves as a harness; its flusher is off
    // so the process under test does all the flushing.
    let app = TestApp::builder()
        .env("CREDITGATE_LEDGER__FLUSHER", "false")
        .start()
        .await;
    let users = [
        app.create_user("enterprise").await,
        app.create_user("enterprise").await,
    ];
    let port = free_port();
    let mut gateway = Gateway::start(&app, port, &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let keys: Vec<String> = users.iter().map(|u| u.key.clone()).collect();
    let mut load = Load::start(&app.client, port, &keys, &stop);
    let (ok, failed) = (load.ok.clone(), load.failed.clone());
    let count = |ok: &Arc<std::sync::Mutex<Vec<String>>>| ok.lock().map(|v| v.len()).unwrap_or(0);
    wait_until("load before the kill", Duration::from_secs(20), || {
        let n = count(&ok);
        async move { n >= 400 }
    })
    .await;
    gateway.sigkill();
    let before = count(&ok);
    gateway = Gateway::start(&app, port, &[]).await;
    wait_until("load after the restart", Duration::from_secs(20), || {
        let n = count(&ok);
        async move { n >= before + 300 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    load.join().await;
    wait_until(
        "the restarted gateway's flusher to drain",
        Duration::from_secs(30),
        || {
            let app = &app;
            async move { app.backlog().await == 0 }
        },
    )
    .await;
    drop(gateway);

    let pool = app.pool().await;
    let ledger = ledger_kinds(&pool).await;
    let ok = ok.lock().expect("lock").clone();
    for rid in &ok {
        assert_eq!(
            ledger.get(rid).map(Vec::as_slice),
            Some(&["charge".to_owned()][..]),
            "{rid}"
        );
    }
    let duplicated: Vec<_> = ledger.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(duplicated.is_empty(), "{duplicated:?}");
    // Charged but unanswered: only requests cut off by the kill.
    let charged = ledger.len();
    let lost_answers = failed.load(Ordering::SeqCst);
    assert!(
        charged >= ok.len() && charged - ok.len() <= lost_answers,
        "{charged} {} {lost_answers}",
        ok.len()
    );
    assert!(app.upstream.hits() >= ok.len() && app.upstream.hits() <= charged);
    app.assert_verify_clean();
}

/// An event for a month whose partition does not exist (replayed from long
/// ago): the flusher creates the partition and stores the event once.
/// `ledger partitions` then detaches months past the retention, leaving
/// them as plain tables.
#[tokio::test]
async fn ledger_months_are_partitions_created_on_demand_and_detached_by_retention() {
    let app = TestApp::spawn().await;
    let pool = app.pool().await;
    let user = app.create_user("free").await;
    let exists = |name: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
                .bind(name)
                .fetch_one(&pool)
                .await
                .expect("regclass")
        }
    };
    assert!(!exists("ledger_events_2020_01").await);
    let stream = app.state.billing.meter().keys().stream_of(&user.id);
    let event = serde_json::json!({
        "e": "old-event-1", "u": user.id.as_str(), "k": "charge", "p": "free", "m": "rag",
        "n": 1, "fm": 1, "fb": 0, "mb": 99, "bb": 0, "r": "old-request", "by": "proxy",
        "t": 1_579_046_400_000_i64, "d": "2020-01-15"
    });
    let mut con = app.redis.connection().await;
    for _ in 0..2 {
        // Delivered twice: stored once.
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("v")
            .arg(event.to_string())
            .query_async(&mut con)
            .await
            .expect("xadd");
    }
    app.wait_flushed(Duration::from_secs(10)).await;
    assert!(exists("ledger_events_2020_01").await);
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_events WHERE event_id = 'old-event-1' AND local_day = '2020-01-15'",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(stored, 1);

    // Keep 12 months: 2020-01 goes, this month and the ones ahead stay.
    let out = app.cli_with_env(
        &["ledger", "partitions"],
        &[("CREDITGATE_LEDGER__RETENTION_MONTHS", "12")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("detached ledger_events_2020_01"),
        "{stdout}"
    );
    let this_month = chrono::Utc::now().format("ledger_events_%Y_%m").to_string();
    assert!(stdout.contains(&this_month), "{stdout}");
    let in_ledger: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_events WHERE event_id = 'old-event-1'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(in_ledger, 0, "detached from the ledger");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_events_2020_01")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(kept, 1, "but kept as a table");
}

/// The migration to a partitioned ledger keeps the rows an older schema
/// holds.
#[tokio::test]
async fn the_partitioning_migration_keeps_existing_rows() {
    let db = common::TestDb::named_but_not_created();
    let pool = db.create_empty().await;
    let all = &creditgate::accounts::MIGRATOR;
    let before: Vec<_> = all
        .iter()
        .filter(|m| m.version < 20261127000002)
        .cloned()
        .collect();
    let old = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(before),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    old.run(&pool).await.expect("old migrations");
    sqlx::query(
        "INSERT INTO ledger_events (event_id, user_id, kind, amount, actor, local_day, occurred_at)
         VALUES ('e-2025', 'usr_x', 'charge', 2, 'proxy', '2025-06-03', now()),
                ('e-2026', 'usr_x', 'refund', 2, 'proxy', '2026-11-27', now())",
    )
    .execute(&pool)
    .await
    .expect("old rows");
    all.run(&pool).await.expect("partitioning migration");
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id, tableoid::regclass::text FROM ledger_events ORDER BY event_id",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(
        rows,
        vec![
            ("e-2025".to_owned(), "ledger_events_2025_06".to_owned()),
            ("e-2026".to_owned(), "ledger_events_2026_11".to_owned())
        ]
    );
}

/// The roll-ups the admin stats read are checked by `ledger verify` too.
#[tokio::test]
async fn verify_reports_roll_ups_that_disagree_with_the_daily_aggregates() {
    let app = TestApp::spawn().await;
    let user = app.create_user("starter").await;
    for _ in 0..5 {
        assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    }
    app.wait_flushed(Duration::from_secs(10)).await;
    let pool = app.pool().await;
    let (module_rows, month_rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT SUM(charges)::bigint FROM usage_module_daily),
                (SELECT SUM(charges)::bigint FROM usage_monthly)",
    )
    .fetch_one(&pool)
    .await
    .expect("roll-ups");
    assert_eq!((module_rows, month_rows), (5, 5));
    assert!(app.cli(&["ledger", "verify"]).status.success());

    for tamper in [
        "UPDATE usage_module_daily SET charged_credits = charged_credits + 1",
        "UPDATE usage_monthly SET refunded_credits = refunded_credits + 1",
    ] {
        sqlx::query(tamper).execute(&pool).await.expect("tamper");
    }
    let out = app.cli(&["ledger", "verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("usage_module_daily"), "{stdout}");
    assert!(
        stdout.contains("usage_monthly") && stdout.contains(user.id.as_str()),
        "{stdout}"
    );
}

/// A batch of new events takes the direct path (`COPY` into the ledger,
/// roll-ups summed by the flusher); a batch holding stored events takes the
/// staged one (`ON CONFLICT DO NOTHING`, roll-ups from the rows inserted).
/// Both must leave the same roll-ups and audit rows, and the second must
/// count only its new events.
#[tokio::test]
async fn new_and_redelivered_batches_leave_the_same_roll_ups() {
    use chrono::{NaiveDate, TimeZone, Utc};
    use creditgate::ledger::event::LedgerEvent;
    let app = TestApp::spawn().await;
    let pool = app.pool().await;
    let day = |d: &str| NaiveDate::parse_from_str(d, "%Y-%m-%d").expect("day");
    let mut seq = 0;
    let mut event =
        |kind: &'static str, user: &str, module: Option<&str>, amount: i64, d: &str, shard| {
            seq += 1;
            LedgerEvent {
                event_id: format!("ev-{seq}").into(),
                user_id: user.to_owned().into(),
                kind,
                module: module.map(|m| m.to_owned().into()),
                action: None,
                amount,
                from_monthly: amount,
                from_bonus: 0,
                monthly_after: Some(100),
                bonus_after: Some(0),
                plan: Some("pro".into()),
                request_id: Some(format!("req-{seq}").into()),
                actor: "gateway".into(),
                local_day: day(d),
                occurred_at: Utc
                    .timestamp_millis_opt(1_795_000_000_000 + seq)
                    .single()
                    .expect("time"),
                stream_ms: 1_795_000_000_000 + seq,
                stream_seq: 0,
                account_period: "".into(),
                account_day: "".into(),
                account_day_used: 0,
                reason: Some(format!("tab\there {seq}").into()),
                lease_id: None,
                shard,
            }
        };
    let first = vec![
        event("charge", "u1", Some("rag"), 3, "2026-10-31", 1),
        event("charge", "u1", Some("rag"), 2, "2026-10-31", 1),
        event("refund", "u1", Some("rag"), 2, "2026-10-31", 1),
        event("charge", "u2", Some("rag"), 5, "2026-11-01", 2),
        event("charge", "u2", Some("legal"), 7, "2026-11-01", 2),
        event("grant", "u2", None, 50, "2026-11-01", 2),
        event("reset", "u1", None, 100, "2026-11-01", 1),
    ];
    assert_eq!(
        store::write_batch(&pool, &first, &[], None)
            .await
            .expect("new batch"),
        7
    );
    // A redelivery of the last three with two new charges after them.
    let mut second = first[4..].to_vec();
    second.push(event("charge", "u1", Some("rag"), 11, "2026-11-01", 1));
    second.push(event("charge", "u2", Some("legal"), 13, "2026-11-01", 2));
    assert_eq!(
        store::write_batch(&pool, &second, &[], None)
            .await
            .expect("redelivery"),
        2
    );
    // And once more whole: nothing new.
    assert_eq!(
        store::write_batch(&pool, &second, &[], None)
            .await
            .expect("again"),
        0
    );

    let daily: Vec<(String, String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT user_id, day::text, module, charged_credits, charges, refunded_credits, refunds
         FROM usage_daily ORDER BY 1, 2, 3",
    )
    .fetch_all(&pool)
    .await
    .expect("daily");
    let row = |u: &str, d: &str, m: &str, c, n, r, rn| {
        (u.to_string(), d.to_string(), m.to_string(), c, n, r, rn)
    };
    assert_eq!(
        daily,
        vec![
            row("u1", "2026-10-31", "rag", 5, 2, 2, 1),
            row("u1", "2026-11-01", "rag", 11, 1, 0, 0),
            row("u2", "2026-11-01", "legal", 20, 2, 0, 0),
            row("u2", "2026-11-01", "rag", 5, 1, 0, 0),
        ]
    );
    let by_module: Vec<(String, String, i16, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT day::text, module, shard, charged_credits, charges, refunded_credits, refunds
         FROM usage_module_daily ORDER BY 1, 2, 3",
    )
    .fetch_all(&pool)
    .await
    .expect("by module");
    assert_eq!(
        by_module,
        vec![
            ("2026-10-31".into(), "rag".into(), 1, 5, 2, 2, 1),
            ("2026-11-01".into(), "legal".into(), 2, 20, 2, 0, 0),
            ("2026-11-01".into(), "rag".into(), 1, 11, 1, 0, 0),
            ("2026-11-01".into(), "rag".into(), 2, 5, 1, 0, 0),
        ]
    );
    let monthly: Vec<(String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT user_id, month::text, charged_credits, charges, refunded_credits, refunds
         FROM usage_monthly ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .expect("monthly");
    assert_eq!(
        monthly,
        vec![
            ("u1".into(), "2026-10-01".into(), 5, 2, 2, 1),
            ("u1".into(), "2026-11-01".into(), 11, 1, 0, 0),
            ("u2".into(), "2026-11-01".into(), 25, 3, 0, 0),
        ]
    );
    let audit: Vec<(String, String, serde_json::Value)> =
        sqlx::query_as("SELECT event_id, user_id, details FROM admin_audit WHERE action = 'grant'")
            .fetch_all(&pool)
            .await
            .expect("audit");
    assert_eq!(
        audit,
        vec![(
            "ev-6".into(),
            "u2".into(),
            serde_json::json!({"credits": 50, "reason": "tab\there 6", "idempotency_key": "req-6"})
        )]
    );
    // Text with a tab survives the COPY rows of both paths.
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM ledger_events ORDER BY stream_ms")
            .fetch_all(&pool)
            .await
            .expect("reasons");
    assert_eq!(reasons.len(), 9);
    assert_eq!(reasons[8], "tab\there 9");
    assert_eq!(reasons[0], "tab\there 1");
    // Times keep their milliseconds, days their date.
    let (at, day): (chrono::DateTime<Utc>, NaiveDate) =
        sqlx::query_as("SELECT occurred_at, local_day FROM ledger_events WHERE event_id = 'ev-8'")
            .fetch_one(&pool)
            .await
            .expect("ev-8");
    assert_eq!(at.timestamp_millis(), 1_795_000_000_008);
    assert_eq!(day.to_string(), "2026-11-01");
}

/// Calls from a spend log take the same two paths: new ones `COPY`ed
/// straight in, and a batch read again after a crash (some of it stored)
/// staged with `ON CONFLICT DO NOTHING`. Each call is one row, counted once
/// in the roll-ups, with its text, time and lease as the log had them.
#[tokio::test]
async fn calls_from_a_spend_log_read_again_are_stored_and_counted_once() {
    use chrono::{DateTime, NaiveDate, Utc};
    use creditgate::ledger::{Call, Calls};
    let app = TestApp::spawn().await;
    let pool = app.pool().await;
    let day = NaiveDate::from_ymd_opt(2026, 11, 29).expect("day");
    // As the log holds them: the second request id escaped (a backslash).
    let ids: Vec<(String, &str)> = (1..=4)
        .map(|i| (format!("call-{i}"), if i == 2 { "r\\\\2" } else { "r" }))
        .collect();
    let calls = |range: std::ops::Range<usize>| {
        let mut calls = Calls::default();
        for (i, (event_id, request_id)) in ids[range.clone()].iter().enumerate() {
            let n = (range.start + i) as i64;
            calls.push(Call {
                escaped: request_id.contains('\\'),
                event_id,
                user: "u1".into(),
                charge: n != 3,
                module: "rag".into(),
                action: "",
                amount: 2,
                from_monthly: 2,
                from_bonus: 0,
                plan: "pro",
                request_id,
                actor: "proxy",
                day,
                at: DateTime::<Utc>::from_timestamp_millis(1_795_900_000_000 + n).expect("time"),
                lease: "ev-0:lease",
                shard: 3,
            });
        }
        calls
    };
    assert_eq!(
        store::write_calls(&pool, &mut calls(0..2))
            .await
            .expect("new"),
        2
    );
    // Read again from the start after a crash, with two more.
    assert_eq!(
        store::write_calls(&pool, &mut calls(0..4))
            .await
            .expect("again"),
        2
    );
    /// event_id, kind, request_id, lease_id, stream_ms, monthly_after
    type Row = (String, String, Option<String>, String, i64, Option<i64>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_id, kind, request_id, lease_id, stream_ms, monthly_after
         FROM ledger_events ORDER BY event_id",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[1].2.as_deref(), Some("r\\2"), "unescaped once");
    assert_eq!(rows[3].1, "refund");
    assert!(rows.iter().all(|r| r.3 == "ev-0:lease" && r.5.is_none()));
    assert_eq!(rows[0].4, 1_795_900_000_000);
    let daily: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT charged_credits, charges, refunded_credits, refunds FROM usage_daily
         WHERE user_id = 'u1' AND day = '2026-11-29' AND module = 'rag'",
    )
    .fetch_one(&pool)
    .await
    .expect("daily");
    assert_eq!(daily, (6, 3, 2, 1));
    let by_module: (i16, i64) = sqlx::query_as(
        "SELECT shard, charges FROM usage_module_daily WHERE day = '2026-11-29' AND module = 'rag'",
    )
    .fetch_one(&pool)
    .await
    .expect("by module");
    assert_eq!(by_module, (3, 3));
}
