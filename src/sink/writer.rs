//! COPY writers: K tasks, each with its own connection, taking sealed
//! batches from one bounded queue. A batch is one transaction: partitions
//! ensured, readings and dead letters COPYed, committed; then its message
//! ids go to the ack ledger. A failed batch is retried with backoff on a
//! fresh connection until it commits, so a database outage stalls intake
//! (through the bounded queues and rings) instead of losing data.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::{Client, NoTls, Transaction};

use super::batch::{SealedBatch, DEAD_LETTER_COLUMNS, READINGS_COLUMNS};
use super::partitions::Partitions;
use crate::model::now_micros;
use crate::telemetry::Metrics;

/// Longest pause between retries of a failing batch.
const MAX_RETRY: Duration = Duration::from_secs(10);

/// What every writer shares.
#[derive(Debug)]
pub struct WriterContext {
    pub pg: tokio_postgres::Config,
    pub schema: String,
    pub partitions: Arc<Partitions>,
    pub metrics: Arc<Metrics>,
    pub retry_min: Duration,
}

/// Opens a connection and drives it in a background task.
///
/// # Errors
/// When the database cannot be reached or refuses the login.
pub async fn connect(pg: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}

async fn copy(tx: &Transaction<'_>, sql: &str, data: Bytes) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in(sql).await?;
    futures_util::pin_mut!(sink);
    sink.send(data).await?;
    sink.finish().await
}

async fn write(
    client: &mut Client,
    ctx: &WriterContext,
    batch: &SealedBatch,
) -> Result<(), tokio_postgres::Error> {
    let created = ctx.partitions.ensure(client, &batch.partitions).await?;
    ctx.metrics
        .partitions_created
        .fetch_add(created as u64, Relaxed);
    let tx = client.transaction().await?;
    if batch.reading_rows > 0 {
        let sql = format!(
            "COPY {}.readings ({READINGS_COLUMNS}) FROM STDIN (FORMAT binary)",
            ctx.schema
        );
        copy(&tx, &sql, batch.readings.clone()).await?;
    }
    if batch.dead_letter_rows > 0 {
        let sql = format!(
            "COPY {}.dead_letters ({DEAD_LETTER_COLUMNS}) FROM STDIN (FORMAT binary)",
            ctx.schema
        );
        copy(&tx, &sql, batch.dead_letters.clone()).await?;
    }
    tx.commit().await
}

/// Runs one writer until the queue closes and is drained.
pub async fn run(
    id: usize,
    ctx: Arc<WriterContext>,
    queue: Arc<Mutex<mpsc::Receiver<SealedBatch>>>,
    done: mpsc::UnboundedSender<Vec<u64>>,
) {
    let mut client: Option<Client> = None;
    loop {
        let batch = {
            let mut rx = queue.lock().await;
            rx.recv().await
        };
        let Some(batch) = batch else { break };
        let mut delay = ctx.retry_min;
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            let result = match client.as_mut().filter(|c| !c.is_closed()) {
                Some(c) => write(c, &ctx, &batch).await,
                None => match connect(&ctx.pg).await {
                    Ok(c) => {
                        let c = client.insert(c);
                        write(c, &ctx, &batch).await
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(()) => {
                    let m = &ctx.metrics;
                    m.db_connected.store(true, Relaxed);
                    m.copy_latency
                        .observe_micros(started.elapsed().as_micros() as u64);
                    m.receive_to_commit_latency
                        .observe_micros((now_micros() - batch.oldest_received).max(0) as u64);
                    m.batches_committed.fetch_add(1, Relaxed);
                    m.readings_committed
                        .fetch_add(batch.reading_rows as u64, Relaxed);
                    m.messages_committed
                        .fetch_add(batch.messages.len() as u64, Relaxed);
                    if failures > 0 {
                        tracing::info!(writer = id, failures, "batch committed after retries");
                    }
                    break;
                }
                Err(e) => {
                    failures += 1;
                    ctx.metrics.batch_failures.fetch_add(1, Relaxed);
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        ctx.metrics.db_connected.store(false, Relaxed);
                    }
                    if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) {
                        // "no partition of relation found for row": a partition
                        // was dropped behind our cache; forget the cache.
                        ctx.partitions.forget(&batch.partitions);
                    }
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(writer = id, failures, error = %e, retry_in_ms = delay.as_millis() as u64, "batch failed, retrying");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY);
                    if client.as_ref().is_some_and(|c| c.is_closed()) {
                        client = None;
                    }
                }
            }
        }
        if done.send(batch.messages).is_err() {
            break;
        }
    }
    tracing::debug!(writer = id, "writer finished");
}
