//! The one place where failures become HTTP answers.
//!
//! Every layer has its own error type (`MeterError`, `AccountError`,
//! `UpstreamError`, ...); they convert into [`ApiError`], and
//! [`ApiError::into_response`] is the only function that picks a status,
//! a `{"error": {"code", "message"}}` body and `Retry-After`.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::accounts::AccountError;
use crate::billing::BillingError;
use crate::body::{self, Body};
use crate::domain::ModuleId;
use crate::metering::{MeterError, Refusal, Stamp};

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
    BadRequest {
        code: &'static str,
        message: String,
    },
    NotFound,
    UnknownUser(String),
    /// A well-formed request about something that does not exist (a key,
    /// a charge to refund): 404 with its own code.
    NotFoundCode {
        code: &'static str,
        message: String,
    },
    Forbidden(&'static str),
    MethodNotAllowed,
    Overloaded,
    Internal,
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
            Self::NotFound | Self::UnknownUser(_) | Self::NotFoundCode { .. } => {
                StatusCode::NOT_FOUND
            }
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
            Self::BadRequest { code, .. } => code,
            Self::NotFound => "not_found",
            Self::UnknownUser(_) => "unknown_user",
            Self::NotFoundCode { code, .. } => code,
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
            Self::NotFoundCode { message, .. } => message.clone(),
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

impl ApiError {
    /// A refusal by charge.lua, as the proxy and the credits API answer it.
    pub fn refusal(refusal: Refusal, module: &ModuleId, cost: i64, stamp: &Stamp) -> Self {
        match refusal {
            Refusal::UnknownKey => Self::Unauthenticated("API key revoked"),
            Refusal::KeyExpired => Self::KeyExpired,
            Refusal::KeyScope => Self::KeyScope(module.to_string()),
            Refusal::Blocked => Self::Blocked,
            Refusal::ModuleNotInPlan => Self::ModuleNotInPlan(module.to_string()),
            Refusal::DailyLimit(b) => Self::DailyLimit {
                limit: b.daily_limit.unwrap_or(0),
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
        }
    }
}

impl From<crate::invoices::InvoiceError> for ApiError {
    fn from(e: crate::invoices::InvoiceError) -> Self {
        use crate::invoices::InvoiceError;
        match e {
            InvoiceError::NotConfigured => ApiError::NotFoundCode {
                code: "invoices_not_configured",
                message: "invoicing is not configured on this gateway ([invoices] seller)".into(),
            },
            InvoiceError::NoInvoice(period) => ApiError::NotFoundCode {
                code: "unknown_invoice",
                message: format!("no invoice for period {period:?}"),
            },
            InvoiceError::UnknownUser => ApiError::NotFoundCode {
                code: "unknown_user",
                message: "no such user".into(),
            },
            InvoiceError::Database(e) => e.into(),
            InvoiceError::Corrupt(why) => {
                tracing::error!(%why, "a stored invoice cannot be read");
                ApiError::Internal
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
            AccountError::Database(err) if rejected_value(&err) => Self::BadRequest {
                code: "invalid_request",
                message: "a value was refused by the database (control characters?)".into(),
            },
            AccountError::Database(err) => {
                crate::telemetry::metrics::postgres_error();
                tracing::warn!(error = %err, "database unavailable");
                Self::DatabaseUnavailable
            }
            AccountError::UnknownUser(user) => Self::UnknownUser(user.to_string()),
            AccountError::UnknownPlan(_) => Self::BadRequest {
                code: "unknown_plan",
                message: e.to_string(),
            },
            AccountError::UnknownKey(_) => Self::NotFoundCode {
                code: "unknown_key",
                message: e.to_string(),
            },
            AccountError::IdempotencyKeyReused => Self::AdminIdempotencyKeyReused,
            AccountError::InvalidKey(_) => Self::BadRequest {
                code: "invalid_key",
                message: e.to_string(),
            },
            AccountError::TooManyKeys(_) => Self::BadRequest {
                code: "too_many_keys",
                message: e.to_string(),
            },
            AccountError::LookupsSaturated => Self::Overloaded,
            AccountError::UserExists(_) => Self::BadRequest {
                code: "user_exists",
                message: e.to_string(),
            },
            AccountError::Corrupt(detail) => {
                tracing::error!(%detail, "corrupt account data");
                Self::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn render(e: ApiError) -> (u16, Option<String>, serde_json::Value) {
        let r = e.into_response();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = r
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let json = serde_json::from_slice(&bytes).unwrap_or_default();
        (status, retry, json)
    }

    #[tokio::test]
    async fn spec_table_of_refusals() {
        let table = [
            (
                ApiError::Unauthenticated("no key"),
                401,
                "unauthenticated",
                None,
            ),
            (ApiError::KeyExpired, 401, "key_expired", None),
            (ApiError::KeyScope("legal".into()), 403, "key_scope", None),
            (ApiError::Blocked, 403, "blocked", None),
            (
                ApiError::ModuleNotInPlan("legal".into()),
                403,
                "module_not_in_plan",
                None,
            ),
            (
                ApiError::InsufficientCredits {
                    cost: 3,
                    remaining: 1,
                },
                402,
                "insufficient_credits",
                None,
            ),
            (
                ApiError::DailyLimit {
                    limit: 20,
                    retry_after_secs: 3600,
                },
                429,
                "daily_limit",
                Some("3600"),
            ),
            (
                ApiError::RateLimited {
                    retry_after_secs: 2,
                },
                429,
                "rate_limited",
                Some("2"),
            ),
            (
                ApiError::MeteringUnavailable,
                503,
                "metering_unavailable",
                Some("1"),
            ),
            (
                ApiError::UpstreamUnavailable,
                502,
                "upstream_unavailable",
                None,
            ),
            (
                ApiError::UpstreamTimeout(Duration::from_secs(1)),
                504,
                "upstream_timeout",
                None,
            ),
            (
                ApiError::PayloadTooLarge { limit: 10 },
                413,
                "payload_too_large",
                None,
            ),
            (ApiError::Overloaded, 503, "overloaded", Some("1")),
            (ApiError::BadPath, 400, "bad_path", None),
            (
                ApiError::RequestTimeout(Duration::from_secs(30)),
                408,
                "request_timeout",
                None,
            ),
            (
                ApiError::RequestInProgress("r1".into()),
                409,
                "request_in_progress",
                Some("1"),
            ),
            (
                ApiError::RedisUnavailable("saved; applies when Redis answers"),
                503,
                "redis_unavailable",
                Some("1"),
            ),
            (
                ApiError::AdminIdempotencyKeyReused,
                422,
                "idempotency_key_reused",
                None,
            ),
            (
                ApiError::DuplicateRequest("r1".into()),
                409,
                "duplicate_request",
                None,
            ),
            (
                ApiError::IdempotencyKeyReused("r1".into()),
                422,
                "idempotency_key_reused",
                None,
            ),
        ];
        for (err, status, code, retry) in table {
            let (s, r, body) = render(err).await;
            assert_eq!(s, status, "{code}");
            assert_eq!(r.as_deref(), retry, "{code}");
            assert_eq!(body["error"]["code"], code);
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
    }
}
