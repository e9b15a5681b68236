//! The one place where failures become HTTP answers.
//!
//! Every layer has its own error type (`MeterError`, `AccountError`,
//! `BillingError`, `UpstreamError`, `InvoiceError`); each one that can
//! reach a client converts into [`ApiError`] here, and nowhere else.
//! [`ApiError::into_response`] is the only function that picks a status,
//! a `{"error": {"code", "message"}}` body and `Retry-After`. Startup and
//! configuration errors never reach a client: they end the process.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::accounts::AccountError;
use crate::billing::BillingError;
use crate::body::{self, Body};
use crate::domain::{Credits, ModuleId};
use crate::metering::{MeterError, Refusal, Stamp};
use crate::upstream::UpstreamError;

#[derive(Debug, PartialEq, Eq)]
pub enum ApiError {
    Unauthenticated(&'static str),
    /// The API key's expiry has passed.
    KeyExpired,
    /// The API key is limited to other modules than this one.
    KeyScope(String),
    Blocked,
    ModuleNotInPlan(String),
    InsufficientCredits {
        cost: i64,
        remaining: i64,
    },
    DailyLimit {
        limit: i64,
        retry_after_secs: u64,
    },
    RateLimited {
        retry_after_secs: u64,
    },
    MeteringUnavailable,
    DatabaseUnavailable,
    UpstreamUnavailable,
    UpstreamTimeout(Duration),
    PayloadTooLarge {
        limit: u64,
    },
    /// A dot segment or an encoded slash: refused before routing, so a
    /// request can only reach the module whose price it pays.
    BadPath,
    /// The request body sent nothing for this long.
    RequestTimeout(Duration),
    /// The first call under this `Idempotency-Key` (request id inside) has
    /// not completed.
    RequestInProgress(String),
    /// The first call completed but its response cannot be replayed.
    DuplicateRequest(String),
    /// The key was first used for another module, method or path.
    IdempotencyKeyReused(String),
    /// An admin Idempotency-Key first used for a different request.
    AdminIdempotencyKeyReused,
    /// An admin write Redis did not confirm; the message says what state
    /// things are in and how to finish (admin wording, never the proxy's).
    RedisUnavailable(&'static str),
    InvalidHeader(String),
    /// 400: the request's content is refused; the code says which rule.
    BadRequest {
        code: InvalidCode,
        message: String,
    },
    NotFound,
    UnknownUser(String),
    /// A well-formed request about something that does not exist (a key,
    /// a charge to refund): 404 with its own code.
    Missing {
        code: MissingCode,
        message: String,
    },
    Forbidden(&'static str),
    MethodNotAllowed,
    Overloaded,
    Internal,
}

/// The codes of 400 answers about a request's content. An enum, not
/// strings at the call sites, so the set of codes clients see is this list
/// and the API documentation can be checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidCode {
    /// A field is missing, of the wrong type or out of range.
    Request,
    Query,
    Json,
    UnsupportedMediaType,
    /// The body could not be read at all.
    Body,
    Key,
    Amount,
    BonusLimit,
    UnknownPlan,
    UnknownModule,
    TooManyKeys,
    UserExists,
    EndpointNotConfigured,
}

impl InvalidCode {
    pub const ALL: [Self; 13] = [
        Self::Request,
        Self::Query,
        Self::Json,
        Self::UnsupportedMediaType,
        Self::Body,
        Self::Key,
        Self::Amount,
        Self::BonusLimit,
        Self::UnknownPlan,
        Self::UnknownModule,
        Self::TooManyKeys,
        Self::UserExists,
        Self::EndpointNotConfigured,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Request => "invalid_request",
            Self::Query => "invalid_query",
            Self::Json => "invalid_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Body => "invalid_body",
            Self::Key => "invalid_key",
            Self::Amount => "invalid_amount",
            Self::BonusLimit => "bonus_limit",
            Self::UnknownPlan => "unknown_plan",
            Self::UnknownModule => "unknown_module",
            Self::TooManyKeys => "too_many_keys",
            Self::UserExists => "user_exists",
            Self::EndpointNotConfigured => "endpoint_not_configured",
        }
    }
}

/// The codes of 404 answers about a named thing that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingCode {
    Charge,
    Delivery,
    Invoice,
    InvoicesNotConfigured,
    Key,
    User,
}

impl MissingCode {
    pub const ALL: [Self; 6] = [
        Self::Charge,
        Self::Delivery,
        Self::Invoice,
        Self::InvoicesNotConfigured,
        Self::Key,
        Self::User,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge_not_found",
            Self::Delivery => "unknown_delivery",
            Self::Invoice => "unknown_invoice",
            Self::InvoicesNotConfigured => "invoices_not_configured",
            Self::Key => "unknown_key",
            Self::User => "unknown_user",
        }
    }
}

/// Seconds a client should wait before retrying when a dependency is down:
/// short, since the gateway reconnects by itself.
const DEPENDENCY_RETRY_SECS: u64 = 1;

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) | Self::KeyExpired => StatusCode::UNAUTHORIZED,
            Self::Blocked | Self::ModuleNotInPlan(_) | Self::KeyScope(_) => StatusCode::FORBIDDEN,
            Self::InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
            Self::DailyLimit { .. } | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::MeteringUnavailable | Self::DatabaseUnavailable | Self::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::RequestInProgress(_) | Self::DuplicateRequest(_) => StatusCode::CONFLICT,
            Self::IdempotencyKeyReused(_) | Self::AdminIdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::RedisUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadPath | Self::InvalidHeader(_) | Self::BadRequest { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::NotFound | Self::UnknownUser(_) | Self::Missing { .. } => StatusCode::NOT_FOUND,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::KeyExpired => "key_expired",
            Self::KeyScope(_) => "key_scope",
            Self::Blocked => "blocked",
            Self::ModuleNotInPlan(_) => "module_not_in_plan",
            Self::InsufficientCredits { .. } => "insufficient_credits",
            Self::DailyLimit { .. } => "daily_limit",
            Self::RateLimited { .. } => "rate_limited",
            Self::MeteringUnavailable => "metering_unavailable",
            Self::DatabaseUnavailable => "database_unavailable",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::BadPath => "bad_path",
            Self::RequestTimeout(_) => "request_timeout",
            Self::RequestInProgress(_) => "request_in_progress",
            Self::DuplicateRequest(_) => "duplicate_request",
            Self::IdempotencyKeyReused(_) | Self::AdminIdempotencyKeyReused => {
                "idempotency_key_reused"
            }
            Self::RedisUnavailable(_) => "redis_unavailable",
            Self::InvalidHeader(_) => "invalid_header",
            Self::BadRequest { code, .. } => code.as_str(),
            Self::NotFound => "not_found",
            Self::UnknownUser(_) => "unknown_user",
            Self::Missing { code, .. } => code.as_str(),
            Self::Forbidden(_) => "forbidden",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Overloaded => "overloaded",
            Self::Internal => "internal",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::Unauthenticated(why) => format!("authentication required: {why}"),
            Self::KeyExpired => "this API key has expired; create a new one".into(),
            Self::KeyScope(m) => format!("this API key may not call module {m}"),
            Self::Blocked => "this account is blocked; contact support".into(),
            Self::ModuleNotInPlan(m) => format!("module {m} is not included in your plan"),
            Self::InsufficientCredits { cost, remaining } => {
                format!("this call costs {cost} credits and {remaining} remain")
            }
            Self::DailyLimit { limit, .. } => {
                format!("daily limit of {limit} credits reached; it resets at local midnight")
            }
            Self::RateLimited { .. } => "too many requests; slow down".into(),
            Self::MeteringUnavailable => {
                "credit metering is temporarily unavailable; nothing was charged".into()
            }
            Self::DatabaseUnavailable => "the account database is temporarily unavailable".into(),
            Self::UpstreamUnavailable => {
                "the service could not be reached; the charge was refunded".into()
            }
            Self::UpstreamTimeout(d) => format!(
                "the service did not answer within {} ms; the charge was refunded",
                d.as_millis()
            ),
            Self::PayloadTooLarge { limit } => {
                format!("request body larger than {limit} bytes")
            }
            Self::BadPath => {
                "dot segments (., ..) and encoded slashes (%2F, %5C) are not allowed in paths"
                    .into()
            }
            Self::RequestTimeout(d) => format!(
                "the request body sent nothing for {} ms; the charge was refunded",
                d.as_millis()
            ),
            Self::RequestInProgress(original) => format!(
                "the first request with this Idempotency-Key ({original}) has not completed; retry later"
            ),
            Self::DuplicateRequest(original) => format!(
                "this Idempotency-Key was already used by request {original}, whose response cannot be replayed; use a new key for a new call"
            ),
            Self::IdempotencyKeyReused(original) => format!(
                "this Idempotency-Key was used by request {original} for another module, method or path"
            ),
            Self::AdminIdempotencyKeyReused => {
                "this Idempotency-Key was already used for a different request".into()
            }
            Self::RedisUnavailable(what) => (*what).to_owned(),
            Self::InvalidHeader(m) => m.clone(),
            Self::BadRequest { message, .. } => message.clone(),
            Self::NotFound => "no such route".into(),
            Self::UnknownUser(u) => format!("no such user {u}"),
            Self::Missing { message, .. } => message.clone(),
            Self::Forbidden(why) => (*why).to_owned(),
            Self::MethodNotAllowed => "method not allowed on this route".into(),
            Self::Overloaded => "the gateway is at capacity; retry shortly".into(),
            Self::Internal => "internal error".into(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::DailyLimit {
                retry_after_secs, ..
            }
            | Self::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            Self::MeteringUnavailable
            | Self::DatabaseUnavailable
            | Self::Overloaded
            | Self::RedisUnavailable(_)
            | Self::RequestInProgress(_) => Some(DEPENDENCY_RETRY_SECS),
            _ => None,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let payload = json!({"error": {"code": self.code(), "message": self.message()}});
        let mut response = body::json(self.status(), &payload);
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The API plane's handlers and extractors fail with an `ApiError`.
impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        ApiError::into_response(self).map(axum::body::Body::new)
    }
}

impl ApiError {
    pub fn bad_request(code: InvalidCode, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_request`: the most common refusal of a field.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::bad_request(InvalidCode::Request, message)
    }

    /// 400 `invalid_request` naming the field at fault.
    pub fn invalid_field(field: &str, why: impl std::fmt::Display) -> Self {
        Self::invalid_request(format!("{field}: {why}"))
    }

    /// The `Idempotency-Key` header, if sent, as the proxy, the credits API
    /// and the admin writes all read it: 400 `invalid_header` when unusable.
    pub fn idempotency_key(
        headers: &http::HeaderMap,
    ) -> Result<Option<crate::domain::IdempotencyKey>, Self> {
        crate::domain::IdempotencyKey::from_headers(headers)
            .map_err(|_| Self::bad_idempotency_key())
    }

    pub fn bad_idempotency_key() -> Self {
        Self::InvalidHeader("Idempotency-Key must be 1 to 128 visible ASCII characters".into())
    }

    pub fn missing(code: MissingCode, message: impl Into<String>) -> Self {
        Self::Missing {
            code,
            message: message.into(),
        }
    }

    /// A billing failure as the proxy answers its caller: a key whose user
    /// Postgres no longer has is no key at all (401), where the admin API
    /// says 404 about the same user.
    pub fn for_caller(e: BillingError) -> Self {
        match e {
            BillingError::UnknownUser(_) => Self::Unauthenticated("unknown user"),
            e => e.into(),
        }
    }

    /// A refusal by charge.lua, as the proxy and the credits API answer it.
    pub fn refusal(refusal: Refusal, module: &ModuleId, cost: i64, stamp: &Stamp) -> Self {
        match refusal {
            Refusal::UnknownKey => Self::Unauthenticated("API key revoked"),
            Refusal::KeyExpired => Self::KeyExpired,
            Refusal::KeyScope => Self::KeyScope(module.to_string()),
            Refusal::Blocked => Self::Blocked,
            Refusal::ModuleNotInPlan => Self::ModuleNotInPlan(module.to_string()),
            Refusal::DailyLimit(b) => Self::DailyLimit {
                limit: b.daily_limit.map_or(0, Credits::get),
                retry_after_secs: stamp.secs_to_day_end(),
            },
            Refusal::InsufficientCredits(b) => Self::InsufficientCredits {
                cost,
                remaining: b.remaining(),
            },
            // Retry-After is whole seconds: rounded up, so a client that
            // waits exactly that long is served.
            Refusal::RateLimited(wait_ms) => Self::RateLimited {
                retry_after_secs: wait_ms.div_ceil(1000).max(1),
            },
        }
    }
}

impl From<MeterError> for ApiError {
    fn from(e: MeterError) -> Self {
        tracing::warn!(error = %e, "metering unavailable");
        Self::MeteringUnavailable
    }
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::Meter(e) => e.into(),
            BillingError::Account(e) => e.into(),
            BillingError::UnknownUser(user) => Self::UnknownUser(user.to_string()),
            BillingError::RebuildFailed(user) => {
                tracing::error!(%user, "account rebuild did not stick");
                Self::MeteringUnavailable
            }
            BillingError::NotMirrored(_) => Self::RedisUnavailable(
                "Redis did not answer: the change is saved and reaches every gateway within a second of Redis answering again; repeating this call is safe",
            ),
        }
    }
}

impl From<crate::invoices::InvoiceError> for ApiError {
    fn from(e: crate::invoices::InvoiceError) -> Self {
        use crate::invoices::InvoiceError;
        match e {
            InvoiceError::NotConfigured => ApiError::missing(
                MissingCode::InvoicesNotConfigured,
                "invoicing is not configured on this gateway ([invoices] seller)",
            ),
            InvoiceError::NoInvoice(period) => ApiError::missing(
                MissingCode::Invoice,
                format!("no invoice for period {period:?}"),
            ),
            InvoiceError::UnknownUser => ApiError::missing(MissingCode::User, "no such user"),
            InvoiceError::Database(e) => e.into(),
            InvoiceError::Corrupt(why) => {
                tracing::error!(%why, "a stored invoice cannot be read");
                ApiError::Internal
            }
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Timeout(d) => Self::UpstreamTimeout(d),
            UpstreamError::BodyTooLarge(limit) => Self::PayloadTooLarge { limit },
            UpstreamError::BodyStalled(d) => Self::RequestTimeout(d),
            UpstreamError::Unreachable(_) | UpstreamError::BadUri(_) => {
                tracing::warn!(error = %e, "upstream failed");
                Self::UpstreamUnavailable
            }
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        AccountError::Database(e).into()
    }
}

/// Postgres refusing a value (a NUL byte in text, say) is the input's
/// fault, not an outage: 400, never 503. Edge validation should have caught
/// it first; this is the net under it.
fn rejected_value(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code.starts_with("22"))
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::Database(err) if rejected_value(&err) => {
                Self::invalid_request("a value was refused by the database (control characters?)")
            }
            AccountError::Database(err) => {
                crate::telemetry::metrics::postgres_error();
                tracing::warn!(error = %err, "database unavailable");
                Self::DatabaseUnavailable
            }
            AccountError::UnknownUser(user) => Self::UnknownUser(user.to_string()),
            AccountError::UnknownPlan(_) => {
                Self::bad_request(InvalidCode::UnknownPlan, e.to_string())
            }
            AccountError::UnknownKey(_) => Self::missing(MissingCode::Key, e.to_string()),
            AccountError::IdempotencyKeyReused => Self::AdminIdempotencyKeyReused,
            AccountError::InvalidKey(_) => Self::bad_request(InvalidCode::Key, e.to_string()),
            AccountError::TooManyKeys(_) => {
                Self::bad_request(InvalidCode::TooManyKeys, e.to_string())
            }
            AccountError::LookupsSaturated => Self::Overloaded,
            AccountError::UserExists(_) => {
                Self::bad_request(InvalidCode::UserExists, e.to_string())
            }
            AccountError::Corrupt(detail) => {
                tracing::error!(%detail, "corrupt account data");
                Self::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests;
