//! The API's extractors: what a handler asks of a request (a JSON body, a
//! query, path segments, the caller), each failing with an [`ApiError`].
//! axum's own extractors answer their rejections in plain text; these are
//! where every malformed input becomes the JSON error the API documents.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use http::request::Parts;
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;

use super::auth;
use crate::domain::UserId;
use crate::error::{ApiError, InvalidCode};
use crate::state::AppState;

/// JSON bodies of the API are small; anything bigger is a mistake or abuse.
pub const MAX_JSON_BYTES: usize = 64 * 1024;

/// A JSON body: 413 past [`MAX_JSON_BYTES`], 400 `unsupported_media_type`
/// for a content type other than JSON (an absent one is taken as JSON, as
/// curl users expect), `invalid_json` for syntax errors and
/// `invalid_request` for wrong types, missing or unknown fields.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(http::header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            if !ct.trim_start().starts_with("application/json") {
                return Err(ApiError::bad_request(
                    InvalidCode::UnsupportedMediaType,
                    "send the body as application/json",
                ));
            }
        }
        let bytes = Limited::new(req.into_body(), MAX_JSON_BYTES)
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
        serde_json::from_slice(&bytes)
            .map(Json)
            .map_err(|e| match e.classify() {
                serde_json::error::Category::Data => {
                    ApiError::bad_request(InvalidCode::Request, e.to_string())
                }
                _ => ApiError::bad_request(InvalidCode::Json, format!("malformed JSON: {e}")),
            })
    }
}

/// [`Json`] where the body may be left out altogether (no
/// `Content-Length`, or 0, and no `Transfer-Encoding`): `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = req.headers();
        let has_body = headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|l| l != "0")
            || headers.contains_key(http::header::TRANSFER_ENCODING);
        if !has_body {
            return Ok(Self(T::default()));
        }
        Json::from_request(req, state).await.map(|Json(t)| Self(t))
    }
}

/// The query string as `T`. Unknown parameters are refused (`T` says
/// `deny_unknown_fields`), so a typo does not silently return unfiltered
/// data.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
            .map(Query)
            .map_err(|e| {
                ApiError::bad_request(InvalidCode::Query, format!("bad query string: {e}"))
            })
    }
}

/// The route's path parameters, as text; handlers parse them into typed
/// ids. Fails only for a segment that is not UTF-8 once percent-decoded.
pub struct Segments<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Segments<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| Segments(t))
            .map_err(|e| ApiError::bad_request(InvalidCode::Request, e.body_text()))
    }
}

/// The user a route names (`…/users/{id}/…`): 400 unless a well-formed
/// user id.
pub struct PathUser(pub UserId);

impl<S: Send + Sync> FromRequestParts<S> for PathUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        #[derive(serde::Deserialize)]
        struct User {
            id: String,
        }
        let Segments(User { id }) = Segments::from_request_parts(parts, state).await?;
        super::parse_user(&id).map(PathUser)
    }
}

/// The user calling the user API, identified as the proxy identifies
/// callers (see [`auth::user`]).
pub struct Caller(pub UserId);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        auth::user(state, &parts.headers, &parts.extensions)
            .await
            .map(Caller)
    }
}

/// [`Caller`], for the calls that manage keys: 403 for a key limited to
/// some modules (it could mint itself a wider one).
pub struct KeyManager(pub UserId);

impl FromRequestParts<Arc<AppState>> for KeyManager {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        auth::unrestricted_user(state, &parts.headers, &parts.extensions)
            .await
            .map(KeyManager)
    }
}

/// Who made an admin or credits call (`admin:<key name>`,
/// `service:<key name>`), as the audit trail records it. Put in the
/// request by the group's authentication layer ([`super::authenticate`]),
/// which runs before any route of the group.
#[derive(Clone, Debug)]
pub struct Actor(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Actor>().cloned().ok_or_else(|| {
            tracing::error!("a route that needs an actor is outside an authenticated group");
            ApiError::Internal
        })
    }
}
