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
//! Errors are told apart by SQLSTATE ([`is_transient`]): the connection or
//! the server's availability is retried and spooled; anything else is the
//! data's fault, and the batch is committed again with every part under a
//! savepoint ([`commit`] with `isolate`): refused messages become dead
//! letters with the database's error, refused alert, rollup and window rows
//! are left out and counted, the rest commits. A spooled batch replays the
//! same way, so no input can stop a writer.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Transaction};
use tokio_util::sync::CancellationToken;

use super::batch::{
    encode_dead_letter, MessageEntry, SealedBatch, ALERT_COLUMNS, DEAD_LETTER_COLUMNS,
    READINGS_COLUMNS, ROLLUP_COLUMNS,
};
use super::copy::{select_rows, split_rows, RowBuffer};
use super::partitions::Partitions;
use super::spool::{Spool, SpoolError};
use crate::model::{now_micros, Reason};
use crate::shard::dedup::SeqWindow;
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

/// True for failures of the connection or of the server's availability,
/// which retrying the same rows later can fix: no SQLSTATE at all (I/O, a
/// closed connection), connection exceptions (08), insufficient resources
/// (53), operator intervention (57P: shutdown, crash recovery), a cancelled
/// statement (57014: `statement_timeout`), serialization failures and
/// deadlocks (40001, 40P01), a lock timeout (55P03), system errors (58), a
/// read-only transaction (25006: a demoted primary) and a missing partition.
/// Everything else is the data's fault: retrying it would fail forever.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else { return true };
    let code = code.code();
    let class = &code[..2.min(code.len())];
    matches!(class, "08" | "53" | "58")
        || code.starts_with("57P")
        || matches!(code, "57014" | "40001" | "40P01" | "55P03" | "25006")
        || is_missing_partition(e)
}

/// True for errors the data causes (see [`is_transient`]).
fn is_permanent(e: &tokio_postgres::Error) -> bool {
    !is_transient(e)
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
    /// Alert, rollup and watermark rows the database rejected (with
    /// isolation only; their messages' readings are stored).
    pub rows_rejected: usize,
    /// The batch had been committed before (a replay or a lost answer).
    pub already_applied: bool,
}

/// Records the identities of `messages` in `message_ids`; returns those
/// that make their message a duplicate (already there, and not a pack whose
/// bytes may repeat).
async fn record_identities(
    tx: &Transaction<'_>,
    s: &str,
    messages: &[&MessageEntry],
) -> Result<HashSet<u128>, tokio_postgres::Error> {
    let with_id: Vec<_> = messages
        .iter()
        .copied()
        .filter(|m| m.identity.is_some())
        .collect();
    if with_id.is_empty() {
        return Ok(HashSet::new());
    }
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
    Ok(with_id
        .iter()
        .filter(|m| !m.repeat_ok)
        .filter_map(|m| m.identity)
        .filter(|id| !new.contains(id.to_be_bytes().as_slice()))
        .collect())
}

/// COPYs alert rows and sends their NOTIFY payloads (`notices`, one per row).
async fn write_alerts(
    tx: &Transaction<'_>,
    ctx: &WriterContext,
    rows: Bytes,
    notices: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let s = &ctx.schema;
    let sql = format!("COPY {s}.alerts ({ALERT_COLUMNS}) FROM STDIN (FORMAT binary)");
    copy(tx, &sql, rows).await?;
    if !ctx.notify_channel.is_empty() && !notices.is_empty() {
        tx.execute(
            "SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n",
            &[&ctx.notify_channel, &notices],
        )
        .await?;
    }
    Ok(())
}

/// Stages rollup rows, then merges them: a minute split across batches (or
/// restarts) adds up instead of conflicting. The staging table lives as
/// long as the connection; PostgreSQL's notice that it already exists would
/// be a log line per batch, so notices are off for this transaction.
async fn merge_rollups(
    tx: &Transaction<'_>,
    s: &str,
    rows: Bytes,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning; \
         CREATE TEMP TABLE IF NOT EXISTS edge_rollup_stage \
         (bucket timestamptz, device_id text, metric text, count bigint, min float8, max float8, avg float8) \
         ON COMMIT DELETE ROWS; \
         TRUNCATE edge_rollup_stage",
    )
    .await?;
    copy(
        tx,
        &format!("COPY edge_rollup_stage ({ROLLUP_COLUMNS}) FROM STDIN (FORMAT binary)"),
        rows,
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
    Ok(())
}

/// Stores the sequence windows of a batch's devices. A window replaces the
/// stored one when it is of a later epoch (a restart), or of the same epoch
/// and not behind it. (No function call in `DO UPDATE SET`: Citus allows
/// only immutable ones there.)
async fn upsert_watermarks(
    tx: &Transaction<'_>,
    s: &str,
    watermarks: &[(Arc<str>, SeqWindow)],
) -> Result<(), tokio_postgres::Error> {
    let devices: Vec<&str> = watermarks.iter().map(|(d, _)| d.as_ref()).collect();
    let highs: Vec<i64> = watermarks.iter().map(|(_, w)| w.high() as i64).collect();
    let seen: Vec<Vec<u8>> = watermarks.iter().map(|(_, w)| w.window_bytes()).collect();
    let boots: Vec<Option<i64>> = watermarks
        .iter()
        .map(|(_, w)| w.boot().map(|b| b as i64))
        .collect();
    let epochs: Vec<i64> = watermarks
        .iter()
        .map(|(_, w)| i64::from(w.epoch()))
        .collect();
    let newest: Vec<i64> = watermarks.iter().map(|(_, w)| w.newest()).collect();
    tx.execute(
        &format!(
            "INSERT INTO {s}.device_watermarks AS w (device_id, seq, seen, boot, epoch, newest, updated_at) \
             SELECT d, q, b, o, e, n, timestamptz 'epoch' + $7::int8 * interval '1 microsecond' \
             FROM unnest($1::text[], $2::int8[], $3::bytea[], $4::int8[], $5::int8[], $6::int8[]) AS u(d, q, b, o, e, n) \
             ON CONFLICT (device_id) DO UPDATE SET seq = EXCLUDED.seq, seen = EXCLUDED.seen, \
             boot = EXCLUDED.boot, epoch = EXCLUDED.epoch, newest = EXCLUDED.newest, updated_at = EXCLUDED.updated_at \
             WHERE (w.epoch, w.seq) <= (EXCLUDED.epoch, EXCLUDED.seq)"
        ),
        &[&devices, &highs, &seen, &boots, &epochs, &newest, &now_micros()],
    )
    .await?;
    Ok(())
}

/// Runs `$body` (an awaited `Result` using the savepoint `$sp`) under a
/// savepoint: `Ok` with its value when it committed, `Err` with the
/// database's error (rolled back) when the database refused its data;
/// connection and availability errors end the batch.
macro_rules! isolated {
    ($tx:expr, $sp:ident => $body:expr) => {{
        let $sp = $tx.savepoint("part").await?;
        match $body {
            Ok(value) => {
                $sp.commit().await?;
                Ok(value)
            }
            Err(e) if is_permanent(&e) => {
                $sp.rollback().await?;
                Err(e)
            }
            Err(e) => return Err(e),
        }
    }};
}

/// Derived rows (`$n` of them, for `$table`): `$body` writes the rows in
/// the range `$range` under savepoint `$sp`; all at once first, then one by
/// one when refused. Refused rows are counted in `$done` and logged.
macro_rules! whole_then_each {
    ($tx:expr, $ctx:expr, $done:expr, $table:expr, $n:expr, $range:ident, $sp:ident => $body:expr) => {{
        let n = $n;
        let all_ok = n == 0 || {
            let $range = 0..n;
            isolated!($tx, $sp => $body).is_ok()
        };
        if !all_ok {
            for i in 0..n {
                let $range = i..i + 1;
                if let Err(e) = isolated!($tx, $sp => $body) {
                    $done.rows_rejected += 1;
                    rejected_row($ctx, $table, &e);
                }
            }
        }
    }};
}

/// Commits one batch in one transaction.
///
/// With `isolate`, every part is tried under a savepoint, so whatever the
/// database rejects for its data is left out and the rest commits: the
/// messages' identities and readings together, bisected until each refused
/// message stands alone (it becomes a dead letter with the database's
/// error), then alerts with their NOTIFY,
/// rollups and sequence windows, each as a whole and, when refused, row by
/// row (a refused row is counted and logged). Dead letters are built so
/// that no input can make them fail (bounded text, no index).
///
/// # Errors
/// Database errors; with `isolate`, only those [`is_transient`] accepts
/// and failures of the statements that carry no device data.
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
    let readings_sql = format!("COPY {s}.readings ({READINGS_COLUMNS}) FROM STDIN (FORMAT binary)");
    let dead_sql =
        format!("COPY {s}.dead_letters ({DEAD_LETTER_COLUMNS}) FROM STDIN (FORMAT binary)");
    let notices: Vec<&str> = batch
        .notifications
        .iter()
        .map(|(_, json)| json.as_str())
        .collect();
    if !isolate {
        let all: Vec<&MessageEntry> = batch.messages.iter().collect();
        let known = record_identities(&tx, s, &all).await?;
        done.duplicates = known.len();
        let is_new = |m: &MessageEntry| m.identity.is_none_or(|id| !known.contains(&id));
        let (rows, n) = if known.is_empty() {
            (batch.readings.clone(), batch.reading_rows)
        } else {
            batch.readings_where(is_new)
        };
        if n > 0 {
            copy(&tx, &readings_sql, rows).await?;
        }
        done.readings = n;
        if batch.dead_letter_rows > 0 {
            copy(&tx, &dead_sql, batch.dead_letters.clone()).await?;
        }
        if batch.alert_rows > 0 {
            write_alerts(&tx, ctx, batch.alerts.clone(), &notices).await?;
        }
        if batch.rollup_rows > 0 {
            merge_rollups(&tx, s, batch.rollups.clone()).await?;
        }
        if !batch.watermarks.is_empty() {
            upsert_watermarks(&tx, s, &batch.watermarks).await?;
        }
        tx.commit().await?;
        return Ok(done);
    }

    // Isolation: bisect the messages. A set that the database takes
    // commits (its identities and readings together); a refused set is
    // split in halves until each refused message stands alone and becomes
    // a dead letter. One poisoned message in M costs about 2 log2(M)
    // savepoints and twice the COPY, not M round trips.
    let mut dead = RowBuffer::new(0);
    let messages: Vec<&MessageEntry> = batch
        .messages
        .iter()
        .filter(|m| m.row_count > 0 || m.identity.is_some())
        .collect();
    // Ranges of `messages` still to try (a stack: one range to start).
    let mut todo: Vec<std::ops::Range<usize>> = Vec::with_capacity(16);
    todo.push(0..messages.len());
    while let Some(range) = todo.pop() {
        if range.is_empty() {
            continue;
        }
        let part = &messages[range.clone()];
        let attempt = isolated!(tx, sp => async {
            let known = record_identities(&sp, s, part).await?;
            let ids: HashSet<u64> = part.iter().map(|m| m.id).collect();
            let (rows, n) = batch.readings_where(|x| {
                ids.contains(&x.id) && x.identity.is_none_or(|id| !known.contains(&id))
            });
            if n > 0 {
                copy(&sp, &readings_sql, rows).await?;
            }
            Ok::<_, tokio_postgres::Error>((known.len(), n))
        }
        .await);
        match (attempt, part) {
            (Ok((duplicates, stored)), _) => {
                done.duplicates += duplicates;
                done.readings += stored;
            }
            (Err(_), [_, _, ..]) => {
                let mid = range.start + part.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
            (Err(e), [m]) => {
                ctx.metrics.dead_letter(Reason::RejectedByDatabase);
                encode_dead_letter(
                    &mut dead,
                    m.received,
                    &m.topic,
                    m.device.as_deref(),
                    &m.payload,
                    Reason::RejectedByDatabase,
                    &describe(&e),
                );
                done.rejected += 1;
            }
            (Err(_), []) => {}
        }
    }
    if batch.dead_letter_rows > 0 {
        copy(&tx, &dead_sql, batch.dead_letters.clone()).await?;
    }
    if !dead.is_empty() {
        copy(&tx, &dead_sql, dead.finish()).await?;
    }
    // Derived rows: as a whole, else row by row.
    let alerts = split_rows(&batch.alerts).unwrap_or_default();
    whole_then_each!(tx, ctx, done, "alerts", alerts.len(), r, sp => {
        let rows = select_rows(&batch.alerts, &alerts[r.clone()]);
        write_alerts(&sp, ctx, rows, notices.get(r).unwrap_or_default()).await
    });
    let rollups = split_rows(&batch.rollups).unwrap_or_default();
    whole_then_each!(tx, ctx, done, "rollups_1m", rollups.len(), r, sp => {
        merge_rollups(&sp, s, select_rows(&batch.rollups, &rollups[r])).await
    });
    whole_then_each!(tx, ctx, done, "device_watermarks", batch.watermarks.len(), r, sp => {
        upsert_watermarks(&sp, s, &batch.watermarks[r]).await
    });
    tx.commit().await?;
    Ok(done)
}

/// Counts and logs a derived row the database refused.
fn rejected_row(ctx: &WriterContext, table: &'static str, e: &tokio_postgres::Error) {
    ctx.metrics.rows_rejected.fetch_add(1, Relaxed);
    tracing::warn!(table, error = %describe(e), "row rejected by the database; left out");
}

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

/// One writer's connection, retry and spool state.
struct Writer {
    id: usize,
    ctx: Arc<WriterContext>,
    client: Option<Client>,
    spool: Spool,
    delay: Duration,
    retry_at: Option<Instant>,
    reported_spool: (u64, u64),
    health: Arc<WriterHealth>,
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

    /// After a batch was appended to the spool: its messages are durable.
    fn spooled(&mut self) {
        self.ctx.metrics.spool_batches_written.fetch_add(1, Relaxed);
        self.health.progressed();
        self.report_spool();
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
///
/// # Errors
/// [`WriterFailed`] when a batch could be neither committed nor spooled
/// (the database unreachable and the spool failing, not merely full) for
/// `stall`: the batch stays unacknowledged, and the gateway stops so that
/// its supervisor restarts it.
pub async fn run(
    id: usize,
    ctx: Arc<WriterContext>,
    mut queue: mpsc::Receiver<SealedBatch>,
    done: mpsc::UnboundedSender<Vec<u64>>,
    spool: Spool,
    health: Arc<WriterHealth>,
    stall: Duration,
) -> Result<(), WriterFailed> {
    let mut w = Writer {
        id,
        delay: ctx.retry_min,
        ctx,
        client: None,
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
