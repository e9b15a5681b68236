//! grant.lua: bonus credits added, once per Idempotency-Key.

use super::reply::{Reply, protocol};
use super::*;

pub(super) static GRANT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/grant.lua")));

impl Meter {
    /// Adds bonus credits (grant.lua), once per Idempotency-Key and never
    /// taking the bonus past [`Credits::MAX`]. `credits` is bounded by the
    /// caller.
    pub async fn grant(&self, grant: &Grant<'_>, now: &Stamp) -> Result<GrantOutcome, MeterError> {
        let mut con = self.redis.clone();
        let (record, key, fingerprint) = match grant.idempotency {
            Some((key, fingerprint)) => (
                self.keys.grant_record(grant.user, key),
                key.as_str(),
                fingerprint,
            ),
            // Declared all the same: a script names every key it may touch.
            None => (self.keys.account(grant.user), "", ""),
        };
        let mut inv = GRANT.prepare_invoke();
        inv.key(self.keys.account(grant.user))
            .key(self.keys.stream_of(grant.user))
            .key(record)
            .arg(grant.credits.get())
            .arg(now.now_ms())
            .arg(uuid::Uuid::now_v7().to_string())
            .arg(grant.user.as_str())
            .arg(grant.actor)
            .arg(grant.reason)
            .arg(now.day.as_str())
            .arg(Credits::MAX)
            .arg(key)
            .arg(fingerprint)
            .arg(self.idempotency_ttl_secs);
        let reply: Value = self.run("grant", inv.invoke_async(&mut con)).await?;
        let r = Reply::parse("grant.lua", reply)?;
        Ok(match r.status.as_str() {
            "ok" => GrantOutcome::Granted {
                monthly: r.int(0)?,
                bonus: r.int(1)?,
            },
            "repeat" => GrantOutcome::Repeat {
                monthly: r.int(0)?,
                bonus: r.int(1)?,
            },
            "key_reused" => GrantOutcome::KeyReused,
            "over_limit" => GrantOutcome::OverLimit { bonus: r.int(0)? },
            "missing" => GrantOutcome::Missing,
            other => return Err(protocol(r.script, format!("unknown status {other:?}"))),
        })
    }
}
