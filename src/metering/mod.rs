//! The Redis side of metering: the only code that changes balances.
//!
//! Every balance change is one Lua script from `lua/`, run atomically in the
//! account's slot; its reply is decoded into a Rust enum here. One file per
//! script holds its arguments, its call and its reply's decoding (`charge`,
//! `refund`, `complete`, `grant`, `reset`, `account` for seed.lua and reads,
//! `sync`); the types they share are in `types`, the reply reader in
//! `reply`. Charges of one shard that arrive together share a script call
//! (`batch`: group commit, decided one by one in order). Every call has a
//! deadline
//! (`redis.command_timeout_ms`) and turns into [`MeterError`] instead of
//! hanging, so callers can answer 503 at once and Redis coming back needs no
//! restart.

mod account;
mod batch;
pub mod calendar;
mod charge;
mod complete;
pub mod connection;
mod grant;
pub mod keys;
mod lease;
mod refund;
mod reply;
mod reset;
pub mod rows;
mod sync;
mod types;
mod unanswered;

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
pub use calendar::{Calendar, LocalDay, Period, Stamp};
pub use connection::{RedisConn, Target};
pub use keys::KeyLayout;
pub use lease::LeaseClosed;
pub use types::*;

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
                script: &charge::CHARGE,
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
        if received - sent > CALIBRATION_MAX_RTT_MS && self.clocks_compared() {
            return Ok(self.clock_offset_ms.load(Ordering::Relaxed));
        }
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
        Ok(offset)
    }

    /// A charge's budget (`redis.command_timeout_ms`), in ms.
    fn budget_ms(&self) -> i64 {
        i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX / 4)
    }

    /// Whether Redis's clock has been compared with ours.
    pub fn clocks_compared(&self) -> bool {
        self.clock_offset_ms.load(Ordering::Relaxed) != UNCALIBRATED
    }

    /// When a charge started at `started_ms` (unix ms, our clock) must
    /// have run, on Redis's clock; "0" (none) until the clocks have been
    /// compared. Earlier than our own deadline
    /// by a margin (a fifth of the budget, at most 50 ms): a script that
    /// runs just in time must also get its answer back in time, or its
    /// caller hears 503 "nothing charged" for a charge that stands. Seen
    /// once with a Redis that stalled and then ran its backlog the moment
    /// it came back.
    fn deadline_on_redis(&self, started_ms: i64) -> i64 {
        match self.clock_offset_ms.load(Ordering::Relaxed) {
            UNCALIBRATED => 0,
            offset => {
                let budget = self.budget_ms();
                started_ms + offset + budget - (budget / 5).min(50)
            }
        }
    }
}
