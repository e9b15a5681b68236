//! `[[webhooks]]` and `[webhook_delivery]`: each endpoint's URL, signing
//! key and events, and how deliveries are retried, checked at start with
//! errors naming the key (`webhooks[0].secret`).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::Uri;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::EventType;

/// One `[[webhooks]]` entry as written in the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSettings {
    pub url: String,
    /// `whsec_` followed by the base64 of the signing key.
    pub secret: SecretString,
    pub events: Vec<String>,
}

/// `[webhook_delivery]`: how every endpoint is delivered to.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// One attempt, from connecting to the end of the response, at most.
    pub timeout_ms: u64,
    /// The first retry comes this long after a failure (with jitter); each
    /// next one four times later, up to `max_retry_ms`.
    pub first_retry_ms: u64,
    pub max_retry_ms: u64,
    /// A delivery still failing this long after its event is marked failed.
    pub give_up_after_secs: u64,
    /// How often each instance looks for due deliveries it did not
    /// produce itself (its own are sent at once).
    pub poll_ms: u64,
    /// Attempts in flight at once, per endpoint.
    pub concurrency: usize,
    /// Finished events (every delivery delivered or failed) are deleted
    /// this many days after they happened.
    pub keep_days: u32,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            timeout_ms: 30_000,
            first_retry_ms: 5_000,
            max_retry_ms: 4 * 3600 * 1000,
            give_up_after_secs: 24 * 3600,
            poll_ms: 1_000,
            concurrency: 8,
            keep_days: 30,
        }
    }
}

/// A validated endpoint. Its Debug output leaves the signing key out.
pub struct Endpoint {
    pub url: String,
    pub target: Target,
    key: Vec<u8>,
    pub events: Vec<EventType>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("key", &"<redacted>")
            .field("events", &self.events)
            .finish()
    }
}

impl Endpoint {
    pub fn wants(&self, event: EventType) -> bool {
        self.events.contains(&event)
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

/// Every configured endpoint and the delivery settings.
#[derive(Debug, Default)]
pub struct Webhooks {
    pub endpoints: Vec<Endpoint>,
    pub delivery: DeliverySettings,
}

/// A config error: the key it is about and why.
#[derive(Debug)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

fn invalid(key: String, message: impl Into<String>) -> Invalid {
    Invalid {
        key,
        message: message.into(),
    }
}

impl Webhooks {
    pub fn validate(
        raw: &[EndpointSettings],
        delivery: DeliverySettings,
    ) -> Result<Arc<Self>, Invalid> {
        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(raw.len());
        for (i, e) in raw.iter().enumerate() {
            let key = |field: &str| format!("webhooks[{i}].{field}");
            let target = Target::parse(&e.url).map_err(|why| invalid(key("url"), why))?;
            if endpoints.iter().any(|o| o.url == e.url) {
                return Err(invalid(key("url"), "is listed twice"));
            }
            let signing_key = decode_secret(e.secret.expose_secret())
                .map_err(|why| invalid(key("secret"), why))?;
            if e.events.is_empty() {
                return Err(invalid(key("events"), "must name at least one event"));
            }
            let mut events = Vec::new();
            for name in &e.events {
                let event = EventType::parse(name).ok_or_else(|| {
                    invalid(
                        key("events"),
                        format!(
                            "unknown event {name:?} (known: {})",
                            EventType::ALL.map(EventType::as_str).join(", ")
                        ),
                    )
                })?;
                if !events.contains(&event) {
                    events.push(event);
                }
            }
            endpoints.push(Endpoint {
                url: e.url.clone(),
                target,
                key: signing_key,
                events,
            });
        }
        let d = &delivery;
        for (field, value) in [
            ("timeout_ms", d.timeout_ms),
            ("first_retry_ms", d.first_retry_ms),
            ("max_retry_ms", d.max_retry_ms),
            ("give_up_after_secs", d.give_up_after_secs),
            ("poll_ms", d.poll_ms),
            ("concurrency", d.concurrency as u64),
            ("keep_days", u64::from(d.keep_days)),
        ] {
            if value == 0 {
                return Err(invalid(
                    format!("webhook_delivery.{field}"),
                    "must be greater than 0",
                ));
            }
        }
        if d.max_retry_ms < d.first_retry_ms {
            return Err(invalid(
                "webhook_delivery.max_retry_ms".into(),
                "must be at least first_retry_ms",
            ));
        }
        Ok(Arc::new(Self {
            endpoints,
            delivery,
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Some endpoint subscribes to `event`: only then is it produced.
    pub fn wanted(&self, event: EventType) -> bool {
        self.endpoints.iter().any(|e| e.wants(event))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.delivery.timeout_ms)
    }
}

/// The signing key of a Standard Webhooks secret, `whsec_<base64>`.
fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("must start with \"whsec_\" followed by base64 (a Standard Webhooks secret)")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "is not valid base64 after \"whsec_\"".to_owned())?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!(
            "decodes to {} bytes; use 24 to 64 random bytes (e.g. `openssl rand -base64 32`)",
            key.len()
        ));
    }
    Ok(key)
}

/// Where an endpoint's requests go.
#[derive(Clone, Debug)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `host[:port]` as the `Host` header carries it.
    pub authority: String,
    pub path_and_query: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("{url:?} is not a URL like https://hub.example/hooks"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{url:?}: the scheme must be http or https")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{url:?}: credentials in the URL are not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoint_urls() {
        let t = Target::parse("https://hub.example/hooks/credits?x=1").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("hub.example", 443));
        assert_eq!(t.path_and_query, "/hooks/credits?x=1");
        let t = Target::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((t.port, t.path_and_query.as_str()), (9000, "/"));
        assert_eq!(t.authority, "127.0.0.1:9000");
        for bad in [
            "ftp://h/x",
            "hub.example/hooks",
            "http://u:p@h/x",
            "",
            "http://",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    fn endpoint(url: &str, secret: &str, events: &[&str]) -> EndpointSettings {
        EndpointSettings {
            url: url.into(),
            secret: SecretString::from(secret.to_owned()),
            events: events.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn bad_endpoints_are_refused_naming_the_key() {
        let cases = [
            (
                endpoint("ftp://x/hook", SECRET, &["plan.changed"]),
                "webhooks[0].url",
            ),
            (
                endpoint("http://", SECRET, &["plan.changed"]),
                "webhooks[0].url",
            ),
            (
                endpoint("http://h/x", "MfKQ9r8", &["plan.changed"]),
                "webhooks[0].secret",
            ),
            (
                endpoint("http://h/x", "whsec_***", &["plan.changed"]),
                "webhooks[0].secret",
            ),
            (
                endpoint("http://h/x", "whsec_AAAA", &["plan.changed"]),
                "webhooks[0].secret",
            ),
            (endpoint("http://h/x", SECRET, &[]), "webhooks[0].events"),
            (
                endpoint("http://h/x", SECRET, &["credits.gone"]),
                "webhooks[0].events",
            ),
        ];
        for (raw, key) in cases {
            let err = Webhooks::validate(&[raw], DeliverySettings::default()).unwrap_err();
            assert_eq!(err.key, key, "{}", err.message);
        }
        let twice = [
            endpoint("http://h/x", SECRET, &["plan.changed"]),
            endpoint("http://h/x", SECRET, &["credits.low"]),
        ];
        let err = Webhooks::validate(&twice, DeliverySettings::default()).unwrap_err();
        assert_eq!(err.key, "webhooks[1].url");
    }

    #[test]
    fn the_signing_key_never_shows_in_debug_output() {
        let hooks = Webhooks::validate(
            &[endpoint(
                "https://hub.example/hooks",
                SECRET,
                &["plan.changed"],
            )],
            DeliverySettings::default(),
        )
        .unwrap();
        let text = format!("{hooks:?}");
        assert!(
            text.contains("<redacted>") && text.contains("hub.example"),
            "{text}"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        assert!(!text.contains(&format!("{key:?}")), "{text}");
        assert!(!text.contains(&format!("{:?}", &key[..4])), "{text}");
    }

    #[test]
    fn a_valid_endpoint_subscribes_to_its_events_only() {
        let hooks = Webhooks::validate(
            &[endpoint(
                "https://hub.example/hooks",
                SECRET,
                &["credits.low", "credits.low"],
            )],
            DeliverySettings::default(),
        )
        .unwrap();
        assert!(hooks.wanted(EventType::CreditsLow));
        assert!(!hooks.wanted(EventType::PlanChanged));
        assert_eq!(hooks.endpoints[0].events, vec![EventType::CreditsLow]);
    }
}
