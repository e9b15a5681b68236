//! The gateway's own keys: the admin and service keys from the config,
//! held as digests and compared in constant time, and the networks whose
//! callers the credits API trusts without one.

use std::net::IpAddr;

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthSettings, NamedKey};
use crate::domain::Networks;

/// What `auth` configures: who may call the admin and credits APIs.
pub struct ApiKeys {
    admin: Vec<(String, [u8; 32])>,
    service: Vec<(String, [u8; 32])>,
    trust_user_id_header: bool,
    /// `auth.trusted_networks`: the credits API without a key, and
    /// `X-User-ID` when `trust_user_id_header` is on.
    trusted_networks: Networks,
    /// `auth.max_keys_per_user`: live keys a user may create for itself.
    pub max_keys_per_user: u32,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn digests(keys: &[NamedKey]) -> Vec<(String, [u8; 32])> {
    keys.iter()
        .map(|k| (k.name.clone(), digest(k.key.expose_secret().as_bytes())))
        .collect()
}

fn find(keys: &[(String, [u8; 32])], presented: &[u8]) -> Option<String> {
    let presented = digest(presented);
    let mut found = None;
    for (name, key) in keys {
        if bool::from(key.ct_eq(&presented)) {
            found = Some(name.clone());
        }
    }
    found
}

impl ApiKeys {
    pub fn new(settings: &AuthSettings, trusted_networks: Networks) -> Self {
        Self {
            admin: digests(&settings.admin_keys),
            service: digests(&settings.service_keys),
            trust_user_id_header: settings.trust_user_id_header,
            trusted_networks,
            max_keys_per_user: settings.max_keys_per_user(),
        }
    }

    /// The name of the admin key `presented`, if it is one.
    pub fn admin(&self, presented: &[u8]) -> Option<String> {
        find(&self.admin, presented)
    }

    /// The name of the service key `presented`, if it is one.
    pub fn service(&self, presented: &[u8]) -> Option<String> {
        find(&self.service, presented)
    }

    /// `auth.trusted_networks` holds `ip`.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_networks.contains(ip)
    }

    pub fn trust_user_id_header(&self) -> bool {
        self.trust_user_id_header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configured_key_is_compared_and_names_are_returned() {
        let keys = vec![
            ("ops".to_owned(), digest(b"first-key-123")),
            ("ci".to_owned(), digest(b"second-key-456")),
        ];
        assert_eq!(find(&keys, b"second-key-456").as_deref(), Some("ci"));
        assert_eq!(find(&keys, b"first-key-123").as_deref(), Some("ops"));
        assert_eq!(find(&keys, b"first-key-12"), None);
        assert_eq!(find(&keys, b""), None);
    }
}
