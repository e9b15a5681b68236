//! Replays for `Idempotency-Key`: the first response is kept (up to
//! `metering.replay_max_bytes`) while it streams to its client, and a
//! repeat of the key gets it back instead of a second upstream call.
//!
//! The record is written *before* the client can see the end of the
//! response (the last frame is held until Redis has it), so a client that
//! retries as soon as it has the whole answer finds it replayable, never
//! "in progress".

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{Body, BoxError, full};
use crate::domain::{IdempotencyKey, UserId};
use crate::metering::{Meter, StoredResponse};

/// What completes one idempotency record.
pub struct Recording {
    pub meter: Meter,
    pub user: UserId,
    pub key: IdempotencyKey,
    /// The charge event that owns the record.
    pub event_id: String,
    pub max_bytes: usize,
}

impl Recording {
    /// Tees `response`'s body into the record as it streams.
    pub fn wrap(self, response: Response<Body>) -> Response<Body> {
        let (parts, body) = response.into_parts();
        let status = parts.status.as_u16();
        let headers = encode_headers(&parts.headers);
        let recorder = Recorder {
            inner: body,
            max_bytes: self.max_bytes,
            kept: Some(BytesMut::new()),
            pending: Some((self, status, headers)),
            storing: None,
            held: None,
        };
        Response::from_parts(parts, recorder.boxed_unsync())
    }

    /// The call ended without a response worth replaying.
    pub async fn abandon(self) {
        self.store(None).await;
    }

    async fn store(self, response: Option<StoredResponse>) {
        match self
            .meter
            .complete(&self.user, &self.key, &self.event_id, response.as_ref())
            .await
        {
            Ok(_) => {}
            // The record stays "pending" until its lease ends; a repeat is
            // then refused as a duplicate, never forwarded.
            Err(e) => tracing::warn!(error = %e, "idempotency record not completed"),
        }
    }
}

type Storing = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Recorder {
    inner: Body,
    max_bytes: usize,
    /// The body so far; `None` once it outgrew `max_bytes`.
    kept: Option<BytesMut>,
    /// The record to complete, until it is (status and headers with it).
    pending: Option<(Recording, u16, String)>,
    storing: Option<Storing>,
    /// The frame (or end) held back while the record is written.
    held: Option<Option<Result<Frame<Bytes>, BoxError>>>,
}

impl Recorder {
    fn start_storing(&mut self) {
        if let Some((recording, status, headers)) = self.pending.take() {
            let response = self.kept.take().map(|body| StoredResponse {
                status,
                headers,
                body: body.freeze(),
            });
            self.storing = Some(Box::pin(recording.store(response)));
        }
    }
}

impl HttpBody for Recorder {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(storing) = this.storing.as_mut() {
                ready!(storing.as_mut().poll(cx));
                this.storing = None;
                return Poll::Ready(this.held.take().flatten());
            }
            if this.held.is_some() {
                return Poll::Ready(this.held.take().flatten());
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let fits = this
                            .kept
                            .as_ref()
                            .is_some_and(|k| k.len() + data.len() <= this.max_bytes);
                        match this.kept.as_mut() {
                            Some(kept) if fits => kept.extend_from_slice(data),
                            _ => this.kept = None,
                        }
                    }
                    if this.pending.is_some() && this.inner.is_end_stream() {
                        this.held = Some(Some(Ok(frame)));
                        this.start_storing();
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                None => {
                    if this.pending.is_some() {
                        this.held = Some(None);
                        this.start_storing();
                        continue;
                    }
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    // Cut off: whatever was kept is not the whole response.
                    this.kept = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none()
            && self.storing.is_none()
            && self.held.is_none()
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // The client left before the end: the call is complete (charged),
        // but its response cannot be replayed.
        if let Some((recording, _, _)) = self.pending.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(recording.store(None));
        }
    }
}

/// `name: value` lines; a header value cannot contain a newline.
fn encode_headers(headers: &HeaderMap) -> String {
    let mut out = String::new();
    for (name, value) in headers {
        out.push_str(name.as_str());
        out.push_str(": ");
        out.push_str(&String::from_utf8_lossy(value.as_bytes()));
        out.push('\n');
    }
    out
}

/// The first call's response, as a repeat of its key gets it.
pub fn rebuild(stored: StoredResponse) -> Response<Body> {
    let mut response = Response::new(full(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    for line in stored.headers.lines() {
        if let Some((name, value)) = line.split_once(": ")
            && let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            )
        {
            headers.append(name, value);
        }
    }
    IdempotencyKey::mark_replayed(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_survive_the_round_trip() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2; Path=/"));
        let rebuilt = rebuild(StoredResponse {
            status: 201,
            headers: encode_headers(&h),
            body: Bytes::from_static(b"{}"),
        });
        assert_eq!(rebuilt.status(), 201);
        assert_eq!(rebuilt.headers()["content-type"], "application/json");
        let cookies: Vec<_> = rebuilt.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2; Path=/"]);
        assert_eq!(rebuilt.headers()["idempotent-replayed"], "true");
    }
}
