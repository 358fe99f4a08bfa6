//! The pipeline: wires source -> shard router -> workers -> writers -> ack
//! ledger, runs until `shutdown`, then stops in order: intake first, rings
//! drained, batches flushed and committed, acks released, connections closed,
//! all under `pipeline.shutdown_timeout_secs`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::shard::worker::{BatchIds, Worker, WorkerConfig};
use crate::shard::Router;
use crate::sink::partitions::Partitions;
use crate::sink::spool::SpoolError;
use crate::sink::{connection, maintenance, schema, writer};
use crate::source;
use crate::telemetry::{http, Metrics};

mod startup;

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
/// past retention (`edge-gateway migrate`).
///
/// # Errors
/// Settings or database errors.
pub async fn migrate(config: &Config, partitions: &Partitions) -> Result<(), PipelineError> {
    let db = connection::Db::new(&config.database)?;
    maintenance::migrate(&db, &housekeeping(config), partitions).await?;
    Ok(())
}

/// What the database's housekeeping needs of the settings.
fn housekeeping(config: &Config) -> maintenance::Housekeeping {
    maintenance::Housekeeping {
        database: config.database.clone(),
        retention: config.retention.clone(),
        dedup_horizon_secs: config.dedup.horizon_secs,
    }
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
    let pg = connection::Db::new(&config.database)?;
    let housekeeping = housekeeping(&config);
    if !startup::migrate(&pg, &housekeeping, &partitions, &shutdown).await {
        return Ok(());
    }
    metrics.db_connected.store(true, Relaxed);

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
    let spools = startup::open_spools(&config, writers, &owner, &metrics)?;
    let dedups = startup::load_dedup(&config, &pg, shards, &spools).await?;
    startup::drain_former_writers_spools(&config, writers, &owner, &pg, &partitions, &metrics)
        .await?;

    // Cancelled by the caller's shutdown, or here when a stage fails: then
    // intake stops and the rest drains as for a shutdown.
    let stop = shutdown.child_token();
    let stall = Duration::from_secs(config.pipeline.stall_secs);
    let mut stages: tokio::task::JoinSet<(Stage, Result<(), String>)> = tokio::task::JoinSet::new();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (alert_tx, alert_rx) = mpsc::unbounded_channel();
    let ctx = startup::writer_context(
        &config,
        &pg,
        &partitions,
        &metrics,
        stop.clone(),
        Some(alert_tx),
    );
    let mut queues = Vec::with_capacity(writers);
    let mut health = Vec::with_capacity(writers);
    let mut writer_queues = Vec::with_capacity(writers);
    for (id, spool) in spools.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(2);
        // Observed without keeping the queue open: the writer must see it
        // close at shutdown.
        writer_queues.push(tx.downgrade());
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

    tokio::spawn(maintenance::run(
        pg.clone(),
        housekeeping,
        partitions.clone(),
        background.clone(),
    ));
    tokio::spawn(observe(
        config.clone(),
        router.clone(),
        metrics.clone(),
        (health, writer_queues),
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

/// Updates ring and writer-stall gauges every second and logs a summary
/// line periodically.
async fn observe(
    config: Config,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    (writers, queues): (
        Vec<Arc<writer::WriterHealth>>,
        Vec<mpsc::WeakSender<crate::sink::SealedBatch>>,
    ),
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
        metrics.set_writer_queues(
            queues
                .iter()
                .map(|q| q.upgrade().map_or(0, |q| q.max_capacity() - q.capacity()))
                .collect(),
        );
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
