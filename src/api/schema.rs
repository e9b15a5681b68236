//! The JSON shapes of the API, in one place. Handlers build these types
//! (never ad-hoc JSON), and `/api/openapi.json` is generated from them, so
//! the document cannot drift from what the handlers send.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::catalog::Plan;

/// `{"error": {"code", "message"}}`: every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable, e.g. `insufficient_credits`, `daily_limit`.
    pub code: String,
    pub message: String,
}

#[derive(Serialize, ToSchema)]
pub struct PlanView {
    pub id: String,
    pub name: String,
    pub monthly_credits: i64,
    /// Credits per local day; null when unlimited.
    pub daily_limit: Option<i64>,
    pub price_dzd: i64,
    pub modules: Vec<String>,
    pub features: Vec<String>,
    /// Calls per minute per account; null when unlimited.
    pub rate_limit: Option<RateLimitView>,
}

/// A plan's rate limit: `burst` calls at once, then one every
/// `60 s / per_minute` (GCRA).
#[derive(Serialize, ToSchema)]
pub struct RateLimitView {
    pub per_minute: u32,
    pub burst: u32,
}

impl From<&Plan> for PlanView {
    fn from(p: &Plan) -> Self {
        Self {
            id: p.id.to_string(),
            name: p.name.clone(),
            monthly_credits: p.monthly_credits.get(),
            daily_limit: p.daily_limit.map(|l| l.get()),
            price_dzd: p.price_dzd,
            modules: p.modules.iter().map(ToString::to_string).collect(),
            features: p.features.clone(),
            rate_limit: p.rate_limit.map(|r| RateLimitView {
                per_minute: r.per_minute,
                burst: r.burst,
            }),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct PlansAnswer {
    pub plans: Vec<PlanView>,
}

#[derive(Serialize, ToSchema)]
pub struct CreditCost {
    pub module: String,
    /// The service's name for people (`Recherche documentaire (RAG)`).
    pub label: String,
    /// One line on what it does; empty when not configured.
    pub description: String,
    pub cost: i64,
    pub prefix: String,
    /// Per-action prices (`X-Action` header / `action` field).
    pub actions: BTreeMap<String, i64>,
}

#[derive(Serialize, ToSchema)]
pub struct CreditCostsAnswer {
    pub modules: Vec<CreditCost>,
}

#[derive(Serialize, ToSchema)]
pub struct Credits {
    pub remaining: i64,
    pub monthly_remaining: i64,
    pub monthly_allowance: i64,
    pub bonus: i64,
}

#[derive(Serialize, ToSchema)]
pub struct Daily {
    pub used: i64,
    pub limit: Option<i64>,
    pub resets_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct Period {
    /// `YYYY-MM` in the deployment's time zone.
    pub id: String,
    pub start: DateTime<Utc>,
    pub resets_at: DateTime<Utc>,
    /// The local date the next period starts (the renewal), as the
    /// deployment's calendar has it: `2026-12-01`.
    pub renews_on: NaiveDate,
}

#[derive(Serialize, ToSchema)]
pub struct MeAnswer {
    pub user_id: String,
    pub name: String,
    pub email: Option<String>,
    pub plan: Option<PlanView>,
    /// `active` or `blocked`.
    pub status: String,
    /// Blocked by the auto-block policy until credits come back.
    pub auto_blocked: bool,
    pub credits: Credits,
    pub daily: Daily,
    pub period: Period,
    /// The deployment's time zone (IANA name): days, periods and renewals
    /// are counted in it, and the panels show times in it.
    pub timezone: String,
}

pub use crate::ledger::reports::{DayUsage, LedgerRow, ModuleTotal};

#[derive(Serialize, ToSchema)]
pub struct Transactions {
    pub items: Vec<LedgerRow>,
    pub page: i64,
    pub per_page: i64,
    pub total: i64,
}

#[derive(Serialize, ToSchema)]
pub struct UsageAnswer {
    pub days: i64,
    pub from: NaiveDate,
    pub totals: Vec<ModuleTotal>,
    pub series: Vec<DayUsage>,
    pub transactions: Transactions,
}

// ------------------------------------------------------------ credits API

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    #[schema(pattern = "^[A-Za-z0-9_.@-]{1,64}$")]
    pub user_id: String,
    #[schema(pattern = "^[a-z0-9_]{1,32}$")]
    pub module: String,
    #[schema(pattern = "^[a-z0-9_]{1,32}$")]
    pub action: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct CheckAnswer {
    pub can_proceed: bool,
    pub cost: i64,
    pub credits_remaining: i64,
    pub daily_used: i64,
    pub daily_limit: Option<i64>,
    /// Why not, when `can_proceed` is false (an error code).
    pub reason: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumeBody {
    #[schema(pattern = "^[A-Za-z0-9_.@-]{1,64}$")]
    pub user_id: String,
    #[schema(pattern = "^[a-z0-9_]{1,32}$")]
    pub module: String,
    #[schema(pattern = "^[a-z0-9_]{1,32}$")]
    pub action: Option<String>,
    /// Charged at most once per user within 24 h.
    #[schema(pattern = "^[!-~]{1,128}$")]
    pub request_id: String,
}

#[derive(Serialize, ToSchema)]
pub struct ConsumeAnswer {
    pub success: bool,
    pub charged: i64,
    pub credits_remaining: i64,
    pub duplicate: bool,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundBody {
    #[schema(pattern = "^[A-Za-z0-9_.@-]{1,64}$")]
    pub user_id: String,
    #[schema(pattern = "^[!-~]{1,128}$")]
    pub request_id: String,
}

#[derive(Serialize, ToSchema)]
pub struct RefundAnswer {
    pub success: bool,
    pub refunded: i64,
    pub credits_remaining: i64,
}

#[derive(Serialize, ToSchema)]
pub struct ResetAnswer {
    pub period: String,
    pub accounts: u64,
    pub reset: u64,
    pub already_current: u64,
}

// ------------------------------------------------------------ admin API

#[derive(Serialize, ToSchema)]
pub struct UserRow {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
    pub plan: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub credits_remaining: i64,
    pub used_this_month: i64,
}

#[derive(Serialize, ToSchema)]
pub struct UserList {
    pub users: Vec<UserRow>,
    pub page: i64,
    pub per_page: i64,
    pub total: i64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    /// 1 to 100 characters, not only spaces, no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\x00-\\x1f\\x7f]*[^\\s\\x00-\\x1f\\x7f][^\\x00-\\x1f\\x7f]*$"
    )]
    pub name: String,
    #[schema(format = Email, max_length = 254)]
    pub email: Option<String>,
    #[schema(pattern = "^[a-z0-9_]{1,32}$")]
    pub plan: String,
    /// Use the platform Hub's id instead of a generated one.
    #[schema(pattern = "^[A-Za-z0-9_.@-]{1,64}$")]
    pub id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UserSummary {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
    pub plan: String,
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedUser {
    pub user: UserSummary,
    /// Shown once; only its hash is stored. Absent when an Idempotency-Key
    /// replays an earlier creation: mint another key for that user then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    pub key_id: Uuid,
}

/// An API key as its owner and the admins see it: its name and first
/// characters, never the key.
#[derive(Serialize, ToSchema)]
pub struct KeyView {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    /// null: never expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// The only modules it may call; null: every module of the plan.
    pub modules: Option<Vec<String>>,
    /// Recorded about once a minute, not per request.
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<crate::accounts::KeyInfo> for KeyView {
    fn from(k: crate::accounts::KeyInfo) -> Self {
        Self {
            id: k.id,
            name: k.name,
            prefix: k.prefix,
            created_at: k.created_at,
            expires_at: k.expires_at,
            modules: k.modules,
            last_used_at: k.last_used_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// `GET /api/billing/keys`: the caller's live keys.
#[derive(Serialize, ToSchema)]
pub struct KeysAnswer {
    pub keys: Vec<KeyView>,
    /// `auth.max_keys_per_user`: live keys the user may hold.
    pub max_keys: u32,
}

/// `POST /api/billing/keys`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyBody {
    /// 1 to 64 characters, to tell the keys apart.
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    /// RFC 3339, in the future; absent: never expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// Modules of the plan the key may call; absent: all of them.
    pub modules: Option<Vec<String>>,
}

/// A key just created: the only time it is shown.
#[derive(Serialize, ToSchema)]
pub struct CreatedKeyAnswer {
    /// Shown once.
    pub api_key: String,
    pub key: KeyView,
}

#[derive(Serialize, ToSchema)]
pub struct AdminCredits {
    pub remaining: i64,
    pub monthly_remaining: i64,
    pub bonus: i64,
}

#[derive(Serialize, ToSchema)]
pub struct AdminDaily {
    pub used: i64,
    pub limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct UserDetail {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
    pub plan: Option<PlanView>,
    pub status: String,
    pub auto_blocked: bool,
    pub credits: AdminCredits,
    pub daily: AdminDaily,
    pub usage_this_month: Vec<ModuleTotal>,
    pub keys: Vec<KeyView>,
}

#[derive(Serialize, ToSchema)]
pub struct NewKeyAnswer {
    pub key_id: Uuid,
    /// Shown once.
    pub api_key: String,
}

#[derive(Serialize, ToSchema)]
pub struct RevokedAnswer {
    pub revoked: bool,
    pub key_id: Uuid,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    pub plan: String,
}

#[derive(Serialize, ToSchema)]
pub struct PlanChanged {
    pub user_id: String,
    pub plan: PlanView,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    pub reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct StatusAnswer {
    pub user_id: String,
    pub status: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    #[schema(pattern = "^[A-Za-z0-9_.@-]{1,64}$")]
    pub user_id: String,
    /// Whole credits, 1 to 1,000,000.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub credits: i64,
    #[schema(min_length = 1, max_length = 500, pattern = "\\S")]
    pub reason: String,
}

#[derive(Serialize, ToSchema)]
pub struct GrantAnswer {
    pub user_id: String,
    pub granted: i64,
    pub credits: AdminCredits,
}

#[derive(Serialize, ToSchema)]
pub struct UsersStats {
    pub total: i64,
    pub by_plan: BTreeMap<String, i64>,
    pub by_status: BTreeMap<String, i64>,
}

#[derive(Serialize, ToSchema)]
pub struct Revenue {
    /// Sum of the plan prices of active users.
    pub monthly_dzd: i64,
    /// With `?months=N`: monthly recurring revenue at the end of each of
    /// the last N months (now for the current one), oldest first, from
    /// the plan and block history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_month: Option<Vec<MonthRevenueView>>,
}

#[derive(Serialize, ToSchema)]
pub struct MonthRevenueView {
    /// `YYYY-MM`.
    pub month: String,
    pub dzd: i64,
}

#[derive(Serialize, ToSchema)]
pub struct ModuleUsage {
    pub credits: i64,
    pub requests: i64,
}

#[derive(Serialize, ToSchema)]
pub struct Consumption {
    pub today: BTreeMap<String, ModuleUsage>,
    pub this_month: BTreeMap<String, ModuleUsage>,
}

#[derive(Serialize, ToSchema)]
pub struct TopConsumer {
    pub user_id: String,
    pub name: String,
    pub plan: String,
    pub credits: i64,
}

#[derive(Serialize, ToSchema)]
pub struct StatsAnswer {
    pub users: UsersStats,
    pub revenue: Revenue,
    pub consumption: Consumption,
    pub top_consumers: Vec<TopConsumer>,
    /// The deployment's time zone (IANA name), in which days are counted.
    pub timezone: String,
    /// Present with `?days=N`: one entry per day, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily: Option<Vec<DayUsage>>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// The name of the key used (`admin:ops`, `service:hub`) or a policy.
    pub actor: String,
    pub action: String,
    pub user_id: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
    pub page: i64,
    pub per_page: i64,
    pub total: i64,
}

pub use crate::webhooks::queue::DeliveryView;

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
    pub page: i64,
    pub per_page: i64,
    pub total: i64,
}

/// One invoice in a list: amounts in centimes of DZD.
#[derive(Serialize, ToSchema)]
pub struct InvoiceSummary {
    /// `YYYY-MM`.
    pub period: String,
    /// `2026/000042`; null for the current period's draft.
    pub number: Option<String>,
    /// `issued` (a closed period, numbered) or `draft` (the current one).
    pub status: String,
    pub issued_on: Option<NaiveDate>,
    pub total_ht_centimes: i64,
    pub vat_centimes: i64,
    pub total_ttc_centimes: i64,
    /// Where its PDF is.
    pub pdf: String,
}

#[derive(Serialize, ToSchema)]
pub struct InvoiceList {
    pub invoices: Vec<InvoiceSummary>,
}
