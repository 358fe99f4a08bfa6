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
//! then the batch's message ids go back to the intake (`done`), whose ledger
//! releases their acks in order.
//!
//! When the database is unreachable or a batch fails for a transient reason,
//! the batch goes to the spool and is acknowledged from there; later batches
//! queue behind it in the spool (order again), which is replayed as soon as
//! the database answers. When the spool is full the writer holds the batch,
//! which stops its queue, its shards and finally intake; when it can neither
//! commit nor spool for `pipeline.stall_secs` it stops the gateway.
//!
//! Errors are told apart by SQLSTATE (`connection::is_transient`): the
//! connection or the server's availability is retried and spooled; anything
//! else is the data's fault, and the batch is committed again with every
//! part under a savepoint (`commit::commit` with `isolate`): refused
//! messages become dead letters with the database's error, refused alert,
//! rollup and window rows are left out and counted, the rest commits. A spooled batch replays the
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
            if w.spool.is_empty() && w.retry_due() {
                match w.write(&batch).await {
                    Ok(()) => {
                        w.recovered();
                        w.health.progressed();
                        failing = None;
                        let _ = done.send(batch.message_ids());
                        continue;
                    }
                    // Backs off like any failure: a held batch is not
                    // retried in a loop while the spool fails too.
                    Err(e) => w.failed("held batch failed", &e),
                }
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

#[cfg(test)]
mod tests {
    //! The loop against a scripted store, in paused time: what is committed,
    //! spooled, held and acknowledged, in which order, and when.
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;
    use crate::model::Message;
    use crate::sink::batch::{Batch, BatchId};

    const RETRY_MIN: Duration = Duration::from_millis(200);

    /// A database that is up or down at the test's say, and remembers what
    /// it committed and when it was asked.
    #[derive(Clone, Default)]
    struct Scripted {
        up: Arc<AtomicBool>,
        committed: Arc<Mutex<Vec<i64>>>,
        attempts: Arc<Mutex<Vec<Instant>>>,
    }

    impl Scripted {
        fn committed(&self) -> Vec<i64> {
            self.committed.lock().map(|c| c.clone()).unwrap_or_default()
        }

        fn attempts(&self) -> Vec<Instant> {
            self.attempts.lock().map(|a| a.clone()).unwrap_or_default()
        }
    }

    impl Store for Scripted {
        fn write(
            &mut self,
            batch: &SealedBatch,
        ) -> impl std::future::Future<Output = Result<(), WriteError>> + Send {
            let (this, seq) = (self.clone(), batch.id.seq);
            async move {
                if let Ok(mut a) = this.attempts.lock() {
                    a.push(Instant::now());
                }
                if !this.up.load(Relaxed) {
                    return Err(WriteError::Unavailable("down".into()));
                }
                if let Ok(mut c) = this.committed.lock() {
                    c.push(seq);
                }
                Ok(())
            }
        }
    }

    /// A batch holding one message whose ledger id is `seq`.
    fn batch(seq: i64) -> SealedBatch {
        let mut b = Batch::new(1);
        b.push_dropped(&Message {
            id: seq as u64,
            device: Some(Arc::from("d")),
            topic: Arc::from("devices/d/telemetry"),
            payload: Bytes::from_static(b"{}"),
            received: 0,
            content_type: None,
            redelivery: false,
        });
        b.seal(BatchId { run: 1, seq })
    }

    struct Running {
        store: Scripted,
        queue: mpsc::Sender<SealedBatch>,
        done: mpsc::UnboundedReceiver<Vec<u64>>,
        metrics: Arc<Metrics>,
        task: tokio::task::JoinHandle<Result<(), WriterFailed>>,
        _dir: tempfile::TempDir,
    }

    /// A writer over a scripted store and a real spool of `spool_max` bytes.
    fn start(up: bool, spool_max: u64, remove_spool_dir: bool) -> Running {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let spool_dir = dir.path().join("writer-0");
        let (spool, _) = Spool::open(&spool_dir, spool_max, 4096).unwrap_or_else(|e| panic!("{e}"));
        if remove_spool_dir {
            std::fs::remove_dir_all(&spool_dir).unwrap_or_else(|e| panic!("{e}"));
        }
        let store = Scripted::default();
        store.up.store(up, Relaxed);
        let metrics = Arc::new(Metrics::default());
        let (queue, rx) = mpsc::channel(1);
        let (done_tx, done) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(
            0,
            store.clone(),
            metrics.clone(),
            RETRY_MIN,
            rx,
            done_tx,
            spool,
            Arc::new(WriterHealth::default()),
            Duration::from_secs(60),
        ));
        Running {
            store,
            queue,
            done,
            metrics,
            task,
            _dir: dir,
        }
    }

    async fn send(r: &Running, seq: i64) {
        assert!(r.queue.send(batch(seq)).await.is_ok(), "writer gone");
    }

    /// The acks released so far, without waiting.
    fn acked(r: &mut Running) -> Vec<u64> {
        drain(&mut r.done)
    }

    fn drain(done: &mut mpsc::UnboundedReceiver<Vec<u64>>) -> Vec<u64> {
        let mut ids = Vec::new();
        while let Ok(batch) = done.try_recv() {
            ids.extend(batch);
        }
        ids
    }

    /// Lets the writer run until it waits on something (paused time moves
    /// on only when every task waits).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn batches_commit_in_order_and_are_acked_after_commit() {
        let mut r = start(true, 1 << 20, false);
        for seq in 1..=3 {
            send(&r, seq).await;
        }
        drop(r.queue);
        let ended = r.task.await;
        assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
        assert_eq!(r.store.committed(), vec![1, 2, 3]);
        let mut acks = Vec::new();
        while let Some(ids) = r.done.recv().await {
            acks.extend(ids);
        }
        assert_eq!(acks, vec![1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_database_is_down_batches_are_spooled_acked_then_replayed_in_order() {
        let mut r = start(false, 1 << 20, false);
        send(&r, 1).await;
        send(&r, 2).await;
        settle().await;
        assert_eq!(acked(&mut r), vec![1, 2], "acked once spooled");
        assert_eq!(r.metrics.spool_batches_written.load(Relaxed), 2);
        assert!(r.store.committed().is_empty());
        r.store.up.store(true, Relaxed);
        // The retry delay passes; the spool is replayed before anything new.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(r.store.committed(), vec![1, 2]);
        assert_eq!(r.metrics.spool_batches_replayed.load(Relaxed), 2);
        send(&r, 3).await;
        drop(r.queue);
        assert!(matches!(r.task.await, Ok(Ok(()))));
        assert_eq!(r.store.committed(), vec![1, 2, 3]);
        assert_eq!(
            drain(&mut r.done),
            vec![3],
            "a replayed batch is not acked twice"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_doubling_up_to_ten_seconds() {
        let r = start(false, 1 << 20, false);
        send(&r, 1).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let attempts = r.store.attempts();
        let gaps: Vec<u64> = attempts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis() as u64)
            .collect();
        assert_eq!(
            &gaps[..8],
            &[200, 400, 800, 1600, 3200, 6400, 10_000, 10_000],
            "{gaps:?}"
        );
        assert!(gaps.iter().all(|g| *g <= 10_000));
        assert_eq!(
            r.metrics.batch_failures.load(Relaxed),
            attempts.len() as u64
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_spool_holds_the_batch_unacked_and_stops_the_queue() {
        // Room for one batch only: the second is held.
        let mut r = start(false, 1, false);
        send(&r, 1).await;
        send(&r, 2).await;
        settle().await;
        assert_eq!(acked(&mut r), vec![1], "the held batch is not acked");
        // The queue (capacity 1) takes one more, then pushes back.
        send(&r, 3).await;
        settle().await;
        assert!(
            r.queue.try_send(batch(4)).is_err(),
            "a holding writer takes no more"
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(acked(&mut r), Vec::<u64>::new(), "nothing acked while held");
        r.store.up.store(true, Relaxed);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(r.store.committed(), vec![1, 2, 3]);
        assert_eq!(acked(&mut r), vec![2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn neither_commit_nor_spool_for_the_stall_limit_ends_the_writer_unacked() {
        let mut r = start(false, 1 << 20, true);
        send(&r, 1).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!r.task.is_finished(), "still trying before the limit");
        // Backing off, not spinning: 200 ms doubling to 10 s gives 8 tries
        // in 30 s (this loop once retried at once, forever).
        let tries = r.store.attempts().len();
        assert!((5..=10).contains(&tries), "{tries} tries in 30 s");
        let ended = tokio::time::timeout(Duration::from_secs(60), &mut r.task).await;
        match ended {
            Ok(Ok(Err(WriterFailed {
                writer: 0,
                secs: 60,
                ..
            }))) => {}
            other => panic!("expected WriterFailed, got {other:?}"),
        }
        assert_eq!(acked(&mut r), Vec::<u64>::new());
        assert!(r.store.committed().is_empty());
    }
}
