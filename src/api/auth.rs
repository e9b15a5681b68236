//! Who may call which API: admin keys (`X-Admin-Key`), service keys
//! (`X-Service-Key`) and users (the proxy's credentials).
//!
//! Configured keys are kept only as SHA-256 digests and compared in
//! constant time against the digest of what was presented, so neither the
//! key's content nor its length leaks through timing. Every configured key
//! is compared, matching or not.

use std::net::SocketAddr;

use http::{Extensions, HeaderMap};

use crate::accounts::{Credential, credentials};
use crate::domain::UserId;
use crate::error::ApiError;
use crate::state::AppState;

/// The TCP peer of an API request, put in its extensions by the router.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

fn peer_is_trusted(state: &AppState, extensions: &Extensions) -> bool {
    extensions
        .get::<ClientAddr>()
        .is_some_and(|p| state.api_keys.trusts(p.0.ip()))
}

/// The name of the admin key presented, which becomes the audit actor.
pub fn admin(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let presented = headers
        .get("x-admin-key")
        .ok_or(ApiError::Unauthenticated("send X-Admin-Key"))?;
    state
        .api_keys
        .admin(presented.as_bytes())
        .map(|name| format!("admin:{name}"))
        .ok_or(ApiError::Unauthenticated("invalid admin key"))
}

/// The name of the service key presented. A caller from
/// `auth.trusted_networks` may omit the key (the platform's services call
/// the credits API that way); a key it does send must still be right.
pub fn service(
    state: &AppState,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Result<String, ApiError> {
    let Some(presented) = headers.get("x-service-key") else {
        return if peer_is_trusted(state, extensions) {
            Ok("service:trusted-network".to_owned())
        } else {
            Err(ApiError::Unauthenticated("send X-Service-Key"))
        };
    };
    state
        .api_keys
        .service(presented.as_bytes())
        .map(|name| format!("service:{name}"))
        .ok_or(ApiError::Unauthenticated("invalid service key"))
}

/// The calling user, identified like the proxy does. Keys are checked
/// against Postgres without the cache, so a revoked or expired key is
/// refused here exactly as in the proxy.
pub async fn user(
    state: &AppState,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Result<UserId, ApiError> {
    caller(state, headers, extensions)
        .await
        .map(|(user, _)| user)
}

/// [`user`], for the calls that manage keys: a key limited to some modules
/// cannot mint or revoke keys (it would mint itself a wider one).
pub async fn unrestricted_user(
    state: &AppState,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Result<UserId, ApiError> {
    match caller(state, headers, extensions).await? {
        (user, false) => Ok(user),
        (_, true) => Err(ApiError::Forbidden(
            "a key limited to some modules cannot manage API keys",
        )),
    }
}

/// The caller, and whether its key is limited to some modules.
async fn caller(
    state: &AppState,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Result<(UserId, bool), ApiError> {
    let trust_user_id = state.api_keys.trust_user_id_header() && peer_is_trusted(state, extensions);
    match credentials::from_headers(headers, trust_user_id) {
        Err(credentials::CredentialError::Missing) => Err(ApiError::Unauthenticated(
            "send Authorization: Bearer <api key> or X-API-Key",
        )),
        Err(credentials::CredentialError::Malformed(why)) => Err(ApiError::Unauthenticated(why)),
        Ok(Credential::TrustedUser(user)) => {
            match state.billing.accounts().get_user(&user).await? {
                Some(_) => Ok((user, false)),
                None => Err(ApiError::Unauthenticated("unknown user")),
            }
        }
        Ok(Credential::Key(hash)) => match state.billing.accounts().key_owner(&hash).await? {
            None => Err(ApiError::Unauthenticated("unknown or revoked API key")),
            Some(owner) if owner.expired => Err(ApiError::KeyExpired),
            Some(owner) => Ok((owner.user, owner.scoped)),
        },
    }
}
