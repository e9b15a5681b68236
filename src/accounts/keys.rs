//! Users' API keys in Postgres: created (shown once), listed, revoked,
//! and resolved from a presented key to its user (through the cache).

use super::*;

impl Accounts {
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
        // Boxed: the Postgres lookup's future is large, and inline it would
        // enlarge every request's future, cache hit or not.
        Box::pin(self.lookup_once(hash)).await
    }

    /// A cache miss: one lookup per key at a time, its answer cached.
    async fn lookup_once(&self, hash: &KeyHash) -> Result<Option<UserId>, AccountError> {
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
}

pub(super) async fn insert_key(
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
