//! Header rewriting between client and upstream.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// RFC 9110 §7.6.1 connection-specific headers, never forwarded.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, |_| false);
}

/// Removes the hop-by-hop headers and every header `also` selects, found
/// by walking the map: a request carries a handful of headers, and looking
/// up each of the twenty names the proxy may drop cost more than the walk
/// (`bench/gateway_instructions.sh`). `Connection` is found by the walk
/// too (a lookup hashes its name), and the names to drop are gathered in
/// one walk, not one walk per name. Nothing is allocated unless
/// `Connection` names a header that is not hop-by-hop already (its usual
/// `keep-alive` or `close` are not parsed as names).
fn strip(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    /// Names dropped per walk; a map with more walks again.
    const AT_ONCE: usize = 4;
    let mut named: Vec<HeaderName> = Vec::new();
    let connection = headers
        .iter()
        .filter(|(name, _)| **name == header::CONNECTION)
        .map(|(_, value)| value);
    for value in connection {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            let known = token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case(header::UPGRADE.as_str())
                || HOP_BY_HOP
                    .iter()
                    .any(|h| token.eq_ignore_ascii_case(h.as_str()));
            if known {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    let doomed =
        |name: &HeaderName| hop_by_hop(name.as_str()) || named.contains(name) || also(name);
    loop {
        let mut found: [Option<HeaderName>; AT_ONCE] = Default::default();
        let mut n = 0;
        for name in headers.keys().filter(|name| doomed(name)) {
            if n == AT_ONCE {
                break;
            }
            found[n] = Some(name.clone());
            n += 1;
        }
        for name in found.iter().flatten() {
            headers.remove(name);
        }
        // Fewer than a walk holds: the walk saw every name.
        if n < AT_ONCE {
            return;
        }
    }
}

/// [`HOP_BY_HOP`] and `Upgrade`, as one `match` on the name's text: the
/// compiler turns it into a switch on the length and a compare, where
/// testing each name of a list cost about 60 instructions a header
/// (bench/gateway_instructions.sh). `hop_by_hop_is_the_list` checks them.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Headers that carry creditgate's credentials or identity claims: the
/// upstream gets our verdict (`X-User-ID`, `X-Plan`) instead of the
/// client's, and never a key. A `match`, as [`hop_by_hop`].
fn client_only(name: &str) -> bool {
    matches!(
        name,
        "authorization" | "x-api-key" | "x-admin-key" | "x-service-key" | "x-user-id" | "x-plan"
    )
}

/// Who the client is, as proxies tell it. Written by the gateway; a
/// client's own values are kept only when it is a trusted proxy.
fn forwarding(name: &str) -> bool {
    matches!(
        name,
        "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "forwarded" | "x-real-ip"
    )
}

/// An address as text. `Display` for an IPv4 address went through the
/// formatting machinery and was a fifth of this module's cost per request
/// (bench/gateway_instructions.sh); the octets are written directly.
fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                text.push_str(digits.format(octet));
            }
            text
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

// Names built at compile time: a `&str` would be parsed on every lookup.
const X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
const X_PLAN: HeaderName = HeaderName::from_static("x-plan");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = header::FORWARDED;
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// What the upstream is told about a client's address. The same for every
/// request of a connection, so made once per connection: formatting the
/// address and the three values for each request cost about 450
/// instructions (bench/gateway_instructions.sh).
pub struct PeerText {
    /// The address alone, as `X-Forwarded-For` and `X-Real-IP` carry it.
    ip: HeaderValue,
    /// `for=<address>;proto=http`: our `Forwarded` element, before its host.
    forwarded: String,
    /// The last request's `Host` and the `Forwarded` element made with it:
    /// a connection's requests nearly always name one host, and building
    /// the element (a `String`, its check as a header value) was about 300
    /// instructions a request (bench/gateway_instructions.sh). A lock
    /// nobody else takes: a connection's requests come one at a time.
    with_host: std::sync::Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl PeerText {
    pub fn new(peer: SocketAddr) -> Self {
        let ip = peer.ip().to_canonical();
        let text = ip_text(ip);
        // RFC 7239: IPv6 nodes and host:port values are quoted strings.
        let forwarded = match ip {
            IpAddr::V4(_) => format!("for={text};proto=http"),
            IpAddr::V6(_) => format!("for=\"[{text}]\";proto=http"),
        };
        let ip = HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static(""));
        Self {
            ip,
            forwarded,
            with_host: std::sync::Mutex::new(None),
        }
    }

    /// Our `Forwarded` element for a request to `host`.
    fn forwarded(&self, host: Option<&HeaderValue>) -> Option<HeaderValue> {
        let Some(host) = host else {
            return HeaderValue::try_from(self.forwarded.as_str()).ok();
        };
        let mut last = self.with_host.lock().ok();
        if let Some(Some((h, value))) = last.as_deref()
            && h == host
        {
            return Some(value.clone());
        }
        let mut element = String::with_capacity(self.forwarded.len() + 48);
        element.push_str(&self.forwarded);
        if let Some(h) = host.to_str().ok().filter(|h| !h.contains('"')) {
            element.push_str(";host=\"");
            element.push_str(h);
            element.push('"');
        }
        let value = HeaderValue::try_from(element).ok()?;
        if let Some(last) = last.as_deref_mut() {
            *last = Some((host.clone(), value.clone()));
        }
        Some(value)
    }
}

pub fn prepare_upstream_headers(
    headers: &mut HeaderMap,
    peer: &PeerText,
    peer_is_trusted_proxy: bool,
    user: &str,
    plan: Option<HeaderValue>,
    request_id: &str,
) {
    strip(headers, |name| {
        let name = name.as_str();
        client_only(name) || (!peer_is_trusted_proxy && forwarding(name))
    });
    // Up to eight names are added below: grow the map once, not per insert.
    headers.reserve(8);
    let host = headers.remove(header::HOST);
    // An untrusted client's forwarding headers went with the strip: only a
    // trusted proxy's can still be there, so only then are they looked up.
    let prior = |headers: &HeaderMap, name: &HeaderName| {
        peer_is_trusted_proxy && headers.contains_key(name)
    };
    // `ours` after a trusted proxy's own list; None when there is none.
    let chained = |headers: &HeaderMap, name: &HeaderName, ours: &str| {
        if !peer_is_trusted_proxy {
            return None;
        }
        let prior = headers.get(name)?;
        HeaderValue::try_from(format!("{}, {ours}", prior.to_str().ok()?)).ok()
    };
    if let Some(element) = peer.forwarded(host.as_ref()) {
        let prior = || chained(headers, &FORWARDED, element.to_str().ok()?);
        let v = if peer_is_trusted_proxy {
            prior().unwrap_or(element)
        } else {
            element
        };
        headers.insert(FORWARDED, v);
    }
    if let Some(host) = host.filter(|_| !prior(headers, &X_FORWARDED_HOST)) {
        headers.insert(X_FORWARDED_HOST, host);
    }
    let ip = peer.ip.to_str().unwrap_or_default();
    let forwarded_for = chained(headers, &X_FORWARDED_FOR, ip).unwrap_or_else(|| peer.ip.clone());
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    if !prior(headers, &X_REAL_IP) {
        headers.insert(X_REAL_IP, peer.ip.clone());
    }
    if !prior(headers, &X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    // Ids and plan ids are validated to visible ASCII, so these cannot fail.
    if let Ok(v) = HeaderValue::from_str(user) {
        headers.insert(X_USER_ID, v);
    }
    if let Some(v) = plan {
        headers.insert(X_PLAN, v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_is_the_list() {
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            assert!(hop_by_hop(name.as_str()), "{name}");
        }
        for name in [header::HOST, header::CONTENT_LENGTH, header::AUTHORIZATION] {
            assert!(!hop_by_hop(name.as_str()), "{name}");
        }
        // The names as the rest of the module spells them.
        let client_only_names = [
            header::AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("x-admin-key"),
            HeaderName::from_static("x-service-key"),
            X_USER_ID,
            X_PLAN,
        ];
        for name in &client_only_names {
            assert!(
                client_only(name.as_str()) && !forwarding(name.as_str()),
                "{name}"
            );
        }
        let forwarding_names = [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            FORWARDED,
            X_REAL_IP,
        ];
        for name in &forwarding_names {
            assert!(
                forwarding(name.as_str()) && !client_only(name.as_str()),
                "{name}"
            );
        }
        assert!(!client_only("host") && !forwarding("x-forwarded-port"));
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for ip in [
            "0.0.0.0",
            "192.0.2.7",
            "255.255.255.255",
            "10.0.100.9",
            "2001:db8::1",
            "::1",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer cg_secret"),
        );
        h.insert("x-api-key", HeaderValue::from_static("cg_secret"));
        h.insert("x-user-id", HeaderValue::from_static("someone-else"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-custom"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("host", HeaderValue::from_static("gw.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("accept", HeaderValue::from_static("text/event-stream"));
        h.insert("x-admin-key", HeaderValue::from_static("admin-secret"));
        h.insert("x-service-key", HeaderValue::from_static("service-secret"));
        let peer: SocketAddr = "192.0.2.7:5555".parse().expect("addr");
        prepare_upstream_headers(
            &mut h,
            &PeerText::new(peer),
            true,
            "alice",
            Some(HeaderValue::from_static("pro")),
            "rid-1",
        );
        for gone in [
            "authorization",
            "x-api-key",
            "x-admin-key",
            "x-service-key",
            "connection",
            "x-custom",
            "te",
            "host",
        ] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(h["x-user-id"], "alice");
        assert_eq!(h["x-plan"], "pro");
        assert_eq!(h["x-request-id"], "rid-1");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-host"], "gw.example");
        assert_eq!(h["accept"], "text/event-stream");
    }

    #[test]
    fn an_answer_loses_what_its_connection_header_names() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close, X-Trace"));
        h.append(
            "connection",
            HeaderValue::from_static("Keep-Alive,,upgrade"),
        );
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["content-type"], "text/plain");
    }

    #[test]
    fn an_untrusted_client_cannot_choose_its_forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("gw.example:8207"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        let peer: SocketAddr = "[::ffff:192.0.2.7]:5555".parse().expect("addr");
        prepare_upstream_headers(&mut h, &PeerText::new(peer), false, "alice", None, "rid-1");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-host"], "gw.example:8207");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-real-ip"], "192.0.2.7");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=http;host=\"gw.example:8207\""
        );
        let v6: SocketAddr = "[2001:db8::1]:1".parse().expect("addr");
        let mut h = HeaderMap::new();
        prepare_upstream_headers(&mut h, &PeerText::new(v6), false, "alice", None, "rid-1");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
    }

    /// The element is kept per connection for its last host: each request
    /// still gets its own host, and a trusted proxy's list before ours.
    #[test]
    fn a_connections_forwarded_element_follows_each_requests_host() {
        let peer = PeerText::new("192.0.2.7:5555".parse().expect("addr"));
        let forwarded = |host: Option<&'static str>, prior: Option<&'static str>, trusted| {
            let mut h = HeaderMap::new();
            if let Some(host) = host {
                h.insert("host", HeaderValue::from_static(host));
            }
            if let Some(prior) = prior {
                h.insert("forwarded", HeaderValue::from_static(prior));
            }
            prepare_upstream_headers(&mut h, &peer, trusted, "alice", None, "rid-1");
            h["forwarded"].to_str().expect("text").to_owned()
        };
        let a = "for=192.0.2.7;proto=http;host=\"a.example\"";
        assert_eq!(forwarded(Some("a.example"), None, false), a);
        assert_eq!(forwarded(Some("a.example"), None, false), a);
        assert_eq!(
            forwarded(Some("b.example"), None, false),
            "for=192.0.2.7;proto=http;host=\"b.example\""
        );
        assert_eq!(forwarded(None, None, false), "for=192.0.2.7;proto=http");
        assert_eq!(
            forwarded(Some("a.example"), Some("for=10.0.0.1"), true),
            format!("for=10.0.0.1, {a}")
        );
        assert_eq!(forwarded(Some("a.example"), Some("for=10.0.0.1"), false), a);
        assert_eq!(
            forwarded(Some("q\"x"), None, false),
            "for=192.0.2.7;proto=http"
        );
    }
}
