//! The pipeline: wires source -> shard router -> workers -> writers -> ack
//! ledger, runs until `shutdown`, then stops in order: intake first, rings
//! drained, batches flushed and committed, acks released, connections closed,
//! all under `pipeline.shutdown_timeout_secs`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertNotice;
use crate::config::Config;
use crate::model::seq_window::SeqWindow;
use crate::model::{now_micros, MICROS_PER_DAY, MICROS_PER_SEC};
use crate::shard::dedup::Dedup;
use crate::shard::worker::{BatchIds, Worker, WorkerConfig};
use crate::shard::{shard_of, Router};
use crate::sink::partitions::Partitions;
use crate::sink::spool::{self, Spool, SpoolError};
use crate::sink::{connection, schema, writer};
use crate::source;
use crate::telemetry::{http, Metrics};

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Setting(#[from] crate::settings::Invalid),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mqtt(#[from] source::mqtt::MqttError),
    #[error("database: {}", connection::describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("spool.dir: {0}")]
    Spool(#[from] SpoolError),
    #[error("stage failed: {0}")]
    StageFailed(String),
}

/// A supervised stage.
#[derive(Debug, Clone, Copy)]
enum Stage {
    Intake,
    Worker(usize),
    Writer(usize),
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Intake => f.write_str("intake"),
            Stage::Worker(i) => write!(f, "shard worker {i}"),
            Stage::Writer(i) => write!(f, "writer {i}"),
        }
    }
}

type Ended = Result<(Stage, Result<(), String>), tokio::task::JoinError>;

/// What ended, and why, for the log and the exit status.
fn describe_end(ended: Ended) -> String {
    match ended {
        Ok((stage, Ok(()))) => format!("{stage} ended"),
        Ok((stage, Err(e))) => format!("{stage}: {e}"),
        Err(e) => format!("a stage panicked or was cancelled: {e}"),
    }
}

/// Creates the schema and the partitions around now, and drops partitions
/// past retention.
///
/// # Errors
/// Any database error.
pub async fn migrate(config: &Config, partitions: &Partitions) -> Result<(), PipelineError> {
    let mut client = connection::connect(&connection::Db::new(&config.database)?).await?;
    schema::create(&mut client, &config.database.schema).await?;
    let distributed = schema::distribute(
        &client,
        &config.database.schema,
        config.database.citus_shard_count,
    )
    .await?;
    if !distributed.is_empty() {
        tracing::info!(tables = ?distributed, "Citus: distributed by device_id, co-located");
    }
    if !config.database.publication.is_empty() {
        schema::create_publication(
            &client,
            &config.database.schema,
            &config.database.publication,
        )
        .await?;
    }
    maintain(&mut client, config, partitions).await?;
    Ok(())
}

async fn maintain(
    client: &mut tokio_postgres::Client,
    config: &Config,
    partitions: &Partitions,
) -> Result<(), tokio_postgres::Error> {
    let now = now_micros();
    let created = partitions
        .create_ahead(client, now, config.database.partitions_ahead)
        .await?;
    let cutoff = now - i64::from(config.database.retention_days) * MICROS_PER_DAY;
    let dropped = partitions.drop_before(client, cutoff).await?;
    let horizon = format!("{} seconds", config.dedup.horizon_secs);
    let s = &config.database.schema;
    client
        .execute(
            &format!("DELETE FROM {s}.message_ids WHERE received_at < now() - $1::text::interval"),
            &[&horizon],
        )
        .await?;
    client
        .execute(
            &format!(
                "DELETE FROM {s}.applied_batches WHERE applied_at < now() - $1::text::interval"
            ),
            &[&horizon],
        )
        .await?;
    // Sequence windows of devices silent past the horizon: the workers
    // evict them from memory after the same time.
    let pruned = client
        .execute(
            &format!(
                "DELETE FROM {s}.device_watermarks WHERE updated_at < now() - $1::text::interval"
            ),
            &[&horizon],
        )
        .await?;
    let r = &config.retention;
    let mut expired = 0;
    for (table, column, days) in [
        ("dead_letters", "received_at", r.dead_letters_days),
        ("alerts", "time", r.alerts_days),
        ("rollups_1m", "bucket", r.rollups_days),
    ] {
        if days == 0 {
            continue;
        }
        let sql =
            format!("DELETE FROM {s}.{table} WHERE {column} < now() - $1::int4 * interval '1 day'");
        // Retention is housekeeping: a refusal (a role without DELETE, a
        // publication that needs a replica identity) is reported, not fatal.
        match client.execute(&sql, &[&(days as i32)]).await {
            Ok(n) => expired += n,
            Err(e) => {
                tracing::warn!(table, error = %connection::describe(&e), "retention delete failed")
            }
        }
    }
    if created > 0 || !dropped.is_empty() || pruned > 0 || expired > 0 {
        tracing::info!(created, dropped = ?dropped, watermarks_pruned = pruned, rows_expired = expired, "maintenance done");
    }
    Ok(())
}

/// Runs the gateway until `shutdown` is cancelled.
///
/// # Errors
/// Configuration, HTTP bind or broker URL errors at start. Once running,
/// outages of the broker or the database are retried, never returned.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), PipelineError> {
    run_with_metrics(config, shutdown, Arc::new(Metrics::default())).await
}

/// [`run`], taking rule sets reloaded later (on SIGHUP) from `rules`.
///
/// # Errors
/// As for [`run`].
pub async fn run_with_rules(
    config: Config,
    shutdown: CancellationToken,
    rules: tokio::sync::watch::Receiver<Arc<Vec<crate::analytics::rules::RuleConfig>>>,
) -> Result<(), PipelineError> {
    run_inner(config, shutdown, Arc::new(Metrics::default()), Some(rules)).await
}

/// [`run`] with caller-owned metrics (the demo prints them live).
///
/// # Errors
/// As for [`run`].
pub async fn run_with_metrics(
    config: Config,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), PipelineError> {
    run_inner(config, shutdown, metrics, None).await
}

async fn run_inner(
    config: Config,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    reload: Option<tokio::sync::watch::Receiver<Arc<Vec<crate::analytics::rules::RuleConfig>>>>,
) -> Result<(), PipelineError> {
    config.validate()?;
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();

    if !config.http.addr.is_empty() {
        let addr = config
            .http
            .addr
            .parse()
            .map_err(|_| crate::settings::Invalid::new("http.addr", "not host:port"))?;
        let (local, serve) = http::bind(addr, metrics.clone(), background.clone())
            .await
            .map_err(|source| PipelineError::Http {
                addr: config.http.addr.clone(),
                source,
            })?;
        tracing::info!(addr = %local, "http endpoints up");
        tokio::spawn(serve);
    }

    let partitions = Arc::new(Partitions::new(
        &config.database.schema,
        config.database.partition,
    ));
    let mut delay = Duration::from_millis(config.database.retry_min_ms);
    loop {
        match migrate(&config, &partitions).await {
            Ok(()) => break,
            Err(PipelineError::Database(e)) => {
                tracing::warn!(error = %connection::describe(&e), retry_in_ms = delay.as_millis() as u64, "database not ready; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(other) => return Err(other),
        }
    }
    metrics.db_connected.store(true, Relaxed);

    let pg = connection::Db::new(&config.database)?;
    let router = Arc::new(Router::new(
        config.shard_count(),
        config.pipeline.ring_capacity,
    ));
    let shards = router.shards().len();
    // More writers than shards would idle: each shard feeds one writer.
    let writers = config.database.writers.min(shards);
    let owner = {
        let client = connection::connect(&pg).await?;
        schema::identity(&client, &config.database.schema).await?
    };
    let spools = open_spools(&config, writers, &owner, &metrics)?;
    let dedups = load_dedup(&config, &pg, shards, &spools).await?;
    replay_orphan_spools(&config, writers, &owner, &pg, &partitions, &metrics).await?;

    // Cancelled by the caller's shutdown, or here when a stage fails: then
    // intake stops and the rest drains as for a shutdown.
    let stop = shutdown.child_token();
    let stall = Duration::from_secs(config.pipeline.stall_secs);
    let mut stages: tokio::task::JoinSet<(Stage, Result<(), String>)> = tokio::task::JoinSet::new();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (alert_tx, alert_rx) = mpsc::unbounded_channel();
    let ctx = writer_context(
        &config,
        &pg,
        &partitions,
        &metrics,
        stop.clone(),
        Some(alert_tx),
    );
    let mut queues = Vec::with_capacity(writers);
    let mut health = Vec::with_capacity(writers);
    for (id, spool) in spools.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(2);
        queues.push(tx);
        let h = Arc::new(writer::WriterHealth::default());
        health.push(h.clone());
        let run = writer::run(id, ctx.clone(), rx, done_tx.clone(), spool, h, stall);
        stages.spawn(async move { (Stage::Writer(id), run.await.map_err(|e| e.to_string())) });
    }
    drop(done_tx);
    let worker_config = WorkerConfig::from(&config);
    let ids = Arc::new(BatchIds::new());
    let analytics_config = Arc::new(config.analytics.clone());
    let rules = Arc::new(config.rules.clone());
    for ((i, shard), dedup) in router.shards().iter().enumerate().zip(dedups) {
        let worker = Worker::new(
            shard.clone(),
            worker_config.clone(),
            config.database.partition,
            metrics.clone(),
            queues[i % writers].clone(),
            dedup,
            ids.clone(),
        )
        .with_analytics(
            crate::analytics::engine::Analytics::new(
                analytics_config.clone(),
                config.anomaly.clone(),
                rules.clone(),
            )
            .with_limits(
                config.limits.max_series_per_device,
                config.limits.max_series.div_ceil(shards),
            ),
            reload.clone(),
        );
        stages.spawn(async move {
            worker.run().await;
            (Stage::Worker(i), Ok(()))
        });
    }
    drop(queues);

    tokio::spawn(maintenance(
        config.clone(),
        partitions.clone(),
        background.clone(),
    ));
    tokio::spawn(observe(
        config.clone(),
        router.clone(),
        metrics.clone(),
        health,
        background.clone(),
    ));

    // Room for the broker's whole in-flight window (MQTT 5 receive_maximum,
    // at least 1,024): while the shard rings are full the intake takes no
    // events, and the driver keeps polling the connection (so PINGRESPs and
    // PUBACKs still flow) as long as what arrives fits here. A PINGRESP
    // left unread behind the window for a keep-alive drops the connection
    // and gets the whole window redelivered.
    let (event_tx, event_rx) =
        mpsc::channel(usize::from(config.mqtt.receive_maximum).max(1024) + 16);
    let driver_stop = CancellationToken::new();
    let _stop_driver = driver_stop.clone().drop_guard();
    let intake_settings = source::IntakeSettings {
        filters: config.mqtt.topic_filters()?,
        alert_topic_prefix: config.analytics.alert_topic_prefix.clone(),
    };
    let client = source::mqtt::start(&config.mqtt, event_tx, driver_stop.clone())?;
    tracing::info!(
        broker = %config.mqtt.url,
        database = %crate::config::describe_database(&config.database.url),
        shards = router.shards().len(),
        writers,
        "gateway running"
    );
    stages.spawn({
        let metrics = metrics.clone();
        let shutdown = stop.clone();
        async move {
            source::run_intake(
                intake_settings,
                client,
                source::IntakeInputs {
                    events: event_rx,
                    done: done_rx,
                    alerts: alert_rx,
                },
                router,
                metrics,
                shutdown,
            )
            .await;
            (Stage::Intake, Ok(()))
        }
    });

    // Supervision: every stage runs until shutdown; one that ends before it
    // (an error, a panic) fails readiness and stops the rest in order.
    let mut failure: Option<String> = None;
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {}
        Some(ended) = stages.join_next() => {
            // Stages end in order once shutdown has begun: only an end
            // before it, or an error, is a failure.
            let clean = matches!(ended, Ok((_, Ok(()))));
            if !(clean && shutdown.is_cancelled()) {
                let why = describe_end(ended);
                tracing::error!(stage = %why, "a stage ended before shutdown; draining and stopping");
                metrics.stage_failed.store(true, Relaxed);
                failure = Some(why);
                stop.cancel();
            }
        }
    }
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(config.pipeline.shutdown_timeout_secs);
    loop {
        match tokio::time::timeout_at(deadline, stages.join_next()).await {
            Ok(Some(ended)) => {
                // Stages ending cleanly is the drain; an error or a panic
                // still fails the run.
                if !matches!(ended, Ok((_, Ok(())))) {
                    failure.get_or_insert_with(|| describe_end(ended));
                }
            }
            Ok(None) => {
                tracing::info!(
                    committed = metrics.readings_committed.load(Relaxed),
                    acked = metrics.acks_sent.load(Relaxed),
                    "drained and stopped"
                );
                break;
            }
            Err(_) => {
                tracing::error!(
                    deadline_secs = config.pipeline.shutdown_timeout_secs,
                    "shutdown deadline passed; unacknowledged messages will be redelivered by the broker"
                );
                break;
            }
        }
    }
    if let Some(why) = failure {
        return Err(PipelineError::StageFailed(why));
    }
    Ok(())
}

fn writer_context(
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
fn open_spools(
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
async fn replay_orphan_spools(
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
async fn load_dedup(
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
    let mut devices = 0usize;
    for row in client
        .query(
            &format!(
                "SELECT device_id, seq, seen, boot, epoch, newest, \
                 (extract(epoch FROM updated_at) * 1000000)::int8 FROM {s}.device_watermarks"
            ),
            &[],
        )
        .await?
    {
        let device: Arc<str> = Arc::from(row.get::<_, &str>(0));
        let window = SeqWindow::restore(row.get::<_, i64>(1) as u64, row.get::<_, &[u8]>(2))
            .with_state(
                row.get::<_, Option<i64>>(3).map(|b| b as u64),
                row.get::<_, i64>(4).clamp(0, i64::from(u32::MAX)) as u32,
                row.get::<_, i64>(5),
            );
        let touched = row.get::<_, i64>(6);
        dedups[shard_of(&device, shards)].restore_window(device, window, touched);
        devices += 1;
    }
    let mut identities = 0usize;
    for row in client
        .query(
            &format!(
                "SELECT device_id, hash, (extract(epoch FROM received_at) * 1000000)::int8 FROM {s}.message_ids \
                 WHERE received_at > now() - $1::int8 * interval '1 microsecond' ORDER BY received_at"
            ),
            &[&horizon],
        )
        .await?
    {
        let hash: &[u8] = row.get(1);
        let Ok(bytes) = <[u8; 16]>::try_from(hash) else { continue };
        let device: &str = row.get(0);
        dedups[shard_of(device, shards)].restore_identity(u128::from_be_bytes(bytes), row.get(2));
        identities += 1;
    }
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

/// Creates partitions ahead and drops expired ones every ten minutes.
async fn maintenance(config: Config, partitions: Arc<Partitions>, stop: CancellationToken) {
    let Ok(pg) = connection::Db::new(&config.database) else {
        return; // validated at start
    };
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = async {
            let mut client = connection::connect(&pg).await?;
            maintain(&mut client, &config, &partitions).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %connection::describe(&e), "partition maintenance failed; retrying later");
        }
    }
}

/// Updates ring and writer-stall gauges every second and logs a summary
/// line periodically.
async fn observe(
    config: Config,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    writers: Vec<Arc<writer::WriterHealth>>,
    stop: CancellationToken,
) {
    let stall = Duration::from_secs(config.pipeline.stall_secs);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let every = config.pipeline.summary_interval_secs;
    let mut seconds = 0u64;
    let mut last = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        metrics.set_ring_occupancy(router.occupancy());
        let stalled = writers.iter().filter(|w| w.stalled(stall)).count() as u64;
        if stalled > metrics.writers_stalled.swap(stalled, Relaxed) {
            tracing::error!(
                writers = stalled,
                stall_secs = stall.as_secs(),
                "writer made no progress with work pending"
            );
        }
        seconds += 1;
        if every > 0 && seconds % every == 0 {
            let committed = metrics.readings_committed.load(Relaxed);
            tracing::info!(
                messages = metrics.messages_received.load(Relaxed),
                readings_committed = committed,
                readings_per_s = (committed - last) / every,
                dead_letters = metrics.dead_letters_total(),
                acks = metrics.acks_sent.load(Relaxed),
                "summary"
            );
            last = committed;
        }
    }
}
