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
//! which stops its queue, its shards and finally intake. A row the database
//! rejects for good (a data or constraint error) does not block anything:
//! the batch is retried message by message and only the rejected message is
//! stored, as a dead letter.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Transaction};
use tokio_util::sync::CancellationToken;

use super::batch::{
    SealedBatch, ALERT_COLUMNS, DEAD_LETTER_COLUMNS, READINGS_COLUMNS, ROLLUP_COLUMNS,
};
use super::copy::RowBuffer;
use super::partitions::Partitions;
use super::spool::{Spool, SpoolError};
use crate::model::now_micros;
use crate::telemetry::Metrics;

/// Longest pause between retries.
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How long one batch may take before it is treated as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// The same once shutdown has begun: what cannot commit quickly is spooled.
const SHUTDOWN_WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// What every writer shares.
#[derive(Debug)]
pub struct WriterContext {
    pub db: Db,
    pub schema: String,
    pub partitions: Arc<Partitions>,
    pub metrics: Arc<Metrics>,
    pub retry_min: Duration,
    /// Cancelled when the gateway is shutting down.
    pub shutdown: CancellationToken,
    /// NOTIFY channel for alerts; empty for none.
    pub notify_channel: String,
    /// Committed alerts (device, JSON) for the MQTT alert topic.
    pub alerts: Option<mpsc::UnboundedSender<(Arc<str>, String)>>,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("database: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Where the database is and how to talk to it (TLS or not).
#[derive(Clone)]
pub struct Db {
    pub pg: tokio_postgres::Config,
    /// TLS with verified certificates, when `database.ca_file` is set.
    pub tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl From<tokio_postgres::Config> for Db {
    fn from(pg: tokio_postgres::Config) -> Db {
        Db { pg, tls: None }
    }
}

/// Opens a connection and drives it in a background task.
///
/// # Errors
/// When the database cannot be reached or refuses the login.
pub async fn connect(db: &Db) -> Result<Client, tokio_postgres::Error> {
    fn drive<F>(connection: F)
    where
        F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
    {
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection ended");
            }
        });
    }
    match &db.tls {
        Some(tls) => {
            let (client, connection) = db.pg.connect(tls.clone()).await?;
            drive(connection);
            Ok(client)
        }
        None => {
            let (client, connection) = db.pg.connect(NoTls).await?;
            drive(connection);
            Ok(client)
        }
    }
}

/// The server's own words for a database error (SQLSTATE, message,
/// detail), where `Display` of the error would only say "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} {}", db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => e.to_string(),
    }
}

/// True for "no partition of relation ... found for row" (SQLSTATE 23514,
/// shared with CHECK violations): transient, the partition gets created.
fn is_missing_partition(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &SqlState::CHECK_VIOLATION
            && db.message().starts_with("no partition of relation")
    })
}

/// True for errors that retrying the same rows cannot fix: data exceptions
/// (class 22) and integrity violations (class 23), such as a CHECK
/// constraint an operator added.
fn is_permanent(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else { return false };
    let class = &code.code()[..2];
    (class == "22" || class == "23") && !is_missing_partition(e)
}

async fn copy(tx: &Transaction<'_>, sql: &str, data: Bytes) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in(sql).await?;
    futures_util::pin_mut!(sink);
    sink.send(data).await?;
    sink.finish().await
}

/// What a commit did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub readings: usize,
    /// Messages left out because the database already had them.
    pub duplicates: usize,
    /// Messages the database rejected, stored as dead letters.
    pub rejected: usize,
    /// The batch had been committed before (a replay or a lost answer).
    pub already_applied: bool,
}

/// Commits one batch in one transaction. With `isolate`, each message's
/// rows go in under a savepoint and a message the database rejects becomes
/// a dead letter instead of failing the batch.
pub async fn commit(
    client: &mut Client,
    ctx: &WriterContext,
    batch: &SealedBatch,
    isolate: bool,
) -> Result<Committed, tokio_postgres::Error> {
    let s = &ctx.schema;
    let created = ctx.partitions.ensure(client, &batch.partitions).await?;
    ctx.metrics
        .partitions_created
        .fetch_add(created as u64, Relaxed);
    let mut tx = client.transaction().await?;
    let mut done = Committed::default();
    let fresh = tx
        .execute(
            &format!(
                "INSERT INTO {s}.applied_batches (run, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            ),
            &[&batch.id.0, &batch.id.1],
        )
        .await?;
    if fresh == 0 {
        tx.rollback().await?;
        done.already_applied = true;
        return Ok(done);
    }

    // Identities the database already holds mark duplicates.
    let with_id: Vec<_> = batch
        .messages
        .iter()
        .filter(|m| m.identity.is_some())
        .collect();
    let mut known: HashSet<u128> = HashSet::new();
    if !with_id.is_empty() {
        let devices: Vec<&str> = with_id
            .iter()
            .map(|m| m.device.as_deref().unwrap_or(""))
            .collect();
        let hashes: Vec<Vec<u8>> = with_id
            .iter()
            .map(|m| m.identity.unwrap_or(0).to_be_bytes().to_vec())
            .collect();
        let times: Vec<i64> = with_id.iter().map(|m| m.received).collect();
        let inserted = tx
            .query(
                &format!(
                    "INSERT INTO {s}.message_ids (device_id, hash, received_at) \
                     SELECT d, h, timestamptz 'epoch' + t * interval '1 microsecond' \
                     FROM unnest($1::text[], $2::bytea[], $3::int8[]) AS u(d, h, t) \
                     ON CONFLICT DO NOTHING RETURNING hash"
                ),
                &[&devices, &hashes, &times],
            )
            .await?;
        let new: HashSet<Vec<u8>> = inserted.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
        known = with_id
            .iter()
            .filter_map(|m| m.identity)
            .filter(|id| !new.contains(id.to_be_bytes().as_slice()))
            .collect();
        done.duplicates = known.len();
    }
    let is_new = |m: &super::batch::MessageEntry| m.identity.is_none_or(|id| !known.contains(&id));

    let readings_sql = format!("COPY {s}.readings ({READINGS_COLUMNS}) FROM STDIN (FORMAT binary)");
    let mut rejected = RowBuffer::new(0);
    if isolate {
        for m in batch
            .messages
            .iter()
            .filter(|m| m.row_count > 0 && is_new(m))
        {
            let (rows, n) = batch.readings_where(|x| std::ptr::eq(x, m));
            let sp = tx.savepoint("message").await?;
            match copy(&sp, &readings_sql, rows).await {
                Ok(_) => {
                    sp.commit().await?;
                    done.readings += n;
                }
                Err(e) if is_permanent(&e) => {
                    sp.rollback().await?;
                    let reason = "rejected_by_database";
                    ctx.metrics.dead_letter(reason);
                    super::batch::encode_dead_letter(
                        &mut rejected,
                        m.received,
                        &m.topic,
                        m.device.as_deref(),
                        &m.payload,
                        reason,
                        &describe(&e),
                    );
                    done.rejected += 1;
                }
                Err(e) => return Err(e),
            }
        }
    } else {
        let (rows, n) = if known.is_empty() {
            (batch.readings.clone(), batch.reading_rows)
        } else {
            batch.readings_where(is_new)
        };
        if n > 0 {
            copy(&tx, &readings_sql, rows).await?;
        }
        done.readings = n;
    }
    let dead_sql =
        format!("COPY {s}.dead_letters ({DEAD_LETTER_COLUMNS}) FROM STDIN (FORMAT binary)");
    if batch.dead_letter_rows > 0 {
        copy(&tx, &dead_sql, batch.dead_letters.clone()).await?;
    }
    if !rejected.is_empty() {
        copy(&tx, &dead_sql, rejected.finish()).await?;
    }
    if batch.alert_rows > 0 {
        let sql = format!("COPY {s}.alerts ({ALERT_COLUMNS}) FROM STDIN (FORMAT binary)");
        copy(&tx, &sql, batch.alerts.clone()).await?;
        if !ctx.notify_channel.is_empty() {
            let payloads: Vec<&str> = batch
                .notifications
                .iter()
                .map(|(_, json)| json.as_str())
                .collect();
            tx.execute(
                "SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n",
                &[&ctx.notify_channel, &payloads],
            )
            .await?;
        }
    }
    if batch.rollup_rows > 0 {
        // Stage, then merge: a minute split across batches (or restarts)
        // adds up instead of conflicting. The staging table lives as long
        // as the connection; PostgreSQL's notice that it already exists
        // would be a log line per batch, so notices are off for this
        // transaction.
        tx.batch_execute(
            "SET LOCAL client_min_messages = warning; \
             CREATE TEMP TABLE IF NOT EXISTS edge_rollup_stage \
             (bucket timestamptz, device_id text, metric text, count bigint, min float8, max float8, avg float8) \
             ON COMMIT DELETE ROWS",
        )
        .await?;
        copy(
            &tx,
            &format!("COPY edge_rollup_stage ({ROLLUP_COLUMNS}) FROM STDIN (FORMAT binary)"),
            batch.rollups.clone(),
        )
        .await?;
        tx.execute(
            &format!(
                "INSERT INTO {s}.rollups_1m AS r ({ROLLUP_COLUMNS}) SELECT {ROLLUP_COLUMNS} FROM edge_rollup_stage \
                 ON CONFLICT (device_id, metric, bucket) DO UPDATE SET \
                 count = r.count + EXCLUDED.count, min = least(r.min, EXCLUDED.min), max = greatest(r.max, EXCLUDED.max), \
                 avg = (r.avg * r.count + EXCLUDED.avg * EXCLUDED.count) / (r.count + EXCLUDED.count)"
            ),
            &[],
        )
        .await?;
    }
    if !batch.watermarks.is_empty() {
        let devices: Vec<&str> = batch.watermarks.iter().map(|(d, _)| d.as_ref()).collect();
        let highs: Vec<i64> = batch
            .watermarks
            .iter()
            .map(|(_, w)| w.high() as i64)
            .collect();
        let seen: Vec<Vec<u8>> = batch
            .watermarks
            .iter()
            .map(|(_, w)| w.window_bytes())
            .collect();
        tx.execute(
            &format!(
                "INSERT INTO {s}.device_watermarks AS w (device_id, seq, seen, updated_at) \
                 SELECT d, q, b, now() FROM unnest($1::text[], $2::int8[], $3::bytea[]) AS u(d, q, b) \
                 ON CONFLICT (device_id) DO UPDATE SET seq = EXCLUDED.seq, seen = EXCLUDED.seen, updated_at = now() \
                 WHERE w.seq <= EXCLUDED.seq"
            ),
            &[&devices, &highs, &seen],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(done)
}

/// One writer's connection, retry and spool state.
struct Writer {
    id: usize,
    ctx: Arc<WriterContext>,
    client: Option<Client>,
    spool: Spool,
    delay: Duration,
    retry_at: Option<Instant>,
    reported_spool: (u64, u64),
}

impl Writer {
    /// Writes a batch to the database, connecting when needed.
    async fn write(&mut self, batch: &SealedBatch) -> Result<(), WriteError> {
        let timeout = if self.ctx.shutdown.is_cancelled() {
            SHUTDOWN_WRITE_TIMEOUT
        } else {
            WRITE_TIMEOUT
        };
        let started = Instant::now();
        let ctx = self.ctx.clone();
        let id = self.id;
        let reuse = self.client.take().filter(|c| !c.is_closed());
        let result = tokio::time::timeout(timeout, async {
            let mut client = match reuse {
                Some(client) => client,
                None => connect(&ctx.db).await?,
            };
            let result = match commit(&mut client, &ctx, batch, false).await {
                Err(e) if is_permanent(&e) => {
                    tracing::warn!(writer = id, error = %describe(&e), "batch rejected; retrying message by message");
                    commit(&mut client, &ctx, batch, true).await
                }
                other => other,
            };
            Ok::<_, tokio_postgres::Error>((client, result))
        })
        .await
        .map(|r| match r {
            Ok((client, result)) => {
                self.client = Some(client);
                result
            }
            Err(e) => Err(e),
        });
        let done = match result {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                if is_missing_partition(&e) {
                    // A partition was dropped behind the cache.
                    ctx.partitions.forget(&batch.partitions);
                }
                // A demoted primary answers read-only: reconnect, and a
                // multi-host URL with target_session_attrs=read-write finds
                // the new primary.
                if e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) {
                    self.client = None;
                }
                if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                    self.client = None;
                    ctx.metrics.db_connected.store(false, Relaxed);
                }
                return Err(e.into());
            }
            Err(_) => {
                // The transaction's fate is unknown; drop the connection.
                // applied_batches makes a later retry of this batch safe.
                self.client = None;
                ctx.metrics.db_connected.store(false, Relaxed);
                return Err(WriteError::Timeout(timeout));
            }
        };
        let m = &ctx.metrics;
        m.db_connected.store(true, Relaxed);
        m.copy_latency
            .observe_micros(started.elapsed().as_micros() as u64);
        m.receive_to_commit_latency
            .observe_micros((now_micros() - batch.oldest_received).max(0) as u64);
        if !done.already_applied {
            let now = now_micros();
            for msg in batch.messages.iter().filter(|msg| msg.row_count > 0) {
                m.reading_to_commit_latency
                    .observe_micros((now - msg.newest).max(0) as u64);
            }
            if let Some(alerts) = &ctx.alerts {
                for n in &batch.notifications {
                    let _ = alerts.send(n.clone());
                }
            }
            m.batches_committed.fetch_add(1, Relaxed);
            m.readings_committed
                .fetch_add(done.readings as u64, Relaxed);
            m.messages_committed
                .fetch_add(batch.messages.len() as u64, Relaxed);
            m.duplicates.fetch_add(done.duplicates as u64, Relaxed);
        }
        Ok(())
    }

    fn failed(&mut self, what: &str, error: &WriteError) {
        self.ctx.metrics.batch_failures.fetch_add(1, Relaxed);
        tracing::warn!(writer = self.id, %error, retry_in_ms = self.delay.as_millis() as u64, "{what}");
        self.retry_at = Some(Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(MAX_RETRY);
    }

    fn recovered(&mut self) {
        self.delay = self.ctx.retry_min;
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
            self.ctx
                .metrics
                .spool_batches_replayed
                .fetch_add(1, Relaxed);
            self.report_spool();
        }
        Ok(())
    }

    /// Spools `batch`; on success its messages are durable.
    fn spool(&mut self, batch: &SealedBatch) -> Result<(), SpoolError> {
        self.spool.append(batch)?;
        self.ctx.metrics.spool_batches_written.fetch_add(1, Relaxed);
        self.report_spool();
        Ok(())
    }

    /// Spools `batch` and reports its messages durable; gives the batch
    /// back when the spool cannot take it (full, or failing), so the caller
    /// holds it and intake stops behind it.
    fn spool_or_hold(
        &mut self,
        batch: SealedBatch,
        done: &mpsc::UnboundedSender<Vec<u64>>,
    ) -> Option<SealedBatch> {
        match self.spool(&batch) {
            Ok(()) => {
                let _ = done.send(batch.message_ids());
                None
            }
            Err(e) => {
                if !matches!(e, SpoolError::Full { .. }) {
                    tracing::error!(writer = self.id, error = %e, "cannot spool; holding the batch");
                }
                Some(batch)
            }
        }
    }

    fn report_spool(&mut self) {
        let now = (self.spool.bytes(), self.spool.segments() as u64);
        let m = &self.ctx.metrics;
        m.spool_bytes
            .fetch_add(now.0.wrapping_sub(self.reported_spool.0), Relaxed);
        m.spool_segments
            .fetch_add(now.1.wrapping_sub(self.reported_spool.1), Relaxed);
        self.reported_spool = now;
    }
}

/// Runs one writer until its queue closes and is drained.
pub async fn run(
    id: usize,
    ctx: Arc<WriterContext>,
    mut queue: mpsc::Receiver<SealedBatch>,
    done: mpsc::UnboundedSender<Vec<u64>>,
    spool: Spool,
) {
    let mut w = Writer {
        id,
        delay: ctx.retry_min,
        ctx,
        client: None,
        spool,
        retry_at: None,
        reported_spool: (0, 0),
    };
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
            if w.spool.is_empty() && w.write(&batch).await.is_ok() {
                w.recovered();
                let _ = done.send(batch.message_ids());
                continue;
            }
            held = w.spool_or_hold(batch, &done);
            if held.is_some() {
                let wait = w.retry_at.unwrap_or_else(|| Instant::now() + w.delay);
                tokio::time::sleep_until(wait.into()).await;
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
                _ = tokio::time::sleep_until(wait.into()) => continue,
            }
        };
        let Some(batch) = next else { break };
        if w.spool.is_empty() {
            match w.write(&batch).await {
                Ok(()) => {
                    w.recovered();
                    let _ = done.send(batch.message_ids());
                    continue;
                }
                Err(e) => w.failed("batch failed; spooling it", &e),
            }
        }
        // Behind the spool, or just failed: keep order by spooling.
        held = w.spool_or_hold(batch, &done);
    }
    // Queue closed: shutting down. One last replay attempt; whatever stays
    // in the spool is replayed at the next start.
    if !w.spool.is_empty() {
        if let Err(e) = w.replay().await {
            tracing::warn!(writer = id, error = %e, pending = w.spool.pending(), "spool kept for the next start");
        }
    }
    tracing::debug!(writer = id, "writer finished");
}
