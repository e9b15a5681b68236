//! What else a ledger batch writes in its own transaction. The webhooks'
//! outbox implements it (events caused by grants and by balances crossing
//! a line must exist exactly when the batch does), so the ledger depends
//! on this trait and not on webhooks.

use futures_util::future::BoxFuture;
use sqlx::PgConnection;

use super::LedgerEvent;

pub trait BatchHook: Send + Sync {
    /// Whether the hook has anything to do at all (no endpoints: no).
    fn active(&self) -> bool;

    /// Runs inside the batch's transaction, after its roll-ups. Returns
    /// what to hand to [`BatchHook::committed`] once the batch commits.
    fn in_batch<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [LedgerEvent<'a>],
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>>;

    /// The batch committed.
    fn committed(&self, keys: Vec<String>);
}
