//! creditgate's own HTTP endpoints (everything that is not proxied):
//! health, the user billing API, the admin API and the service-to-service
//! credits API. Inputs are parsed into typed values here, at the edge;
//! every failure is an [`ApiError`].

pub mod admin;
pub mod auth;
pub mod credits;
pub mod extract;
pub mod health;
pub mod invoices;
pub mod openapi;
pub mod schema;
pub mod user;
pub mod webhooks;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde::Serialize;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::body::{self, Body};
use crate::domain::UserId;
use crate::error::{ApiError, InvalidCode};
use crate::state::AppState;

pub type ApiResult = Result<http::Response<Body>, ApiError>;

/// A group of routes, with the document of their paths, before it is
/// mounted under its prefix.
type Group = OpenApiRouter<Arc<AppState>>;

/// The API plane: `/api/billing/*` (users), `/api/admin/billing/*`
/// (`X-Admin-Key`), `/api/credits/*` (`X-Service-Key`) and
/// `/api/openapi.json`, whose paths come from the routes themselves.
///
/// In each authenticated group the key is checked before anything else, so
/// a caller without one learns nothing from a 404 or a 405. Every answer,
/// 404 and 405 included, is the JSON error body.
pub fn router(state: Arc<AppState>) -> Router {
    let (user, user_paths) = finish(user::routes());
    let (admin, admin_paths) = finish(admin::routes());
    let (credits, credits_paths) = finish(credits::routes());
    let admin = admin.layer(middleware::from_fn_with_state(
        Arc::clone(&state),
        authenticate::<Admin>,
    ));
    let credits = credits.layer(middleware::from_fn_with_state(
        Arc::clone(&state),
        authenticate::<Service>,
    ));
    let doc = openapi::ApiDoc::openapi()
        .nest("/api/billing", user_paths)
        .nest("/api/admin/billing", admin_paths)
        .nest("/api/credits", credits_paths);
    let document = Bytes::from(openapi::document(doc, state.billing.catalog()));
    Router::new()
        .nest("/api/billing", user)
        .nest("/api/admin/billing", admin)
        .nest("/api/credits", credits)
        .route(
            "/api/openapi.json",
            axum::routing::get(move || std::future::ready(openapi_json(document.clone()))),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state)
}

/// A group's routes with the JSON 404 and 405, and the document of its
/// paths.
fn finish(group: Group) -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    let (routes, paths) = group.split_for_parts();
    let routes = routes
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found);
    (routes, paths)
}

/// Answers a request for the API plane. A trailing slash is ignored
/// (`/api/billing/me/` is `/api/billing/me`), as it always has been here.
pub async fn serve(api: &Router, mut req: Request) -> http::Response<Body> {
    let path = req.uri().path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = path.trim_end_matches('/');
        let target = match req.uri().query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_owned(),
        };
        if let Ok(uri) = target.parse() {
            *req.uri_mut() = uri;
        }
    }
    let response = match tower_service::Service::call(&mut api.clone(), req).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    response.map(body::boxed)
}

fn openapi_json(document: Bytes) -> http::Response<Body> {
    let mut response = http::Response::new(body::full(document));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Who may call a group, and the [`extract::Actor`] the audit trail names.
trait Gate {
    fn actor(state: &AppState, req: &Request) -> Result<String, ApiError>;
}

struct Admin;
struct Service;

impl Gate for Admin {
    fn actor(state: &AppState, req: &Request) -> Result<String, ApiError> {
        auth::admin(state, req.headers())
    }
}

impl Gate for Service {
    fn actor(state: &AppState, req: &Request) -> Result<String, ApiError> {
        auth::service(state, req.headers(), req.extensions())
    }
}

async fn authenticate<G: Gate>(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<axum::response::Response, ApiError> {
    let actor = G::actor(&state, &req)?;
    req.extensions_mut().insert(extract::Actor(actor));
    Ok(next.run(req).await)
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
