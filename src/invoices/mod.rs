//! Monthly invoices: what an account owes for a period, the seller's gap-free
//! numbering, and the PDF (`pdf`).
//!
//! An invoice bills the plan's subscription for one period (`YYYY-MM` in
//! the deployment's time zone), at the plan's `price_dzd` excluding tax,
//! plus VAT at `invoices.vat_rate`. The plan is the one the account held
//! when the period started (or when it was created, if later): the plan
//! that gave the period its allowance. Free periods (0 DZD) get no invoice.
//!
//! A closed period's invoice gets its number once, from the seller's
//! counter, in the transaction that stores its content: the counter row is
//! locked, so numbers are assigned one at a time, in order, and a rolled
//! back assignment takes its number back with it. Stored content is what
//! every later download renders, byte for byte. The current period is
//! shown as a draft ("Brouillon"), computed afresh and never numbered.

pub mod pdf;
pub mod revenue;
pub mod words;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use thiserror::Error;

use crate::catalog::Catalog;
pub use crate::config::invoices::{Invoicing, Seller};
use crate::domain::UserId;
use crate::metering::Calendar;

#[derive(Debug, Error)]
pub enum InvoiceError {
    #[error("invoicing is not configured ([invoices] seller)")]
    NotConfigured,
    #[error("no invoice for period {0}")]
    NoInvoice(String),
    #[error("no such user")]
    UnknownUser,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("stored invoice unreadable: {0}")]
    Corrupt(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Customer {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
}

/// One line: amounts in centimes of DZD, excluding tax.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Line {
    pub label: String,
    pub quantity: i64,
    pub unit_ht: i64,
    pub total_ht: i64,
}

/// An invoice's whole content, as stored when it is numbered.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Invoice {
    /// `2026/000042`; `None` for the current period's draft.
    pub number: Option<String>,
    pub period: String,
    pub issued_on: Option<NaiveDate>,
    pub seller: Seller,
    pub customer: Customer,
    pub lines: Vec<Line>,
    pub total_ht: i64,
    pub vat_bp: i64,
    pub vat: i64,
    pub total_ttc: i64,
}

impl Invoice {
    pub fn is_draft(&self) -> bool {
        self.number.is_none()
    }
}

/// What the invoices need: the stores and the calendar.
#[derive(Clone)]
pub struct Invoices {
    pool: PgPool,
    catalog: std::sync::Arc<Catalog>,
    calendar: Calendar,
    settings: Invoicing,
}

struct Account {
    name: String,
    email: Option<String>,
    plan: String,
    created_at: DateTime<Utc>,
    /// From the audit trail, oldest first: read once per account, whatever
    /// the number of periods asked about.
    plan_changes: Vec<PlanChange>,
}

/// A plan change from the audit trail (`from`, `to` of its details).
pub(crate) struct PlanChange {
    pub at: DateTime<Utc>,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// The plan in force at some instant: that of the last change `happened`
/// says took place by then, else the plan before the first change, else
/// the plan now (an account never changed). `changes` oldest first.
pub(crate) fn plan_in_force(
    changes: &[PlanChange],
    plan_now: &str,
    happened: impl Fn(DateTime<Utc>) -> bool,
) -> String {
    match (
        changes.iter().rev().find(|c| happened(c.at)),
        changes.first(),
    ) {
        (Some(c), _) => c.to.clone(),
        (None, Some(first)) => first.from.clone(),
        (None, None) => None,
    }
    .unwrap_or_else(|| plan_now.to_owned())
}

impl Invoices {
    pub fn new(
        pool: PgPool,
        catalog: std::sync::Arc<Catalog>,
        calendar: Calendar,
        settings: Invoicing,
    ) -> Self {
        Self {
            pool,
            catalog,
            calendar,
            settings,
        }
    }

    fn seller(&self) -> Result<&Seller, InvoiceError> {
        self.settings
            .seller
            .as_ref()
            .ok_or(InvoiceError::NotConfigured)
    }

    async fn account(&self, user: &UserId) -> Result<Account, InvoiceError> {
        let row: Option<(String, Option<String>, String, DateTime<Utc>)> =
            sqlx::query_as("SELECT name, email, plan, created_at FROM users WHERE id = $1")
                .bind(user.as_str())
                .fetch_optional(&self.pool)
                .await?;
        let (name, email, plan, created_at) = row.ok_or(InvoiceError::UnknownUser)?;
        let changes: Vec<(DateTime<Utc>, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT at, details->>'from', details->>'to' FROM admin_audit
             WHERE user_id = $1 AND action = 'plan_change' ORDER BY at, id",
        )
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(Account {
            name,
            email,
            plan,
            created_at,
            plan_changes: changes
                .into_iter()
                .map(|(at, from, to)| PlanChange { at, from, to })
                .collect(),
        })
    }

    /// The invoice of `period` as it stands now (unnumbered), or `None`
    /// when the account owes nothing for it (free plan, not yet created).
    async fn compute(
        &self,
        user: &UserId,
        account: &Account,
        period: &str,
    ) -> Result<Option<Invoice>, InvoiceError> {
        let seller = self.seller()?.clone();
        let Some((start, end)) = self.calendar.period_bounds(period) else {
            return Ok(None);
        };
        if account.created_at >= end {
            return Ok(None);
        }
        let held = start.max(account.created_at);
        let plan_id = plan_in_force(&account.plan_changes, &account.plan, |t| t <= held);
        let Some(plan) = self.catalog.plan(&plan_id) else {
            return Ok(None);
        };
        if plan.price_dzd <= 0 {
            return Ok(None);
        }
        let unit = plan.price_dzd.saturating_mul(100);
        let lines = vec![Line {
            label: format!("Abonnement {} — {}", plan.name, month_name(period)),
            quantity: 1,
            unit_ht: unit,
            total_ht: unit,
        }];
        let total_ht: i64 = lines.iter().map(|l| l.total_ht).sum();
        let vat_bp = self.settings.vat_bp;
        // Rounded half up to the centime.
        let vat = (total_ht * vat_bp + 5_000) / 10_000;
        Ok(Some(Invoice {
            number: None,
            period: period.to_owned(),
            issued_on: None,
            seller,
            customer: Customer {
                id: user.to_string(),
                name: account.name.clone(),
                email: account.email.clone(),
            },
            lines,
            total_ht,
            vat_bp,
            vat,
            total_ttc: total_ht + vat,
        }))
    }

    /// Every invoice of the account, oldest first: the closed periods'
    /// (numbered now if they were not yet) and the current one's draft.
    pub async fn list(&self, user: &UserId) -> Result<Vec<Invoice>, InvoiceError> {
        self.seller()?;
        let account = self.account(user).await?;
        let current = self.calendar.now().period.to_string();
        let mut period = self.calendar.period_of(account.created_at);
        let mut out = Vec::new();
        while period <= current {
            if let Some(invoice) = self.get_for(user, &account, &period, &current).await? {
                out.push(invoice);
            }
            period = next_period(&period);
        }
        Ok(out)
    }

    /// One period's invoice: stored if closed (numbering it on first use),
    /// a draft if current, an error if there is none.
    pub async fn get(&self, user: &UserId, period: &str) -> Result<Invoice, InvoiceError> {
        self.seller()?;
        let account = self.account(user).await?;
        let current = self.calendar.now().period.to_string();
        self.get_for(user, &account, period, &current)
            .await?
            .ok_or_else(|| InvoiceError::NoInvoice(period.to_owned()))
    }

    async fn get_for(
        &self,
        user: &UserId,
        account: &Account,
        period: &str,
        current: &str,
    ) -> Result<Option<Invoice>, InvoiceError> {
        if period > current {
            return Ok(None);
        }
        if let Some(stored) = self.stored(user, period).await? {
            return Ok(Some(stored));
        }
        let Some(invoice) = self.compute(user, account, period).await? else {
            return Ok(None);
        };
        if period == current {
            return Ok(Some(invoice));
        }
        self.issue(user, invoice).await.map(Some)
    }

    async fn stored(&self, user: &UserId, period: &str) -> Result<Option<Invoice>, InvoiceError> {
        stored_in(&self.pool, user, period).await
    }

    /// Numbers and stores a closed period's invoice. The seller's counter
    /// row is locked first, so assignments run one at a time: the number
    /// is the counter's next, and an invoice another caller stored while
    /// this one waited is returned instead of a second one.
    async fn issue(&self, user: &UserId, mut invoice: Invoice) -> Result<Invoice, InvoiceError> {
        let seller_key = invoice.seller.nif.clone();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO invoice_counters (seller, last) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        )
        .bind(&seller_key)
        .execute(&mut *tx)
        .await?;
        let last: i64 =
            sqlx::query_scalar("SELECT last FROM invoice_counters WHERE seller = $1 FOR UPDATE")
                .bind(&seller_key)
                .fetch_one(&mut *tx)
                .await?;
        if let Some(existing) = stored_in(&mut *tx, user, &invoice.period).await? {
            return Ok(existing);
        }
        let number = last + 1;
        let issued_on = self.calendar.now().local_date();
        invoice.number = Some(format!("{}/{number:06}", issued_on.format("%Y")));
        invoice.issued_on = Some(issued_on);
        let content =
            serde_json::to_value(&invoice).map_err(|e| InvoiceError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO invoices (user_id, period, seller, number, content)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(user.as_str())
        .bind(&invoice.period)
        .bind(&seller_key)
        .bind(number)
        .bind(&content)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE invoice_counters SET last = $2 WHERE seller = $1")
            .bind(&seller_key)
            .bind(number)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(invoice)
    }

    /// Numbers the invoices of every account for a closed period (the
    /// monthly reset calls it for the period just ended). Returns how many
    /// were issued or already there.
    pub async fn close_period(&self, period: &str) -> Result<u64, InvoiceError> {
        self.seller()?;
        let Some((_, end)) = self.calendar.period_bounds(period) else {
            return Ok(0);
        };
        let users: Vec<String> =
            sqlx::query_scalar("SELECT id FROM users WHERE created_at < $1 ORDER BY id")
                .bind(end)
                .fetch_all(&self.pool)
                .await?;
        let current = self.calendar.now().period.to_string();
        let mut n = 0;
        for id in users {
            let Ok(user) = UserId::parse(&id) else {
                continue;
            };
            let account = self.account(&user).await?;
            if self
                .get_for(&user, &account, period, &current)
                .await?
                .is_some()
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The period before the current one, which the monthly reset closes.
    pub fn previous_period(&self) -> String {
        previous_period(self.calendar.now().period.as_str())
    }
}

/// A stored invoice, through the pool or inside a transaction.
async fn stored_in<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    user: &UserId,
    period: &str,
) -> Result<Option<Invoice>, InvoiceError> {
    let content: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT content FROM invoices WHERE user_id = $1 AND period = $2")
            .bind(user.as_str())
            .bind(period)
            .fetch_optional(executor)
            .await?;
    content
        .map(|c| serde_json::from_value(c).map_err(|e| InvoiceError::Corrupt(e.to_string())))
        .transpose()
}

/// `2026-01` → `2025-12`.
pub(crate) fn previous_period(period: &str) -> String {
    match split_period(period) {
        Some((y, 1)) => format!("{:04}-12", y - 1),
        Some((y, m)) => format!("{y:04}-{:02}", m - 1),
        None => "1969-12".into(),
    }
}

fn split_period(period: &str) -> Option<(i32, u32)> {
    let (y, m) = period.split_once('-')?;
    Some((y.parse().ok()?, m.parse().ok()?))
}

fn next_period(period: &str) -> String {
    match split_period(period) {
        Some((y, 12)) => format!("{:04}-01", y + 1),
        Some((y, m)) => format!("{y:04}-{:02}", m + 1),
        None => "9999-12".into(),
    }
}

const MONTHS: [&str; 12] = [
    "janvier",
    "février",
    "mars",
    "avril",
    "mai",
    "juin",
    "juillet",
    "août",
    "septembre",
    "octobre",
    "novembre",
    "décembre",
];

/// `2026-11` → "novembre 2026".
pub fn month_name(period: &str) -> String {
    match split_period(period) {
        Some((y, m)) if (1..=12).contains(&m) => format!("{} {y}", MONTHS[(m - 1) as usize]),
        _ => period.to_owned(),
    }
}

/// Centimes as a French amount: `238000` → "2 380,00 DZD".
pub fn amount(centimes: i64) -> String {
    let sign = if centimes < 0 { "-" } else { "" };
    let c = centimes.unsigned_abs();
    let whole = (c / 100).to_string();
    let mut grouped = String::new();
    for (i, ch) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i).is_multiple_of(3) {
            grouped.push(' ');
        }
        grouped.push(ch);
    }
    format!("{sign}{grouped},{:02} DZD", c % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_and_months_read_as_in_french() {
        assert_eq!(amount(238_000), "2 380,00 DZD");
        assert_eq!(amount(5), "0,05 DZD");
        assert_eq!(amount(123_456_789), "1 234 567,89 DZD");
        assert_eq!(month_name("2026-11"), "novembre 2026");
        assert_eq!(month_name("2027-02"), "février 2027");
        assert_eq!(next_period("2026-12"), "2027-01");
        assert_eq!(next_period("2026-09"), "2026-10");
        assert_eq!(previous_period("2026-01"), "2025-12");
        assert_eq!(previous_period("2026-11"), "2026-10");
    }
}
