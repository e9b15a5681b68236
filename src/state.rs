//! The state every handler shares: one handle, built by `startup`.
//!
//! Account rules and the stores behind them are reached through
//! [`Billing`] only; the rest is what the HTTP side needs on its own.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;

use crate::accounts::ApiKeys;
use crate::billing::Billing;
use crate::invoices::Invoices;
use crate::proxy::Proxy;

pub struct AppState {
    /// Charging, account changes, and through its accessors the meter,
    /// the accounts, the calendar, the catalog and the webhooks' outbox.
    pub billing: Billing,
    /// What reports read (usage, stats, CSV exports): `database.read_url`'s
    /// replica, or the primary. Never balances, keys or writes.
    pub reports: sqlx::PgPool,
    pub proxy: Arc<Proxy>,
    pub api_keys: ApiKeys,
    /// Renders `/metrics`; `None` when another recorder owns the process.
    pub metrics: Option<PrometheusHandle>,
    /// `/metrics` is on the public port (no `server.metrics_listen`).
    pub public_metrics: bool,
    pub invoices: Invoices,
    /// Credit leases (`metering.leases.enabled`), shared with the proxy.
    pub leases: Option<Arc<crate::leases::Leases>>,
    /// Bounds concurrent requests. A semaphore rather than a counter so the
    /// permit can ride along with a streaming body and be released when the
    /// last byte has gone out.
    pub(crate) in_flight: Arc<Semaphore>,
}
