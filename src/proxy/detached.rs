//! A future that outlives its caller.
//!
//! hyper drops a request's handler when the client hangs up. The proxy's
//! phases must still settle the charge they made (refund a failed call)
//! and release their gauges, so they run inside [`Detached`]: polled in
//! place while the client waits (no task spawned on the common path), and
//! moved onto a task of its own if dropped before it is done.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub struct Detached<T: Send + 'static> {
    inner: Option<Boxed<T>>,
}

impl<T: Send + 'static> Detached<T> {
    pub fn new(future: impl Future<Output = T> + Send + 'static) -> Self {
        Self {
            inner: Some(Box::pin(future)),
        }
    }
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(inner) = self.inner.as_mut() else {
            // Polled after completion: a caller bug, and never ready again.
            return Poll::Pending;
        };
        let output = std::task::ready!(inner.as_mut().poll(cx));
        self.inner = None;
        Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(inner);
            }
            // Only when the runtime itself is shutting down.
            Err(_) => tracing::error!("request abandoned outside the runtime; not settled"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_dropped_future_still_runs_to_the_end() {
        let finished = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&finished);
        let detached = Detached::new(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            done.store(true, Ordering::SeqCst);
        });
        // The caller gives up after 5 ms, as hyper does when a client leaves.
        assert!(
            tokio::time::timeout(Duration::from_millis(5), detached)
                .await
                .is_err()
        );
        assert!(!finished.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn awaited_to_completion_it_returns_the_output() {
        assert_eq!(Detached::new(async { 7 }).await, 7);
    }
}
