//! charge.lua, refund.lua and seed.lua run directly against a real
//! redis-server, with the clock injected: day and month boundaries in
//! Africa/Algiers (UTC+1, so local midnight is 23:00 UTC).

use crate::common;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::{TEST_CONFIG, TestRedis};
use creditgate::catalog::Catalog;
use creditgate::config::Settings;
use creditgate::domain::{
    ApiKey, Credits, IdempotencyKey, KeyHash, ModuleId, PlanId, RequestId, UserId,
};
use creditgate::ledger::LedgerEvent;
use creditgate::metering::{
    AccountSeed, Balance, Calendar, ChargeOutcome, ChargeRequest, Grant, GrantOutcome, Idempotency,
    LiveKey, Meter, Mode, RefundOf, RefundOutcome, Refusal, Repeat, ResetOutcome, Stamp,
    StoredResponse, SyncOutcome, SyncState,
};

struct Harness {
    redis: TestRedis,
    meter: Meter,
    catalog: Arc<Catalog>,
    calendar: Calendar,
}

impl Harness {
    async fn new() -> Self {
        let redis = TestRedis::start().await;
        let text = TEST_CONFIG
            .replace("{UP}", "http://127.0.0.1:1")
            .replace("{DEAD}", "http://127.0.0.1:1")
            .replace("{REDIS}", &redis.url())
            .replace("{DB}", "postgres://unused@127.0.0.1:1/none");
        let settings =
            Settings::from_toml(&text, "test", Vec::<(String, String)>::new()).expect("config");
        let catalog = Arc::clone(&settings.catalog);
        let meter =
            Meter::new(&settings.redis, Arc::clone(&catalog), &settings.metering).expect("meter");
        Self {
            redis,
            meter,
            catalog,
            calendar: Calendar::new(chrono_tz::Africa::Algiers),
        }
    }

    fn at(&self, instant: &str) -> Stamp {
        let t: DateTime<Utc> = DateTime::parse_from_rfc3339(instant)
            .expect("instant")
            .with_timezone(&Utc);
        self.calendar.at(t)
    }

    async fn seed(
        &self,
        user: &str,
        plan: &str,
        monthly: i64,
        bonus: i64,
        stamp: &Stamp,
    ) -> UserId {
        let user = UserId::parse(user).expect("id");
        let created = self
            .meter
            .seed(&AccountSeed {
                user: user.clone(),
                plan: PlanId::parse(plan).expect("plan"),
                monthly: Credits::new(monthly).expect("credits"),
                bonus: Credits::new(bonus).expect("credits"),
                period: stamp.period.to_string(),
                day: stamp.day.to_string(),
                day_used: Credits::ZERO,
                blocked: false,
                keys: vec![LiveKey::unrestricted(key().hash())],
            })
            .await
            .expect("seed");
        assert!(created);
        user
    }

    async fn charge(
        &self,
        user: &UserId,
        module: &str,
        stamp: &Stamp,
        rid: Option<&str>,
        mode: Mode,
    ) -> ChargeOutcome {
        let request_id = RequestId::parse(rid.unwrap_or("anon")).expect("rid");
        let hash = key().hash();
        self.meter
            .charge(&ChargeRequest {
                user,
                key_hash: Some(&hash),
                module: self.catalog.module(module).expect("module"),
                action: None,
                request_id: &request_id,
                idempotency: if rid.is_some() {
                    Idempotency::RequestId
                } else {
                    Idempotency::None
                },
                actor: "test",
                stamp,
                mode,
            })
            .await
            .expect("charge.lua")
    }

    async fn hash(&self, user: &UserId) -> (i64, i64, i64, String, String) {
        let mut con = self.redis.connection().await;
        redis::cmd("HMGET")
            .arg(self.meter.keys().account(user))
            .arg(&["monthly", "bonus", "used", "day", "period"][..])
            .query_async(&mut con)
            .await
            .expect("HMGET")
    }

    async fn event_kinds(&self, user: &UserId) -> Vec<String> {
        let mut con = self.redis.connection().await;
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.meter.keys().stream_of(user))
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
            .expect("XRANGE");
        let mut kinds = Vec::new();
        for entry in &reply.ids {
            // charge.lua writes a call's events as rows, one per line; the
            // other scripts one JSON object.
            if let Some(rows) = entry.get::<String>("rows") {
                let events = LedgerEvent::from_rows(&entry.id, rows.as_bytes()).expect("rows");
                kinds.extend(events.iter().map(|e| e.kind.to_owned()));
            } else if let Some(v) = entry.get::<String>("v") {
                let events = LedgerEvent::from_entry(&entry.id, Some(v.as_bytes())).expect("json");
                kinds.extend(events.iter().map(|e| e.kind.to_owned()));
            }
        }
        kinds
    }
}

/// The one key every seeded test account has.
fn key() -> ApiKey {
    ApiKey::parse("cg_5c0195c0195c0195c0195c0195c0195c0195c0195c0195c0").expect("key")
}

fn charged(outcome: &ChargeOutcome) -> Option<(i64, i64, i64)> {
    match outcome {
        ChargeOutcome::Charged(r) => Some((r.charged, r.from_monthly, r.from_bonus)),
        _ => None,
    }
}

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
    let ChargeOutcome::Charged(receipt) = outcome else {
        panic!("not charged: {outcome:?}");
    };
    assert_eq!((receipt.from_monthly, receipt.from_bonus), (1, 2));
    // A December call rolls the period over before the refund arrives.
    let december = h.at("2026-11-30T23:00:01Z");
    charged(&h.charge(&user, "rag", &december, None, Mode::Charge).await).expect("charged");
    let module = h.catalog.module("legal").expect("legal").id.clone();
    let refund = h
        .meter
        .refund(
            &user,
            &RequestId::parse("anon").expect("rid"),
            RefundOf::Receipt {
                receipt: &receipt,
                module: &module,
                action: None,
                charged_at: &november,
            },
            "test",
            &december,
        )
        .await;
    assert!(matches!(
        refund,
        Ok(RefundOutcome::Refunded { amount: 2, .. })
    ));
    // December: 10 - 1 (rag) = 9 monthly; bonus 3 + 2 back = 5; day counter
    // of December untouched by a November refund.
    let (monthly, bonus, used, _, _) = h.hash(&user).await;
    assert_eq!((monthly, bonus, used), (9, 5, 1));
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
async fn sync_never_creates_a_partial_account_nor_goes_back_to_an_older_version() {
    let h = Harness::new().await;
    let ghost = UserId::parse("ghost").expect("id");
    assert_eq!(
        h.sync(&ghost, 1, "free", true, &[]).await,
        SyncOutcome::NotInRedis
    );
    let now = h.at("2026-11-26T12:00:00Z");
    assert_eq!(
        h.charge(&ghost, "rag", &now, None, Mode::Charge).await,
        ChargeOutcome::Missing
    );
    // Version 5 (blocked) lands, then a late version 4 (unblocked) must
    // not undo it.
    let user = h.seed("hal", "free", 100, 0, &now).await;
    assert_eq!(
        h.sync(&user, 5, "free", true, &[key().hash()]).await,
        SyncOutcome::Applied
    );
    assert_eq!(
        h.sync(&user, 4, "free", false, &[key().hash()]).await,
        SyncOutcome::AlreadyNewer
    );
    assert_eq!(
        h.charge(&user, "rag", &now, None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::Blocked)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rebuilds_write_the_account_once() {
    let h = Arc::new(Harness::new().await);
    let now = h.at("2026-11-26T12:00:00Z");
    let user = UserId::parse("henry").expect("id");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (h, user, now) = (Arc::clone(&h), user.clone(), now.clone());
            tokio::spawn(async move {
                h.meter
                    .seed(&AccountSeed {
                        user,
                        plan: PlanId::parse("free").expect("plan"),
                        monthly: Credits::new(100 - i).expect("credits"),
                        bonus: Credits::ZERO,
                        period: now.period.to_string(),
                        day: now.day.to_string(),
                        day_used: Credits::ZERO,
                        blocked: false,
                        keys: vec![LiveKey::unrestricted(KeyHash::from_stored("x".into()))],
                    })
                    .await
                    .expect("seed")
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        created += usize::from(t.await.expect("task"));
    }
    assert_eq!(created, 1);
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

impl Harness {
    async fn sync(
        &self,
        user: &UserId,
        version: i64,
        plan: &str,
        blocked: bool,
        keys: &[KeyHash],
    ) -> SyncOutcome {
        self.meter
            .sync(&SyncState {
                user: user.clone(),
                version,
                plan: PlanId::parse(plan).expect("plan"),
                blocked,
                keys: keys.iter().cloned().map(LiveKey::unrestricted).collect(),
            })
            .await
            .expect("sync.lua")
    }

    /// A proxy charge under an `Idempotency-Key`.
    async fn keyed(
        &self,
        user: &UserId,
        key: &str,
        fingerprint: &str,
        stamp: &Stamp,
        lease_until_ms: i64,
    ) -> ChargeOutcome {
        let request_id = RequestId::parse(&format!("trace-{fingerprint}")).expect("rid");
        let key = IdempotencyKey::parse(key).expect("key");
        let hash = self::key().hash();
        self.meter
            .charge(&ChargeRequest {
                user,
                key_hash: Some(&hash),
                module: self.catalog.module("rag").expect("module"),
                action: None,
                request_id: &request_id,
                idempotency: Idempotency::Key {
                    key: &key,
                    fingerprint,
                    lease_until_ms,
                },
                actor: "test",
                stamp,
                mode: Mode::Charge,
            })
            .await
            .expect("charge.lua")
    }
}

#[tokio::test]
async fn a_proxy_idempotency_key_is_in_progress_then_replayed_never_charged_twice() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let lease = now.now_ms() + 10_000;
    let user = h.seed("kim", "free", 100, 0, &now).await;
    let first = h.keyed(&user, "k1", "fp-a", &now, lease).await;
    let ChargeOutcome::Charged(receipt) = first else {
        panic!("first call charged: {first:?}");
    };
    assert_eq!(
        h.keyed(&user, "k1", "fp-a", &now, lease).await,
        ChargeOutcome::Repeat(Repeat::InProgress {
            original: "trace-fp-a".into()
        })
    );
    assert_eq!(
        h.keyed(&user, "k1", "fp-other", &now, lease).await,
        ChargeOutcome::Repeat(Repeat::KeyReused {
            original: "trace-fp-a".into()
        })
    );
    let key = IdempotencyKey::parse("k1").expect("key");
    let stored = StoredResponse {
        status: 201,
        headers: "content-type: text/plain\n".into(),
        body: bytes::Bytes::from_static(b"\x00binary\xffbody"),
    };
    // Only the charge that owns the record may complete it.
    assert!(
        !h.meter
            .complete(&user, &key, "someone-else", Some(&stored))
            .await
            .expect("complete.lua")
    );
    assert!(
        h.meter
            .complete(&user, &key, &receipt.event_id, Some(&stored))
            .await
            .expect("complete.lua")
    );
    match h.keyed(&user, "k1", "fp-a", &now, lease).await {
        ChargeOutcome::Repeat(Repeat::Replay {
            original,
            response,
            balance,
            ..
        }) => {
            assert_eq!(original, "trace-fp-a");
            assert_eq!(response, stored);
            assert_eq!(balance.remaining(), 99);
        }
        other => panic!("not a replay: {other:?}"),
    }
    assert_eq!(h.hash(&user).await.0, 99, "charged exactly once");
    // The credits API's request ids are another namespace: "k1" is new there.
    assert!(charged(&h.charge(&user, "rag", &now, Some("k1"), Mode::Charge).await).is_some());
}

#[tokio::test]
async fn a_pending_key_past_its_lease_or_unreplayable_is_refused_and_a_refund_frees_it() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("lou", "free", 100, 0, &now).await;
    // Lease already over: the gateway that owned it is presumed gone.
    let ChargeOutcome::Charged(_) = h.keyed(&user, "k2", "fp", &now, now.now_ms() - 1).await else {
        panic!("charged");
    };
    assert!(matches!(
        h.keyed(&user, "k2", "fp", &now, now.now_ms() + 10_000)
            .await,
        ChargeOutcome::Repeat(Repeat::NotReplayable { .. })
    ));
    // Completed but too long to keep.
    let ChargeOutcome::Charged(r) = h
        .keyed(&user, "k3", "fp", &now, now.now_ms() + 10_000)
        .await
    else {
        panic!("charged");
    };
    let k3 = IdempotencyKey::parse("k3").expect("key");
    assert!(
        h.meter
            .complete(&user, &k3, &r.event_id, None)
            .await
            .expect("complete")
    );
    assert!(matches!(
        h.keyed(&user, "k3", "fp", &now, now.now_ms() + 10_000)
            .await,
        ChargeOutcome::Repeat(Repeat::NotReplayable { .. })
    ));
    // A refund gives the credit back once and frees the key.
    let rid = RequestId::parse("ignored").expect("rid");
    let refund = h
        .meter
        .refund(&user, &rid, RefundOf::Idempotent(&k3), "test", &now)
        .await;
    assert!(matches!(
        refund,
        Ok(RefundOutcome::Refunded { amount: 1, .. })
    ));
    let again = h
        .meter
        .refund(&user, &rid, RefundOf::Idempotent(&k3), "test", &now)
        .await;
    assert!(matches!(again, Ok(RefundOutcome::NotFound)));
    assert!(matches!(
        h.keyed(&user, "k3", "fp", &now, now.now_ms() + 10_000)
            .await,
        ChargeOutcome::Charged(_)
    ));
    assert_eq!(h.hash(&user).await.0, 98);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_charges_share_script_calls_and_stay_exact() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    // Four accounts with 25 credits each, 400 charges of 1 at once: exactly
    // 100 succeed, whatever the grouping.
    let mut users = Vec::new();
    for name in ["g1", "g2", "g3", "g4"] {
        users.push(h.seed(name, "tiny", 25, 0, &now).await);
    }
    let mut con = h.redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut con)
        .await
        .expect("RESETSTAT");
    let h = std::sync::Arc::new(h);
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let (h, user, now) = (h.clone(), users[i % 4].clone(), now.clone());
            tokio::spawn(async move { h.charge(&user, "rag", &now, None, Mode::Charge).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if matches!(t.await.expect("task"), ChargeOutcome::Charged(_)) {
            ok += 1;
        }
    }
    assert_eq!(ok, 100);
    for user in &users {
        assert_eq!(h.hash(user).await.0, 0);
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .expect("INFO");
    let calls: usize = stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(
        calls < 400,
        "{calls} script calls for 400 charges: no grouping"
    );
}

/// charge.lua called by hand with several charges in one call, as the
/// gateway's group commit does: (user, key hash) for each, all `rag`.
/// One call of charge.lua; `deadline` on Redis's clock, unix ms (0: none).
async fn one_call(
    h: &Harness,
    now: &Stamp,
    charges: &[(&UserId, &str)],
    deadline: i64,
) -> redis::Value {
    let keys = h.meter.keys();
    let mut cmd = redis::cmd("EVAL");
    // KEYS[1], the call's one stream: the first charge's (the events of
    // every charge of the call go there).
    cmd.arg(include_str!("../../lua/charge.lua"))
        .arg(1 + charges.len() * 3)
        .arg(keys.stream_of(charges[0].0));
    for (i, (user, _)) in charges.iter().enumerate() {
        let rid = RequestId::parse(&format!("call-{i}")).expect("rid");
        cmd.arg(keys.account(user))
            .arg(keys.api_keys(user))
            .arg(keys.request(user, &rid));
    }
    cmd.arg(h.catalog.plan_table_arg())
        .arg(86_400)
        .arg("0")
        .arg(deadline);
    for (i, (user, hash)) in charges.iter().enumerate() {
        cmd.arg(*hash)
            .arg("rag")
            .arg("")
            .arg(1)
            .arg(",free,starter,tiny,limited,enterprise,")
            .arg(now.day.as_str())
            .arg(now.period.as_str())
            .arg(now.now_ms())
            .arg(format!("ev-{i}"))
            .arg(format!("call-{i}"))
            .arg("0")
            .arg("charge")
            .arg("")
            .arg(0)
            .arg(format!(
                "{user}\tcall-{i}\ttest\t{}\t{}\t{}\t{}",
                now.now_ms(),
                now.day,
                now.period,
                now.day
            ));
    }
    let mut con = h.redis.connection().await;
    cmd.query_async(&mut con).await.expect("charge.lua")
}

#[tokio::test]
async fn charges_in_one_call_are_decided_in_order_and_one_failure_stays_its_own() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let hash = key().hash();
    let ok_user = h.seed("jo", "tiny", 2, 0, &now).await;
    let broken = h.seed("kai", "tiny", 100, 0, &now).await;
    // (The gateway groups charges of one shard only; a single Redis takes
    // any keys in one call, which is all this test needs.)
    // kai's key set is not a set any more: its SISMEMBER fails (WRONGTYPE).
    let mut con = h.redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg(h.meter.keys().api_keys(&broken))
        .arg("oops")
        .query_async(&mut con)
        .await
        .expect("SET");
    let reply = one_call(
        &h,
        &now,
        &[
            (&ok_user, hash.as_str()),
            (&broken, hash.as_str()),
            (&ok_user, hash.as_str()),
            (&ok_user, hash.as_str()),
        ],
        0,
    )
    .await;
    let redis::Value::Array(replies) = reply else {
        panic!("not an array: {reply:?}");
    };
    let status = |v: &redis::Value| match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        },
        // The common "ok" answer is one string: "ok <charged> ... <plan>".
        redis::Value::BulkString(line) => String::from_utf8_lossy(line)
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_owned(),
        other => format!("{other:?}"),
    };
    let statuses: Vec<String> = replies.iter().map(status).collect();
    // jo has 2 credits: the first and third charges take them, in order;
    // the fourth finds none. kai's failure is its own.
    assert_eq!(statuses, ["ok", "error", "ok", "insufficient"]);
    assert_eq!(h.hash(&ok_user).await.0, 0);
    assert_eq!(h.hash(&broken).await.0, 100);
    // The call's two charge events went out as one entry.
    assert_eq!(
        h.event_kinds(&ok_user).await,
        ["charge", "charge"],
        "one entry holding both events"
    );
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

    let mut con = h.redis.connection().await;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(h.meter.keys().stream_of(&user))
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .expect("XRANGE");
    assert_eq!(reply.ids.len(), 1, "one entry per call");
    let entry = &reply.ids[0];
    let rows: String = entry.get("rows").expect("rows field");
    let events = LedgerEvent::from_rows(&entry.id, rows.as_bytes()).expect("rows");
    assert_eq!(events.len(), 2);
    let (reset, charge) = (&events[0], &events[1]);
    assert_eq!(reset.kind, "reset");
    assert_eq!(reset.amount, 500);
    assert_eq!(reset.monthly_after, 500);
    assert_eq!(reset.bonus_after, 5);
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
    assert_eq!((charge.monthly_after, charge.bonus_after), (497, 5));
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

/// The stamp `ms` milliseconds after `start`, on the harness's calendar.
fn later(h: &Harness, start: &str, ms: i64) -> Stamp {
    let t: DateTime<Utc> = DateTime::parse_from_rfc3339(start)
        .expect("instant")
        .with_timezone(&Utc);
    h.calendar.at(t + chrono::Duration::milliseconds(ms))
}

fn rate_of(outcome: &ChargeOutcome) -> Option<(u32, u64)> {
    match outcome {
        ChargeOutcome::Charged(r) => r.rate.map(|s| (s.remaining, s.reset_ms)),
        _ => None,
    }
}

/// The test plan "limited": 30 calls per minute (one every 2 s), a burst
/// of 5. GCRA: the burst passes at once, the next call fits one interval
/// later, and a check answers without using the limit.
#[tokio::test]
async fn the_rate_limit_passes_a_burst_then_one_call_per_interval() {
    let h = Harness::new().await;
    const T0: &str = "2026-11-26T12:00:00Z";
    let at = |ms| later(&h, T0, ms);
    let user = h.seed("rita", "limited", 1000, 0, &at(0)).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(rate_of(
            &h.charge(&user, "rag", &at(0), None, Mode::Charge).await,
        ));
    }
    // What passes right now after each call, and until the burst is whole.
    assert_eq!(
        seen,
        [
            Some((4, 2000)),
            Some((3, 4000)),
            Some((2, 6000)),
            Some((1, 8000)),
            Some((0, 10000))
        ]
    );
    assert_eq!(
        h.charge(&user, "rag", &at(0), None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::RateLimited(2000))
    );
    assert_eq!(
        h.charge(&user, "rag", &at(1999), None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::RateLimited(1))
    );
    assert_eq!(
        rate_of(&h.charge(&user, "rag", &at(2000), None, Mode::Charge).await),
        Some((0, 10000))
    );
    // A check reports the limit without using it: refused now, and at
    // 4 s it says yes, and the charge right after it still passes.
    assert_eq!(
        h.charge(&user, "rag", &at(2000), None, Mode::Check).await,
        ChargeOutcome::Refused(Refusal::RateLimited(2000))
    );
    assert!(charged(&h.charge(&user, "rag", &at(4000), None, Mode::Check).await).is_some());
    assert!(charged(&h.charge(&user, "rag", &at(4000), None, Mode::Charge).await).is_some());
    // Seven calls served, seven credits; the refusals cost nothing.
    assert_eq!(h.hash(&user).await.0, 993);
    assert_eq!(h.event_kinds(&user).await.len(), 7);
}

/// A call refused for another reason (here: no credits left) neither
/// moves nor waits on the rate limit.
#[tokio::test]
async fn refused_calls_do_not_use_the_rate_limit() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("remy", "limited", 1, 0, &now).await;
    assert!(charged(&h.charge(&user, "rag", &now, None, Mode::Charge).await).is_some());
    for _ in 0..10 {
        assert!(matches!(
            h.charge(&user, "rag", &now, None, Mode::Charge).await,
            ChargeOutcome::Refused(Refusal::InsufficientCredits(_))
        ));
    }
}

/// The fixed one-minute window this replaced let a whole minute's calls
/// through on each side of a minute boundary. With GCRA a minute holds at
/// most the burst plus one call per interval, wherever it starts.
#[tokio::test]
async fn no_minute_boundary_lets_twice_the_rate_through() {
    let h = Harness::new().await;
    const T0: &str = "2026-11-26T12:00:30Z";
    let user = h.seed("bo", "limited", 1000, 0, &later(&h, T0, 0)).await;
    // One attempt every 100 ms for a minute that straddles 12:01:00.
    let mut served = Vec::new();
    for step in 0..600 {
        let ms = step * 100;
        let outcome = h
            .charge(&user, "rag", &later(&h, T0, ms), None, Mode::Charge)
            .await;
        match outcome {
            ChargeOutcome::Charged(_) => served.push(ms),
            ChargeOutcome::Refused(Refusal::RateLimited(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    // The burst of 5 at once, then one every 2 s from 12:00:32 to
    // 12:01:28: 5 + 29 = 34 in the minute, against 30 a minute on average
    // and 60 that a fixed window would have let through here.
    assert_eq!(served.len(), 34, "{served:?}");
    assert_eq!(&served[..5], &[0, 100, 200, 300, 400]);
    assert!(
        served[5..].windows(2).all(|w| w[1] - w[0] == 2000),
        "{served:?}"
    );
    let around_the_boundary = served
        .iter()
        .filter(|&&ms| (29_000..31_000).contains(&ms))
        .count();
    assert_eq!(around_the_boundary, 1);
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

fn grant<'a>(
    user: &'a UserId,
    credits: i64,
    reason: &'a str,
    idempotency: Option<(&'a IdempotencyKey, &'a str)>,
) -> Grant<'a> {
    Grant {
        user,
        credits: Credits::new(credits).expect("credits"),
        reason,
        actor: "admin:test",
        idempotency,
    }
}

#[tokio::test]
async fn a_grant_adds_to_the_bonus_once_per_key_and_never_past_the_ceiling() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("gina", "free", 40, 5, &now).await;
    assert_eq!(
        h.meter
            .grant(&grant(&user, 10, "gift", None), &now)
            .await
            .ok(),
        Some(GrantOutcome::Granted {
            monthly: 40,
            bonus: 15
        })
    );
    // The same Idempotency-Key and the same grant: applied once, and the
    // repeat answers with the balances the first left.
    let k = IdempotencyKey::parse("grant-1").expect("key");
    let first = h
        .meter
        .grant(&grant(&user, 7, "promo", Some((&k, "7|promo"))), &now)
        .await
        .ok();
    let again = h
        .meter
        .grant(&grant(&user, 7, "promo", Some((&k, "7|promo"))), &now)
        .await
        .ok();
    assert_eq!(
        first,
        Some(GrantOutcome::Granted {
            monthly: 40,
            bonus: 22
        })
    );
    assert_eq!(
        again,
        Some(GrantOutcome::Repeat {
            monthly: 40,
            bonus: 22
        })
    );
    // The key with another grant: refused, nothing changes.
    assert_eq!(
        h.meter
            .grant(&grant(&user, 8, "promo", Some((&k, "8|promo"))), &now)
            .await
            .ok(),
        Some(GrantOutcome::KeyReused)
    );
    // Past the bonus ceiling: refused, nothing changes.
    let over = h
        .meter
        .grant(&grant(&user, Credits::MAX, "too much", None), &now)
        .await
        .ok();
    assert_eq!(over, Some(GrantOutcome::OverLimit { bonus: 22 }));
    let (monthly, bonus, ..) = h.hash(&user).await;
    assert_eq!((monthly, bonus), (40, 22));
    assert_eq!(h.event_kinds(&user).await, ["grant", "grant"]);
    // An account Redis does not hold is not invented.
    let ghost = UserId::parse("ghost").expect("id");
    assert_eq!(
        h.meter.grant(&grant(&ghost, 1, "x", None), &now).await.ok(),
        Some(GrantOutcome::Missing)
    );
}

#[tokio::test]
async fn a_reset_starts_the_new_period_once_and_keeps_the_bonus() {
    let h = Harness::new().await;
    let october = h.at("2026-10-20T12:00:00Z");
    let user = h.seed("hugo", "free", 3, 9, &october).await;
    assert_eq!(
        h.meter.reset_period(&user, "cron", &october).await.ok(),
        Some(ResetOutcome::Current)
    );
    let november = h.at("2026-11-01T00:30:00Z"); // 01:30 in Algiers, the 1st
    assert_eq!(
        h.meter.reset_period(&user, "cron", &november).await.ok(),
        Some(ResetOutcome::Reset {
            monthly: 100,
            bonus: 9
        })
    );
    // Run again (cron retried, two instances): nothing more happens.
    assert_eq!(
        h.meter.reset_period(&user, "cron", &november).await.ok(),
        Some(ResetOutcome::Current)
    );
    let (monthly, bonus, _, _, period) = h.hash(&user).await;
    assert_eq!((monthly, bonus, period.as_str()), (100, 9, "2026-11"));
    assert_eq!(h.event_kinds(&user).await, ["reset"]);
    let ghost = UserId::parse("ghost").expect("id");
    assert_eq!(
        h.meter.reset_period(&ghost, "cron", &november).await.ok(),
        Some(ResetOutcome::Missing)
    );
}
