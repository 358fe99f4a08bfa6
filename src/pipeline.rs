//! The pipeline: wires source -> shard router -> workers -> writers -> ack
//! ledger, runs until `shutdown`, then stops in order: intake first, rings
//! drained, batches flushed and committed, acks released, connections closed,
//! all under `pipeline.shutdown_timeout_secs`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::model::{now_micros, MICROS_PER_DAY};
use crate::shard::worker::{Worker, WorkerConfig};
use crate::shard::Router;
use crate::sink::partitions::Partitions;
use crate::sink::{schema, writer};
use crate::source;
use crate::telemetry::{http, Metrics};

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mqtt(#[from] source::mqtt::MqttError),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// Creates the schema and the partitions around now, and drops partitions
/// past retention.
///
/// # Errors
/// Any database error.
pub async fn migrate(config: &Config, partitions: &Partitions) -> Result<(), PipelineError> {
    let pg: tokio_postgres::Config =
        config
            .database
            .url
            .parse()
            .map_err(|e| crate::config::ConfigError::Invalid {
                key: "database.url".into(),
                reason: format!("{e}"),
            })?;
    let mut client = writer::connect(&pg).await?;
    schema::create(&mut client, &config.database.schema).await?;
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
    if created > 0 || !dropped.is_empty() {
        tracing::info!(created, dropped = ?dropped, "partitions maintained");
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

/// [`run`] with caller-owned metrics (the demo prints them live).
///
/// # Errors
/// As for [`run`].
pub async fn run_with_metrics(
    config: Config,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), PipelineError> {
    config.validate()?;
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();

    if !config.http.addr.is_empty() {
        let addr = config
            .http
            .addr
            .parse()
            .map_err(|_| crate::config::ConfigError::Invalid {
                key: "http.addr".into(),
                reason: "not host:port".into(),
            })?;
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
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database not ready; retrying");
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

    let pg: tokio_postgres::Config = config.database.url.parse()?;
    let router = Arc::new(Router::new(
        config.shard_count(),
        config.pipeline.ring_capacity,
    ));
    let writers = config.database.writers;
    let (batch_tx, batch_rx) = mpsc::channel(writers * 2);
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    let (done_tx, done_rx) = mpsc::unbounded_channel();

    let worker_config = WorkerConfig::from_config(&config);
    for shard in router.shards() {
        let worker = Worker::new(
            shard.clone(),
            worker_config.clone(),
            partitions.clone(),
            metrics.clone(),
            batch_tx.clone(),
        );
        tokio::spawn(worker.run());
    }
    drop(batch_tx);
    let ctx = Arc::new(writer::WriterContext {
        pg: pg.clone(),
        schema: config.database.schema.clone(),
        partitions: partitions.clone(),
        metrics: metrics.clone(),
        retry_min: Duration::from_millis(config.database.retry_min_ms),
    });
    for id in 0..writers {
        tokio::spawn(writer::run(
            id,
            ctx.clone(),
            batch_rx.clone(),
            done_tx.clone(),
        ));
    }
    drop(done_tx);

    tokio::spawn(maintenance(
        config.clone(),
        partitions.clone(),
        background.clone(),
    ));
    tokio::spawn(observe(
        config.clone(),
        router.clone(),
        metrics.clone(),
        background.clone(),
    ));

    let (event_tx, event_rx) = mpsc::channel(1024);
    let driver_stop = CancellationToken::new();
    let _stop_driver = driver_stop.clone().drop_guard();
    let client = source::mqtt::start(&config, event_tx, driver_stop.clone())?;
    tracing::info!(
        broker = %config.mqtt.url,
        database = %crate::config::redact_url(&config.database.url),
        shards = router.shards().len(),
        writers,
        "gateway running"
    );
    let intake = tokio::spawn({
        let config = config.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        async move {
            source::run_intake(
                &config, client, event_rx, router, done_rx, metrics, shutdown,
            )
            .await;
        }
    });

    shutdown.cancelled().await;
    let deadline = Duration::from_secs(config.pipeline.shutdown_timeout_secs);
    match tokio::time::timeout(deadline, intake).await {
        Ok(_) => tracing::info!(
            committed = metrics.readings_committed.load(Relaxed),
            acked = metrics.acks_sent.load(Relaxed),
            "drained and stopped"
        ),
        Err(_) => tracing::error!(
            deadline_secs = deadline.as_secs(),
            "shutdown deadline passed; unacknowledged messages will be redelivered by the broker"
        ),
    }
    Ok(())
}

/// Creates partitions ahead and drops expired ones every ten minutes.
async fn maintenance(config: Config, partitions: Arc<Partitions>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = async {
            let pg: tokio_postgres::Config = config.database.url.parse()?;
            let mut client = writer::connect(&pg).await?;
            maintain(&mut client, &config, &partitions).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "partition maintenance failed; retrying later");
        }
    }
}

/// Updates ring gauges every second and logs a summary line periodically.
async fn observe(
    config: Config,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
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
