use super::*;
use crate::catalog::RateLimit;
use crate::domain::Credits;

const SHIPPED: &str = include_str!("../../config/creditgate.toml");

fn load(text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::from_toml(
        text,
        "test.toml",
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

fn error_of(text: &str) -> String {
    match load(text, &[]) {
        Ok(_) => panic!("config accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn shipped_config_has_the_seed_plans_and_costs() {
    let s = load(SHIPPED, &[]).expect("shipped config is valid");
    let c = &s.catalog;
    let cost = |m: &str| c.module(m).map(|m| m.cost.get());
    assert_eq!(
        [
            cost("rag"),
            cost("legal"),
            cost("fiscal"),
            cost("voice"),
            cost("park"),
            cost("api")
        ],
        [Some(1), Some(3), Some(3), Some(2), Some(2), Some(1)]
    );
    let plan = |p: &str| {
        c.plan(p).map(|p| {
            (
                p.monthly_credits.get(),
                p.daily_limit.map(Credits::get),
                p.price_dzd,
            )
        })
    };
    assert_eq!(plan("free"), Some((100, Some(20), 0)));
    assert_eq!(plan("starter"), Some((500, Some(100), 2000)));
    assert_eq!(plan("pro"), Some((2000, Some(500), 5000)));
    assert_eq!(plan("business"), Some((10000, Some(2000), 15000)));
    assert_eq!(plan("enterprise"), Some((100000, None, 50000)));
    let rate = |p: &str| c.plan(p).and_then(|p| p.rate_limit);
    assert_eq!(
        rate("free"),
        Some(RateLimit {
            per_minute: 30,
            burst: 10
        })
    );
    assert_eq!(rate("free").map(|r| r.window_secs()), Some(20));
    assert_eq!(rate("enterprise"), None);
    assert_eq!(s.timezone, chrono_tz::Africa::Algiers);
}

/// Without a burst, ten seconds' worth of the rate passes at once.
#[test]
fn a_rate_limit_without_a_burst_takes_a_sixth_of_the_minute() {
    let text = SHIPPED.replace("rate_limit_burst = 20\n", "");
    let s = load(&text, &[("CREDITGATE_PLANS__PRO__RATE_LIMIT_BURST", "1")]).expect("valid");
    let rate = |p: &str| s.catalog.plan(p).and_then(|p| p.rate_limit);
    assert_eq!(
        rate("starter").map(|r| (r.per_minute, r.burst)),
        Some((60, 10))
    );
    assert_eq!(rate("pro").map(|r| (r.per_minute, r.burst)), Some((120, 1)));
    assert_eq!(rate("pro").map(|r| r.window_secs()), Some(1));
    assert!(
        s.catalog
            .plan_table_arg()
            .contains(";starter:100:500:60:10;")
    );
}

#[test]
fn env_overrides_nested_keys() {
    let s = load(
        SHIPPED,
        &[
            ("CREDITGATE_MODULES__RAG__UPSTREAM", "http://10.0.0.9:7000"),
            ("CREDITGATE_SERVER__LISTEN", "127.0.0.1:1234"),
            ("CREDITGATE_REDIS__SHARDS", "4"),
            ("CREDITGATE_CONFIG", "ignored.toml"),
        ],
    )
    .expect("valid");
    assert_eq!(
        s.catalog.module("rag").map(|m| m.upstream.to_string()),
        Some("http://10.0.0.9:7000/".into())
    );
    assert_eq!(s.listen.port(), 1234);
    assert_eq!(s.redis.shards, 4);
}

/// The one top-level array: an environment without a config file edit
/// (secrets from a vault, say) can still configure webhooks, and a bad one
/// is refused, naming the key, rather than silently ignored.
#[test]
fn env_sets_the_webhooks_array_whole() {
    let endpoint = r#"[{ url = "https://hub.example/hooks", secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", events = ["credits.granted"] }]"#;
    let s = load(SHIPPED, &[("CREDITGATE_WEBHOOKS", endpoint)]).expect("valid");
    assert_eq!(s.webhooks.endpoints.len(), 1);
    assert!(s.webhooks.wanted(crate::domain::EventType::CreditsGranted));
    assert!(!s.webhooks.wanted(crate::domain::EventType::CreditsLow));

    let bad = endpoint.replace("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "nope");
    let e = load(SHIPPED, &[("CREDITGATE_WEBHOOKS", &bad)])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("webhooks[0].secret"), "{e}");

    // Other variables without `__` stay the CLI's.
    let s = load(
        SHIPPED,
        &[("CREDITGATE_CONFIG", "other.toml"), ("CREDITGATE_BIN", "x")],
    )
    .expect("valid");
    assert!(s.webhooks.endpoints.is_empty());
}

#[test]
fn invalid_configs_name_the_key() {
    let base = SHIPPED;
    let cases = [
        (
            base.replace(
                "modules = [\"rag\", \"park\"]",
                "modules = [\"rag\", \"nope\"]",
            ),
            "plans.free.modules[1]",
        ),
        (
            base.replace("prefix = \"/legal\"", "prefix = \"/rag\""),
            "duplicate prefix /rag",
        ),
        (
            base.replace("cost = 3\n", "cost = -3\n"),
            "modules.fiscal.cost",
        ),
        (
            base.replace(
                "upstream = \"http://127.0.0.1:9000\"",
                "upstream = \"not a url\"",
            ),
            ".upstream",
        ),
        (
            base.replace(
                "timezone = \"Africa/Algiers\"",
                "timezone = \"Mars/Olympus\"",
            ),
            "server.timezone",
        ),
        (format!("{base}\n[bogus]\nx = 1\n"), "unknown field `bogus`"),
        (
            base.replace(
                "[database]\n",
                "[database]\nread_url = \"mysql://replica/db\"\n",
            ),
            "database.read_url",
        ),
        (
            base.replace("rate_limit_burst = 10 ", "rate_limit_burst = 0 "),
            "plans.free.rate_limit_burst",
        ),
        (
            base.replace("rate_limit_per_minute = 30 ", "# "),
            "plans.free.rate_limit_burst",
        ),
        (
            base.replace(
                "rate_limit_per_minute = 30 ",
                "rate_limit_per_minute = 6000001 ",
            ),
            "plans.free.rate_limit_per_minute",
        ),
        (
            format!("{base}\n[metering.leases]\ncalls = 64\nmax_calls = 32\n"),
            "metering.leases.max_calls",
        ),
        (
            format!("{base}\n[metering.leases]\nmax_calls = 100001\n"),
            "metering.leases.max_calls",
        ),
        (
            base.replace("[server]\n", "[server]\nworkers = 1025\n"),
            "server.workers",
        ),
    ];
    for (text, needle) in cases {
        let err = error_of(&text);
        assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
    }
}

#[test]
fn example_secrets_are_refused_until_replaced() {
    let s = load(SHIPPED, &[]).expect("valid");
    let err = s
        .refuse_example_secrets()
        .expect_err("example secret refused");
    assert!(err.to_string().contains("auth.admin_keys[0].key"), "{err}");
    let own = load(
        SHIPPED,
        &[
            (
                "CREDITGATE_AUTH__ADMIN_KEYS",
                r#"[{ name = "ops", key = "a-real-admin-secret" }]"#,
            ),
            (
                "CREDITGATE_AUTH__SERVICE_KEYS",
                r#"[{ name = "hub", key = "a-real-service-secret" }]"#,
            ),
        ],
    )
    .expect("valid");
    assert!(own.refuse_example_secrets().is_ok());
}

#[test]
fn wrong_types_name_the_key() {
    let err = error_of(&SHIPPED.replace("cost = 1\n", "cost = \"one\"\n"));
    assert!(err.contains("modules.") && err.contains("cost"), "{err}");
}
