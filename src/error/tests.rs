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

const VARIANTS: usize = 29;

fn variant_index(e: &ApiError) -> usize {
    match e {
        ApiError::Unauthenticated(_) => 0,
        ApiError::KeyExpired => 1,
        ApiError::KeyScope(_) => 2,
        ApiError::Blocked => 3,
        ApiError::ModuleNotInPlan(_) => 4,
        ApiError::InsufficientCredits { .. } => 5,
        ApiError::DailyLimit { .. } => 6,
        ApiError::RateLimited { .. } => 7,
        ApiError::MeteringUnavailable => 8,
        ApiError::DatabaseUnavailable => 9,
        ApiError::UpstreamUnavailable => 10,
        ApiError::UpstreamTimeout(_) => 11,
        ApiError::PayloadTooLarge { .. } => 12,
        ApiError::BadPath => 13,
        ApiError::RequestTimeout(_) => 14,
        ApiError::RequestInProgress(_) => 15,
        ApiError::DuplicateRequest(_) => 16,
        ApiError::IdempotencyKeyReused(_) => 17,
        ApiError::AdminIdempotencyKeyReused => 18,
        ApiError::RedisUnavailable(_) => 19,
        ApiError::InvalidHeader(_) => 20,
        ApiError::BadRequest { .. } => 21,
        ApiError::NotFound => 22,
        ApiError::UnknownUser(_) => 23,
        ApiError::Missing { .. } => 24,
        ApiError::Forbidden(_) => 25,
        ApiError::MethodNotAllowed => 26,
        ApiError::Overloaded => 27,
        ApiError::Internal => 28,
    }
}

#[tokio::test]
async fn every_code_is_distinct_and_snake_case() {
    let mut codes: Vec<&str> = InvalidCode::ALL.iter().map(|c| c.as_str()).collect();
    codes.extend(MissingCode::ALL.iter().map(|c| c.as_str()));
    for code in &codes {
        assert!(
            code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{code}"
        );
    }
    let distinct: std::collections::BTreeSet<_> = codes.iter().collect();
    assert_eq!(distinct.len(), codes.len(), "two codes share a name");
    // Each code is what the answer carries, as a 400 or a 404.
    for code in InvalidCode::ALL {
        let (status, _, body) = render(ApiError::bad_request(code, "why")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some(code.as_str()))
        );
    }
    for code in MissingCode::ALL {
        let (status, _, body) = render(ApiError::missing(code, "what")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some(code.as_str()))
        );
    }
}

#[test]
fn upstream_failures_map_to_gateway_answers() {
    let d = Duration::from_millis(250);
    let table = [
        (UpstreamError::Timeout(d), ApiError::UpstreamTimeout(d)),
        (
            UpstreamError::BodyTooLarge(10),
            ApiError::PayloadTooLarge { limit: 10 },
        ),
        (UpstreamError::BodyStalled(d), ApiError::RequestTimeout(d)),
        (
            UpstreamError::Unreachable("refused".into()),
            ApiError::UpstreamUnavailable,
        ),
        (
            UpstreamError::BadUri("x".into()),
            ApiError::UpstreamUnavailable,
        ),
    ];
    for (from, to) in table {
        assert_eq!(ApiError::from(from), to);
    }
}

#[test]
fn an_unknown_user_is_a_404_to_admins_and_a_401_to_callers() {
    let user = crate::domain::UserId::parse("u1").expect("valid id");
    assert_eq!(
        ApiError::from(BillingError::UnknownUser(user.clone())).status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        ApiError::for_caller(BillingError::UnknownUser(user)).status(),
        StatusCode::UNAUTHORIZED
    );
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
        (
            ApiError::DatabaseUnavailable,
            503,
            "database_unavailable",
            Some("1"),
        ),
        (
            ApiError::InvalidHeader("bad header".into()),
            400,
            "invalid_header",
            None,
        ),
        (
            ApiError::invalid_request("amount: must be positive"),
            400,
            "invalid_request",
            None,
        ),
        (ApiError::NotFound, 404, "not_found", None),
        (
            ApiError::UnknownUser("u1".into()),
            404,
            "unknown_user",
            None,
        ),
        (
            ApiError::missing(MissingCode::Key, "no such key"),
            404,
            "unknown_key",
            None,
        ),
        (ApiError::Forbidden("admin only"), 403, "forbidden", None),
        (ApiError::MethodNotAllowed, 405, "method_not_allowed", None),
        (ApiError::Internal, 500, "internal", None),
    ];
    // Every variant is in the table: `variant_index` has no wildcard,
    // so a new variant does not compile until it is numbered here, and
    // then this fails until the table has a row for it.
    let mut seen = std::collections::BTreeSet::new();
    for (err, ..) in &table {
        seen.insert(variant_index(err));
    }
    assert_eq!(seen.len(), VARIANTS, "a variant of ApiError has no row");
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

#[test]
fn the_api_documentation_names_every_code() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/API.md"))
        .expect("docs/API.md");
    let codes = InvalidCode::ALL
        .iter()
        .map(|c| c.as_str())
        .chain(MissingCode::ALL.iter().map(|c| c.as_str()));
    for code in codes {
        assert!(
            doc.contains(&format!("`{code}`")),
            "docs/API.md does not name {code}"
        );
    }
}
