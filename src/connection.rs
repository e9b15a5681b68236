//! One client connection, from accept to close: hyper while it talks, only
//! its socket while it is idle.
//!
//! hyper 1 keeps, for every connection and for as long as it is open, a
//! read buffer and a header buffer of 8 KiB each and the room of its
//! service future (4 KiB here): about 22 KB per connection, 250 MB for
//! 10,000 idle keep-alive clients (`bench/idle.sh`), and none of it can be
//! configured smaller. So a connection that has had no request in flight
//! for [`PARK_AFTER`] is *parked*: the hyper connection is taken apart
//! ([`http1::Connection::into_parts`]), which frees all of that, and the
//! task keeps only the socket and any bytes hyper had read past the last
//! request. When the client writes again, a new hyper connection is built
//! over the same socket and starts with those bytes. nginx does the same
//! at every keep-alive turn (it frees a connection's large buffers between
//! requests); here it waits [`PARK_AFTER`] so that a busy connection does
//! not rebuild hyper's state at every request.
//!
//! A connection is only taken apart when nothing can be lost:
//! - no request is in flight: every [`Busy`] guard is gone (taken when
//!   hyper calls the service; held by the response body until it is
//!   written and by the request body until it is read to its end);
//! - hyper has written everything it had: its last write was followed by a
//!   completed flush ([`Socket`] keeps the flag);
//! - what hyper read and did not parse yet (a part of the next request's
//!   head, a pipelined request) comes back from `into_parts` and is read
//!   again first.
//!
//! `server.header_read_timeout_ms` is kept here, not by hyper: the next
//! request's head must be complete that long after the previous response
//! ended (or the connection opened), parked or not, so a client that
//! dribbles a head across parks is closed at the same moment as one that
//! does not. hyper's own header timer cost every request a timer
//! allocated, registered and cancelled (about 1,300 instructions,
//! `bench/gateway_instructions.sh`); the driver's one timer per connection
//! is reset about once a second instead.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, Sleep};

use crate::telemetry::metrics;

/// How long a connection stays idle, holding hyper's buffers, before it is
/// parked. Long enough that a client sending back-to-back requests never
/// pays for a rebuild; short against the 10 s a keep-alive connection may
/// wait for its next request.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// What the connection's service and its socket tell the driver: whether
/// a request is in flight, since when the connection has been idle, and
/// whether hyper still has bytes to write.
pub struct Activity {
    opened: Instant,
    in_flight: AtomicU32,
    /// When `in_flight` last fell to 0, in µs since `opened`.
    idle_since_us: AtomicU64,
    /// hyper wrote since its last completed flush.
    unflushed: AtomicBool,
    /// `server.header_read_timeout_ms`.
    head_timeout: Duration,
    /// The in-flight upstream call's response-header deadline, in µs since
    /// `opened`: [`NO_CALL`], or [`EXPIRED`] once the driver found it
    /// passed. Kept here so that the driver's one timer serves it too
    /// ([`Within`]).
    call_deadline_us: AtomicU64,
    /// Told when the driver's timer, reset at most once a second while
    /// requests run, could pass a deadline by: the connection fell idle and
    /// `head_timeout` is shorter than [`PARK_AFTER`], or a call began with a
    /// timeout that short. Exists only when one of those can happen.
    nudge: Option<Notify>,
    /// `head_timeout` is shorter than [`PARK_AFTER`]: falling idle nudges.
    short_head: bool,
}

/// No upstream call is waiting for its response headers.
const NO_CALL: u64 = 0;
/// The waiting call's deadline has passed: its [`Within`] fails it.
const EXPIRED: u64 = u64::MAX;

impl Activity {
    /// `head_timeout`: `server.header_read_timeout_ms`; `shortest_call`:
    /// the shortest response-header timeout of any module.
    pub fn new(head_timeout: Duration, shortest_call: Duration) -> Arc<Self> {
        let short_head = head_timeout < PARK_AFTER;
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since_us: AtomicU64::new(0),
            unflushed: AtomicBool::new(false),
            head_timeout,
            call_deadline_us: AtomicU64::new(NO_CALL),
            nudge: (short_head || shortest_call < PARK_AFTER).then(Notify::new),
            short_head,
        })
    }

    /// A request begins: the connection is busy until the returned guard
    /// (which rides with the response body) is dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        // Relaxed: each count is exact on its own and publishes nothing
        // else. Counts only rise here, when hyper calls the service, which
        // it does only while the driver polls it; so a 0 the driver reads
        // stays 0 until it polls hyper again. Guards may be dropped on other
        // tasks (a request body the upstream client holds).
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(self))
    }

    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.opened + Duration::from_micros(self.idle_since_us.load(Ordering::Relaxed)))
    }

    /// When the next request's head must be complete: `head_timeout` into
    /// the current idle period. None while a request is in flight (hyper
    /// reads no head then).
    fn head_deadline(&self) -> Option<Instant> {
        self.idle_since().map(|since| since + self.head_timeout)
    }

    fn since_opened_us(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.opened).as_micros()).unwrap_or(u64::MAX)
    }

    /// A call deadline as an instant; None for [`NO_CALL`] and [`EXPIRED`].
    fn deadline_at(&self, us: u64) -> Option<Instant> {
        match us {
            NO_CALL | EXPIRED => None,
            us => Some(self.opened + Duration::from_micros(us)),
        }
    }

    /// The waiting call's deadline, unless none waits or it has expired.
    fn call_deadline(&self) -> Option<Instant> {
        self.deadline_at(self.call_deadline_us.load(Ordering::Relaxed))
    }

    /// Marks the waiting call expired if its deadline is `now` or earlier;
    /// otherwise gives its deadline, for the driver's next check.
    fn expire_call_by(&self, now: Instant) -> Option<Instant> {
        let us = self.call_deadline_us.load(Ordering::Relaxed);
        let deadline = self.deadline_at(us)?;
        if now < deadline {
            return Some(deadline);
        }
        // Only this call's deadline: one that ended meanwhile cleared it.
        let _ = self.call_deadline_us.compare_exchange(
            us,
            EXPIRED,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        None
    }

    /// The earliest deadline the driver must wake for.
    fn next_deadline(&self) -> Option<Instant> {
        match (self.head_deadline(), self.call_deadline()) {
            (Some(head), Some(call)) => Some(head.min(call)),
            (head, call) => head.or(call),
        }
    }
}

/// One request in flight on its connection.
pub struct Busy(Arc<Activity>);

impl Busy {
    /// A second hold on the same request: its body and its response each
    /// keep the connection busy, as either may outlive the other (an
    /// upstream may answer before it has read the whole upload).
    pub fn also(&self) -> Busy {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(&self.0))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            a.idle_since_us
                .store(a.since_opened_us(Instant::now()), Ordering::Relaxed);
            if let Some(nudge) = a.nudge.as_ref().filter(|_| a.short_head) {
                nudge.notify_one();
            }
        }
    }
}

/// An upstream call that must have its response headers within a timeout
/// (the module's `timeout_ms`). tokio's `timeout` registered a timer in the
/// runtime's wheel for every call and removed it again: 1,770 instructions
/// a request with the moves of the wrapped future, of which this keeps
/// about 660 (`bench/gateway_instructions.sh`). The connection's driver
/// already runs a timer; the deadline is written into [`Activity`] and that
/// timer keeps it: when it passes, the driver marks it and polls the
/// connection, which polls this future, which then fails.
///
/// Only while the connection's own task polls it: a call whose client hung
/// up is moved onto a task of its own (`proxy::detached`), where no driver
/// runs. A poll from another task than the first (the waker says so)
/// takes a tokio timer for what is left of the deadline.
pub fn within<F: Future>(activity: &Activity, timeout: Duration, call: F) -> Within<'_, F> {
    Within {
        call,
        activity,
        timeout,
        timer: Timer::Unarmed,
    }
}

/// The call took longer than its timeout.
#[derive(Debug)]
pub struct Elapsed;

enum Timer {
    Unarmed,
    /// The driver keeps the deadline (µs since the connection opened);
    /// the task it serves is the one whose waker this is.
    Driver {
        us: u64,
        task: Waker,
    },
    /// Polled from another task: a timer of its own.
    Own(Pin<Box<Sleep>>),
}

pin_project_lite::pin_project! {
    pub struct Within<'a, F> {
        #[pin]
        call: F,
        activity: &'a Activity,
        timeout: Duration,
        timer: Timer,
    }

    impl<F> PinnedDrop for Within<'_, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.activity.end_call(this.timer);
        }
    }
}

impl Activity {
    /// A call begins waiting: the driver is to keep its deadline.
    fn begin_call(&self, timeout: Duration) -> u64 {
        let us = self
            .since_opened_us(Instant::now())
            .saturating_add(u64::try_from(timeout.as_micros()).unwrap_or(u64::MAX))
            .clamp(1, EXPIRED - 1);
        self.call_deadline_us.store(us, Ordering::Relaxed);
        if timeout < PARK_AFTER
            && let Some(nudge) = &self.nudge
        {
            nudge.notify_one();
        }
        us
    }

    /// The call is done waiting (answered, failed, dropped or moved to a
    /// task of its own): the driver keeps its deadline no longer.
    fn end_call(&self, timer: &Timer) {
        if let Timer::Driver { us, .. } = timer {
            // This call's deadline, or the mark the driver left on it: one
            // call at a time waits on a connection (HTTP/1).
            let _ = self.call_deadline_us.compare_exchange(
                *us,
                NO_CALL,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            let _ = self.call_deadline_us.compare_exchange(
                EXPIRED,
                NO_CALL,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.call.poll(cx) {
            this.activity.end_call(this.timer);
            *this.timer = Timer::Unarmed;
            return Poll::Ready(Ok(output));
        }
        let activity = *this.activity;
        match this.timer {
            Timer::Unarmed => {
                let us = activity.begin_call(*this.timeout);
                *this.timer = Timer::Driver {
                    us,
                    task: cx.waker().clone(),
                };
                Poll::Pending
            }
            Timer::Driver { us, task } => {
                if activity.call_deadline_us.load(Ordering::Relaxed) == EXPIRED {
                    activity.end_call(this.timer);
                    *this.timer = Timer::Unarmed;
                    return Poll::Ready(Err(Elapsed));
                }
                if task.will_wake(cx.waker()) {
                    return Poll::Pending;
                }
                // Another task: the connection's driver is gone, or no
                // longer polls this call.
                let deadline = activity.opened + Duration::from_micros(*us);
                activity.end_call(this.timer);
                let mut own = Box::pin(tokio::time::sleep_until(deadline));
                let fired = own.as_mut().poll(cx).is_ready();
                *this.timer = Timer::Own(own);
                if fired {
                    Poll::Ready(Err(Elapsed))
                } else {
                    Poll::Pending
                }
            }
            Timer::Own(own) => match own.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// A client's request body. Until it has been read to its end (or
/// dropped) hyper may still be reading it off the socket, and taking the
/// connection apart then would read the rest of the body as the next
/// request's head.
pub struct ClientBody {
    inner: Incoming,
    busy: Option<Busy>,
}

impl ClientBody {
    pub fn new(inner: Incoming, busy: Busy) -> Self {
        Self {
            inner,
            busy: Some(busy),
        }
    }
}

impl HttpBody for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.busy = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's socket as hyper sees it: the bytes carried over from the
/// previous hyper connection first, then the socket; writes mark the
/// connection unflushed until hyper's flush completes.
pub struct Socket {
    stream: TcpStream,
    carry: Bytes,
    activity: Arc<Activity>,
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.carry.is_empty() {
            let n = self.carry.len().min(buf.remaining());
            buf.put_slice(&self.carry[..n]);
            self.carry.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.activity.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.activity.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes the socket only once its own buffer is written out.
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.activity.unflushed.store(false, Ordering::Relaxed);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How the connection is served.
pub struct Serving {
    /// Without a header timeout of its own: [`Activity`] holds it.
    pub http: http1::Builder,
    /// Turns true when the gateway stops: an idle connection closes at
    /// once, a busy one after its request (hyper's graceful shutdown).
    pub stop: watch::Receiver<bool>,
}

/// How one hyper connection over the socket ended.
enum Turn {
    /// Closed, by either side, or failed.
    Ended(Result<(), hyper::Error>),
    /// Idle long enough: take it apart and keep the socket.
    Park,
    /// The client did not complete a request head in time.
    HeadTimeout,
}

/// Serves `stream` until it closes. The service moves from one hyper
/// connection over the socket to the next.
pub async fn serve<S, B>(
    mut stream: TcpStream,
    mut service: S,
    activity: Arc<Activity>,
    mut serving: Serving,
) where
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _open = metrics::Held::client_connection();
    let mut carry = Bytes::new();
    let mut parked = false;
    loop {
        if *serving.stop.borrow() {
            return;
        }
        // Parked with nothing read ahead: wait for the client's next bytes,
        // until its idle period's head deadline.
        if let Some(deadline) = activity
            .head_deadline()
            .filter(|_| parked && carry.is_empty())
        {
            let _parked = metrics::Held::parked_connection();
            tokio::select! {
                biased;
                _ = serving.stop.changed() => return,
                ready = tokio::time::timeout_at(deadline, stream.readable()) => match ready {
                    Ok(Ok(())) => {}
                    // Closed by the head timeout, or the socket failed.
                    _ => return,
                },
            }
        }
        let socket = Socket {
            stream,
            carry,
            activity: Arc::clone(&activity),
        };
        // Boxed: while parked, the task holds a pointer, not the
        // connection's state.
        let mut conn = Box::new(serving.http.serve_connection(TokioIo::new(socket), service));
        let turn = drive(&mut conn, &activity, &mut serving.stop).await;
        match turn {
            Turn::Ended(Ok(())) | Turn::HeadTimeout => return,
            Turn::Ended(Err(e)) => {
                tracing::debug!(error = %e, "connection ended with an error");
                return;
            }
            Turn::Park => {
                let parts = conn.into_parts();
                let socket = parts.io.into_inner();
                stream = socket.stream;
                // A copy: the `Bytes` hyper hands back shares its whole
                // read buffer, which is what parking is meant to free.
                carry = if parts.read_buf.is_empty() {
                    Bytes::new()
                } else {
                    Bytes::copy_from_slice(&parts.read_buf)
                };
                service = parts.service;
                parked = true;
            }
        }
    }
}

/// Runs one hyper connection until it ends, until it has been idle for
/// [`PARK_AFTER`], or until its idle period's head deadline passes (the
/// next request's head is not complete in time).
async fn drive<S, B>(
    conn: &mut http1::Connection<TokioIo<Socket>, S>,
    activity: &Activity,
    stop: &mut watch::Receiver<bool>,
) -> Turn
where
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Each hyper connection lives at least PARK_AFTER: one rebuilt with a
    // part of a head (which does not make the connection busy) is not
    // taken apart again at once.
    let earliest_park = Instant::now() + PARK_AFTER;
    let first_check = activity
        .head_deadline()
        .map_or(earliest_park, |d| d.min(earliest_park));
    let check = tokio::time::sleep_until(first_check);
    tokio::pin!(check);
    // The task's waker `check` holds; None after a reset (`poll_check`).
    let mut check_waker: Option<Waker> = None;
    // A stop sent before this connection was built is not yet seen by
    // `changed`, which resolves at once for it.
    let mut stopping = false;
    let watching = stop.clone();
    loop {
        let stopped = Quiet::new(stop.changed(), || watching.has_changed().unwrap_or(true));
        tokio::select! {
            biased;
            ended = &mut *conn => return Turn::Ended(ended),
            _ = stopped, if !stopping => {
                stopping = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            // Only with a timeout shorter than PARK_AFTER: the check below
            // may be set up to PARK_AFTER out while a request runs.
            () = nudged(activity), if activity.nudge.is_some() => {
                if let Some(deadline) = activity.next_deadline().filter(|d| *d < check.deadline()) {
                    check.as_mut().reset(deadline);
                    check_waker = None;
                }
            }
            () = std::future::poll_fn(|cx| poll_check(check.as_mut(), &mut check_waker, cx)) => {
                let now = Instant::now();
                let head_deadline = activity.head_deadline();
                if head_deadline.is_some_and(|deadline| now >= deadline) {
                    return Turn::HeadTimeout;
                }
                // A call past its deadline is marked; the poll of `conn` at
                // the next turn of this loop reaches its `Within`, which
                // fails it.
                let call_deadline = activity.expire_call_by(now);
                let next = match activity.idle_since() {
                    Some(since) if !activity.unflushed.load(Ordering::Relaxed) => {
                        let park_at = (since + PARK_AFTER).max(earliest_park);
                        if !stopping && now >= park_at {
                            return Turn::Park;
                        }
                        park_at.max(now + Duration::from_millis(10))
                    }
                    _ => now + PARK_AFTER,
                };
                let next = head_deadline.map_or(next, |d| next.min(d));
                let next = call_deadline.map_or(next, |d| next.min(d));
                check.as_mut().reset(next);
                check_waker = None;
            }
        }
    }
}

/// Polls the driver's timer only when it may have fired. Every poll of a
/// `Sleep` takes its waker slot again (about 120 instructions), and the
/// connection's task wakes about twice a request; once the timer holds
/// this task's waker, it wakes the task when it fires and `is_elapsed`
/// says so. After a reset `waker` is None and the timer is polled once
/// more: one that had fired gave its waker up.
fn poll_check(
    check: Pin<&mut tokio::time::Sleep>,
    waker: &mut Option<Waker>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) && !check.is_elapsed() {
        return Poll::Pending;
    }
    let polled = check.poll(cx);
    *waker = Some(cx.waker().clone());
    polled
}

/// Resolves when [`Activity::nudge`] is told.
async fn nudged(activity: &Activity) {
    match &activity.nudge {
        Some(nudge) => nudge.notified().await,
        None => std::future::pending().await,
    }
}

/// A future polled again only when it may have news: `news()` says so, or
/// the task's waker is not the one it registered. For `watch`'s `changed`,
/// whose every poll takes the channel's lock, while the connection's task
/// wakes about twice a request (about 220 instructions a request,
/// `bench/gateway_instructions.sh`): a stop still wakes the task through
/// the first poll's registration, and `news` then lets it through.
struct Quiet<F, N> {
    inner: Pin<Box<F>>,
    news: N,
    registered: Option<std::task::Waker>,
}

impl<F, N> Quiet<F, N> {
    fn new(inner: F, news: N) -> Self {
        Self {
            inner: Box::pin(inner),
            news,
            registered: None,
        }
    }
}

impl<F: Future, N: FnMut() -> bool + Unpin> Future for Quiet<F, N> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
            && !(this.news)()
        {
            return Poll::Pending;
        }
        let polled = this.inner.as_mut().poll(cx);
        this.registered = Some(cx.waker().clone());
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn a_quiet_stop_polls_the_channel_only_with_news_and_still_sees_it() {
        let (tx, mut rx) = watch::channel(false);
        let watching = rx.clone();
        let polls = AtomicUsize::new(0);
        let mut changed = Box::pin(rx.changed());
        let inner = std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            changed.as_mut().poll(cx)
        });
        let mut quiet = Box::pin(Quiet::new(inner, || watching.has_changed().unwrap_or(true)));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..5 {
            assert!(quiet.as_mut().poll(&mut cx).is_pending());
        }
        // Registered by the first poll, left alone by the next four.
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        // Another waker is registered again.
        let other = std::task::Waker::from(Arc::new(Nothing));
        assert!(
            quiet
                .as_mut()
                .poll(&mut Context::from_waker(&other))
                .is_pending()
        );
        assert_eq!(polls.load(Ordering::Relaxed), 2);
        assert!(tx.send(true).is_ok());
        assert!(
            quiet
                .as_mut()
                .poll(&mut Context::from_waker(&other))
                .is_ready()
        );
        assert_eq!(polls.load(Ordering::Relaxed), 3);
    }

    struct Nothing;

    impl std::task::Wake for Nothing {
        fn wake(self: Arc<Self>) {}
    }
}
