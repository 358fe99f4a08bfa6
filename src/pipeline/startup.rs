//! Start-up of the pipeline, before intake opens: the schema migrated
//! (waiting for the database), each writer's spool claimed and opened, the
//! shards' dedup state rebuilt from the database and the spools, and the
//! spools of former writers replayed.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::PipelineError;
use crate::alerts::AlertNotice;
use crate::config::Config;
use crate::model::MICROS_PER_SEC;
use crate::shard::dedup::Dedup;
use crate::shard::shard_of;
use crate::sink::connection::{self, Db};
use crate::sink::maintenance::{self, Housekeeping};
use crate::sink::partitions::Partitions;
use crate::sink::spool::{self, Spool};
use crate::sink::{restore, writer};
use crate::telemetry::Metrics;

/// Migrates the schema, retrying with backoff whatever the database
/// answers (unreachable, starting, a role not yet granted): `true` once
/// done, `false` when `shutdown` came first.
pub async fn migrate(
    db: &Db,
    h: &Housekeeping,
    partitions: &Partitions,
    shutdown: &CancellationToken,
) -> bool {
    let mut delay = Duration::from_millis(h.database.retry_min_ms);
    loop {
        match maintenance::migrate(db, h, partitions).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %connection::describe(&e), retry_in_ms = delay.as_millis() as u64, "database not ready; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

pub fn writer_context(
    config: &Config,
    pg: &connection::Db,
    partitions: &Arc<Partitions>,
    metrics: &Arc<Metrics>,
    shutdown: CancellationToken,
    alerts: Option<mpsc::UnboundedSender<AlertNotice>>,
) -> Arc<writer::WriterContext> {
    Arc::new(writer::WriterContext {
        db: pg.clone(),
        schema: config.database.schema.clone(),
        partitions: partitions.clone(),
        metrics: metrics.clone(),
        retry_min: Duration::from_millis(config.database.retry_min_ms),
        shutdown,
        notify_channel: config.analytics.notify_channel.clone(),
        alerts,
    })
}

fn spool_dir(config: &Config, writer: usize) -> std::path::PathBuf {
    std::path::Path::new(&config.spool.dir).join(format!("writer-{writer}"))
}

/// Claims a spool directory for the database `owner`, reporting a spool
/// of another database that was set aside.
fn claim_spool(dir: &std::path::Path, owner: &str, metrics: &Metrics) -> Result<(), PipelineError> {
    match spool::claim(dir, owner)? {
        spool::Claim::Foreign {
            owner: other,
            moved_to,
        } => {
            metrics.spool_foreign.fetch_add(1, Relaxed);
            tracing::error!(
                spool = %dir.display(), moved_to = %moved_to.display(), belongs_to = %other, database = %owner,
                "spool of another database set aside, not replayed; replay it against its own database"
            );
        }
        spool::Claim::Legacy => {
            tracing::warn!(spool = %dir.display(), database = %owner, "spool from before spools recorded their database; replaying it into this one");
        }
        spool::Claim::Fresh | spool::Claim::Same => {}
    }
    Ok(())
}

/// Opens each writer's spool, reporting what recovery found.
pub fn open_spools(
    config: &Config,
    writers: usize,
    owner: &str,
    metrics: &Metrics,
) -> Result<Vec<Spool>, PipelineError> {
    let per_writer = config.spool.max_bytes / writers as u64;
    (0..writers)
        .map(|w| {
            let dir = spool_dir(config, w);
            claim_spool(&dir, owner, metrics)?;
            let (spool, recovery) = Spool::open(&dir, per_writer, config.spool.segment_bytes.min(per_writer))?;
            for file in &recovery.corrupt {
                metrics.spool_corrupt_files.fetch_add(1, Relaxed);
                tracing::error!(%file, "torn or corrupt spool data set aside; it is not replayed (its messages were never acknowledged)");
            }
            if recovery.records > 0 {
                tracing::info!(writer = w, batches = recovery.records, "spool holds batches from before; replaying first");
            }
            Ok(spool)
        })
        .collect()
}

/// Replays spools of writers that no longer exist (the writer count was
/// lowered), before anything new is written.
pub async fn drain_former_writers_spools(
    config: &Config,
    writers: usize,
    owner: &str,
    pg: &connection::Db,
    partitions: &Arc<Partitions>,
    metrics: &Arc<Metrics>,
) -> Result<(), PipelineError> {
    let mut w = writers;
    while spool_dir(config, w).is_dir() {
        claim_spool(&spool_dir(config, w), owner, metrics)?;
        let (spool, _) = Spool::open(&spool_dir(config, w), u64::MAX, config.spool.segment_bytes)?;
        if !spool.is_empty() {
            tracing::info!(
                writer = w,
                batches = spool.pending(),
                "replaying the spool of a former writer"
            );
            let ctx = writer_context(
                config,
                pg,
                partitions,
                metrics,
                CancellationToken::new(),
                None,
            );
            let (tx, rx) = mpsc::channel(1);
            drop(tx);
            let (done, _) = mpsc::unbounded_channel();
            let health = Arc::new(writer::WriterHealth::default());
            let stall = Duration::from_secs(config.pipeline.stall_secs);
            if let Err(e) = writer::run(w, ctx, rx, done, spool, health, stall).await {
                return Err(PipelineError::StageFailed(e.to_string()));
            }
        }
        w += 1;
    }
    Ok(())
}

/// Loads each shard's dedup state: sequence windows and recent identities
/// from the database, then what waits in the spools (newer still).
pub async fn load_dedup(
    config: &Config,
    pg: &connection::Db,
    shards: usize,
    spools: &[Spool],
) -> Result<Vec<Dedup>, PipelineError> {
    let horizon = config.dedup.horizon_secs as i64 * MICROS_PER_SEC;
    let max_devices = config.limits.max_dedup_devices.div_ceil(shards);
    let mut dedups: Vec<Dedup> = (0..shards)
        .map(|_| Dedup::with_max_devices(config.dedup.max_identities, horizon, max_devices))
        .collect();
    let s = &config.database.schema;
    let client = connection::connect(pg).await?;
    let devices = restore::windows(&client, s, |device, window, touched| {
        dedups[shard_of(&device, shards)].restore_window(device, window, touched);
    })
    .await?;
    let identities = restore::identities(&client, s, horizon, |device, id, received| {
        dedups[shard_of(device, shards)].restore_identity(id, received);
    })
    .await?;
    for spool in spools {
        for batch in spool.pending_batches()? {
            for (device, window) in batch.watermarks {
                let shard = shard_of(&device, shards);
                dedups[shard].restore_window(device, window, batch.oldest_received);
            }
            for m in &batch.messages {
                if let (Some(id), Some(device)) = (m.identity, &m.device) {
                    dedups[shard_of(device, shards)].restore_identity(id, m.received);
                }
            }
        }
    }
    tracing::info!(devices, identities, "dedup state loaded");
    Ok(dedups)
}
