//! sync.lua: what Postgres decided about an account's access (plan,
//! block, keys), mirrored into Redis.

use super::*;

pub(super) static SYNC: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/sync.lua")));

impl Meter {
    /// Mirrors an admin change committed to Postgres (sync.lua): plan,
    /// block and the live key set, all at once, unless Redis already holds
    /// a newer version. Effective on every instance with the next charge.
    pub async fn sync(&self, state: &SyncState) -> Result<SyncOutcome, MeterError> {
        let mut con = self.redis.clone();
        let mut inv = SYNC.prepare_invoke();
        inv.key(self.keys.account(&state.user))
            .key(self.keys.legacy_key_set(&state.user))
            .key(self.keys.api_keys(&state.user))
            .arg(state.version)
            .arg(state.plan.as_str())
            .arg(if state.blocked { "1" } else { "0" });
        for key in &state.keys {
            inv.arg(key.hash.as_str()).arg(key.details());
        }
        let applied: i64 = self.run("sync", inv.invoke_async(&mut con)).await?;
        Ok(match applied {
            1 => SyncOutcome::Applied,
            0 => SyncOutcome::AlreadyNewer,
            _ => SyncOutcome::NotInRedis,
        })
    }
}
