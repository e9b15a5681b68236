//! Identifiers, money and keys as newtypes.
//!
//! Each type has a private field and a `parse` that validates, so a value
//! that crosses a module boundary has already been checked once at the edge
//! (HTTP header, JSON body, config file, CLI argument).

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{what}: {why}")]
pub struct ParseError {
    pub what: &'static str,
    pub why: String,
}

impl ParseError {
    fn new(what: &'static str, why: impl Into<String>) -> Self {
        Self {
            what,
            why: why.into(),
        }
    }
}

fn check_chars(
    what: &'static str,
    s: &str,
    max: usize,
    ok: impl Fn(char) -> bool,
) -> Result<(), ParseError> {
    if s.is_empty() {
        return Err(ParseError::new(what, "must not be empty"));
    }
    if s.len() > max {
        return Err(ParseError::new(what, format!("longer than {max} bytes")));
    }
    if let Some(c) = s.chars().find(|c| !ok(*c)) {
        return Err(ParseError::new(what, format!("invalid character {c:?}")));
    }
    Ok(())
}

/// Every byte a lowercase hex digit, eight at a time: a byte-by-byte
/// `matches!` over a key's 48 digits was about 500 instructions a request
/// (bench/gateway_instructions.sh).
fn is_lower_hex(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let word_ok = |chunk: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let w = u64::from_le_bytes(w);
        // Each byte b of w, in its own lane, with no carry between lanes
        // (every test below keeps a lane under 0x100 and its top bit
        // meaningful): '0'..='9' is 0x30..=0x39, 'a'..='f' 0x61..=0x66.
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let ge = |w: u64, c: u64| ((w | HIGH) - c * ONES) & HIGH; // lane >= c (lanes < 0x80)
        let ascii = w & HIGH == 0;
        let digit = ge(w, 0x30) & !ge(w, 0x3a);
        let letter = ge(w, 0x61) & !ge(w, 0x67);
        ascii && (digit | letter) == HIGH
    };
    chunks.all(word_ok)
        && chunks
            .remainder()
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A user (account) id. The platform's Hub sends its own ids in `X-User-ID`,
/// so ids are opaque strings rather than UUIDs; the charset keeps them safe
/// inside Redis key names and log lines.
///
/// Shared, not owned: every request takes its user from the key cache, and
/// a clone is then a count, not an allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        check_chars("user id", s, 64, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@')
        })?;
        Ok(Self(Arc::from(s)))
    }

    /// A fresh id for an account created by creditgate itself.
    pub fn generate() -> Self {
        Self(Arc::from(format!("usr_{}", uuid::Uuid::now_v7().simple())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by user be searched with a `&str` (the derived `Hash`
/// of the one field is the string's own).
impl std::borrow::Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! catalog_id {
    ($name:ident, $what:literal) => {
        /// Plan and module ids appear inside Lua patterns and Redis key names,
        /// so they are restricted to `[a-z0-9_]`. Shared, not owned: a
        /// charge's receipt and its context each hold its plan, and a clone
        /// is then a count, not an allocation.
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, ParseError> {
                check_chars($what, s, 32, |c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
                })?;
                Ok(Self(s.into()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

catalog_id!(PlanId, "plan id");
catalog_id!(ModuleId, "module id");
catalog_id!(ActionId, "action");

/// An amount of credits. Never negative; bounded so that sums of many
/// amounts cannot overflow Lua's 53-bit integers or Postgres BIGINT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Credits(i64);

impl Credits {
    pub const MAX: i64 = 1_000_000_000;
    pub const ZERO: Credits = Credits(0);

    pub fn new(n: i64) -> Result<Self, ParseError> {
        if n < 0 {
            return Err(ParseError::new("credits", "must not be negative"));
        }
        if n > Self::MAX {
            return Err(ParseError::new(
                "credits",
                format!("must be at most {}", Self::MAX),
            ));
        }
        Ok(Self(n))
    }

    /// An amount the system itself recorded (the ledger, an account in
    /// Redis). Taken as it is (only a negative is floored at 0): rebuilding
    /// or answering for an account must never fail on a value the system
    /// wrote, even one past today's [`Credits::MAX`] (a day's use of a busy
    /// account without a daily limit can be).
    pub fn recorded(n: i64) -> Self {
        Self(n.max(0))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A UUIDv7 for the ids made on every call (request and event ids): unix
/// milliseconds, a 12-bit counter, 62 random bits (RFC 9562, method 1).
/// The counter is the thread's, so one thread's ids only grow: a worker's
/// leased calls reach the ledger in its order, and the primary key takes
/// them at its right edge. `Uuid::now_v7` orders them process-wide, under
/// a shared context, for about 600 instructions a call
/// (bench/gateway_instructions.sh).
pub fn uuid_v7() -> uuid::Uuid {
    uuid_v7_at(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    )
}

/// [`uuid_v7`] at `now`, unix milliseconds of a clock already read for
/// the call (its [`Stamp`](crate::metering::Stamp)): each clock read is a
/// few dozen nanoseconds, and a proxied call made about twenty. An earlier
/// `now` than the thread's last id goes on from that id, as a clock that
/// stepped back does. `now` is a [`Stamp`](crate::metering::Stamp)'s
/// `now_ms`: a time before 1970 counts as 0.
pub fn uuid_v7_at(now: i64) -> uuid::Uuid {
    let now = u64::try_from(now).unwrap_or(0);
    thread_local! {
        /// The last id's millisecond and counter.
        static LAST: std::cell::Cell<(u64, u16)> = const { std::cell::Cell::new((0, 0)) };
    }
    let (ms, counter) = LAST.with(|last| {
        let (last_ms, last_counter) = last.get();
        // A clock that stepped back, or 4,096 ids in one millisecond, go on
        // from the last id's millisecond.
        let next = if now > last_ms {
            (now, 0)
        } else if last_counter < 0x0fff {
            (last_ms, last_counter + 1)
        } else {
            (last_ms + 1, 0)
        };
        last.set(next);
        next
    });
    let mut random = [0u8; 10];
    random[2..].copy_from_slice(&id_bits().to_le_bytes());
    random[0] = (counter >> 8) as u8;
    random[1] = counter as u8;
    uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid()
}

/// 64 random bits for an id: splitmix64 on a per-thread state seeded from
/// the OS once. Ids must be unique, not secret (nothing is authorised by
/// knowing one), and the thread's CSPRNG was about 200 instructions an id,
/// two ids a leased call (bench/gateway_instructions.sh). Two threads or
/// gateways share a sequence only if their 64-bit seeds are equal.
fn id_bits() -> u64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(rand::random());
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// `id` hyphenated, without `fmt`'s machinery.
pub fn uuid_v7_text(id: uuid::Uuid) -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf).to_owned()
}

/// A request id: the client's `X-Request-Id` (a trace id, never an
/// idempotency key), the credits API's `request_id`, or one we generate. Visible ASCII only, because it is echoed in headers and stored
/// in a Redis key name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        check_chars("request id", s, 128, |c| c.is_ascii_graphic())?;
        Ok(Self(s.to_owned()))
    }

    pub fn generate() -> Self {
        Self(uuid_v7_text(uuid_v7()))
    }

    /// [`RequestId::generate`] at `now_ms`, the call's clock ([`uuid_v7_at`]).
    pub fn generate_at(now_ms: i64) -> Self {
        Self(uuid_v7_text(uuid_v7_at(now_ms)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A proxy client's `Idempotency-Key`: charged at most once per user, and
/// never forwarded twice. A namespace of its own, apart from the credits
/// API's request ids, so a user cannot pre-spend an id the platform will use.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Marks an answer given again for a repeated key rather than made
    /// anew: the proxy's replays and the admin writes alike.
    pub fn mark_replayed(headers: &mut http::HeaderMap) {
        headers.insert(
            http::HeaderName::from_static("idempotent-replayed"),
            http::HeaderValue::from_static("true"),
        );
    }

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        check_chars("idempotency key", s, 128, |c| c.is_ascii_graphic())?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `Idempotency-Key` header, if sent: the proxy, the credits API
    /// and the admin writes read it the same way.
    pub fn from_headers(headers: &http::HeaderMap) -> Result<Option<Self>, ParseError> {
        // A name made once: a `&str` is parsed into one at every lookup.
        static IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");
        Self::from_value(headers.get(&IDEMPOTENCY_KEY))
    }

    /// The header's value, as [`IdempotencyKey::from_headers`] reads it.
    pub fn from_value(value: Option<&http::HeaderValue>) -> Result<Option<Self>, ParseError> {
        value
            .map(|v| {
                let text = v.to_str().map_err(|_| ParseError {
                    what: "idempotency key",
                    why: "must be visible ASCII".into(),
                })?;
                Self::parse(text.trim())
            })
            .transpose()
    }
}

/// A client API key. Only ever held briefly: hashed on arrival, printed once
/// at creation. `Debug` never shows it.
pub struct ApiKey(SecretString);

impl ApiKey {
    const PREFIX: &'static str = "cg_";

    /// `cg_` + 48 hex digits (192 random bits).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 24];
        rand::fill(&mut bytes);
        Self(SecretString::from(format!(
            "{}{}",
            Self::PREFIX,
            hex::encode(bytes)
        )))
    }

    /// Accepts only the issued shape (`cg_` + 48 lowercase hex digits):
    /// anything else is refused before any lookup, so random junk costs
    /// neither a cache slot nor a database query.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        Self::check(s)?;
        Ok(Self(SecretString::from(s.to_owned())))
    }

    fn check(s: &str) -> Result<(), ParseError> {
        let Some(hex) = s.strip_prefix(Self::PREFIX) else {
            return Err(ParseError::new("api key", "must start with cg_"));
        };
        if hex.len() != 48 || !is_lower_hex(hex.as_bytes()) {
            return Err(ParseError::new(
                "api key",
                "must be cg_ followed by 48 lowercase hex digits",
            ));
        }
        Ok(())
    }

    /// The hash of a key a request presents, checked as [`ApiKey::parse`]
    /// checks it: the key is looked up by its hash only, so it is never
    /// copied out of the request (that copy, its zeroing and freeing were
    /// about 130 instructions a request).
    pub fn hash_presented(s: &str) -> Result<KeyHash, ParseError> {
        Self::check(s)?;
        Ok(Self::hash_text(s))
    }

    pub fn hash(&self) -> KeyHash {
        Self::hash_text(self.0.expose_secret())
    }

    fn hash_text(key: &str) -> KeyHash {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::digest(key.as_bytes());
        // Digits into a byte array, then one `String`: `hex::encode`
        // collects chars one at a time (2.2k instructions a request), and
        // `String::push` a char at a time was still 800
        // (bench/gateway_instructions.sh).
        let mut text = [0u8; 64];
        for (pair, b) in text.chunks_exact_mut(2).zip(digest) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 15)];
        }
        // (`from_utf8_lossy` walks its input in chunks: 470 instructions.)
        KeyHash(
            std::str::from_utf8(&text)
                .map(str::to_owned)
                .unwrap_or_default(),
        )
    }

    /// Shown to people so they can tell their keys apart ("cg_1a2b3c4d").
    pub fn display_prefix(&self) -> String {
        self.0.expose_secret().chars().take(11).collect()
    }

    /// The full key, for the one moment it is shown to its owner.
    pub fn reveal(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(****)")
    }
}

/// SHA-256 of an API key, lowercase hex: what Postgres and Redis store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyHash(String);

impl KeyHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For values read back from our own storage.
    pub fn from_stored(s: String) -> Self {
        Self(s)
    }
}

/// A set of networks (`server.trusted_proxies`, `auth.trusted_networks`).
/// Peers are matched by their canonical address, so an IPv4 client seen
/// on an IPv6 socket (`::ffff:10.0.0.1`) matches `10.0.0.0/8`.
#[derive(Clone, Debug, Default)]
pub struct Networks(Vec<ipnet::IpNet>);

impl Networks {
    /// CIDRs (`10.0.0.0/8`, `fd00::/8`) or single addresses (`10.1.2.3`).
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, ParseError> {
        items
            .iter()
            .map(|s| {
                let s = s.as_ref().trim();
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ParseError::new("network", format!("{s:?} is not a CIDR or an IP address"))
                    })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod networks_tests {
    use super::*;

    #[test]
    fn networks_match_cidrs_single_addresses_and_mapped_v4() {
        let n = Networks::parse(&["10.0.0.0/8", "192.0.2.7", "fd00::/8"]).expect("parse");
        for (ip, inside) in [
            ("10.9.8.7", true),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("::ffff:10.1.1.1", true),
            ("fd12::1", true),
            ("127.0.0.1", false),
        ] {
            let ip: std::net::IpAddr = ip.parse().expect("ip");
            assert_eq!(n.contains(ip), inside, "{ip}");
        }
        assert!(Networks::parse(&["10.0.0.0/33"]).is_err());
        assert!(Networks::parse(&["example.com"]).is_err());
        assert!(!Networks::default().contains("127.0.0.1".parse().expect("ip")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value, in every lane of a word and in the remainder,
    /// against the plain test.
    #[test]
    fn lower_hex_is_every_byte_checked_alone() {
        let plain = |bytes: &[u8]| bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let base: Vec<u8> = b"0123456789abcdef0123456789abcdef0a1b2c3d4e5f6a7b9"[..].to_vec();
        for len in [8, 11, 16, 48, 49] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut v = base[..len].to_vec();
                    v[at] = b;
                    assert_eq!(is_lower_hex(&v), plain(&v), "byte {b:#x} at {at} of {len}");
                }
            }
        }
        let key = format!("cg_{}", "0123456789abcdef".repeat(3));
        assert!(ApiKey::hash_presented(&key).is_ok());
        assert!(ApiKey::hash_presented(&key.replace('a', "A")).is_err());
        assert_eq!(
            ApiKey::hash_text("abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn unix_ms_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
    }

    /// The unix millisecond a v7 id carries.
    fn ms_of(id: uuid::Uuid) -> u64 {
        let (secs, nanos) = id.get_timestamp().expect("v7 has one").to_unix();
        secs * 1000 + u64::from(nanos) / 1_000_000
    }

    #[test]
    fn ids_at_a_given_millisecond_carry_it_and_never_go_back() {
        let now = unix_ms_now();
        let at = |ms: u64| i64::try_from(ms).expect("ms");
        // Ahead of every id this thread made: that millisecond.
        let ahead = uuid_v7_at(at(now + 5_000));
        assert_eq!(ms_of(ahead), now + 5_000);
        // A call's clock read before the last id (a call that waited):
        // still after it.
        let behind = uuid_v7_at(at(now));
        assert!(behind > ahead);
        assert_eq!(ms_of(behind), now + 5_000);
        assert_eq!(
            ms_of(
                RequestId::generate_at(at(now + 9_000))
                    .as_str()
                    .parse()
                    .expect("uuid")
            ),
            now + 9_000
        );
    }

    #[test]
    fn call_ids_are_v7_uuids_of_now_and_never_repeat() {
        let before = unix_ms_now();
        let made: Vec<uuid::Uuid> = (0..20_000).map(|_| uuid_v7()).collect();
        // One thread's ids only grow, as bytes and as text.
        assert!(made.windows(2).all(|w| w[0] < w[1]));
        assert!(
            made.windows(2)
                .all(|w| uuid_v7_text(w[0]) < uuid_v7_text(w[1]))
        );
        let ids: std::collections::HashSet<uuid::Uuid> = made.into_iter().collect();
        assert_eq!(ids.len(), 20_000);
        for id in ids.iter().take(100) {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let ms = ms_of(*id);
            // Up to a few ms ahead: 4,096 ids a millisecond at most.
            assert!((before..before + 60_000).contains(&ms), "{ms} vs {before}");
            assert_eq!(uuid_v7_text(*id), id.to_string());
        }
    }

    #[test]
    fn a_key_hash_is_the_lowercase_hex_sha256_of_the_key() {
        let key =
            ApiKey::parse("cg_000102030405060708090a0b0c0d0e0f1011121314151617").expect("key");
        let expected = hex::encode(Sha256::digest(key.reveal().as_bytes()));
        assert_eq!(key.hash().0, expected);
        assert_eq!(expected.len(), 64);
    }

    #[test]
    fn user_ids_reject_key_separators_and_spaces() {
        assert!(UserId::parse("hub-42").is_ok());
        assert!(UserId::parse("a@b.dz").is_ok());
        for bad in ["", "a b", "a:b", "a{b}", &"x".repeat(65)] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn catalog_ids_are_lowercase_words() {
        assert!(ModuleId::parse("rag").is_ok());
        assert!(PlanId::parse("pro_2").is_ok());
        for bad in ["", "Rag", "a-b", "a.b", "a%b"] {
            assert!(PlanId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn credits_are_bounded_and_non_negative() {
        assert!(Credits::new(-1).is_err());
        assert!(Credits::new(Credits::MAX + 1).is_err());
        assert_eq!(Credits::new(3).map(Credits::get), Ok(3));
    }

    #[test]
    fn generated_keys_are_distinct_and_hash_stably() {
        let a = ApiKey::generate();
        let b = ApiKey::generate();
        assert_ne!(a.reveal(), b.reveal());
        assert!(a.reveal().starts_with("cg_") && a.reveal().len() == 51);
        let again = ApiKey::parse(a.reveal()).map(|k| k.hash());
        assert_eq!(again, Ok(a.hash()));
        assert_eq!(format!("{a:?}"), "ApiKey(****)");
    }

    #[test]
    fn request_ids_are_visible_ascii() {
        assert!(RequestId::parse("req-1").is_ok());
        assert!(RequestId::parse("a b").is_err());
        assert!(RequestId::parse("é").is_err());
        assert!(RequestId::parse(&"x".repeat(129)).is_err());
    }
}

/// The events an endpoint can subscribe to (SPEC §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    CreditsLow,
    CreditsExhausted,
    AccountBlocked,
    AccountUnblocked,
    PlanChanged,
    CreditsGranted,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::CreditsLow,
        EventType::CreditsExhausted,
        EventType::AccountBlocked,
        EventType::AccountUnblocked,
        EventType::PlanChanged,
        EventType::CreditsGranted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CreditsLow => "credits.low",
            EventType::CreditsExhausted => "credits.exhausted",
            EventType::AccountBlocked => "account.blocked",
            EventType::AccountUnblocked => "account.unblocked",
            EventType::PlanChanged => "plan.changed",
            EventType::CreditsGranted => "credits.granted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}
