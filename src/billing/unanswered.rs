//! Charges whose answer was lost (a timeout, a connection cut after the
//! call went out): the caller has answered 503 "nothing was charged", so a
//! charge Redis did make is given back.
//!
//! Whether Redis made it is only final once Redis's clock is past the
//! charge's deadline: charge.lua makes no charge after it. Then the charge
//! is looked for where it can be: its request record (credits API, proxy
//! `Idempotency-Key`), else its row in the shard's usage stream, else,
//! should the flusher have moved that row meanwhile, the ledger (the
//! flusher commits before it deletes, so a row missing from the stream
//! and from the ledger was never written). refund.lua's void modes give
//! it back once, however often this is retried, and never when the caller
//! has since been told it was charged.
//!
//! Off the hot path: one task per process, fed by a bounded queue, working
//! through the charges in the order they were lost. It retries while Redis
//! or Postgres are away, for [`GIVE_UP`]; what it gives up on, and a
//! charge without a deadline (the meter compares clocks before its first
//! charge, so none is expected), are logged with their event id for an
//! operator, and counted.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Billing, BillingError};
use crate::metering::{Unanswered, UnansweredRecord, VoidOutcome};
use crate::telemetry::metrics;

/// Charges waiting to be looked into; past this, one is logged and left.
const QUEUE: usize = 10_000;

/// How long a charge is retried while Redis or Postgres do not answer.
const GIVE_UP: Duration = Duration::from_secs(600);

const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// The longest wait for Redis's clock to pass a deadline before asking
/// again: a deadline far ahead means Redis's clock moved, and it is
/// watched rather than trusted.
const MAX_EARLY: Duration = Duration::from_secs(1);

/// The queue to the task, started on first use.
#[derive(Default)]
pub(super) struct Voids {
    queue: OnceLock<mpsc::Sender<Unanswered>>,
}

impl Billing {
    /// Looks into `charge` in the background and gives it back if Redis
    /// made it.
    pub(super) fn void_later(&self, charge: Unanswered) {
        let queue = self.voids.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            // The task's own handles, without the queue: when the last
            // `Billing` goes, the queue closes and the task ends.
            let worker = Billing {
                voids: Arc::new(Voids::default()),
                ..self.clone()
            };
            tokio::spawn(worker.void_all(rx));
            tx
        });
        if let Err(e) = queue.try_send(charge) {
            let charge = e.into_inner();
            metrics::unanswered_charge("dropped");
            tracing::error!(
                user = %charge.user,
                event = %charge.event_id,
                "an unanswered charge could not be queued (10,000 waiting): it may stand; if the ledger has this event, refund it by hand"
            );
        }
    }

    async fn void_all(self, mut queue: mpsc::Receiver<Unanswered>) {
        while let Some(charge) = queue.recv().await {
            self.void(&charge).await;
        }
    }

    async fn void(&self, charge: &Unanswered) {
        let (user, event) = (&charge.user, &charge.event_id);
        if charge.redis_deadline == 0 {
            metrics::unanswered_charge("unknown");
            tracing::error!(
                %user,
                %event,
                "a charge without a deadline lost its answer: it may stand; if the ledger has this event, refund it by hand"
            );
            return;
        }
        let give_up = Instant::now() + GIVE_UP;
        let mut retry = FIRST_RETRY;
        let mut rebuilt = false;
        loop {
            let error = match self.try_void(charge).await {
                Ok(VoidOutcome::Early(ms)) if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(ms).min(MAX_EARLY)).await;
                    continue;
                }
                Ok(VoidOutcome::Early(_)) => {
                    BillingError::Meter(crate::metering::MeterError::Protocol {
                        script: "refund.lua",
                        detail: "Redis's clock never passed the charge's deadline".into(),
                    })
                }
                Ok(VoidOutcome::Missing) if !rebuilt => {
                    rebuilt = true;
                    match Box::pin(self.rebuild(user)).await {
                        Ok(()) => continue,
                        Err(e) => e,
                    }
                }
                Ok(VoidOutcome::Missing) => BillingError::RebuildFailed(user.clone()),
                Ok(VoidOutcome::Refunded { amount }) => {
                    metrics::unanswered_charge("refunded");
                    tracing::warn!(%user, %event, amount, "a charge whose answer was lost is given back");
                    return;
                }
                Ok(VoidOutcome::NotCharged) => {
                    metrics::unanswered_charge("not_charged");
                    tracing::info!(%user, %event, "a charge whose answer was lost was never made");
                    return;
                }
                Ok(VoidOutcome::Told) => {
                    metrics::unanswered_charge("kept");
                    tracing::info!(%user, %event, "a charge whose answer was lost stands: a repeat was told it was charged");
                    return;
                }
                Err(e) => e,
            };
            if Instant::now() >= give_up {
                metrics::unanswered_charge("gave_up");
                tracing::error!(
                    %user,
                    %event,
                    %error,
                    "gave up on a charge whose answer was lost: it may stand; if the ledger has this event, refund it by hand"
                );
                return;
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    }

    async fn try_void(&self, charge: &Unanswered) -> Result<VoidOutcome, BillingError> {
        let meter = &self.meter;
        let split = match charge.record {
            UnansweredRecord::None => {
                // Not in the stream means something only once no charge
                // can still run.
                let now = meter.clock_of(charge).await?;
                if now <= charge.redis_deadline {
                    return Ok(VoidOutcome::Early(
                        u64::try_from(charge.redis_deadline - now + 1).unwrap_or(1),
                    ));
                }
                match meter.find_unanswered(charge).await? {
                    Some(split) => Some(split),
                    None => crate::ledger::reports::charge_split(
                        self.accounts.pool(),
                        &charge.event_id,
                        charge.stamp.day.date(),
                    )
                    .await
                    .map_err(|e| BillingError::Account(e.into()))?,
                }
            }
            UnansweredRecord::Request | UnansweredRecord::Key(_) => None,
        };
        Ok(meter.void(charge, split).await?)
    }
}
