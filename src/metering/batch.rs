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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::{RedisError, Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::{MeterError, RedisConn};
use crate::telemetry::metrics;

/// The most charges in one call: a bound on the script's run time, which
/// holds up every other command on that Redis.
const MAX_BATCH: usize = 64;

/// How long before its first caller's deadline a call's WAIT gives up.
const WAIT_MARGIN: Duration = Duration::from_millis(10);

/// Charges waiting for their shard's task; past this, callers wait to
/// enqueue (backpressure rather than unbounded memory).
const QUEUE: usize = 4096;

/// A charge's arguments, encoded one after the other in one buffer: two
/// allocations per charge instead of one per argument.
pub(super) struct Args {
    data: Vec<u8>,
    /// Where each argument ends in `data`.
    ends: Vec<usize>,
}

impl Args {
    pub fn with_capacity(args: usize, bytes: usize) -> Self {
        Self {
            data: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(args),
        }
    }

    pub fn push(&mut self, value: impl Arg) {
        self.push_with(|out| value.write(out));
    }

    /// An argument written by `write`.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.data);
        self.ends.push(self.data.len());
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.data[start..end])
    }
}

/// A script argument, encoded as Redis will read it: bytes as they are,
/// integers in decimal (`ToRedisArgs` built a `Vec` of `Vec`s per
/// argument).
pub(super) trait Arg {
    fn write(self, out: &mut Vec<u8>);
}

impl Arg for &str {
    fn write(self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl Arg for i64 {
    fn write(self, out: &mut Vec<u8>) {
        out.extend_from_slice(itoa::Buffer::new().format(self).as_bytes());
    }
}

/// One charge: its three keys and its fifteen arguments, encoded.
pub(super) struct Charge {
    pub keys: [String; 3],
    pub args: Args,
    /// When the caller stops waiting and answers 503.
    pub deadline: Instant,
    /// The same instant on Redis's clock, unix ms (0: clocks not compared
    /// yet, no deadline).
    pub redis_deadline: i64,
}

/// A charge's reply, and whether `redis.wait_replicas` replicas have it.
pub(super) struct Answer {
    pub value: Value,
    pub replicated: bool,
}

/// A charge that got no answer, and whether it may have run: `sent` is
/// false only when it certainly never reached Redis.
pub(super) struct Failed {
    pub error: MeterError,
    pub sent: bool,
}

struct Queued {
    charge: Charge,
    reply: oneshot::Sender<Result<Answer, Failed>>,
    /// Set by whichever comes first: the shard's task taking the charge
    /// into a call, or its caller giving up. The loser knows what the
    /// winner did: a caller that finds it set must assume Redis ran it.
    taken: Arc<AtomicBool>,
}

/// What every call shares (ARGV[1..3] of charge.lua).
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
    /// Per shard: its queue, and its stream (KEYS[1] of the shard's calls).
    queues: Vec<(std::sync::OnceLock<mpsc::Sender<Queued>>, Arc<str>)>,
}

impl Batcher {
    pub fn new(shared: Shared, streams: impl Iterator<Item = String>) -> Self {
        Self {
            shared: Arc::new(shared),
            queues: streams
                .map(|stream| (std::sync::OnceLock::new(), Arc::from(stream)))
                .collect(),
        }
    }

    /// Queues `charge` on its shard and waits for its reply, until the
    /// charge's deadline.
    pub async fn charge(&self, shard: u16, charge: Charge) -> Result<Answer, Failed> {
        let (queue, stream) = &self.queues[usize::from(shard) % self.queues.len()];
        let sender = queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(drain(Arc::clone(&self.shared), Arc::clone(stream), rx));
            tx
        });
        let deadline = charge.deadline;
        let taken = Arc::new(AtomicBool::new(false));
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            charge,
            reply,
            taken: Arc::clone(&taken),
        };
        let waited = tokio::time::timeout_at(deadline.into(), async {
            sender.send(queued).await.map_err(|_| ())?;
            answer.await.map_err(|_| ())
        })
        .await;
        match waited {
            Ok(Ok(answer)) => answer,
            Ok(Err(())) => Err(Failed {
                error: MeterError::Unavailable(RedisError::from((
                    redis::ErrorKind::Io,
                    "the charge queue stopped",
                ))),
                sent: taken.load(Ordering::Acquire),
            }),
            Err(_) => Err(Failed {
                error: MeterError::Timeout(self.shared.timeout),
                sent: taken.swap(true, Ordering::AcqRel),
            }),
        }
    }
}

/// A shard's task: waits for a charge, takes whatever else is queued behind
/// it, sends them as one call, answers each, and starts over. Ends when the
/// meter (every sender) is gone.
async fn drain(shared: Arc<Shared>, stream: Arc<str>, mut queue: mpsc::Receiver<Queued>) {
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A caller that gave up has answered its client 503: its charge
        // must not run (and one taken here is one its caller will look
        // for, see `Failed`).
        batch.retain(|q| !q.taken.swap(true, Ordering::AcqRel));
        if !batch.is_empty() {
            send(&shared, &stream, &mut batch).await;
        }
        batch.clear();
    }
}

async fn send(shared: &Shared, stream: &str, batch: &mut Vec<Queued>) {
    let mut eval = redis::cmd("EVALSHA");
    eval.arg(shared.script.get_hash())
        .arg(1 + batch.len() * 3)
        .arg(stream);
    for q in batch.iter() {
        for key in &q.charge.keys {
            eval.arg(key.as_str());
        }
    }
    // The call runs all or none of its charges: it must be in time for the
    // caller who stops waiting first.
    let deadline = batch
        .iter()
        .map(|q| q.charge.redis_deadline)
        .filter(|&d| d != 0)
        .min()
        .unwrap_or(0);
    eval.arg(shared.plan_table.as_str())
        .arg(shared.record_ttl_secs)
        .arg(if shared.auto_block { "1" } else { "0" })
        .arg(deadline);
    for q in batch.iter() {
        for arg in q.charge.args.iter() {
            eval.arg(arg);
        }
    }
    let mut con = shared.redis.clone();
    let started = Instant::now();
    let result = tokio::time::timeout(shared.timeout, call(shared, &mut con, &eval, batch)).await;
    metrics::redis_script("charge", started.elapsed(), matches!(result, Ok(Ok(_))));
    match result {
        Ok(Ok((Value::Array(replies), replicated))) if replies.len() == batch.len() => {
            for (q, value) in batch.drain(..).zip(replies) {
                let _ = q.reply.send(Ok(Answer { value, replicated }));
            }
        }
        Ok(Ok((other, _))) => {
            let detail = format!("{} replies expected, got {other:?}", batch.len());
            fail(batch, true, || MeterError::Protocol {
                script: "charge.lua",
                detail: detail.clone(),
            });
        }
        Ok(Err(e)) => {
            // Refused: the call never left. Anything else (a connection
            // cut, a timeout) may have come after Redis ran it.
            let sent = !(e.is_connection_refusal() || e.kind() == NOT_SENT);
            let timed_out = e.is_timeout();
            fail(batch, sent, || {
                if timed_out {
                    MeterError::Timeout(shared.timeout)
                } else {
                    MeterError::Unavailable(RedisError::from((
                        e.kind(),
                        "charge call failed",
                        e.to_string(),
                    )))
                }
            });
        }
        Err(_) => fail(batch, true, || MeterError::Timeout(shared.timeout)),
    }
}

/// The kind of error `call` gives for a call it did not send.
const NOT_SENT: redis::ErrorKind = redis::ErrorKind::Client;

fn fail(batch: &mut Vec<Queued>, sent: bool, error: impl Fn() -> MeterError) {
    for q in batch.drain(..) {
        let _ = q.reply.send(Err(Failed {
            error: error(),
            sent,
        }));
    }
}

/// Runs the call, loading the script first if Redis lost it. With
/// `redis.wait_replicas`, a WAIT follows in the same pipeline, so it reaches
/// the very node (and connection) that ran the script, even while a
/// cluster's slots move: the answer is whether that many replicas have the
/// call's writes. The WAIT ends a little before the first caller of the
/// call stops waiting, so every caller still hears "not replicated" and
/// gives its charge back instead of answering 503 while staying charged.
async fn call(
    shared: &Shared,
    con: &mut RedisConn,
    eval: &redis::Cmd,
    batch: &[Queued],
) -> Result<(Value, bool), RedisError> {
    let wait = (shared.wait_replicas > 0).then(|| {
        let deadline = batch
            .iter()
            .map(|q| q.charge.deadline)
            .min()
            .unwrap_or_else(Instant::now);
        deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(WAIT_MARGIN)
    });
    if wait.is_some_and(|w| w.is_zero()) {
        // No time left to confirm a charge: better not to make it.
        return Err(RedisError::from((
            NOT_SENT,
            "no time left to wait for replicas",
        )));
    }
    let mut loaded = false;
    loop {
        let result = match wait {
            None => eval.query_async::<Value>(con).await.map(|v| (v, true)),
            Some(wait) => {
                let mut pipe = redis::pipe();
                pipe.add_command(eval.clone())
                    .cmd("WAIT")
                    .arg(shared.wait_replicas)
                    .arg(wait.as_millis().max(1) as u64);
                pipe.query_async::<(Value, i64)>(con)
                    .await
                    .map(|(v, acked)| (v, acked >= i64::from(shared.wait_replicas)))
            }
        };
        match result {
            Err(e)
                if !loaded
                    && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                shared.script.load_async(con).await?;
                loaded = true;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_come_back_as_pushed() {
        let mut args = Args::with_capacity(4, 8);
        args.push("ab");
        args.push("");
        args.push(-42i64);
        args.push_with(|out| out.extend_from_slice(b"x,y"));
        let all: Vec<&[u8]> = args.iter().collect();
        assert_eq!(all, [&b"ab"[..], b"", b"-42", b"x,y"]);
    }
}
