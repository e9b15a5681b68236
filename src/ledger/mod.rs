//! The durable ledger: usage events from the Redis streams into Postgres
//! ([`flusher`]), the tables history and stats are read from ([`store`]),
//! and the proof that Redis and the ledger agree ([`verify`]).

pub mod event;
pub mod flusher;
pub mod partitions;
pub mod store;
pub mod verify;

pub use event::LedgerEvent;
pub use flusher::{Backlog, FlushError, Flusher, FlusherConfig, LedgerStats};
