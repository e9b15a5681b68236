//! charge.lua: the charge (grouped per shard by `batch`), its event's
//! fields, and the decoding of its answer.

use super::reply::{Reply, protocol};
use super::*;

pub(super) static CHARGE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/charge.lua")));

impl Meter {
    /// Decide and (in [`Mode::Charge`]) deduct one call: charge.lua.
    pub async fn charge(&self, req: &ChargeRequest<'_>) -> Result<ChargeOutcome, MeterError> {
        let cost = req.module.cost_of(req.action);
        let event_id = crate::domain::uuid_v7_text(match req.mode {
            Mode::Lease { event, .. } => event,
            _ => crate::domain::uuid_v7(),
        });
        let account = self.keys.account(req.user);
        let (record, idempotency, fingerprint, lease) = match req.idempotency {
            // Where charge.lua indexes a lease it grants.
            Idempotency::None if matches!(req.mode, Mode::Lease { .. }) => {
                (self.keys.leases_of(req.user), "0", "", 0)
            }
            // Never read: any key of the account's slot will do.
            Idempotency::None => (account.clone(), "0", "", 0),
            Idempotency::RequestId => (self.keys.request(req.user, req.request_id), "1", "", 0),
            Idempotency::Key {
                key,
                fingerprint,
                lease_until_ms,
            } => (
                self.keys.idempotency(req.user, key),
                "2",
                fingerprint,
                lease_until_ms,
            ),
        };
        let keys = [account, self.keys.api_keys(req.user), record];
        // The fifteen per-charge arguments of charge.lua, in its order.
        let mut args = batch::Args::with_capacity(15, 400);
        args.push(req.key_hash.map_or("", KeyHash::as_str));
        args.push(req.module.id.as_str());
        args.push(req.action.map_or("", ActionId::as_str));
        args.push(cost.get());
        args.push(self.catalog.allowed_plans_arg(&req.module.id));
        args.push(req.stamp.day.as_str());
        args.push(req.stamp.period.as_str());
        args.push(req.stamp.now_ms());
        args.push(event_id.as_str());
        args.push(req.request_id.as_str());
        args.push(idempotency);
        match req.mode {
            Mode::Charge => args.push("charge"),
            Mode::Check => args.push("check"),
            Mode::Lease {
                credits,
                least,
                room,
                ttl_ms,
                ..
            } => args.push_with(|out| {
                let mut n = itoa::Buffer::new();
                out.extend_from_slice(b"lease:");
                out.extend_from_slice(n.format(credits).as_bytes());
                out.push(b':');
                out.extend_from_slice(n.format(least).as_bytes());
                out.push(b':');
                out.extend_from_slice(n.format(room).as_bytes());
                out.push(b':');
                out.extend_from_slice(n.format(ttl_ms).as_bytes());
            }),
        }
        args.push(fingerprint);
        args.push(lease);
        args.push_with(|out| event_members(out, req));
        let shard = self.keys.shard_of(req.user);
        let started_ms = chrono::Utc::now().timestamp_millis();
        let deadline = std::time::Instant::now() + self.timeout;
        if !self.clocks_compared() {
            // The first charges after a start, before the background
            // comparison answered: a charge without a deadline could run
            // any time later, so one whose answer was lost could never be
            // given back safely. One TIME first, within the same budget.
            match tokio::time::timeout_at(deadline.into(), self.calibrate()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(MeterError::Timeout(self.timeout)),
            }
        }
        let redis_deadline = self.deadline_on_redis(started_ms);
        let sent = self
            .batcher
            .charge(
                shard,
                batch::Charge {
                    keys,
                    args,
                    deadline,
                    redis_deadline,
                },
            )
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(batch::Failed { error, sent }) if !sent || req.mode == Mode::Check => {
                return Err(error);
            }
            Err(batch::Failed { error, .. }) => {
                return Err(MeterError::Unanswered {
                    charge: Box::new(self.unanswered(req, event_id, redis_deadline)),
                    cause: Box::new(error),
                });
            }
        };
        match decode_charge(answer.value, event_id) {
            Ok(ChargeOutcome::Charged(receipt)) if !answer.replicated => {
                self.give_back(req, &receipt).await;
                if let Some(LeaseUse::Took(lease)) = &receipt.lease {
                    // Nobody will spend it: back whole, as the charge.
                    if let Err(error) = self
                        .settle_lease(req.user, &lease.id, 0, "replication")
                        .await
                    {
                        tracing::error!(user = %req.user, %error, "could not give back an unreplicated lease");
                    }
                }
                Err(MeterError::NotReplicated)
            }
            Err(MeterError::Expired) => {
                // Late by our own deadline, or the clocks moved apart:
                // measure again so the next deadline is right.
                let meter = self.clone();
                tokio::spawn(async move {
                    let _ = meter.calibrate().await;
                });
                Err(MeterError::Timeout(self.timeout))
            }
            decoded => decoded,
        }
    }

    /// Refunds a charge the replicas did not confirm: the caller answers
    /// 503 "nothing was charged", so the master must not keep it either.
    /// Should this refund be lost with the master, so is the charge.
    async fn give_back(&self, req: &ChargeRequest<'_>, receipt: &Receipt) {
        let of = match req.idempotency {
            Idempotency::Key { key, .. } => RefundOf::Idempotent(key),
            Idempotency::RequestId => RefundOf::Record,
            Idempotency::None => RefundOf::Receipt {
                receipt,
                module: &req.module.id,
                action: req.action,
                charged_at: req.stamp,
            },
        };
        if let Err(error) = self
            .refund(req.user, req.request_id, of, "replication", req.stamp)
            .await
        {
            tracing::error!(user = %req.user, %error, "could not give back an unreplicated charge");
        }
    }
}

/// The fields every event row of a charge ends with (charge.lua's last
/// per-charge argument): user, request id, actor, now, day, period, day,
/// tab-separated and escaped here so the script only concatenates.
pub(super) fn event_members(out: &mut Vec<u8>, req: &ChargeRequest<'_>) {
    use rows::escape_field;
    escape_field(out, req.user.as_str());
    out.push(b'\t');
    escape_field(out, req.request_id.as_str());
    out.push(b'\t');
    escape_field(out, req.actor);
    out.push(b'\t');
    out.extend_from_slice(itoa::Buffer::new().format(req.stamp.now_ms()).as_bytes());
    for value in [
        req.stamp.day.as_str(),
        req.stamp.period.as_str(),
        req.stamp.day.as_str(),
    ] {
        out.push(b'\t');
        escape_field(out, value);
    }
}

/// charge.lua's common answer, one string:
/// `ok <charged> <monthly> <bonus> <day_used> <daily_limit> <from_monthly> <from_bonus> <auto_blocked>
/// <rate_remaining> <rate_reset_ms> <plan>[ <lease credits> <lease from monthly> <lease from bonus>]
/// [ @<day>/<period>]`.
/// Strict: one space between fields, every number an integer, or the reply
/// is refused.
fn decode_ok(line: &[u8], event_id: String) -> Option<ChargeOutcome> {
    let mut rest = line.strip_prefix(b"ok ")?;
    // `@day/period` can only be the last field: only it is looked at, not
    // the whole answer searched for an `@` every charge lacks.
    let mut counted_in = None;
    let last = rest.iter().rposition(|&b| b == b' ').map_or(0, |i| i + 1);
    if let Some(moved) = rest[last..].strip_prefix(b"@") {
        let (day, period) = std::str::from_utf8(moved).ok()?.split_once('/')?;
        counted_in = Some(Box::new((LocalDay::parse(day)?, Period::parse(period)?)));
        rest = rest[..last].strip_suffix(b" ")?;
    }
    let mut n = [0i64; 10];
    for v in &mut n {
        let end = rest.iter().position(|&b| b == b' ')?;
        *v = rows::integer(&rest[..end])?;
        rest = &rest[end + 1..];
    }
    let [
        charged,
        monthly,
        bonus,
        day_used,
        limit,
        from_monthly,
        from_bonus,
        auto_blocked,
        rate_remaining,
        rate_reset_ms,
    ] = n;
    let (plan, lease) = match rest.iter().position(|&b| b == b' ') {
        None => (rest, None),
        Some(end) => {
            let mut l = [0i64; 3];
            let mut fields = rest[end + 1..].split(|&b| b == b' ');
            for v in &mut l {
                *v = rows::integer(fields.next()?)?;
            }
            if fields.next().is_some() {
                return None;
            }
            let [credits, from_monthly, from_bonus] = l;
            let lease = LeaseTaken {
                id: format!("{event_id}:lease"),
                credits,
                from_monthly,
                from_bonus,
            };
            (&rest[..end], Some(LeaseUse::Took(lease)))
        }
    };
    Some(ChargeOutcome::Charged(Receipt {
        charged,
        balance: Balance {
            monthly: Credits::recorded(monthly),
            bonus: Credits::recorded(bonus),
            day_used: Credits::recorded(day_used),
            daily_limit: (limit >= 0).then(|| Credits::recorded(limit)),
        },
        from_monthly,
        from_bonus,
        auto_blocked: auto_blocked == 1,
        rate: match (u32::try_from(rate_remaining), u64::try_from(rate_reset_ms)) {
            (Ok(remaining), Ok(reset_ms)) => Some(RateState {
                remaining,
                reset_ms,
            }),
            _ => None,
        },
        plan: PlanId::parse(std::str::from_utf8(plan).ok()?).ok()?,
        lease,
        event_id,
        counted_in,
    }))
}

pub(super) fn decode_charge(reply: Value, event_id: String) -> Result<ChargeOutcome, MeterError> {
    if let Value::BulkString(line) = &reply {
        return decode_ok(line, event_id).ok_or_else(|| {
            protocol(
                "charge.lua",
                format!("bad answer {:?}", String::from_utf8_lossy(line)),
            )
        });
    }
    let r = Reply::parse("charge.lua", reply)?;
    Ok(match r.status.as_str() {
        "duplicate" => ChargeOutcome::Duplicate {
            balance: r.balance(1)?,
            plan: r.plan(5)?,
        },
        "replay" => ChargeOutcome::Repeat(Repeat::Replay {
            original: r.text(0)?,
            response: StoredResponse {
                status: u16::try_from(r.int(1)?)
                    .map_err(|_| protocol(r.script, "replay: bad status"))?,
                headers: r.text(2)?,
                body: r.bytes(3)?,
            },
            balance: r.balance(4)?,
            plan: r.plan(8)?,
        }),
        "in_progress" => ChargeOutcome::Repeat(Repeat::InProgress {
            original: r.text(0)?,
        }),
        "key_reused" => ChargeOutcome::Repeat(Repeat::KeyReused {
            original: r.text(0)?,
        }),
        "not_replayable" => ChargeOutcome::Repeat(Repeat::NotReplayable {
            original: r.text(0)?,
        }),
        "daily_limit" => ChargeOutcome::Refused(Refusal::DailyLimit(r.balance(0)?)),
        "insufficient" => ChargeOutcome::Refused(Refusal::InsufficientCredits(r.balance(0)?)),
        "missing" => ChargeOutcome::Missing,
        "expired" => return Err(MeterError::Expired),
        "error" => return Err(protocol(r.script, format!("in Redis: {}", r.text(0)?))),
        "unknown_key" => ChargeOutcome::Refused(Refusal::UnknownKey),
        "key_expired" => ChargeOutcome::Refused(Refusal::KeyExpired),
        "key_scope" => ChargeOutcome::Refused(Refusal::KeyScope),
        "blocked" => ChargeOutcome::Refused(Refusal::Blocked),
        "not_in_plan" => ChargeOutcome::Refused(Refusal::ModuleNotInPlan),
        "rate_limited" => {
            ChargeOutcome::Refused(Refusal::RateLimited(u64::try_from(r.int(0)?).unwrap_or(0)))
        }
        other => return Err(protocol(r.script, format!("unknown status {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::super::refund::decode_refund;
    use super::*;

    /// `{status, integers...}`, as every answer but charge.lua's "ok".
    fn reply(status: &str, n: &[i64]) -> Value {
        let mut v = vec![Value::BulkString(status.as_bytes().to_vec())];
        v.extend(n.iter().map(|i| Value::Int(*i)));
        Value::Array(v)
    }

    #[test]
    fn decodes_every_charge_status() {
        let ok = decode_charge(
            Value::BulkString(b"ok 3 7 0 3 100 3 0 0 9 1500 starter".to_vec()),
            "ev".into(),
        )
        .expect("ok");
        assert_eq!(
            ok,
            ChargeOutcome::Charged(Receipt {
                event_id: "ev".into(),
                plan: PlanId::parse("starter").expect("plan"),
                auto_blocked: false,
                charged: 3,
                from_monthly: 3,
                from_bonus: 0,
                balance: Balance {
                    monthly: Credits::recorded(7),
                    bonus: Credits::ZERO,
                    day_used: Credits::recorded(3),
                    daily_limit: Some(Credits::recorded(100))
                },
                rate: Some(RateState {
                    remaining: 9,
                    reset_ms: 1500
                }),
                lease: None,
                counted_in: None,
            })
        );
        let leased = decode_charge(
            Value::BulkString(b"ok 1 40 5 61 -1 1 0 0 -1 -1 pro 60 55 5".to_vec()),
            "ev".into(),
        )
        .expect("ok with a lease");
        assert!(matches!(
            leased,
            ChargeOutcome::Charged(Receipt { lease: Some(LeaseUse::Took(LeaseTaken { ref id, credits: 60, from_monthly: 55, from_bonus: 5 })), .. })
                if id == "ev:lease"
        ));
        // Counted in the account's later day and period, with and
        // without a lease.
        for (line, leased) in [
            (
                &b"ok 1 40 5 61 -1 1 0 0 -1 -1 pro @2026-12-01/2026-12"[..],
                false,
            ),
            (
                b"ok 1 40 5 61 -1 1 0 0 -1 -1 pro 60 55 5 @2026-12-01/2026-12",
                true,
            ),
        ] {
            let Ok(ChargeOutcome::Charged(r)) =
                decode_charge(Value::BulkString(line.to_vec()), "ev".into())
            else {
                panic!("not a charge: {}", String::from_utf8_lossy(line));
            };
            let (day, period) = r.counted_in.as_deref().expect("counted in");
            assert_eq!((day.as_str(), period.as_str()), ("2026-12-01", "2026-12"));
            assert_eq!(r.plan.as_str(), "pro");
            assert_eq!(r.lease.is_some(), leased);
        }
        for bad in [
            "ok 3 7 0 3 100 3 0 0 -1 -1",
            "ok 3 7 0 3 100 3 0 0 p",
            "ok 3 x 0 3 100 3 0 0 -1 -1 p",
            "okay 3 7 0 3 100 3 0 0 -1 -1 p",
            "ok 3 7  0 3 100 3 0 0 -1 -1 p",
            "ok 3 - 0 3 100 3 0 0 -1 -1 p",
            "ok 3 7 0 3 100 3 0 0 -1 -1 p @2026-13-01/2026-12",
            "ok 3 7 0 3 100 3 0 0 -1 -1 p @2026-12-01/2026-1",
            "ok 3 7 0 3 100 3 0 0 -1 -1 p @2026-12-01",
            "ok 3 7 0 3 100 3 0 0 -1 -1 p@2026-12-01/2026-12",
            "ok 3 99999999999999999999 0 3 100 3 0 0 -1 -1 p",
        ] {
            let answer = Value::BulkString(bad.as_bytes().to_vec());
            assert!(decode_charge(answer, String::new()).is_err(), "{bad}");
        }
        let unlimited = decode_charge(reply("insufficient", &[1, 0, 9, -1]), String::new())
            .expect("insufficient");
        assert!(matches!(
            unlimited,
            ChargeOutcome::Refused(Refusal::InsufficientCredits(Balance {
                daily_limit: None,
                ..
            }))
        ));
        assert_eq!(
            decode_charge(reply("blocked", &[]), String::new()).ok(),
            Some(ChargeOutcome::Refused(Refusal::Blocked))
        );
        assert_eq!(
            decode_charge(reply("missing", &[]), String::new()).ok(),
            Some(ChargeOutcome::Missing)
        );
        assert_eq!(
            decode_charge(reply("rate_limited", &[1999]), String::new()).ok(),
            Some(ChargeOutcome::Refused(Refusal::RateLimited(1999)))
        );
        let balance = Balance {
            monthly: Credits::recorded(7),
            bonus: Credits::recorded(2),
            day_used: Credits::recorded(3),
            daily_limit: Some(Credits::recorded(100)),
        };
        assert_eq!(
            decode_charge(reply("daily_limit", &[7, 2, 3, 100]), String::new()).ok(),
            Some(ChargeOutcome::Refused(Refusal::DailyLimit(balance)))
        );
        for (status, refusal) in [
            ("unknown_key", Refusal::UnknownKey),
            ("key_expired", Refusal::KeyExpired),
            ("key_scope", Refusal::KeyScope),
            ("not_in_plan", Refusal::ModuleNotInPlan),
        ] {
            assert_eq!(
                decode_charge(reply(status, &[]), String::new()).ok(),
                Some(ChargeOutcome::Refused(refusal)),
                "{status}"
            );
        }
        let text = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let mixed = |values: Vec<Value>| Value::Array(values);
        assert_eq!(
            decode_charge(
                mixed(vec![
                    text("duplicate"),
                    Value::Int(0),
                    Value::Int(7),
                    Value::Int(2),
                    Value::Int(3),
                    Value::Int(100),
                    text("pro"),
                ]),
                String::new()
            )
            .ok(),
            Some(ChargeOutcome::Duplicate {
                balance,
                plan: PlanId::parse("pro").expect("plan")
            })
        );
        assert_eq!(
            decode_charge(
                mixed(vec![
                    text("replay"),
                    text("r-1"),
                    Value::Int(201),
                    text("content-type: text/plain"),
                    text("done"),
                    Value::Int(7),
                    Value::Int(2),
                    Value::Int(3),
                    Value::Int(100),
                    text("pro"),
                ]),
                String::new()
            )
            .ok(),
            Some(ChargeOutcome::Repeat(Repeat::Replay {
                original: "r-1".into(),
                response: StoredResponse {
                    status: 201,
                    headers: "content-type: text/plain".into(),
                    body: bytes::Bytes::from_static(b"done"),
                },
                balance,
                plan: PlanId::parse("pro").expect("plan"),
            }))
        );
        for (status, repeat) in [
            (
                "in_progress",
                Repeat::InProgress {
                    original: "r-1".into(),
                },
            ),
            (
                "key_reused",
                Repeat::KeyReused {
                    original: "r-1".into(),
                },
            ),
            (
                "not_replayable",
                Repeat::NotReplayable {
                    original: "r-1".into(),
                },
            ),
        ] {
            assert_eq!(
                decode_charge(mixed(vec![text(status), text("r-1")]), String::new()).ok(),
                Some(ChargeOutcome::Repeat(repeat)),
                "{status}"
            );
        }
        assert!(matches!(
            decode_charge(reply("expired", &[]), String::new()),
            Err(MeterError::Expired)
        ));
        assert!(decode_charge(mixed(vec![text("error"), text("boom")]), String::new()).is_err());
        assert!(decode_charge(reply("surprise", &[]), String::new()).is_err());
    }

    #[test]
    fn the_charge_answer_reads_negative_numbers_and_no_limit() {
        // No script leaves a negative balance; were one found, it reads as
        // 0 credits rather than failing every call of the account.
        let limitless = decode_ok(b"ok 1 -5 0 1 -1 1 0 1 -1 -1 free", String::new());
        assert!(matches!(
            limitless,
            Some(ChargeOutcome::Charged(Receipt {
                balance: Balance {
                    monthly: Credits::ZERO,
                    daily_limit: None,
                    ..
                },
                auto_blocked: true,
                ..
            }))
        ));
    }

    #[test]
    fn malformed_replies_are_protocol_errors() {
        assert!(decode_charge(Value::Int(1), String::new()).is_err());
        assert!(decode_charge(reply("ok", &[1]), String::new()).is_err());
        assert!(decode_charge(reply("ok", &[3, 7, 0, 3, 100, 3, 0]), String::new()).is_err());
        assert!(decode_charge(reply("surprise", &[]), String::new()).is_err());
        assert!(decode_refund(reply("ok", &[])).is_err());
    }
}
