//! Keep-alive connections to one module's upstream, on hyper's HTTP/1
//! connection API, each counted in
//! `creditgate_upstream_open_connections{module}` while it is open.
//!
//! hyper-util's legacy client cost about 10,500 instructions per request
//! (`bench/gateway_instructions.sh`): a checkout future racing a connect, a
//! oneshot per waiter, boxed futures and a pool behind a shared lock. Here
//! the idle connections are a stack of ready senders: a request takes the
//! most recent one, or opens a connection, and the response body puts the
//! connection back when it ends. A connection whose body did not end (the
//! client left mid-stream, an error) is closed instead: it is never shared
//! half-read.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::RequestBody;
use crate::telemetry::metrics;

/// Why a request did not get response headers from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

pub struct Pool {
    /// `host:port`, resolved at every connect (an upstream's address may
    /// move; established connections stay where they are).
    addr: String,
    module: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// Most recently used last: it is the likeliest to be still open.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl Idle {
    /// Still open, and idle for less than `timeout`.
    fn usable(&self, timeout: Duration) -> bool {
        self.since.elapsed() < timeout && !self.sender.is_closed()
    }
}

impl Pool {
    pub fn new(
        addr: String,
        module: &str,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            addr,
            module: module.to_owned(),
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
        });
        // Idle connections are closed after `idle_timeout` even when no
        // request comes to notice it. The sweeper ends with the pool.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            runtime.spawn(sweep(weak, idle_timeout));
        }
        pool
    }

    /// Sends `request` on an idle connection, or on a new one, and waits
    /// for the response headers (the caller bounds the wait).
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        while let Some(mut idle) = self.take() {
            // Closed by the upstream while idle: try the next one.
            if idle.ready().await.is_err() {
                continue;
            }
            match idle.try_send_request(request).await {
                Ok(response) => return Ok(self.pooled(response, idle)),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection closed as we took it. The
                    // body is untouched, so another connection can carry it.
                    Some(unsent) => request = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut sender = self.connect().await?;
        let response = sender.send_request(request).await?;
        Ok(self.pooled(response, sender))
    }

    fn take(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.usable(self.idle_timeout) {
                return Some(conn.sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn pooled(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: SendRequest<RequestBody>,
    ) -> Response<PooledBody> {
        let ended = response.body().is_end_stream();
        let back = if ended {
            // No body to wait for (HEAD, 204, 304): free at once.
            self.put(sender);
            None
        } else {
            Some((sender, Arc::clone(self)))
        };
        response.map(|inner| PooledBody { inner, back })
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, SendError> {
        let failed = |reason: String| SendError::Connect {
            addr: self.addr.clone(),
            reason,
        };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| failed(format!("timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| failed(e.to_string()))?;
        // Small requests and answers must not wait for Nagle.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on an upstream connection");
        }
        let (sender, connection) = http1::handshake(Counted::new(stream, &self.module)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

async fn sweep(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| c.usable(pool.idle_timeout));
    }
}

/// The upstream's response body; its end gives the connection back.
pub struct PooledBody {
    inner: Incoming,
    back: Option<(SendRequest<RequestBody>, Arc<Pool>)>,
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Err(_)) => self.back = None,
            None => self.give_back(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.put(sender);
        }
    }
}

/// A connection that is counted while it lives.
struct Counted {
    io: TokioIo<TcpStream>,
    module: String,
}

impl Counted {
    fn new(stream: TcpStream, module: &str) -> Self {
        metrics::upstream_connections(module, 1.0);
        Self {
            io: TokioIo::new(stream),
            module: module.to_owned(),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::upstream_connections(&self.module, -1.0);
    }
}

impl Read for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
