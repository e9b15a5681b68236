//! Logs (tracing) and metrics (names in [`metrics`]).

pub mod metrics;

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber: JSON for production, text for people.
/// `RUST_LOG` overrides `log.level`.
pub fn init_tracing(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if settings.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
