//! COPY writers: K tasks, each with its own connection and its own spool.
//! Every shard feeds exactly one writer, so one shard's batches commit in
//! the order they were made (the dedup state stored with a batch must never
//! get ahead of the rows committed before it).
//!
//! A batch is one transaction: its id into `applied_batches` (a batch seen
//! there already is skipped: that makes retries, replays and a commit whose
//! answer was lost all safe), message identities into `message_ids` (a
//! message whose identity is already there is left out), readings and dead
//! letters by COPY, sequence windows into `device_watermarks`; then commit,
//! then the batch's message ids go to the ack ledger.
//!
//! When the database is unreachable or a batch fails for a transient reason,
//! the batch goes to the spool and is acknowledged from there; later batches
//! queue behind it in the spool (order again), which is replayed as soon as
//! the database answers. When the spool is full the writer holds the batch,
//! which stops its queue, its shards and finally intake; when it can neither
//! commit nor spool for `pipeline.stall_secs` it stops the gateway.
//!
//! Errors are told apart by SQLSTATE (`connection::is_transient`): the connection or
//! the server's availability is retried and spooled; anything else is the
//! data's fault, and the batch is committed again with every part under a
//! savepoint (`commit::commit` with `isolate`): refused messages become dead
//! letters with the database's error, refused alert, rollup and window rows
//! are left out and counted, the rest commits. A spooled batch replays the
//! same way, so no input can stop a writer.

//!
//! This file is the loop: retry, spool, hold, replay. Committing is
//! [`super::store`] (behind the [`Store`] trait) and [`super::commit`].

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::batch::SealedBatch;
pub use super::commit::WriterContext;
use super::spool::{Spool, SpoolError};
pub use super::store::WriteError;
use super::store::{Postgres, Store};
use crate::model::now_micros;
use crate::telemetry::Metrics;

/// Longest pause between retries.
const MAX_RETRY: Duration = Duration::from_secs(10);

/// What a writer tells the supervisor about its progress.
#[derive(Debug, Default)]
pub struct WriterHealth {
    /// Since when (µs) a batch has waited that is neither committed nor
    /// spooled; 0 when none waits.
    waiting_since: AtomicI64,
}

impl WriterHealth {
    fn waiting(&self) {
        let _ = self
            .waiting_since
            .compare_exchange(0, now_micros(), Relaxed, Relaxed);
    }

    fn progressed(&self) {
        self.waiting_since.store(0, Relaxed);
    }

    /// True when a batch has waited for longer than `limit`.
    pub fn stalled(&self, limit: Duration) -> bool {
        let since = self.waiting_since.load(Relaxed);
        since != 0 && now_micros() - since > limit.as_micros() as i64
    }
}

/// Why a writer stopped before its queue closed.
#[derive(Debug, thiserror::Error)]
#[error("writer {writer} could neither commit nor spool for {secs} s: {last}")]
pub struct WriterFailed {
    pub writer: usize,
    pub secs: u64,
    pub last: String,
}

/// One writer's retry and spool state around its store.
struct Writer<S> {
    id: usize,
    store: S,
    metrics: Arc<Metrics>,
    retry_min: Duration,
    spool: Spool,
    delay: Duration,
    retry_at: Option<Instant>,
    reported_spool: (u64, u64),
    health: Arc<WriterHealth>,
}

impl<S: Store> Writer<S> {
    async fn write(&mut self, batch: &SealedBatch) -> Result<(), WriteError> {
        self.store.write(batch).await
    }

    fn failed(&mut self, what: &str, error: &WriteError) {
        self.metrics.batch_failures.fetch_add(1, Relaxed);
        tracing::warn!(writer = self.id, %error, retry_in_ms = self.delay.as_millis() as u64, "{what}");
        self.retry_at = Some(Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(MAX_RETRY);
    }

    fn recovered(&mut self) {
        self.delay = self.retry_min;
        self.retry_at = None;
    }

    fn retry_due(&self) -> bool {
        self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Replays the spool, oldest first, until it is empty or a write fails.
    async fn replay(&mut self) -> Result<(), WriteError> {
        while let Some(batch) = self.spool.peek()? {
            self.write(&batch).await?;
            self.spool.advance()?;
            self.metrics.spool_batches_replayed.fetch_add(1, Relaxed);
            self.report_spool();
        }
        Ok(())
    }

    /// After a batch was appended to the spool: its messages are durable.
    fn spooled(&mut self) {
        self.metrics.spool_batches_written.fetch_add(1, Relaxed);
        self.health.progressed();
        self.report_spool();
    }

    fn report_spool(&mut self) {
        let now = (self.spool.bytes(), self.spool.segments() as u64);
        let m = &self.metrics;
        m.spool_bytes
            .fetch_add(now.0.wrapping_sub(self.reported_spool.0), Relaxed);
        m.spool_segments
            .fetch_add(now.1.wrapping_sub(self.reported_spool.1), Relaxed);
        self.reported_spool = now;
    }
}

/// Runs one writer until its queue closes and is drained.
///
/// # Errors
/// [`WriterFailed`] when a batch could be neither committed nor spooled
/// (the database unreachable and the spool failing, not merely full) for
/// `stall`: the batch stays unacknowledged, and the gateway stops so that
/// its supervisor restarts it.
pub async fn run(
    id: usize,
    ctx: Arc<WriterContext>,
    queue: mpsc::Receiver<SealedBatch>,
    done: mpsc::UnboundedSender<Vec<u64>>,
    spool: Spool,
    health: Arc<WriterHealth>,
    stall: Duration,
) -> Result<(), WriterFailed> {
    let (metrics, retry_min) = (ctx.metrics.clone(), ctx.retry_min);
    let store = Postgres::new(id, ctx);
    drive(
        id, store, metrics, retry_min, queue, done, spool, health, stall,
    )
    .await
}

/// [`run`] over any [`Store`]: the loop itself.
///
/// # Errors
/// As [`run`].
#[allow(clippy::too_many_arguments)]
pub async fn drive<S: Store>(
    id: usize,
    store: S,
    metrics: Arc<Metrics>,
    retry_min: Duration,
    mut queue: mpsc::Receiver<SealedBatch>,
    done: mpsc::UnboundedSender<Vec<u64>>,
    spool: Spool,
    health: Arc<WriterHealth>,
    stall: Duration,
) -> Result<(), WriterFailed> {
    let mut w = Writer {
        id,
        delay: retry_min,
        retry_min,
        metrics,
        store,
        spool,
        retry_at: None,
        reported_spool: (0, 0),
        health,
    };
    // Since when the held batch has failed to spool for a reason other than
    // a full spool, with the last error.
    let mut failing: Option<(Instant, String)> = None;
    w.report_spool();
    // A batch neither committed nor spooled (the spool is full or failing).
    let mut held: Option<SealedBatch> = None;
    loop {
        if !w.spool.is_empty() && w.retry_due() {
            match w.replay().await {
                Ok(()) => {
                    w.recovered();
                    tracing::info!(writer = id, "spool replayed");
                }
                Err(e) => w.failed("spool replay failed", &e),
            }
        }
        if let Some(batch) = held.take() {
            // Nothing older waits in the spool: the database may take it.
            if w.spool.is_empty() && w.retry_due() && w.write(&batch).await.is_ok() {
                w.recovered();
                w.health.progressed();
                failing = None;
                let _ = done.send(batch.message_ids());
                continue;
            }
            held = match w.spool.append(&batch) {
                Ok(()) => {
                    w.spooled();
                    failing = None;
                    let _ = done.send(batch.message_ids());
                    None
                }
                Err(SpoolError::Full { .. }) => {
                    failing = None;
                    Some(batch)
                }
                Err(e) => {
                    let since = failing.as_ref().map_or_else(Instant::now, |f| f.0);
                    if since.elapsed() >= stall {
                        tracing::error!(writer = id, error = %e, "cannot commit or spool; stopping the gateway (the batch stays unacknowledged)");
                        return Err(WriterFailed {
                            writer: id,
                            secs: stall.as_secs(),
                            last: e.to_string(),
                        });
                    }
                    if failing.is_none() {
                        tracing::error!(writer = id, error = %e, "cannot spool; holding the batch");
                    }
                    failing = Some((since, e.to_string()));
                    Some(batch)
                }
            };
            if held.is_some() {
                let wait = w.retry_at.unwrap_or_else(|| Instant::now() + w.delay);
                tokio::time::sleep_until(wait).await;
                w.retry_at = Some(Instant::now());
                continue;
            }
        }
        let next = if w.spool.is_empty() {
            queue.recv().await
        } else {
            let wait = w.retry_at.unwrap_or_else(Instant::now);
            tokio::select! {
                batch = queue.recv() => batch,
                _ = tokio::time::sleep_until(wait) => continue,
            }
        };
        let Some(batch) = next else { break };
        w.health.waiting();
        if w.spool.is_empty() {
            match w.write(&batch).await {
                Ok(()) => {
                    w.recovered();
                    w.health.progressed();
                    let _ = done.send(batch.message_ids());
                    continue;
                }
                Err(e) => w.failed("batch failed; spooling it", &e),
            }
        }
        // Behind the spool, or just failed: keep order by spooling.
        held = Some(batch);
    }
    // Queue closed: shutting down. One last replay attempt; whatever stays
    // in the spool is replayed at the next start.
    if !w.spool.is_empty() {
        if let Err(e) = w.replay().await {
            tracing::warn!(writer = id, error = %e, pending = w.spool.pending(), "spool kept for the next start");
        }
    }
    tracing::debug!(writer = id, "writer finished");
    Ok(())
}
