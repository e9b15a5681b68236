//! creditgate's own HTTP endpoints (everything that is not proxied):
//! health, the user billing API, the admin API and the service-to-service
//! credits API. Inputs are parsed into typed values here, at the edge;
//! every failure is an [`ApiError`].

pub mod admin;
pub mod auth;
pub mod credits;
pub mod health;
pub mod invoices;
pub mod openapi;
pub mod schema;
pub mod user;
pub mod webhooks;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::body::{self, Body};
use crate::domain::UserId;
use crate::error::{ApiError, InvalidCode};
use crate::state::AppState;

/// JSON bodies of the API are small; anything bigger is a mistake or abuse.
pub const MAX_JSON_BYTES: usize = 64 * 1024;

/// Dispatches `/api/billing/*`, `/api/admin/billing/*` and `/api/credits/*`.
/// `None` when the path belongs to none of them.
pub async fn route(state: &AppState, req: Request<Incoming>) -> Option<Response<Body>> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let result = match segments.as_slice() {
        ["api", "openapi.json"] => openapi_json(state, &req),
        ["api", "billing", rest @ ..] => user::route(state, req, rest).await,
        ["api", "admin", "billing", rest @ ..] => admin::route(state, req, rest).await,
        ["api", "credits", rest @ ..] => credits::route(state, req, rest).await,
        _ => return None,
    };
    Some(result.unwrap_or_else(ApiError::into_response))
}

pub type ApiResult = Result<Response<Body>, ApiError>;

fn openapi_json(state: &AppState, req: &Request<Incoming>) -> ApiResult {
    require(req, Method::GET)?;
    let document = openapi::document(state.billing.catalog());
    let mut response = Response::new(body::full(document));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

pub fn ok<T: Serialize>(value: &T) -> ApiResult {
    json(StatusCode::OK, value)
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> ApiResult {
    let value = serde_json::to_value(value).map_err(|e| {
        tracing::error!(error = %e, "response serialisation failed");
        ApiError::Internal
    })?;
    Ok(body::json(status, &value))
}

/// A user id from a path or a body field: 400 unless well-formed.
pub(crate) fn parse_user(s: &str) -> Result<UserId, ApiError> {
    UserId::parse(s).map_err(|e| ApiError::invalid_field("user_id", e.why))
}

/// A key id from a path (`.../keys/{key_id}`): 400 unless a UUID.
pub(crate) fn parse_key_id(s: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(s)
        .map_err(|_| ApiError::bad_request(InvalidCode::Request, "key id is not a UUID"))
}

/// Reads and parses a JSON body: 413 past [`MAX_JSON_BYTES`], 400
/// `unsupported_media_type` for a non-JSON content type, 400 `invalid_json` for syntax errors and
/// `invalid_request` for wrong types, missing or unknown fields.
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    if let Some(ct) = req.headers().get(http::header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        if !ct.trim_start().starts_with("application/json") {
            return Err(ApiError::bad_request(
                InvalidCode::UnsupportedMediaType,
                "send the body as application/json",
            ));
        }
    }
    let bytes: Bytes = Limited::new(req.into_body(), MAX_JSON_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::PayloadTooLarge {
                    limit: MAX_JSON_BYTES as u64,
                }
            } else {
                ApiError::bad_request(InvalidCode::Body, "the request body could not be read")
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::bad_request(InvalidCode::Request, e.to_string())
        }
        _ => ApiError::bad_request(InvalidCode::Json, format!("malformed JSON: {e}")),
    })
}

/// Parses the query string into `T` (unknown parameters are refused, so a
/// typo does not silently return unfiltered data).
pub fn query<T: DeserializeOwned>(req: &Request<Incoming>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(req.uri().query().unwrap_or(""))
        .map_err(|e| ApiError::bad_request(InvalidCode::Query, format!("bad query string: {e}")))
}

/// A `days=` window: 1 to 366, `default` when absent.
pub fn days(value: Option<i64>, default: i64) -> Result<i64, ApiError> {
    let days = value.unwrap_or(default);
    if !(1..=366).contains(&days) {
        return Err(ApiError::bad_request(
            InvalidCode::Query,
            "days must be between 1 and 366",
        ));
    }
    Ok(days)
}

/// `page` (1-based) and `per_page` (1..=200), checked.
#[derive(Clone, Copy, Debug)]
pub struct Page {
    pub page: i64,
    pub per_page: i64,
}

impl Page {
    pub fn parse(page: Option<i64>, per_page: Option<i64>) -> Result<Self, ApiError> {
        let page = page.unwrap_or(1);
        let per_page = per_page.unwrap_or(50);
        if !(1..=1_000_000).contains(&page) {
            return Err(ApiError::bad_request(
                InvalidCode::Query,
                "page must be between 1 and 1000000",
            ));
        }
        if !(1..=200).contains(&per_page) {
            return Err(ApiError::bad_request(
                InvalidCode::Query,
                "per_page must be between 1 and 200",
            ));
        }
        Ok(Self { page, per_page })
    }

    pub fn offset(&self) -> i64 {
        (self.page - 1) * self.per_page
    }
}

pub fn require(req: &Request<Incoming>, method: Method) -> Result<(), ApiError> {
    if req.method() == method {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed)
    }
}
