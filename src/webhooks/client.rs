//! One webhook attempt: a fresh connection (TLS for `https`), one POST,
//! the status, a bounded read of the answer, all within one deadline.
//!
//! A connection per attempt: events are rare next to requests, and a
//! receiver's half-broken keep-alive connection must not fail the next
//! event. Redirects are not followed (a receiver that moved answers 3xx,
//! which is retried and shows in the deliveries list): following them
//! would let a receiver point the gateway anywhere.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// How much of an answer is read (and then dropped): enough to finish a
/// normal response, not enough for a receiver to make us buffer much.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

pub use crate::config::webhooks::Target;

/// What came of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The receiver answered with this status (whatever its body).
    Status(u16),
    /// No usable answer: connection refused or reset, TLS failure, not
    /// HTTP, or nothing within the deadline.
    Failed(String),
}

/// The TLS client for `https` endpoints, trusting the system's roots
/// (Debian's `ca-certificates`, or the file named by `SSL_CERT_FILE`),
/// built once.
fn tls_config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "webhooks: cannot read some trust roots");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!("webhooks: no trust roots found; https endpoints will fail");
            }
            ClientConfig::builder_with_provider(Arc::new(
                tokio_rustls::rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| e.to_string())
        })
        .clone()
}

/// Posts `body` with `headers` to `target`, within `timeout` in all.
pub async fn post(
    target: &Target,
    headers: &[(&'static str, String)],
    body: Bytes,
    timeout: Duration,
) -> Answer {
    match tokio::time::timeout(timeout, attempt(target, headers, body)).await {
        Ok(Ok(status)) => Answer::Status(status),
        Ok(Err(why)) => Answer::Failed(why),
        Err(_) => Answer::Failed(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn attempt(
    target: &Target,
    headers: &[(&'static str, String)],
    body: Bytes,
) -> Result<u16, String> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut builder = Request::post(target.path_and_query.as_str())
        .header(http::header::HOST, target.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("creditgate/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    let request = builder
        .body(Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    if target.tls {
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| format!("tls: {e}"))?;
        let config = tls_config().map_err(|e| format!("tls: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        exchange(TokioIo::new(tls), request).await
    } else {
        exchange(TokioIo::new(tcp), request).await
    }
}

async fn exchange<T>(io: T, request: Request<Full<Bytes>>) -> Result<u16, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let conn = tokio::spawn(conn);
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("http: {e}"))?;
        let status = response.status().as_u16();
        // The answer is read so the receiver is not cut off mid-write; its
        // content does not matter, and one that is too long is dropped.
        let _ = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await;
        Ok(status)
    }
    .await;
    conn.abort();
    result
}
