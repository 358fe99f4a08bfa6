//! `edge-gateway demo`: the whole path on one machine with nothing set up
//! by hand. An embedded broker (rumqttd), a throwaway PostgreSQL, the
//! gateway and simulated devices in all four payload formats, with
//! anomalies injected from the simulator's ground truth and rules that
//! catch them at the edge; a live status line with the alerts as they come
//! (or, with `--top`, the live view); at the end, row counts read back from
//! PostgreSQL and the `detection` table against the ground truth.
//! Everything is removed on exit or Ctrl-C.

mod detection;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_payload::Format;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Protocol};
use crate::local::{broker, postgres::LocalPostgres, LocalError};
use crate::telemetry::Metrics;

/// Demo settings from the command line.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub seconds: u64,
    pub devices: usize,
    /// Samples per second per device.
    pub rate: f64,
    /// Samples per message.
    pub pack: usize,
    /// Show `top` on the demo's gateway instead of the status line.
    pub top: bool,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("gateway: {0}")]
    Gateway(#[from] crate::pipeline::PipelineError),
    #[error("simulator: {0}")]
    Sim(#[from] firmware_sim::SimError),
    #[error("database: {}", crate::sink::connection::describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Other(String),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LocalError> + Send + 'static,
) -> Result<T, DemoError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DemoError::Other(e.to_string()))?
        .map_err(DemoError::from)
}

/// Runs the demo until `seconds` pass or `stop` is cancelled.
///
/// # Errors
/// When a local server cannot start (with what to install) or a stage fails.
pub async fn run(options: DemoOptions, stop: CancellationToken) -> Result<(), DemoError> {
    println!("demo: starting embedded MQTT broker and a throwaway PostgreSQL ...");
    let broker = blocking(broker::start).await?;
    let pg = blocking(LocalPostgres::start).await?;
    let mut config = Config::default();
    config.mqtt.url = broker.url(Protocol::V5);
    config.mqtt.client_id = "edge-gateway-demo".into();
    config.database.url = pg.url();
    let http_port = crate::local::free_port()?;
    config.http.addr = format!("127.0.0.1:{http_port}");
    config.pipeline.summary_interval_secs = 0;
    config.analytics.lateness_secs = 0.0;
    config.rules = detection::rules(options.rate);
    let spool = tempfile::Builder::new()
        .prefix("edge-spool-")
        .tempdir()
        .map_err(|e| DemoError::Other(format!("temp dir for the spool: {e}")))?;
    config.spool.dir = spool.path().display().to_string();
    println!(
        "demo: broker {}  postgres {}",
        config.mqtt.url, config.database.url
    );

    let metrics = Arc::new(Metrics::default());
    let gateway_stop = CancellationToken::new();
    let gateway = tokio::spawn(crate::pipeline::run_with_metrics(
        config.clone(),
        gateway_stop.clone(),
        metrics.clone(),
    ));
    let ready_by = Instant::now() + Duration::from_secs(30);
    while !metrics.ready() {
        if Instant::now() > ready_by || gateway.is_finished() {
            gateway_stop.cancel();
            return match gateway.await {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(DemoError::Other(
                    "gateway did not become ready within 30 s".into(),
                )),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "demo: gateway ready; {} devices x {} samples/s in 4 formats for {} s, 2 anomalies per device (Ctrl-C stops early)",
        options.devices, options.rate, options.seconds
    );
    let samples = ((options.seconds as f64 * options.rate) as u64).max(50);
    let start_ms = crate::model::now_micros() / 1000;

    let sim_stop = stop.child_token();
    let per_format = options.devices.div_ceil(4);
    let mut sims = Vec::new();
    let mut runs = Vec::new();
    for (i, format) in Format::ALL.into_iter().enumerate() {
        let devices = per_format.min(options.devices.saturating_sub(i * per_format));
        if devices == 0 {
            continue;
        }
        let sim = firmware_sim::SimConfig {
            broker: broker.url(Protocol::V311),
            devices,
            rate: options.rate,
            count: Some(samples),
            start_ms: Some(start_ms),
            format,
            metrics: 3,
            pack: options.pack,
            device_prefix: format!("{}-", format.name()),
            client_id: format!("demo-sim-{}", format.name()),
            seed: i as u64 + 1,
            anomalies: 2,
            // Two seconds an episode (a spike is one sample).
            anomaly_len: ((2.0 * options.rate) as u64).clamp(2, samples / 10),
            ..firmware_sim::SimConfig::default()
        };
        runs.push((sim.clone(), start_ms));
        let stop = sim_stop.clone();
        sims.push(tokio::spawn(
            async move { firmware_sim::run(&sim, stop).await },
        ));
    }

    if options.top {
        let url = format!("http://127.0.0.1:{http_port}");
        let seconds = Some(options.seconds + 5);
        tokio::task::block_in_place(|| crate::top::run(&url, false, seconds))
            .map_err(|e| DemoError::Other(e.to_string()))?;
    }
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = 0u64;
    while !sims.iter().all(|s| s.is_finished()) {
        tick.tick().await;
        let committed = metrics.readings_committed.load(Relaxed);
        println!(
            "demo: {:>3} s  {:>8} readings/s  {:>10} rows committed  {:>6} dead letters  {:>4} alerts{}",
            started.elapsed().as_secs(),
            committed - last,
            committed,
            metrics.dead_letters_total(),
            metrics.alerts.load(Relaxed),
            metrics
                .last_alert()
                .map(|a| format!("  last: {a}"))
                .unwrap_or_default(),
        );
        last = committed;
    }
    let mut published = 0;
    for sim in sims {
        match sim.await {
            Ok(Ok(summary)) => published += summary.readings,
            Ok(Err(e)) => println!("demo: simulator: {e}"),
            Err(e) => println!("demo: simulator task: {e}"),
        }
    }
    let wait_until = Instant::now() + Duration::from_secs(20);
    while metrics.readings_committed.load(Relaxed) < published && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway_stop.cancel();
    if let Ok(Err(e)) = gateway.await {
        println!("demo: gateway stopped with error: {e}");
    }

    println!("demo: published {published} readings; read back from PostgreSQL:");
    let db = crate::sink::connection::Db::new(&config.database)
        .map_err(|e| DemoError::Other(e.to_string()))?;
    let client = crate::sink::connection::connect(&db).await?;
    let rows = client
        .query(
            "SELECT tableoid::regclass::text, count(*), count(DISTINCT device_id), min(time)::text, max(time)::text \
             FROM edge.readings GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    println!(
        "  {:<28} {:>10} {:>8}  {:<24} {:<24}",
        "partition", "rows", "devices", "first", "last"
    );
    let mut total = 0i64;
    for row in &rows {
        let count: i64 = row.get(1);
        total += count;
        println!(
            "  {:<28} {:>10} {:>8}  {:<24} {:<24}",
            row.get::<_, String>(0),
            count,
            row.get::<_, i64>(2),
            row.get::<_, String>(3),
            row.get::<_, String>(4)
        );
    }
    let metrics_by_metric = client
        .query("SELECT metric, count(*), round(avg(value)::numeric, 2)::text FROM edge.readings GROUP BY 1 ORDER BY 1", &[])
        .await?;
    for row in &metrics_by_metric {
        println!(
            "  metric {:<20} {:>10} rows, avg {}",
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, String>(2)
        );
    }
    let dead: i64 = client
        .query_one("SELECT count(*) FROM edge.dead_letters", &[])
        .await?
        .get(0);
    let distinct: i64 = client
        .query_one(
            "SELECT count(DISTINCT (device_id, metric, time)) FROM edge.readings",
            &[],
        )
        .await?
        .get(0);
    println!(
        "  edge.readings total {total} rows ({distinct} distinct device/metric/time); edge.dead_letters {dead} rows"
    );
    let raised: Vec<detection::Raised> = client
        .query(
            "SELECT (extract(epoch FROM time) * 1000000)::int8, device_id, metric, rule \
             FROM edge.alerts WHERE state = 'raised' ORDER BY time",
            &[],
        )
        .await?
        .iter()
        .map(|r| detection::Raised {
            time_ms: detection::ms(r.get(0)),
            device: r.get(1),
            metric: r.get(2),
            rule: r.get(3),
        })
        .collect();
    let (table, complete) = detection::table(&runs, &raised);
    println!(
        "demo: injected anomalies (firmware-sim's ground truth) and the alerts raised at the edge:"
    );
    print!("{table}");
    println!(
        "demo: {}",
        if complete {
            "every injected spike and level shift raised an alert"
        } else {
            "NOT every injected spike and level shift raised an alert"
        }
    );
    if total as u64 == published && distinct == total {
        println!("demo: every published reading is in PostgreSQL, none twice");
    } else {
        println!("demo: MISMATCH: published {published}, stored {total}, distinct {distinct}");
    }
    drop(client);
    drop(pg);
    println!("demo: cleaned up");
    Ok(())
}
