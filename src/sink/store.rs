//! The database as a writer sees it: [`Store`] takes one batch and commits
//! it or says why not. [`Postgres`] is the real one: it keeps a connection,
//! bounds each commit by a timeout, commits again with isolation when the
//! database refuses the batch's data, and counts what was committed. The
//! writer's retry/spool/hold loop is written against the trait, so it is
//! tested with a scripted store and paused time.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::batch::SealedBatch;
use super::commit::{commit, WriterContext};
use super::connection::{connect, describe, is_missing_partition, is_permanent};
use super::spool::SpoolError;
use crate::model::now_micros;

/// How long one batch may take before it is treated as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// The same once shutdown has begun: what cannot commit quickly is spooled.
const SHUTDOWN_WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("database: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A stand-in store's failure (tests).
    #[error("{0}")]
    Unavailable(String),
}

/// Where a writer commits batches.
pub trait Store: Send {
    /// Commits `batch`; a batch committed before counts as committed.
    ///
    /// # Errors
    /// [`WriteError`] when the batch is not committed; the writer retries it
    /// or spools it.
    fn write(&mut self, batch: &SealedBatch)
        -> impl Future<Output = Result<(), WriteError>> + Send;
}

/// PostgreSQL, through one connection that is reopened when lost.
pub struct Postgres {
    id: usize,
    ctx: Arc<WriterContext>,
    client: Option<Client>,
}

impl Postgres {
    pub fn new(id: usize, ctx: Arc<WriterContext>) -> Postgres {
        Postgres {
            id,
            ctx,
            client: None,
        }
    }

    /// Writes a batch to the database, connecting when needed.
    async fn commit_batch(&mut self, batch: &SealedBatch) -> Result<(), WriteError> {
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
            for n in &batch.notifications {
                m.recent_alert(&n.json);
                if let Some(alerts) = &ctx.alerts {
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
}

impl Store for Postgres {
    fn write(
        &mut self,
        batch: &SealedBatch,
    ) -> impl Future<Output = Result<(), WriteError>> + Send {
        self.commit_batch(batch)
    }
}
