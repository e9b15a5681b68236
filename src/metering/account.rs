//! An account's state in Redis: read as it is (`account`), or written
//! from Postgres when Redis lacks it (seed.lua).

use super::*;

pub(super) static SEED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/seed.lua")));

impl Meter {
    /// An account's hot state, for reads that are not on the hot path
    /// (billing API, admin lists). `None` when Redis does not hold it.
    pub async fn account(&self, user: &UserId) -> Result<Option<AccountState>, MeterError> {
        let mut con = self.redis.clone();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.keys.account(user)).arg(
            &[
                "plan", "monthly", "bonus", "period", "day", "used", "blocked",
            ][..],
        );
        type Row = (
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<String>,
        );
        let row: Row = self.run("read", cmd.query_async(&mut con)).await?;
        let (plan, monthly, bonus, period, day, used, blocked) = row;
        Ok(plan.map(|plan| AccountState {
            plan,
            monthly: monthly.unwrap_or(0),
            bonus: bonus.unwrap_or(0),
            period: period.unwrap_or_default(),
            day: day.unwrap_or_default(),
            day_used: used.unwrap_or(0),
            blocked: blocked.as_deref() == Some("1"),
            exhausted: blocked.as_deref() == Some("exhausted"),
        }))
    }
    /// Writes an account's state unless it is already there. Returns whether
    /// this call created it.
    pub async fn seed(&self, seed: &AccountSeed) -> Result<bool, MeterError> {
        let mut con = self.redis.clone();
        let mut inv = SEED.prepare_invoke();
        inv.key(self.keys.account(&seed.user))
            .key(self.keys.legacy_key_set(&seed.user))
            .key(self.keys.api_keys(&seed.user))
            .arg(seed.plan.as_str())
            .arg(seed.monthly.get())
            .arg(seed.bonus.get())
            .arg(&seed.period)
            .arg(&seed.day)
            .arg(seed.day_used.get())
            .arg(if seed.blocked { "1" } else { "0" });
        for key in &seed.keys {
            inv.arg(key.hash.as_str()).arg(key.details());
        }
        let created: i64 = self.run("seed", inv.invoke_async(&mut con)).await?;
        Ok(created == 1)
    }
}
