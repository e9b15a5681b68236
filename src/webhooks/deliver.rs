//! The deliverer: one loop per endpoint, on every instance.
//!
//! A loop claims its endpoint's due deliveries with `FOR UPDATE SKIP
//! LOCKED`, pushing each one's `next_attempt_at` past the attempt's
//! deadline (the lease) and counting the attempt, then sends them, at most
//! `concurrency` at a time, and records each outcome. Two instances never
//! claim the same row at once; an instance killed mid-attempt leaves its
//! rows to whoever comes after the lease, with the same `webhook-id`. The
//! outcome is only recorded if the row is still the attempt's (same
//! attempt count), so a late answer cannot overwrite a newer attempt.
//!
//! One endpoint's loop waits only for that endpoint: a receiver that is
//! down or slow holds up its own queue and nothing else.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use sqlx::PgPool;

use super::client::{self, Answer};
use super::{Endpoint, EventType, Outbox, sign};
use crate::telemetry::metrics;

pub struct Deliverer {
    pool: PgPool,
    outbox: Arc<Outbox>,
}

/// A claimed delivery.
#[derive(sqlx::FromRow)]
struct Claimed {
    id: i64,
    attempts: i32,
    event_id: String,
    #[sqlx(rename = "type")]
    kind: String,
    body: String,
    created_at: DateTime<Utc>,
}

/// What one attempt means for its delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Worth another attempt (5xx, 408, 429, 3xx, no answer).
    Retry,
    /// The receiver refused it for good (any other 4xx).
    Refused,
}

pub fn verdict(answer: &Answer) -> Verdict {
    match answer {
        Answer::Status(s) if (200..300).contains(s) => Verdict::Delivered,
        Answer::Status(408 | 429) => Verdict::Retry,
        Answer::Status(s) if (400..500).contains(s) => Verdict::Refused,
        _ => Verdict::Retry,
    }
}

impl Deliverer {
    pub fn new(pool: PgPool, outbox: Arc<Outbox>) -> Self {
        Self { pool, outbox }
    }

    /// Runs until the task is dropped: a loop per endpoint, the queue
    /// gauges every five seconds, and the retention once an hour.
    pub async fn run(self) {
        let hooks = Arc::clone(self.outbox.hooks());
        if hooks.is_empty() {
            return;
        }
        let loops = (0..hooks.endpoints.len()).map(|i| self.endpoint_loop(i));
        let gauges = async {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            let mut last_prune: Option<tokio::time::Instant> = None;
            loop {
                tick.tick().await;
                self.queue_gauges().await;
                if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
                    last_prune = Some(tokio::time::Instant::now());
                    if let Err(e) = prune(&self.pool, hooks.delivery.keep_days).await {
                        tracing::warn!(error = %e, "webhooks: cannot delete old events");
                    }
                }
            }
        };
        tokio::join!(join_all(loops), gauges);
    }

    async fn endpoint_loop(&self, index: usize) {
        let hooks = self.outbox.hooks();
        let endpoint = &hooks.endpoints[index];
        let poll = Duration::from_millis(hooks.delivery.poll_ms);
        let mut produced = self.outbox.subscribe();
        loop {
            match self.claim(endpoint).await {
                Ok(batch) if !batch.is_empty() => {
                    join_all(batch.into_iter().map(|c| self.attempt(endpoint, c))).await;
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    metrics::postgres_error();
                    tracing::warn!(endpoint = %endpoint.url, error = %e, "webhooks: cannot claim deliveries");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                changed = produced.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(poll).await;
                    }
                }
            }
        }
    }

    /// How long a claim keeps other instances off a delivery: the
    /// attempt's deadline, with room for recording its outcome.
    fn lease(&self) -> Duration {
        self.outbox.hooks().timeout() * 2 + Duration::from_secs(2)
    }

    async fn claim(&self, endpoint: &Endpoint) -> Result<Vec<Claimed>, sqlx::Error> {
        let limit = self.outbox.hooks().delivery.concurrency as i64;
        sqlx::query_as(
            "UPDATE webhook_deliveries d
             SET attempts = d.attempts + 1, last_attempt_at = now(),
                 next_attempt_at = now() + make_interval(secs => $3)
             FROM webhook_events e
             WHERE e.id = d.event_id AND d.id IN (
                SELECT id FROM webhook_deliveries
                WHERE endpoint = $1 AND status = 'pending' AND next_attempt_at <= now()
                ORDER BY next_attempt_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED)
             RETURNING d.id, d.attempts, e.id AS event_id, e.type, e.body, e.created_at",
        )
        .bind(&endpoint.url)
        .bind(limit)
        .bind(self.lease().as_secs_f64())
        .fetch_all(&self.pool)
        .await
    }

    async fn attempt(&self, endpoint: &Endpoint, c: Claimed) {
        let hooks = self.outbox.hooks();
        let timestamp = Utc::now().timestamp();
        let signature = sign::signature(endpoint.key(), &c.event_id, timestamp, c.body.as_bytes());
        let headers = [
            ("webhook-id", c.event_id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        let answer = client::post(
            &endpoint.target,
            &headers,
            Bytes::from(c.body.into_bytes()),
            hooks.timeout(),
        )
        .await;
        let verdict = verdict(&answer);
        let (status, error) = match &answer {
            Answer::Status(s) => (
                Some(i32::from(*s)),
                (verdict != Verdict::Delivered).then(|| format!("answered {s}")),
            ),
            Answer::Failed(why) => (None, Some(why.clone())),
        };
        let now = Utc::now();
        let next = now + backoff(&hooks.delivery, c.attempts);
        let give_up =
            c.created_at + chrono::Duration::seconds(hooks.delivery.give_up_after_secs as i64);
        let (state, outcome) = match verdict {
            Verdict::Delivered => ("delivered", "delivered"),
            Verdict::Refused => ("failed", "failed"),
            Verdict::Retry if next > give_up => ("failed", "failed"),
            Verdict::Retry => ("pending", "retry"),
        };
        let kind = EventType::parse(&c.kind).map_or("unknown", EventType::as_str);
        metrics::webhook_attempt(kind, outcome, u32::try_from(c.attempts).unwrap_or(0));
        match outcome {
            "delivered" => {
                tracing::debug!(endpoint = %endpoint.url, event = %c.event_id, attempts = c.attempts, "webhook delivered")
            }
            "retry" => {
                tracing::warn!(endpoint = %endpoint.url, event = %c.event_id, attempt = c.attempts, error = error.as_deref().unwrap_or(""), next = %next, "webhook attempt failed; will retry")
            }
            _ => {
                tracing::warn!(endpoint = %endpoint.url, event = %c.event_id, attempts = c.attempts, error = error.as_deref().unwrap_or(""), "webhook delivery failed; not retried")
            }
        }
        let recorded = sqlx::query(
            "UPDATE webhook_deliveries
             SET status = $3, next_attempt_at = $4, last_status = $5, last_error = $6,
                 delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE delivered_at END
             WHERE id = $1 AND attempts = $2 AND status = 'pending'",
        )
        .bind(c.id)
        .bind(c.attempts)
        .bind(state)
        .bind(if state == "pending" { next } else { now })
        .bind(status)
        .bind(error.map(|e| truncate(e, 500)))
        .execute(&self.pool)
        .await;
        if let Err(e) = recorded {
            // The lease runs out and the delivery is attempted again: at
            // least once, as promised; the receiver dedupes on the id.
            metrics::postgres_error();
            tracing::warn!(event = %c.event_id, error = %e, "webhooks: cannot record an attempt");
        }
    }

    async fn queue_gauges(&self) {
        let row: Result<(f64, i64), sqlx::Error> = sqlx::query_as(
            "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8, count(*)
             FROM webhook_deliveries WHERE status = 'pending'",
        )
        .fetch_one(&self.pool)
        .await;
        if let Ok((age, depth)) = row {
            metrics::webhook_queue(age, depth);
        }
    }
}

/// Deletes the events older than `keep_days` none of whose deliveries is
/// still pending (their deliveries go with them). Returns how many.
pub async fn prune(pool: &PgPool, keep_days: u32) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM webhook_events e
         WHERE e.created_at < now() - make_interval(days => $1)
           AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                           WHERE d.event_id = e.id AND d.status = 'pending')",
    )
    .bind(i32::try_from(keep_days).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// The wait before attempt `attempts + 1`: `first_retry_ms`, four times
/// longer at each attempt, at most `max_retry_ms`, each within ±25 %
/// (jitter, so the retries of a receiver's outage do not all land at once).
pub fn backoff(settings: &super::DeliverySettings, attempts: i32) -> chrono::Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(20);
    let base = settings
        .first_retry_ms
        .saturating_mul(4u64.saturating_pow(exponent))
        .min(settings.max_retry_ms);
    let jitter: f64 = rand::random_range(0.75..1.25);
    chrono::Duration::milliseconds((base as f64 * jitter) as i64)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_verdicts() {
        for (answer, expected) in [
            (Answer::Status(200), Verdict::Delivered),
            (Answer::Status(204), Verdict::Delivered),
            (Answer::Status(301), Verdict::Retry),
            (Answer::Status(400), Verdict::Refused),
            (Answer::Status(410), Verdict::Refused),
            (Answer::Status(408), Verdict::Retry),
            (Answer::Status(429), Verdict::Retry),
            (Answer::Status(500), Verdict::Retry),
            (Answer::Status(503), Verdict::Retry),
            (Answer::Failed("reset".into()), Verdict::Retry),
        ] {
            assert_eq!(verdict(&answer), expected, "{answer:?}");
        }
    }

    #[test]
    fn backoff_grows_fourfold_with_jitter_and_a_cap() {
        let s = super::super::DeliverySettings::default();
        for (attempts, base) in [(1, 5_000), (2, 20_000), (3, 80_000), (12, 4 * 3600 * 1000)] {
            for _ in 0..50 {
                let ms = backoff(&s, attempts).num_milliseconds();
                assert!(
                    (base * 3 / 4..=base * 5 / 4).contains(&ms),
                    "attempt {attempts}: {ms} ms"
                );
            }
        }
    }
}
