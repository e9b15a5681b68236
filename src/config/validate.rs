//! From the file's shape to [`Settings`]: every value checked, every
//! duration and address parsed, and the error naming the offending key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::catalog::build_catalog;
use super::{ConfigError, NamedKey, RawSettings, Runtime, Settings, invalid};
use crate::domain::{Credits, Networks};

pub(super) fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, format!("{s:?} is not an address like 0.0.0.0:8207")))
}

pub(super) fn positive_ms(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    if ms == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(Duration::from_millis(ms))
}

pub(super) fn credits(key: &str, n: i64) -> Result<Credits, ConfigError> {
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
        if s.workers > 1024 {
            return Err(invalid(
                "server.workers",
                "must be at most 1024 (0: one per core)",
            ));
        }
        let workers = std::num::NonZeroUsize::new(s.workers);
        let trusted_proxies = Networks::parse(&s.trusted_proxies)
            .map_err(|e| invalid("server.trusted_proxies", e.why))?;
        let trusted_networks = Networks::parse(&self.auth.trusted_networks)
            .map_err(|e| invalid("auth.trusted_networks", e.why))?;
        let leases = &self.metering.leases;
        if !(10..=900).contains(&leases.ttl_ms) {
            return Err(invalid(
                "metering.leases.ttl_ms",
                "must be 10..=900: revocations and blocks reach leased calls after it, \
                 and they must within a second",
            ));
        }
        if !(1..=100_000).contains(&leases.calls) {
            return Err(invalid("metering.leases.calls", "must be 1..=100000"));
        }
        if !(leases.calls..=100_000).contains(&leases.max_calls) {
            return Err(invalid(
                "metering.leases.max_calls",
                "must be at least metering.leases.calls, and at most 100000",
            ));
        }
        if !(1..=1_000).contains(&leases.room) {
            return Err(invalid("metering.leases.room", "must be 1..=1000"));
        }
        if leases.lost_after_secs < 5 {
            return Err(invalid(
                "metering.leases.lost_after_secs",
                "must be at least 5: a gateway restarting must get to settle its own leases",
            ));
        }
        if !(4096..=1 << 30).contains(&leases.segment_bytes) {
            return Err(invalid(
                "metering.leases.segment_bytes",
                "must be 4096..=1073741824",
            ));
        }
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
        if let Err(e) = super::redis::Target::parse(&self.redis.url) {
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
        let webhooks = super::webhooks::Webhooks::validate(&self.webhooks, self.webhook_delivery)
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
            workers,
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
