//! Webhooks: the configured endpoints, the outbox events are written to,
//! and the deliverer that sends them (Standard Webhooks signatures).
//!
//! Produced exactly once: an event is a row of `webhook_events`, inserted
//! in the same Postgres transaction as the ledger rows that cause it (the
//! flusher's batch for charges and grants, the admin API's change for
//! blocks and plans), under a unique `dedupe_key`. Delivered at least once:
//! [`deliver`] claims due rows with a lease, retries with backoff and
//! jitter, and gives up after `webhook_delivery.give_up_after_secs`.
//! Nothing here runs on a request's path: the proxy never waits for it.

pub mod client;
pub mod deliver;
pub mod outbox;
pub mod queue;
pub mod sign;

pub use crate::config::webhooks::{DeliverySettings, Endpoint, EndpointSettings, Webhooks};
pub use crate::domain::EventType;
pub use deliver::Deliverer;
pub use outbox::{NewEvent, Outbox};
