//! refund.lua: once per charge, and to the part of the balance it came from.

use super::*;

#[tokio::test]
async fn refund_by_record_happens_once() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("erin", "tiny", 10, 0, &now).await;
    let rid = RequestId::parse("req-1").expect("rid");
    charged(
        &h.charge(&user, "legal", &now, Some("req-1"), Mode::Charge)
            .await,
    )
    .expect("charged");
    let dup = h
        .charge(&user, "legal", &now, Some("req-1"), Mode::Charge)
        .await;
    assert!(matches!(dup, ChargeOutcome::Duplicate { .. }));
    let first = h
        .meter
        .refund(&user, &rid, RefundOf::Record, "test", &now)
        .await;
    assert!(matches!(
        first,
        Ok(RefundOutcome::Refunded {
            amount: 3,
            monthly: 10,
            ..
        })
    ));
    let second = h
        .meter
        .refund(&user, &rid, RefundOf::Record, "test", &now)
        .await;
    assert!(matches!(second, Ok(RefundOutcome::NotFound)));
    assert_eq!(h.hash(&user).await.0, 10);
    assert_eq!(h.event_kinds(&user).await, ["charge", "refund"]);
}

#[tokio::test]
async fn a_refund_after_the_month_rolled_over_returns_only_the_bonus_part() {
    let h = Harness::new().await;
    let november = h.at("2026-11-30T22:59:59Z");
    let user = h.seed("fay", "tiny", 1, 5, &november).await;
    let outcome = h
        .charge(&user, "legal", &november, None, Mode::Charge)
        .await;
    let receipt = receipt(outcome);
    assert_eq!((receipt.from_monthly, receipt.from_bonus), (1, 2));
    // A December call rolls the period over before the refund arrives.
    let december = h.at("2026-11-30T23:00:01Z");
    charged(&h.charge(&user, "rag", &december, None, Mode::Charge).await).expect("charged");
    let refund = refund_legal(&h, &user, &receipt, &november, &december).await;
    assert!(matches!(
        refund,
        Ok(RefundOutcome::Refunded { amount: 2, .. })
    ));
    // December: 10 - 1 (rag) = 9 monthly; bonus 3 + 2 back = 5; day counter
    // of December untouched by a November refund.
    let (monthly, bonus, used, _, _) = h.hash(&user).await;
    assert_eq!((monthly, bonus, used), (9, 5, 1));
}

/// Refunds the "legal" call `receipt` describes, charged at `charged_at`,
/// by its receipt (no record), at `now`.
async fn refund_legal(
    h: &Harness,
    user: &UserId,
    receipt: &Receipt,
    charged_at: &Stamp,
    now: &Stamp,
) -> Result<RefundOutcome, creditgate::metering::MeterError> {
    let module = h.catalog.module("legal").expect("legal").id.clone();
    h.meter
        .refund(
            user,
            &RequestId::parse("anon").expect("rid"),
            RefundOf::Receipt {
                receipt,
                module: &module,
                action: None,
                charged_at,
            },
            "test",
            now,
        )
        .await
}

/// A call stamped in November but decided after December began counted in
/// December (charge.lua never rolls an account back): its refund gives
/// the whole amount back to December's allowance and day, where it was
/// taken, not to its stamp's month (which would keep the allowance part).
#[tokio::test]
async fn a_late_calls_refund_returns_to_the_day_and_period_it_counted_in() {
    let h = Harness::new().await;
    let november = h.at("2026-11-30T22:59:59.990Z");
    let user = h.seed("gil", "tiny", 10, 0, &november).await;
    let december = h.at("2026-11-30T23:00:00.010Z");
    charged(
        &h.charge(&user, "legal", &december, None, Mode::Charge)
            .await,
    )
    .expect("charged");
    let late = receipt(
        h.charge(&user, "legal", &november, None, Mode::Charge)
            .await,
    );
    let (day, period) = late.counted_in(&november);
    assert_eq!((day.as_str(), period.as_str()), ("2026-12-01", "2026-12"));
    let (monthly, _, used, ..) = h.hash(&user).await;
    assert_eq!((monthly, used), (4, 6));
    let refund = refund_legal(&h, &user, &late, &november, &december).await;
    assert!(matches!(
        refund,
        Ok(RefundOutcome::Refunded {
            amount: 3,
            monthly: 7,
            day_used: 3,
            ..
        })
    ));
    let (monthly, bonus, used, day, period) = h.hash(&user).await;
    assert_eq!(
        (monthly, bonus, used, day.as_str(), period.as_str()),
        (7, 0, 3, "2026-12-01", "2026-12")
    );
    // A call on time reports nothing: the stamp's day and period stand.
    let on_time = h
        .charge(&user, "legal", &december, None, Mode::Charge)
        .await;
    assert!(receipt(on_time).counted_in.is_none());
}

/// The unanswered charge `receipt` made for `rid`, its deadline `deadline`
/// (Redis's clock, unix ms).
fn unanswered(
    h: &Harness,
    user: &UserId,
    receipt_event: &str,
    rid: &str,
    record: UnansweredRecord,
    deadline: i64,
    stamp: &Stamp,
) -> Unanswered {
    Unanswered {
        user: user.clone(),
        event_id: receipt_event.to_owned(),
        redis_deadline: deadline,
        budget_ms: 300,
        request_id: RequestId::parse(rid).expect("rid"),
        module: h.catalog.module("legal").expect("legal").id.clone(),
        action: None,
        stamp: stamp.clone(),
        record,
    }
}

fn event_of(outcome: &ChargeOutcome) -> String {
    match outcome {
        ChargeOutcome::Charged(receipt) => receipt.event_id.clone(),
        other => panic!("not charged: {other:?}"),
    }
}

#[tokio::test]
async fn a_void_waits_for_the_deadline_then_gives_a_recorded_charge_back_once() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("gil", "tiny", 10, 0, &now).await;
    let first = h
        .charge(&user, "legal", &now, Some("req-1"), Mode::Charge)
        .await;
    let event = event_of(&first);
    let redis_now = h.meter.redis_now_ms().await.expect("TIME");
    let record = UnansweredRecord::Request;
    let pending = unanswered(&h, &user, &event, "req-1", record, redis_now + 60_000, &now);
    // A charge may still run until its deadline: nothing is decided.
    let early = h.meter.void(&pending, None).await.expect("void");
    assert!(
        matches!(early, VoidOutcome::Early(ms) if ms > 50_000),
        "{early:?}"
    );
    assert_eq!(h.hash(&user).await.0, 7);

    let past = Unanswered {
        redis_deadline: redis_now - 1,
        ..pending
    };
    let void = h.meter.void(&past, None).await.expect("void");
    assert_eq!(void, VoidOutcome::Refunded { amount: 3 });
    assert_eq!(h.hash(&user).await.0, 10);
    // Retried (its answer lost too): nothing more.
    let again = h.meter.void(&past, None).await.expect("void");
    assert_eq!(again, VoidOutcome::NotCharged);
    assert_eq!(h.hash(&user).await.0, 10);
    assert_eq!(h.event_kinds(&user).await, ["charge", "refund"]);
    // The request id is free again: the client's retry is a new charge.
    let retry = h
        .charge(&user, "legal", &now, Some("req-1"), Mode::Charge)
        .await;
    assert!(charged(&retry).is_some(), "{retry:?}");
    // And the void of the first charge never takes the retry's.
    let third = h.meter.void(&past, None).await.expect("void");
    assert_eq!(third, VoidOutcome::NotCharged);
    assert_eq!(h.hash(&user).await.0, 7);
}

#[tokio::test]
async fn a_void_keeps_a_charge_whose_repeat_was_told_it_was_charged() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("hal", "tiny", 10, 0, &now).await;
    let first = h
        .charge(&user, "legal", &now, Some("req-1"), Mode::Charge)
        .await;
    let event = event_of(&first);
    // The client retried before the void and heard "duplicate": charged.
    let repeat = h
        .charge(&user, "legal", &now, Some("req-1"), Mode::Charge)
        .await;
    assert!(
        matches!(repeat, ChargeOutcome::Duplicate { .. }),
        "{repeat:?}"
    );
    let redis_now = h.meter.redis_now_ms().await.expect("TIME");
    let record = UnansweredRecord::Request;
    let lost = unanswered(&h, &user, &event, "req-1", record, redis_now - 1, &now);
    assert_eq!(
        h.meter.void(&lost, None).await.expect("void"),
        VoidOutcome::Told
    );
    assert_eq!(h.hash(&user).await.0, 7);
    // A second repeat is still a duplicate, and an explicit refund by
    // request id still finds the charge.
    let again = h
        .charge(&user, "legal", &now, Some("req-1"), Mode::Charge)
        .await;
    assert!(
        matches!(again, ChargeOutcome::Duplicate { .. }),
        "{again:?}"
    );
    let rid = RequestId::parse("req-1").expect("rid");
    let refund = h
        .meter
        .refund(&user, &rid, RefundOf::Record, "test", &now)
        .await;
    assert!(
        matches!(refund, Ok(RefundOutcome::Refunded { amount: 3, .. })),
        "{refund:?}"
    );
}

#[tokio::test]
async fn a_void_without_a_record_gives_back_the_row_the_stream_holds_once() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("ivy", "tiny", 2, 5, &now).await;
    // 3 credits: 2 from the allowance, 1 from bonus.
    let first = h.charge(&user, "legal", &now, None, Mode::Charge).await;
    let event = event_of(&first);
    let redis_now = h.meter.redis_now_ms().await.expect("TIME");
    let record = UnansweredRecord::None;
    let lost = unanswered(&h, &user, &event, "anon", record, redis_now - 1, &now);
    let split = h.meter.find_unanswered(&lost).await.expect("XRANGE");
    assert_eq!(split, Some((2, 1)));
    let never = Unanswered {
        event_id: uuid::Uuid::now_v7().to_string(),
        ..lost.clone()
    };
    assert_eq!(h.meter.find_unanswered(&never).await.expect("XRANGE"), None);
    assert_eq!(
        h.meter.void(&never, None).await.expect("void"),
        VoidOutcome::NotCharged
    );

    let void = h.meter.void(&lost, split).await.expect("void");
    assert_eq!(void, VoidOutcome::Refunded { amount: 3 });
    let (monthly, bonus, used, _, _) = h.hash(&user).await;
    assert_eq!((monthly, bonus, used), (2, 5, 0));
    // The mark makes a retried void a no-op, though the row is still there.
    assert_eq!(
        h.meter.void(&lost, split).await.expect("void"),
        VoidOutcome::NotCharged
    );
    assert_eq!(h.hash(&user).await.1, 5);
    assert_eq!(h.event_kinds(&user).await, ["charge", "refund"]);
}
