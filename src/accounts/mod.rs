//! Accounts and API keys: Postgres is their home, Redis holds the hot copy
//! that scripts read (see `metering::keys`).
//!
//! This module owns creating users and keys, revoking keys, resolving a
//! presented key to its user (with an in-process cache) and rebuilding an
//! account's Redis state from Postgres when Redis does not have it.

mod cache;
mod changes;
pub mod credentials;
pub mod directory;
mod sync;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use thiserror::Error;
use uuid::Uuid;

use crate::catalog::Catalog;
use crate::config::DatabaseSettings;
use crate::domain::{ApiKey, Credits, IdempotencyKey, KeyHash, ModuleId, PlanId, UserId};
use crate::metering::{AccountSeed, Stamp};
use cache::KeyCache;
pub use changes::Change;
pub use credentials::Credential;

#[derive(Debug, Error)]
pub enum AccountError {
    #[error("database unavailable: {0}")]
    Database(#[from] sqlx::Error),
    #[error("no such user {0}")]
    UnknownUser(UserId),
    #[error("no such plan {0:?}")]
    UnknownPlan(String),
    #[error("no such key {0}")]
    UnknownKey(Uuid),
    #[error("user {0} already exists")]
    UserExists(UserId),
    /// An admin Idempotency-Key first used for a different request.
    #[error("this Idempotency-Key was used for another request")]
    IdempotencyKeyReused,
    /// Too many key lookups already wait for Postgres (a flood of unknown
    /// keys): this one is shed rather than queued.
    #[error("too many API key lookups in progress")]
    LookupsSaturated,
    /// A stored row that our own writes could not have produced.
    #[error("corrupt account row: {0}")]
    Corrupt(String),
    /// A key's name, expiry or scope that cannot be granted.
    #[error("{0}")]
    InvalidKey(String),
    #[error("at most {0} live API keys per user: revoke one first")]
    TooManyKeys(u32),
}

#[derive(Clone, Debug)]
pub struct User {
    pub id: UserId,
    pub name: String,
    pub email: Option<String>,
    pub plan: PlanId,
    pub blocked: bool,
}

/// A key just created: the only moment its secret exists outside the client.
#[derive(Debug)]
pub struct NewKey {
    pub id: Uuid,
    pub key: ApiKey,
}

/// An API key as its owner and the admins see it: never the key itself.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct KeyInfo {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// `None`: every module of the plan.
    pub modules: Option<Vec<String>>,
    /// To the minute at best: recorded in batches, not per request.
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Who a key belongs to, and what limits it.
#[derive(Clone, Debug)]
pub struct KeyOwner {
    pub user: UserId,
    pub expired: bool,
    /// Limited to some modules.
    pub scoped: bool,
}

/// What a new key may do, beyond its account: a name for the owner, an
/// expiry and a module scope, both enforced by charge.lua.
#[derive(Clone, Debug, Default)]
pub struct KeySpec {
    pub name: String,
    pub expires_at: Option<DateTime<Utc>>,
    /// `None`: every module of the plan.
    pub modules: Option<Vec<ModuleId>>,
}

/// A user to create, and who asks.
pub struct NewUser<'a> {
    pub id: Option<UserId>,
    pub name: &'a str,
    pub email: Option<&'a str>,
    pub plan: &'a str,
    /// Audit actor ("admin:ops", "cli").
    pub actor: &'a str,
    /// The admin's Idempotency-Key and the request's fingerprint.
    pub idempotency: Option<(&'a IdempotencyKey, &'a str)>,
}

pub enum Created {
    New(User, NewKey),
    /// The Idempotency-Key's creation happened before: that user and the id
    /// of its first key (the key itself was shown once and is not kept).
    Replayed(User, Uuid),
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Accounts {
    pool: PgPool,
    catalog: Arc<Catalog>,
    cache: Arc<KeyCache>,
    /// Key lookups that may use Postgres at once: half the pool, so a flood
    /// of unknown keys can never take the connections the flusher and the
    /// APIs need. A semaphore, because waiters queue fairly and a waiter
    /// can give up after [`KEY_LOOKUP_WAIT`].
    lookups: Arc<tokio::sync::Semaphore>,
    /// Cache misses being looked up now: a burst of calls with one new key
    /// waits for one query instead of queueing one each for a permit.
    inflight: Arc<std::sync::Mutex<HashMap<KeyHash, Arc<KeyLookup>>>>,
    /// When each key was last used through this process, since the last
    /// [`Accounts::flush_key_uses`]: last use is recorded in batches, never
    /// with a Postgres write per request.
    key_uses: Arc<std::sync::Mutex<HashMap<KeyHash, DateTime<Utc>>>>,
}

type KeyLookup = tokio::sync::OnceCell<Option<UserId>>;

/// How long a key lookup waits for its turn before it is shed (503).
const KEY_LOOKUP_WAIT: Duration = Duration::from_millis(250);

/// Connects lazily, like the meter: the gateway starts while Postgres is
/// down and `/readyz` says so.
pub fn connect_pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    connect_url(settings, &settings.url)
}

/// The pool reports read from: the replica of `database.read_url`, else
/// the primary's own pool.
pub fn connect_reports(
    settings: &DatabaseSettings,
    primary: &PgPool,
) -> Result<PgPool, sqlx::Error> {
    match &settings.read_url {
        Some(url) => connect_url(settings, url),
        None => Ok(primary.clone()),
    }
}

fn connect_url(settings: &DatabaseSettings, url: &str) -> Result<PgPool, sqlx::Error> {
    // JIT off: the gateway's queries are short, and on the one that scans
    // (a day's usage.csv at 50M rows) compiling took 74 ms for nothing
    // (docs/BENCHMARKS.md, the ledger at scale).
    let options = PgConnectOptions::from_str(url)?.options([
        (
            "statement_timeout",
            settings.statement_timeout_ms.to_string(),
        ),
        ("jit", "off".to_owned()),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .connect_lazy_with(options))
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Accounts {
    pub fn new(pool: PgPool, catalog: Arc<Catalog>) -> Self {
        let lookups = (pool.options().get_max_connections() / 2).max(1) as usize;
        Self {
            pool,
            catalog,
            cache: Arc::new(KeyCache::new(100_000, Duration::from_secs(1))),
            lookups: Arc::new(tokio::sync::Semaphore::new(lookups)),
            inflight: Arc::default(),
            key_uses: Arc::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn check_plan(&self, plan: &str) -> Result<PlanId, AccountError> {
        self.catalog
            .plan(plan)
            .map(|p| p.id.clone())
            .ok_or_else(|| AccountError::UnknownPlan(plan.to_owned()))
    }

    /// Creates a user with a first API key, and its audit row, in one
    /// transaction. Under an Idempotency-Key a retry finds the first
    /// creation instead of making a second user.
    pub async fn create_user(&self, new: NewUser<'_>) -> Result<Created, AccountError> {
        let plan = self.check_plan(new.plan)?;
        let id = new.id.clone().unwrap_or_else(UserId::generate);
        let mut tx = self.pool.begin().await?;
        if let Some((key, fingerprint)) = new.idempotency
            && let Some(earlier) = self
                .earlier_creation(&mut tx, new.actor, key, fingerprint)
                .await?
        {
            return Ok(earlier);
        }
        let inserted = sqlx::query(
            "INSERT INTO users (id, name, email, plan) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(new.name)
        .bind(new.email)
        .bind(plan.as_str())
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(AccountError::UserExists(id));
        }
        let key = insert_key(&mut tx, &id, &KeySpec::default()).await?;
        audit_in(
            &mut *tx,
            new.actor,
            "create_user",
            Some(&id),
            serde_json::json!({"plan": plan.as_str(), "key_id": key.id}),
        )
        .await?;
        if let Some((idem, fingerprint)) = new.idempotency {
            let claimed = sqlx::query(
                "INSERT INTO admin_idempotency (actor, key, fingerprint, user_id, key_id)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (actor, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,
                     user_id = EXCLUDED.user_id, key_id = EXCLUDED.key_id, created_at = now()
                 WHERE admin_idempotency.created_at < now() - interval '24 hours'",
            )
            .bind(new.actor)
            .bind(idem.as_str())
            .bind(fingerprint)
            .bind(id.as_str())
            .bind(key.id)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() == 0 {
                // A concurrent call with the same key committed first: ours
                // is undone and theirs is the answer.
                tx.rollback().await?;
                let mut tx = self.pool.begin().await?;
                return self
                    .earlier_creation(&mut tx, new.actor, idem, fingerprint)
                    .await?
                    .ok_or_else(|| AccountError::Corrupt("idempotency row vanished".into()));
            }
        }
        tx.commit().await?;
        let user = User {
            id,
            name: new.name.to_owned(),
            email: new.email.map(str::to_owned),
            plan,
            blocked: false,
        };
        Ok(Created::New(user, key))
    }

    /// The creation an admin Idempotency-Key already made (within 24 h).
    async fn earlier_creation(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        actor: &str,
        key: &IdempotencyKey,
        fingerprint: &str,
    ) -> Result<Option<Created>, AccountError> {
        let row: Option<(String, String, Uuid)> = sqlx::query_as(
            "SELECT fingerprint, user_id, key_id FROM admin_idempotency
             WHERE actor = $1 AND key = $2 AND created_at > now() - interval '24 hours'",
        )
        .bind(actor)
        .bind(key.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let Some((stored, user_id, key_id)) = row else {
            return Ok(None);
        };
        if stored != fingerprint {
            return Err(AccountError::IdempotencyKeyReused);
        }
        let user_id = UserId::parse(&user_id).map_err(|e| AccountError::Corrupt(e.to_string()))?;
        let user = self
            .get_user(&user_id)
            .await?
            .ok_or(AccountError::UnknownUser(user_id))?;
        Ok(Some(Created::Replayed(user, key_id)))
    }

    /// Another API key for a user, audited, with Redis's copy of the key
    /// set marked for update (see `sync`).
    pub async fn create_key(&self, user: &UserId, actor: &str) -> Result<NewKey, AccountError> {
        self.create_key_with(user, &KeySpec::default(), None, actor)
            .await
    }

    /// [`Self::create_key`] with a name, an expiry and a module scope. The
    /// expiry must be in the future and the scope a non-empty subset of
    /// the user's plan; with `max_live`, the user may hold at most that
    /// many live (neither revoked nor expired) keys, counted under a lock
    /// on the user so parallel requests cannot pass it together.
    pub async fn create_key_with(
        &self,
        user: &UserId,
        spec: &KeySpec,
        max_live: Option<u32>,
        actor: &str,
    ) -> Result<NewKey, AccountError> {
        if spec.name.chars().count() > 64 || spec.name.chars().any(char::is_control) {
            return Err(AccountError::InvalidKey(
                "a key's name is at most 64 characters, without control characters".into(),
            ));
        }
        if spec.expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err(AccountError::InvalidKey(
                "expires_at must be in the future".into(),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let plan: Option<(String,)> =
            sqlx::query_as("SELECT plan FROM users WHERE id = $1 FOR UPDATE")
                .bind(user.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some((plan,)) = plan else {
            return Err(AccountError::UnknownUser(user.clone()));
        };
        if let Some(max) = max_live {
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL
                   AND (expires_at IS NULL OR expires_at > now())",
            )
            .bind(user.as_str())
            .fetch_one(&mut *tx)
            .await?;
            if live >= i64::from(max) {
                return Err(AccountError::TooManyKeys(max));
            }
        }
        if let Some(modules) = &spec.modules {
            if modules.is_empty() {
                return Err(AccountError::InvalidKey(
                    "modules, when given, names at least one module".into(),
                ));
            }
            let in_plan = self.catalog.plan(&plan).map(|p| &p.modules);
            let outside = modules
                .iter()
                .find(|m| !in_plan.is_some_and(|p| p.contains(m)));
            if let Some(m) = outside {
                return Err(AccountError::InvalidKey(format!(
                    "module {m} is not in the plan {plan}"
                )));
            }
        }
        let key = insert_key(&mut tx, user, spec).await?;
        audit_in(
            &mut *tx,
            actor,
            "create_key",
            Some(user),
            serde_json::json!({
                "key_id": key.id,
                "name": spec.name,
                "expires_at": spec.expires_at,
                "modules": spec.modules.as_ref().map(|m| m.iter().map(ModuleId::as_str).collect::<Vec<_>>()),
            }),
        )
        .await?;
        mark_for_sync(&mut tx, user).await?;
        tx.commit().await?;
        Ok(key)
    }

    /// The user's keys, oldest first; revoked ones only with `revoked`.
    pub async fn keys_of(
        &self,
        user: &UserId,
        revoked: bool,
    ) -> Result<Vec<KeyInfo>, AccountError> {
        Ok(sqlx::query_as(
            "SELECT id, name, prefix, created_at, expires_at, modules, last_used_at, revoked_at
             FROM api_keys WHERE user_id = $1 AND ($2 OR revoked_at IS NULL)
             ORDER BY created_at, id",
        )
        .bind(user.as_str())
        .bind(revoked)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Notes a charged call made with `hash` (kept in memory until the next
    /// flush; allocates only the first time a key is seen).
    pub fn note_key_use(&self, hash: &KeyHash, at: DateTime<Utc>) {
        let Ok(mut uses) = self.key_uses.lock() else {
            return;
        };
        match uses.get_mut(hash) {
            Some(last) => *last = (*last).max(at),
            None => {
                uses.insert(hash.clone(), at);
            }
        }
    }

    /// Writes the noted uses to Postgres; returns how many keys. Uses a
    /// failed write could not store are noted again for the next flush.
    pub async fn flush_key_uses(&self) -> Result<usize, AccountError> {
        let uses: Vec<(KeyHash, DateTime<Utc>)> = match self.key_uses.lock() {
            Ok(mut uses) => uses.drain().collect(),
            Err(_) => return Ok(0),
        };
        if uses.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.record_key_use(&uses).await {
            for (hash, at) in &uses {
                self.note_key_use(hash, *at);
            }
            return Err(e);
        }
        Ok(uses.len())
    }

    /// Records when keys were last used: one statement for a batch, and a
    /// time never moves back.
    async fn record_key_use(&self, uses: &[(KeyHash, DateTime<Utc>)]) -> Result<(), AccountError> {
        let hashes: Vec<&str> = uses.iter().map(|(h, _)| h.as_str()).collect();
        let times: Vec<DateTime<Utc>> = uses.iter().map(|(_, t)| *t).collect();
        sqlx::query(
            "UPDATE api_keys k SET last_used_at = u.t
             FROM UNNEST($1::text[], $2::timestamptz[]) AS u(h, t)
             WHERE k.key_hash = u.h AND (k.last_used_at IS NULL OR k.last_used_at < u.t)",
        )
        .bind(hashes)
        .bind(times)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks the key revoked, audited, with Redis's copy of the key set
    /// marked for update. Revoking twice is not an error.
    pub async fn revoke_key(
        &self,
        user: &UserId,
        key_id: Uuid,
        actor: &str,
    ) -> Result<KeyHash, AccountError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String,)> = sqlx::query_as(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
             WHERE id = $1 AND user_id = $2 RETURNING key_hash",
        )
        .bind(key_id)
        .bind(user.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let (hash,) = row.ok_or(AccountError::UnknownKey(key_id))?;
        audit_in(
            &mut *tx,
            actor,
            "revoke_key",
            Some(user),
            serde_json::json!({"key_id": key_id}),
        )
        .await?;
        mark_for_sync(&mut tx, user).await?;
        tx.commit().await?;
        let hash = KeyHash::from_stored(hash);
        self.cache.forget(&hash);
        Ok(hash)
    }

    /// The user a key belongs to, if the key exists and is not revoked.
    /// Positive answers are cached without expiry: revocation is enforced by
    /// charge.lua against the account's key set in Redis, not by this cache.
    pub async fn user_for_key(&self, hash: &KeyHash) -> Result<Option<UserId>, AccountError> {
        if let Some(hit) = self.cache.get(hash) {
            return Ok(hit);
        }
        let lookup = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(inflight.entry(hash.clone()).or_default())
        };
        // A failed lookup leaves the cell empty: the next waiter tries again.
        let found = lookup
            .get_or_try_init(|| async {
                let found = self.lookup_key(hash).await?;
                self.cache.put(hash.clone(), found.clone());
                Ok::<_, AccountError>(found)
            })
            .await
            .cloned();
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if inflight.get(hash).is_some_and(|l| Arc::ptr_eq(l, &lookup)) {
            inflight.remove(hash);
        }
        found
    }

    /// The owner of a live (not revoked) key, asking Postgres (no cache),
    /// with what limits the key: for the APIs, where a revoked or expired
    /// key must fail without a Redis round trip.
    /// Bounded as the proxy's lookups are: a flood of unknown keys holds
    /// at most half the pool.
    pub async fn key_owner(&self, hash: &KeyHash) -> Result<Option<KeyOwner>, AccountError> {
        let Ok(Ok(_permit)) = tokio::time::timeout(KEY_LOOKUP_WAIT, self.lookups.acquire()).await
        else {
            crate::telemetry::metrics::key_lookup("shed");
            return Err(AccountError::LookupsSaturated);
        };
        // A hung database must not hold the request (nor the permit) for
        // good: the pool's acquire timeout bounds the whole lookup.
        let deadline = self.pool.options().get_acquire_timeout();
        let query = sqlx::query_as::<_, (String, bool, bool)>(
            "SELECT user_id, COALESCE(expires_at <= now(), false), modules IS NOT NULL
             FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(hash.as_str())
        .fetch_optional(&self.pool);
        let row = tokio::time::timeout(deadline, query)
            .await
            .map_err(|_| AccountError::Database(sqlx::Error::PoolTimedOut))??;
        crate::telemetry::metrics::key_lookup(if row.is_some() { "found" } else { "unknown" });
        row.map(|(user, expired, scoped)| {
            Ok(KeyOwner {
                user: UserId::parse(&user).map_err(|e| AccountError::Corrupt(e.to_string()))?,
                expired,
                scoped,
            })
        })
        .transpose()
    }

    /// Asks Postgres, bypassing the cache: is this key live for this user?
    /// Used when Redis says a key is unknown, to tell a revoked key from a
    /// key whose creation never reached Redis.
    pub async fn key_is_live(&self, user: &UserId, hash: &KeyHash) -> Result<bool, AccountError> {
        let live = self.lookup_key(hash).await?.as_ref() == Some(user);
        if !live {
            self.cache.put(hash.clone(), None);
        }
        Ok(live)
    }

    async fn lookup_key(&self, hash: &KeyHash) -> Result<Option<UserId>, AccountError> {
        Ok(self.key_owner(hash).await?.map(|owner| owner.user))
    }

    pub async fn get_user(&self, id: &UserId) -> Result<Option<User>, AccountError> {
        let row: Option<(String, String, Option<String>, String, String)> =
            sqlx::query_as("SELECT id, name, email, plan, status FROM users WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|(id, name, email, plan, status)| {
            Ok(User {
                id: UserId::parse(&id).map_err(|e| AccountError::Corrupt(e.to_string()))?,
                name,
                email,
                plan: PlanId::parse(&plan).map_err(|e| AccountError::Corrupt(e.to_string()))?,
                blocked: status == "blocked",
            })
        })
        .transpose()
    }

    /// Appends to the admin audit trail. `actor` is a key's name
    /// ("admin:ops"), a service ("service:hub") or a policy, never a key.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        user: Option<&UserId>,
        details: serde_json::Value,
    ) -> Result<(), AccountError> {
        Ok(audit_in(&self.pool, actor, action, user, details).await?)
    }

    /// A page of user ids in id order, for jobs that visit every account.
    pub async fn user_ids_after(
        &self,
        after: Option<&UserId>,
        limit: i64,
    ) -> Result<Vec<UserId>, AccountError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM users WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after.map_or("", UserId::as_str))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(id,)| UserId::parse(&id).map_err(|e| AccountError::Corrupt(e.to_string())))
            .collect()
    }

    /// What Redis must hold for `id`, built from Postgres, or `None` for an
    /// unknown user.
    ///
    /// Plan, status and keys come from the account tables; the balance from
    /// the ledger's snapshot of the latest flushed event (a new account
    /// starts with its plan's full allowance). Events that were still in
    /// Redis when it lost its data are not in the snapshot: that window is
    /// what Redis persistence (AOF) exists to close.
    pub async fn seed_for(
        &self,
        id: &UserId,
        stamp: &Stamp,
    ) -> Result<Option<AccountSeed>, AccountError> {
        let Some(user) = self.get_user(id).await? else {
            return Ok(None);
        };
        let keys: Vec<(String, Option<i64>, String)> = sqlx::query_as(
            "SELECT key_hash, (extract(epoch FROM expires_at) * 1000)::bigint,
                    COALESCE(array_to_string(modules, ','), '')
             FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        let snapshot = crate::ledger::reports::snapshot(&self.pool, id.as_str()).await?;
        // Values the ledger recorded are taken as they are, even past
        // today's bounds: an account must always be rebuildable.
        let credits = Credits::from_ledger;
        let (monthly, bonus, period, day, day_used) = match snapshot {
            Some(s) => (
                credits(s.monthly),
                credits(s.bonus),
                s.period,
                s.day,
                credits(s.day_used),
            ),
            None => (
                self.catalog
                    .plan(user.plan.as_str())
                    .map_or(Credits::ZERO, |p| p.monthly_credits),
                Credits::ZERO,
                stamp.period.clone(),
                stamp.day.clone(),
                Credits::ZERO,
            ),
        };
        Ok(Some(AccountSeed {
            user: user.id,
            plan: user.plan,
            monthly,
            bonus,
            period,
            day,
            day_used,
            blocked: user.blocked,
            keys: keys
                .into_iter()
                .map(|(hash, expires_ms, scope)| sync::live_key(hash, expires_ms, &scope))
                .collect::<Result<_, _>>()?,
        }))
    }
}

/// Appends to the audit trail. Given a change's own transaction, the change
/// and its record stand or fall together.
pub(crate) async fn audit_in<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    actor: &str,
    action: &str,
    user: Option<&UserId>,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO admin_audit (actor, action, user_id, details) VALUES ($1, $2, $3, $4)",
    )
    .bind(actor)
    .bind(action)
    .bind(user.map(UserId::as_str))
    .bind(details)
    .execute(executor)
    .await?;
    Ok(())
}

pub use sync::mark_for_sync;

async fn insert_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    user: &UserId,
    spec: &KeySpec,
) -> Result<NewKey, AccountError> {
    let key = ApiKey::generate();
    let id = Uuid::now_v7();
    let modules: Option<Vec<&str>> = spec
        .modules
        .as_ref()
        .map(|m| m.iter().map(ModuleId::as_str).collect());
    sqlx::query(
        "INSERT INTO api_keys (id, user_id, key_hash, prefix, name, expires_at, modules)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(user.as_str())
    .bind(key.hash().as_str())
    .bind(key.display_prefix())
    .bind(&spec.name)
    .bind(spec.expires_at)
    .bind(modules)
    .execute(&mut **tx)
    .await?;
    Ok(NewKey { id, key })
}
