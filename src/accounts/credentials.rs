//! Who is calling: the credential a request presents, read from its
//! headers. Shared by the proxy and the user API so both identify callers
//! the same way.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::domain::{ApiKey, KeyHash, UserId};

#[derive(Debug)]
pub enum Credential {
    /// An API key, by its hash: what it is looked up by.
    Key(KeyHash),
    /// `X-User-ID`, only when `auth.trust_user_id_header = true`.
    TrustedUser(UserId),
}

#[derive(Debug, PartialEq, Eq)]
pub enum CredentialError {
    Missing,
    /// Present but unusable: a non-Bearer Authorization, bytes that are not
    /// visible ASCII, an invalid user id. Always answered 401, never echoed.
    Malformed(&'static str),
}

/// The headers a credential can come from, as a request has them (the
/// first value of each name, as `HeaderMap::get` gives). The proxy fills
/// it in the one walk over a request's headers that reads all it needs.
#[derive(Clone, Copy, Default)]
pub struct Presented<'a> {
    pub authorization: Option<&'a HeaderValue>,
    pub api_key: Option<&'a HeaderValue>,
    pub user_id: Option<&'a HeaderValue>,
}

impl<'a> Presented<'a> {
    pub fn of(headers: &'a HeaderMap) -> Self {
        // Names made once: a `&str` is parsed into one at every lookup.
        static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
        static X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
        Self {
            authorization: headers.get(http::header::AUTHORIZATION),
            api_key: headers.get(&X_API_KEY),
            user_id: headers.get(&X_USER_ID),
        }
    }
}

pub fn from_headers(
    headers: &HeaderMap,
    trust_user_id_header: bool,
) -> Result<Credential, CredentialError> {
    presented(Presented::of(headers), trust_user_id_header)
}

/// The credential among `p`: `Authorization` first, then `X-API-Key`,
/// then (trusted networks only) `X-User-ID`.
pub fn presented(
    p: Presented<'_>,
    trust_user_id_header: bool,
) -> Result<Credential, CredentialError> {
    if let Some(value) = p.authorization {
        let value = value
            .to_str()
            .map_err(|_| CredentialError::Malformed("Authorization is not ASCII"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(CredentialError::Malformed(
                "Authorization must be \"Bearer <api key>\"",
            ))?;
        return ApiKey::hash_presented(token.trim())
            .map(Credential::Key)
            .map_err(|_| CredentialError::Malformed("malformed API key"));
    }
    if let Some(value) = p.api_key {
        let value = value
            .to_str()
            .map_err(|_| CredentialError::Malformed("X-API-Key is not ASCII"))?;
        return ApiKey::hash_presented(value.trim())
            .map(Credential::Key)
            .map_err(|_| CredentialError::Malformed("malformed API key"));
    }
    if let Some(value) = p.user_id.filter(|_| trust_user_id_header) {
        let id = value
            .to_str()
            .ok()
            .and_then(|v| UserId::parse(v.trim()).ok())
            .ok_or(CredentialError::Malformed("malformed X-User-ID"))?;
        return Ok(Credential::TrustedUser(id));
    }
    Err(CredentialError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_bytes(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn reads_bearer_and_x_api_key() {
        let key = format!("cg_{}", "ab12".repeat(12));
        let bearer = format!("Bearer {key}");
        let bearer = from_headers(&headers(&[("authorization", bearer.as_bytes())]), false);
        // The same hash the stored key has.
        let want = ApiKey::parse(&key).expect("key").hash();
        assert!(matches!(bearer, Ok(Credential::Key(ref h)) if *h == want));
        let x = from_headers(&headers(&[("x-api-key", key.as_bytes())]), false);
        assert!(matches!(x, Ok(Credential::Key(ref h)) if *h == want));
    }

    #[test]
    fn user_id_header_only_when_trusted() {
        let h = headers(&[("x-user-id", b"hub-7")]);
        assert_eq!(
            from_headers(&h, false).err(),
            Some(CredentialError::Missing)
        );
        assert!(matches!(
            from_headers(&h, true),
            Ok(Credential::TrustedUser(_))
        ));
    }

    #[test]
    fn malformed_credentials_are_rejected() {
        for h in [
            headers(&[("authorization", b"Basic Zm9vOmJhcg==")]),
            headers(&[("authorization", b"Bearer \xff\xfe")]),
            headers(&[("authorization", b"Bearer a b")]),
            headers(&[("x-api-key", b"")]),
            // Not the issued shape: refused before any lookup.
            headers(&[("x-api-key", b"cg_abc")]),
            headers(&[(
                "x-api-key",
                b"sk_0123456789abcdef0123456789abcdef0123456789abcdef",
            )]),
            headers(&[(
                "x-api-key",
                b"cg_0123456789ABCDEF0123456789abcdef0123456789abcdef",
            )]),
        ] {
            assert!(matches!(
                from_headers(&h, true),
                Err(CredentialError::Malformed(_))
            ));
        }
    }
}
