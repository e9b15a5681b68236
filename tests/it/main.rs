//! The integration tests: one binary, one module per capability, sharing
//! `common` (spawning Redis, Postgres databases, upstreams and gateways).
//! nextest runs each test in its own process, so they stay isolated; one
//! binary links once instead of once per file.

mod common;

mod admin_writes;
mod api;
mod attacks;
mod billing;
mod cli;
mod cluster;
mod connections;
mod invoices;
mod leases;
mod ledger;
mod operations;
mod proxy;
mod scripts;
mod unanswered;
mod webhooks;
