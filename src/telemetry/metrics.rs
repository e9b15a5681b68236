//! Every metric the gateway exports: names, labels and buckets in one place.
//!
//! Prometheus conventions: `creditgate_` prefix, base units (`_seconds`),
//! `_total` for counters, histograms with explicit buckets. Label values
//! are bounded sets (module, plan, outcome, script): never a user id, key
//! or path.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "creditgate_requests_total";
pub const REQUEST_DURATION: &str = "creditgate_request_duration_seconds";
pub const UPSTREAM_DURATION: &str = "creditgate_upstream_duration_seconds";
pub const CREDITS_CHARGED: &str = "creditgate_credits_charged_total";
pub const CREDITS_REFUNDED: &str = "creditgate_credits_refunded_total";
pub const REDIS_SCRIPT_DURATION: &str = "creditgate_redis_script_duration_seconds";
pub const REDIS_ERRORS: &str = "creditgate_redis_errors_total";
pub const POSTGRES_ERRORS: &str = "creditgate_postgres_errors_total";
pub const IN_FLIGHT: &str = "creditgate_in_flight_requests";
pub const CLIENT_CONNECTIONS: &str = "creditgate_client_connections";
pub const UPSTREAM_IN_FLIGHT: &str = "creditgate_upstream_in_flight_requests";
pub const UPSTREAM_CONNECTIONS: &str = "creditgate_upstream_open_connections";
pub const LEDGER_BACKLOG: &str = "creditgate_ledger_backlog_events";
pub const LEDGER_LAG: &str = "creditgate_ledger_lag_seconds";
pub const LEDGER_FLUSHED: &str = "creditgate_ledger_flushed_events_total";
pub const LEDGER_DUPLICATES: &str = "creditgate_ledger_duplicate_events_total";
pub const LEDGER_BATCH_SIZE: &str = "creditgate_ledger_flush_batch_size";
pub const KEY_LOOKUPS: &str = "creditgate_key_lookups_total";
pub const WEBHOOK_DELIVERIES: &str = "creditgate_webhook_deliveries_total";
pub const WEBHOOK_ATTEMPTS: &str = "creditgate_webhook_delivery_attempts";
pub const WEBHOOK_QUEUE_AGE: &str = "creditgate_webhook_queue_age_seconds";
pub const WEBHOOK_QUEUE_DEPTH: &str = "creditgate_webhook_queue_deliveries";
pub const LEASED_CALLS: &str = "creditgate_leased_calls_total";
pub const LEASES: &str = "creditgate_leases_total";
pub const UNANSWERED_CHARGES: &str = "creditgate_unanswered_charges_total";

/// Every metric name, for tests that check dashboards and alerts only use
/// what is exported.
pub const ALL: [&str; 25] = [
    REQUESTS,
    REQUEST_DURATION,
    UPSTREAM_DURATION,
    CREDITS_CHARGED,
    CREDITS_REFUNDED,
    REDIS_SCRIPT_DURATION,
    REDIS_ERRORS,
    POSTGRES_ERRORS,
    IN_FLIGHT,
    CLIENT_CONNECTIONS,
    UPSTREAM_IN_FLIGHT,
    UPSTREAM_CONNECTIONS,
    LEDGER_BACKLOG,
    LEDGER_LAG,
    LEDGER_FLUSHED,
    LEDGER_DUPLICATES,
    LEDGER_BATCH_SIZE,
    KEY_LOOKUPS,
    WEBHOOK_DELIVERIES,
    WEBHOOK_ATTEMPTS,
    WEBHOOK_QUEUE_AGE,
    WEBHOOK_QUEUE_DEPTH,
    LEASED_CALLS,
    LEASES,
    UNANSWERED_CHARGES,
];

/// Latency buckets: sub-millisecond (Redis scripts) to a minute (slow
/// assistants behind the proxy).
const SECONDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const BATCH: [f64; 10] = [
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];
/// Attempts a webhook delivery took, once delivered or given up.
const ATTEMPTS: [f64; 8] = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Every delivery outcome of every webhook event type exists from the
/// start (at 0). The event types are the webhooks module's; it passes them.
pub fn webhook_events(events: impl IntoIterator<Item = &'static str>) {
    for event in events {
        for outcome in ["delivered", "retry", "failed"] {
            counter!(WEBHOOK_DELIVERIES, "event" => event, "outcome" => outcome).increment(0);
        }
    }
}

/// Installs the process-wide recorder once and returns its handle (`None`
/// if another recorder was installed first, e.g. by an embedding program).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(LEDGER_BATCH_SIZE.into()), &BATCH)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(WEBHOOK_ATTEMPTS.into()), &ATTEMPTS)
                });
            match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(handle) => {
                    describe();
                    // Unlabelled series exist from the start (at 0), so
                    // dashboards and alerts see them before anything happens.
                    counter!(REDIS_ERRORS).increment(0);
                    counter!(POSTGRES_ERRORS).increment(0);
                    counter!(LEDGER_FLUSHED).increment(0);
                    counter!(LEDGER_DUPLICATES).increment(0);
                    // Rare and alerted on: an `increase()` needs the 0
                    // before the first one.
                    for outcome in UNANSWERED_OUTCOMES {
                        counter!(UNANSWERED_CHARGES, "outcome" => outcome).increment(0);
                    }
                    gauge!(IN_FLIGHT).increment(0.0);
                    gauge!(CLIENT_CONNECTIONS, "state" => "open").increment(0.0);
                    gauge!(CLIENT_CONNECTIONS, "state" => "parked").increment(0.0);
                    gauge!(UPSTREAM_IN_FLIGHT).increment(0.0);
                    gauge!(LEDGER_BACKLOG).set(0.0);
                    gauge!(LEDGER_LAG).set(0.0);
                    gauge!(WEBHOOK_QUEUE_AGE).set(0.0);
                    gauge!(WEBHOOK_QUEUE_DEPTH).set(0.0);
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(REQUESTS, "Proxied requests by module and outcome");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Proxied request latency until response headers"
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "Upstream latency until response headers"
    );
    describe_counter!(CREDITS_CHARGED, "Credits charged by module and plan");
    describe_counter!(CREDITS_REFUNDED, "Credits refunded by module and plan");
    describe_histogram!(
        REDIS_SCRIPT_DURATION,
        Unit::Seconds,
        "Redis Lua script round trip"
    );
    describe_counter!(REDIS_ERRORS, "Redis calls that failed or timed out");
    describe_counter!(POSTGRES_ERRORS, "Postgres calls that failed");
    describe_gauge!(IN_FLIGHT, "Requests being served");
    describe_gauge!(
        CLIENT_CONNECTIONS,
        "Client connections: open (all of them), and parked (idle, holding no HTTP buffers)"
    );
    describe_gauge!(
        UPSTREAM_IN_FLIGHT,
        "Requests waiting for an upstream's response headers"
    );
    describe_gauge!(
        UPSTREAM_CONNECTIONS,
        "Open connections to upstreams, pooled or busy"
    );
    describe_gauge!(LEDGER_BACKLOG, "Usage events in Redis not yet in Postgres");
    describe_gauge!(
        LEDGER_LAG,
        Unit::Seconds,
        "Age of the oldest usage event not yet in Postgres"
    );
    describe_counter!(
        LEDGER_FLUSHED,
        "Usage events written to the Postgres ledger"
    );
    describe_counter!(
        LEDGER_DUPLICATES,
        "Redelivered usage events the ledger already had"
    );
    describe_histogram!(LEDGER_BATCH_SIZE, "Usage events per flushed batch");
    describe_counter!(
        KEY_LOOKUPS,
        "API keys looked up in Postgres (cache misses), by result: found, unknown, or shed when too many lookups were already waiting"
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook delivery attempts by event and outcome: delivered, retry (will be tried again) or failed (given up)"
    );
    describe_histogram!(
        WEBHOOK_ATTEMPTS,
        "Attempts a webhook delivery took, once delivered or given up"
    );
    describe_gauge!(
        WEBHOOK_QUEUE_AGE,
        Unit::Seconds,
        "Age of the oldest webhook delivery not yet delivered or given up"
    );
    describe_gauge!(
        WEBHOOK_QUEUE_DEPTH,
        "Webhook deliveries not yet delivered or given up"
    );
    describe_counter!(
        LEASED_CALLS,
        "Calls spent from a credit lease without a Redis call, by result: served, or fell_back to Redis when the spend log could not be written"
    );
    describe_counter!(
        LEASES,
        "Credit leases by event: taken, settled (by their gateway) or lost (closed by the sweep, credits kept)"
    );
    describe_counter!(
        UNANSWERED_CHARGES,
        "Charges whose answer was lost, by outcome: refunded (Redis had made it), not_charged, kept (a repeat was told it was charged), and, each logged with its event id for an operator, unknown (no deadline went with it), gave_up, dropped"
    );
}

/// One webhook attempt's outcome (`delivered`, `retry`, `failed`), and
/// the attempts it took once it is final.
pub fn webhook_attempt(event: &'static str, outcome: &'static str, attempts: u32) {
    counter!(WEBHOOK_DELIVERIES, "event" => event, "outcome" => outcome).increment(1);
    if outcome != "retry" {
        histogram!(WEBHOOK_ATTEMPTS).record(f64::from(attempts));
    }
}

pub fn webhook_queue(age_seconds: f64, depth: i64) {
    gauge!(WEBHOOK_QUEUE_AGE).set(age_seconds);
    gauge!(WEBHOOK_QUEUE_DEPTH).set(depth as f64);
}

/// Histogram maintenance the exporter needs periodically.
pub fn upkeep(handle: &PrometheusHandle) {
    handle.run_upkeep();
}

/// Outcomes whose counters are made up front: a request's answer is one of
/// these nearly always; anything else is looked up on the way.
const COMMON_OUTCOMES: [&str; 10] = [
    "ok",
    "upstream_5xx",
    "replayed",
    "unauthenticated",
    "blocked",
    "module_not_in_plan",
    "insufficient_credits",
    "daily_limit",
    "rate_limited",
    "metering_unavailable",
];

/// One module's per-request metrics, resolved once. Looking a labelled
/// series up in the registry (hashing the labels, allocating their
/// strings) costs more than recording into it, so the proxy keeps these
/// handles instead of naming the series on every request.
pub struct ModuleMetrics {
    module: String,
    request_duration: Histogram,
    upstream_duration: Histogram,
    outcomes: Vec<(&'static str, Counter)>,
    /// Per plan of the catalog.
    charged: Vec<(String, Counter)>,
    refunded: Vec<(String, Counter)>,
}

impl ModuleMetrics {
    /// Call after [`install`]: handles made before the recorder exists
    /// record nowhere.
    pub fn new<'a>(module: &str, plans: impl Iterator<Item = &'a str> + Clone) -> Self {
        let m = || module.to_owned();
        Self {
            module: m(),
            request_duration: histogram!(REQUEST_DURATION, "module" => m()),
            upstream_duration: histogram!(UPSTREAM_DURATION, "module" => m()),
            outcomes: COMMON_OUTCOMES
                .iter()
                .map(|o| (*o, counter!(REQUESTS, "module" => m(), "outcome" => *o)))
                .collect(),
            charged: plans
                .clone()
                .map(|p| {
                    let c = counter!(CREDITS_CHARGED, "module" => m(), "plan" => p.to_owned());
                    (p.to_owned(), c)
                })
                .collect(),
            refunded: plans
                .map(|p| {
                    let c = counter!(CREDITS_REFUNDED, "module" => m(), "plan" => p.to_owned());
                    (p.to_owned(), c)
                })
                .collect(),
        }
    }

    pub fn request(&self, outcome: &'static str, elapsed: Duration) {
        match self.outcomes.iter().find(|(o, _)| *o == outcome) {
            Some((_, c)) => c.increment(1),
            None => counter!(REQUESTS, "module" => self.module.clone(), "outcome" => outcome)
                .increment(1),
        }
        self.request_duration.record(elapsed.as_secs_f64());
    }

    pub fn upstream(&self, elapsed: Duration) {
        self.upstream_duration.record(elapsed.as_secs_f64());
    }

    pub fn charged(&self, plan: &str, credits: i64) {
        Self::credits(&self.charged, CREDITS_CHARGED, &self.module, plan, credits);
    }

    pub fn refunded(&self, plan: &str, credits: i64) {
        Self::credits(
            &self.refunded,
            CREDITS_REFUNDED,
            &self.module,
            plan,
            credits,
        );
    }

    fn credits(
        by_plan: &[(String, Counter)],
        name: &'static str,
        module: &str,
        plan: &str,
        credits: i64,
    ) {
        let Ok(n) = u64::try_from(credits) else {
            return;
        };
        if n == 0 {
            return;
        }
        match by_plan.iter().find(|(p, _)| p == plan) {
            Some((_, c)) => c.increment(n),
            // A plan removed from the configuration while accounts keep it.
            None => counter!(name, "module" => module.to_owned(), "plan" => plan.to_owned())
                .increment(n),
        }
    }
}

pub fn redis_script(script: &'static str, elapsed: Duration, ok: bool) {
    // The charge runs once per request: its histogram is resolved once.
    static CHARGE: OnceLock<Histogram> = OnceLock::new();
    let seconds = elapsed.as_secs_f64();
    if script == "charge" {
        CHARGE
            .get_or_init(|| histogram!(REDIS_SCRIPT_DURATION, "script" => "charge"))
            .record(seconds);
    } else {
        histogram!(REDIS_SCRIPT_DURATION, "script" => script).record(seconds);
    }
    if !ok {
        counter!(REDIS_ERRORS).increment(1);
    }
}

pub fn postgres_error() {
    counter!(POSTGRES_ERRORS).increment(1);
}

pub fn redis_error() {
    counter!(REDIS_ERRORS).increment(1);
}

/// One unit of a gauge, held for as long as what it counts lives, and
/// given back when dropped however that ends (answered, streamed to the
/// end, abandoned by its client), so the gauge cannot leak.
pub struct Held(&'static OnceLock<Gauge>);

static IN_FLIGHT_GAUGE: OnceLock<Gauge> = OnceLock::new();
static UPSTREAM_IN_FLIGHT_GAUGE: OnceLock<Gauge> = OnceLock::new();
static CONNECTIONS_OPEN: OnceLock<Gauge> = OnceLock::new();
static CONNECTIONS_PARKED: OnceLock<Gauge> = OnceLock::new();

impl Held {
    /// A request, in `creditgate_in_flight_requests`.
    pub fn in_flight() -> Self {
        Self::raise(&IN_FLIGHT_GAUGE, || gauge!(IN_FLIGHT))
    }

    /// One upstream call, in `creditgate_upstream_in_flight_requests`.
    pub fn upstream_in_flight() -> Self {
        Self::raise(&UPSTREAM_IN_FLIGHT_GAUGE, || gauge!(UPSTREAM_IN_FLIGHT))
    }

    /// A client connection, in `creditgate_client_connections{state="open"}`.
    pub fn client_connection() -> Self {
        Self::raise(
            &CONNECTIONS_OPEN,
            || gauge!(CLIENT_CONNECTIONS, "state" => "open"),
        )
    }

    /// A parked client connection, in `{state="parked"}`.
    pub fn parked_connection() -> Self {
        Self::raise(
            &CONNECTIONS_PARKED,
            || gauge!(CLIENT_CONNECTIONS, "state" => "parked"),
        )
    }

    fn raise(cell: &'static OnceLock<Gauge>, make: fn() -> Gauge) -> Self {
        cell.get_or_init(make).increment(1.0);
        Self(cell)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(gauge) = self.0.get() {
            gauge.decrement(1.0);
        }
    }
}

/// One call spent from a lease (`written`), or sent back to Redis.
pub fn lease_call(written: bool) {
    static HANDLES: OnceLock<[Counter; 2]> = OnceLock::new();
    let [served, fell_back] = HANDLES.get_or_init(|| {
        [
            counter!(LEASED_CALLS, "result" => "served"),
            counter!(LEASED_CALLS, "result" => "fell_back"),
        ]
    });
    if written { served } else { fell_back }.increment(1);
}

pub fn lease_taken() {
    counter!(LEASES, "event" => "taken").increment(1);
}

pub fn lease_settled() {
    counter!(LEASES, "event" => "settled").increment(1);
}

pub fn lease_lost() {
    counter!(LEASES, "event" => "lost").increment(1);
}

const UNANSWERED_OUTCOMES: [&str; 6] = [
    "refunded",
    "not_charged",
    "kept",
    "unknown",
    "gave_up",
    "dropped",
];

/// One charge whose answer was lost, looked into: one of `UNANSWERED_OUTCOMES`.
pub fn unanswered_charge(outcome: &'static str) {
    counter!(UNANSWERED_CHARGES, "outcome" => outcome).increment(1);
}

/// One API key looked up in Postgres: "found", "unknown" or "shed".
pub fn key_lookup(result: &'static str) {
    counter!(KEY_LOOKUPS, "result" => result).increment(1);
}

pub fn upstream_connections(module: &str, delta: f64) {
    gauge!(UPSTREAM_CONNECTIONS, "module" => module.to_owned()).increment(delta);
}

pub fn ledger_backlog(events: i64, lag: Duration) {
    gauge!(LEDGER_BACKLOG).set(events as f64);
    gauge!(LEDGER_LAG).set(lag.as_secs_f64());
}

pub fn ledger_flushed(batch: usize, inserted: u64, duplicates: u64) {
    histogram!(LEDGER_BATCH_SIZE).record(batch as f64);
    counter!(LEDGER_FLUSHED).increment(inserted);
    counter!(LEDGER_DUPLICATES).increment(duplicates);
}
