//! Connections to upstream services: one keep-alive pool per module (each
//! module has its own connect timeout), a response-header deadline per call,
//! and failures classified so the proxy can answer 502/504/413 and refund.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Limited;
use thiserror::Error;
use tokio::time::{Instant, Sleep};

pub use pool::PooledBody;
mod pool;

use crate::catalog::{Catalog, Module};
use crate::config::UpstreamSettings;
use crate::connection::{self, Activity, ClientBody};
use crate::domain::ModuleId;
use pool::{Pool, SendError};

/// The client's body, cut off at `server.max_body_bytes` while streaming
/// and when it stalls for `server.body_idle_timeout_ms`.
pub type RequestBody = Limited<IdleTimeout<ClientBody>>;

/// The client's body sent nothing for this long.
#[derive(Debug, Error)]
#[error("request body idle for {0:?}")]
pub struct BodyStalled(pub Duration);

/// A body that fails with [`BodyStalled`] when no frame arrives within
/// `idle`. The timer exists only while the body is actually waiting, so a
/// body that is read at once costs nothing.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer was set for the current wait.
    armed: bool,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            armed: false,
        }
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<crate::body::BoxError>,
{
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !this.armed {
            let deadline = Instant::now() + this.idle;
            match this.timer.as_mut() {
                Some(timer) => timer.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.armed = true;
        }
        let Some(timer) = this.timer.as_mut() else {
            return Poll::Pending; // armed above
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(this.idle))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream sent no response headers within {0:?}")]
    Timeout(Duration),
    #[error("request body exceeded the limit of {0} bytes while streaming")]
    BodyTooLarge(u64),
    #[error("request body stalled for {0:?}")]
    BodyStalled(Duration),
    #[error("bad upstream URI: {0}")]
    BadUri(String),
}

pub struct Upstreams {
    /// Per module: its pool and its `Host` (none: not a usable URL).
    pools: Vec<(ModuleId, Arc<Pool>, Option<HeaderValue>)>,
    /// `server.max_body_bytes`, the limit the proxy streams bodies under:
    /// named in the 413 when a body outgrows it mid-stream.
    body_limit: u64,
}

impl Upstreams {
    pub fn new(catalog: &Catalog, settings: &UpstreamSettings, body_limit: u64) -> Self {
        let pools = catalog
            .modules()
            .iter()
            .map(|m| {
                let host = m.upstream.host().unwrap_or_default();
                let port = m.upstream.port_u16().unwrap_or(80);
                // A bracketed IPv6 literal stays bracketed for connect().
                let addr = format!("{host}:{port}");
                let pool = Pool::new(
                    addr,
                    m.id.as_str(),
                    m.connect_timeout,
                    Duration::from_millis(settings.pool_idle_timeout_ms),
                    settings.pool_max_idle_per_host,
                );
                (m.id.clone(), pool, Self::host(m).ok())
            })
            .collect();
        Self { pools, body_limit }
    }

    /// The request target for a client path, in origin form: base path of
    /// the module's upstream + the request path (without the module prefix
    /// when `strip_prefix`), query kept as sent. `send` adds the `Host`.
    pub fn target(module: &Module, uri: Uri) -> Result<Uri, UpstreamError> {
        let base = module.upstream.path().trim_end_matches('/');
        // The common case: the upstream takes the client's path as it came,
        // and an origin-form target goes on as it is, neither copied nor
        // parsed again.
        if !module.strip_prefix
            && base.is_empty()
            && uri.scheme().is_none()
            && uri.authority().is_none()
        {
            return Ok(uri);
        }
        let path = uri.path();
        let path = if module.strip_prefix {
            let rest = path.strip_prefix(module.prefix.as_str()).unwrap_or(path);
            if rest.is_empty() { "/" } else { rest }
        } else {
            path
        };
        let query = uri.query();
        let mut target =
            String::with_capacity(base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        target.push_str(base);
        target.push_str(path);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        Uri::try_from(target).map_err(|e| UpstreamError::BadUri(e.to_string()))
    }

    /// The `Host` an upstream is addressed by: the authority of its URL.
    pub fn host(module: &Module) -> Result<HeaderValue, UpstreamError> {
        module
            .upstream
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| UpstreamError::BadUri(module.upstream.to_string()))
    }

    /// Sends the request and waits for the response headers, at most the
    /// module's timeout. The response body then streams without deadline.
    /// `request` carries the target of [`Upstreams::target`].
    /// The deadline is kept by the driver of the client's `connection`.
    pub async fn send(
        &self,
        module: &Module,
        mut request: Request<RequestBody>,
        connection: &Arc<Activity>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let (_, pool, host) = self
            .pools
            .iter()
            .find(|(id, _, _)| id == &module.id)
            .ok_or_else(|| UpstreamError::BadUri(format!("no client for {}", module.id)))?;
        let host = host
            .clone()
            .ok_or_else(|| UpstreamError::BadUri(module.upstream.to_string()))?;
        request.headers_mut().insert(http::header::HOST, host);
        match connection::within(connection, module.timeout, pool.send(request)).await {
            Err(_) => Err(UpstreamError::Timeout(module.timeout)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(classify(&e, self.body_limit)),
        }
    }
}

fn classify(e: &SendError, body_limit: u64) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return UpstreamError::BodyTooLarge(body_limit);
        }
        if let Some(stalled) = err.downcast_ref::<BodyStalled>() {
            return UpstreamError::BodyStalled(stalled.0);
        }
        source = err.source();
    }
    UpstreamError::Unreachable(error_chain(e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Credits;

    fn module(upstream: &str, strip: bool) -> Module {
        Module {
            id: ModuleId::parse("rag").expect("id"),
            prefix: "/rag".into(),
            upstream: upstream.parse().expect("uri"),
            cost: Credits::new(1).expect("credits"),
            actions: Default::default(),
            refund_on_5xx: true,
            refund_on_failure: true,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            strip_prefix: strip,
            label: "rag".into(),
            description: String::new(),
        }
    }

    #[test]
    fn targets_keep_path_and_query() {
        let cases = [
            (
                "http://up:9000",
                false,
                "/rag/search?q=a%20b",
                "http://up:9000/rag/search?q=a%20b",
            ),
            (
                "http://up:9000/base/",
                false,
                "/rag/x",
                "http://up:9000/base/rag/x",
            ),
            (
                "http://up:9000",
                true,
                "/rag/search?q=1",
                "http://up:9000/search?q=1",
            ),
            ("http://up:9000/v2", true, "/rag", "http://up:9000/v2/"),
            // Absolute form from the client: only its path and query go on.
            (
                "http://up:9000",
                false,
                "http://gw.example/rag/x?y=1",
                "http://up:9000/rag/x?y=1",
            ),
        ];
        for (up, strip, path, want) in cases {
            let uri: Uri = path.parse().expect("uri");
            let m = module(up, strip);
            let got = Upstreams::target(&m, uri).and_then(|origin| {
                let host = Upstreams::host(&m)?;
                Ok(format!("http://{}{origin}", host.to_str().unwrap_or("?")))
            });
            assert_eq!(got.ok().as_deref(), Some(want), "{up} {path}");
        }
    }
}
