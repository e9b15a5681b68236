//! Settings: one TOML file ([`raw`]), then `CREDITGATE_A__B` environment
//! overrides ([`env`]), then validation ([`validate`], with the plan and
//! module [`catalog`] built from it). Everything the rest of the crate
//! needs is derived here (durations, the catalog, the Redis target), so a
//! bad deployment is refused at start with a message naming the key, never
//! half-way through a request.

mod catalog;
mod env;
pub mod invoices;
mod raw;
pub mod redis;
mod validate;
pub mod webhooks;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

use crate::catalog::Catalog;
use crate::domain::Networks;
use env::apply_env_overrides;
pub use raw::*;

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
    /// `server.workers`: runtimes of thread-per-core mode, `None` for one
    /// per core.
    pub workers: Option<std::num::NonZeroUsize>,
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
    pub webhooks: std::sync::Arc<webhooks::Webhooks>,
    pub invoicing: invoices::Invoicing,
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

#[cfg(test)]
mod tests;
