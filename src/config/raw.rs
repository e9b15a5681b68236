//! The configuration file's shape, as serde reads it: every section,
//! its defaults, and nothing checked yet.

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    pub server: ServerSettings,
    #[serde(default)]
    pub upstream: UpstreamSettings,
    #[serde(default)]
    pub redis: RedisSettings,
    #[serde(default)]
    pub database: DatabaseSettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub metering: MeteringSettings,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub ledger: LedgerSettings,
    #[serde(default)]
    pub modules: BTreeMap<String, ModuleSettings>,
    #[serde(default)]
    pub plans: BTreeMap<String, PlanSettings>,
    #[serde(default)]
    pub webhooks: Vec<super::webhooks::EndpointSettings>,
    #[serde(default)]
    pub webhook_delivery: super::webhooks::DeliverySettings,
    #[serde(default)]
    pub invoices: super::invoices::InvoiceSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    pub metrics_listen: Option<String>,
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_ms: u64,
    /// Requests being served at once; beyond it the gateway answers 503
    /// `overloaded` at once instead of queueing.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// How long SIGTERM waits for in-flight requests before giving up.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
    /// Export Prometheus metrics (off only to measure their cost).
    #[serde(default = "yes")]
    pub metrics: bool,
    /// A request body that sends nothing for this long is cut off: 408
    /// `request_timeout`, refunded.
    #[serde(default = "default_body_idle")]
    pub body_idle_timeout_ms: u64,
    /// Peers (CIDRs or addresses) whose `X-Forwarded-*`, `Forwarded` and
    /// `X-Real-IP` are kept; everyone else's are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// "thread_per_core" (default): one single-threaded runtime per core,
    /// each with its own listener (SO_REUSEPORT), Redis connection and
    /// upstream pools, so a request never wakes another thread (+15 %
    /// throughput, −15 % CPU per request in docs/BENCHMARKS.md).
    /// "multi_thread": one work-stealing runtime for everything, which
    /// balances better when a few client connections carry all the load.
    #[serde(default = "default_runtime")]
    pub runtime: String,
    /// Runtimes of "thread_per_core": 0 (default) is one per core the
    /// process may run on. Fewer leaves cores to what shares the machine
    /// (Postgres, Redis); a container's CPU quota is not seen as cores.
    #[serde(default)]
    pub workers: usize,
}

fn default_timezone() -> String {
    "Africa/Algiers".into()
}
fn default_max_body() -> u64 {
    10 * 1024 * 1024
}
fn default_header_timeout() -> u64 {
    10_000
}
fn default_max_in_flight() -> usize {
    4096
}
fn default_grace() -> u64 {
    30_000
}
fn default_runtime() -> String {
    "thread_per_core".into()
}
fn default_body_idle() -> u64 {
    30_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    pub connect_timeout_ms: u64,
    pub timeout_ms: u64,
    pub pool_idle_timeout_ms: u64,
    pub pool_max_idle_per_host: usize,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2_000,
            timeout_ms: 60_000,
            pool_idle_timeout_ms: 90_000,
            pool_max_idle_per_host: 512,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    pub url: String,
    /// Prefix of every key, inside the hash tag: `{<prefix>:<shard>}:...`.
    pub key_prefix: String,
    /// Accounts are spread over this many hash tags (one usage stream each).
    /// Fixed for the life of a deployment's Redis data.
    pub shards: u16,
    /// Budget for one script call, including waiting for a connection.
    /// Short on purpose: a slow Redis must turn into a fast 503.
    pub command_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Replicas that must acknowledge a charge (WAIT) before the request
    /// is forwarded; 0 trusts the master alone.
    pub wait_replicas: u32,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "cg".into(),
            shards: 16,
            command_timeout_ms: 250,
            connect_timeout_ms: 250,
            wait_replicas: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    pub url: String,
    /// A streaming replica for the reports (usage, stats, CSV exports);
    /// `None`: the primary serves them too.
    pub read_url: Option<String>,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub statement_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/creditgate".into(),
            read_url: None,
            max_connections: 10,
            acquire_timeout_ms: 2_000,
            statement_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Accept `X-User-ID` instead of a key, from `trusted_networks` only.
    pub trust_user_id_header: bool,
    pub admin_keys: Vec<NamedKey>,
    pub service_keys: Vec<NamedKey>,
    /// Peers (CIDRs or addresses) that may call `/api/credits/*` without a
    /// service key and, with `trust_user_id_header`, send `X-User-ID`.
    pub trusted_networks: Vec<String>,
    /// Live keys a user may hold through `POST /api/billing/keys` (10).
    pub max_keys_per_user: Option<u32>,
}

impl AuthSettings {
    pub fn max_keys_per_user(&self) -> u32 {
        self.max_keys_per_user.unwrap_or(10)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedKey {
    pub name: String,
    pub key: SecretString,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringSettings {
    /// How long an idempotency key is remembered (SPEC: 24 h).
    pub idempotency_ttl_secs: u64,
    /// Block an account (403 `blocked`) when a charge leaves it at 0
    /// credits, until the next period or a grant. Recorded in the audit
    /// trail. Off: an empty account simply gets 402.
    pub auto_block_exhausted: bool,
    /// Responses up to this size are kept for replay under their
    /// `Idempotency-Key`; a longer one makes a repeat 409 `duplicate_request`.
    pub replay_max_bytes: usize,
    /// Credit leases for hot accounts (docs/LEASES.md).
    pub leases: LeaseSettings,
}

impl Default for MeteringSettings {
    fn default() -> Self {
        Self {
            idempotency_ttl_secs: 86_400,
            auto_block_exhausted: false,
            replay_max_bytes: 64 * 1024,
            leases: LeaseSettings::default(),
        }
    }
}

/// `[metering.leases]`: a gateway takes a block of credits from a hot
/// account in one charge and spends it locally, one call at a time, each
/// call written to a local spend log and from there to the ledger.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseSettings {
    pub enabled: bool,
    /// An account's first lease holds this many calls' worth of the
    /// module's cost, and no lease is taken smaller.
    pub calls: i64,
    /// The most calls' worth a lease may hold: the next lease is sized to
    /// what the account spent at its last one's rate in a whole `ttl_ms`,
    /// between `calls` and this.
    pub max_calls: i64,
    /// Granted only when the account keeps `room` times the lease, of its
    /// balance and of its daily limit, after it: near a limit every call is
    /// decided in Redis.
    pub room: i64,
    /// A lease is spent for at most this long; revocations, blocks and plan
    /// changes take effect on its calls after it. At most 900.
    pub ttl_ms: u64,
    /// An account becomes hot (its next charge asks for a lease) after this
    /// many charges of one module within one second on one worker.
    pub after_calls: u32,
    /// Where the spend logs live: a local disk that survives a restart.
    pub dir: std::path::PathBuf,
    /// A lease nobody settled this long after its end is closed as lost:
    /// its credits stay spent. Longer than a gateway's restart and than a
    /// Postgres outage (a lease is settled once its calls are in the
    /// ledger).
    pub lost_after_secs: u64,
    /// The size of a spend log segment, reserved on disk whole when it is
    /// started. Each worker holds at least one.
    pub segment_bytes: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            calls: 64,
            max_calls: 1024,
            room: 20,
            ttl_ms: 500,
            after_calls: 16,
            dir: std::path::PathBuf::from("spend-log"),
            lost_after_secs: 600,
            segment_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// "text" for people, "json" for log shippers.
    pub format: String,
    /// tracing-subscriber filter; `RUST_LOG` wins when set.
    pub level: String,
    /// One line per proxied request (at info level). Off, the proxy skips
    /// the line altogether, as nginx does with `access_log off`.
    pub access: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
            access: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSettings {
    /// Run the flusher inside `serve` (turn off when `creditgate flush`
    /// runs as its own process).
    pub flusher: bool,
    /// Flusher workers, each owning a share of the streams.
    pub workers: usize,
    pub batch_size: usize,
    /// How long one XREADGROUP waits for new events.
    pub block_ms: u64,
    /// Entries pending this long at another consumer are taken over.
    pub claim_idle_ms: u64,
    /// On SIGTERM, how long the flusher keeps draining.
    pub drain_timeout_ms: u64,
    /// After a batch smaller than `batch_size`, wait this long before the
    /// next read so batches grow under load (adds at most this much lag).
    pub linger_ms: u64,
    /// Consumer name in the group; stable across restarts so a restarted
    /// instance re-reads its own unacknowledged entries first. Defaults to
    /// the host name.
    pub consumer: Option<String>,
    /// Months of ledger kept attached (0: all). Older monthly partitions
    /// are detached once a day, left as plain tables to archive or drop.
    pub retention_months: u32,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        Self {
            flusher: true,
            workers: 2,
            batch_size: 2000,
            block_ms: 1000,
            claim_idle_ms: 30_000,
            drain_timeout_ms: 10_000,
            linger_ms: 100,
            consumer: None,
            retention_months: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleSettings {
    pub prefix: String,
    pub upstream: String,
    pub cost: i64,
    #[serde(default = "yes")]
    pub refund_on_5xx: bool,
    /// Also refund when the upstream cannot be reached or times out.
    #[serde(default = "yes")]
    pub refund_on_failure: bool,
    pub timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    /// Forward `/rag/search` as `/search` instead of `/rag/search`.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Per-action cost overrides; the action is read from `X-Action`.
    #[serde(default)]
    pub actions: BTreeMap<String, i64>,
    /// Shown to users instead of the id; the id when absent.
    pub label: Option<String>,
    /// One line shown beside the label.
    #[serde(default)]
    pub description: String,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSettings {
    pub name: String,
    pub monthly_credits: i64,
    pub daily_limit: Option<i64>,
    #[serde(default)]
    pub price_dzd: i64,
    pub modules: Vec<String>,
    /// Calls per minute per account, shared by every instance (GCRA).
    pub rate_limit_per_minute: Option<u32>,
    /// Calls that may pass at once before the per-minute pace applies;
    /// ten seconds' worth of the rate when omitted.
    pub rate_limit_burst: Option<u32>,
    #[serde(default)]
    pub features: Vec<String>,
}

/// 100,000 calls a second per account: one every 10 µs.
pub(super) const MAX_RATE_PER_MINUTE: u32 = 6_000_000;
