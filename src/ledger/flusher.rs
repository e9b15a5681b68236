//! The flusher: usage streams → Postgres, at least once delivered, exactly
//! once recorded.
//!
//! One consumer group over every shard's stream. A batch is read with
//! XREADGROUP, written in one Postgres transaction (idempotent by event id),
//! then acknowledged and deleted from the stream. A crash anywhere leaves the
//! batch pending: the same consumer re-reads its pending entries first when
//! it starts again, and other instances take over entries idle for longer
//! than `claim_idle` with XAUTOCLAIM. Postgres being down only delays
//! acknowledgement; the proxy keeps serving and the backlog waits in Redis.
//!
//! Blocking reads use a dedicated connection whose response timeout is
//! longer than the block: the shared connection's short timeout (made for
//! the hot path) would cut every XREADGROUP BLOCK short.
//!
//! On a Redis Cluster each shard's stream lives on the node that owns its
//! hash tag, and no command may span two slots. There the flusher reads,
//! claims, acknowledges and measures each stream with its own commands,
//! routed by the cluster connection (so a stream that moves during a
//! reshard is followed there), and polls every [`CLUSTER_POLL`] instead of
//! blocking: a blocked read would hold up the node connection it shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use redis::Value;
use sqlx::PgPool;
use thiserror::Error;

use super::BatchHook;
use super::backlog::{Backlog, backlog};
use super::batch::{Batch, add_reply};
use super::store;
use crate::config::LedgerSettings;
use crate::metering::connection::Timeouts;
use crate::metering::{KeyLayout, RedisConn, Target};
use crate::telemetry::metrics;

pub const GROUP: &str = "creditgate-ledger";

/// How often an idle flusher looks for new entries on a Redis Cluster.
const CLUSTER_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Error)]
pub enum FlushError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("stopped by the crash-after-commit fault hook")]
    InjectedCrash,
}

#[derive(Clone, Debug)]
pub struct FlusherConfig {
    pub consumer: String,
    pub batch_size: usize,
    pub block: Duration,
    pub claim_idle: Duration,
    /// How long a stopping flusher keeps draining before it gives up.
    pub drain_timeout: Duration,
    /// Pause after a batch that was not full (0: none).
    pub linger: Duration,
}

impl FlusherConfig {
    /// `[ledger]` as the flusher runs it. The consumer name defaults to
    /// the host's name, so that a restarted gateway on the same host
    /// takes back its own pending entries at once.
    pub fn from_settings(settings: &LedgerSettings) -> Self {
        let consumer = settings.consumer.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "creditgate".into())
        });
        Self {
            consumer,
            batch_size: settings.batch_size,
            block: Duration::from_millis(settings.block_ms),
            claim_idle: Duration::from_millis(settings.claim_idle_ms),
            drain_timeout: Duration::from_millis(settings.drain_timeout_ms),
            linger: Duration::from_millis(settings.linger_ms),
        }
    }
}

/// What a flusher has written: new events and redelivered ones it skipped.
#[derive(Debug, Default)]
pub struct LedgerStats {
    pub flushed_total: AtomicU64,
    pub duplicates_total: AtomicU64,
}

/// How a read treats new and abandoned entries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Normal service: block for new entries, reclaim long-idle ones.
    Serve,
    /// Shutdown: take what is there without blocking.
    Drain,
    /// `ledger verify`: also take over every other consumer's pending entries.
    Steal,
}

pub struct Flusher {
    target: Target,
    pool: PgPool,
    streams: Vec<String>,
    config: FlusherConfig,
    stats: Arc<LedgerStats>,
    crash_after_commit: Arc<AtomicBool>,
    /// Webhook events caused by the batches, written in their transaction.
    hook: Option<Arc<dyn BatchHook>>,
    con: Option<RedisConn>,
    groups_ready: bool,
    /// Own pending entries are re-read once at start (after a crash).
    pending_checked: bool,
    last_claim: Option<Instant>,
    last_stats: Option<Instant>,
}

impl Flusher {
    pub fn new(
        redis_url: &str,
        keys: &KeyLayout,
        pool: PgPool,
        config: FlusherConfig,
    ) -> Result<Self, FlushError> {
        Ok(Self {
            target: Target::parse(redis_url)?,
            pool,
            streams: keys.streams().collect(),
            config,
            stats: Arc::new(LedgerStats::default()),
            crash_after_commit: Arc::new(AtomicBool::new(false)),
            hook: None,
            con: None,
            groups_ready: false,
            pending_checked: false,
            last_claim: None,
            last_stats: None,
        })
    }

    /// Splits this flusher into `n` workers, each owning every n-th stream
    /// with its own consumer name (`<consumer>-<i>`) and the same stats.
    /// Postgres takes one batch per connection at a time; two workers keep
    /// both cores busy where one leaves a core idle while Postgres works.
    pub fn into_workers(self, n: usize) -> Result<Vec<Flusher>, FlushError> {
        let n = n.clamp(1, self.streams.len().max(1));
        if n == 1 {
            return Ok(vec![self]);
        }
        (0..n)
            .map(|i| {
                let mut config = self.config.clone();
                config.consumer = format!("{}-{i}", self.config.consumer);
                Ok(Flusher {
                    target: self.target.clone(),
                    pool: self.pool.clone(),
                    streams: self.streams.iter().skip(i).step_by(n).cloned().collect(),
                    config,
                    stats: Arc::clone(&self.stats),
                    crash_after_commit: Arc::clone(&self.crash_after_commit),
                    hook: self.hook.clone(),
                    con: None,
                    groups_ready: false,
                    pending_checked: false,
                    last_claim: None,
                    last_stats: None,
                })
            })
            .collect()
    }

    /// Produce the webhook events the batches cause (grants, thresholds).
    pub fn with_hook(mut self, hook: Arc<dyn BatchHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    pub fn stats(&self) -> Arc<LedgerStats> {
        Arc::clone(&self.stats)
    }

    /// Fault injection for tests: the next batch is committed to Postgres,
    /// then the flusher stops as if killed, without acknowledging it.
    pub fn crash_after_next_commit(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.crash_after_commit)
    }

    /// Runs until `shutdown` resolves, then drains what it can within
    /// `drain_timeout` and returns. Returns early only on the injected crash.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new();
        let mut batch = Batch::default();
        loop {
            // Shutdown may cut a read or a pause short, never a write: a
            // write dropped halfway leaves its connection mid-COPY, and the
            // drain below would find it broken.
            if batch.len() == 0 {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    read = self.next_batch(Reading::Serve) => match read {
                        Ok(read) => batch = read,
                        Err(e) => {
                            self.note_error(&e);
                            if pause(&mut shutdown, backoff.next()).await {
                                break;
                            }
                            continue;
                        }
                    },
                }
            }
            match self.commit(&mut batch).await {
                Ok(n) => {
                    backoff.reset();
                    // Under steady traffic, a short pause after a partial
                    // batch lets the next one fill: Postgres pays its
                    // per-transaction cost (commit, WAL flush, aggregate
                    // upserts) once per many more events, for at most
                    // `linger` more lag.
                    if n > 0
                        && n < self.config.batch_size
                        && !self.config.linger.is_zero()
                        && pause(&mut shutdown, self.config.linger).await
                    {
                        break;
                    }
                }
                Err(FlushError::InjectedCrash) => return,
                Err(e) => {
                    self.note_error(&e);
                    if pause(&mut shutdown, backoff.next()).await {
                        break;
                    }
                }
            }
        }
        tracing::info!("ledger flusher stopping: draining");
        // A batch interrupted mid-read stays pending in Redis and is read
        // again below (own pending first), so nothing is lost by the select.
        // The interrupted XREADGROUP BLOCK is still queued on the old
        // connection, ahead of anything else sent on it: start a new one.
        self.con = None;
        self.pending_checked = false;
        match tokio::time::timeout(self.config.drain_timeout, self.drain_inner(false)).await {
            Ok(Ok(n)) => tracing::info!(flushed = n, "ledger drained"),
            Ok(Err(e)) => tracing::warn!(error = %e, "ledger drain failed; events stay in Redis"),
            Err(_) => tracing::warn!("ledger drain timed out; events stay in Redis"),
        }
    }

    /// Flushes until the streams are empty, taking over other consumers'
    /// pending entries at once (for `ledger verify` and tests). Returns the
    /// number of entries handled.
    pub async fn drain(&mut self) -> Result<u64, FlushError> {
        self.pending_checked = false;
        self.drain_inner(true).await
    }

    async fn drain_inner(&mut self, steal: bool) -> Result<u64, FlushError> {
        let mut handled = 0u64;
        loop {
            let mut batch = self
                .next_batch(if steal {
                    Reading::Steal
                } else {
                    Reading::Drain
                })
                .await?;
            let n = batch.len();
            if n == 0 {
                let backlog = self.backlog().await?;
                if backlog.entries == 0 {
                    return Ok(handled);
                }
                if !steal {
                    // Entries pending at another live consumer: theirs.
                    return Ok(handled);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            self.commit(&mut batch).await?;
            handled += n as u64;
        }
    }

    fn note_error(&mut self, e: &FlushError) {
        match e {
            FlushError::Postgres(_) => {
                metrics::postgres_error();
            }
            _ => {
                metrics::redis_error();
            }
        }
        if matches!(e, FlushError::Redis(_)) {
            self.con = None;
            self.groups_ready = false;
        }
        tracing::warn!(error = %e, "ledger flush failed; retrying");
    }

    async fn connection(&mut self) -> Result<RedisConn, FlushError> {
        if let Some(con) = &self.con {
            return Ok(con.clone());
        }
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            response: self.config.block + Duration::from_secs(5),
        };
        let con = RedisConn::connect(&self.target, timeouts).await?;
        self.con = Some(con.clone());
        Ok(con)
    }

    async fn ensure_groups(&mut self, con: &mut RedisConn) -> Result<(), FlushError> {
        if self.groups_ready {
            return Ok(());
        }
        for stream in &self.streams {
            // From id 0: events written before the group existed are flushed too.
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(con)
                .await;
            match created {
                Err(e) if e.code() != Some("BUSYGROUP") => return Err(e.into()),
                _ => {}
            }
        }
        self.groups_ready = true;
        Ok(())
    }

    /// The next entries to flush: own pending ones after a restart, then
    /// entries abandoned by dead consumers, then new ones (blocking).
    async fn next_batch(&mut self, how: Reading) -> Result<Batch, FlushError> {
        let mut con = self.connection().await?;
        self.ensure_groups(&mut con).await?;
        let result = self.read(&mut con, how).await;
        if matches!(&result, Err(FlushError::Redis(e)) if e.code() == Some("NOGROUP")) {
            // Redis lost its data (restart without persistence).
            self.groups_ready = false;
        }
        result
    }

    async fn read(&mut self, con: &mut RedisConn, how: Reading) -> Result<Batch, FlushError> {
        let mut batch = Batch::default();
        if !self.pending_checked {
            let reply = self.read_group(con, "0", None).await?;
            add_reply(&mut batch, reply);
            if batch.len() > 0 {
                return Ok(batch);
            }
            self.pending_checked = true;
        }
        let claim_due = self
            .last_claim
            .is_none_or(|t| t.elapsed() >= self.config.claim_idle / 2);
        let steal = how == Reading::Steal;
        if steal || claim_due {
            self.last_claim = Some(Instant::now());
            let idle = if steal {
                Duration::ZERO
            } else {
                self.config.claim_idle
            };
            for stream in self.streams.clone() {
                let reply: Value = redis::cmd("XAUTOCLAIM")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg(&self.config.consumer)
                    .arg(idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(self.config.batch_size)
                    .query_async(con)
                    .await?;
                // [next start id, claimed entries, ids deleted meanwhile]
                if let Value::Array(parts) = &reply
                    && let Some(Value::Array(claimed)) = parts.get(1)
                {
                    batch.add_entries(&stream, claimed);
                }
                if batch.len() >= self.config.batch_size {
                    break;
                }
            }
            if batch.len() > 0 {
                return Ok(batch);
            }
        }
        // Only the serving loop waits for new events; a drain takes what is there.
        let block = (how == Reading::Serve).then_some(self.config.block);
        let reply = self.read_group(con, ">", block).await?;
        add_reply(&mut batch, reply);
        if batch.len() == 0 && block.is_some() && con.is_cluster() {
            tokio::time::sleep(CLUSTER_POLL.min(self.config.block)).await;
        }
        Ok(batch)
    }

    async fn read_group(
        &self,
        con: &mut RedisConn,
        id: &str,
        block: Option<Duration>,
    ) -> Result<Vec<Value>, FlushError> {
        let read = |streams: &[String], block: Option<Duration>| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(&self.config.consumer)
                .arg("COUNT")
                .arg(self.config.batch_size);
            if let Some(block) = block {
                cmd.arg("BLOCK").arg(block.as_millis() as u64);
            }
            cmd.arg("STREAMS").arg(streams);
            for _ in streams {
                cmd.arg(id);
            }
            cmd
        };
        if !con.is_cluster() {
            let reply: Value = read(&self.streams, block).query_async(con).await?;
            return Ok(vec![reply]);
        }
        // One slot per command: a read per stream, all at once.
        let replies = join_all(self.streams.chunks(1).map(|stream| {
            let mut con = con.clone();
            let cmd = read(stream, None);
            async move { cmd.query_async::<Value>(&mut con).await }
        }))
        .await;
        replies.into_iter().map(|r| r.map_err(Into::into)).collect()
    }

    /// Writes the batch to Postgres, then acknowledges and deletes it.
    /// Leaves `batch` intact on error so the caller retries the same rows.
    async fn commit(&mut self, batch: &mut Batch) -> Result<usize, FlushError> {
        let n = batch.len();
        if n == 0 {
            self.refresh_stats().await;
            return Ok(0);
        }
        let (events, mut rejects) = batch.events();
        rejects.extend(batch.rejects.iter().cloned());
        let inserted =
            store::write_batch(&self.pool, &events, &rejects, self.hook.as_deref()).await?;
        if self.crash_after_commit.swap(false, Ordering::SeqCst) {
            return Err(FlushError::InjectedCrash);
        }
        let con = self.connection().await?;
        // Per stream (one slot each on a cluster), all at once.
        let acks = join_all(batch.ids.iter().map(|(stream, ids)| {
            let mut con = con.clone();
            let mut pipe = redis::pipe();
            pipe.cmd("XACK").arg(stream).arg(GROUP).arg(ids).ignore();
            pipe.cmd("XDEL").arg(stream).arg(ids).ignore();
            async move { pipe.query_async::<()>(&mut con).await }
        }))
        .await;
        for ack in acks {
            ack?;
        }
        let parsed = events.len() as u64;
        self.stats
            .flushed_total
            .fetch_add(inserted, Ordering::Relaxed);
        self.stats
            .duplicates_total
            .fetch_add(parsed.saturating_sub(inserted), Ordering::Relaxed);
        metrics::ledger_flushed(n, inserted, parsed.saturating_sub(inserted));
        tracing::debug!(entries = n, inserted, "ledger batch flushed");
        *batch = Batch::default();
        self.refresh_stats().await;
        Ok(n)
    }

    async fn refresh_stats(&mut self) {
        if self
            .last_stats
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_stats = Some(Instant::now());
        match self.backlog().await {
            Ok(b) => {
                metrics::ledger_backlog(
                    b.entries,
                    Duration::from_millis(b.oldest_age_ms.max(0) as u64),
                );
                if b.entries > 0 {
                    tracing::debug!(
                        backlog = b.entries,
                        lag_ms = b.oldest_age_ms,
                        "ledger backlog"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "ledger backlog unknown"),
        }
    }

    /// Unflushed entries across the streams (acknowledged ones are deleted).
    pub async fn backlog(&mut self) -> Result<Backlog, FlushError> {
        let con = self.connection().await?;
        backlog(&con, &self.streams).await
    }
}

/// Sleeps for `pause`, or less if `shutdown` comes first: then true.
async fn pause(
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    pause: Duration,
) -> bool {
    tokio::select! {
        biased;
        () = shutdown.as_mut() => true,
        () = tokio::time::sleep(pause) => false,
    }
}

/// 100 ms doubling to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }
}
