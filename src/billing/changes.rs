//! Admin changes to an account's access (plan, block, unblock): the users
//! row, its ledger row, its audit row, its webhook event and its mark for
//! Redis (see `accounts::sync`), written in one transaction. Mirroring the
//! committed change into Redis is the caller's next step.

use chrono::{NaiveDate, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::accounts::{AccountError, Accounts, audit_in, mark_for_sync};
use crate::domain::{PlanId, UserId};
use crate::webhooks::{EventType, NewEvent, Outbox};

/// What an admin change does to the account.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    Plan { from: &'a PlanId, to: &'a PlanId },
    Block { reason: Option<&'a str> },
    Unblock { reason: Option<&'a str> },
}

impl Change<'_> {
    /// The ledger row's and the audit row's kind.
    fn kind(&self) -> &'static str {
        match self {
            Change::Plan { .. } => "plan_change",
            Change::Block { .. } => "block",
            Change::Unblock { .. } => "unblock",
        }
    }

    fn webhook(&self) -> EventType {
        match self {
            Change::Plan { .. } => EventType::PlanChanged,
            Change::Block { .. } => EventType::AccountBlocked,
            Change::Unblock { .. } => EventType::AccountUnblocked,
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Change::Plan { .. } => None,
            Change::Block { reason } | Change::Unblock { reason } => *reason,
        }
    }

    fn details(&self) -> serde_json::Value {
        match self {
            Change::Plan { from, to } => json!({"from": from.as_str(), "to": to.as_str()}),
            Change::Block { reason } | Change::Unblock { reason } => json!({"reason": reason}),
        }
    }
}

/// Applies `change` to `user` with every row that records it, in one
/// transaction. `plan` is the plan the ledger row names (the new one for a
/// plan change); `day` is the local day it is booked on.
/// [`AccountError::UnknownUser`] when no such user exists.
pub(super) async fn apply(
    accounts: &Accounts,
    outbox: &Outbox,
    user: &UserId,
    change: Change<'_>,
    plan: &PlanId,
    actor: &str,
    day: NaiveDate,
) -> Result<(), AccountError> {
    let mut tx = accounts.pool().begin().await?;
    let updated = match change {
        Change::Plan { to, .. } => {
            sqlx::query("UPDATE users SET plan = $2, updated_at = now() WHERE id = $1")
                .bind(user.as_str())
                .bind(to.as_str())
                .execute(&mut *tx)
                .await?
        }
        Change::Block { reason } | Change::Unblock { reason } => {
            let blocked = matches!(change, Change::Block { .. });
            sqlx::query(
                "UPDATE users SET status = $2, blocked_reason = $3, updated_at = now()
                     WHERE id = $1",
            )
            .bind(user.as_str())
            .bind(if blocked { "blocked" } else { "active" })
            .bind(reason.filter(|_| blocked))
            .execute(&mut *tx)
            .await?
        }
    };
    if updated.rows_affected() == 0 {
        return Err(AccountError::UnknownUser(user.clone()));
    }
    let now = Utc::now();
    let event_id = Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO ledger_events (event_id, user_id, kind, amount, plan, actor, local_day,
                occurred_at, stream_ms, reason)
             VALUES ($1, $2, $3, 0, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&event_id)
    .bind(user.as_str())
    .bind(change.kind())
    .bind(plan.as_str())
    .bind(actor)
    .bind(day)
    .bind(now)
    .bind(now.timestamp_millis())
    .bind(change.reason())
    .execute(&mut *tx)
    .await?;
    let details = change.details();
    let mut data = json!({"user_id": user.as_str(), "actor": actor});
    if let (Some(data), Some(details)) = (data.as_object_mut(), details.as_object()) {
        data.extend(details.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let webhook = NewEvent {
        kind: change.webhook(),
        dedupe_key: format!("ledger:{event_id}"),
        user_id: user.to_string(),
        at: now,
        data,
    };
    let produced = outbox.emit(&mut tx, std::slice::from_ref(&webhook)).await?;
    audit_in(&mut *tx, actor, change.kind(), Some(user), details).await?;
    mark_for_sync(&mut tx, user).await?;
    tx.commit().await?;
    if produced > 0 {
        outbox.committed();
    }
    Ok(())
}
