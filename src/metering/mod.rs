//! The Redis side of metering: the only code that changes balances.
//!
//! Every balance change is one Lua script from `lua/`, run atomically in the
//! account's slot; its reply is decoded into a Rust enum here. Charges of
//! one shard that arrive together share a script call (`batch`: group
//! commit, decided one by one in order). Every call has a deadline
//! (`redis.command_timeout_ms`) and turns into [`MeterError`] instead of
//! hanging, so callers can answer 503 at once and Redis coming back needs no
//! restart.

mod batch;
pub mod calendar;
pub mod connection;
pub mod keys;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::{Script, Value};
use thiserror::Error;

use crate::catalog::{Catalog, Module};
use crate::domain::{
    ActionId, Credits, IdempotencyKey, KeyHash, ModuleId, PlanId, RequestId, UserId,
};
use crate::telemetry::metrics;
pub use calendar::{Calendar, Stamp};
pub use connection::{RedisConn, Target};
pub use keys::KeyLayout;

static CHARGE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/charge.lua")));
static REFUND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/refund.lua")));
static SEED: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../../lua/seed.lua")));
static GRANT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../../lua/grant.lua")));
static RESET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../../lua/reset.lua")));
static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/complete.lua")));
static SYNC: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../../lua/sync.lua")));

#[derive(Debug, Error)]
pub enum MeterError {
    #[error("redis unavailable: {0}")]
    Unavailable(#[source] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// charge.lua ran past its deadline and wrote nothing.
    #[error("the charge reached Redis after its deadline")]
    Expired,
    /// `redis.wait_replicas` replicas did not confirm the charge in time;
    /// it was given back.
    #[error("the charge was not confirmed by the replicas in time")]
    NotReplicated,
    #[error("unexpected reply from {script}: {detail}")]
    Protocol {
        script: &'static str,
        detail: String,
    },
}

/// An account's balance right after a script ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balance {
    pub monthly: i64,
    pub bonus: i64,
    pub day_used: i64,
    /// `None`: the plan has no daily limit.
    pub daily_limit: Option<i64>,
}

impl Balance {
    pub fn remaining(&self) -> i64 {
        self.monthly + self.bonus
    }

    pub fn daily_remaining(&self) -> Option<i64> {
        self.daily_limit.map(|l| (l - self.day_used).max(0))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The charge event's id (owner of an idempotency record).
    pub event_id: String,
    /// The account's plan, as Redis holds it (forwarded as `X-Plan`).
    pub plan: String,
    /// This charge emptied the account and the auto-block policy blocked it.
    pub auto_blocked: bool,
    pub charged: i64,
    pub from_monthly: i64,
    pub from_bonus: i64,
    pub balance: Balance,
    /// Where the plan's rate limit stands after this call; `None` when the
    /// plan has none.
    pub rate: Option<RateState>,
}

/// The account's rate limit after a call (GCRA in charge.lua).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateState {
    /// Calls that would pass right now, after this one.
    pub remaining: u32,
    /// Until the whole burst is available again.
    pub reset_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The key is not among the account's live keys (revoked).
    UnknownKey,
    /// The key's expiry has passed.
    KeyExpired,
    /// The key is limited to other modules.
    KeyScope,
    Blocked,
    ModuleNotInPlan,
    DailyLimit(Balance),
    InsufficientCredits(Balance),
    /// The plan's rate limit; the next call fits in this many
    /// milliseconds.
    RateLimited(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeOutcome {
    Charged(Receipt),
    /// The idempotency key was already charged within its window.
    Duplicate {
        balance: Balance,
        plan: String,
    },
    Refused(Refusal),
    /// A proxy `Idempotency-Key` seen before: nothing charged, nothing to
    /// forward.
    Repeat(Repeat),
    /// The account has no state in Redis yet (or Redis lost it).
    Missing,
}

/// What a repeated proxy `Idempotency-Key` gets instead of a second call.
/// `original` is the request id of the first call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repeat {
    /// The first call completed: its response, to be replayed.
    Replay {
        original: String,
        response: StoredResponse,
        balance: Balance,
        plan: String,
    },
    /// The first call has not completed yet.
    InProgress { original: String },
    /// The key was first used with another module, method or path.
    KeyReused { original: String },
    /// The first call completed but its response was not kept (longer than
    /// `metering.replay_max_bytes`, or cut off).
    NotReplayable { original: String },
}

/// A response kept for replay by complete.lua.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// `name: value` lines joined by `\n` (header values cannot hold a
    /// newline, so the encoding is unambiguous).
    pub headers: String,
    pub body: bytes::Bytes,
}

/// How a charge treats its request id.
#[derive(Clone, Copy, Debug)]
pub enum Idempotency<'a> {
    /// Every call is a new charge.
    None,
    /// The credits API's `request_id`: charged at most once; a repeat is a
    /// `Duplicate`, answered without charging.
    RequestId,
    /// The proxy's `Idempotency-Key`: a repeat is never forwarded again.
    Key {
        key: &'a IdempotencyKey,
        /// Digest of method, module, path and query: the same key on
        /// another request is refused.
        fingerprint: &'a str,
        /// Until then (unix ms) a first call without an answer yet is "in
        /// progress"; after it, its gateway is presumed gone.
        lease_until_ms: i64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Charge,
    /// Same rules, nothing written (`POST /api/credits/check`).
    Check,
}

pub struct ChargeRequest<'a> {
    pub user: &'a UserId,
    /// The key the caller presented; `None` when identity is already trusted.
    pub key_hash: Option<&'a KeyHash>,
    pub module: &'a Module,
    pub action: Option<&'a ActionId>,
    pub request_id: &'a RequestId,
    pub idempotency: Idempotency<'a>,
    pub actor: &'a str,
    pub stamp: &'a Stamp,
    pub mode: Mode,
}

/// Which charge to give back.
pub enum RefundOf<'a> {
    /// The one recorded under the request id (credits API charges).
    Record,
    /// The one recorded under a proxy `Idempotency-Key`; frees the key.
    Idempotent(&'a IdempotencyKey),
    /// A charge without a record, described by its receipt.
    Receipt {
        receipt: &'a Receipt,
        module: &'a ModuleId,
        action: Option<&'a ActionId>,
        charged_at: &'a Stamp,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundOutcome {
    Refunded {
        amount: i64,
        monthly: i64,
        bonus: i64,
        day_used: i64,
    },
    NotFound,
    Missing,
}

/// One grant of bonus credits.
pub struct Grant<'a> {
    pub user: &'a UserId,
    pub credits: Credits,
    pub reason: &'a str,
    pub actor: &'a str,
    /// The caller's Idempotency-Key and the grant's fingerprint (amount and
    /// reason): the same key applies the grant once.
    pub idempotency: Option<(&'a IdempotencyKey, &'a str)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantOutcome {
    Granted {
        monthly: i64,
        bonus: i64,
    },
    /// The key's grant was applied before; the balances it left.
    Repeat {
        monthly: i64,
        bonus: i64,
    },
    /// The key was used for another grant (amount or reason).
    KeyReused,
    /// The bonus would pass [`Credits::MAX`]; nothing changed.
    OverLimit {
        bonus: i64,
    },
    Missing,
}

/// What Postgres says about an account's access, at one version (see
/// sync.lua).
pub struct SyncState {
    pub user: UserId,
    pub version: i64,
    pub plan: PlanId,
    pub blocked: bool,
    pub keys: Vec<LiveKey>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    Applied,
    /// Redis already holds this version or a newer one.
    AlreadyNewer,
    /// The account is not in Redis; it is seeded from Postgres when used.
    NotInRedis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetOutcome {
    Reset {
        monthly: i64,
        bonus: i64,
    },
    /// Already in the period: nothing to do.
    Current,
    Missing,
    /// The account's plan is no longer configured.
    UnknownPlan,
}

/// What Redis needs to hold for an account, from Postgres.
pub struct AccountSeed {
    pub user: UserId,
    pub plan: PlanId,
    pub monthly: Credits,
    pub bonus: Credits,
    pub period: String,
    pub day: String,
    pub day_used: Credits,
    pub blocked: bool,
    pub keys: Vec<LiveKey>,
}

/// A live (not revoked) API key, as charge.lua checks it on every call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveKey {
    pub hash: KeyHash,
    /// Unix ms from which the key is refused (`key_expired`).
    pub expires_ms: Option<i64>,
    /// The only modules the key may call (`key_scope`); `None`: every
    /// module of the plan.
    pub modules: Option<Vec<ModuleId>>,
}

impl LiveKey {
    pub fn unrestricted(hash: KeyHash) -> Self {
        Self {
            hash,
            expires_ms: None,
            modules: None,
        }
    }

    /// The value charge.lua reads: `<expires ms>|<,module,...,>`, either
    /// part empty when there is no such restriction.
    pub fn details(&self) -> String {
        let mut out = String::new();
        if let Some(ms) = self.expires_ms {
            out.push_str(itoa::Buffer::new().format(ms));
        }
        out.push('|');
        if let Some(modules) = &self.modules {
            out.push(',');
            for m in modules {
                out.push_str(m.as_str());
                out.push(',');
            }
        }
        out
    }
}

/// An account's hot state as Redis holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountState {
    pub plan: String,
    pub monthly: i64,
    pub bonus: i64,
    pub period: String,
    pub day: String,
    pub day_used: i64,
    pub blocked: bool,
    /// Blocked by the auto-block policy until credits come back.
    pub exhausted: bool,
}

/// Cheap to clone: one multiplexed connection (per cluster node) is shared.
#[derive(Clone)]
pub struct Meter {
    redis: RedisConn,
    keys: Arc<KeyLayout>,
    catalog: Arc<Catalog>,
    timeout: Duration,
    idempotency_ttl_secs: u64,
    /// Redis's clock minus ours, in ms ([`UNCALIBRATED`] until measured):
    /// a charge carries its deadline on Redis's clock (see charge.lua).
    clock_offset_ms: Arc<AtomicI64>,
    /// Charges go to Redis grouped per shard (see `batch`).
    batcher: Arc<batch::Batcher>,
}

/// No offset measured yet: charges go without a deadline.
const UNCALIBRATED: i64 = i64::MIN;
/// A clock comparison whose round trip took longer is not trusted.
const CALIBRATION_MAX_RTT_MS: i64 = 50;

impl Meter {
    /// Builds the meter without connecting: the gateway starts (and answers
    /// 503) while Redis is down, and connects once Redis is there.
    pub fn new(
        settings: &crate::config::RedisSettings,
        catalog: Arc<Catalog>,
        metering: &crate::config::MeteringSettings,
    ) -> Result<Self, MeterError> {
        let target = Target::parse(&settings.url).map_err(MeterError::Unavailable)?;
        let timeout = Duration::from_millis(settings.command_timeout_ms);
        let redis = RedisConn::lazy(
            &target,
            connection::Timeouts {
                connect: Duration::from_millis(settings.connect_timeout_ms),
                response: timeout,
            },
        )
        .map_err(MeterError::Unavailable)?;
        let keys = Arc::new(KeyLayout::new(&settings.key_prefix, settings.shards));
        let batcher = Arc::new(batch::Batcher::new(
            batch::Shared {
                script: &CHARGE,
                redis: redis.clone(),
                plan_table: catalog.plan_table_arg().to_owned(),
                record_ttl_secs: metering.idempotency_ttl_secs.max(1),
                auto_block: metering.auto_block_exhausted,
                timeout,
                wait_replicas: settings.wait_replicas,
            },
            keys.streams(),
        ));
        Ok(Self {
            redis,
            keys,
            catalog,
            timeout,
            idempotency_ttl_secs: metering.idempotency_ttl_secs.max(1),
            clock_offset_ms: Arc::new(AtomicI64::new(UNCALIBRATED)),
            batcher,
        })
    }

    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    /// The meter's own connection, for tests and tools that inspect the
    /// keys it writes (the product's callers go through its methods).
    pub fn connection(&self) -> RedisConn {
        self.redis.clone()
    }

    async fn run<T>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, MeterError> {
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(MeterError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(MeterError::Unavailable(e)),
            Err(_) => Err(MeterError::Timeout(self.timeout)),
        };
        metrics::redis_script(what, started.elapsed(), result.is_ok());
        result
    }

    pub async fn ping(&self) -> Result<(), MeterError> {
        let mut con = self.redis.clone();
        self.run("ping", redis::cmd("PING").query_async::<String>(&mut con))
            .await
            .map(|_| ())
    }

    /// Measures Redis's clock against ours (TIME, halfway through the round
    /// trip), so a charge's deadline can be given on Redis's clock: hosts
    /// whose clocks disagree must not turn every charge into "expired".
    pub async fn calibrate(&self) -> Result<i64, MeterError> {
        let mut con = self.redis.clone();
        let sent = chrono::Utc::now().timestamp_millis();
        let (secs, micros): (i64, i64) = self
            .run("time", redis::cmd("TIME").query_async(&mut con))
            .await?;
        let received = chrono::Utc::now().timestamp_millis();
        let offset = secs * 1000 + micros / 1000 - (sent + received) / 2;
        // A slow round trip (Redis stalled, then answering a backlog) says
        // little about the clocks: the error is up to half of it. Keep the
        // last good measure rather than move every deadline by it.
        if received - sent > CALIBRATION_MAX_RTT_MS
            && self.clock_offset_ms.load(Ordering::Relaxed) != UNCALIBRATED
        {
            return Ok(self.clock_offset_ms.load(Ordering::Relaxed));
        }
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
        Ok(offset)
    }

    /// When a charge sent now must have run, on Redis's clock; "0" (none)
    /// until the clocks have been compared. Earlier than our own deadline
    /// by a margin (a fifth of the budget, at most 50 ms): a script that
    /// runs just in time must also get its answer back in time, or its
    /// caller hears 503 "nothing charged" for a charge that stands. Seen
    /// once with a Redis that stalled and then ran its backlog the moment
    /// it came back.
    fn deadline_on_redis(&self) -> i64 {
        match self.clock_offset_ms.load(Ordering::Relaxed) {
            UNCALIBRATED => 0,
            offset => {
                let budget = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX / 4);
                chrono::Utc::now().timestamp_millis() + offset + budget - (budget / 5).min(50)
            }
        }
    }

    /// Decide and (in [`Mode::Charge`]) deduct one call: charge.lua.
    pub async fn charge(&self, req: &ChargeRequest<'_>) -> Result<ChargeOutcome, MeterError> {
        let cost = req.module.cost_of(req.action);
        let event_id = uuid::Uuid::now_v7().to_string();
        let account = self.keys.account(req.user);
        let (record, idempotency, fingerprint, lease) = match req.idempotency {
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
        args.push(match req.mode {
            Mode::Charge => "charge",
            Mode::Check => "check",
        });
        args.push(fingerprint);
        args.push(lease);
        args.push_with(|out| event_members(out, req));
        let shard = self.keys.shard_of(req.user);
        let deadline = std::time::Instant::now() + self.timeout;
        let queued = self.batcher.charge(
            shard,
            batch::Charge {
                keys,
                args,
                deadline,
                redis_deadline: self.deadline_on_redis(),
            },
        );
        let answer = match tokio::time::timeout_at(deadline.into(), queued).await {
            Ok(answer) => answer?,
            Err(_) => return Err(MeterError::Timeout(self.timeout)),
        };
        match decode_charge(answer.value, event_id) {
            Ok(ChargeOutcome::Charged(receipt)) if !answer.replicated => {
                self.give_back(req, &receipt).await;
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

    pub async fn refund(
        &self,
        user: &UserId,
        request_id: &RequestId,
        of: RefundOf<'_>,
        actor: &str,
        now: &Stamp,
    ) -> Result<RefundOutcome, MeterError> {
        let event_id = uuid::Uuid::now_v7().to_string();
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
                inv.arg("direct")
                    .arg(receipt.from_monthly)
                    .arg(receipt.from_bonus)
                    .arg(&charged_at.day)
                    .arg(&charged_at.period)
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

    /// Adds bonus credits (grant.lua), once per Idempotency-Key and never
    /// taking the bonus past [`Credits::MAX`]. `credits` is bounded by the
    /// caller.
    pub async fn grant(&self, grant: &Grant<'_>, now: &Stamp) -> Result<GrantOutcome, MeterError> {
        let mut con = self.redis.clone();
        let (record, key, fingerprint) = match grant.idempotency {
            Some((key, fingerprint)) => (
                self.keys.grant_record(grant.user, key),
                key.as_str(),
                fingerprint,
            ),
            // Declared all the same: a script names every key it may touch.
            None => (self.keys.account(grant.user), "", ""),
        };
        let mut inv = GRANT.prepare_invoke();
        inv.key(self.keys.account(grant.user))
            .key(self.keys.stream_of(grant.user))
            .key(record)
            .arg(grant.credits.get())
            .arg(now.now_ms())
            .arg(uuid::Uuid::now_v7().to_string())
            .arg(grant.user.as_str())
            .arg(grant.actor)
            .arg(grant.reason)
            .arg(&now.day)
            .arg(Credits::MAX)
            .arg(key)
            .arg(fingerprint)
            .arg(self.idempotency_ttl_secs);
        let reply: Value = self.run("grant", inv.invoke_async(&mut con)).await?;
        let r = Reply::parse("grant.lua", reply)?;
        Ok(match r.status.as_str() {
            "ok" => GrantOutcome::Granted {
                monthly: r.int(0)?,
                bonus: r.int(1)?,
            },
            "repeat" => GrantOutcome::Repeat {
                monthly: r.int(0)?,
                bonus: r.int(1)?,
            },
            "key_reused" => GrantOutcome::KeyReused,
            "over_limit" => GrantOutcome::OverLimit { bonus: r.int(0)? },
            "missing" => GrantOutcome::Missing,
            other => return Err(protocol(r.script, format!("unknown status {other:?}"))),
        })
    }

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
            .arg(&now.period)
            .arg(&now.day)
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

    /// Mirrors an admin change committed to Postgres (sync.lua): plan,
    /// block and the live key set, all at once, unless Redis already holds
    /// a newer version. Effective on every instance with the next charge.
    pub async fn sync(&self, state: &SyncState) -> Result<SyncOutcome, MeterError> {
        let mut con = self.redis.clone();
        let mut inv = SYNC.prepare_invoke();
        inv.key(self.keys.account(&state.user))
            .key(self.keys.legacy_key_set(&state.user))
            .key(self.keys.api_keys(&state.user))
            .arg(state.version)
            .arg(state.plan.as_str())
            .arg(if state.blocked { "1" } else { "0" });
        for key in &state.keys {
            inv.arg(key.hash.as_str()).arg(key.details());
        }
        let applied: i64 = self.run("sync", inv.invoke_async(&mut con)).await?;
        Ok(match applied {
            1 => SyncOutcome::Applied,
            0 => SyncOutcome::AlreadyNewer,
            _ => SyncOutcome::NotInRedis,
        })
    }
}

/// The fields every event row of a charge ends with (charge.lua's last
/// per-charge argument): user, request id, actor, now, day, period, day,
/// tab-separated and escaped here so the script only concatenates.
fn event_members(out: &mut Vec<u8>, req: &ChargeRequest<'_>) {
    use crate::ledger::event::escape_field;
    escape_field(out, req.user.as_str());
    out.push(b'\t');
    escape_field(out, req.request_id.as_str());
    out.push(b'\t');
    escape_field(out, req.actor);
    out.push(b'\t');
    out.extend_from_slice(itoa::Buffer::new().format(req.stamp.now_ms()).as_bytes());
    for value in [&req.stamp.day, &req.stamp.period, &req.stamp.day] {
        out.push(b'\t');
        escape_field(out, value);
    }
}

fn protocol(script: &'static str, detail: impl Into<String>) -> MeterError {
    MeterError::Protocol {
        script,
        detail: detail.into(),
    }
}

/// A script reply `{"status", value, ...}`.
struct Reply {
    script: &'static str,
    status: String,
    values: Vec<Value>,
}

impl Reply {
    fn parse(script: &'static str, reply: Value) -> Result<Self, MeterError> {
        let Value::Array(items) = reply else {
            return Err(protocol(script, format!("not an array: {reply:?}")));
        };
        let mut items = items.into_iter();
        let status = match items.next() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            Some(Value::SimpleString(s)) => s,
            other => return Err(protocol(script, format!("bad status {other:?}"))),
        };
        Ok(Self {
            script,
            status,
            values: items.collect(),
        })
    }

    fn int(&self, i: usize) -> Result<i64, MeterError> {
        match self.values.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            other => Err(protocol(
                self.script,
                format!("{}: value {i} is not an integer: {other:?}", self.status),
            )),
        }
    }

    fn text(&self, i: usize) -> Result<String, MeterError> {
        match self.values.get(i) {
            Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(Value::SimpleString(s)) => Ok(s.clone()),
            other => Err(protocol(
                self.script,
                format!("{}: value {i} is not a string: {other:?}", self.status),
            )),
        }
    }

    fn bytes(&self, i: usize) -> Result<bytes::Bytes, MeterError> {
        match self.values.get(i) {
            Some(Value::BulkString(b)) => Ok(bytes::Bytes::copy_from_slice(b)),
            Some(Value::SimpleString(s)) => Ok(bytes::Bytes::copy_from_slice(s.as_bytes())),
            other => Err(protocol(
                self.script,
                format!("{}: value {i} is not a string: {other:?}", self.status),
            )),
        }
    }

    /// `monthly, bonus, day_used, daily_limit` starting at value `i`.
    fn balance(&self, i: usize) -> Result<Balance, MeterError> {
        let limit = self.int(i + 3)?;
        Ok(Balance {
            monthly: self.int(i)?,
            bonus: self.int(i + 1)?,
            day_used: self.int(i + 2)?,
            daily_limit: (limit >= 0).then_some(limit),
        })
    }
}

/// charge.lua's common answer, one string:
/// `ok <charged> <monthly> <bonus> <day_used> <daily_limit> <from_monthly> <from_bonus> <auto_blocked> <plan>`.
fn decode_ok(line: &[u8], event_id: String) -> Option<ChargeOutcome> {
    let mut rest = line.strip_prefix(b"ok ")?;
    let mut n = [0i64; 10];
    for v in &mut n {
        let end = rest.iter().position(|&b| b == b' ')?;
        *v = crate::ledger::event::integer(&rest[..end])?;
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
    Some(ChargeOutcome::Charged(Receipt {
        event_id,
        charged,
        balance: Balance {
            monthly,
            bonus,
            day_used,
            daily_limit: (limit >= 0).then_some(limit),
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
        plan: std::str::from_utf8(rest).ok()?.to_owned(),
    }))
}

fn decode_charge(reply: Value, event_id: String) -> Result<ChargeOutcome, MeterError> {
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
            plan: r.text(5)?,
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
            plan: r.text(8)?,
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

fn decode_refund(reply: Value) -> Result<RefundOutcome, MeterError> {
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

#[cfg(test)]
mod tests {
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
            Value::BulkString(b"ok 3 7 0 3 100 3 0 0 9 1500 starter plan".to_vec()),
            "ev".into(),
        )
        .expect("ok");
        assert_eq!(
            ok,
            ChargeOutcome::Charged(Receipt {
                event_id: "ev".into(),
                // The plan is the rest of the line, spaces and all.
                plan: "starter plan".into(),
                auto_blocked: false,
                charged: 3,
                from_monthly: 3,
                from_bonus: 0,
                balance: Balance {
                    monthly: 7,
                    bonus: 0,
                    day_used: 3,
                    daily_limit: Some(100)
                },
                rate: Some(RateState {
                    remaining: 9,
                    reset_ms: 1500
                }),
            })
        );
        for bad in [
            "ok 3 7 0 3 100 3 0 0 -1 -1",
            "ok 3 7 0 3 100 3 0 0 p",
            "ok 3 x 0 3 100 3 0 0 -1 -1 p",
            "okay 3 7 0 3 100 3 0 0 -1 -1 p",
            "ok 3 7  0 3 100 3 0 0 -1 -1 p",
            "ok 3 - 0 3 100 3 0 0 -1 -1 p",
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
            monthly: 7,
            bonus: 2,
            day_used: 3,
            daily_limit: Some(100),
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
                plan: "pro".into()
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
                plan: "pro".into(),
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
    fn the_charge_answer_carries_negative_numbers_and_no_limit() {
        let limitless = decode_ok(b"ok 1 -5 0 1 -1 1 0 1 -1 -1 free", String::new());
        assert!(matches!(
            limitless,
            Some(ChargeOutcome::Charged(Receipt {
                balance: Balance {
                    monthly: -5,
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
