//! Credit leases (docs/LEASES.md), end to end: a hot account's calls spent
//! without Redis keep every guarantee a charge in Redis keeps.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::process::{Gateway, Load};
use common::{TestApp, free_port, metric, wait_until};
use creditgate::domain::UserId;
use reqwest::Method;

/// One answered call: status, request id, and its credit headers.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    rid: String,
    charged: Option<i64>,
    remaining: Option<i64>,
}

/// `n` calls to `base` + `path_of(i)` with `key`, `concurrency` at a time,
/// each with its own request id.
async fn hammer(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    n: usize,
    concurrency: usize,
    path_of: fn(usize) -> &'static str,
) -> Vec<Answer> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|w| {
            let (client, base, key, next) = (
                client.clone(),
                base.to_owned(),
                key.to_owned(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return out;
                    }
                    let rid = format!("w{w}-{i}");
                    let r = client
                        .get(format!("{base}{}", path_of(i)))
                        .bearer_auth(&key)
                        .header("x-request-id", &rid)
                        .send()
                        .await
                        .expect("the gateway answers");
                    let header = |name: &str| {
                        r.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                    };
                    out.push(Answer {
                        status: r.status().as_u16(),
                        charged: header("x-credits-charged"),
                        remaining: header("x-credits-remaining"),
                        rid,
                    });
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

fn rag(_: usize) -> &'static str {
    "/rag/q"
}

/// Leases open in Redis for `user` (fields `lease:*` of the account).
async fn open_leases(app: &TestApp, user: &UserId) -> usize {
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(app.state.billing.meter().keys().account(user))
        .query_async(&mut app.redis.connection().await)
        .await
        .expect("HKEYS");
    fields.iter().filter(|f| f.starts_with("lease:")).count()
}

/// Ledger rows of `user` by kind, and how many of the charges were spent
/// from a lease.
async fn ledger(app: &TestApp, user: &UserId) -> (HashMap<String, (i64, i64)>, i64) {
    let pool = app.pool().await;
    let kinds: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT kind, count(*), COALESCE(SUM(amount), 0)::bigint FROM ledger_events
         WHERE user_id = $1 GROUP BY kind",
    )
    .bind(user.as_str())
    .fetch_all(&pool)
    .await
    .expect("kinds");
    let leased: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_events
         WHERE user_id = $1 AND kind = 'charge' AND lease_id IS NOT NULL",
    )
    .bind(user.as_str())
    .fetch_one(&pool)
    .await
    .expect("leased");
    pool.close().await;
    (
        kinds.into_iter().map(|(k, n, s)| (k, (n, s))).collect(),
        leased,
    )
}

/// Each request id's ledger kinds.
async fn kinds_by_request(app: &TestApp, user: &UserId) -> HashMap<String, Vec<String>> {
    let pool = app.pool().await;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT request_id, kind FROM ledger_events
         WHERE user_id = $1 AND kind IN ('charge', 'refund') ORDER BY stream_ms, stream_seq",
    )
    .bind(user.as_str())
    .fetch_all(&pool)
    .await
    .expect("rows");
    pool.close().await;
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    for (rid, kind) in rows {
        by.entry(rid).or_default().push(kind);
    }
    by
}

/// Waits until no lease of `user` is open and the streams are flushed.
async fn closed_and_flushed(app: &TestApp, user: &UserId, what: &str, timeout: Duration) {
    wait_until(what, timeout, || async {
        open_leases(app, user).await == 0 && app.backlog().await == 0
    })
    .await;
}

/// Waits until no lease of `user` is open, the streams are flushed and
/// the ledger holds `charges` charges of theirs.
async fn settled(app: &TestApp, user: &UserId, charges: i64) {
    wait_until(
        "leases settled and written",
        Duration::from_secs(20),
        || async {
            open_leases(app, user).await == 0
                && app.backlog().await == 0
                && ledger(app, user)
                    .await
                    .0
                    .get("charge")
                    .is_some_and(|(n, _)| *n == charges)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_account_spends_leases_and_each_call_is_charged_exactly_once() {
    let app = TestApp::builder().leases().start().await;
    let user = app.create_user("enterprise").await; // 100,000 credits, no daily limit
    let calls = 2000;
    let answers = hammer(&app.client, &app.url(""), &user.key, calls, 16, rag).await;
    assert_eq!(answers.iter().filter(|a| a.status == 200).count(), calls);
    for a in &answers {
        assert_eq!(a.charged, Some(1), "{a:?}");
        // Never more than is left; less by at most what other open leases
        // still hold (the next lease, of at most 40 calls).
        let remaining = a.remaining.expect("x-credits-remaining");
        assert!(
            (100_000 - calls as i64 - 100..100_000).contains(&remaining),
            "{a:?}"
        );
    }
    settled(&app, &user.id, calls as i64).await;

    let (kinds, leased) = ledger(&app, &user.id).await;
    assert_eq!(kinds["charge"], (calls as i64, calls as i64));
    assert!(
        leased > calls as i64 / 2,
        "most calls should be spent from leases: {leased} of {calls}"
    );
    // The first lease holds `calls` (20); at this rate the next ones are
    // as large as allowed (`max_calls`, 40).
    let sizes: (i64, i64) = sqlx::query_as(
        "SELECT min(amount), max(amount) FROM ledger_events WHERE user_id = $1 AND kind = 'lease'",
    )
    .bind(user.id.as_str())
    .fetch_one(&app.pool().await)
    .await
    .expect("lease sizes");
    assert_eq!(sizes, (20, 40), "leases grow with the account's rate");
    let (leases, taken) = kinds["lease"];
    let (returns, returned) = kinds["lease_return"];
    assert_eq!(leases, returns, "every lease settled: {kinds:?}");
    assert!(!kinds.contains_key("lease_lost"), "{kinds:?}");
    assert_eq!(
        taken - returned,
        leased,
        "each lease: spent + returned = taken"
    );
    let by_request = kinds_by_request(&app, &user.id).await;
    for a in &answers {
        assert_eq!(by_request.get(&a.rid).map(Vec::len), Some(1), "{}", a.rid);
    }
    assert_eq!(by_request.len(), calls);
    assert_eq!(
        app.balance(&user.id).await,
        (100_000 - calls as i64, 0, calls as i64)
    );
    assert_eq!(app.upstream.hits_on("/rag/q"), calls);
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn near_a_limit_no_lease_is_granted_and_the_edge_stays_exact() {
    // Hot at the first call: every charge asks for a lease.
    let app = TestApp::builder()
        .leases()
        .env("CREDITGATE_METERING__LEASES__AFTER_CALLS", "1")
        .start()
        .await;
    let limited = app.create_user("free").await; // daily limit 20
    let targets = vec![(app.url("/rag/q"), limited.key.clone())];
    let statuses = app.burst(&targets, 300).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 20);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 280);
    assert_eq!(app.balance(&limited.id).await, (80, 0, 20));

    let poor = app.create_user("tiny").await; // 10 credits; legal costs 3
    let targets = vec![(app.url("/legal/ask"), poor.key.clone())];
    let statuses = app.burst(&targets, 50).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3);
    assert_eq!(app.balance(&poor.id).await, (1, 0, 9));

    for user in [&limited, &poor] {
        assert_eq!(open_leases(&app, &user.id).await, 0);
        let (kinds, leased) = ledger(&app, &user.id).await;
        assert_eq!(leased, 0);
        assert!(!kinds.contains_key("lease"), "{kinds:?}");
    }
    app.assert_verify_clean();
}

/// Calls `url` with `key` from `workers` tasks until `stop`, recording when
/// each call started and what it got.
fn load(
    client: &reqwest::Client,
    url: String,
    key: String,
    workers: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<(Instant, u16)>>> {
    (0..workers)
        .map(|_| {
            let (client, url, key, stop) = (client.clone(), url.clone(), key.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let status = client
                        .get(&url)
                        .bearer_auth(&key)
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16());
                    seen.push((started, status));
                }
                seen
            })
        })
        .collect()
}

async fn joined(tasks: Vec<tokio::task::JoinHandle<Vec<(Instant, u16)>>>) -> Vec<(Instant, u16)> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocations_and_blocks_stop_leased_calls_here_at_once_and_elsewhere_within_a_second() {
    let app = TestApp::builder().leases().start().await;
    let (other, _stop_other) = app.second_instance().await;
    let user = app.create_user("enterprise").await;
    let second = app
        .admin(Method::POST, &format!("/users/{}/keys", user.id), None)
        .await
        .json::<serde_json::Value>()
        .await
        .expect("new key");
    let second_key = second["api_key"].as_str().expect("key").to_owned();

    for (phase, key) in [("revoke", user.key.clone()), ("block", second_key)] {
        let stop = Arc::new(AtomicBool::new(false));
        let here = load(&app.client, app.url("/rag/q"), key.clone(), 4, &stop);
        let there = load(
            &app.client,
            format!("http://{other}/rag/q"),
            key.clone(),
            4,
            &stop,
        );
        // Both instances hold a lease for this key.
        wait_until(
            "a lease on each instance",
            Duration::from_secs(10),
            || async { open_leases(&app, &user.id).await >= 2 },
        )
        .await;
        let change = match phase {
            "revoke" => {
                app.admin(
                    Method::DELETE,
                    &format!("/users/{}/keys/{}", user.id, user.key_id),
                    None,
                )
                .await
            }
            _ => {
                app.admin(Method::POST, &format!("/users/{}/block", user.id), None)
                    .await
            }
        };
        assert_eq!(change.status(), 200, "{phase}");
        let changed = Instant::now();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::SeqCst);
        let (here, there) = (joined(here).await, joined(there).await);
        let refused = if phase == "revoke" { 401 } else { 403 };
        // Here: every call started after the change is refused.
        let late_here: Vec<_> = here.iter().filter(|(t, _)| *t > changed).collect();
        assert!(!late_here.is_empty());
        let served_here = late_here.iter().filter(|(_, s)| *s != refused).count();
        assert_eq!(
            served_here,
            0,
            "{phase}: {served_here} of {} calls served here after the change",
            late_here.len()
        );
        // There: within a second, and from then on.
        let late_there: Vec<_> = there
            .iter()
            .filter(|(t, _)| *t > changed + Duration::from_secs(1))
            .collect();
        assert!(!late_there.is_empty());
        let served_there = late_there.iter().filter(|(_, s)| *s != refused).count();
        assert_eq!(
            served_there,
            0,
            "{phase}: {served_there} of {} calls served elsewhere a second after the change",
            late_there.len()
        );
        assert!(here.iter().any(|(_, s)| *s == 200) && there.iter().any(|(_, s)| *s == 200));
    }
    closed_and_flushed(&app, &user.id, "leases settled", Duration::from_secs(10)).await;
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_call_goes_back_to_its_lease() {
    let app = TestApp::builder().leases().start().await;
    let user = app.create_user("enterprise").await;
    fn mixed(i: usize) -> &'static str {
        if i.is_multiple_of(5) {
            "/rag/status/500"
        } else {
            "/rag/q"
        }
    }
    let calls = 1000;
    let answers = hammer(&app.client, &app.url(""), &user.key, calls, 32, mixed).await;
    let failed = answers.iter().filter(|a| a.status == 500).count();
    assert_eq!(failed, calls / 5);
    assert_eq!(
        answers.iter().filter(|a| a.status == 200).count(),
        calls - failed
    );
    for a in answers.iter().filter(|a| a.status == 500) {
        assert_eq!(a.charged, Some(0), "{a:?}");
    }
    settled(&app, &user.id, calls as i64).await;
    let (kinds, leased) = ledger(&app, &user.id).await;
    assert_eq!(kinds["refund"].0, failed as i64);
    assert!(leased > 0);
    assert_eq!(
        app.balance(&user.id).await,
        (
            100_000 - (calls - failed) as i64,
            0,
            (calls - failed) as i64
        )
    );
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_stopping_settles_its_leases_and_writes_every_call() {
    let app = TestApp::builder().leases().start().await;
    let user = app.create_user("enterprise").await;
    let (other, stop, running) = app.second_instance_running().await;
    let answers = hammer(
        &app.client,
        &format!("http://{other}"),
        &user.key,
        600,
        16,
        rag,
    )
    .await;
    assert!(answers.iter().all(|a| a.status == 200));
    let _ = stop.send(());
    running.await.expect("task").expect("stopped cleanly");
    // Settled at stop, not left for a sweep.
    assert_eq!(open_leases(&app, &user.id).await, 0);
    settled(&app, &user.id, 600).await;
    let (kinds, leased) = ledger(&app, &user.id).await;
    assert!(leased > 0);
    assert!(!kinds.contains_key("lease_lost"), "{kinds:?}");
    assert_eq!(app.balance(&user.id).await, (100_000 - 600, 0, 600));
    app.assert_verify_clean();
}

/// Thread-per-core workers write their leased calls to one spend log (one
/// writer keeps the ledger's primary key in order, docs/LEASES.md), and a
/// graceful stop still settles every worker's leases and writes every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thread_per_core_workers_share_one_spend_log_and_a_stop_writes_every_call() {
    let app = TestApp::builder().leases().start().await;
    let user = app.create_user("enterprise").await;
    let own = logs_in(&app.spend_dir());
    let mut gateway = Gateway::start(
        &app,
        free_port(),
        &[
            ("CREDITGATE_SERVER__RUNTIME", "thread_per_core"),
            ("CREDITGATE_SERVER__WORKERS", "3"),
        ],
    )
    .await;
    let answers = hammer(&app.client, &gateway.url(""), &user.key, 900, 24, rag).await;
    assert!(answers.iter().all(|a| a.status == 200));
    let instances: std::collections::HashSet<String> = logs_in(&app.spend_dir())
        .into_iter()
        .filter(|f| !own.contains(f))
        .filter_map(|f| Some(f.strip_prefix("spend-")?.rsplit_once('-')?.0.to_owned()))
        .collect();
    assert_eq!(
        instances.len(),
        1,
        "one log for three workers: {instances:?}"
    );
    gateway.sigterm();
    let status = gateway.exit_status(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}\n{}", gateway.logs());
    assert_eq!(open_leases(&app, &user.id).await, 0, "{}", gateway.logs());
    settled(&app, &user.id, 900).await;
    let (kinds, leased) = ledger(&app, &user.id).await;
    assert!(leased > 0, "{kinds:?}");
    assert!(!kinds.contains_key("lease_lost"), "{kinds:?}");
    assert_eq!(app.balance(&user.id).await, (100_000 - 900, 0, 900));
    app.assert_verify_clean();
}

/// The spend log segments in `dir`.
fn logs_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| name.ends_with(".log"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_leases_open_loses_no_call_and_duplicates_none() {
    let app = TestApp::builder().leases().start().await;
    let users = [
        app.create_user("enterprise").await,
        app.create_user("enterprise").await,
    ];
    let keys: Vec<String> = users.iter().map(|u| u.key.clone()).collect();
    let port = free_port();
    let own = logs_in(&app.spend_dir());
    let mut gateway = Gateway::start(&app, port, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Load::start(&app.client, port, &keys, &stop);
    wait_until("load before the kill", Duration::from_secs(20), || {
        let n = load.served();
        async move { n >= 1500 }
    })
    .await;
    let mut open = 0;
    for u in &users {
        open += open_leases(&app, &u.id).await;
    }
    gateway.sigkill();
    let dead: Vec<String> = logs_in(&app.spend_dir())
        .into_iter()
        .filter(|f| !own.contains(f))
        .collect();
    assert!(!dead.is_empty());
    let before = load.served();
    // The same disk: the restarted gateway settles the dead one's leases
    // from its spend log.
    gateway = Gateway::start(&app, port, &[]).await;
    wait_until("load after the restart", Duration::from_secs(20), || {
        let n = load.served();
        async move { n >= before + 500 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    load.join().await;
    let ok = load.ok.lock().expect("lock").clone();
    let mut charged = 0;
    wait_until("every lease settled", Duration::from_secs(20), || async {
        let mut open = 0;
        for u in &users {
            open += open_leases(&app, &u.id).await;
        }
        open == 0 && app.backlog().await == 0
    })
    .await;
    drop(gateway);
    let mut by_request = HashMap::new();
    for u in &users {
        let (kinds, _) = ledger(&app, &u.id).await;
        assert!(!kinds.contains_key("lease_lost"), "{kinds:?}");
        by_request.extend(kinds_by_request(&app, &u.id).await);
        let (n, sum) = kinds["charge"];
        assert_eq!(n, sum);
        charged += n as usize;
        let (monthly, _, used) = app.balance(&u.id).await;
        assert_eq!(
            (monthly, used),
            (100_000 - n, n),
            "balance = the ledger's charges"
        );
    }
    for rid in &ok {
        assert_eq!(
            by_request.get(rid).map(Vec::as_slice),
            Some(&["charge".to_owned()][..]),
            "{rid}"
        );
    }
    let lost_answers = load.failed.load(Ordering::SeqCst);
    assert!(
        charged >= ok.len() && charged - ok.len() <= lost_answers,
        "{charged} charged, {} answered, {lost_answers} unanswered",
        ok.len()
    );
    assert!(open > 0, "the kill should find leases open");
    let left = logs_in(&app.spend_dir());
    assert!(
        dead.iter().all(|f| !left.contains(f)),
        "the dead gateway's logs should be gone: {dead:?} in {left:?}"
    );
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_whose_gateway_and_log_are_gone_is_closed_as_lost_and_no_call_is_free() {
    let app = TestApp::builder().leases().start().await;
    let user = app.create_user("enterprise").await;
    let lost_disk = std::env::temp_dir().join(format!("cg-spend-lost-{}", app.db.name));
    let port = free_port();
    let mut gateway = Gateway::start(
        &app,
        port,
        &[(
            "CREDITGATE_METERING__LEASES__DIR",
            lost_disk.to_str().expect("path"),
        )],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Load::start(&app.client, port, std::slice::from_ref(&user.key), &stop);
    wait_until("leased load", Duration::from_secs(20), || async {
        load.served() >= 800 && open_leases(&app, &user.id).await > 0
    })
    .await;
    // The machine is lost: the process and its disk.
    gateway.sigkill();
    stop.store(true, Ordering::SeqCst);
    load.join().await;
    std::fs::remove_dir_all(&lost_disk).expect("remove the lost disk");
    // The in-process gateway's sweep closes it 5 s after its end.
    closed_and_flushed(
        &app,
        &user.id,
        "the sweep to close the lost leases",
        Duration::from_secs(30),
    )
    .await;
    let (kinds, _) = ledger(&app, &user.id).await;
    assert!(kinds.contains_key("lease_lost"), "{kinds:?}");
    let (monthly, bonus, _) = app.balance(&user.id).await;
    let answered = load.served() as i64;
    assert!(
        monthly + bonus <= 100_000 - answered,
        "a call was free: {answered} answered, {monthly} + {bonus} left"
    );
    app.assert_verify_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_granted_by_a_charge_whose_answer_was_lost_is_given_back() {
    // Every charge asks for a lease; Redis is reached through a proxy that
    // can drop its answers.
    let app = TestApp::builder()
        .leases()
        .redis_via_chaos()
        .env("CREDITGATE_METERING__LEASES__AFTER_CALLS", "1")
        .start()
        .await;
    let chaos = app.redis_chaos.clone().expect("chaos proxy");
    let user = app.create_user("enterprise").await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    // That call's lease ends (300 ms) and is settled.
    wait_until(
        "the first lease settled",
        Duration::from_secs(10),
        || async { open_leases(&app, &user.id).await == 0 },
    )
    .await;

    // The next call goes to Redis and asks for a lease: Redis grants it,
    // and the answer never comes back.
    chaos.mute();
    let lost = app.call(&user.key, "/rag/q").await;
    assert_eq!(lost.status(), 503);
    chaos.restore_networking();

    // The gateway settles it with nothing spent once Redis answers again.
    closed_and_flushed(
        &app,
        &user.id,
        "the unanswered lease given back",
        Duration::from_secs(20),
    )
    .await;
    // Two leases, one per call, neither spent from: both came back whole
    // (the second one by the gateway that never heard of it; left open, the
    // sweep would have closed it as lost 5 s after its end).
    let pool = app.pool().await;
    let leases: Vec<(i64, Option<i64>)> = sqlx::query_as(
        "SELECT l.amount, r.amount FROM ledger_events l
         LEFT JOIN ledger_events r ON r.lease_id = l.lease_id AND r.kind = 'lease_return'
         WHERE l.user_id = $1 AND l.kind = 'lease'",
    )
    .bind(user.id.as_str())
    .fetch_all(&pool)
    .await
    .expect("leases");
    let (kinds, _) = ledger(&app, &user.id).await;
    assert_eq!(leases.len(), 2, "{leases:?} {kinds:?}");
    for (taken, returned) in &leases {
        assert_eq!(Some(*taken), *returned, "{leases:?}");
    }
    let (kinds, _) = ledger(&app, &user.id).await;
    assert!(!kinds.contains_key("lease_lost"), "{kinds:?}");
    // And the charge itself, which asked for the lease, is given back:
    // two calls charged, one refunded, one served.
    wait_until(
        "the unanswered charge given back",
        Duration::from_secs(15),
        || async {
            metric(
                &app,
                "creditgate_unanswered_charges_total{outcome=\"refunded\"}",
            )
            .await
                == 1.0
        },
    )
    .await;
    app.wait_flushed(Duration::from_secs(10)).await;
    let (kinds, _) = ledger(&app, &user.id).await;
    assert_eq!(kinds.get("charge").map(|k| k.0), Some(2), "{kinds:?}");
    assert_eq!(kinds.get("refund").map(|k| k.0), Some(1), "{kinds:?}");
    assert_eq!(app.upstream.hits(), 1);
    app.assert_verify_clean();
}

/// An account already in a later day and month than this gateway's clock
/// (another gateway's clock ahead, a call decided after midnight): charge.lua
/// counts each call in the account's day, so a lease it grants is in that
/// day too, and calls spent from it here would be written under ours. The
/// gateway gives such a lease back whole and charges in Redis instead:
/// every call counted once, in the account's day, none from a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_account_ahead_of_the_gateways_day_gets_its_leases_back_unspent() {
    let app = TestApp::builder().leases().start().await;
    let user = app.create_user("enterprise").await; // 100,000 credits, no daily limit
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    let _: () = redis::cmd("HSET")
        .arg(app.state.billing.meter().keys().account(&user.id))
        .arg("day")
        .arg("2099-12-31")
        .arg("period")
        .arg("2099-12")
        .arg("used")
        .arg(0)
        .query_async(&mut app.redis.connection().await)
        .await
        .expect("HSET");
    let calls = 300;
    let answers = hammer(&app.client, &app.url(""), &user.key, calls, 8, rag).await;
    assert_eq!(answers.iter().filter(|a| a.status == 200).count(), calls);
    settled(&app, &user.id, calls as i64 + 1).await;
    let (kinds, leased) = ledger(&app, &user.id).await;
    assert_eq!(leased, 0, "no call spent from a lease: {kinds:?}");
    let (leases, taken) = kinds.get("lease").copied().unwrap_or_default();
    assert!(leases > 0, "the hot account was granted leases: {kinds:?}");
    assert_eq!(
        kinds.get("lease_return").copied(),
        Some((leases, taken)),
        "each returned whole"
    );
    let days: Vec<(String, i64)> = sqlx::query_as(
        "SELECT local_day::text, count(*) FROM ledger_events
         WHERE user_id = $1 AND kind = 'charge' GROUP BY 1 ORDER BY 1",
    )
    .bind(user.id.as_str())
    .fetch_all(&app.pool().await)
    .await
    .expect("days");
    assert_eq!(days.len(), 2, "{days:?}");
    assert_eq!(days[1], ("2099-12-31".to_owned(), calls as i64));
    assert_eq!(
        app.balance(&user.id).await,
        (100_000 - 1 - calls as i64, 0, calls as i64)
    );
    app.assert_verify_clean();
}
