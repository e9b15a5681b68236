//! reset.lua: an account's new period.

use super::reply::{Reply, protocol};
use super::*;

pub(super) static RESET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/reset.lua")));

impl Meter {
    /// Starts `now`'s period for one account: reset.lua.
    pub async fn reset_period(
        &self,
        user: &UserId,
        actor: &str,
        now: &Stamp,
    ) -> Result<ResetOutcome, MeterError> {
        let mut con = self.redis.clone();
        let mut inv = RESET.prepare_invoke();
        inv.key(self.keys.account(user))
            .key(self.keys.stream_of(user))
            .arg(self.catalog.plan_table_arg())
            .arg(now.period.as_str())
            .arg(now.day.as_str())
            .arg(now.now_ms())
            .arg(uuid::Uuid::now_v7().to_string())
            .arg(user.as_str())
            .arg(actor);
        let reply: Value = self.run("reset", inv.invoke_async(&mut con)).await?;
        let r = Reply::parse("reset.lua", reply)?;
        Ok(match r.status.as_str() {
            "reset" => ResetOutcome::Reset {
                monthly: r.int(0)?,
                bonus: r.int(1)?,
            },
            "current" => ResetOutcome::Current,
            "missing" => ResetOutcome::Missing,
            "unknown_plan" => ResetOutcome::UnknownPlan,
            other => return Err(protocol(r.script, format!("unknown status {other:?}"))),
        })
    }
}
