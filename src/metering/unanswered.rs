//! Charges whose answer was lost: what Redis can say about them, and
//! refund.lua's void modes to give them back. When to ask, and where else
//! to look (the ledger, once the flusher has moved a row there), is
//! [`crate::billing`]'s.

use redis::streams::StreamRangeReply;

use super::refund::REFUND;
use super::reply::{Reply, protocol};
use super::*;

/// Stream entries read per XRANGE while looking for a charge's row.
const PAGE: usize = 200;

/// How far Redis's clock may be from where the calibration put it, in ms:
/// the window searched starts this much before the charge can have run.
const CLOCK_SLACK_MS: i64 = 1000;

impl Meter {
    /// The unanswered charge `req` made as `event_id` with `redis_deadline`.
    pub(super) fn unanswered(
        &self,
        req: &ChargeRequest<'_>,
        event_id: String,
        redis_deadline: i64,
    ) -> Unanswered {
        Unanswered {
            user: req.user.clone(),
            event_id,
            redis_deadline,
            budget_ms: self.budget_ms(),
            request_id: req.request_id.clone(),
            module: req.module.id.clone(),
            action: req.action.cloned(),
            stamp: req.stamp.clone(),
            record: match req.idempotency {
                Idempotency::None => UnansweredRecord::None,
                Idempotency::RequestId => UnansweredRecord::Request,
                Idempotency::Key { key, .. } => UnansweredRecord::Key(key.clone()),
            },
        }
    }

    /// Redis's clock, unix ms, where `u`'s charge ran (or would have):
    /// past `u.redis_deadline` there, charge.lua can no longer make it.
    pub async fn clock_of(&self, u: &Unanswered) -> Result<i64, MeterError> {
        let stream = self.keys.stream_of(&u.user);
        let mut con = self.redis.clone();
        self.run("time", con.time_at(&stream)).await
    }

    /// The charge's row in its shard's usage stream, if it is there: the
    /// credits it took from the monthly allowance and from bonus. Searched
    /// from when it can first have run to the stream's end, a page at a
    /// time: the flusher deletes what it has committed, so the stream
    /// holds seconds of events, not history.
    pub async fn find_unanswered(&self, u: &Unanswered) -> Result<Option<(i64, i64)>, MeterError> {
        let stream = self.keys.stream_of(&u.user);
        let mut from = (u.redis_deadline - u.budget_ms - CLOCK_SLACK_MS)
            .max(0)
            .to_string();
        let needle = format!("{}\tcharge\t", u.event_id);
        loop {
            let mut con = self.redis.clone();
            let page: StreamRangeReply = self
                .run(
                    "xrange",
                    redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg(&from)
                        .arg("+")
                        .arg("COUNT")
                        .arg(PAGE)
                        .query_async(&mut con),
                )
                .await?;
            for entry in &page.ids {
                if let Some(split) = entry
                    .get::<Vec<u8>>("rows")
                    .and_then(|rows| split_of(&rows, needle.as_bytes()))
                {
                    return Ok(Some(split));
                }
            }
            match page.ids.last() {
                Some(last) if page.ids.len() == PAGE => from = format!("({}", last.id),
                _ => return Ok(None),
            }
        }
    }

    /// Gives the unanswered charge back if Redis made it (refund.lua's void
    /// modes), once whatever the retries. `split`: what it took, found in
    /// the stream or the ledger, for a charge without a record (one without
    /// a split was not made: nothing to do).
    pub async fn void(
        &self,
        u: &Unanswered,
        split: Option<(i64, i64)>,
    ) -> Result<VoidOutcome, MeterError> {
        let record = match &u.record {
            UnansweredRecord::None => self.keys.account(&u.user),
            UnansweredRecord::Request => self.keys.request(&u.user, &u.request_id),
            UnansweredRecord::Key(key) => self.keys.idempotency(&u.user, key),
        };
        let mode = match (&u.record, split) {
            (UnansweredRecord::None, None) => return Ok(VoidOutcome::NotCharged),
            (UnansweredRecord::None, Some(_)) => "void_direct",
            (UnansweredRecord::Request, _) => "void_record",
            (UnansweredRecord::Key(_), _) => "void_idem",
        };
        let (from_monthly, from_bonus) = split.unwrap_or((0, 0));
        let mut inv = REFUND.prepare_invoke();
        inv.key(self.keys.account(&u.user))
            .key(record)
            .key(self.keys.stream_of(&u.user))
            .key(self.keys.void(&u.user, &u.event_id))
            .arg(mode)
            .arg(from_monthly)
            .arg(from_bonus)
            .arg(u.stamp.day.as_str())
            .arg(u.stamp.period.as_str())
            .arg(u.module.as_str())
            .arg(u.action.as_ref().map_or("", ActionId::as_str))
            .arg(chrono::Utc::now().timestamp_millis())
            .arg(uuid::Uuid::now_v7().to_string())
            .arg(u.request_id.as_str())
            .arg(u.user.as_str())
            .arg("gateway:unanswered")
            .arg(&u.event_id)
            .arg(u.redis_deadline)
            .arg(self.idempotency_ttl_secs);
        let mut con = self.redis.clone();
        let reply: Value = self.run("refund", inv.invoke_async(&mut con)).await?;
        let r = Reply::parse("refund.lua", reply)?;
        Ok(match r.status.as_str() {
            "ok" => VoidOutcome::Refunded { amount: r.int(0)? },
            "not_found" => VoidOutcome::NotCharged,
            "told" => VoidOutcome::Told,
            "early" => VoidOutcome::Early(u64::try_from(r.int(0)?).unwrap_or(1)),
            "missing" => VoidOutcome::Missing,
            other => return Err(protocol(r.script, format!("unknown status {other:?}"))),
        })
    }
}

/// In a stream entry's rows (charge.lua's format, one event per line), the
/// charge row that starts with `needle` ("<event id>\tcharge\t"): its
/// fields 7 and 8, taken from monthly and from bonus.
fn split_of(rows: &[u8], needle: &[u8]) -> Option<(i64, i64)> {
    let at = rows
        .windows(needle.len())
        .enumerate()
        .find(|&(i, w)| w == needle && (i == 0 || rows[i - 1] == b'\n'))
        .map(|(i, _)| i)?;
    let line = rows[at..].split(|&b| b == b'\n').next()?;
    let mut fields = line.split(|&b| b == b'\t').skip(6);
    let from_monthly = rows::integer(fields.next()?)?;
    let from_bonus = rows::integer(fields.next()?)?;
    Some((from_monthly, from_bonus))
}

#[cfg(test)]
mod tests {
    use super::split_of;

    #[test]
    fn finds_the_charge_row_of_its_event_only() {
        let rows = b"e1:reset\treset\tpro\t\t\t100\t0\t0\t100\t0\t0\t\tu\tr\tby\t1\td\tp\td\n\
                     e1\tcharge\tpro\trag\t\t3\t2\t1\t98\t4\t3\t\tu\tr\tby\t1\td\tp\td\n\
                     e1:lease\tlease\tpro\trag\t\t20\t20\t0\t78\t4\t23\t\tu\tr\tby\t1\td\tp\td";
        assert_eq!(split_of(rows, b"e1\tcharge\t"), Some((2, 1)));
        assert_eq!(split_of(rows, b"e2\tcharge\t"), None);
        // Not at a line's start: another row's field, not this event.
        assert_eq!(split_of(b"x\te1\tcharge\t1\t2", b"e1\tcharge\t"), None);
    }
}
