//! Monthly invoices against the real gateway and Postgres: what a PDF says
//! (read back with pdftotext), that a closed period's PDF never changes,
//! and that numbers stay gap-free when periods close concurrently.

use crate::common;

use std::collections::BTreeSet;

use chrono::{Datelike, Months, Utc};
use common::{Account, TestApp, error_code};
use reqwest::Method;
use serde_json::Value;

/// The period before the current one in Algiers, and its French name.
fn previous_period() -> (String, String) {
    let now = Utc::now().with_timezone(&chrono_tz::Africa::Algiers);
    let first = now
        .date_naive()
        .with_day(1)
        .and_then(|d| d.checked_sub_months(Months::new(1)))
        .expect("last month");
    (
        first.format("%Y-%m").to_string(),
        creditgate::invoices::month_name(&first.format("%Y-%m").to_string()),
    )
}

/// A user whose account has existed since before the current period.
async fn old_user(app: &TestApp, plan: &str) -> Account {
    let user = app.create_user(plan).await;
    sqlx::query("UPDATE users SET created_at = now() - interval '45 days' WHERE id = $1")
        .bind(user.id.as_str())
        .execute(&app.pool().await)
        .await
        .expect("backdate");
    user
}

async fn get(app: &TestApp, key: &str, path: &str) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .expect("request")
}

fn pdftotext(pdf: &[u8]) -> String {
    let path = std::env::temp_dir().join(format!("cg-invoice-{}.pdf", uuid::Uuid::new_v4()));
    std::fs::write(&path, pdf).expect("write");
    let out = std::process::Command::new("pdftotext")
        .args(["-layout", "-enc", "UTF-8"])
        .arg(&path)
        .arg("-")
        .output()
        .expect("pdftotext (Debian poppler-utils; scripts/test.sh installs it)");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 text")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_periods_invoice_says_everything_in_french_and_never_changes() {
    let app = TestApp::spawn().await;
    let user = old_user(&app, "starter").await;
    let (period, month) = previous_period();

    let list: Value = get(&app, &user.key, "/api/billing/invoices")
        .await
        .json()
        .await
        .expect("json");
    let invoices = list["invoices"].as_array().expect("invoices");
    assert_eq!(invoices.len(), 2, "{list}");
    let closed = &invoices[0];
    assert_eq!(closed["period"], period.as_str());
    assert_eq!(closed["status"], "issued");
    let number = closed["number"].as_str().expect("numbered").to_owned();
    assert!(number.ends_with("/000001"), "{number}");
    assert_eq!(closed["total_ht_centimes"], 200_000);
    assert_eq!(closed["vat_centimes"], 38_000);
    assert_eq!(closed["total_ttc_centimes"], 238_000);
    assert_eq!(invoices[1]["status"], "draft");
    assert_eq!(invoices[1]["number"], Value::Null);

    let url = closed["pdf"].as_str().expect("pdf url").to_owned();
    let first = get(&app, &user.key, &url).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "application/pdf");
    let first = first.bytes().await.expect("pdf");
    assert!(first.starts_with(b"%PDF-"));
    let text = pdftotext(&first);
    // Words as they read, whatever the line breaks and column spacing.
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    for expected in [
        "FACTURE".to_owned(),
        format!("N° {number}"),
        format!("Période : {month}"),
        "iaFactory Algérie".to_owned(),
        "Cyberparc, Sidi Abdellah, Alger".to_owned(),
        "NIF : 000016001234567".to_owned(),
        "NIS : 000016019876543".to_owned(),
        "RC : 16/00-0123456 B 20".to_owned(),
        "Test User".to_owned(),
        "Compte :".to_owned(),
        user.id.to_string(),
        format!("Abonnement Starter — {month}"),
        "Désignation".to_owned(),
        "Total HT".to_owned(),
        "2 000,00 DZD".to_owned(),
        "TVA 19 %".to_owned(),
        "380,00 DZD".to_owned(),
        "Total TTC".to_owned(),
        "2 380,00 DZD".to_owned(),
        "deux mille trois cent quatre-vingts dinars algériens".to_owned(),
        "Arrêtée la présente facture".to_owned(),
    ] {
        assert!(flat.contains(&expected), "{expected:?} not in:\n{text}");
    }
    assert!(!text.contains("BROUILLON"));
    // INVOICE_SCREENSHOT=docs/screenshots/invoice: the page as a picture.
    if let Ok(out) = std::env::var("INVOICE_SCREENSHOT") {
        let pdf = std::env::temp_dir().join("cg-invoice-shot.pdf");
        std::fs::write(&pdf, &first).expect("write");
        let ok = std::process::Command::new("pdftoppm")
            .args(["-png", "-r", "110", "-singlefile"])
            .arg(&pdf)
            .arg(&out)
            .status()
            .expect("pdftoppm");
        assert!(ok.success());
    }

    // Byte for byte the same, however often and by whom it is fetched,
    // even after the plan's price or the account changes.
    let again = get(&app, &user.key, &url).await.bytes().await.expect("pdf");
    assert_eq!(first, again);
    let r = app
        .admin(
            Method::PUT,
            &format!("/users/{}/plan", user.id.as_str()),
            Some(serde_json::json!({"plan": "enterprise"})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let admin = app
        .admin(
            Method::GET,
            &format!("/users/{}/invoices/{period}.pdf", user.id.as_str()),
            None,
        )
        .await;
    assert_eq!(admin.status(), 200);
    assert_eq!(admin.bytes().await.expect("pdf"), first);

    // The draft: the current period, still on the plan it started with.
    let draft_url = invoices[1]["pdf"].as_str().expect("draft url");
    let draft = get(&app, &user.key, draft_url).await;
    assert_eq!(draft.headers()["cache-control"], "no-store");
    let draft = pdftotext(&draft.bytes().await.expect("pdf"));
    assert!(draft.contains("FACTURE — BROUILLON"), "{draft}");
    assert!(draft.contains("Abonnement Starter"), "{draft}");

    // Someone else's periods, free plans, bad names: nothing.
    let free = old_user(&app, "free").await;
    let none: Value = get(&app, &free.key, "/api/billing/invoices")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(none["invoices"], serde_json::json!([]));
    for path in [
        format!("/api/billing/invoices/{period}.pdf"),
        "/api/billing/invoices/2026-13.pdf".to_owned(),
        "/api/billing/invoices/2099-01.pdf".to_owned(),
        "/api/billing/invoices/2026-11".to_owned(),
    ] {
        let r = get(&app, &free.key, &path).await;
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(error_code(r).await, "unknown_invoice", "{path}");
    }
    assert_eq!(
        get(&app, "cg_nope", "/api/billing/invoices").await.status(),
        401
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn numbers_stay_gap_free_when_periods_close_concurrently() {
    let app = TestApp::spawn().await;
    let mut users = Vec::new();
    for _ in 0..30 {
        users.push(old_user(&app, "starter").await);
    }
    let (period, _) = previous_period();
    // Every user lists their invoices while three closes of the period run.
    let lists = users.iter().map(|u| {
        let app = &app;
        async move {
            let r = get(app, &u.key, "/api/billing/invoices").await;
            assert_eq!(r.status(), 200);
        }
    });
    let closes = (0..3).map(|_| {
        let invoices = app.state.invoices.clone();
        let period = period.clone();
        async move { invoices.close_period(&period).await.expect("close") }
    });
    let (_, closed) = tokio::join!(
        futures_util::future::join_all(lists),
        futures_util::future::join_all(closes)
    );
    assert!(closed.iter().all(|n| *n == 30), "{closed:?}");
    let numbers: Vec<(String, i64)> =
        sqlx::query_as("SELECT user_id, number FROM invoices WHERE period = $1 ORDER BY number")
            .bind(&period)
            .fetch_all(&app.pool().await)
            .await
            .expect("numbers");
    assert_eq!(
        numbers.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<i64>>()
    );
    let owners: BTreeSet<&str> = numbers.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(owners.len(), 30, "one invoice per user");
    let last: i64 = sqlx::query_scalar("SELECT last FROM invoice_counters")
        .fetch_one(&app.pool().await)
        .await
        .expect("counter");
    assert_eq!(last, 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_monthly_reset_numbers_the_period_just_closed() {
    let app = TestApp::spawn().await;
    let users = [
        old_user(&app, "starter").await,
        old_user(&app, "enterprise").await,
        old_user(&app, "free").await,
    ];
    let (period, _) = previous_period();
    let r = app.service("/reset-monthly", serde_json::json!({})).await;
    assert_eq!(r.status(), 200);
    let pool = app.pool().await;
    common::wait_until(
        "the invoices issued",
        std::time::Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM invoices WHERE period = $1")
                .bind(&period)
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n == 2)
        },
    )
    .await;
    // Numbered by the reset, before anyone asked: the paying accounts in
    // id order, the free one has none.
    let numbered: Vec<(String, i64)> =
        sqlx::query_as("SELECT user_id, number FROM invoices WHERE period = $1 ORDER BY number")
            .bind(&period)
            .fetch_all(&pool)
            .await
            .expect("numbers");
    let mut paying: Vec<&str> = users[..2].iter().map(|u| u.id.as_str()).collect();
    paying.sort();
    assert_eq!(
        numbered,
        vec![(paying[0].to_owned(), 1), (paying[1].to_owned(), 2)]
    );
}
