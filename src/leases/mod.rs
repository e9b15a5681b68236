//! Credit leases, the gateway side (docs/LEASES.md).
//!
//! Owns one worker's open leases: when a hot account's charge asks for one,
//! spending a call from one (no Redis: one line copied into the spend log),
//! giving a failed call back to its lease, and closing leases. A lease is
//! closed when it ends (`metering.leases.ttl_ms` after it was taken, or
//! when spent), by `settle` in lease.lua with what was spent; leases whose
//! gateway died are settled from its spend log by the next gateway to start
//! on the same disk, or closed as lost by any gateway's sweep once they are
//! `lost_after_secs` past their end.
//!
//! What keeps the guarantees (each tested in `tests/it/leases.rs`):
//! - limits: a lease's credits leave the balance and the day counter before
//!   its first call, and none is granted near a limit (`room`);
//! - revocations, blocks, plan changes: a lease is spent for at most
//!   `ttl_ms` (≤ 900 ms), then the next call goes to Redis, which refuses;
//! - exactly once: each leased call is one spend-log line, written before
//!   the call is forwarded, and one ledger row (its event id) from there;
//!   its lease is settled only once every call of it is in the ledger.

pub mod log;
pub mod tail;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::catalog::Module;
use crate::config::LeaseSettings;
use crate::domain::{ActionId, Credits, KeyHash, ModuleId, PlanId, RequestId, UserId};
use crate::metering::{Balance, LeaseClosed, LeaseUse, Meter, Mode, Receipt, Stamp};
use crate::telemetry::metrics;
use log::{Files, SpendLog};
use tail::{Progress, Tailer};

/// How often the spend log is read into the ledger.
const WRITE_EVERY: Duration = Duration::from_millis(100);

pub struct Leases {
    settings: LeaseSettings,
    meter: Meter,
    pool: sqlx::PgPool,
    /// For the reader's own pool.
    database: crate::config::DatabaseSettings,
    /// The process's spend log, shared with its other workers.
    shared: Arc<SharedLog>,
    /// This worker's place among the log's open workers: given up once its
    /// leases are closed (or if it never runs), so the log's one writer
    /// knows when every line is in and it may stop.
    slot: Mutex<Option<WorkerSlot>>,
    state: Mutex<State>,
}

/// A process's spend log: one for all its workers, so that one writer
/// puts the calls into the ledger in the order they were made. With a log
/// (and a writer) per worker, two writers' batches covered the same
/// hundred milliseconds, and the second one's rows went between the
/// first's in the ledger's primary key: half-empty index pages (66 % full
/// against 90 %, `pgstatindex`) and about 0.8 µs more of Postgres a call
/// (docs/BENCHMARKS.md). A line is copied into the shared map under its
/// lock, a copy of a couple of hundred bytes.
pub struct SharedLog {
    files: Files,
    log: SpendLog,
    /// Held while this process lives: its files are not a dead worker's.
    _lock: std::fs::File,
    /// How far the ledger has this log (see `tail::Tailer`).
    ledger_has: Arc<std::sync::atomic::AtomicU64>,
    /// Workers whose leases are not all closed yet.
    open: tokio::sync::watch::Sender<usize>,
    /// Whether a worker runs the log's writer already.
    writer_claimed: std::sync::atomic::AtomicBool,
}

impl SharedLog {
    /// Opens a new spend log in `settings.dir`, under a new instance id.
    pub fn open(settings: &LeaseSettings) -> std::io::Result<Arc<Self>> {
        let files = Files {
            dir: settings.dir.clone(),
            instance: uuid::Uuid::now_v7().simple().to_string(),
        };
        let (log, lock) = SpendLog::start(&files, settings.segment_bytes)?;
        Ok(Arc::new(Self {
            files,
            log,
            _lock: lock,
            ledger_has: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            open: tokio::sync::watch::Sender::new(0),
            writer_claimed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn join(self: &Arc<Self>) -> WorkerSlot {
        self.open.send_modify(|n| *n += 1);
        WorkerSlot(Arc::clone(self))
    }
}

/// One worker counted among a [`SharedLog`]'s open ones while it lives.
struct WorkerSlot(Arc<SharedLog>);

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        self.0.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The state's maps hash with foldhash, not SipHash: a user's leases are
/// looked up on every call spent (bench/gateway_instructions.sh), and only
/// authenticated accounts get in.
type Fold = foldhash::quality::RandomState;

#[derive(Default)]
struct State {
    /// Per user, the leases held for (key, module) that may still be
    /// spent: one, or two while the next one is taken.
    open: HashMap<UserId, Vec<Held>, Fold>,
    /// Ended leases whose last calls' lines are still being written.
    retiring: Vec<(UserId, Lease)>,
    /// Per (user, module), the charges of the current second.
    heat: HashMap<(String, String), Heat, Fold>,
    /// Ended leases waiting for their settle (or retrying it).
    closing: Vec<Closing>,
    /// Counts access changes ([`Leases::end_user`]); each user's last one.
    /// A lease asked for before its account's last change is not used:
    /// Redis may have granted it before it had the change.
    generation: u64,
    changed: HashMap<UserId, u64, Fold>,
}

struct Held {
    key: Option<KeyHash>,
    module: ModuleId,
    lease: Lease,
}

struct Lease {
    id: Arc<str>,
    plan: PlanId,
    credits: i64,
    from_monthly: i64,
    spent: i64,
    /// Where its last call's line ends in the log: the lease is settled
    /// only once the ledger has the log up to there, so a lease returned
    /// is a lease whose every call is in the ledger (a lost machine's
    /// leases are then closed as lost, never returned short).
    last: log::Position,
    ends: Instant,
    day: String,
    period: String,
    /// The balance Redis answered, after the lease was taken from it.
    balance: Balance,
    /// Spent (a call did not fit), or its log failed: no more calls.
    ended: bool,
    /// Half spent, and a call went to Redis to take the next lease, so
    /// that the others do not all find this one empty at once.
    refilling: bool,
}

impl Lease {
    fn usable(&self, now: Instant, stamp: &Stamp, cost: i64) -> bool {
        !self.ended
            && now < self.ends
            && self.credits - self.spent >= cost
            && self.day == stamp.day.as_str()
            && self.period == stamp.period.as_str()
    }

    /// The account's balance as callers should see it.
    fn view(&self) -> Balance {
        holding(&self.balance, self.credits, self.from_monthly, self.spent)
    }
}

impl State {
    /// The charge asking for (user, module)'s lease has its answer; `took`:
    /// the second it took one.
    fn done_asking(&mut self, user: &UserId, module: &Module, took: Option<u64>) {
        let key = (user.as_str().to_owned(), module.id.as_str().to_owned());
        if let Some(heat) = self.heat.get_mut(&key) {
            heat.asking = false;
            if let Some(second) = took {
                heat.leased = second;
            }
        }
    }
}

#[derive(Default)]
struct Heat {
    second: u64,
    calls: u32,
    /// The second its last lease was taken: an account served from leases
    /// makes few charges in Redis, and stays hot while it has them.
    leased: u64,
    /// A charge asking for a lease is in Redis: the others don't ask too.
    asking: bool,
}

/// What became of a charge that asked for a lease ([`Leases::asked`]).
pub enum Asked<'a> {
    /// Redis answered: charged (with or without the lease), or refused
    /// (`None`, nothing granted).
    Answered(Option<&'a Receipt>),
    /// No answer (a timeout, a broken connection, never sent): Redis may
    /// or may not have granted it.
    Unknown,
}

/// Redis's `balance` (after the lease left it) plus what a lease of
/// `credits` (`from_monthly` of them from the allowance) still holds once
/// `spent` of it is spent, the monthly part first, as settling counts it.
fn holding(balance: &Balance, credits: i64, from_monthly: i64, spent: i64) -> Balance {
    let spent_monthly = spent.clamp(0, from_monthly);
    let left_bonus = (credits - from_monthly) - (spent - spent_monthly);
    Balance {
        monthly: Credits::recorded(balance.monthly.get() + from_monthly - spent_monthly),
        bonus: Credits::recorded(balance.bonus.get() + left_bonus),
        day_used: Credits::recorded(balance.day_used.get() - (credits - spent)),
        daily_limit: balance.daily_limit,
    }
}

fn unix_second() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A charge's request for a lease ([`Leases::ask`]).
pub struct Ask {
    pub mode: Mode,
    id: Arc<str>,
    generation: u64,
}

struct Closing {
    user: UserId,
    id: Arc<str>,
    spent: i64,
}

impl Leases {
    /// A worker's leases on its process's [`SharedLog`] (thread-per-core:
    /// every worker on one log). The tasks that close leases and write the
    /// log to the ledger are [`Leases::run`]: one worker's, the first to
    /// run, writes the log until every worker's leases are closed.
    pub fn start_on(
        shared: Arc<SharedLog>,
        settings: LeaseSettings,
        meter: Meter,
        pool: sqlx::PgPool,
        database: crate::config::DatabaseSettings,
    ) -> Arc<Self> {
        let slot = shared.join();
        Arc::new(Self {
            settings,
            meter,
            pool,
            database,
            shared,
            slot: Mutex::new(Some(slot)),
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves plain data behind: go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spends one call from a lease this worker holds for (user, key,
    /// module), if one fits: its receipt, after its spend-log line is
    /// written. `None`: charge it in Redis.
    pub fn spend(
        &self,
        user: &UserId,
        key: Option<&KeyHash>,
        module: &Module,
        action: Option<&ActionId>,
        request_id: &RequestId,
        stamp: &Stamp,
    ) -> Option<Receipt> {
        let cost = module.cost_of(action).get();
        let now = Instant::now();
        // The line is written under the state's lock: the lease counts the
        // call exactly when the log has it (the closer never sees one
        // counted and not written), and the map's copy is short.
        let receipt = {
            let mut state = self.state();
            let State { open, retiring, .. } = &mut *state;
            let held = open.get_mut(user.as_str())?;
            let mut usable = None;
            let mut i = 0;
            while i < held.len() {
                let h = &held[i];
                if h.key.as_ref() == key && h.module == module.id {
                    if h.lease.usable(now, stamp, cost) {
                        usable = Some(i);
                        break;
                    }
                    if h.lease.credits - h.lease.spent < cost {
                        // Spent: out of the way of the next calls; settled
                        // once its last lines are written.
                        retiring.push((user.clone(), held.remove(i).lease));
                        continue;
                    }
                }
                i += 1;
            }
            let usable = usable.map(|i| &mut held[i]);
            let lease = &mut usable?.lease;
            if !lease.refilling && (lease.credits - lease.spent - cost) * 2 < lease.credits {
                // This call goes to Redis and asks for the next lease.
                lease.refilling = true;
                return None;
            }
            let from_monthly = (lease.from_monthly - lease.spent).clamp(0, cost);
            let event_id = crate::domain::uuid_v7_text(crate::domain::uuid_v7_at(stamp.now_ms()));
            let line = log::spend_line(&log::Spend {
                event_id: &event_id,
                lease: &lease.id,
                user,
                kind: "charge",
                module: &module.id,
                action,
                amount: cost,
                from_monthly,
                from_bonus: cost - from_monthly,
                plan: &lease.plan,
                request_id,
                actor: "proxy",
                at_ms: stamp.now_ms(),
                day: stamp.day.as_str(),
            });
            let written = self.shared.log.write(&line);
            metrics::lease_call(written.is_some());
            let Some(at) = written else {
                // No log, no leased calls: the next ones go to Redis.
                lease.ended = true;
                return None;
            };
            lease.spent += cost;
            lease.last = lease.last.max(at);
            Receipt {
                event_id,
                plan: lease.plan.clone(),
                auto_blocked: false,
                charged: cost,
                from_monthly,
                from_bonus: cost - from_monthly,
                balance: lease.view(),
                rate: None,
                lease: Some(LeaseUse::SpentFrom(Arc::clone(&lease.id))),
                counted_in: None,
            }
        };
        Some(receipt)
    }

    /// `f` on lease `id` of `user`, open or retiring (the same `Arc`: a
    /// pointer compare, not a string one, as this runs for every call).
    fn with_lease<T>(
        &self,
        user: &UserId,
        id: &Arc<str>,
        f: impl FnOnce(&mut Lease) -> T,
    ) -> Option<T> {
        let mut state = self.state();
        let State { open, retiring, .. } = &mut *state;
        let open = open
            .get_mut(user.as_str())
            .and_then(|held| held.iter_mut().find(|h| Arc::ptr_eq(&h.lease.id, id)))
            .map(|h| &mut h.lease);
        let lease = match open {
            Some(lease) => lease,
            None => retiring
                .iter_mut()
                .find(|(_, l)| Arc::ptr_eq(&l.id, id))
                .map(|(_, l)| l)?,
        };
        Some(f(lease))
    }

    /// Counts a charge going to Redis, and says whether it should ask for
    /// a lease: the account made `after_calls` charges of this module in
    /// this second here, holds no usable lease for them, and no other
    /// charge is asking already. Every `Some` must be followed by
    /// [`Leases::asked`].
    pub fn ask(
        &self,
        user: &UserId,
        key: Option<&KeyHash>,
        module: &Module,
        stamp: &Stamp,
        cost: Credits,
    ) -> Option<Ask> {
        let cost = cost.get();
        if cost <= 0 {
            return None;
        }
        let second = unix_second();
        let now = Instant::now();
        let mut state = self.state();
        let held = state.open.get(user.as_str()).map_or(&[][..], Vec::as_slice);
        let mut theirs = held
            .iter()
            .filter(|h| h.key.as_ref() == key && h.module == module.id);
        let holding = theirs
            .clone()
            .any(|h| !h.lease.refilling && h.lease.usable(now, stamp, cost));
        let calls = self.next_size(theirs.next_back().map(|h| &h.lease), now, cost);
        let generation = state.generation;
        let heat = state
            .heat
            .entry((user.as_str().to_owned(), module.id.as_str().to_owned()))
            .or_default();
        if heat.second != second {
            heat.second = second;
            heat.calls = 0;
        }
        heat.calls += 1;
        let hot = heat.calls >= self.settings.after_calls || heat.leased + 1 >= second;
        if holding || heat.asking || !hot {
            return None;
        }
        heat.asking = true;
        let event = crate::domain::uuid_v7();
        Some(Ask {
            mode: Mode::Lease {
                credits: cost.saturating_mul(calls),
                least: cost.saturating_mul(self.settings.calls),
                room: self.settings.room,
                ttl_ms: self.settings.ttl_ms,
                event,
            },
            id: Arc::from(crate::domain::uuid_v7_text(event) + ":lease"),
            generation,
        })
    }

    /// How many calls the next lease should hold: what the account spent
    /// from its `last` lease here, at that rate, over a whole `ttl_ms`,
    /// between `calls` and `max_calls`. A lease that lives its whole life
    /// means one lease (two ledger events and a settle) per account and
    /// worker every `ttl_ms`, whatever the rate; the smallest one that
    /// does keeps the least credits away from the account's other
    /// gateways. No earlier lease: `calls`.
    fn next_size(&self, last: Option<&Lease>, now: Instant, cost: i64) -> i64 {
        let (least, most) = (self.settings.calls, self.settings.max_calls);
        let Some(last) = last else {
            return least;
        };
        let ttl = self.settings.ttl_ms as i64;
        let left = last.ends.saturating_duration_since(now).as_millis() as i64;
        let age_ms = (ttl - left).max(1);
        let calls = last.spent / cost;
        (calls.saturating_mul(ttl) / age_ms).clamp(least, most.max(least))
    }

    /// Writes the lease `ask` may get into the spend log before Redis is
    /// asked: a gateway killed between Redis granting it and its first
    /// call still has it on disk, and the next start settles it. False:
    /// the log cannot be written, charge without asking.
    pub fn announce(&self, user: &UserId, ask: &Ask) -> bool {
        self.shared
            .log
            .write(&log::lease_line(&ask.id, user.as_str()))
            .is_some()
    }

    /// The answer to a charge that asked for a lease: holds the lease it
    /// took, if any. A lease Redis did not grant is crossed out in the log;
    /// one granted before an access change of its account is given back.
    pub fn asked(
        &self,
        user: &UserId,
        key: Option<&KeyHash>,
        module: &Module,
        ask: Ask,
        answer: Asked<'_>,
        stamp: &Stamp,
    ) {
        let receipt = match answer {
            Asked::Answered(receipt) => receipt,
            Asked::Unknown => {
                // Redis may have run the charge and lost only its answer:
                // settling finds the lease if it was granted, or nothing.
                let mut state = self.state();
                state.done_asking(user, module, None);
                state.closing.push(Closing {
                    user: user.clone(),
                    id: ask.id,
                    spent: 0,
                });
                return;
            }
        };
        let granted = receipt.and_then(|r| match &r.lease {
            Some(LeaseUse::Took(taken)) if *taken.id == *ask.id => Some((taken, r)),
            _ => None,
        });
        let mut state = self.state();
        state.done_asking(user, module, granted.is_some().then(unix_second));
        let Some((taken, receipt)) = granted else {
            drop(state);
            self.cross_out(&ask.id);
            return;
        };
        // An account already past our stamp's day or period took the
        // lease in its own: calls spent from it here would count in ours.
        // Rare (a clock behind, a call decided after a later one): give
        // it back whole.
        if receipt.counted_in.is_some()
            || state
                .changed
                .get(user.as_str())
                .is_some_and(|&g| g > ask.generation)
        {
            state.closing.push(Closing {
                user: user.clone(),
                id: ask.id,
                spent: 0,
            });
            return;
        }
        let lease = Lease {
            id: ask.id,
            plan: receipt.plan.clone(),
            credits: taken.credits,
            from_monthly: taken.from_monthly,
            spent: 0,
            last: 0,
            ends: Instant::now() + Duration::from_millis(self.settings.ttl_ms),
            day: stamp.day.as_str().to_owned(),
            period: stamp.period.as_str().to_owned(),
            balance: receipt.balance,
            ended: false,
            refilling: false,
        };
        metrics::lease_taken();
        state.open.entry(user.clone()).or_default().push(Held {
            key: key.cloned(),
            module: module.id.clone(),
            lease,
        });
    }

    /// An `X` line for `lease`: the log's reader forgets it. A missing one
    /// (the log could not be written) only makes a restart settle it
    /// again, which finds nothing.
    fn cross_out(&self, lease: &str) {
        let _ = self.shared.log.write(&log::settled_line(lease));
    }

    /// Ends every lease this worker holds for `user`: an access change
    /// (key revoked, block, plan) must bite on the next call here.
    pub fn end_user(&self, user: &UserId) {
        let mut state = self.state();
        state.generation += 1;
        let generation = state.generation;
        state.changed.insert(user.clone(), generation);
        if let Some(held) = state.open.get_mut(user.as_str()) {
            for h in held {
                h.lease.ended = true;
            }
        }
    }

    /// The balance a call taking a lease should report: Redis's, plus the
    /// lease it just took.
    pub fn view_of(receipt: &Receipt) -> Balance {
        match &receipt.lease {
            Some(LeaseUse::Took(t)) => holding(&receipt.balance, t.credits, t.from_monthly, 0),
            _ => receipt.balance,
        }
    }

    /// Gives a call spent from `lease` back to it (its upstream failed).
    /// False when the lease is closed already: refund it in Redis then.
    #[allow(clippy::too_many_arguments)]
    pub fn give_back(
        &self,
        user: &UserId,
        lease: &Arc<str>,
        receipt: &Receipt,
        module: &Module,
        action: Option<&ActionId>,
        request_id: &RequestId,
        charged_at: &Stamp,
    ) -> bool {
        let amount = receipt.charged;
        // Written under the state's lock, as a spend is.
        self.with_lease(user, lease, |l| {
            let event_id = crate::domain::uuid_v7_text(crate::domain::uuid_v7());
            let line = log::spend_line(&log::Spend {
                event_id: &event_id,
                lease,
                user,
                kind: "refund",
                module: &module.id,
                action,
                amount,
                from_monthly: receipt.from_monthly,
                from_bonus: receipt.from_bonus,
                plan: &receipt.plan,
                request_id,
                actor: "proxy",
                at_ms: charged_at.now_ms(),
                day: charged_at.day.as_str(),
            });
            let Some(at) = self.shared.log.write(&line) else {
                return false;
            };
            l.spent -= amount;
            l.last = l.last.max(at);
            true
        })
        .unwrap_or(false)
    }

    /// Runs this worker's lease tasks until `stopped`: closing ended
    /// leases, writing the spend log to the ledger (the log's one writer,
    /// if no other worker of the log runs it), and (`first`: one worker per
    /// process) sweeping lost leases and settling dead workers' logs. On
    /// stop, every lease is closed and the log written out.
    pub async fn run(
        self: Arc<Self>,
        first: bool,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        // The log's one writer runs beside whichever worker claims it
        // first, until every worker's leases are closed (their slots given
        // up).
        let writer = if !self
            .shared
            .writer_claimed
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            match self.spawn_writer(self.shared.open.subscribe()) {
                Ok(done) => Some(done),
                Err(error) => {
                    tracing::error!(%error, "spend log: cannot start its reader");
                    // Another worker of the log may still start it.
                    self.shared
                        .writer_claimed
                        .store(false, std::sync::atomic::Ordering::Release);
                    return;
                }
            }
        } else {
            None
        };
        let closer = async {
            let mut tick = tokio::time::interval(Duration::from_millis(
                (self.settings.ttl_ms / 4).clamp(5, 50),
            ));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_sweep = Instant::now() - Duration::from_secs(3600);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.wait_for(|s| *s) => break,
                }
                self.close_ended(false).await;
                if first && last_sweep.elapsed() >= Duration::from_secs(5) {
                    last_sweep = Instant::now();
                    self.replay_dead_workers().await;
                    self.sweep_lost().await;
                }
            }
            // Stopping: no request is left (connections drained first).
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                self.close_ended(true).await;
                let left = {
                    let s = self.state();
                    s.closing.len()
                        + s.retiring.len()
                        + s.open.values().map(Vec::len).sum::<usize>()
                };
                if left == 0 || Instant::now() > deadline {
                    if left > 0 {
                        tracing::warn!(
                            leases = left,
                            "leases not settled at stop: the next start settles them from the spend log"
                        );
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // This worker's lines are all in the log: the writer may end
            // once the other workers' are too.
            drop(self.slot.lock().unwrap_or_else(|e| e.into_inner()).take());
        };
        closer.await;
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }

    /// The log into the ledger, on a thread and runtime of its own (as the
    /// flushers): a batch of calls is parsed and bound in one go, which on
    /// a thread that serves requests held up every request queued behind
    /// it; and a slow Postgres never holds up closing leases. A tick's worth
    /// of calls per ledger transaction, not one per write of the log. Ends
    /// once every worker's leases are closed and what the log holds is
    /// written.
    fn spawn_writer(
        &self,
        mut open_workers: tokio::sync::watch::Receiver<usize>,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
        let (done, finished) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (files, keys, ledger_has, published) = (
            self.shared.files.clone(),
            self.meter.keys().clone(),
            Arc::clone(&self.shared.ledger_has),
            self.shared.log.published(),
        );
        let mut database = self.database.clone();
        database.max_connections = 2;
        std::thread::Builder::new()
            .name("creditgate-spend".into())
            .spawn(move || {
                runtime.block_on(async move {
                    // Its own pool: connections belong to the runtime that
                    // drives them.
                    let pool = match crate::accounts::connect_pool(&database) {
                        Ok(pool) => pool,
                        Err(error) => {
                            tracing::error!(%error, "spend log: no Postgres pool");
                            return;
                        }
                    };
                    let mut tailer = match Tailer::new(files, pool, keys) {
                        Ok(t) => t.sharing_progress(ledger_has).following(published),
                        Err(error) => {
                            tracing::error!(%error, "spend log: cannot read it back");
                            return;
                        }
                    };
                    let mut tick = tokio::time::interval(WRITE_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        let go_on = tokio::select! {
                            _ = tick.tick() => true,
                            _ = open_workers.wait_for(|n| *n == 0) => false,
                        };
                        if !go_on {
                            break;
                        }
                        drain(&mut tailer).await;
                    }
                    drain(&mut tailer).await;
                });
                let _ = done.send(());
            })?;
        Ok(finished)
    }

    /// Moves ended leases with no call in flight to closing (every lease,
    /// with `all`), and settles those closing.
    async fn close_ended(&self, all: bool) {
        let now = Instant::now();
        let closing: Vec<Closing> = {
            let mut state = self.state();
            let State {
                open,
                retiring,
                closing,
                ..
            } = &mut *state;
            open.retain(|user, held| {
                let mut i = 0;
                while i < held.len() {
                    let l = &held[i].lease;
                    if all || l.ended || now >= l.ends {
                        retiring.push((user.clone(), held.remove(i).lease));
                        continue;
                    }
                    i += 1;
                }
                !held.is_empty()
            });
            let ledger_has = self
                .shared
                .ledger_has
                .load(std::sync::atomic::Ordering::Acquire);
            retiring.retain(|(user, l)| {
                if l.last > ledger_has {
                    return true;
                }
                closing.push(Closing {
                    user: user.clone(),
                    id: Arc::clone(&l.id),
                    spent: l.spent,
                });
                false
            });
            let closing = std::mem::take(&mut state.closing);
            if state.heat.len() > 4096 {
                let second = unix_second();
                state.heat.retain(|_, h| h.asking || h.second + 1 >= second);
            }
            if state.changed.len() > 4096 {
                // Marks only matter to asks in flight.
                let State { changed, heat, .. } = &mut *state;
                changed.retain(|user, _| {
                    heat.iter()
                        .any(|((u, _), h)| u.as_str() == user.as_str() && h.asking)
                });
            }
            closing
        };
        // Settled together: one Redis round trip's wait for them all.
        let settled = futures_util::future::join_all(
            closing
                .iter()
                .map(|c| self.meter.settle_lease(&c.user, &c.id, c.spent, "proxy")),
        )
        .await;
        let mut retry = Vec::new();
        for (c, result) in closing.into_iter().zip(settled) {
            match result {
                Ok(closed) => {
                    if let LeaseClosed::Lost { .. } | LeaseClosed::Gone = closed {
                        tracing::warn!(lease = %c.id, ?closed, "lease was closed before its settle");
                    }
                    metrics::lease_settled();
                    self.cross_out(&c.id);
                }
                Err(error) => {
                    tracing::warn!(lease = %c.id, %error, "lease settle failed; retrying");
                    retry.push(c);
                }
            }
        }
        if !retry.is_empty() {
            self.state().closing.extend(retry);
        }
    }

    /// Settles the leases of workers that died (their lock file is free),
    /// from their spend logs, then deletes the logs.
    async fn replay_dead_workers(&self) {
        let instances = match Files::instances(&self.shared.files.dir) {
            Ok(i) => i,
            Err(error) => {
                tracing::warn!(%error, "spend log directory unreadable");
                return;
            }
        };
        for instance in instances {
            if instance == self.shared.files.instance {
                continue;
            }
            let files = Files {
                dir: self.shared.files.dir.clone(),
                instance,
            };
            if let Err(error) = self.replay(&files).await {
                tracing::warn!(instance = %files.instance, %error, "dead worker's spend log not replayed yet");
            }
        }
    }

    async fn replay(&self, files: &Files) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(files.lock())?;
        if lock.try_lock().is_err() {
            return Ok(()); // alive
        }
        let mut tailer = Tailer::new(files.clone(), self.pool.clone(), self.meter.keys().clone())?;
        while tailer.step().await? == Progress::Moved {}
        let open: Vec<(String, tail::OpenLease)> = tailer
            .open_leases()
            .iter()
            .map(|(id, o)| (id.clone(), o.clone()))
            .collect();
        for (id, lease) in &open {
            let user = UserId::parse(&lease.user)?;
            let closed = self
                .meter
                .settle_lease(&user, id, lease.spent, "replay")
                .await?;
            tracing::info!(lease = %id, spent = lease.spent, ?closed, "dead worker's lease settled from its spend log");
        }
        tailer.remove_all()?;
        tracing::info!(instance = %files.instance, leases = open.len(), "dead worker's spend log replayed");
        Ok(())
    }

    /// Closes as lost the leases past their end by `lost_after_secs` that
    /// no gateway settled.
    async fn sweep_lost(&self) {
        let grace = Duration::from_secs(self.settings.lost_after_secs);
        let Ok(now) = self.meter.redis_now_ms().await else {
            return;
        };
        let before = now - i64::try_from(grace.as_millis()).unwrap_or(i64::MAX / 2);
        for shard in 0..self.meter.keys().shards() {
            let Ok(ended) = self.meter.ended_leases(shard, before, 100).await else {
                return;
            };
            for (user, lease) in ended {
                match self.meter.close_lost_lease(&user, &lease, grace).await {
                    Ok(LeaseClosed::Lost { held }) => {
                        metrics::lease_lost();
                        tracing::warn!(%user, %lease, held, "lease closed as lost: its gateway never settled it");
                    }
                    Ok(_) => {}
                    Err(error) => tracing::debug!(%error, "lease sweep waits for Redis"),
                }
            }
        }
    }
}

/// Writes what the spend log holds to the ledger (retried next time on
/// failure).
async fn drain(tailer: &mut Tailer) {
    loop {
        match tailer.step().await {
            Ok(Progress::Moved) => {}
            Ok(Progress::AtEnd) => return,
            Err(error) => {
                tracing::warn!(%error, "spend log: ledger write failed; retrying");
                return;
            }
        }
    }
}
