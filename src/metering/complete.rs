//! complete.lua: a finished call's response kept for replay.

use super::*;

pub(super) static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/complete.lua")));

impl Meter {
    /// Keeps the response of the first call under a proxy `Idempotency-Key`
    /// (complete.lua), or marks it unreplayable when `response` is `None`.
    /// `event_id` is the charge's: a record refunded and re-created by a
    /// retry is left alone. Returns whether the record was updated.
    pub async fn complete(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
        event_id: &str,
        response: Option<&StoredResponse>,
    ) -> Result<bool, MeterError> {
        let mut con = self.redis.clone();
        let mut inv = COMPLETE.prepare_invoke();
        inv.key(self.keys.idempotency(user, key)).arg(event_id);
        match response {
            Some(r) => inv
                .arg("d")
                .arg(r.status)
                .arg(&r.headers)
                .arg(r.body.as_ref()),
            None => inv.arg("x").arg(0).arg("").arg(""),
        };
        let stored: i64 = self.run("complete", inv.invoke_async(&mut con)).await?;
        Ok(stored == 1)
    }
}
