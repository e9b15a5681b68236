//! The Lua scripts run directly against a real redis-server, one file per
//! script (or per part of charge.lua), with the clock injected: day and
//! month boundaries in Africa/Algiers (UTC+1, so local midnight is 23:00
//! UTC). The harness here seeds accounts and reads them back.

use crate::common;

mod batch;
mod charge;
mod grant;
mod idempotency;
mod lease;
mod rate;
mod refund;
mod reset;
mod sync;

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
    LiveKey, Meter, Mode, Receipt, RefundOf, RefundOutcome, Refusal, Repeat, ResetOutcome, Stamp,
    StoredResponse, SyncOutcome, SyncState, Unanswered, UnansweredRecord, VoidOutcome,
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

    /// Every entry of the user's usage stream, oldest first.
    async fn stream(&self, user: &UserId) -> redis::streams::StreamRangeReply {
        let mut con = self.redis.connection().await;
        redis::cmd("XRANGE")
            .arg(self.meter.keys().stream_of(user))
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
            .expect("XRANGE")
    }

    async fn event_kinds(&self, user: &UserId) -> Vec<String> {
        let reply = self.stream(user).await;
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

/// The receipt of a charge that must have been made.
fn receipt(outcome: ChargeOutcome) -> Receipt {
    match outcome {
        ChargeOutcome::Charged(r) => r,
        other => panic!("not charged: {other:?}"),
    }
}

fn charged(outcome: &ChargeOutcome) -> Option<(i64, i64, i64)> {
    match outcome {
        ChargeOutcome::Charged(r) => Some((r.charged, r.from_monthly, r.from_bonus)),
        _ => None,
    }
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
    cmd.arg(include_str!("../../../lua/charge.lua"))
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
