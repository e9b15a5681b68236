//! Logs (tracing) and metrics (names in [`metrics`]).

pub mod metrics;

use std::io::IsTerminal;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber: JSON for production, text for people
/// (colours only on a terminal). `RUST_LOG` overrides `log.level`.
///
/// Lines are written by a background thread, so a slow stderr (a pipe to a
/// log shipper) never stalls a request; the buffer applies backpressure
/// rather than dropping lines. Keep the returned guard alive until exit:
/// dropping it flushes what is left.
pub fn init_tracing(settings: &LogSettings) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = if settings.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    guard
}
