//! Writing events to the outbox, inside the caller's transaction.
//!
//! Every event has a `dedupe_key` naming what caused it: the ledger event
//! (`ledger:<event id>`) or, for the thresholds, the account and period
//! (`credits.low:<user>:<period>`). Inserting under it with `ON CONFLICT
//! DO NOTHING` is what makes production exactly-once whatever the flusher
//! replays, and once per period however many charges cross the line.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::sync::watch;

use super::{EventType, Webhooks};
use crate::ledger::event::LedgerEvent;

/// An event to produce.
pub struct NewEvent {
    pub kind: EventType,
    pub dedupe_key: String,
    pub user_id: String,
    pub at: DateTime<Utc>,
    /// `data` of the body; holds `user_id` first.
    pub data: Value,
}

impl NewEvent {
    fn body(&self) -> String {
        json!({
            "type": self.kind.as_str(),
            "timestamp": self.at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "data": self.data,
        })
        .to_string()
    }
}

/// The production side of the webhooks, shared by the API and the
/// flushers of one process.
pub struct Outbox {
    hooks: Arc<Webhooks>,
    /// Bumped after a commit that produced events: this process's
    /// deliverer sends them at once instead of at its next poll.
    produced: watch::Sender<u64>,
    /// Threshold keys known to be in the outbox already: an account that
    /// stays low would otherwise cost every batch a lookup.
    known: Mutex<HashSet<String>>,
}

/// Bounds [`Outbox::known`]; forgetting only costs a lookup.
const KNOWN_MAX: usize = 100_000;

/// `credits.low` fires once an account has used at least 80 % of what the
/// period gave it (allowance and bonus): `used >= 4 × remaining`.
const LOW_RATIO: i64 = 4;

impl Outbox {
    pub fn new(hooks: Arc<Webhooks>) -> Arc<Self> {
        Arc::new(Self {
            hooks,
            produced: watch::channel(0).0,
            known: Mutex::new(HashSet::new()),
        })
    }

    pub fn hooks(&self) -> &Arc<Webhooks> {
        &self.hooks
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.produced.subscribe()
    }

    /// Wakes this process's deliverer; call after the commit.
    pub fn committed(&self) {
        self.produced.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Inserts the events some endpoint wants, with one delivery row per
    /// subscribed endpoint; events already produced are skipped. Returns
    /// how many were new.
    pub async fn emit(
        &self,
        tx: &mut PgConnection,
        events: &[NewEvent],
    ) -> Result<u64, sqlx::Error> {
        let wanted: Vec<&NewEvent> = events
            .iter()
            .filter(|e| self.hooks.wanted(e.kind))
            .collect();
        if wanted.is_empty() {
            return Ok(0);
        }
        let mut subscriptions: (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        for endpoint in &self.hooks.endpoints {
            for kind in &endpoint.events {
                subscriptions.0.push(kind.as_str());
                subscriptions.1.push(endpoint.url.as_str());
            }
        }
        let ids: Vec<String> = wanted
            .iter()
            .map(|_| format!("msg_{}", uuid::Uuid::now_v7().simple()))
            .collect();
        let inserted: i64 = sqlx::query_scalar(
            "WITH ev AS (
                INSERT INTO webhook_events (id, dedupe_key, type, user_id, body)
                SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                ON CONFLICT (dedupe_key) DO NOTHING
                RETURNING id, type
             ), deliveries AS (
                INSERT INTO webhook_deliveries (event_id, endpoint)
                SELECT ev.id, s.endpoint
                FROM ev JOIN UNNEST($6::text[], $7::text[]) AS s (type, endpoint) USING (type)
             )
             SELECT count(*) FROM ev",
        )
        .bind(&ids)
        .bind(
            wanted
                .iter()
                .map(|e| e.dedupe_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(wanted.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
        .bind(
            wanted
                .iter()
                .map(|e| e.user_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(wanted.iter().map(|e| e.body()).collect::<Vec<_>>())
        .bind(&subscriptions.0)
        .bind(&subscriptions.1)
        .fetch_one(&mut *tx)
        .await?;
        Ok(inserted as u64)
    }

    /// The events a ledger batch causes: `credits.granted` per grant, and
    /// `credits.low` / `credits.exhausted` for accounts whose charges
    /// crossed the line. Runs in the batch's transaction, after its
    /// roll-ups (the period's use is read from `usage_monthly`). Returns
    /// the threshold keys to pass to [`Outbox::remember`] once committed.
    pub async fn from_ledger(
        &self,
        tx: &mut PgConnection,
        events: &[LedgerEvent<'_>],
    ) -> Result<Vec<String>, sqlx::Error> {
        let mut out = Vec::new();
        if self.hooks.wanted(EventType::CreditsGranted) {
            for e in events.iter().filter(|e| e.kind == "grant") {
                out.push(NewEvent {
                    kind: EventType::CreditsGranted,
                    dedupe_key: format!("ledger:{}", e.event_id),
                    user_id: e.user_id.to_string(),
                    at: e.occurred_at,
                    data: json!({
                        "user_id": e.user_id,
                        "credits": e.amount,
                        "bonus": e.bonus_after,
                        "reason": e.reason,
                        "actor": e.actor,
                        "ledger_event_id": e.event_id,
                    }),
                });
            }
        }
        let low = self.hooks.wanted(EventType::CreditsLow);
        let exhausted = self.hooks.wanted(EventType::CreditsExhausted);
        let mut remember = Vec::new();
        if low || exhausted {
            let lows = self.lows(events);
            let (mut users, mut months) = (Vec::new(), Vec::new());
            for ((user, period), l) in &lows {
                if exhausted && l.remaining <= 0 {
                    let key = format!("{}:{user}:{period}", EventType::CreditsExhausted.as_str());
                    if !self.is_known(&key) {
                        out.push(l.event(
                            EventType::CreditsExhausted,
                            key.clone(),
                            user,
                            period,
                            None,
                        ));
                        remember.push(key);
                    }
                }
                if low && !self.is_known(&low_key(user, period)) {
                    users.push(*user);
                    months.push(l.month);
                }
            }
            let by_month: std::collections::HashMap<(&str, NaiveDate), (&str, &Low)> = lows
                .iter()
                .map(|((user, period), l)| ((*user, l.month), (*period, l)))
                .collect();
            if !users.is_empty() {
                let used: Vec<(String, NaiveDate, i64)> = sqlx::query_as(
                    "SELECT user_id, month, charged_credits - refunded_credits
                     FROM usage_monthly
                     WHERE (user_id, month) IN (SELECT * FROM UNNEST($1::text[], $2::date[]))",
                )
                .bind(&users)
                .bind(&months)
                .fetch_all(&mut *tx)
                .await?;
                for (user, month, used) in used {
                    let Some(&(period, l)) = by_month.get(&(user.as_str(), month)) else {
                        continue;
                    };
                    if used >= LOW_RATIO * l.remaining.max(0) && used > 0 {
                        let key = low_key(&user, period);
                        out.push(l.event(
                            EventType::CreditsLow,
                            key.clone(),
                            &user,
                            period,
                            Some(used),
                        ));
                        remember.push(key);
                    }
                }
            }
        }
        self.emit(tx, &out).await?;
        Ok(remember)
    }

    /// Per account and period, the lowest balance this batch's charges
    /// left, and the charge that left it.
    fn lows<'e>(&self, events: &'e [LedgerEvent<'_>]) -> BTreeMap<(&'e str, &'e str), Low> {
        let mut lows: BTreeMap<(&str, &str), Low> = BTreeMap::new();
        // A lease moves the balance as its calls would: the credits are held.
        // The calls spent from it carry no balance.
        for e in events
            .iter()
            .filter(|e| e.kind == "charge" || e.kind == "lease")
        {
            let (Some(monthly_after), Some(bonus_after)) = (e.monthly_after, e.bonus_after) else {
                continue;
            };
            let remaining = monthly_after + bonus_after;
            let entry = lows
                .entry((e.user_id.as_ref(), e.account_period.as_ref()))
                .or_insert_with(|| Low {
                    remaining: i64::MAX,
                    monthly: 0,
                    bonus: 0,
                    plan: None,
                    at: e.occurred_at,
                    month: e.local_day.with_day(1).unwrap_or(e.local_day),
                });
            if remaining < entry.remaining {
                *entry = Low {
                    remaining,
                    monthly: monthly_after,
                    bonus: bonus_after,
                    plan: e.plan.as_deref().map(str::to_owned),
                    at: e.occurred_at,
                    month: e.local_day.with_day(1).unwrap_or(e.local_day),
                };
            }
        }
        lows
    }

    fn is_known(&self, key: &str) -> bool {
        self.known.lock().map(|k| k.contains(key)).unwrap_or(false)
    }

    /// Threshold keys now in the outbox (after the commit that wrote them).
    pub fn remember(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        if let Ok(mut known) = self.known.lock() {
            if known.len() + keys.len() > KNOWN_MAX {
                known.clear();
            }
            known.extend(keys);
        }
    }
}

fn low_key(user: &str, period: &str) -> String {
    format!("{}:{user}:{period}", EventType::CreditsLow.as_str())
}

struct Low {
    remaining: i64,
    monthly: i64,
    bonus: i64,
    plan: Option<String>,
    at: DateTime<Utc>,
    month: NaiveDate,
}

impl Low {
    fn event(
        &self,
        kind: EventType,
        dedupe_key: String,
        user: &str,
        period: &str,
        used: Option<i64>,
    ) -> NewEvent {
        let mut data = json!({
            "user_id": user,
            "plan": self.plan,
            "period": period,
            "remaining": self.remaining,
            "monthly": self.monthly,
            "bonus": self.bonus,
        });
        if let Some(used) = used {
            data["used"] = json!(used);
        }
        NewEvent {
            kind,
            dedupe_key,
            user_id: user.to_owned(),
            at: self.at,
            data,
        }
    }
}

impl crate::ledger::BatchHook for Outbox {
    fn active(&self) -> bool {
        !self.hooks.is_empty()
    }

    fn in_batch<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [LedgerEvent<'a>],
    ) -> futures_util::future::BoxFuture<'a, Result<Vec<String>, sqlx::Error>> {
        Box::pin(self.from_ledger(tx, events))
    }

    fn committed(&self, keys: Vec<String>) {
        self.remember(keys);
        Outbox::committed(self);
    }
}
