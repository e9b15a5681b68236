//! The billing, admin and credits APIs (SPEC §3–§5), against a real
//! gateway, Redis and Postgres.

use crate::common;

use std::time::Duration;

use chrono::Datelike;

use common::{ADMIN_KEY, SERVICE_KEY, TestApp, error_code};
use reqwest::Method;
use serde_json::{Value, json};

async fn body(r: reqwest::Response) -> Value {
    r.json().await.expect("JSON body")
}

#[tokio::test(flavor = "multi_thread")]
async fn plans_and_credit_costs_are_public_and_come_from_the_config() {
    let app = TestApp::spawn().await;
    let plans = body(
        app.client
            .get(app.url("/api/billing/plans"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    let free = plans["plans"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["id"] == "free"))
        .expect("free plan");
    assert_eq!(free["monthly_credits"], 100);
    assert_eq!(free["daily_limit"], 20);
    assert_eq!(free["modules"], json!(["rag", "park"]));
    let ent = plans["plans"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["id"] == "enterprise"))
        .expect("enterprise");
    assert_eq!(ent["daily_limit"], Value::Null);
    assert_eq!(ent["rate_limit"], Value::Null);
    let limited = plans["plans"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["id"] == "limited"))
        .expect("limited");
    assert_eq!(limited["rate_limit"], json!({"per_minute": 30, "burst": 5}));
    let costs = body(
        app.client
            .get(app.url("/api/billing/credit-costs"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    let legal = costs["modules"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["module"] == "legal"))
        .expect("legal");
    assert_eq!(legal["cost"], 3);
    assert_eq!(legal["actions"]["draft"], 5);
    // Without a label the id stands in; with one, users read it.
    assert_eq!(
        (&legal["label"], &legal["description"]),
        (&json!("legal"), &json!(""))
    );
    let rag = costs["modules"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["module"] == "rag"))
        .expect("rag");
    assert_eq!(rag["label"], "Recherche documentaire");
    assert_eq!(
        rag["description"],
        "Questions sur vos documents, réponses sourcées"
    );
    // Cheapest first, then the smaller allowance: a price table's order.
    let order: Vec<&str> = plans["plans"]
        .as_array()
        .expect("plans")
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(order, ["tiny", "free", "limited", "starter", "enterprise"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn me_and_usage_show_the_callers_own_balance_and_history() {
    let app = TestApp::spawn().await;
    let user = app.create_user("starter").await;
    let other = app.create_user("free").await;
    for path in ["/rag/a", "/legal/b", "/rag/status/500"] {
        app.call(&user.key, path).await;
    }
    app.call(&other.key, "/rag/x").await;
    let me = body(app.user_get(&user.key, "/me").await).await;
    assert_eq!(me["user_id"], user.id.as_str());
    // The renewal as the deployment's calendar has it: the 1st of the next
    // month in Algiers, whatever the server's own zone.
    assert_eq!(me["timezone"], "Africa/Algiers");
    let algiers = chrono::Utc::now().with_timezone(&chrono_tz::Africa::Algiers);
    let next = chrono::NaiveDate::from_ymd_opt(algiers.year(), algiers.month(), 1)
        .and_then(|d| d.checked_add_months(chrono::Months::new(1)))
        .expect("next month");
    assert_eq!(me["period"]["renews_on"], next.to_string());
    assert_eq!(me["plan"]["id"], "starter");
    assert_eq!(me["status"], "active");
    assert_eq!(me["credits"]["remaining"], 496);
    assert_eq!(me["credits"]["monthly_allowance"], 500);
    assert_eq!(me["credits"]["bonus"], 0);
    assert_eq!(me["daily"]["used"], 4);
    assert_eq!(me["daily"]["limit"], 100);
    assert!(me["period"]["resets_at"].is_string() && me["daily"]["resets_at"].is_string());

    app.wait_flushed(Duration::from_secs(10)).await;
    let usage = body(app.user_get(&user.key, "/usage?days=7&per_page=2").await).await;
    let series = usage["series"].as_array().expect("series");
    assert_eq!(series.len(), 7);
    let today = series.last().expect("today");
    assert_eq!(today["credits"], 4);
    assert_eq!(today["requests"], 2);
    assert_eq!(today["by_module"]["legal"], 3);
    assert_eq!(usage["transactions"]["total"], 4); // 3 charges + 1 refund
    assert_eq!(
        usage["transactions"]["items"].as_array().map(Vec::len),
        Some(2)
    );
    // Nobody else's rows.
    let items = usage["transactions"]["items"].as_array().expect("items");
    assert!(items.iter().all(|t| t["request_id"] != Value::Null));
    let theirs = body(app.user_get(&other.key, "/usage").await).await;
    assert_eq!(theirs["transactions"]["total"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_platforms_check_then_consume_flow_charges_once() {
    let app = TestApp::spawn().await;
    let user = app.create_user("starter").await;
    let check = body(
        app.service(
            "/check",
            json!({"user_id": user.id.as_str(), "module": "legal"}),
        )
        .await,
    )
    .await;
    assert_eq!(check["can_proceed"], true);
    assert_eq!(check["cost"], 3);
    assert_eq!(check["credits_remaining"], 500);
    assert_eq!(check["daily_used"], 0);
    assert_eq!(check["daily_limit"], 100);
    assert_eq!(
        app.balance(&user.id).await,
        (500, 0, 0),
        "check charges nothing"
    );

    let consume = json!({"user_id": user.id.as_str(), "module": "legal", "action": "ask", "request_id": "hub-req-1"});
    let first = body(app.service("/consume", consume.clone()).await).await;
    assert_eq!(
        first,
        json!({"success": true, "charged": 3, "credits_remaining": 497, "duplicate": false})
    );
    let second = body(app.service("/consume", consume).await).await;
    assert_eq!(
        second,
        json!({"success": true, "charged": 0, "credits_remaining": 497, "duplicate": true})
    );
    assert_eq!(app.balance(&user.id).await, (497, 0, 3));

    let refund = json!({"user_id": user.id.as_str(), "request_id": "hub-req-1"});
    let r = body(app.service("/refund", refund.clone()).await).await;
    assert_eq!(r["refunded"], 3);
    assert_eq!(r["credits_remaining"], 500);
    let again = app.service("/refund", refund).await;
    assert_eq!(again.status(), 404);
    assert_eq!(error_code(again).await, "charge_not_found");
    assert_eq!(
        app.events(&user.id).await,
        vec![("charge".to_owned(), 3), ("refund".to_owned(), 3)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn consume_refuses_like_the_proxy_and_charges_nothing() {
    let app = TestApp::spawn().await;
    let free = app.create_user("free").await;
    let tiny = app.create_user("tiny").await;
    let r = app
        .service(
            "/consume",
            json!({"user_id": free.id.as_str(), "module": "legal", "request_id": "a"}),
        )
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "module_not_in_plan");
    for i in 0..3 {
        let r = app
            .service("/consume", json!({"user_id": tiny.id.as_str(), "module": "legal", "request_id": format!("t{i}")}))
            .await;
        assert_eq!(r.status(), 200);
    }
    let r = app
        .service(
            "/consume",
            json!({"user_id": tiny.id.as_str(), "module": "legal", "request_id": "t9"}),
        )
        .await;
    assert_eq!(r.status(), 402);
    assert_eq!(error_code(r).await, "insufficient_credits");
    let check = body(
        app.service(
            "/check",
            json!({"user_id": tiny.id.as_str(), "module": "legal"}),
        )
        .await,
    )
    .await;
    assert_eq!(check["can_proceed"], false);
    assert_eq!(check["reason"], "insufficient_credits");
    assert_eq!(check["credits_remaining"], 1);
    for i in 0..10 {
        app.service(
            "/consume",
            json!({"user_id": free.id.as_str(), "module": "park", "request_id": format!("p{i}")}),
        )
        .await;
    }
    let r = app
        .service(
            "/consume",
            json!({"user_id": free.id.as_str(), "module": "park", "request_id": "p99"}),
        )
        .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(app.balance(&free.id).await, (80, 0, 20));
    let unknown = app
        .service(
            "/consume",
            json!({"user_id": "ghost", "module": "rag", "request_id": "g"}),
        )
        .await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(error_code(unknown).await, "unknown_user");
}

/// Moves accounts back to last month in Redis, as if the month had ended.
async fn age_accounts(app: &TestApp, users: &[&creditgate::domain::UserId]) {
    let mut con = app.redis.connection().await;
    for u in users {
        let _: () = redis::cmd("HSET")
            .arg(app.state.billing.meter().keys().account(u))
            .arg("period")
            .arg("1999-12")
            .query_async(&mut con)
            .await
            .expect("HSET");
    }
}

/// `/check` reports the plan's rate limit without using it: checked ten
/// times, the burst of 5 is all still there; spent, the check says
/// `rate_limited`.
#[tokio::test(flavor = "multi_thread")]
async fn a_check_reports_the_rate_limit_without_using_it() {
    let app = TestApp::spawn().await;
    let user = app.create_user("limited").await; // 30 a minute, burst 5
    let check = json!({"user_id": user.id.as_str(), "module": "rag"});
    for _ in 0..10 {
        let answer = body(app.service("/check", check.clone()).await).await;
        assert_eq!(answer["can_proceed"], true, "{answer}");
    }
    let mut served = 0;
    for _ in 0..8 {
        if app.call(&user.key, "/rag/q").await.status() == 200 {
            served += 1;
        }
    }
    assert_eq!(served, 5);
    let answer = body(app.service("/check", check).await).await;
    assert_eq!(answer["can_proceed"], false, "{answer}");
    assert_eq!(answer["reason"], "rate_limited");
    assert_eq!(app.balance(&user.id).await, (995, 0, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn monthly_reset_is_idempotent_keeps_bonus_and_loses_no_concurrent_charge() {
    let app = TestApp::spawn().await;
    let a = app.create_user("free").await;
    let b = app.create_user("enterprise").await;
    let c = app.create_user("starter").await; // never used: rebuilt by the reset
    for u in [&a, &b] {
        app.call(&u.key, "/rag/q").await;
    }
    let g = app
        .admin(
            Method::POST,
            "/grant",
            Some(json!({"user_id": a.id.as_str(), "credits": 7, "reason": "gift"})),
        )
        .await;
    assert_eq!(g.status(), 200);
    age_accounts(&app, &[&a.id, &b.id]).await;

    // The reset runs while `b` is being charged.
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let (client, url, key) = (app.client.clone(), app.url("/rag/q"), b.key.clone());
            tokio::spawn(async move {
                client
                    .get(url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    let first = body(app.service("/reset-monthly", json!({})).await).await;
    let mut ok = 0;
    for t in calls {
        if t.await.expect("task").expect("send") == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 40);
    assert_eq!(first["accounts"], 3);
    let second = body(app.service("/reset-monthly", json!({})).await).await;
    assert_eq!(second["reset"], 0, "{second}");
    assert_eq!(second["already_current"], 3);

    // `a`: allowance back to 100, bonus kept; `b`: exactly one reset, every charge kept.
    let (am, ab, _) = app.balance(&a.id).await;
    assert_eq!((am, ab), (100, 7));
    let (bm, bb, _) = app.balance(&b.id).await;
    assert_eq!((bm, bb), (100_000 - 40, 0));
    let resets = app.count_events(&b.id, "reset").await;
    assert_eq!(resets, 1);
    assert_eq!(app.balance(&c.id).await.0, 500);
    // The CLI does the same, for cron: nothing left to reset.
    let out = app.cli(&["reset-monthly"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reset 0 of 3"));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_lifecycle_takes_effect_in_the_proxy_at_once() {
    let app = TestApp::spawn().await;
    let created = app
        .admin(
            Method::POST,
            "/users",
            Some(json!({"name": "Amina B.", "email": "amina@example.dz", "plan": "free"})),
        )
        .await;
    assert_eq!(created.status(), 201);
    let created = body(created).await;
    let id = created["user"]["id"].as_str().expect("id").to_owned();
    let key = created["api_key"].as_str().expect("key").to_owned();
    assert_eq!(app.call(&key, "/rag/q").await.status(), 200);

    // Plan change: legal opens up at once.
    assert_eq!(app.call(&key, "/legal/q").await.status(), 403);
    let r = app
        .admin(
            Method::PUT,
            &format!("/users/{id}/plan"),
            Some(json!({"plan": "starter"})),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.call(&key, "/legal/q").await.status(), 200);

    // Grant: spendable at once.
    let r = body(
        app.admin(
            Method::POST,
            "/grant",
            Some(json!({"user_id": id, "credits": 50, "reason": "support"})),
        )
        .await,
    )
    .await;
    assert_eq!(r["credits"]["bonus"], 50);
    assert_eq!(r["credits"]["remaining"], 96 + 50);

    // Block: the proxy refuses at once; unblock restores.
    let r = app
        .admin(
            Method::POST,
            &format!("/users/{id}/block"),
            Some(json!({"reason": "fraud check"})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let blocked = app.call(&key, "/rag/q").await;
    assert_eq!(blocked.status(), 403);
    assert_eq!(error_code(blocked).await, "blocked");
    let user = body(app.admin(Method::GET, &format!("/users/{id}"), None).await).await;
    assert_eq!(user["status"], "blocked");
    let r = app
        .admin(Method::POST, &format!("/users/{id}/unblock"), None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.call(&key, "/rag/q").await.status(), 200);

    // Keys: a second key works; revoking the first stops it at once.
    let second = body(
        app.admin(Method::POST, &format!("/users/{id}/keys"), None)
            .await,
    )
    .await;
    let second_key = second["api_key"].as_str().expect("key").to_owned();
    assert_eq!(app.call(&second_key, "/rag/q").await.status(), 200);
    let key_id = created["key_id"].as_str().expect("key id");
    let r = app
        .admin(Method::DELETE, &format!("/users/{id}/keys/{key_id}"), None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.call(&key, "/rag/q").await.status(), 401);
    assert_eq!(app.user_get(&key, "/me").await.status(), 401);
    assert_eq!(app.call(&second_key, "/rag/q").await.status(), 200);

    let user = body(app.admin(Method::GET, &format!("/users/{id}"), None).await).await;
    assert_eq!(user["plan"]["id"], "starter");
    assert_eq!(user["keys"].as_array().map(Vec::len), Some(2));
    assert!(user["keys"][0]["revoked_at"].is_string());

    // The audit trail names the admin key, in order. A grant's row is
    // written with its ledger row, by the flusher.
    app.wait_flushed(Duration::from_secs(10)).await;
    let audit = body(app.admin(Method::GET, "/audit", None).await).await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .rev()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "create_user",
            "plan_change",
            "grant",
            "block",
            "unblock",
            "create_key",
            "revoke_key"
        ]
    );
    assert!(
        audit["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .all(|e| e["actor"] == "admin:ops")
    );
    // Plan changes and blocks are ledger events too.
    let kinds: Vec<String> = app
        .events(&creditgate::domain::UserId::parse(&id).expect("id"))
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for kind in ["plan_change", "grant", "block", "unblock"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn user_list_filters_and_stats_match_the_data() {
    let app = TestApp::spawn().await;
    let f1 = app.create_user("free").await;
    let _f2 = app.create_user("free").await;
    let s1 = app.create_user("starter").await;
    let e1 = app.create_user("enterprise").await;
    for _ in 0..3 {
        app.call(&s1.key, "/legal/q").await;
    }
    app.call(&f1.key, "/rag/q").await;
    app.call(&e1.key, "/park/q").await;
    app.admin(Method::POST, &format!("/users/{}/block", e1.id), None)
        .await;
    app.wait_flushed(Duration::from_secs(10)).await;

    let free = body(app.admin(Method::GET, "/users?plan=free", None).await).await;
    assert_eq!(free["total"], 2);
    assert!(
        free["users"]
            .as_array()
            .expect("users")
            .iter()
            .all(|u| u["plan"] == "free")
    );
    let blocked = body(app.admin(Method::GET, "/users?status=blocked", None).await).await;
    assert_eq!(blocked["total"], 1);
    assert_eq!(blocked["users"][0]["id"], e1.id.as_str());
    let page = body(
        app.admin(Method::GET, "/users?per_page=1&page=2", None)
            .await,
    )
    .await;
    assert_eq!(page["total"], 4);
    assert_eq!(page["users"].as_array().map(Vec::len), Some(1));
    let s1_row = body(
        app.admin(Method::GET, &format!("/users?q={}", s1.id), None)
            .await,
    )
    .await;
    assert_eq!(s1_row["users"][0]["credits_remaining"], 491);
    assert_eq!(s1_row["users"][0]["used_this_month"], 9);

    let stats = body(app.admin(Method::GET, "/stats?days=30", None).await).await;
    assert_eq!(stats["timezone"], "Africa/Algiers");
    assert_eq!(stats["users"]["total"], 4);
    assert_eq!(stats["users"]["by_plan"]["free"], 2);
    assert_eq!(stats["users"]["by_status"]["blocked"], 1);
    // Active users only: starter 2000 (enterprise is blocked, free is 0).
    assert_eq!(stats["revenue"]["monthly_dzd"], 2000);
    assert_eq!(stats["consumption"]["today"]["legal"]["credits"], 9);
    assert_eq!(stats["consumption"]["this_month"]["rag"]["credits"], 1);
    assert_eq!(stats["top_consumers"][0]["user_id"], s1.id.as_str());
    let daily = stats["daily"].as_array().expect("daily");
    assert_eq!(daily.len(), 30);
    assert_eq!(daily.last().map(|d| d["credits"].clone()), Some(json!(12)));
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_exports_parse_back_and_match_the_ledger() {
    let app = TestApp::spawn().await;
    let tricky = app
        .admin(
            Method::POST,
            "/users",
            Some(json!({"name": "Benali, \"Sami\"", "plan": "free"})),
        )
        .await;
    let tricky = body(tricky).await;
    let key = tricky["api_key"].as_str().expect("key").to_owned();
    let formula = app
        .admin(
            Method::POST,
            "/users",
            Some(json!({"name": "=HYPERLINK(\"x\")", "plan": "starter"})),
        )
        .await;
    assert_eq!(formula.status(), 201);
    for p in ["/rag/a", "/rag/status/500", "/park/b"] {
        app.call(&key, p).await;
    }
    app.wait_flushed(Duration::from_secs(10)).await;

    let users = app.admin(Method::GET, "/export.csv", None).await;
    assert_eq!(users.headers()["content-type"], "text/csv; charset=utf-8");
    let text = users.text().await.expect("csv");
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let rows: Vec<csv::StringRecord> = reader
        .records()
        .collect::<Result<_, _>>()
        .expect("valid CSV");
    assert_eq!(rows.len(), 2);
    assert_eq!(&rows[0][1], "Benali, \"Sami\"");
    assert_eq!(
        &rows[1][1], "'=HYPERLINK(\"x\")",
        "formulas are neutralised"
    );

    let usage = app
        .admin(Method::GET, "/usage.csv", None)
        .await
        .text()
        .await
        .expect("csv");
    let mut reader = csv::Reader::from_reader(usage.as_bytes());
    let headers = reader.headers().expect("headers").clone();
    assert_eq!(&headers[0], "event_id");
    let rows: Vec<csv::StringRecord> = reader
        .records()
        .collect::<Result<_, _>>()
        .expect("valid CSV");
    let pool = app.pool().await;
    // A day's rows come in storage order, not sorted (docs/API.md).
    let ledger: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT event_id, kind, amount FROM ledger_events ORDER BY event_id")
            .fetch_all(&pool)
            .await
            .expect("ledger");
    let mut from_csv: Vec<(String, String, i64)> = rows
        .iter()
        .map(|r| {
            (
                r[0].to_owned(),
                r[2].to_owned(),
                r[5].parse().expect("amount"),
            )
        })
        .collect();
    from_csv.sort();
    assert_eq!(from_csv, ledger);
    assert_eq!(ledger.len(), 4); // charge, charge+refund, charge
    let empty = app
        .admin(
            Method::GET,
            "/usage.csv?from=2001-01-01&to=2001-01-31",
            None,
        )
        .await
        .text()
        .await
        .expect("csv");
    assert_eq!(empty.lines().count(), 1, "header only");
}

/// The export reads day by day: only the days asked, each day whole, the
/// days in order even when their rows were stored out of order, and a
/// range reaching back centuries costs only the partitions that exist.
#[tokio::test(flavor = "multi_thread")]
async fn usage_export_gives_the_days_asked_in_day_order() {
    let app = TestApp::spawn().await;
    let pool = app.pool().await;
    let base = chrono::NaiveDate::from_ymd_opt(2025, 3, 30).expect("date");
    // Stored newest day first, across a month boundary (two partitions).
    let days: Vec<chrono::NaiveDate> = [5u64, 3, 2, 0]
        .iter()
        .map(|d| base + chrono::Days::new(*d))
        .collect();
    for day in &days {
        sqlx::query("SELECT ledger_ensure_partition($1)")
            .bind(day)
            .execute(&pool)
            .await
            .expect("partition");
        for n in 0..3 {
            sqlx::query(
                "INSERT INTO ledger_events (event_id, user_id, kind, module, amount, actor, local_day, occurred_at)
                 VALUES ($1, 'u_export', 'charge', 'rag', 1, 'proxy', $2, $2::timestamptz + make_interval(hours => $3))",
            )
            .bind(format!("ev-{day}-{n}"))
            .bind(day)
            .bind(n)
            .execute(&pool)
            .await
            .expect("insert");
        }
    }
    let export = |from: &'static str, to: &'static str| {
        let app = &app;
        async move {
            let text = app
                .admin(
                    Method::GET,
                    &format!("/usage.csv?from={from}&to={to}"),
                    None,
                )
                .await
                .text()
                .await
                .expect("csv");
            let mut reader = csv::Reader::from_reader(text.as_bytes());
            reader
                .records()
                .map(|r| {
                    let r = r.expect("valid CSV");
                    (r[10].to_owned(), r[0].to_owned())
                })
                .collect::<Vec<(String, String)>>()
        }
    };
    // 04-04 and 03-30 are outside the range; 04-02 was stored before
    // 04-01 and still comes after it.
    let rows = export("2025-03-31", "2025-04-02").await;
    let got_days: Vec<&str> = rows.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(
        got_days,
        [
            "2025-04-01",
            "2025-04-01",
            "2025-04-01",
            "2025-04-02",
            "2025-04-02",
            "2025-04-02"
        ]
    );
    let mut ids: Vec<&str> = rows.iter().map(|(_, id)| id.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "ev-2025-04-01-0",
            "ev-2025-04-01-1",
            "ev-2025-04-01-2",
            "ev-2025-04-02-0",
            "ev-2025-04-02-1",
            "ev-2025-04-02-2"
        ]
    );
    let all = export("0001-01-01", "9999-12-31").await;
    let all_days: Vec<&str> = all.iter().map(|(d, _)| d.as_str()).collect();
    let mut sorted = all_days.clone();
    sorted.sort();
    assert_eq!(all_days, sorted, "days in order");
    assert_eq!(all.len(), 12, "every row once");
}

/// An export is one view of the ledger: a row written to a later day while
/// the export is still streaming an earlier one is not in it. The first
/// day is far larger than every buffer between Postgres and the client,
/// so the later day's query only runs after the insert.
#[tokio::test(flavor = "multi_thread")]
async fn usage_export_is_one_consistent_view_while_it_streams() {
    let app = TestApp::spawn().await;
    let pool = app.pool().await;
    let first = chrono::NaiveDate::from_ymd_opt(2025, 6, 1).expect("date");
    let second = chrono::NaiveDate::from_ymd_opt(2025, 6, 2).expect("date");
    sqlx::query("SELECT ledger_ensure_partition($1)")
        .bind(first)
        .execute(&pool)
        .await
        .expect("partition");
    sqlx::query(
        "INSERT INTO ledger_events (event_id, user_id, kind, module, amount, actor, local_day, occurred_at)
         SELECT 'ev-big-' || i, 'u_view', 'charge', 'rag', 1, 'proxy', $1, $1::timestamptz
         FROM generate_series(1, 200000) i",
    )
    .bind(first)
    .execute(&pool)
    .await
    .expect("first day");
    let mut response = app
        .admin(
            Method::GET,
            "/usage.csv?from=2025-06-01&to=2025-06-02",
            None,
        )
        .await;
    assert_eq!(response.status(), 200);
    let mut text = response
        .chunk()
        .await
        .expect("read")
        .map(|b| b.to_vec())
        .unwrap_or_default();
    sqlx::query(
        "INSERT INTO ledger_events (event_id, user_id, kind, module, amount, actor, local_day, occurred_at)
         VALUES ('ev-late', 'u_view', 'charge', 'rag', 1, 'proxy', $1, $1::timestamptz)",
    )
    .bind(second)
    .execute(&pool)
    .await
    .expect("late row");
    while let Some(chunk) = response.chunk().await.expect("read") {
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(text).expect("utf-8");
    assert_eq!(
        text.lines().count(),
        1 + 200_000,
        "header and the first day"
    );
    assert!(
        !text.contains("ev-late"),
        "a row written after the export began"
    );
    // The next export sees it.
    let again = app
        .admin(
            Method::GET,
            "/usage.csv?from=2025-06-02&to=2025-06-02",
            None,
        )
        .await
        .text()
        .await
        .expect("csv");
    assert!(again.contains("ev-late"));
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_for_one_api_never_open_another() {
    let app = TestApp::spawn().await;
    let user = app.create_user("free").await;
    type Case<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (Method::GET, "/api/admin/billing/users", vec![]),
        (
            Method::GET,
            "/api/admin/billing/users",
            vec![("x-admin-key", "wrong-key-000")],
        ),
        (
            Method::GET,
            "/api/admin/billing/users",
            vec![("x-service-key", SERVICE_KEY)],
        ),
        (
            Method::GET,
            "/api/admin/billing/users",
            vec![("x-admin-key", SERVICE_KEY)],
        ),
        (
            Method::GET,
            "/api/admin/billing/stats",
            vec![("authorization", "Bearer USER")],
        ),
        (Method::POST, "/api/credits/check", vec![]),
        (
            Method::POST,
            "/api/credits/check",
            vec![("x-service-key", ADMIN_KEY)],
        ),
        (
            Method::POST,
            "/api/credits/consume",
            vec![("x-admin-key", ADMIN_KEY)],
        ),
        (Method::GET, "/api/billing/me", vec![]),
        (
            Method::GET,
            "/api/billing/me",
            vec![("x-admin-key", ADMIN_KEY)],
        ),
        (
            Method::GET,
            "/api/billing/me",
            vec![("x-user-id", "someone")],
        ),
    ];
    for (method, path, headers) in cases {
        let mut req = app.client.request(method.clone(), app.url(path));
        for (k, v) in &headers {
            req = req.header(*k, v.replace("USER", &user.key));
        }
        let r = req.send().await.expect("send");
        assert_eq!(r.status(), 401, "{method} {path} {headers:?}");
        assert_eq!(error_code(r).await, "unauthenticated");
    }
    assert_eq!(app.user_get(&user.key, "/me").await.status(), 200);
}

/// Status, error code and whether anything changed, for one bad request.
struct Bad {
    method: Method,
    path: String,
    body: Option<&'static str>,
    auth: &'static str,
    status: u16,
    code: &'static str,
}

fn bad(
    method: Method,
    path: &str,
    body: Option<&'static str>,
    auth: &'static str,
    status: u16,
    code: &'static str,
) -> Bad {
    Bad {
        method,
        path: path.to_owned(),
        body,
        auth,
        status,
        code,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_get_clear_errors_and_change_nothing() {
    let app = TestApp::spawn().await;
    let user = app.create_user("starter").await;
    app.call(&user.key, "/rag/warm").await;
    let uid = user.id.as_str().to_owned();
    let u = |p: &str| p.replace("UID", &uid);
    let big = Box::leak(
        format!(
            "{{\"name\": \"{}\", \"plan\": \"free\"}}",
            "x".repeat(70_000)
        )
        .into_boxed_str(),
    );
    let grant_big = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"credits\": 1000001, \"reason\": \"x\"}}")
            .into_boxed_str(),
    );
    let grant_neg = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"credits\": -5, \"reason\": \"x\"}}").into_boxed_str(),
    );
    let grant_zero = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"credits\": 0, \"reason\": \"x\"}}").into_boxed_str(),
    );
    let grant_frac = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"credits\": 1.5, \"reason\": \"x\"}}").into_boxed_str(),
    );
    let grant_str = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"credits\": \"10\", \"reason\": \"x\"}}")
            .into_boxed_str(),
    );
    let grant_noreason = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"credits\": 10, \"reason\": \"  \"}}").into_boxed_str(),
    );
    let grant_huge = Box::leak(
        format!(
            "{{\"user_id\": \"{uid}\", \"credits\": 99999999999999999999999, \"reason\": \"x\"}}"
        )
        .into_boxed_str(),
    );
    let grant_extra = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"credits\": 5, \"reason\": \"x\", \"admin\": true}}")
            .into_boxed_str(),
    );
    let grant_nul = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"credits\": 5, \"reason\": \"a\\u0000b\"}}")
            .into_boxed_str(),
    );
    let consume_nomod = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"module\": \"teleport\", \"request_id\": \"r\"}}")
            .into_boxed_str(),
    );
    let consume_norid =
        Box::leak(format!("{{\"user_id\": \"{uid}\", \"module\": \"rag\"}}").into_boxed_str());
    let consume_badrid = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"module\": \"rag\", \"request_id\": \"a b\"}}")
            .into_boxed_str(),
    );
    let consume_badaction = Box::leak(format!("{{\"user_id\": \"{uid}\", \"module\": \"rag\", \"action\": \"DROP\", \"request_id\": \"r\"}}").into_boxed_str());
    let refund_none = Box::leak(
        format!("{{\"user_id\": \"{uid}\", \"request_id\": \"never\"}}").into_boxed_str(),
    );
    use Method as M;
    let cases = vec![
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some("{not json"),
            "admin",
            400,
            "invalid_json",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some("[]"),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some("{\"name\": \"A\"}"),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some("{\"name\": \"A\", \"plan\": \"gold\"}"),
            "admin",
            400,
            "unknown_plan",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some("{\"name\": \"\", \"plan\": \"free\"}"),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some("{\"name\": \"A\", \"plan\": \"free\", \"email\": \"nope\"}"),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some("{\"name\": 5, \"plan\": \"free\"}"),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some("{\"name\": \"A\", \"plan\": \"free\", \"role\": \"admin\"}"),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some("{\"name\": \"A\", \"plan\": \"free\", \"id\": \"bad id\"}"),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users",
            Some(big),
            "admin",
            413,
            "payload_too_large",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some(grant_big),
            "admin",
            400,
            "invalid_amount",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some(grant_neg),
            "admin",
            400,
            "invalid_amount",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some(grant_zero),
            "admin",
            400,
            "invalid_amount",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some(grant_nul),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some(grant_frac),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some(grant_str),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some(grant_noreason),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some(grant_huge),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some(grant_extra),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/admin/billing/grant",
            Some("{\"user_id\": \"ghost\", \"credits\": 5, \"reason\": \"x\"}"),
            "admin",
            404,
            "unknown_user",
        ),
        bad(
            M::PUT,
            &u("/api/admin/billing/users/UID/plan"),
            Some("{\"plan\": \"platinum\"}"),
            "admin",
            400,
            "unknown_plan",
        ),
        bad(
            M::PUT,
            "/api/admin/billing/users/ghost/plan",
            Some("{\"plan\": \"free\"}"),
            "admin",
            404,
            "unknown_user",
        ),
        bad(
            M::POST,
            "/api/admin/billing/users/ghost/block",
            None,
            "admin",
            404,
            "unknown_user",
        ),
        bad(
            M::POST,
            &u("/api/admin/billing/users/UID/block"),
            Some("{\"reason\": 42}"),
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::DELETE,
            &u("/api/admin/billing/users/UID/keys/not-a-uuid"),
            None,
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::DELETE,
            &u("/api/admin/billing/users/UID/keys/00000000-0000-0000-0000-000000000000"),
            None,
            "admin",
            404,
            "unknown_key",
        ),
        bad(
            M::GET,
            "/api/admin/billing/users?page=0",
            None,
            "admin",
            400,
            "invalid_query",
        ),
        bad(
            M::GET,
            "/api/admin/billing/users?per_page=1000",
            None,
            "admin",
            400,
            "invalid_query",
        ),
        bad(
            M::GET,
            "/api/admin/billing/users?page=abc",
            None,
            "admin",
            400,
            "invalid_query",
        ),
        bad(
            M::GET,
            "/api/admin/billing/users?plan=gold",
            None,
            "admin",
            400,
            "unknown_plan",
        ),
        bad(
            M::GET,
            "/api/admin/billing/users?status=sleeping",
            None,
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::GET,
            "/api/admin/billing/users?q=a%00b",
            None,
            "admin",
            400,
            "invalid_query",
        ),
        bad(
            M::GET,
            "/api/admin/billing/users?sort=name",
            None,
            "admin",
            400,
            "invalid_query",
        ),
        bad(
            M::GET,
            "/api/admin/billing/usage.csv?from=yesterday",
            None,
            "admin",
            400,
            "invalid_query",
        ),
        bad(
            M::GET,
            "/api/admin/billing/usage.csv?from=2026-11-10&to=2026-11-01",
            None,
            "admin",
            400,
            "invalid_query",
        ),
        bad(
            M::GET,
            "/api/admin/billing/stats?days=0",
            None,
            "admin",
            400,
            "invalid_query",
        ),
        bad(
            M::GET,
            "/api/admin/billing/users/bad%20id",
            None,
            "admin",
            400,
            "invalid_request",
        ),
        bad(
            M::PATCH,
            "/api/admin/billing/users",
            None,
            "admin",
            405,
            "method_not_allowed",
        ),
        bad(
            M::POST,
            "/api/credits/consume",
            Some(consume_nomod),
            "service",
            400,
            "unknown_module",
        ),
        bad(
            M::POST,
            "/api/credits/consume",
            Some(consume_norid),
            "service",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/credits/consume",
            Some(consume_badrid),
            "service",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/credits/consume",
            Some(consume_badaction),
            "service",
            400,
            "invalid_request",
        ),
        bad(
            M::POST,
            "/api/credits/refund",
            Some(refund_none),
            "service",
            404,
            "charge_not_found",
        ),
        bad(
            M::POST,
            "/api/credits/check",
            Some("{\"user_id\": \"\", \"module\": \"rag\"}"),
            "service",
            400,
            "invalid_request",
        ),
        bad(
            M::GET,
            "/api/credits/check",
            None,
            "service",
            405,
            "method_not_allowed",
        ),
        bad(
            M::GET,
            "/api/billing/usage?days=9999",
            None,
            "user",
            400,
            "invalid_query",
        ),
        bad(
            M::GET,
            "/api/billing/usage?days=-1",
            None,
            "user",
            400,
            "invalid_query",
        ),
        bad(
            M::POST,
            "/api/billing/me",
            None,
            "user",
            405,
            "method_not_allowed",
        ),
        bad(
            M::GET,
            "/api/billing/nothing",
            None,
            "user",
            404,
            "not_found",
        ),
    ];
    let pool = app.pool().await;
    let snapshot = |pool: sqlx::PgPool| async move {
        let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
            .fetch_one(&pool)
            .await
            .expect("count");
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_events")
            .fetch_one(&pool)
            .await
            .expect("count");
        let plan: String =
            sqlx::query_scalar("SELECT string_agg(plan || status, ',' ORDER BY id) FROM users")
                .fetch_one(&pool)
                .await
                .expect("plans");
        (users, events, plan)
    };
    app.wait_flushed(Duration::from_secs(10)).await;
    let before = (snapshot(pool.clone()).await, app.balance(&user.id).await);
    for case in &cases {
        let mut req = app.client.request(case.method.clone(), app.url(&case.path));
        req = match case.auth {
            "admin" => req.header("x-admin-key", ADMIN_KEY),
            "service" => req.header("x-service-key", SERVICE_KEY),
            _ => req.bearer_auth(&user.key),
        };
        if let Some(b) = case.body {
            req = req.header("content-type", "application/json").body(b);
        }
        let r = req.send().await.expect("send");
        let status = r.status().as_u16();
        let code = error_code(r).await;
        assert_eq!(
            (status, code.as_str()),
            (case.status, case.code),
            "{} {}",
            case.method,
            case.path
        );
    }
    app.wait_flushed(Duration::from_secs(10)).await;
    let after = (snapshot(pool.clone()).await, app.balance(&user.id).await);
    assert_eq!(before, after, "a refused request changed something");
    // The audit trail saw nothing either (beyond the test's own user).
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM admin_audit WHERE actor <> 'test'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(audited, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn blocks_and_revocations_made_on_one_instance_apply_on_another_at_once() {
    let app = TestApp::spawn().await;
    let (other, _stop) = app.second_instance().await;
    let user = app.create_user("free").await;
    let second_key = body(
        app.admin(Method::POST, &format!("/users/{}/keys", user.id), None)
            .await,
    )
    .await;
    let second_key = second_key["api_key"].as_str().expect("key").to_owned();
    let via_other = |key: String| {
        let client = app.client.clone();
        async move {
            client
                .get(format!("http://{other}/rag/q"))
                .bearer_auth(key)
                .send()
                .await
                .expect("send")
                .status()
                .as_u16()
        }
    };
    // Both keys are now in the other instance's cache.
    assert_eq!(via_other(user.key.clone()).await, 200);
    assert_eq!(via_other(second_key.clone()).await, 200);

    let r = app
        .admin(
            Method::DELETE,
            &format!("/users/{}/keys/{}", user.id, user.key_id),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        via_other(user.key.clone()).await,
        401,
        "revoked key still served"
    );
    assert_eq!(via_other(second_key.clone()).await, 200);

    app.admin(Method::POST, &format!("/users/{}/block", user.id), None)
        .await;
    assert_eq!(
        via_other(second_key.clone()).await,
        403,
        "blocked user still served"
    );
    app.admin(Method::POST, &format!("/users/{}/unblock", user.id), None)
        .await;
    assert_eq!(via_other(second_key).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_auto_block_policy_blocks_an_emptied_account_until_credits_return() {
    let app = TestApp::builder()
        .env("CREDITGATE_METERING__AUTO_BLOCK_EXHAUSTED", "true")
        .start()
        .await;
    let user = app.create_user("tiny").await; // 10 credits, rag costs 1
    for _ in 0..10 {
        assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    }
    let r = app.call(&user.key, "/rag/q").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "blocked");
    let pool = app.pool().await;
    let user_id = user.id.as_str().to_owned();
    common::wait_until("the auto-block audit row", Duration::from_secs(5), || {
        let (pool, user_id) = (pool.clone(), user_id.clone());
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM admin_audit WHERE action = 'auto_block' AND user_id = $1
                 AND actor = 'policy:auto_block'",
            )
            .bind(user_id)
            .fetch_one(&pool)
            .await
            .is_ok_and(|n| n == 1)
        }
    })
    .await;
    // A grant lifts it by itself.
    app.admin(
        Method::POST,
        "/grant",
        Some(json!({"user_id": user.id.as_str(), "credits": 2, "reason": "top-up"})),
    )
    .await;
    assert_eq!(app.call(&user.key, "/rag/q").await.status(), 200);
    assert_eq!(app.balance(&user.id).await, (0, 1, 11));

    // Policy off (the default): an empty account gets 402, not 403.
    let plain = TestApp::spawn().await;
    let user = plain.create_user("tiny").await;
    for _ in 0..10 {
        plain.call(&user.key, "/rag/q").await;
    }
    let r = plain.call(&user.key, "/rag/q").await;
    assert_eq!(r.status(), 402);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_describes_every_endpoint() {
    let app = TestApp::spawn().await;
    let doc = body(
        app.client
            .get(app.url("/api/openapi.json"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let expected = [
        ("/api/billing/me", "get"),
        ("/api/billing/usage", "get"),
        ("/api/billing/plans", "get"),
        ("/api/billing/credit-costs", "get"),
        ("/api/admin/billing/users", "get"),
        ("/api/admin/billing/users", "post"),
        ("/api/admin/billing/users/{id}", "get"),
        ("/api/admin/billing/users/{id}/keys", "post"),
        ("/api/admin/billing/users/{id}/keys/{key_id}", "delete"),
        ("/api/admin/billing/users/{id}/plan", "put"),
        ("/api/admin/billing/grant", "post"),
        ("/api/admin/billing/users/{id}/block", "post"),
        ("/api/admin/billing/users/{id}/unblock", "post"),
        ("/api/admin/billing/stats", "get"),
        ("/api/admin/billing/export.csv", "get"),
        ("/api/admin/billing/usage.csv", "get"),
        ("/api/admin/billing/audit", "get"),
        ("/api/credits/check", "post"),
        ("/api/credits/consume", "post"),
        ("/api/credits/refund", "post"),
        ("/api/credits/reset-monthly", "post"),
    ];
    for (path, method) in expected {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["ConsumeBody"]["properties"]["request_id"].is_object());
    assert!(schemas["ErrorBody"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["admin_key"]["name"],
        "X-Admin-Key"
    );
    // Fields naming a plan or a module list this deployment's ids.
    let ids = |v: &serde_json::Value| -> Vec<String> {
        let mut ids: Vec<String> = v
            .as_array()
            .expect("an enum")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    };
    let mut modules: Vec<String> = app
        .state
        .billing
        .catalog()
        .modules()
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    modules.sort();
    let mut plans: Vec<String> = app
        .state
        .billing
        .catalog()
        .plans()
        .iter()
        .map(|p| p.id.to_string())
        .collect();
    plans.sort();
    for schema in ["CheckBody", "ConsumeBody"] {
        assert_eq!(
            ids(&schemas[schema]["properties"]["module"]["enum"]),
            modules
        );
    }
    for schema in ["CreateUserBody", "PlanBody"] {
        assert_eq!(ids(&schemas[schema]["properties"]["plan"]["enum"]), plans);
    }
}

/// With `database.read_url`, reports are read from the replica; balances
/// and everything the gateway writes stay on the primary. The "replica"
/// here is a second database holding other roll-ups, so each answer shows
/// which one it came from.
#[tokio::test(flavor = "multi_thread")]
async fn reports_read_the_replica_of_database_read_url() {
    let replica = common::TestDb::create().await;
    let app = TestApp::builder()
        .env("CREDITGATE_DATABASE__READ_URL", &replica.url)
        .start()
        .await;
    let user = app.create_user("starter").await;
    assert_eq!(app.call(&user.key, "/rag/a").await.status(), 200);
    app.wait_flushed(Duration::from_secs(10)).await;

    let today = app.state.billing.calendar().now().day.to_string();
    let pool = sqlx::PgPool::connect(&replica.url).await.expect("replica");
    sqlx::query(
        "INSERT INTO usage_daily (user_id, day, module, charged_credits, charges,
            refunded_credits, refunds) VALUES ($1, $2::date, 'legal', 42, 7, 0, 0)",
    )
    .bind(user.id.as_str())
    .bind(&today)
    .execute(&pool)
    .await
    .expect("replica usage_daily");
    sqlx::query(
        "INSERT INTO usage_module_daily (day, module, shard, charged_credits, charges,
            refunded_credits, refunds) VALUES ($1::date, 'legal', 0, 42, 7, 0, 0)",
    )
    .bind(&today)
    .execute(&pool)
    .await
    .expect("replica usage_module_daily");

    let usage = body(app.user_get(&user.key, "/usage?days=1").await).await;
    let day = &usage["series"][0];
    assert_eq!(day["credits"], 42, "{usage}");
    assert_eq!(day["by_module"]["legal"], 42);
    assert_eq!(day["by_module"]["rag"], Value::Null);
    assert_eq!(
        usage["transactions"]["total"], 0,
        "the replica's ledger is empty"
    );

    let stats = body(app.admin(Method::GET, "/stats?days=1", None).await).await;
    assert_eq!(
        stats["consumption"]["today"]["legal"]["credits"], 42,
        "{stats}"
    );
    assert_eq!(stats["consumption"]["today"]["rag"], Value::Null);
    assert_eq!(stats["users"]["total"], 0, "the replica has no users");

    // The balance is Redis's, and the user detail's row the primary's.
    let me = body(app.user_get(&user.key, "/me").await).await;
    assert_eq!(me["credits"]["remaining"], 499);
    let detail = body(
        app.admin(Method::GET, &format!("/users/{}", user.id), None)
            .await,
    )
    .await;
    assert_eq!(detail["id"], user.id.as_str());
    pool.close().await;
}

/// Every pool of the gateway runs with its statement timeout and without
/// JIT (which only ever cost the export's scan its compile time).
#[tokio::test]
async fn database_sessions_have_a_statement_timeout_and_no_jit() {
    let app = TestApp::spawn().await;
    for pool in [app.state.billing.accounts().pool(), &app.state.reports] {
        let (jit, timeout): (String, String) =
            sqlx::query_as("SELECT current_setting('jit'), current_setting('statement_timeout')")
                .fetch_one(pool)
                .await
                .expect("settings");
        assert_eq!(jit, "off");
        assert_eq!(timeout, "5s");
    }
}

/// A user manages its own keys: names, a module scope and an expiry;
/// the new key is shown once; a scoped key cannot mint wider ones; bad
/// input changes nothing; at most `auth.max_keys_per_user`, even under
/// parallel requests; last use is recorded in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_manage_their_own_keys() {
    let app = TestApp::builder()
        .env("CREDITGATE_AUTH__MAX_KEYS_PER_USER", "3")
        .start()
        .await;
    let user = app.create_user("starter").await;
    let post = |key: &str, body: Value| {
        app.client
            .post(app.url("/api/billing/keys"))
            .bearer_auth(key.to_owned())
            .json(&body)
            .send()
    };
    let listed = body(app.user_get(&user.key, "/keys").await).await;
    assert_eq!(listed["max_keys"], 3);
    assert_eq!(listed["keys"].as_array().map(Vec::len), Some(1));

    let created = post(
        &user.key,
        json!({"name": "CI, RAG only", "modules": ["rag"]}),
    )
    .await
    .expect("send");
    assert_eq!(created.status(), 201);
    let created = body(created).await;
    let scoped_key = created["api_key"].as_str().expect("shown once").to_owned();
    let scoped_id = created["key"]["id"].as_str().expect("id").to_owned();
    assert_eq!(created["key"]["name"], "CI, RAG only");
    assert_eq!(created["key"]["modules"], json!(["rag"]));
    assert!(created["key"].get("api_key").is_none());
    assert_eq!(app.call(&scoped_key, "/rag/q").await.status(), 200);
    let r = app.call(&scoped_key, "/legal/q").await;
    assert_eq!(error_code(r).await, "key_scope");
    // A scoped key cannot mint itself a wider one.
    let r = post(&scoped_key, json!({"name": "wider"}))
        .await
        .expect("send");
    assert_eq!(r.status(), 403);

    // Bad input: a clear error each, and nothing created.
    for (bad, code) in [
        (json!({"name": ""}), "invalid_key"),
        (json!({"name": "x", "modules": ["fiscal"]}), "invalid_key"),
        (json!({"name": "x", "modules": []}), "invalid_key"),
        (json!({"name": "x", "modules": ["../legal"]}), "invalid_key"),
        (
            json!({"name": "x", "expires_at": "2001-01-01T00:00:00Z"}),
            "invalid_key",
        ),
        (
            json!({"name": "x", "expires_at": "tomorrow"}),
            "invalid_request",
        ),
        (json!({"name": "x", "admin": true}), "invalid_request"),
        (json!({"name": "x".repeat(65)}), "invalid_key"),
    ] {
        let r = post(&user.key, bad.clone()).await.expect("send");
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(error_code(r).await, code, "{bad}");
    }
    let listed = body(app.user_get(&user.key, "/keys").await).await;
    assert_eq!(listed["keys"].as_array().map(Vec::len), Some(2));

    // Two live keys, three allowed: ten parallel requests make exactly one.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let request = post(&user.key, json!({"name": format!("parallel {i}")}));
            async move { request.await.expect("send").status().as_u16() }
        })
        .collect();
    let statuses = futures_util::future::join_all(tasks).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        9,
        "{statuses:?}"
    );

    // Revoked by its owner: refused at once. Someone else's key or no key
    // at all: 404, nothing revoked.
    let delete = |key: &str, id: &str| {
        app.client
            .delete(app.url(&format!("/api/billing/keys/{id}")))
            .bearer_auth(key.to_owned())
            .send()
    };
    let other = app.create_user("free").await;
    let r = delete(&other.key, &scoped_id).await.expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(app.call(&scoped_key, "/rag/q").await.status(), 200);
    let r = delete(&user.key, &scoped_id).await.expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(app.call(&scoped_key, "/rag/q").await.status(), 401);
    let r = delete(&user.key, "0190a0a0-0000-7000-8000-000000000000")
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let r = delete(&user.key, "not-a-uuid").await.expect("send");
    assert_eq!(r.status(), 400);

    // Last use: noted per call, written in one batch.
    app.state
        .billing
        .accounts()
        .flush_key_uses()
        .await
        .expect("flush");
    let listed = body(app.user_get(&user.key, "/keys").await).await;
    let keys = listed["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2, "the revoked key is no longer listed");
    assert!(keys.iter().all(|k| k["id"] != scoped_id.as_str()));
    // The admin sees every key by name and prefix, revoked ones included,
    // and when the scoped one was last used; never a key.
    let detail = body(
        app.admin(Method::GET, &format!("/users/{}", user.id), None)
            .await,
    )
    .await;
    let admin_keys = detail["keys"].as_array().expect("keys");
    assert_eq!(admin_keys.len(), 3);
    let scoped = admin_keys
        .iter()
        .find(|k| k["id"] == scoped_id.as_str())
        .expect("scoped key");
    assert_eq!(scoped["name"], "CI, RAG only");
    assert!(scoped["last_used_at"].is_string(), "{scoped}");
    assert!(scoped["revoked_at"].is_string());
    assert!(!detail.to_string().contains(&scoped_key));
}

#[tokio::test(flavor = "multi_thread")]
async fn monthly_recurring_revenue_follows_the_plan_and_block_history() {
    use chrono::{Months, TimeZone};
    let app = TestApp::spawn().await;
    let pool = app.pool().await;
    let algiers = chrono_tz::Africa::Algiers;
    let this_month = chrono::Utc::now()
        .with_timezone(&algiers)
        .date_naive()
        .with_day(1)
        .expect("first");
    let at = |months_back: u32, day: u32| {
        let d = this_month
            .checked_sub_months(Months::new(months_back))
            .and_then(|d| d.with_day(day))
            .expect("date");
        algiers
            .from_local_datetime(&d.and_hms_opt(12, 0, 0).expect("noon"))
            .single()
            .expect("instant")
            .with_timezone(&chrono::Utc)
    };
    // A: Starter (2,000) for three months. B: Starter, then Pro (5,000)
    // from the middle of last month. C: Enterprise (50,000), created this
    // month and blocked now.
    let a = app.create_user("starter").await;
    let b = app.create_user("starter").await;
    let c = app.create_user("enterprise").await;
    for u in [&a, &b] {
        sqlx::query("UPDATE users SET created_at = $2 WHERE id = $1")
            .bind(u.id.as_str())
            .bind(at(3, 2))
            .execute(&pool)
            .await
            .expect("backdate");
    }
    let plan = app
        .admin(
            Method::PUT,
            &format!("/users/{}/plan", b.id.as_str()),
            Some(json!({"plan": "enterprise"})),
        )
        .await;
    assert_eq!(plan.status(), 200);
    sqlx::query("UPDATE admin_audit SET at = $2 WHERE user_id = $1 AND action = 'plan_change'")
        .bind(b.id.as_str())
        .bind(at(1, 15))
        .execute(&pool)
        .await
        .expect("backdate the change");
    let blocked = app
        .admin(
            Method::POST,
            &format!("/users/{}/block", c.id.as_str()),
            None,
        )
        .await;
    assert_eq!(blocked.status(), 200);

    let stats = body(app.admin(Method::GET, "/stats?months=4", None).await).await;
    let months: Vec<(String, i64)> = stats["revenue"]["by_month"]
        .as_array()
        .expect("by_month")
        .iter()
        .map(|m| {
            (
                m["month"].as_str().unwrap_or("").to_owned(),
                m["dzd"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let month = |back: u32| {
        this_month
            .checked_sub_months(Months::new(back))
            .expect("month")
            .format("%Y-%m")
            .to_string()
    };
    assert_eq!(
        months,
        vec![
            (month(3), 4_000), // A and B on Starter
            (month(2), 4_000),
            (month(1), 52_000), // B on Enterprise since the 15th
            (month(0), 52_000), // C blocked: not counted
        ]
    );
    assert_eq!(
        stats["revenue"]["monthly_dzd"], 52_000,
        "this month's figure is the current revenue"
    );
    assert!(
        body(app.admin(Method::GET, "/stats", None).await).await["revenue"]
            .get("by_month")
            .is_none()
    );
    let r = app.admin(Method::GET, "/stats?months=25", None).await;
    assert_eq!(r.status(), 400);
}

/// The API plane is an axum router: in an authenticated group the key is
/// checked before the route, a 405 names the allowed methods and is the
/// JSON error, and a trailing slash is ignored.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_checks_keys_before_routes_and_its_405s_name_the_allowed_methods() {
    let app = TestApp::spawn().await;
    let send = |method: Method, path: &str, admin: bool| {
        let mut req = app.client.request(method, app.url(path));
        if admin {
            req = req.header("x-admin-key", ADMIN_KEY);
        }
        req.send()
    };
    for (method, path) in [
        (Method::PATCH, "/api/admin/billing/users"),
        (Method::GET, "/api/admin/billing/nothing/here"),
        (Method::GET, "/api/admin/billing/grant"),
    ] {
        let r = send(method.clone(), path, false).await.expect("send");
        assert_eq!(r.status(), 401, "{method} {path} without a key");
        assert_eq!(error_code(r).await, "unauthenticated");
    }

    let r = send(Method::PATCH, "/api/admin/billing/users", true)
        .await
        .expect("send");
    assert_eq!(r.status(), 405);
    let allow = r
        .headers()
        .get("allow")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        allow.contains("GET") && allow.contains("POST") && !allow.contains("PATCH"),
        "Allow: {allow:?}"
    );
    assert_eq!(error_code(r).await, "method_not_allowed");

    let r = send(Method::GET, "/api/admin/billing/nothing/here", true)
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "not_found");

    let r = send(Method::DELETE, "/api/billing/plans", false)
        .await
        .expect("send");
    assert_eq!(r.status(), 405);
    let allow = r.headers().get("allow").and_then(|v| v.to_str().ok());
    assert!(
        allow.is_some_and(|a| a.contains("GET") && !a.contains("DELETE")),
        "Allow: {allow:?}"
    );
    assert_eq!(error_code(r).await, "method_not_allowed");

    let r = send(Method::POST, "/api/openapi.json", false)
        .await
        .expect("send");
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "method_not_allowed");

    let r = send(Method::GET, "/api/billing/plans/", false)
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let json: Value = r.json().await.expect("json");
    assert!(json["plans"].as_array().is_some_and(|p| !p.is_empty()));
}
