//! Group commit of charges.
//!
//! One task per shard sends charge.lua the charges that arrived while that
//! shard's previous call was in Redis, all in one call. There is no timer:
//! a charge that finds the shard idle goes at once, alone, so a quiet
//! gateway adds no latency; under load, calls grow by themselves. The
//! script runs the charges one after the other in arrival order, so the
//! decisions are exactly those of separate calls; what is saved is Redis's
//! cost of a script call (argument parsing, the call itself) and the round
//! trips.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{RedisError, Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::{MeterError, RedisConn};
use crate::telemetry::metrics;

/// The most charges in one call: a bound on the script's run time, which
/// holds up every other command on that Redis.
const MAX_BATCH: usize = 64;

/// Charges waiting for their shard's task; past this, callers wait to
/// enqueue (backpressure rather than unbounded memory).
const QUEUE: usize = 4096;

/// One charge: its five keys and its eighteen arguments, encoded.
pub(super) struct Charge {
    pub keys: [String; 5],
    pub args: Vec<Vec<u8>>,
}

/// A charge's reply, and whether `redis.wait_replicas` replicas have it.
pub(super) struct Answer {
    pub value: Value,
    pub replicated: bool,
}

struct Queued {
    charge: Charge,
    reply: oneshot::Sender<Result<Answer, MeterError>>,
}

/// What every charge of a call shares (ARGV[1..3] of charge.lua).
pub(super) struct Shared {
    pub script: &'static Script,
    pub redis: RedisConn,
    pub plan_table: String,
    pub record_ttl_secs: u64,
    pub auto_block: bool,
    pub timeout: Duration,
    /// WAIT for this many replicas after each call (0: don't).
    pub wait_replicas: u32,
}

/// The per-shard queues, each drained by its own task, started on first use
/// (the meter is built before the runtime serves anything).
pub(super) struct Batcher {
    shared: Arc<Shared>,
    queues: Vec<std::sync::OnceLock<mpsc::Sender<Queued>>>,
}

impl Batcher {
    pub fn new(shared: Shared, shards: u16) -> Self {
        Self {
            shared: Arc::new(shared),
            queues: (0..shards.max(1))
                .map(|_| std::sync::OnceLock::new())
                .collect(),
        }
    }

    /// Queues `charge` on its shard and waits for its reply.
    pub async fn charge(&self, shard: u16, charge: Charge) -> Result<Answer, MeterError> {
        let queue = &self.queues[usize::from(shard) % self.queues.len()];
        let sender = queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(drain(Arc::clone(&self.shared), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        sender
            .send(Queued { charge, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn gone() -> MeterError {
    MeterError::Unavailable(RedisError::from((
        redis::ErrorKind::Io,
        "the charge queue stopped",
    )))
}

/// A shard's task: waits for a charge, takes whatever else is queued behind
/// it, sends them as one call, answers each, and starts over. Ends when the
/// meter (every sender) is gone.
async fn drain(shared: Arc<Shared>, mut queue: mpsc::Receiver<Queued>) {
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A caller that gave up has answered its client "nothing was
        // charged": its charge must not run.
        batch.retain(|q| !q.reply.is_closed());
        if !batch.is_empty() {
            send(&shared, &mut batch).await;
        }
        batch.clear();
    }
}

async fn send(shared: &Shared, batch: &mut Vec<Queued>) {
    let mut inv = shared.script.prepare_invoke();
    for q in batch.iter() {
        for key in &q.charge.keys {
            inv.key(key.as_str());
        }
    }
    inv.arg(shared.plan_table.as_str())
        .arg(shared.record_ttl_secs)
        .arg(if shared.auto_block { "1" } else { "0" });
    for q in batch.iter() {
        for arg in &q.charge.args {
            inv.arg(arg.as_slice());
        }
    }
    let mut con = shared.redis.clone();
    let started = Instant::now();
    let result = tokio::time::timeout(shared.timeout, inv.invoke_async::<Value>(&mut con)).await;
    metrics::redis_script("charge", started.elapsed(), matches!(result, Ok(Ok(_))));
    match result {
        Ok(Ok(Value::Array(replies))) if replies.len() == batch.len() => {
            let replicated = replicated(shared, &mut con, &batch[0].charge, started).await;
            for (q, value) in batch.drain(..).zip(replies) {
                let _ = q.reply.send(Ok(Answer { value, replicated }));
            }
        }
        Ok(Ok(other)) => {
            let detail = format!("{} replies expected, got {other:?}", batch.len());
            for q in batch.drain(..) {
                let _ = q.reply.send(Err(MeterError::Protocol {
                    script: "charge.lua",
                    detail: detail.clone(),
                }));
            }
        }
        Ok(Err(e)) => {
            let timed_out = e.is_timeout();
            for q in batch.drain(..) {
                let _ = q.reply.send(Err(if timed_out {
                    MeterError::Timeout(shared.timeout)
                } else {
                    MeterError::Unavailable(RedisError::from((
                        e.kind(),
                        "charge call failed",
                        e.to_string(),
                    )))
                }));
            }
        }
        Err(_) => {
            for q in batch.drain(..) {
                let _ = q.reply.send(Err(MeterError::Timeout(shared.timeout)));
            }
        }
    }
}

/// With `redis.wait_replicas`, one WAIT per call on the master that ran it
/// (every charge of a call is in one slot): a charge is only as durable as
/// its replicas, and a master that dies before they have it takes it along.
/// Within what is left of the call's budget; false on any shortfall.
async fn replicated(
    shared: &Shared,
    con: &mut RedisConn,
    first: &Charge,
    started: Instant,
) -> bool {
    if shared.wait_replicas == 0 {
        return true;
    }
    let left = shared.timeout.saturating_sub(started.elapsed());
    if left.is_zero() {
        return false;
    }
    let waited = tokio::time::timeout(
        left,
        con.wait_replicas(&first.keys[0], shared.wait_replicas, left),
    )
    .await;
    match waited {
        Ok(Ok(acked)) => acked >= i64::from(shared.wait_replicas),
        _ => false,
    }
}
