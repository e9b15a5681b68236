//! The admin's view of every account: the filtered user list, the audit
//! trail and the users export. Reads only; the rules that change an
//! account live in `Billing`.

use chrono::{DateTime, NaiveDate, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sqlx::PgPool;

use super::{AccountError, Accounts};
use crate::domain::UserId;

/// Which users a listing shows; `None` fields do not filter.
#[derive(Clone, Copy, Debug, Default)]
pub struct UserFilter<'a> {
    pub plan: Option<&'a str>,
    /// `active` or `blocked`.
    pub status: Option<&'a str>,
    /// A substring of the name, email or id, matched case-insensitively.
    pub search: Option<&'a str>,
}

/// One user of a listing, with what the ledger knows of its month.
pub struct ListedUser {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
    pub plan: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    /// Net credits used since `month` (the listing's month start).
    pub used_this_month: i64,
    /// The ledger's last snapshot: monthly, bonus and its period.
    pub snapshot: Option<(i64, i64, String)>,
}

/// A user as the users export writes it.
#[derive(sqlx::FromRow)]
pub struct UserRecord {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
    pub plan: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// One admin action of the audit trail.
pub struct AuditRecord {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub user_id: Option<String>,
    pub details: serde_json::Value,
}

/// `ILIKE` pattern for a substring, with the pattern characters escaped.
fn contains(s: &str) -> String {
    format!(
        "%{}%",
        s.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}

impl Accounts {
    /// A page of users, newest first, and how many match in all.
    pub async fn list_users(
        &self,
        filter: UserFilter<'_>,
        month: NaiveDate,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<ListedUser>, i64), AccountError> {
        type Row = (
            String,
            String,
            Option<String>,
            String,
            String,
            DateTime<Utc>,
            i64,
            i64,
            Option<i64>,
            Option<i64>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT u.id, u.name, u.email, u.plan, u.status, u.created_at,
                    COALESCE((SELECT m.charged_credits - m.refunded_credits FROM usage_monthly m
                              WHERE m.user_id = u.id AND m.month = $4), 0)::bigint,
                    count(*) OVER (),
                    s.monthly, s.bonus, s.period
             FROM users u LEFT JOIN account_snapshots s ON s.user_id = u.id
             WHERE ($1::text IS NULL OR u.plan = $1)
               AND ($2::text IS NULL OR u.status = $2)
               AND ($3::text IS NULL OR u.name ILIKE $3 OR u.email ILIKE $3 OR u.id ILIKE $3)
             ORDER BY u.created_at DESC, u.id
             LIMIT $5 OFFSET $6",
        )
        .bind(filter.plan)
        .bind(filter.status)
        .bind(filter.search.map(contains))
        .bind(month)
        .bind(limit)
        .bind(offset)
        .fetch_all(self.pool())
        .await?;
        let total = rows.first().map_or(0, |r| r.7);
        let users = rows
            .into_iter()
            .map(
                |(id, name, email, plan, status, created_at, used, _, monthly, bonus, period)| {
                    ListedUser {
                        id,
                        name,
                        email,
                        plan,
                        status,
                        created_at,
                        used_this_month: used,
                        snapshot: match (monthly, bonus, period) {
                            (Some(m), Some(b), Some(p)) => Some((m, b, p)),
                            _ => None,
                        },
                    }
                },
            )
            .collect();
        Ok((users, total))
    }

    /// A page of the audit trail, newest first (of one user, or of all),
    /// and how many entries there are in all.
    pub async fn audit_trail(
        &self,
        user: Option<&UserId>,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<AuditRecord>, i64), AccountError> {
        type Row = (
            i64,
            DateTime<Utc>,
            String,
            String,
            Option<String>,
            serde_json::Value,
            i64,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, at, actor, action, user_id, details, count(*) OVER ()
             FROM admin_audit WHERE ($1::text IS NULL OR user_id = $1)
             ORDER BY at DESC, id DESC LIMIT $2 OFFSET $3",
        )
        .bind(user.map(UserId::as_str))
        .bind(limit)
        .bind(offset)
        .fetch_all(self.pool())
        .await?;
        let total = rows.first().map_or(0, |r| r.6);
        let entries = rows
            .into_iter()
            .map(|(id, at, actor, action, user_id, details, _)| AuditRecord {
                id,
                at,
                actor,
                action,
                user_id,
                details,
            })
            .collect();
        Ok((entries, total))
    }
}

/// Every user, oldest first, streamed from `pool` (the reports pool).
pub fn all_users(pool: &PgPool) -> BoxStream<'_, Result<UserRecord, sqlx::Error>> {
    sqlx::query_as::<_, UserRecord>(
        "SELECT id, name, email, plan, status, created_at FROM users ORDER BY created_at, id",
    )
    .fetch(pool)
    .boxed()
}
