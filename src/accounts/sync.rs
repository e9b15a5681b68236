//! The outbox between Postgres and Redis for admin changes (plan, block,
//! keys): each change marks its account in `account_sync`, in its own
//! transaction; the mark is cleared once Redis has applied that version.
//! Whatever Redis missed (down, paused, slow) the reconciler applies later.

use crate::domain::{KeyHash, ModuleId, PlanId, UserId};
use crate::metering::{LiveKey, SyncState};

use super::{AccountError, Accounts};

/// Marks `user` for a Redis update, inside the change's transaction. A
/// newer change takes a newer version.
pub async fn mark_for_sync(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    user: &UserId,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO account_sync (user_id) VALUES ($1)
         ON CONFLICT (user_id) DO UPDATE
         SET version = nextval('account_sync_version'), requested_at = now()",
    )
    .bind(user.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Accounts {
    /// The state Redis must mirror for `user` and its version, read in one
    /// statement (one snapshot); `None` when nothing is pending.
    pub async fn sync_state(&self, user: &UserId) -> Result<Option<SyncState>, AccountError> {
        read_sync_state(self.pool(), user).await
    }

    /// Marks `user` for a sync under a fresh version and reads the state to
    /// mirror, in one transaction. For a key Postgres says is live but
    /// Redis does not know: mirroring the whole state, versioned, instead
    /// of adding that one key means a revocation racing with the repair
    /// can never be undone by it. The revocation's transaction waits on
    /// this one's `account_sync` row (or this one on the revocation's), so
    /// whichever commits second carries the newer version and sees the
    /// other's effect, and Redis keeps the newest.
    pub async fn fresh_sync_state(&self, user: &UserId) -> Result<Option<SyncState>, AccountError> {
        let mut tx = self.pool().begin().await?;
        mark_for_sync(&mut tx, user).await?;
        let state = read_sync_state(&mut *tx, user).await?;
        tx.commit().await?;
        Ok(state)
    }

    /// Clears the mark if it is still at `version` (a newer change keeps it).
    pub async fn sync_done(&self, user: &UserId, version: i64) -> Result<(), AccountError> {
        sqlx::query("DELETE FROM account_sync WHERE user_id = $1 AND version = $2")
            .bind(user.as_str())
            .bind(version)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Accounts with a pending mark, oldest first.
    pub async fn pending_syncs(&self, limit: i64) -> Result<Vec<UserId>, AccountError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT user_id FROM account_sync ORDER BY requested_at LIMIT $1")
                .bind(limit)
                .fetch_all(self.pool())
                .await?;
        rows.into_iter()
            .map(|(id,)| UserId::parse(&id).map_err(|e| AccountError::Corrupt(e.to_string())))
            .collect()
    }

    /// Forgets admin Idempotency-Keys older than their 24 h window.
    pub async fn expire_idempotency(&self) -> Result<u64, AccountError> {
        let done = sqlx::query(
            "DELETE FROM admin_idempotency WHERE created_at < now() - interval '24 hours'",
        )
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}

/// version, plan, status, and the live keys' hashes, expiries (unix ms, -1
/// for none) and scopes (modules joined by commas, "" for none).
type SyncRow = (i64, String, String, Vec<String>, Vec<i64>, Vec<String>);

/// The state Redis must mirror for `user` and its pending version, in one
/// statement (one snapshot).
async fn read_sync_state<'e>(
    db: impl sqlx::PgExecutor<'e>,
    user: &UserId,
) -> Result<Option<SyncState>, AccountError> {
    // The live keys as three arrays in one key order, so that the whole
    // state is one statement's snapshot.
    let row: Option<SyncRow> = sqlx::query_as(
        "SELECT s.version, u.plan, u.status,
                ARRAY(SELECT key_hash FROM api_keys
                      WHERE user_id = u.id AND revoked_at IS NULL ORDER BY key_hash),
                ARRAY(SELECT COALESCE((extract(epoch FROM expires_at) * 1000)::bigint, -1)
                      FROM api_keys
                      WHERE user_id = u.id AND revoked_at IS NULL ORDER BY key_hash),
                ARRAY(SELECT COALESCE(array_to_string(modules, ','), '') FROM api_keys
                      WHERE user_id = u.id AND revoked_at IS NULL ORDER BY key_hash)
         FROM account_sync s JOIN users u ON u.id = s.user_id
         WHERE s.user_id = $1",
    )
    .bind(user.as_str())
    .fetch_optional(db)
    .await?;
    row.map(|(version, plan, status, hashes, expires, scopes)| {
        Ok(SyncState {
            user: user.clone(),
            version,
            plan: PlanId::parse(&plan).map_err(|e| AccountError::Corrupt(e.to_string()))?,
            blocked: status == "blocked",
            keys: hashes
                .into_iter()
                .zip(expires)
                .zip(scopes)
                .map(|((hash, expires_ms), scope)| {
                    live_key(hash, (expires_ms >= 0).then_some(expires_ms), &scope)
                })
                .collect::<Result<_, _>>()?,
        })
    })
    .transpose()
}

/// A live key as read from `api_keys`: `scope` is its modules joined by
/// commas, empty for every module of the plan.
pub(super) fn live_key(
    hash: String,
    expires_ms: Option<i64>,
    scope: &str,
) -> Result<LiveKey, AccountError> {
    let modules = if scope.is_empty() {
        None
    } else {
        Some(
            scope
                .split(',')
                .map(|m| ModuleId::parse(m).map_err(|e| AccountError::Corrupt(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?,
        )
    };
    Ok(LiveKey {
        hash: KeyHash::from_stored(hash),
        expires_ms,
        modules,
    })
}
