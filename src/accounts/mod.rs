//! Accounts and API keys: Postgres is their home, Redis holds the hot copy
//! that scripts read (see `metering::keys`).
//!
//! This module owns creating users and keys (`keys`), revoking keys,
//! resolving a presented key to its user (with an in-process cache),
//! reading what an account's Redis state should be rebuilt from, the
//! admin's directory of accounts (`directory`), and the gateway's own
//! admin and service keys (`gateway_keys`).

mod cache;
pub mod credentials;
pub mod directory;
mod gateway_keys;
mod keys;
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
pub use credentials::Credential;
pub use gateway_keys::ApiKeys;
use keys::insert_key;

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
    /// with a Postgres write per request. Hashed with foldhash: std's
    /// SipHash of the 64-character hash was about 400 instructions a request
    /// (bench/gateway_instructions.sh), and only keys that were charged get
    /// here, so no caller picks what collides.
    key_uses: Arc<std::sync::Mutex<KeyUses>>,
}

type KeyLookup = tokio::sync::OnceCell<Option<UserId>>;
type KeyUses = HashMap<KeyHash, DateTime<Utc>, foldhash::quality::RandomState>;

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

    /// How many migrations the database has applied (readiness compares it
    /// with [`MIGRATOR`]).
    pub async fn migrations_applied(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&self.pool)
            .await
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
        let snapshot = crate::ledger::reports::snapshot(&self.pool, id).await?;
        // Values the ledger recorded are taken as they are, even past
        // today's bounds: an account must always be rebuildable.
        let credits = Credits::recorded;
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
                stamp.period.to_string(),
                stamp.day.to_string(),
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
