//! creditgate: the billing and credits gateway of the iaFactory platform.
//!
//! Module map:
//!
//! - [`config`]    settings: TOML file + `CREDITGATE_*` env, validated at start
//! - [`catalog`]   plans and modules (costs, prefixes, upstreams) from the config
//! - [`domain`]    newtypes: user, plan and module ids, credits, API keys
//! - [`startup`]   bind, build the shared state, serve until shutdown
//! - [`connection`] one client connection: hyper while it talks, a bare socket while idle
//! - [`state`]     the shared state handlers read (`AppState`)
//! - [`proxy`]     the hot path: admit → identify → charge → forward → settle → respond
//! - [`metering`]  the Redis side: key layout, Lua scripts, the `Meter` API
//! - [`billing`]   rules needing both stores: charge with rebuild, grant, monthly reset
//! - [`accounts`]  users and API keys in Postgres; key cache; Redis rebuild
//! - [`leases`]    credit leases: hot accounts' calls spent locally, via a spend log
//! - [`ledger`]    usage streams → Postgres flusher, history queries, verify
//! - [`api`]       creditgate's own endpoints (health; billing/admin/credits APIs)
//! - [`error`]     the one mapping from errors to status + JSON body
//! - [`invoices`]  monthly invoices: amounts, gap-free numbers, the PDF
//! - [`body`]      the response body type
//! - [`upstream`]  the client side: one keep-alive pool per module, deadlines
//! - [`telemetry`] logging setup and the Prometheus metrics
//! - [`web`]       the user and admin panels, embedded at build time
//! - [`webhooks`]  signed event webhooks: the outbox and its deliverer
//! - [`demo`]      a tiny upstream for the demo configuration

pub mod accounts;
pub mod api;
pub mod billing;
pub mod body;
pub mod catalog;
pub mod config;
pub mod connection;
pub mod demo;
pub mod domain;
pub mod error;
pub mod invoices;
pub mod leases;
pub mod ledger;
pub mod metering;
pub mod proxy;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod upstream;
pub mod web;
pub mod webhooks;
