//! Settings: one TOML file, then `CREDITGATE_A__B` environment overrides,
//! then validation. Everything the rest of the crate needs is derived here
//! (durations, the plan/module catalog), so a bad deployment is refused at
//! start with a message naming the key, never half-way through a request.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use thiserror::Error;

use crate::catalog::{Catalog, Module, Plan, RateLimit};
use crate::domain::{ActionId, Credits, ModuleId, Networks, PlanId};

pub const ENV_PREFIX: &str = "CREDITGATE_";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

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
    pub webhooks: Vec<crate::webhooks::EndpointSettings>,
    #[serde(default)]
    pub webhook_delivery: crate::webhooks::DeliverySettings,
    #[serde(default)]
    pub invoices: crate::invoices::InvoiceSettings,
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
}

impl Default for MeteringSettings {
    fn default() -> Self {
        Self {
            idempotency_ttl_secs: 86_400,
            auto_block_exhausted: false,
            replay_max_bytes: 64 * 1024,
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

impl LedgerSettings {
    pub fn flusher_config(&self) -> crate::ledger::FlusherConfig {
        let consumer = self.consumer.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "creditgate".into())
        });
        crate::ledger::FlusherConfig {
            consumer,
            batch_size: self.batch_size,
            block: Duration::from_millis(self.block_ms),
            claim_idle: Duration::from_millis(self.claim_idle_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            linger: Duration::from_millis(self.linger_ms),
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
const MAX_RATE_PER_MINUTE: u32 = 6_000_000;

/// How `serve` runs its tasks (`server.runtime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    MultiThread,
    ThreadPerCore,
}

/// Validated settings: what the rest of the crate consumes.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub timezone: chrono_tz::Tz,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    pub max_in_flight: usize,
    pub shutdown_grace: Duration,
    pub metrics: bool,
    pub body_idle_timeout: Duration,
    pub runtime: Runtime,
    pub trusted_proxies: Networks,
    /// `auth.trusted_networks`, parsed.
    pub trusted_networks: Networks,
    pub upstream: UpstreamSettings,
    pub redis: RedisSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub metering: MeteringSettings,
    pub log: LogSettings,
    pub ledger: LedgerSettings,
    pub catalog: std::sync::Arc<Catalog>,
    pub webhooks: std::sync::Arc<crate::webhooks::Webhooks>,
    pub invoicing: crate::invoices::Invoicing,
}

impl Settings {
    /// Reads `path`, applies `CREDITGATE_*` overrides from the process
    /// environment and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string(), std::env::vars())
    }

    /// The same as [`Settings::load`] with the file text and environment
    /// given explicitly (tests use this instead of mutating the process env).
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_owned(),
            message: e.message().to_owned(),
        })?;
        apply_env_overrides(&mut table, env)?;
        let raw: RawSettings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| invalid(e.path().to_string(), e.inner().to_string()))?;
        raw.validate()
    }
}

impl Settings {
    /// Turns these settings into those of worker `index` of `workers` in
    /// thread-per-core mode: the shared limits are split between them, and
    /// only the first runs what must run once (the ledger flusher, the
    /// metrics port).
    pub fn for_worker(mut self, index: usize, workers: usize) -> Self {
        let workers = workers.max(1);
        self.max_in_flight = (self.max_in_flight / workers).max(1);
        self.database.max_connections = (self.database.max_connections / workers as u32).max(2);
        if index > 0 {
            self.ledger.flusher = false;
            self.metrics_listen = None;
        }
        self
    }

    /// Secrets copied from the examples (`change-me...` in the shipped
    /// config and `.env.example`) are refused by `serve` and `check-config`:
    /// a gateway must never run with a key anyone can read in the repository.
    pub fn refuse_example_secrets(&self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        for (key, keys) in [
            ("auth.admin_keys", &self.auth.admin_keys),
            ("auth.service_keys", &self.auth.service_keys),
        ] {
            if let Some(i) = keys
                .iter()
                .position(|k| k.key.expose_secret().starts_with("change-me"))
            {
                return Err(invalid(
                    format!("{key}[{i}].key"),
                    format!(
                        "is the example secret (it starts with \"change-me\"); set your own, \
                         e.g. CREDITGATE_{}='[{{ name = \"ops\", key = \"<32 random characters>\" }}]'",
                        key.to_ascii_uppercase().replace('.', "__")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `CREDITGATE_MODULES__RAG__UPSTREAM=http://x` sets `modules.rag.upstream`.
/// Only variables with a `__` are overrides (every top-level key is a
/// table), which leaves `CREDITGATE_CONFIG` and friends to the CLI.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(invalid(name, "empty segment in environment override"));
        }
        let mut cursor = &mut *table;
        for segment in &path[..path.len() - 1] {
            let entry = cursor
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(invalid(name, format!("{segment} is not a table"))),
            };
        }
        let leaf = &path[path.len() - 1];
        let value = match cursor.get(leaf) {
            // Keep strings strings even when they look like numbers ("1234").
            Some(toml::Value::String(_)) => toml::Value::String(raw),
            _ => parse_env_value(&raw),
        };
        cursor.insert(leaf.clone(), value);
    }
    Ok(())
}

/// Numbers, booleans and arrays are read as TOML literals; anything else is
/// a string, so URLs and addresses need no quoting.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, format!("{s:?} is not an address like 0.0.0.0:8207")))
}

fn positive_ms(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    if ms == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(Duration::from_millis(ms))
}

fn credits(key: &str, n: i64) -> Result<Credits, ConfigError> {
    Credits::new(n).map_err(|e| invalid(key, e.why))
}

impl RawSettings {
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let s = &self.server;
        let listen = parse_addr("server.listen", &s.listen)?;
        let metrics_listen = s
            .metrics_listen
            .as_deref()
            .map(|m| parse_addr("server.metrics_listen", m))
            .transpose()?;
        let timezone: chrono_tz::Tz = s.timezone.parse().map_err(|_| {
            invalid(
                "server.timezone",
                format!("unknown time zone {:?}", s.timezone),
            )
        })?;
        if s.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be greater than 0"));
        }
        if s.max_in_flight == 0 {
            return Err(invalid("server.max_in_flight", "must be greater than 0"));
        }
        let header_read_timeout =
            positive_ms("server.header_read_timeout_ms", s.header_read_timeout_ms)?;
        let shutdown_grace = Duration::from_millis(s.shutdown_grace_ms);
        let body_idle_timeout = positive_ms("server.body_idle_timeout_ms", s.body_idle_timeout_ms)?;
        let runtime = match s.runtime.as_str() {
            "multi_thread" => Runtime::MultiThread,
            "thread_per_core" => Runtime::ThreadPerCore,
            other => {
                return Err(invalid(
                    "server.runtime",
                    format!("{other:?} is not \"multi_thread\" or \"thread_per_core\""),
                ));
            }
        };
        let trusted_proxies = Networks::parse(&s.trusted_proxies)
            .map_err(|e| invalid("server.trusted_proxies", e.why))?;
        let trusted_networks = Networks::parse(&self.auth.trusted_networks)
            .map_err(|e| invalid("auth.trusted_networks", e.why))?;
        if self.metering.replay_max_bytes > 16 * 1024 * 1024 {
            return Err(invalid(
                "metering.replay_max_bytes",
                "must be at most 16777216 (responses are kept in Redis)",
            ));
        }
        positive_ms(
            "upstream.connect_timeout_ms",
            self.upstream.connect_timeout_ms,
        )?;
        positive_ms("upstream.timeout_ms", self.upstream.timeout_ms)?;
        positive_ms("redis.command_timeout_ms", self.redis.command_timeout_ms)?;
        positive_ms("redis.connect_timeout_ms", self.redis.connect_timeout_ms)?;
        positive_ms(
            "database.acquire_timeout_ms",
            self.database.acquire_timeout_ms,
        )?;
        if self.redis.shards == 0 {
            return Err(invalid("redis.shards", "must be at least 1"));
        }
        if self.redis.key_prefix.is_empty()
            || !self
                .redis
                .key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "redis.key_prefix",
                "use letters, digits, '_' or '-'",
            ));
        }
        // The very parser `serve` connects with: check-config accepts
        // exactly what serve accepts.
        if let Err(e) = crate::metering::Target::parse(&self.redis.url) {
            return Err(invalid("redis.url", e.to_string()));
        }
        let postgres =
            |url: &str| url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !postgres(&self.database.url) {
            return Err(invalid("database.url", "must start with postgres://"));
        }
        if self
            .database
            .read_url
            .as_deref()
            .is_some_and(|url| !postgres(url))
        {
            return Err(invalid("database.read_url", "must start with postgres://"));
        }
        validate_named_keys("auth.admin_keys", &self.auth.admin_keys)?;
        validate_named_keys("auth.service_keys", &self.auth.service_keys)?;
        if self.ledger.batch_size == 0 || self.ledger.batch_size > 50_000 {
            return Err(invalid("ledger.batch_size", "must be between 1 and 50000"));
        }
        positive_ms("ledger.block_ms", self.ledger.block_ms)?;
        if !(1..=64).contains(&self.ledger.workers) {
            return Err(invalid("ledger.workers", "must be between 1 and 64"));
        }
        positive_ms("ledger.claim_idle_ms", self.ledger.claim_idle_ms)?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be \"text\" or \"json\""));
        }

        let catalog = build_catalog(&self.modules, &self.plans, &self.upstream)?;
        let webhooks = crate::webhooks::Webhooks::validate(&self.webhooks, self.webhook_delivery)
            .map_err(|e| invalid(e.key, e.message))?;
        let invoicing = self
            .invoices
            .validate()
            .map_err(|(key, message)| invalid(key, message))?;
        Ok(Settings {
            listen,
            metrics_listen,
            timezone,
            max_body_bytes: self.server.max_body_bytes,
            header_read_timeout,
            max_in_flight: self.server.max_in_flight,
            shutdown_grace,
            metrics: self.server.metrics,
            body_idle_timeout,
            runtime,
            trusted_proxies,
            trusted_networks,
            metering: self.metering,
            upstream: self.upstream,
            redis: self.redis,
            database: self.database,
            auth: self.auth,
            log: self.log,
            ledger: self.ledger,
            catalog: std::sync::Arc::new(catalog),
            webhooks,
            invoicing,
        })
    }
}

fn validate_named_keys(key: &str, keys: &[NamedKey]) -> Result<(), ConfigError> {
    use secrecy::ExposeSecret;
    let mut names = HashSet::new();
    for (i, k) in keys.iter().enumerate() {
        if k.name.trim().is_empty() {
            return Err(invalid(format!("{key}[{i}].name"), "must not be empty"));
        }
        if !names.insert(k.name.as_str()) {
            return Err(invalid(
                format!("{key}[{i}].name"),
                format!("duplicate name {:?}", k.name),
            ));
        }
        if k.key.expose_secret().len() < 8 {
            return Err(invalid(
                format!("{key}[{i}].key"),
                "must be at least 8 characters",
            ));
        }
    }
    Ok(())
}

fn build_catalog(
    modules: &BTreeMap<String, ModuleSettings>,
    plans: &BTreeMap<String, PlanSettings>,
    defaults: &UpstreamSettings,
) -> Result<Catalog, ConfigError> {
    if modules.is_empty() {
        return Err(invalid("modules", "at least one module is required"));
    }
    if plans.is_empty() {
        return Err(invalid("plans", "at least one plan is required"));
    }
    let mut built_modules = Vec::new();
    let mut prefixes: BTreeMap<String, String> = BTreeMap::new();
    for (id, m) in modules {
        let key = |field: &str| format!("modules.{id}.{field}");
        let module_id = ModuleId::parse(id).map_err(|e| invalid(format!("modules.{id}"), e.why))?;
        let prefix = m.prefix.trim_end_matches('/').to_owned();
        if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains(['?', '#', ' ']) {
            return Err(invalid(
                key("prefix"),
                format!("{:?} must be a path like /rag", m.prefix),
            ));
        }
        for reserved in ["/api/billing", "/api/admin", "/api/credits", "/billing"] {
            if prefix == reserved || prefix.starts_with(&format!("{reserved}/")) {
                return Err(invalid(
                    key("prefix"),
                    format!("{prefix} is reserved for creditgate's own API"),
                ));
            }
        }
        if matches!(
            prefix.as_str(),
            "/healthz" | "/readyz" | "/metrics" | "/api"
        ) {
            return Err(invalid(
                key("prefix"),
                format!("{prefix} is reserved for creditgate's own API"),
            ));
        }
        if let Some(other) = prefixes.insert(prefix.clone(), id.clone()) {
            return Err(invalid(
                key("prefix"),
                format!("duplicate prefix {prefix}, also used by module {other}"),
            ));
        }
        let upstream: http::Uri = m
            .upstream
            .parse()
            .map_err(|_| invalid(key("upstream"), format!("{:?} is not a URL", m.upstream)))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            return Err(invalid(
                key("upstream"),
                format!("{:?} must be an http://host:port URL", m.upstream),
            ));
        }
        if upstream.query().is_some() {
            return Err(invalid(key("upstream"), "must not contain a query"));
        }
        let cost = credits(&key("cost"), m.cost)?;
        let mut actions = BTreeMap::new();
        for (action, c) in &m.actions {
            let action_key = format!("modules.{id}.actions.{action}");
            let action_id = ActionId::parse(action).map_err(|e| invalid(&action_key, e.why))?;
            actions.insert(action_id, credits(&action_key, *c)?);
        }
        let timeout = positive_ms(
            &key("timeout_ms"),
            m.timeout_ms.unwrap_or(defaults.timeout_ms),
        )?;
        let connect_timeout = positive_ms(
            &key("connect_timeout_ms"),
            m.connect_timeout_ms.unwrap_or(defaults.connect_timeout_ms),
        )?;
        built_modules.push(Module {
            id: module_id,
            prefix,
            upstream,
            cost,
            actions,
            refund_on_5xx: m.refund_on_5xx,
            refund_on_failure: m.refund_on_failure,
            timeout,
            connect_timeout,
            strip_prefix: m.strip_prefix,
            label: m
                .label
                .clone()
                .filter(|l| !l.trim().is_empty())
                .unwrap_or_else(|| id.clone()),
            description: m.description.clone(),
        });
    }
    let mut built_plans = Vec::new();
    for (id, p) in plans {
        let key = |field: &str| format!("plans.{id}.{field}");
        let plan_id = PlanId::parse(id).map_err(|e| invalid(format!("plans.{id}"), e.why))?;
        if p.name.trim().is_empty() {
            return Err(invalid(key("name"), "must not be empty"));
        }
        let monthly = credits(&key("monthly_credits"), p.monthly_credits)?;
        let daily_limit = match p.daily_limit {
            None => None,
            Some(n) if n <= 0 => {
                return Err(invalid(
                    key("daily_limit"),
                    "must be positive (omit it for unlimited)",
                ));
            }
            Some(n) => Some(credits(&key("daily_limit"), n)?),
        };
        if p.price_dzd < 0 {
            return Err(invalid(key("price_dzd"), "must not be negative"));
        }
        let mut plan_modules = Vec::new();
        for (i, m) in p.modules.iter().enumerate() {
            let Some(module) = built_modules.iter().find(|x| x.id.as_str() == m) else {
                return Err(invalid(
                    format!("plans.{id}.modules[{i}]"),
                    format!("unknown module {m:?}"),
                ));
            };
            if !plan_modules.contains(&module.id) {
                plan_modules.push(module.id.clone());
            }
        }
        if p.rate_limit_per_minute == Some(0) {
            return Err(invalid(
                key("rate_limit_per_minute"),
                "must be positive (omit it for no limit)",
            ));
        }
        // charge.lua counts the limit in whole microseconds: an interval
        // under 10 µs would be distorted by its rounding (by up to 5 %).
        if p.rate_limit_per_minute > Some(MAX_RATE_PER_MINUTE) {
            return Err(invalid(
                key("rate_limit_per_minute"),
                format!("at most {MAX_RATE_PER_MINUTE} (omit it for no limit)"),
            ));
        }
        let rate_limit = match (p.rate_limit_per_minute, p.rate_limit_burst) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid(
                    key("rate_limit_burst"),
                    "needs rate_limit_per_minute",
                ));
            }
            (Some(_), Some(0)) => {
                return Err(invalid(key("rate_limit_burst"), "must be at least 1"));
            }
            (Some(per_minute), burst) => Some(RateLimit {
                per_minute,
                burst: burst.unwrap_or_else(|| per_minute.div_ceil(6)),
            }),
        };
        built_plans.push(Plan {
            id: plan_id,
            name: p.name.clone(),
            monthly_credits: monthly,
            daily_limit,
            price_dzd: p.price_dzd,
            modules: plan_modules,
            rate_limit,
            features: p.features.clone(),
        });
    }
    Ok(Catalog::new(built_modules, built_plans))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../config/creditgate.toml");

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
}
