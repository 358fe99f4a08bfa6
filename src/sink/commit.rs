//! Committing one batch: one transaction that records the batch id, the
//! message identities, readings and dead letters (COPY), alerts with their
//! NOTIFY, rollups and sequence windows. With isolation, every part goes
//! under a savepoint so that what the database refuses for its data is left
//! out (refused messages become dead letters) and the rest commits.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};
use tokio_util::sync::CancellationToken;

use super::batch::{
    encode_dead_letter, MessageEntry, SealedBatch, ALERT_COLUMNS, DEAD_LETTER_COLUMNS,
    READINGS_COLUMNS, ROLLUP_COLUMNS,
};
use super::connection::{describe, is_permanent, Db};
use super::copy::{select_rows, split_rows, RowBuffer};
use super::partitions::Partitions;
use super::restore;
use crate::alerts::AlertNotice;
use crate::model::seq_window::{Admission, SeqWindow};
use crate::model::{now_micros, DeadLetterReason};
use crate::telemetry::Metrics;

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
    pub alerts: Option<mpsc::UnboundedSender<AlertNotice>>,
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
///
/// Nearly always every identity is new (the shard workers drop the repeats
/// they know of, and they restore what was committed before a restart), so
/// the identities are first COPYed under a savepoint: half the database's
/// CPU of `INSERT ... ON CONFLICT DO NOTHING RETURNING` (4.6 against 9 µs a
/// row, measured). Only when one is already stored (a redelivery the
/// workers could not know of) does the COPY fail on the key, roll back to
/// the savepoint, and the insert tell which.
async fn record_identities(
    tx: &mut Transaction<'_>,
    s: &str,
    messages: &[&MessageEntry],
) -> Result<HashSet<u128>, tokio_postgres::Error> {
    // Each key once: a pack whose bytes may repeat can come twice in a batch.
    let mut keys = HashSet::new();
    let with_id: Vec<(&str, u128, i64)> = messages
        .iter()
        .filter_map(|m| Some((m.device.as_deref().unwrap_or(""), m.identity?, m.received)))
        .filter(|&(device, id, _)| keys.insert((device, id)))
        .collect();
    if with_id.is_empty() {
        return Ok(HashSet::new());
    }
    let mut rows = RowBuffer::new(with_id.len() * 64);
    for &(device, id, received) in &with_id {
        rows.row(3)
            .text(device)
            .bytea(&id.to_be_bytes())
            .timestamptz(received);
    }
    let sp = tx.savepoint("identities").await?;
    match copy(
        &sp,
        &format!("COPY {s}.message_ids (device_id, hash, received_at) FROM STDIN (FORMAT binary)"),
        rows.finish(),
    )
    .await
    {
        Ok(_) => {
            sp.commit().await?;
            return Ok(HashSet::new());
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => sp.rollback().await?,
        Err(e) => return Err(e),
    }
    let devices: Vec<&str> = with_id.iter().map(|&(device, _, _)| device).collect();
    let hashes: Vec<Vec<u8>> = with_id
        .iter()
        .map(|&(_, id, _)| id.to_be_bytes().to_vec())
        .collect();
    let times: Vec<i64> = with_id.iter().map(|&(_, _, received)| received).collect();
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
    Ok(messages
        .iter()
        .filter(|m| !m.repeat_ok)
        .filter_map(|m| m.identity)
        .filter(|id| !new.contains(id.to_be_bytes().as_slice()))
        .collect())
}

/// The ids of `messages` marked for verification whose stored sequence
/// window (`device_watermarks`, read in this transaction) already holds
/// them: redeliveries of devices whose window the worker had evicted.
/// Checked in batch order, each admitted one moving its device's window,
/// so repeats within the batch are caught too. Rare, and one query.
async fn stored_repeats(
    tx: &Transaction<'_>,
    s: &str,
    messages: &[&MessageEntry],
) -> Result<HashSet<u64>, tokio_postgres::Error> {
    let to_check: Vec<(&MessageEntry, &str, u64, Option<u64>)> = messages
        .iter()
        .filter_map(|m| {
            let (seq, boot) = m.verify?;
            Some((*m, m.device.as_deref()?, seq, boot))
        })
        .collect();
    if to_check.is_empty() {
        return Ok(HashSet::new());
    }
    let devices: Vec<&str> = to_check.iter().map(|(_, d, _, _)| *d).collect();
    let mut windows = restore::windows_of(tx, s, &devices).await?;
    let mut repeats = HashSet::new();
    for (m, device, seq, boot) in to_check {
        let Some(window) = windows.get_mut(device) else {
            continue;
        };
        if window.admit(seq, boot, m.newest) == Admission::Repeat {
            repeats.insert(m.id);
        }
    }
    Ok(repeats)
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
        #[allow(unused_mut)] // mutable where the body opens a savepoint in it
        let mut $sp = $tx.savepoint("part").await?;
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
/// Database errors; with `isolate`, only those [`is_transient`](super::connection::is_transient) accepts
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
            &[&batch.id.run, &batch.id.seq],
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
        .map(|n| n.json.as_str())
        .collect();
    if !isolate {
        let all: Vec<&MessageEntry> = batch.messages.iter().collect();
        let known = record_identities(&mut tx, s, &all).await?;
        let repeats = stored_repeats(&tx, s, &all).await?;
        done.duplicates = known.len() + repeats.len();
        let is_new = |m: &MessageEntry| {
            m.identity.is_none_or(|id| !known.contains(&id)) && !repeats.contains(&m.id)
        };
        let (rows, n) = if known.is_empty() && repeats.is_empty() {
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
            let known = record_identities(&mut sp, s, part).await?;
            let repeats = stored_repeats(&sp, s, part).await?;
            let ids: HashSet<u64> = part.iter().map(|m| m.id).collect();
            let (rows, n) = batch.readings_where(|x| {
                ids.contains(&x.id)
                    && x.identity.is_none_or(|id| !known.contains(&id))
                    && !repeats.contains(&x.id)
            });
            if n > 0 {
                copy(&sp, &readings_sql, rows).await?;
            }
            Ok::<_, tokio_postgres::Error>((known.len() + repeats.len(), n))
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
                ctx.metrics
                    .dead_letter(DeadLetterReason::RejectedByDatabase);
                encode_dead_letter(
                    &mut dead,
                    m.received,
                    &m.topic,
                    m.device.as_deref(),
                    &m.payload,
                    DeadLetterReason::RejectedByDatabase,
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
