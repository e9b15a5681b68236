//! refund.lua: one charge given back, at most once.

use super::reply::{Reply, protocol};
use super::*;

pub(super) static REFUND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/refund.lua")));

impl Meter {
    pub async fn refund(
        &self,
        user: &UserId,
        request_id: &RequestId,
        of: RefundOf<'_>,
        actor: &str,
        now: &Stamp,
    ) -> Result<RefundOutcome, MeterError> {
        let event_id = crate::domain::uuid_v7_text(crate::domain::uuid_v7());
        let mut con = self.redis.clone();
        let record = match of {
            RefundOf::Idempotent(key) => self.keys.idempotency(user, key),
            _ => self.keys.request(user, request_id),
        };
        let mut inv = REFUND.prepare_invoke();
        inv.key(self.keys.account(user))
            .key(record)
            .key(self.keys.stream_of(user));
        match of {
            RefundOf::Record | RefundOf::Idempotent(_) => {
                inv.arg(if matches!(of, RefundOf::Record) {
                    "record"
                } else {
                    "idem"
                })
                .arg(0)
                .arg(0)
                .arg("")
                .arg("")
                .arg("")
                .arg("");
            }
            RefundOf::Receipt {
                receipt,
                module,
                action,
                charged_at,
            } => {
                let (day, period) = receipt.counted_in(charged_at);
                inv.arg("direct")
                    .arg(receipt.from_monthly)
                    .arg(receipt.from_bonus)
                    .arg(day.as_str())
                    .arg(period.as_str())
                    .arg(module.as_str())
                    .arg(action.map_or("", ActionId::as_str));
            }
        }
        inv.arg(now.now_ms())
            .arg(&event_id)
            .arg(request_id.as_str())
            .arg(user.as_str())
            .arg(actor);
        let reply: Value = self.run("refund", inv.invoke_async(&mut con)).await?;
        decode_refund(reply)
    }
}

pub(super) fn decode_refund(reply: Value) -> Result<RefundOutcome, MeterError> {
    let r = Reply::parse("refund.lua", reply)?;
    Ok(match r.status.as_str() {
        "ok" => RefundOutcome::Refunded {
            amount: r.int(0)?,
            monthly: r.int(1)?,
            bonus: r.int(2)?,
            day_used: r.int(3)?,
        },
        "not_found" => RefundOutcome::NotFound,
        "missing" => RefundOutcome::Missing,
        other => return Err(protocol(r.script, format!("unknown status {other:?}"))),
    })
}
