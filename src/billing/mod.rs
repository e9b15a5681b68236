//! Operations that need both stores: Redis decides, Postgres knows the
//! accounts. Charging with on-demand rebuild, grants, the monthly reset,
//! and every admin or user change to an account's access (plan, block,
//! keys), which follows one rule: Postgres first, then mirrored to Redis.
//! Shared by the proxy and the credits/admin/user APIs, so there is one set
//! of rules whatever the entry point.

mod changes;
mod unanswered;

use std::sync::Arc;

use thiserror::Error;
use uuid::Uuid;

use crate::accounts::{AccountError, Accounts, KeySpec, NewKey};
use crate::catalog::Catalog;
use crate::domain::{KeyHash, PlanId, UserId};
use crate::metering::{
    AccountState, Balance, Calendar, ChargeOutcome, ChargeRequest, Grant, GrantOutcome, Meter,
    MeterError, Receipt, Refusal, Repeat, ResetOutcome, SyncState,
};
use crate::webhooks::Outbox;
pub use changes::Change;

#[derive(Debug, Error)]
pub enum BillingError {
    #[error(transparent)]
    Meter(#[from] MeterError),
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error("no such user {0}")]
    UnknownUser(UserId),
    #[error("account state for {0} could not be rebuilt in Redis")]
    RebuildFailed(UserId),
    /// The change is committed in Postgres but Redis did not take it: the
    /// reconciler applies it once Redis answers, and repeating is safe.
    #[error("saved, not yet mirrored to Redis: {0}")]
    NotMirrored(MeterError),
}

/// A charge's final answer, after any rebuild.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Charged(Receipt),
    Duplicate { balance: Balance, plan: PlanId },
    Refused(Refusal),
    Repeat(Repeat),
}

/// The handles every rule needs. Cheap to clone (each is a handle).
/// Private: callers change an account only through these methods, and
/// read through the accessors below.
#[derive(Clone)]
pub struct Billing {
    meter: Meter,
    accounts: Accounts,
    calendar: Calendar,
    catalog: Arc<Catalog>,
    /// Where account changes put their webhook events, in the change's
    /// own transaction.
    outbox: Arc<Outbox>,
    /// This worker's credit leases: an access change ends the account's
    /// at once here (other workers' end with their `ttl_ms`).
    leases: Option<Arc<crate::leases::Leases>>,
    /// Charges whose answer was lost, looked into off the hot path.
    voids: Arc<unanswered::Voids>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResetReport {
    pub period: String,
    pub accounts: u64,
    pub reset: u64,
    pub already_current: u64,
}

impl Billing {
    pub fn new(
        meter: Meter,
        accounts: Accounts,
        calendar: Calendar,
        catalog: Arc<Catalog>,
        outbox: Arc<Outbox>,
    ) -> Self {
        Self {
            meter,
            accounts,
            calendar,
            catalog,
            outbox,
            leases: None,
            voids: Arc::default(),
        }
    }

    /// The same, with this worker's credit leases.
    pub fn with_leases(mut self, leases: Arc<crate::leases::Leases>) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Redis: balances, limits, keys as charge.lua sees them.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Postgres: users, keys, the audit trail.
    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// charge.lua, plus the two repairs that need Postgres: an account
    /// missing from Redis is rebuilt, and when Redis does not know a key
    /// Postgres says is live, the account's access is mirrored again.
    /// Each at most once per call.
    pub async fn charge(&self, req: &ChargeRequest<'_>) -> Result<Decision, BillingError> {
        let mut repaired = false;
        loop {
            let outcome = match self.meter.charge(req).await {
                Err(MeterError::Unanswered { charge, cause }) => {
                    self.void_later(*charge);
                    return Err((*cause).into());
                }
                outcome => outcome?,
            };
            match outcome {
                ChargeOutcome::Charged(r) => {
                    if r.auto_blocked {
                        self.record_auto_block(req.user);
                    }
                    return Ok(Decision::Charged(r));
                }
                ChargeOutcome::Duplicate { balance, plan } => {
                    return Ok(Decision::Duplicate { balance, plan });
                }
                // The repairs ask Postgres: boxed, so that their (large)
                // futures are allocated when a repair happens instead of
                // making every request's future, moved on each call,
                // that much bigger.
                ChargeOutcome::Missing if !repaired => {
                    repaired = true;
                    Box::pin(self.rebuild(req.user)).await?;
                }
                ChargeOutcome::Refused(Refusal::UnknownKey) if !repaired => {
                    repaired = true;
                    let Some(hash) = req.key_hash else {
                        return Ok(Decision::Refused(Refusal::UnknownKey));
                    };
                    if !Box::pin(self.mirror_new_key(req.user, hash)).await? {
                        return Ok(Decision::Refused(Refusal::UnknownKey));
                    }
                }
                ChargeOutcome::Missing => {
                    return Err(BillingError::RebuildFailed(req.user.clone()));
                }
                ChargeOutcome::Refused(refusal) => return Ok(Decision::Refused(refusal)),
                ChargeOutcome::Repeat(repeat) => return Ok(Decision::Repeat(repeat)),
            }
        }
    }

    /// A key Redis does not know: live in Postgres (its creation has not
    /// reached Redis yet), the account's whole state goes over under a
    /// fresh version, never this one key alone, so a revocation racing with
    /// this repair cannot be undone by it. `false`: the key is not live.
    async fn mirror_new_key(&self, user: &UserId, hash: &KeyHash) -> Result<bool, BillingError> {
        if !self.accounts.key_is_live(user, hash).await? {
            return Ok(false);
        }
        let state = self
            .accounts
            .fresh_sync_state(user)
            .await?
            .ok_or_else(|| BillingError::UnknownUser(user.clone()))?;
        self.apply_sync(&state).await?;
        Ok(true)
    }

    /// The audit row for a policy block, written off the hot path.
    fn record_auto_block(&self, user: &UserId) {
        let accounts = self.accounts.clone();
        let user = user.clone();
        tokio::spawn(async move {
            let details = serde_json::json!({"reason": "credits exhausted"});
            if let Err(e) = accounts
                .audit("policy:auto_block", "auto_block", Some(&user), details)
                .await
            {
                tracing::error!(%user, error = %e, "auto-block not recorded in the audit trail");
            }
        });
    }

    /// Puts an account's state into Redis from Postgres unless it is there.
    pub async fn rebuild(&self, user: &UserId) -> Result<(), BillingError> {
        let seed = self
            .accounts
            .seed_for(user, &self.calendar.now())
            .await?
            .ok_or_else(|| BillingError::UnknownUser(user.clone()))?;
        self.meter.seed(&seed).await?;
        Ok(())
    }

    /// The account's state in Redis, rebuilt from Postgres first if Redis
    /// does not hold it.
    pub async fn account(&self, user: &UserId) -> Result<AccountState, BillingError> {
        if let Some(a) = self.meter.account(user).await? {
            return Ok(a);
        }
        self.rebuild(user).await?;
        self.meter
            .account(user)
            .await?
            .ok_or_else(|| BillingError::RebuildFailed(user.clone()))
    }

    /// Adds bonus credits, rebuilding the account first if Redis lacks it.
    /// The grant's ledger row and its audit row follow from its usage
    /// event, exactly once, through the flusher.
    pub async fn grant(&self, grant: &Grant<'_>) -> Result<GrantOutcome, BillingError> {
        for _ in 0..2 {
            let now = self.calendar.now();
            match self.meter.grant(grant, &now).await? {
                GrantOutcome::Missing => self.rebuild(grant.user).await?,
                done => return Ok(done),
            }
        }
        Err(BillingError::RebuildFailed(grant.user.clone()))
    }

    /// Moves `user` to the plan `to`. Modules and daily limit follow at
    /// once; the current period keeps its allowance, the new plan's starts
    /// with the next period.
    pub async fn change_plan(
        &self,
        user: &UserId,
        to: &PlanId,
        actor: &str,
    ) -> Result<(), BillingError> {
        let old = self
            .accounts
            .get_user(user)
            .await?
            .ok_or_else(|| BillingError::UnknownUser(user.clone()))?;
        let change = Change::Plan {
            from: &old.plan,
            to,
        };
        self.change(user, change, to, actor).await
    }

    /// Blocks or unblocks `user` on every instance. An auto-block (credits
    /// exhausted) is the policy's: an unblock leaves it to charge.lua.
    pub async fn set_blocked(
        &self,
        user: &UserId,
        blocked: bool,
        reason: Option<&str>,
        actor: &str,
    ) -> Result<(), BillingError> {
        let account = self
            .accounts
            .get_user(user)
            .await?
            .ok_or_else(|| BillingError::UnknownUser(user.clone()))?;
        let change = if blocked {
            Change::Block { reason }
        } else {
            Change::Unblock { reason }
        };
        self.change(user, change, &account.plan, actor).await
    }

    async fn change(
        &self,
        user: &UserId,
        change: Change<'_>,
        plan: &PlanId,
        actor: &str,
    ) -> Result<(), BillingError> {
        let day = self.calendar.now().local_date();
        match changes::apply(&self.accounts, &self.outbox, user, change, plan, actor, day).await {
            Err(AccountError::UnknownUser(u)) => return Err(BillingError::UnknownUser(u)),
            other => other?,
        }
        self.end_leases(user);
        let mirrored = self.mirror(user).await;
        // Again once Redis has the change: a lease it granted before is
        // refused when its charge comes back (see `Leases::end_user`).
        self.end_leases(user);
        mirrored
    }

    /// A new API key for `user`, usable on every instance once this returns
    /// (`max_keys`: the self-service cap, `None` for admins).
    pub async fn create_key(
        &self,
        user: &UserId,
        spec: &KeySpec,
        max_keys: Option<u32>,
        actor: &str,
    ) -> Result<NewKey, BillingError> {
        let key = self
            .accounts
            .create_key_with(user, spec, max_keys, actor)
            .await?;
        self.mirror(user).await?;
        Ok(key)
    }

    /// Revokes one of `user`'s keys on every instance.
    pub async fn revoke_key(
        &self,
        user: &UserId,
        key_id: Uuid,
        actor: &str,
    ) -> Result<(), BillingError> {
        self.accounts.revoke_key(user, key_id, actor).await?;
        self.end_leases(user);
        let mirrored = self.mirror(user).await;
        // Again once Redis has the change: a lease it granted before is
        // refused when its charge comes back (see `Leases::end_user`).
        self.end_leases(user);
        mirrored
    }

    fn end_leases(&self, user: &UserId) {
        if let Some(leases) = &self.leases {
            leases.end_user(user);
        }
    }

    /// After a change committed in Postgres: applies it to Redis now, so
    /// it bites on the next request everywhere. When Redis does not answer
    /// the change stands and the reconciler finishes the job.
    async fn mirror(&self, user: &UserId) -> Result<(), BillingError> {
        match self.sync_account(user).await {
            Err(BillingError::Meter(e)) => {
                tracing::warn!(%user, error = %e, "change saved; Redis will get it from the reconciler");
                Err(BillingError::NotMirrored(e))
            }
            other => other,
        }
    }

    /// Applies to Redis what Postgres says about `user`'s access (plan,
    /// block, keys) if a change is pending, then clears the mark. Safe to
    /// repeat and to race: Redis keeps the newest version.
    pub async fn sync_account(&self, user: &UserId) -> Result<(), BillingError> {
        let Some(state) = self.accounts.sync_state(user).await? else {
            return Ok(());
        };
        self.apply_sync(&state).await
    }

    async fn apply_sync(&self, state: &SyncState) -> Result<(), BillingError> {
        // Applied, already newer, or not in Redis (seeded from Postgres
        // on first use): in each case Redis no longer lags this version.
        self.meter.sync(state).await?;
        self.accounts.sync_done(&state.user, state.version).await?;
        Ok(())
    }

    /// One pass of the reconciler: every pending change, oldest first.
    /// Returns how many accounts were brought up to date.
    pub async fn reconcile(&self) -> Result<usize, BillingError> {
        let pending = self.accounts.pending_syncs(500).await?;
        for user in &pending {
            self.sync_account(user).await?;
        }
        Ok(pending.len())
    }

    /// Starts the current period for every account. Idempotent within a
    /// period; safe to re-run after a crash and alongside live traffic.
    pub async fn reset_monthly(&self, actor: &str) -> Result<ResetReport, BillingError> {
        let now = self.calendar.now();
        let mut report = ResetReport {
            period: now.period.to_string(),
            ..Default::default()
        };
        let mut after: Option<UserId> = None;
        loop {
            let page = self.accounts.user_ids_after(after.as_ref(), 500).await?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            for user in &page {
                report.accounts += 1;
                let mut outcome = self.meter.reset_period(user, actor, &now).await?;
                if outcome == ResetOutcome::Missing {
                    self.rebuild(user).await?;
                    outcome = self.meter.reset_period(user, actor, &now).await?;
                }
                match outcome {
                    ResetOutcome::Reset { .. } => report.reset += 1,
                    ResetOutcome::Current => report.already_current += 1,
                    ResetOutcome::Missing => return Err(BillingError::RebuildFailed(user.clone())),
                    ResetOutcome::UnknownPlan => {
                        tracing::warn!(user = %user, "monthly reset skipped: plan not configured");
                    }
                }
            }
            after = Some(last);
        }
        tracing::info!(
            period = %report.period,
            accounts = report.accounts,
            reset = report.reset,
            "monthly reset done"
        );
        Ok(report)
    }
}
