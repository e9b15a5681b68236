//! The durable ledger: usage events from the Redis streams into Postgres
//! ([`flusher`], writing through [`store`]), the history, stats and
//! exports read back ([`reports`]), monthly partitions ([`partitions`]),
//! and the proof that Redis and the ledger agree ([`verify`]).

mod backlog;
mod batch;
pub mod calls;
mod copy;
pub mod event;
pub mod flusher;
pub mod hook;
pub mod partitions;
pub mod reports;
pub mod store;
pub mod verify;

pub use backlog::{Backlog, backlog};
pub use calls::{Call, Calls};
pub use event::LedgerEvent;
pub use flusher::{FlushError, Flusher, FlusherConfig, LedgerStats};
pub use hook::BatchHook;
