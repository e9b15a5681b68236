//! charge.lua: balances, days and periods, refusals, deadlines, the rows it writes.

use super::*;

#[tokio::test]
async fn the_day_counter_resets_at_algiers_midnight_not_utc_midnight() {
    let h = Harness::new().await;
    let before = h.at("2026-11-26T22:59:30Z"); // 23:59:30 in Algiers
    let user = h.seed("alice", "free", 100, 0, &before).await;
    for _ in 0..20 {
        assert!(charged(&h.charge(&user, "rag", &before, None, Mode::Charge).await).is_some());
    }
    let refused = h.charge(&user, "rag", &before, None, Mode::Charge).await;
    assert!(
        matches!(refused, ChargeOutcome::Refused(Refusal::DailyLimit(b)) if b.day_used.get() == 20)
    );

    let after = h.at("2026-11-26T23:00:00Z"); // local midnight
    assert_eq!(after.day, "2026-11-27");
    let ok = h.charge(&user, "rag", &after, None, Mode::Charge).await;
    assert_eq!(charged(&ok), Some((1, 1, 0)));
    let (monthly, _, used, day, _) = h.hash(&user).await;
    assert_eq!((monthly, used, day.as_str()), (79, 1, "2026-11-27"));
}

#[tokio::test]
async fn the_allowance_renews_on_the_first_of_the_month_local_time_and_bonus_is_kept() {
    let h = Harness::new().await;
    let november = h.at("2026-11-30T22:59:59Z"); // Nov 30, 23:59:59 local
    let user = h.seed("bob", "tiny", 10, 4, &november).await;
    for _ in 0..3 {
        charged(
            &h.charge(&user, "legal", &november, None, Mode::Charge)
                .await,
        )
        .expect("charged");
    }
    // 10 monthly + 4 bonus - 9 = 1 monthly, 4 bonus.
    assert_eq!(h.hash(&user).await.0, 1);
    let december = h.at("2026-11-30T23:00:00Z");
    assert_eq!(december.period, "2026-12");
    let ok = h
        .charge(&user, "legal", &december, None, Mode::Charge)
        .await;
    assert_eq!(charged(&ok), Some((3, 3, 0)));
    let (monthly, bonus, used, day, period) = h.hash(&user).await;
    assert_eq!(
        (monthly, bonus, used, day.as_str(), period.as_str()),
        (7, 4, 3, "2026-12-01", "2026-12")
    );
    assert_eq!(
        h.event_kinds(&user).await,
        ["charge", "charge", "charge", "reset", "charge"]
    );
}

/// Calls are decided in the order Redis runs them, not in their stamps'
/// order (two workers' batches, two gateways, a clock a little ahead): a
/// call stamped on the last day of a month and decided after one stamped in
/// the new month counts in the new month and day. Rolling the account back
/// would start the old period again (the allowance refilled, with a
/// "reset" event), and the next new-month call would refill it once more.
#[tokio::test]
async fn a_call_stamped_before_the_accounts_period_never_rolls_it_back() {
    let h = Harness::new().await;
    let november = h.at("2026-11-30T22:59:59.990Z"); // Nov 30, 23:59:59.990 local
    let user = h.seed("nora", "tiny", 10, 0, &november).await;
    charged(
        &h.charge(&user, "legal", &november, None, Mode::Charge)
            .await,
    )
    .expect("charged");
    let december = h.at("2026-11-30T23:00:00.010Z");
    assert_eq!(
        charged(
            &h.charge(&user, "legal", &december, None, Mode::Charge)
                .await
        ),
        Some((3, 3, 0))
    );
    // Stamped 20 ms earlier, decided after: charged in December.
    assert_eq!(
        charged(
            &h.charge(&user, "legal", &november, None, Mode::Charge)
                .await
        ),
        Some((3, 3, 0))
    );
    assert_eq!(
        charged(
            &h.charge(&user, "legal", &december, None, Mode::Charge)
                .await
        ),
        Some((3, 3, 0))
    );
    let (monthly, bonus, used, day, period) = h.hash(&user).await;
    assert_eq!(
        (monthly, bonus, used, day.as_str(), period.as_str()),
        (1, 0, 9, "2026-12-01", "2026-12")
    );
    // One renewal only.
    assert_eq!(
        h.event_kinds(&user).await,
        ["charge", "reset", "charge", "charge", "charge"]
    );
    // The late call's row says where it counted: December's first day.
    let reply = h.stream(&user).await;
    let entry = &reply.ids[2];
    let rows: String = entry.get("rows").expect("rows field");
    let late = LedgerEvent::from_rows(&entry.id, rows.as_bytes()).expect("rows");
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].local_day.to_string(), "2026-12-01");
    assert_eq!(
        (
            late[0].account_period.as_ref(),
            late[0].account_day.as_ref()
        ),
        ("2026-12", "2026-12-01")
    );
    assert_eq!(
        (late[0].monthly_after, late[0].account_day_used),
        (Some(4), 6)
    );
}

/// The same at midnight: a late call from the old day counts in the new
/// one, and the new day's count is never zeroed by it (which would let a
/// daily limit through twice).
#[tokio::test]
async fn a_call_stamped_before_the_accounts_day_counts_in_that_day() {
    let h = Harness::new().await;
    let before = h.at("2026-11-26T22:59:59.990Z"); // 23:59:59.990 in Algiers
    let user = h.seed("dina", "free", 100, 0, &before).await;
    let after = h.at("2026-11-26T23:00:00.010Z");
    for _ in 0..3 {
        charged(&h.charge(&user, "rag", &after, None, Mode::Charge).await).expect("charged");
    }
    charged(&h.charge(&user, "rag", &before, None, Mode::Charge).await).expect("charged");
    charged(&h.charge(&user, "rag", &after, None, Mode::Charge).await).expect("charged");
    let (monthly, _, used, day, _) = h.hash(&user).await;
    assert_eq!((monthly, used, day.as_str()), (95, 5, "2026-11-27"));
}

#[tokio::test]
async fn the_allowance_is_spent_before_bonus_and_never_below_zero() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("carol", "tiny", 2, 5, &now).await;
    let first = h.charge(&user, "legal", &now, None, Mode::Charge).await;
    assert_eq!(charged(&first), Some((3, 2, 1)));
    let second = h.charge(&user, "legal", &now, None, Mode::Charge).await;
    assert_eq!(charged(&second), Some((3, 0, 3)));
    let third = h.charge(&user, "legal", &now, None, Mode::Charge).await;
    assert!(matches!(
        third,
        ChargeOutcome::Refused(Refusal::InsufficientCredits(b)) if b.remaining() == 1
    ));
    let (monthly, bonus, ..) = h.hash(&user).await;
    assert_eq!((monthly, bonus), (0, 1));
}

#[tokio::test]
async fn check_mode_answers_without_writing_anything() {
    let h = Harness::new().await;
    let old = h.at("2026-10-31T10:00:00Z");
    let user = h.seed("dave", "free", 3, 0, &old).await;
    let later = h.at("2026-11-26T10:00:00Z"); // a new period and a new day
    let check = h.charge(&user, "rag", &later, None, Mode::Check).await;
    assert_eq!(charged(&check), Some((1, 1, 0)));
    // The balance is the account as it is at `later` (the new period's
    // allowance, nothing used today), not what the call would leave.
    let ChargeOutcome::Charged(receipt) = &check else {
        panic!("not charged: {check:?}");
    };
    assert_eq!(
        receipt.balance,
        Balance {
            monthly: Credits::recorded(100),
            bonus: Credits::ZERO,
            day_used: Credits::ZERO,
            daily_limit: Some(Credits::recorded(20))
        }
    );
    let (monthly, bonus, used, day, period) = h.hash(&user).await;
    assert_eq!(
        (monthly, bonus, used, day.as_str(), period.as_str()),
        (3, 0, 0, "2026-10-31", "2026-10")
    );
    assert!(h.event_kinds(&user).await.is_empty());
}

#[tokio::test]
async fn revoked_keys_blocked_accounts_and_foreign_plans_are_refused() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("gus", "free", 100, 0, &now).await;
    assert_eq!(
        h.charge(&user, "legal", &now, None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::ModuleNotInPlan)
    );
    h.sync(&user, 1, "free", true, &[key().hash()]).await;
    assert_eq!(
        h.charge(&user, "rag", &now, None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::Blocked)
    );
    h.sync(&user, 2, "retired", false, &[key().hash()]).await;
    assert_eq!(
        h.charge(&user, "rag", &now, None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::ModuleNotInPlan)
    );
    h.sync(&user, 3, "free", false, &[]).await;
    assert_eq!(
        h.charge(&user, "rag", &now, None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::UnknownKey)
    );
    assert_eq!(h.hash(&user).await.0, 100);
    assert!(h.event_kinds(&user).await.is_empty());
}

#[tokio::test]
async fn an_exhausted_block_lifts_itself_in_the_next_period() {
    let mut h = Harness::new().await;
    let text = TEST_CONFIG
        .replace("{UP}", "http://127.0.0.1:1")
        .replace("{DEAD}", "http://127.0.0.1:1")
        .replace("{REDIS}", &h.redis.url())
        .replace("{DB}", "postgres://unused@127.0.0.1:1/none");
    let settings = Settings::from_toml(
        &text,
        "test",
        [(
            "CREDITGATE_METERING__AUTO_BLOCK_EXHAUSTED".to_owned(),
            "true".to_owned(),
        )],
    )
    .expect("config");
    h.meter =
        Meter::new(&settings.redis, Arc::clone(&h.catalog), &settings.metering).expect("meter");
    let november = h.at("2026-11-20T12:00:00Z");
    let user = h.seed("ivy", "tiny", 3, 0, &november).await;
    let emptied = h
        .charge(&user, "legal", &november, None, Mode::Charge)
        .await;
    assert!(matches!(emptied, ChargeOutcome::Charged(ref r) if r.auto_blocked));
    assert_eq!(
        h.charge(&user, "rag", &november, None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::Blocked)
    );
    let december = h.at("2026-12-01T09:00:00Z");
    let next = h.charge(&user, "rag", &december, None, Mode::Charge).await;
    assert_eq!(charged(&next), Some((1, 1, 0)));
}

#[tokio::test]
async fn the_redis_clock_offset_is_measured() {
    let h = Harness::new().await;
    // Same host: the clocks agree to within the round trip.
    let offset = h.meter.calibrate().await.expect("TIME");
    assert!(offset.abs() < 1000, "offset {offset} ms");
    // Charges still go through with a deadline attached.
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("ivy", "free", 100, 0, &now).await;
    assert!(charged(&h.charge(&user, "rag", &now, None, Mode::Charge).await).is_some());
}

/// A call that only runs after its deadline (Redis paused or slow: the
/// gateway has already answered 503 "nothing was charged") writes nothing
/// for any of its charges.
#[tokio::test]
async fn a_call_past_its_deadline_charges_none_of_its_charges() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let hash = key().hash();
    let user = h.seed("max", "tiny", 10, 0, &now).await;
    let past = chrono::Utc::now().timestamp_millis() - 1_000;
    let reply = one_call(
        &h,
        &now,
        &[(&user, hash.as_str()), (&user, hash.as_str())],
        past,
    )
    .await;
    let redis::Value::Array(replies) = reply else {
        panic!("not an array: {reply:?}");
    };
    let expired = redis::Value::Array(vec![redis::Value::BulkString(b"expired".to_vec())]);
    assert_eq!(replies, [expired.clone(), expired]);
    assert_eq!(h.hash(&user).await.0, 10);
    assert!(h.event_kinds(&user).await.is_empty());
    // In time, the same call charges both.
    let future = chrono::Utc::now().timestamp_millis() + 60_000;
    one_call(
        &h,
        &now,
        &[(&user, hash.as_str()), (&user, hash.as_str())],
        future,
    )
    .await;
    assert_eq!(h.hash(&user).await.0, 8);
}

/// charge.lua writes a call's events as rows the flusher splits, not
/// parses: every value must come back exactly, a request id that looks
/// like an escape (`\t`, `\\`) included.
#[tokio::test]
async fn a_charge_row_reads_back_exactly_what_was_charged() {
    let h = Harness::new().await;
    let october = h.at("2026-10-31T12:00:00Z");
    let user = h.seed("row.user@x", "starter", 100, 5, &october).await;
    // The first call of November: a reset, then the charge, in one entry.
    let november = h.at("2026-11-01T09:30:00.250Z");
    let rid = r"req\t\\x";
    let ok = h
        .charge(&user, "legal", &november, Some(rid), Mode::Charge)
        .await;
    assert_eq!(charged(&ok), Some((3, 3, 0)));

    let reply = h.stream(&user).await;
    assert_eq!(reply.ids.len(), 1, "one entry per call");
    let entry = &reply.ids[0];
    let rows: String = entry.get("rows").expect("rows field");
    let events = LedgerEvent::from_rows(&entry.id, rows.as_bytes()).expect("rows");
    assert_eq!(events.len(), 2);
    let (reset, charge) = (&events[0], &events[1]);
    assert_eq!(reset.kind, "reset");
    assert_eq!(reset.amount, 500);
    assert_eq!(reset.monthly_after, Some(500));
    assert_eq!(reset.bonus_after, Some(5));
    assert!(reset.event_id.ends_with(":reset"));
    assert_eq!(format!("{}:reset", charge.event_id), reset.event_id);

    assert_eq!(charge.kind, "charge");
    assert_eq!(charge.user_id, "row.user@x");
    assert_eq!(charge.request_id.as_deref(), Some(rid));
    assert_eq!(charge.actor, "test");
    assert_eq!(charge.module.as_deref(), Some("legal"));
    assert_eq!(charge.action, None);
    assert_eq!(charge.plan.as_deref(), Some("starter"));
    assert_eq!(
        (charge.amount, charge.from_monthly, charge.from_bonus),
        (3, 3, 0)
    );
    assert_eq!(
        (charge.monthly_after, charge.bonus_after),
        (Some(497), Some(5))
    );
    assert_eq!(charge.local_day.to_string(), "2026-11-01");
    assert_eq!(
        (charge.account_period.as_ref(), charge.account_day.as_ref()),
        ("2026-11", "2026-11-01")
    );
    assert_eq!(charge.account_day_used, 3);
    assert_eq!(charge.reason, None);
    assert_eq!(
        charge
            .occurred_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "2026-11-01T09:30:00.250Z"
    );
    assert!(reset.stream_seq < charge.stream_seq);
}

/// A key's expiry and module scope are checked by the charge itself, on
/// every instance, and a refused call charges nothing.
#[tokio::test]
async fn an_expired_or_out_of_scope_key_is_refused_and_charges_nothing() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = UserId::parse("kim").expect("id");
    let (expiring, scoped) = (ApiKey::generate().hash(), ApiKey::generate().hash());
    h.meter
        .seed(&AccountSeed {
            user: user.clone(),
            plan: PlanId::parse("starter").expect("plan"),
            monthly: Credits::new(100).expect("credits"),
            bonus: Credits::ZERO,
            period: now.period.to_string(),
            day: now.day.to_string(),
            day_used: Credits::ZERO,
            blocked: false,
            keys: vec![
                LiveKey {
                    hash: expiring.clone(),
                    expires_ms: Some(now.now_ms() + 1000),
                    modules: None,
                },
                LiveKey {
                    hash: scoped.clone(),
                    expires_ms: None,
                    modules: Some(vec![ModuleId::parse("rag").expect("module")]),
                },
            ],
        })
        .await
        .expect("seed");
    let with = |hash: &KeyHash, module: &str, stamp: &Stamp| {
        let (hash, module, stamp) = (hash.clone(), module.to_owned(), stamp.clone());
        let (meter, catalog, user) = (&h.meter, &h.catalog, &user);
        async move {
            let rid = RequestId::parse("r").expect("rid");
            meter
                .charge(&ChargeRequest {
                    user,
                    key_hash: Some(&hash),
                    module: catalog.module(&module).expect("module"),
                    action: None,
                    request_id: &rid,
                    idempotency: Idempotency::None,
                    actor: "test",
                    stamp: &stamp,
                    mode: Mode::Charge,
                })
                .await
                .expect("charge.lua")
        }
    };
    let later = h.calendar.at(now.now + chrono::Duration::milliseconds(999));
    let expired = h
        .calendar
        .at(now.now + chrono::Duration::milliseconds(1000));
    assert!(charged(&with(&expiring, "legal", &later).await).is_some());
    assert_eq!(
        with(&expiring, "legal", &expired).await,
        ChargeOutcome::Refused(Refusal::KeyExpired)
    );
    assert!(charged(&with(&scoped, "rag", &expired).await).is_some());
    assert_eq!(
        with(&scoped, "legal", &expired).await,
        ChargeOutcome::Refused(Refusal::KeyScope)
    );
    // legal costs 3, rag 1: only the two calls that passed were charged.
    assert_eq!(h.hash(&user).await.0, 96);
    assert_eq!(h.event_kinds(&user).await.len(), 2);
}

/// A charge carries its deadline on Redis's clock from the very first one:
/// a meter that has not compared clocks yet asks Redis's TIME first.
#[tokio::test]
async fn the_first_charge_compares_clocks_before_it_is_sent() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("jo", "tiny", 10, 0, &now).await;
    assert!(!h.meter.clocks_compared());
    let outcome = h.charge(&user, "rag", &now, None, Mode::Charge).await;
    assert!(charged(&outcome).is_some(), "{outcome:?}");
    assert!(h.meter.clocks_compared());
}
