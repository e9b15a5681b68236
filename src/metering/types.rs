//! What the scripts take and answer, as Rust types.

use super::*;

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
    /// A charge went to Redis and its answer never came (`cause`): Redis
    /// may have made it. The caller answers as for `cause` ("nothing was
    /// charged") and hands `charge` to [`crate::billing`], which gives it
    /// back if it was made.
    #[error("{cause} (the charge may have run)")]
    Unanswered {
        charge: Box<Unanswered>,
        cause: Box<MeterError>,
    },
}

/// A charge sent to Redis whose answer was lost: what it takes to find out
/// whether Redis made it, and to give it back if so.
#[derive(Clone, Debug)]
pub struct Unanswered {
    pub user: UserId,
    /// The charge's event id, as its stream row and ledger row carry it.
    pub event_id: String,
    /// Its deadline on Redis's clock, unix ms: charge.lua makes no charge
    /// past it, so once Redis's clock is there, what Redis holds is final.
    /// 0: no deadline went with it (the clocks had not been compared,
    /// which the meter avoids by comparing them before its first charge).
    pub redis_deadline: i64,
    /// The caller's budget: the charge was sent no earlier than this much
    /// before its deadline.
    pub budget_ms: i64,
    pub request_id: RequestId,
    pub module: ModuleId,
    pub action: Option<ActionId>,
    pub stamp: Stamp,
    pub record: UnansweredRecord,
}

/// Where an unanswered charge keeps its split, if anywhere.
#[derive(Clone, Debug)]
pub enum UnansweredRecord {
    /// None: its row in the usage stream (or, once flushed, the ledger)
    /// is the only trace.
    None,
    /// The credits API's request record.
    Request,
    /// The proxy's `Idempotency-Key` record.
    Key(IdempotencyKey),
}

/// What became of an unanswered charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoidOutcome {
    /// Redis had made it; it is given back.
    Refunded { amount: i64 },
    /// Redis never made it (or it was already given back).
    NotCharged,
    /// Made, and its caller has since been told so (a repeat answered
    /// "duplicate"): it stands.
    Told,
    /// Redis's clock is not past the charge's deadline yet: ask again in
    /// this many ms.
    Early(u64),
    /// The account is not in Redis: rebuild it, then ask again.
    Missing,
}

/// An account's balance right after a script ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balance {
    pub monthly: Credits,
    pub bonus: Credits,
    pub day_used: Credits,
    /// `None`: the plan has no daily limit.
    pub daily_limit: Option<Credits>,
}

impl Balance {
    /// Monthly plus bonus credits. A plain number: the sum of two amounts
    /// may pass [`Credits::MAX`].
    pub fn remaining(&self) -> i64 {
        self.monthly.get() + self.bonus.get()
    }

    pub fn daily_remaining(&self) -> Option<i64> {
        self.daily_limit
            .map(|l| (l.get() - self.day_used.get()).max(0))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The charge event's id (owner of an idempotency record).
    pub event_id: String,
    /// The account's plan, as Redis holds it (forwarded as `X-Plan`).
    pub plan: PlanId,
    /// This charge emptied the account and the auto-block policy blocked it.
    pub auto_blocked: bool,
    pub charged: i64,
    pub from_monthly: i64,
    pub from_bonus: i64,
    /// After the charge; in check mode, the account as it is (nothing
    /// was charged).
    pub balance: Balance,
    /// Where the plan's rate limit stands after this call; `None` when the
    /// plan has none.
    pub rate: Option<RateState>,
    /// The lease this call took ([`Mode::Lease`]), or was spent from.
    pub lease: Option<LeaseUse>,
    /// The day and period the charge counted in, when the account was
    /// already past its stamp's (a call decided after a later one, or a
    /// clock behind): a refund gives back to those. `None`: the stamp's.
    pub counted_in: Option<Box<(LocalDay, Period)>>,
}

impl Receipt {
    /// The day and period a refund of this charge gives back to.
    pub fn counted_in<'a>(&'a self, stamp: &'a Stamp) -> (&'a LocalDay, &'a Period) {
        match &self.counted_in {
            Some(c) => (&c.0, &c.1),
            None => (&stamp.day, &stamp.period),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseUse {
    /// Charged in Redis, which also granted this lease.
    Took(LeaseTaken),
    /// Spent from this lease, without Redis (`crate::leases`).
    SpentFrom(std::sync::Arc<str>),
}

/// A lease charge.lua granted with a charge: its credits, taken from the
/// monthly allowance first, then bonus. Its id is the charge's event id
/// followed by `:lease`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTaken {
    pub id: String,
    pub credits: i64,
    pub from_monthly: i64,
    pub from_bonus: i64,
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
        plan: PlanId,
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
        plan: PlanId,
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
    /// Charge, and take the largest lease of at most `credits`, and not
    /// under `least`, that leaves the account `room` times its size of its
    /// balance and of its daily limit (docs/LEASES.md). Ignored for
    /// idempotent charges and rate-limited plans.
    Lease {
        credits: i64,
        least: i64,
        room: i64,
        ttl_ms: u64,
        /// The charge's event id, chosen by the caller: the lease's id is
        /// `<event>:lease`, known (and written down) before Redis grants it.
        event: uuid::Uuid,
    },
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

/// The account as its owner should see it at an instant: a new day or
/// period that no call has started yet is shown as started (what the next
/// call will find). The one place this rule is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccountView {
    pub monthly: i64,
    pub bonus: i64,
    pub day_used: i64,
    /// Blocked by the auto-block policy and still without credits.
    pub auto_blocked: bool,
}

impl AccountView {
    pub fn remaining(&self) -> i64 {
        self.monthly + self.bonus
    }
}

impl AccountState {
    /// The view at `now`, under `plan` (the account's plan, if configured:
    /// a new period starts with its allowance).
    pub fn as_of(&self, plan: Option<&crate::catalog::Plan>, now: &Stamp) -> AccountView {
        let monthly = if self.period == now.period {
            self.monthly
        } else {
            plan.map_or(0, |p| p.monthly_credits.get())
        };
        AccountView {
            monthly,
            bonus: self.bonus,
            day_used: if self.day == now.day {
                self.day_used
            } else {
                0
            },
            auto_blocked: self.exhausted && monthly + self.bonus <= 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_seen_as_the_next_call_will_find_it() {
        let calendar = Calendar::new(chrono_tz::Africa::Algiers);
        let at = |s: &str| {
            calendar.at(chrono::DateTime::parse_from_rfc3339(s)
                .expect("instant")
                .with_timezone(&chrono::Utc))
        };
        let account = AccountState {
            plan: "free".into(),
            monthly: 0,
            bonus: 0,
            period: "2026-11".into(),
            day: "2026-11-26".into(),
            day_used: 7,
            blocked: false,
            exhausted: true,
        };
        // The same day: as stored, and still auto-blocked (nothing left).
        let same = account.as_of(None, &at("2026-11-26T12:00:00Z"));
        assert_eq!(
            (same.monthly, same.day_used, same.auto_blocked),
            (0, 7, true)
        );
        // 23:30 UTC is already the 27th in Algiers: the day counter is new.
        let next_day = account.as_of(None, &at("2026-11-26T23:30:00Z"));
        assert_eq!(next_day.day_used, 0);
        // A bonus keeps it unblocked; a new period without a configured
        // plan starts at 0 monthly credits.
        let with_bonus = AccountState {
            bonus: 5,
            ..account.clone()
        };
        let december = with_bonus.as_of(None, &at("2026-12-01T08:00:00Z"));
        assert_eq!(
            december,
            AccountView {
                monthly: 0,
                bonus: 5,
                day_used: 0,
                auto_blocked: false
            }
        );
        assert_eq!(december.remaining(), 5);
    }
}
