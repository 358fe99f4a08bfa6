//! End-to-end load benchmark, run by `bash benches/e2e.sh`.
//!
//! On this machine, with nothing set up by hand: a throwaway PostgreSQL and
//! mosquitto (the shipped configuration), the release gateway as its own
//! process with analytics on (three windows, the detector, two rules), and
//! in-process `firmware-sim` publishers. It measures, in one run:
//!
//! 1. the *ceiling*: the same number of rows, same devices and metrics,
//!    loaded with `COPY readings FROM STDIN (FORMAT binary)` straight into
//!    the same table with the same indexes, over as many connections as the
//!    gateway has writers, in batches of the gateway's batch size, then
//!    truncated;
//! 2. *burst*: every reading published as fast as the broker accepts
//!    (packed messages, QoS 1, encoded beforehand so the publishers take
//!    no CPU from the run), timed from the first publish to the moment the
//!    gateway's committed counter reaches the total;
//! 3. *paced*: publishing at half the burst rate for a while, for the
//!    publish-to-commit latency a deployment sized at 2x headroom sees (the
//!    simulator stamps each message's newest reading with its publish time;
//!    the gateway's `edge_gateway_reading_to_commit_seconds` histogram is
//!    read before and after, and quantiles are interpolated in its buckets);
//! 4. optionally (`E2E_SOAK_SECS`), a soak at 80% of the burst rate over
//!    many devices, printing the gateway's RSS every 10 s.
//!
//! With `E2E_DRAIN=1` it first measures what a gateway restarting after an
//! outage meets: the gateway is started once (for its durable session) and
//! stopped, the whole load is queued in mosquitto, and the drain is timed
//! from the gateway's process start to its last commit (read from its own
//! `/metrics`), against one raw binary COPY of every row over one
//! connection (PostgreSQL's single-stream ceiling), with the CPU split:
//! the gateway process, the database server's process tree (backends come
//! and go; reaped ones count through their parent), mosquitto. The tree
//! includes autovacuum, which the drain's commits let run and the raw
//! COPY's single transaction does not, so the database's share is also
//! given for the backends alone: those serving the gateway against the one
//! serving the raw COPY (`pg_stat_activity`, their `/proc` CPU).
//! `E2E_LIVE=0` skips the live phases; `E2E_PERF=FILE` records the whole
//! machine with `perf record -a -g` during the drain; `E2E_STATEMENTS=1`
//! prints the drain's top statements from `pg_stat_statements`;
//! `E2E_PEER="command"` drains the same backlog with that command instead
//! of the gateway (the Python baseline, `benches/peers/consumer.py`).
//! `bash benches/drain.sh` runs every format with and without the index.
//!
//! Throughout it samples the gateway's RSS (peak from `VmHWM`) and CPU time
//! (`/proc/<pid>/stat`), and whole-machine CPU use, and at the end checks
//! that the table holds exactly the readings published. It prints a table
//! and, last, one JSON line with every figure.
//!
//! Settings (environment): `E2E_READINGS` (4,000,000), `E2E_DEVICES`
//! (1,000), `E2E_METRICS` per sample (4), `E2E_PACK` samples per message
//! (25, so 100 readings a message), `E2E_FORMAT` (native-cbor),
//! `E2E_PUBLISHERS` MQTT connections (2), `E2E_INDEX` (1 keeps the
//! `(device_id, time)` index, 0 drops it), `E2E_PACED_SECS` (20),
//! `E2E_SOAK_SECS` (0 = no soak), `E2E_SOAK_DEVICES` (100,000),
//! `E2E_SOAK_RATE` (readings/s; default 80% of the burst rate),
//! `E2E_PG_SETTINGS` (`;`-separated; default fsync, synchronous commit
//! and full-page writes on, as in production), `E2E_GATEWAY` (path of the
//! release binary), `E2E_GATEWAY_TOML` (gateway config merged over the
//! generated file, e.g. `[database]\nwriters = 3`), `E2E_MOSQUITTO` (lines
//! over the shipped mosquitto.conf, separated by `;`), `E2E_CITUS` (0; N
//! runs a Citus coordinator with N workers instead of one PostgreSQL, the
//! gateway and the ceiling's COPY both going through the coordinator:
//! `benches/citus.sh`).

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use edge_gateway::local::{
    citus::LocalCitus, free_port, mosquitto::Mosquitto, postgres::LocalPostgres, probe,
};
use edge_gateway::sink::batch::READINGS_COLUMNS;
use edge_gateway::sink::copy::{RowBuffer, HEADER, TRAILER};
use edge_payload::Format;
use firmware_sim::SimConfig;
use futures_util::SinkExt;

use tokio_util::sync::CancellationToken;

/// PostgreSQL as a production server for a write-heavy load runs it:
/// durable (the throwaway cluster's `fsync=off` leaves every write dirty in
/// the page cache until the kernel flushes gigabytes at once, a
/// multi-second stall), with the usual write-heavy tuning of checkpoint
/// spacing (at the 1 GB default, a checkpoint every few seconds at these
/// rates, each followed by a burst of full-page images), and
/// `backend_flush_after` for every backend. The gateway sets that for its
/// own sessions (`database.flush_after_kb`), but after a drain autovacuum
/// rewrites the new partition from its own backend; without the server
/// setting those pages sit dirty until the kernel writes them back 30 s
/// later (`vm.dirty_expire_centisecs`), half a gigabyte in a second, and
/// every commit waits behind that (p99 at half rate 385 to 460 ms with the
/// index, against 207 to 274 with the setting; README, "Deploying").
const PRODUCTION_PG: &str = "fsync=on;synchronous_commit=on;full_page_writes=on;\
     max_wal_size=4GB;checkpoint_timeout=15min;backend_flush_after=2MB";

/// The `;`-separated lines of a setting, empty ones left out.
fn lines(setting: &str) -> Vec<&str> {
    setting
        .split(';')
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Merges `extra` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Benchmark settings.
#[derive(Debug, Clone)]
struct Options {
    readings: u64,
    devices: usize,
    metrics: usize,
    pack: usize,
    format: Format,
    publishers: usize,
    index: bool,
    paced_secs: f64,
    soak_secs: f64,
    soak_devices: usize,
    /// Readings/s of the soak; 0 = 80% of the burst rate.
    soak_rate: f64,
    gateway: PathBuf,
    extra_toml: String,
    mosquitto: String,
    pg_settings: String,
    /// Citus workers behind a coordinator; 0 for one plain PostgreSQL.
    citus: usize,
    /// Queue the readings in the broker while the gateway is down, then
    /// time its drain from process start.
    drain: bool,
    /// Run the live phases (burst, paced).
    live: bool,
    /// Record the whole machine with `perf` during the drain, into this file.
    perf: Option<PathBuf>,
    /// Print the drain's top statements from `pg_stat_statements`.
    statements: bool,
    /// A shell command that drains the backlog instead of the gateway (a
    /// peer consumer: `benches/peers/consumer.py`), given `PEER_*` settings
    /// in its environment; it exits when done.
    peer: Option<String>,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T> {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| anyhow!("{key}={v:?} is not valid")),
        Err(_) => Ok(default),
    }
}

impl Options {
    fn from_env() -> Result<Options> {
        let o = Options {
            readings: env_or("E2E_READINGS", 4_000_000)?,
            devices: env_or("E2E_DEVICES", 1_000)?,
            metrics: env_or("E2E_METRICS", 4)?,
            pack: env_or("E2E_PACK", 25)?,
            format: env_or("E2E_FORMAT", Format::NativeCbor)?,
            publishers: env_or("E2E_PUBLISHERS", 2)?,
            index: env_or::<u8>("E2E_INDEX", 1)? != 0,
            paced_secs: env_or("E2E_PACED_SECS", 20.0)?,
            soak_secs: env_or("E2E_SOAK_SECS", 0.0)?,
            soak_devices: env_or("E2E_SOAK_DEVICES", 100_000)?,
            soak_rate: env_or("E2E_SOAK_RATE", 0.0)?,
            gateway: env_or("E2E_GATEWAY", PathBuf::from("target/release/edge-gateway"))?,
            extra_toml: std::env::var("E2E_GATEWAY_TOML").unwrap_or_default(),
            mosquitto: std::env::var("E2E_MOSQUITTO").unwrap_or_default(),
            citus: env_or("E2E_CITUS", 0)?,
            drain: env_or::<u8>("E2E_DRAIN", 0)? != 0,
            live: env_or::<u8>("E2E_LIVE", 1)? != 0,
            perf: std::env::var_os("E2E_PERF").map(PathBuf::from),
            statements: env_or::<u8>("E2E_STATEMENTS", 0)? != 0,
            peer: std::env::var("E2E_PEER")
                .ok()
                .filter(|p| !p.trim().is_empty()),
            pg_settings: std::env::var("E2E_PG_SETTINGS")
                .unwrap_or_else(|_| PRODUCTION_PG.to_string()),
        };
        if !(1..=4).contains(&o.metrics) {
            bail!("E2E_METRICS must be 1 to 4");
        }
        if o.devices == 0 || o.pack == 0 || o.publishers == 0 || o.publishers > o.devices {
            bail!(
                "E2E_DEVICES, E2E_PACK and E2E_PUBLISHERS must be positive, publishers <= devices"
            );
        }
        if !o.gateway.exists() {
            bail!(
                "no gateway binary at {} (build it: cargo build --release, or set E2E_GATEWAY)",
                o.gateway.display()
            );
        }
        Ok(o)
    }

    /// Samples per device so that the run publishes about `readings`.
    fn samples_per_device(&self) -> u64 {
        let per_sample = (self.devices * self.metrics) as u64;
        self.readings
            .div_ceil(per_sample)
            .div_ceil(self.pack as u64)
            * self.pack as u64
    }

    fn total_readings(&self) -> u64 {
        self.samples_per_device() * (self.devices * self.metrics) as u64
    }
}

// ---------------------------------------------------------------------------
// The gateway process and what /proc and /metrics say about it.

struct GatewayProcess {
    child: Child,
    port: u16,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl GatewayProcess {
    fn figures(&self) -> probe::ProcessFigures {
        probe::process(self.child.id()).unwrap_or_default()
    }

    /// Resident set size now and at its peak, in MiB.
    fn rss_mb(&self) -> (f64, f64) {
        let f = self.figures();
        (f.rss_kib as f64 / 1024.0, f.peak_rss_kib as f64 / 1024.0)
    }

    /// User + system CPU seconds used so far.
    fn cpu_secs(&self) -> f64 {
        self.figures().cpu_secs
    }

    async fn metrics(&self) -> Result<String> {
        let port = self.port;
        match tokio::task::spawn_blocking(move || probe::http_get(port, "/metrics")).await? {
            Some((200, body)) => Ok(body),
            other => bail!("/metrics answered {:?}", other.map(|(s, _)| s)),
        }
    }

    async fn committed(&self) -> Result<u64> {
        let text = self.metrics().await?;
        Ok(counter(&text, "edge_gateway_readings_committed_total") as u64)
    }

    fn terminate(mut self) -> Result<()> {
        self.stop()
    }

    /// SIGTERM, then SIGKILL if it has not exited within 60 s.
    fn stop(&mut self) -> Result<()> {
        match probe::terminate(&mut self.child, Duration::from_secs(60)) {
            Some(_) => Ok(()),
            None => bail!("gateway did not exit within 60 s of SIGTERM"),
        }
    }
}

/// Busy and total jiffies of the whole machine (from `/proc/stat`).
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = cpu.iter().sum();
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The value of an unlabelled counter or gauge (0 when absent).
fn counter(text: &str, name: &str) -> f64 {
    probe::metric(text, name).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Phases.

/// Loads `rows` readings of `devices` x `metrics` with raw binary COPY over
/// `connections` connections in batches of `batch_rows`; returns readings/s.
/// With `single`, one connection sends every row in one COPY statement
/// (the batches as chunks of one stream): PostgreSQL's own single-stream
/// ceiling, with no per-transaction cost at all; then also the CPU seconds
/// of the backend that served it (0 otherwise).
async fn ceiling(
    db: &tokio_postgres::Config,
    o: &Options,
    connections: usize,
    batch_rows: usize,
    single: bool,
) -> Result<(f64, f64)> {
    let sim = SimConfig {
        devices: o.devices,
        metrics: o.metrics,
        step_ms: Some(1),
        ..SimConfig::default()
    };
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - o.samples_per_device() as i64;
    // Encoded before timing: the ceiling is PostgreSQL's, not our encoder's.
    let mut batches: Vec<Bytes> = Vec::new();
    let mut buffer = RowBuffer::new(batch_rows * 64);
    // The rows the gateway stores: SenML records carry a unit.
    let units = matches!(o.format, Format::SenmlCbor | Format::SenmlJson);
    let ids: Vec<String> = (0..o.devices)
        .map(|d| firmware_sim::device_id("e2e-ceiling-", d))
        .collect();
    for i in 0..o.samples_per_device() {
        for (d, id) in ids.iter().enumerate() {
            let sample = firmware_sim::sample(&sim, start_ms, d, i);
            for (metric, value) in &sample.metrics {
                buffer
                    .row(9)
                    .timestamptz(sample.ts_ms * 1000)
                    .text(id)
                    .text(metric)
                    .float8(*value)
                    .opt_text(units.then(|| firmware_sim::unit_of(metric)).flatten())
                    .null()
                    .null()
                    .null()
                    .null();
                if buffer.rows() >= batch_rows {
                    let full = std::mem::replace(&mut buffer, RowBuffer::new(batch_rows * 64));
                    batches.push(full.finish());
                }
            }
        }
    }
    if buffer.rows() > 0 {
        batches.push(buffer.finish());
    }
    let sql = format!("COPY edge.readings ({READINGS_COLUMNS}) FROM STDIN (FORMAT binary)");
    if single {
        let (client, connection) = db.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let backend: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let backend_cpu = || backend_cpu_secs(&[backend]);
        let last = batches.len() - 1;
        let cpu0 = backend_cpu();
        let started = Instant::now();
        let sink = client.copy_in(&sql).await?;
        futures_util::pin_mut!(sink);
        for (i, batch) in batches.into_iter().enumerate() {
            // One stream: the header once, the trailer once.
            let from = if i == 0 { 0 } else { HEADER.len() };
            let to = if i == last {
                batch.len()
            } else {
                batch.len() - TRAILER.len()
            };
            sink.send(batch.slice(from..to)).await?;
        }
        sink.finish().await?;
        let rate = o.total_readings() as f64 / started.elapsed().as_secs_f64();
        return Ok((rate, backend_cpu() - cpu0));
    }
    let queue = std::sync::Arc::new(std::sync::Mutex::new(batches));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (queue, db, sql) = (queue.clone(), db.clone(), sql.clone());
        tasks.push(tokio::spawn(async move {
            let (client, connection) = db.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            loop {
                let next = queue.lock().map_err(|_| anyhow!("poisoned"))?.pop();
                let Some(batch) = next else { break };
                let sink = client.copy_in(&sql).await?;
                futures_util::pin_mut!(sink);
                sink.send(batch).await?;
                sink.finish().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((o.total_readings() as f64 / secs, 0.0))
}

/// The host's dirty-page writeback settings, which the p99 with the index
/// depends on: at the kernel's defaults (a ratio of memory, 30 s expiry)
/// data files' pages that `backend_flush_after` does not cover pile up
/// and go out in one burst, and the commits behind it wait (README,
/// "Deploying").
fn host_writeback() -> String {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/vm/{name}"))
            .map_or_else(|_| "?".to_string(), |v| v.trim().to_string())
    };
    format!(
        "vm.dirty_background_bytes {} (ratio {}), vm.dirty_expire_centisecs {}",
        read("dirty_background_bytes"),
        read("dirty_background_ratio"),
        read("dirty_expire_centisecs")
    )
}

/// CPU seconds the server processes `pids` have used (those gone count 0).
fn backend_cpu_secs(pids: &[i32]) -> f64 {
    pids.iter()
        .filter_map(|&pid| u32::try_from(pid).ok())
        .filter_map(probe::process)
        .map(|p| p.cpu_secs)
        .sum()
}

/// The client backends now serving anyone but `client` itself.
async fn client_backends(client: &tokio_postgres::Client) -> Result<Vec<i32>> {
    Ok(client
        .query(
            "SELECT pid FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Publishers for `devices` devices, `count` samples each (or for `secs`),
/// at `rate` samples/s per device (0 = as fast as the broker accepts).
fn publishers(
    o: &Options,
    broker: &str,
    devices: usize,
    rate: f64,
    count: Option<u64>,
    secs: Option<f64>,
    tag: &str,
) -> Vec<tokio::task::JoinHandle<Result<firmware_sim::Summary, firmware_sim::SimError>>> {
    let per = devices.div_ceil(o.publishers);
    (0..o.publishers)
        .filter(|p| p * per < devices)
        .map(|p| {
            let sim = SimConfig {
                broker: broker.to_string(),
                devices: per.min(devices - p * per),
                rate,
                count,
                seconds: secs,
                format: o.format,
                metrics: o.metrics,
                pack: o.pack,
                step_ms: Some(1),
                live_time: true,
                device_prefix: format!("e2e-{tag}{p}-"),
                client_id: format!("e2e-{tag}{p}"),
                seed: p as u64 + 1,
                ..SimConfig::default()
            };
            tokio::spawn(async move { firmware_sim::run(&sim, CancellationToken::new()).await })
        })
        .collect()
}

/// The burst: every message encoded before the clock starts (so the
/// publishers cost the machine nothing while it runs), then published by
/// `o.publishers` connections with QoS 1 as fast as the broker acknowledges.
/// Devices are interleaved round by round, as live devices would be.
/// Returns the encoded messages' readings and when publishing started.
async fn burst(o: &Options, port: u16, prefix: &str) -> Result<(u64, Instant)> {
    // Samples 10 ms apart (a 100 Hz sensor), ending now: the readings of a
    // series span more than the reorder lateness, so analytics releases
    // them as they come instead of holding a whole series at once.
    let step_ms = 10;
    let sim = SimConfig {
        devices: o.devices,
        metrics: o.metrics,
        pack: o.pack,
        step_ms: Some(step_ms),
        ..SimConfig::default()
    };
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - o.samples_per_device() as i64 * step_ms;
    let mut queues: Vec<Vec<(String, bytes::Bytes)>> = vec![Vec::new(); o.publishers];
    let mut readings = 0u64;
    let rounds = o.samples_per_device() / o.pack as u64;
    let topics: Vec<String> = (0..o.devices)
        .map(|d| firmware_sim::topic_of(&sim, &firmware_sim::device_id(prefix, d)))
        .collect();
    for round in 0..rounds {
        for (d, topic) in topics.iter().enumerate() {
            let first = round * o.pack as u64;
            let samples: Vec<edge_payload::Sample> = (first..first + o.pack as u64)
                .map(|i| firmware_sim::sample(&sim, start_ms, d, i))
                .collect();
            readings += samples.iter().map(|s| s.metrics.len() as u64).sum::<u64>();
            let payload =
                edge_payload::encode(o.format, round + 1, &samples, &firmware_sim::unit_of)
                    .unwrap_or_else(|e| panic!("{e}"));
            queues[d % o.publishers].push((topic.clone(), payload.into()));
        }
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (p, queue) in queues.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
            let mut options = MqttOptions::new(format!("e2e-burst-{p}"), "127.0.0.1", port);
            options
                .set_keep_alive(Duration::from_secs(30))
                .set_max_packet_size(16 << 20, 16 << 20)
                .set_inflight(1000);
            let (client, mut eventloop) = AsyncClient::new(options, 1000);
            let total = queue.len();
            let acks = tokio::spawn(async move {
                let mut acked = 0;
                while acked < total {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                        Ok(_) => {}
                        Err(e) => return Err(anyhow!("burst publisher {p}: {e}")),
                    }
                }
                anyhow::Ok(())
            });
            for (topic, payload) in queue {
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await?;
            }
            acks.await??;
            let _ = client.disconnect().await;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((readings, started))
}

/// What was seen while waiting for the committed counter.
#[derive(Default)]
struct Watch {
    /// Seconds since the phase started, when `target` was reached.
    done_secs: f64,
    peak_rss_mb: f64,
    /// (seconds, RSS MiB) every `every` seconds.
    curve: Vec<(f64, f64)>,
}

/// Polls the gateway every 10 ms until `target` readings are committed.
async fn watch(
    gw: &GatewayProcess,
    started: Instant,
    target: u64,
    timeout: Duration,
    every: f64,
) -> Result<Watch> {
    let mut w = Watch::default();
    let mut next_point = 0.0;
    loop {
        let committed = gw.committed().await?;
        let (rss, _) = gw.rss_mb();
        w.peak_rss_mb = w.peak_rss_mb.max(rss);
        let t = started.elapsed().as_secs_f64();
        if t >= next_point {
            w.curve.push((t, rss));
            next_point += every;
        }
        if committed >= target {
            w.done_secs = t;
            return Ok(w);
        }
        if started.elapsed() > timeout {
            bail!("only {committed} of {target} readings committed after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the soak measured.
#[derive(Default)]
struct Soak {
    /// The rate asked for.
    rate: f64,
    /// Readings published over the time publishing took.
    published_per_s: f64,
    /// Readings published over the time until the last one committed.
    committed_per_s: f64,
    /// How long commits went on after publishing ended: near 0 when the
    /// gateway and the database kept up.
    drain_secs: f64,
    /// Least-squares slope of RSS over time, from `after` seconds on.
    slope_mb_per_min: f64,
}

/// The least-squares slope (MiB/s) of the `(seconds, MiB)` points from
/// `after` on; 0 with fewer than two.
fn rss_slope(curve: &[(f64, f64)], after: f64) -> f64 {
    let points: Vec<_> = curve.iter().filter(|(t, _)| *t >= after).collect();
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_r = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_r)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    if var > 0.0 {
        cov / var
    } else {
        0.0
    }
}

async fn published(
    tasks: Vec<tokio::task::JoinHandle<Result<firmware_sim::Summary, firmware_sim::SimError>>>,
) -> Result<u64> {
    let mut n = 0;
    for t in tasks {
        n += t.await?.map_err(|e| anyhow!("publisher: {e}"))?.readings;
    }
    Ok(n)
}

/// What the drain of a queued backlog measured, from the gateway's start.
#[derive(Default)]
struct Drain {
    queued: u64,
    secs: f64,
    /// Whole-process CPU seconds of the gateway, start-up included.
    gateway_cpu: f64,
    /// CPU seconds of the database server's process tree meanwhile.
    db_cpu: f64,
    /// CPU seconds of the backends serving the gateway: its transactions
    /// alone, without autovacuum (which the drain's commits let run, and
    /// the raw COPY's one transaction does not) or the checkpointer.
    db_backends_cpu: f64,
    broker_cpu: f64,
    peak_rss_mb: f64,
}

impl Drain {
    fn readings_per_s(&self) -> f64 {
        self.queued as f64 / self.secs.max(1e-9)
    }

    /// `cpu` seconds over the readings drained, in µs a reading.
    fn us(&self, cpu: f64) -> f64 {
        us_per_reading(cpu, self.queued)
    }
}

/// `cpu` seconds over `readings`, in µs a reading.
fn us_per_reading(cpu: f64, readings: u64) -> f64 {
    cpu / readings.max(1) as f64 * 1e6
}

/// Rounded to three decimals, for the JSON line.
fn milli(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Each run's readings/s, space-separated.
fn joined(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `perf record` of the whole machine (every process, call graphs) into
/// `file`, when one is given; stopped with SIGINT so it writes its file.
fn profile(file: &Option<PathBuf>) -> Result<Option<Child>> {
    let Some(file) = file else { return Ok(None) };
    let child = Command::new("perf")
        .args(["record", "-a", "-g", "-F", "499", "-o"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start perf (Debian: apt-get install linux-perf)")?;
    Ok(Some(child))
}

/// The backlog drained by a peer consumer instead of the gateway: a
/// durable session for it, the backlog queued, then the peer started and
/// timed to its exit. `gateway_cpu` holds the peer's CPU; its peak RSS is
/// not measured.
async fn peer_drain(
    o: &Options,
    peer: &str,
    broker: &Mosquitto,
    database_url: &str,
    db_cpu: &dyn Fn() -> f64,
) -> Result<Drain> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let client_id = "e2e-peer";
    let topic = "devices/+/telemetry";
    let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
    options.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
            break;
        }
    }
    client.disconnect().await?;
    let _ = eventloop.poll().await;
    eprintln!(
        "e2e: peer drain: queueing {} readings ...",
        o.total_readings()
    );
    let (queued, _) = burst(o, broker.port(), "e2e-q-").await?;
    let db0 = db_cpu();
    // The peer's CPU, once it has exited and been reaped, is in this
    // process's children's time (its own children's with it).
    let me = std::process::id();
    let reaped0 = probe::reaped_cpu_secs(me);
    let started = Instant::now();
    let mut child = Command::new("sh")
        .args(["-c", peer])
        .env("PEER_MQTT_HOST", "127.0.0.1")
        .env("PEER_MQTT_PORT", broker.port().to_string())
        .env("PEER_CLIENT_ID", client_id)
        .env("PEER_TOPIC", topic)
        .env("PEER_DATABASE_URL", database_url)
        .env("PEER_EXPECT", queued.to_string())
        .spawn()
        .context("start the peer")?;
    eprintln!("e2e: peer drain: {peer} started ...");
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            let _ = child.kill();
            bail!("the peer did not finish within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("the peer failed: {status}");
    }
    Ok(Drain {
        queued,
        secs,
        gateway_cpu: probe::reaped_cpu_secs(me) - reaped0,
        db_cpu: db_cpu() - db0,
        // Its backend exits with it, before it could be read.
        db_backends_cpu: 0.0,
        broker_cpu: 0.0,
        peak_rss_mb: 0.0,
    })
}

/// Starts `edge-gateway run` and waits until it is ready (`/readyz`);
/// its log is appended to `dir/gateway.log`.
async fn start_gateway(
    gateway: &std::path::Path,
    config: &std::path::Path,
    dir: &std::path::Path,
    port: u16,
) -> Result<GatewayProcess> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("gateway.log"))?;
    let child = Command::new(gateway)
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start the gateway")?;
    let gw = GatewayProcess { child, port };
    let ready_by = Instant::now() + Duration::from_secs(60);
    while !matches!(probe::http_get(port, "/readyz"), Some((200, _))) {
        if Instant::now() > ready_by {
            bail!("gateway not ready within 60 s; see its log");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(gw)
}

/// What the live phases (burst, paced, soak) measured.
#[derive(Default)]
struct Live {
    /// Burst readings/s, first publish to last commit.
    rate: f64,
    publish_secs: f64,
    burst_cpu: f64,
    machine_busy: f64,
    paced_achieved: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    burst_published: u64,
    paced_published: u64,
    soak_curve: Vec<(f64, f64)>,
    soak_published: u64,
    soak: Soak,
}

/// Burst, then paced at half the burst rate, then the soak if asked for,
/// all with the gateway running.
async fn live_phases(
    o: &Options,
    gw: &GatewayProcess,
    broker: &Mosquitto,
    client: &tokio_postgres::Client,
) -> Result<Live> {
    let total = o.total_readings();
    // Burst.
    eprintln!("e2e: burst: publishing {total} readings as fast as the broker accepts ...");
    let latency = "edge_gateway_reading_to_commit_seconds";
    // After a drain the counter starts at what the drain committed.
    let before_burst = gw.committed().await?;
    let cpu0 = gw.cpu_secs();
    let machine0 = machine_jiffies();
    // Timed from the first publish (after encoding) to the last commit.
    let (burst_published, started) = burst(o, broker.port(), "e2e-b-").await?;
    let publish_secs = started.elapsed().as_secs_f64();
    let burst = watch(
        gw,
        started,
        before_burst + total,
        Duration::from_secs(300),
        1.0,
    )
    .await?;
    let burst_cpu = gw.cpu_secs() - cpu0;
    let machine1 = machine_jiffies();
    let machine_busy =
        (machine1.0 - machine0.0) as f64 / (machine1.1 - machine0.1).max(1) as f64 * 100.0;
    let after = probe::buckets(&gw.metrics().await?, latency);
    let rate = total as f64 / burst.done_secs;
    if burst_published != total {
        bail!("published {burst_published} readings, expected {total}");
    }

    // Paced at half the burst rate.
    let paced_rate = rate / 2.0;
    let per_device = paced_rate / (o.devices * o.metrics) as f64;
    eprintln!(
        "e2e: paced: {paced_rate:.0} readings/s ({per_device:.1} samples/s a device) for {} s ...",
        o.paced_secs
    );
    let before = after;
    let started = Instant::now();
    let committed0 = gw.committed().await?;
    let tasks = publishers(
        o,
        &broker.url(),
        o.devices,
        per_device,
        None,
        Some(o.paced_secs),
        "p",
    );
    // Each second: readings committed and the latency quantiles of that
    // second, which show stalls that one p99 hides.
    let mut last = before.clone();
    let mut last_copy = probe::buckets(&gw.metrics().await?, "edge_gateway_copy_seconds");
    let mut last_committed = committed0;
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let text = gw.metrics().await?;
        let now = probe::buckets(&text, latency);
        let copy = probe::buckets(&text, "edge_gateway_copy_seconds");
        let committed = counter(&text, "edge_gateway_readings_committed_total") as u64;
        let ms = |q| probe::quantile_ms(&last, &now, q).map_or("-".into(), |v| format!("{v:.0}"));
        let row = client
            .query_one(
                "SELECT (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter), \
                 (SELECT coalesce(string_agg(query, ', '), '') FROM pg_stat_activity \
                  WHERE backend_type = 'autovacuum worker')",
                &[],
            )
            .await?;
        let checkpoints: i64 = row.get(0);
        let autovacuum: String = row.get(1);
        eprintln!(
            "e2e: paced {:>4.0} s  {:>8} readings/s  p50 {:>6} ms  p99 {:>6} ms  COPY p99 {:>6} ms  checkpoints {checkpoints} {autovacuum}",
            started.elapsed().as_secs_f64(),
            committed - last_committed,
            ms(0.5),
            ms(0.99),
            probe::quantile_ms(&last_copy, &copy, 0.99).map_or("-".into(), |v| format!("{v:.0}")),
        );
        last_copy = copy;
        last = now;
        last_committed = committed;
    }
    let paced_published = published(tasks).await?;
    watch(
        gw,
        started,
        committed0 + paced_published,
        Duration::from_secs(120),
        1.0,
    )
    .await?;
    let paced_achieved = paced_published as f64 / o.paced_secs;
    let after = probe::buckets(&gw.metrics().await?, latency);
    let p50 = probe::quantile_ms(&before, &after, 0.5);
    let p99 = probe::quantile_ms(&before, &after, 0.99);

    // Soak: many devices at 80% of the burst rate, RSS over time.
    let mut soak_curve = Vec::new();
    let mut soak_published = 0;
    let mut soak = Soak::default();
    if o.soak_secs > 0.0 {
        let soak_rate = if o.soak_rate > 0.0 {
            o.soak_rate
        } else {
            0.8 * rate
        };
        let per_device = soak_rate / (o.soak_devices * o.metrics) as f64;
        eprintln!(
            "e2e: soak: {} devices, {soak_rate:.0} readings/s for {} s ...",
            o.soak_devices, o.soak_secs
        );
        let committed0 = gw.committed().await?;
        let started = Instant::now();
        let tasks = publishers(
            o,
            &broker.url(),
            o.soak_devices,
            per_device,
            None,
            Some(o.soak_secs),
            "s",
        );
        let mut next = 0.0;
        let mut previous = 0;
        while !tasks.iter().all(|t| t.is_finished()) {
            let t = started.elapsed().as_secs_f64();
            if t >= next {
                let (rss, _) = gw.rss_mb();
                let committed = gw.committed().await? - committed0;
                eprintln!(
                    "e2e: soak {t:>5.0} s  rss {rss:>7.1} MiB  committed {committed:>10}  ({:.0}/s)",
                    (committed - previous) as f64 / 10.0
                );
                previous = committed;
                soak_curve.push((t, rss));
                next += 10.0;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        soak_published = published(tasks).await?;
        let published_secs = started.elapsed().as_secs_f64();
        let w = watch(
            gw,
            started,
            committed0 + soak_published,
            Duration::from_secs_f64(o.soak_secs * 3.0 + 120.0),
            10.0,
        )
        .await?;
        soak = Soak {
            rate: soak_rate,
            published_per_s: soak_published as f64 / published_secs,
            committed_per_s: soak_published as f64 / w.done_secs,
            drain_secs: w.done_secs - published_secs,
            slope_mb_per_min: rss_slope(&soak_curve, 60.0) * 60.0,
        };
    }

    Ok(Live {
        rate,
        publish_secs,
        burst_cpu,
        machine_busy,
        paced_achieved,
        p50,
        p99,
        burst_published,
        paced_published,
        soak_curve,
        soak_published,
        soak,
    })
}

/// Runs the benchmark; Ctrl-C or SIGTERM stops it and still removes the
/// servers and the gateway it started (their `Drop`s run as `run` is
/// dropped).
/// The database under test: one PostgreSQL, or a Citus cluster reached
/// through its coordinator.
enum Database {
    Plain(LocalPostgres),
    Citus(LocalCitus),
}

impl Database {
    fn url(&self) -> String {
        match self {
            Database::Plain(pg) => pg.url(),
            Database::Citus(c) => c.url(),
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = Options::from_env()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = run(o) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; servers and gateway stopped"),
        _ = term.recv() => bail!("terminated; servers and gateway stopped"),
    }
}

async fn run(o: Options) -> Result<()> {
    let total = o.total_readings();
    eprintln!(
        "e2e: {} readings = {} devices x {} samples x {} metrics, {} readings a message ({}), {} publishers, index {}",
        total,
        o.devices,
        o.samples_per_device(),
        o.metrics,
        o.pack * o.metrics,
        o.format.name(),
        o.publishers,
        if o.index { "on" } else { "off" }
    );
    let writeback = host_writeback();
    eprintln!("e2e: host writeback: {writeback}");
    let mut settings = o.pg_settings.clone();
    if o.statements {
        settings.push_str(";shared_preload_libraries=pg_stat_statements");
    }
    let workers = o.citus;
    let pg = tokio::task::spawn_blocking(move || -> Result<Database> {
        let settings = lines(&settings);
        Ok(if workers == 0 {
            Database::Plain(LocalPostgres::start_with(&settings)?)
        } else {
            Database::Citus(LocalCitus::start(workers, &settings)?)
        })
    })
    .await??;
    if o.citus > 0 {
        eprintln!(
            "e2e: Citus: a coordinator and {} workers on this host",
            o.citus
        );
    }
    let overrides = o.mosquitto.clone();
    let broker =
        tokio::task::spawn_blocking(move || Mosquitto::start_with(&lines(&overrides))).await??;
    let dir = tempfile::Builder::new().prefix("edge-e2e-").tempdir()?;
    let http_port = free_port()?;
    let http = format!("127.0.0.1:{http_port}");
    let config_path = dir.path().join("gateway.toml");
    let config_text = format!(
        "[mqtt]\nurl = \"{}\"\nclient_id = \"e2e-gateway\"\n\
         [database]\nurl = \"{}\"\n\
         [spool]\ndir = \"{}\"\n\
         [http]\naddr = \"{http}\"\n\
         [pipeline]\nsummary_interval_secs = 0\n\
         [analytics]\nenabled = true\n\
         [[rules]]\nname = \"hot\"\nkind = \"above\"\nmetric = \"temperature\"\nthreshold = 80.0\nclear = 75.0\nfor_secs = 5.0\n\
         [[rules]]\nname = \"odd\"\nkind = \"anomaly\"\nmetric = \"*\"\nthreshold = 0.99\n",
        broker.url(),
        pg.url(),
        dir.path().join("spool").display(),
    );
    let mut table: toml::Table = config_text.parse()?;
    let extra: toml::Table = o
        .extra_toml
        .parse()
        .context("E2E_GATEWAY_TOML is not TOML")?;
    merge(&mut table, extra);
    std::fs::write(&config_path, toml::to_string(&table)?)?;
    let config = edge_gateway::config::Config::load(Some(&config_path))
        .map_err(|e| anyhow!("generated config: {e}"))?;
    let db = edge_gateway::sink::connection::pg_config(&config.database.url)
        .map_err(|e| anyhow!("{e}"))?;
    let (writers, batch_rows) = (config.database.writers, config.database.batch_rows);

    let status = Command::new(&o.gateway)
        .args(["migrate", "--config"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("edge-gateway migrate failed");
    }
    let (client, connection) = db.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    if !o.index {
        client
            .batch_execute("DROP INDEX IF EXISTS edge.readings_device_time_idx")
            .await?;
    }
    let indexes: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'edge' AND tablename = 'readings'",
            &[],
        )
        .await?
        .get(0);

    let db_pid = match &pg {
        Database::Plain(pg) => pg.pid(),
        Database::Citus(_) => None,
    };
    let db_cpu = || db_pid.map_or(0.0, probe::tree_cpu_secs);
    let broker_cpu = || broker.pid().map_or(0.0, probe::tree_cpu_secs);

    // Twice each: the first load into a fresh cluster also creates its WAL
    // segments, which later loads (and the gateway's) recycle.
    let mut ceiling_runs = Vec::new();
    let mut single_runs = Vec::new();
    let mut single_db_cpu = f64::MAX;
    let mut single_backend_cpu = f64::MAX;
    for run in 1..=2 {
        eprintln!("e2e: ceiling {run}/2: raw binary COPY over {writers} connections ...");
        ceiling_runs.push(ceiling(&db, &o, writers, batch_rows, false).await?.0);
        client.batch_execute("TRUNCATE edge.readings").await?;
        client.batch_execute("CHECKPOINT").await?;
        eprintln!("e2e: ceiling {run}/2: one raw binary COPY of every row ...");
        let cpu0 = db_cpu();
        let (rate, backend_cpu) = ceiling(&db, &o, 1, batch_rows, true).await?;
        single_runs.push(rate);
        single_db_cpu = single_db_cpu.min(db_cpu() - cpu0);
        single_backend_cpu = single_backend_cpu.min(backend_cpu);
        client.batch_execute("TRUNCATE edge.readings").await?;
        client.batch_execute("CHECKPOINT").await?;
    }
    let ceiling_rate = ceiling_runs.iter().copied().fold(0.0, f64::max);
    let single_rate = single_runs.iter().copied().fold(0.0, f64::max);
    let single_db_us = us_per_reading(single_db_cpu, o.total_readings());
    let single_backend_us = us_per_reading(single_backend_cpu, o.total_readings());

    if let Some(peer) = &o.peer {
        let drain = peer_drain(&o, peer, &broker, &pg.url(), &db_cpu).await?;
        let stored: i64 = client
            .query_one("SELECT count(*) FROM edge.readings", &[])
            .await?
            .get(0);
        if stored as u64 != drain.queued {
            bail!("the peer stored {stored} readings of {}", drain.queued);
        }
        let rate = drain.readings_per_s();
        println!(
            "\npeer consumer ({peer}), {} readings queued, {indexes} index(es)\n  \
             drain (r/s) {rate:.0}   one raw COPY (r/s) {single_rate:.0}   ratio {:.3}\n  \
             CPU us/reading: peer {:.3}, database {:.3} (raw COPY {single_db_us:.3})",
            drain.queued,
            rate / single_rate,
            drain.us(drain.gateway_cpu),
            drain.us(drain.db_cpu),
        );
        let json = serde_json::json!({
            "peer": peer,
            "format": o.format.name(),
            "indexes": indexes,
            "drain_readings": drain.queued,
            "drain_readings_per_s": rate.round(),
            "single_copy_readings_per_s": single_rate.round(),
            "drain_ratio": milli(rate / single_rate),
            "drain_peer_cpu_us": milli(drain.us(drain.gateway_cpu)),
            "drain_db_cpu_us": milli(drain.us(drain.db_cpu)),
            "single_copy_db_cpu_us": milli(single_db_us),
        });
        println!("{json}");
        return Ok(());
    }

    let start = || start_gateway(&o.gateway, &config_path, dir.path(), http_port);
    let drain = if o.drain {
        // A first start makes the durable session the backlog queues in.
        start().await?.terminate()?;
        eprintln!("e2e: drain: queueing {total} readings in the broker, gateway stopped ...");
        let (queued, _) = burst(&o, broker.port(), "e2e-q-").await?;
        client.batch_execute("CHECKPOINT").await?;
        if o.statements {
            client
                .batch_execute(
                    "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; \
                     SELECT pg_stat_statements_reset()",
                )
                .await?;
        }
        let (db0, broker0) = (db_cpu(), broker_cpu());
        let others = client_backends(&client).await?;
        let started = Instant::now();
        let gw = start().await?;
        eprintln!("e2e: drain: gateway started, draining ...");
        let perf = profile(&o.perf)?;
        let w = watch(&gw, started, queued, Duration::from_secs(600), 1.0).await?;
        // Every backend the gateway opened came after `started`: their
        // whole CPU is the drain's (one that closed meanwhile, such as the
        // start-up restore, is left out: a few milliseconds).
        let mut gateway_backends = client_backends(&client).await?;
        gateway_backends.retain(|pid| !others.contains(pid));
        let db_backends_cpu = backend_cpu_secs(&gateway_backends);
        if let Some(mut perf) = perf {
            probe::interrupt(&mut perf, Duration::from_secs(60));
        }
        if o.statements {
            for row in client
                .query(
                    "SELECT calls, round(total_exec_time::numeric, 1)::float8, \
                     left(regexp_replace(query, '\\s+', ' ', 'g'), 110) \
                     FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15",
                    &[],
                )
                .await?
            {
                let (calls, ms, query): (i64, f64, String) = (row.get(0), row.get(1), row.get(2));
                eprintln!("e2e: statements {calls:>7} calls {ms:>9.1} ms  {query}");
            }
        }
        let drain = Drain {
            queued,
            secs: w.done_secs,
            gateway_cpu: gw.cpu_secs(),
            db_cpu: db_cpu() - db0,
            db_backends_cpu,
            broker_cpu: broker_cpu() - broker0,
            peak_rss_mb: gw.rss_mb().1,
        };
        (drain, gw)
    } else {
        (Drain::default(), start().await?)
    };
    let (drain, gw) = drain;

    let live = if o.live {
        live_phases(&o, &gw, &broker, &client).await?
    } else {
        Live::default()
    };
    let Live {
        rate,
        publish_secs,
        burst_cpu,
        machine_busy,
        paced_achieved,
        p50,
        p99,
        burst_published,
        paced_published,
        soak_curve,
        soak_published,
        soak,
    } = live;

    let (_, peak_rss) = gw.rss_mb();
    let text = gw.metrics().await?;
    let series = counter(&text, "edge_gateway_analytics_series");
    let per_series = counter(&text, "edge_gateway_analytics_state_bytes") / series.max(1.0);
    let held_per_series = counter(&text, "edge_gateway_analytics_held_bytes") / series.max(1.0);
    let total_cpu = gw.cpu_secs();
    gw.terminate()?;
    let stored: i64 = client
        .query_one("SELECT count(*) FROM edge.readings", &[])
        .await?
        .get(0);
    let expected = drain.queued + burst_published + paced_published + soak_published;
    if stored as u64 != expected {
        bail!("the table holds {stored} readings, {expected} were published");
    }
    drop(client);
    drop(broker);
    drop(pg);

    let ratio = rate / ceiling_rate;
    let cpu_us = us_per_reading(burst_cpu, total);
    let fmt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
    let mut rows: Vec<(&str, String)> = vec![
        (
            "raw COPY ceiling, best of 2 (readings/s)",
            format!("{ceiling_rate:.0}"),
        ),
        ("  each run", joined(&ceiling_runs)),
        (
            "gateway, first publish to last commit (r/s)",
            format!("{rate:.0}"),
        ),
        ("ratio gateway / ceiling", format!("{ratio:.3}")),
        ("burst: publishing took (s)", format!("{publish_secs:.2}")),
        ("paced: readings/s", format!("{paced_achieved:.0}")),
        (
            "paced: p50 / p99 publish-to-commit (ms)",
            format!("{} / {}", fmt(p50), fmt(p99)),
        ),
        ("gateway peak RSS (MiB)", format!("{peak_rss:.1}")),
        ("analytics series", format!("{series:.0}")),
        (
            "analytics state per series (bytes)",
            format!("{per_series:.0}"),
        ),
        (
            "readings held for reordering, per series (bytes)",
            format!("{held_per_series:.0}"),
        ),
        ("gateway CPU in burst (s)", format!("{burst_cpu:.2}")),
        (
            "gateway CPU per reading, whole process (us)",
            format!("{cpu_us:.3}"),
        ),
        (
            "machine CPU busy in burst (%)",
            format!("{machine_busy:.0}"),
        ),
        ("gateway CPU, whole run (s)", format!("{total_cpu:.2}")),
        ("readings stored = published", expected.to_string()),
    ];
    let drain_rate = drain.readings_per_s();
    let drain_ratio = drain_rate / single_rate;
    let (drain_gw_us, drain_db_us, drain_backends_us, drain_broker_us) = (
        drain.us(drain.gateway_cpu),
        drain.us(drain.db_cpu),
        drain.us(drain.db_backends_cpu),
        drain.us(drain.broker_cpu),
    );
    if o.drain {
        rows.splice(
            0..0,
            [
                (
                    "one raw COPY of every row, best of 2 (r/s)",
                    format!("{single_rate:.0}"),
                ),
                ("  each run", joined(&single_runs)),
                (
                    "drain: gateway start to last commit (r/s)",
                    format!("{drain_rate:.0}"),
                ),
                ("drain: ratio to one raw COPY", format!("{drain_ratio:.3}")),
                ("drain: CPU us/reading gateway", format!("{drain_gw_us:.3}")),
                (
                    "drain: CPU us/reading database (raw COPY)",
                    format!("{drain_db_us:.3} ({single_db_us:.3})"),
                ),
                (
                    "drain: CPU us/reading, its backends (raw COPY's)",
                    format!("{drain_backends_us:.3} ({single_backend_us:.3})"),
                ),
                (
                    "drain: CPU us/reading broker",
                    format!("{drain_broker_us:.3}"),
                ),
                (
                    "drain: gateway peak RSS (MiB)",
                    format!("{:.1}", drain.peak_rss_mb),
                ),
            ],
        );
    }
    let curve = soak_curve
        .iter()
        .map(|(t, r)| format!("{t:.0}:{r:.1}"))
        .collect::<Vec<_>>()
        .join(" ");
    if !curve.is_empty() {
        rows.extend([
            ("soak: target readings/s", format!("{:.0}", soak.rate)),
            (
                "soak: published / committed readings/s",
                format!("{:.0} / {:.0}", soak.published_per_s, soak.committed_per_s),
            ),
            (
                "soak: commits done after publishing (s)",
                format!("{:.1}", soak.drain_secs),
            ),
            (
                "soak: RSS trend after 60 s (MiB/min)",
                format!("{:.2}", soak.slope_mb_per_min),
            ),
            ("soak RSS (s:MiB)", curve),
        ]);
    }
    let mut table = format!(
        "\nedge-gateway end to end ({} readings a message, {indexes} index(es), {writers} writers, analytics on)\n",
        o.pack * o.metrics
    );
    for (name, value) in rows {
        let _ = writeln!(table, "  {name:<44} {value:>14}");
    }
    println!("{table}");
    let json = serde_json::json!({
        "readings": total,
        "drain_readings": drain.queued,
        "drain_readings_per_s": drain_rate.round(),
        "single_copy_readings_per_s": single_rate.round(),
        "single_copy_runs": single_runs.iter().map(|r| r.round()).collect::<Vec<_>>(),
        "drain_ratio": milli(drain_ratio),
        "drain_gateway_cpu_us": milli(drain_gw_us),
        "drain_db_cpu_us": milli(drain_db_us),
        "single_copy_db_cpu_us": milli(single_db_us),
        "drain_db_backends_cpu_us": milli(drain_backends_us),
        "single_copy_backend_cpu_us": milli(single_backend_us),
        "drain_broker_cpu_us": milli(drain_broker_us),
        "drain_peak_rss_mb": (drain.peak_rss_mb * 10.0).round() / 10.0,
        "citus_workers": o.citus,
        "devices": o.devices,
        "readings_per_message": o.pack * o.metrics,
        "format": o.format.name(),
        "indexes": indexes,
        "writers": writers,
        "host_writeback": writeback,
        "readings_per_s": rate.round(),
        "ceiling_readings_per_s": ceiling_rate.round(),
        "ceiling_runs": ceiling_runs.iter().map(|r| r.round()).collect::<Vec<_>>(),
        "ratio": milli(ratio),
        "p50_ms": p50.map(|v| (v * 10.0).round() / 10.0),
        "p99_ms": p99.map(|v| (v * 10.0).round() / 10.0),
        "paced_readings_per_s": paced_achieved.round(),
        "peak_rss_mb": (peak_rss * 10.0).round() / 10.0,
        "analytics_series": series,
        "analytics_bytes_per_series": per_series.round(),
        "analytics_held_bytes_per_series": held_per_series.round(),
        "burst_cpu_s": (burst_cpu * 100.0).round() / 100.0,
        "cpu_us_per_reading": milli(cpu_us),
        "machine_busy_pct": machine_busy.round(),
        "soak_rate": soak.rate.round(),
        "soak_published_per_s": soak.published_per_s.round(),
        "soak_committed_per_s": soak.committed_per_s.round(),
        "soak_drain_s": (soak.drain_secs * 10.0).round() / 10.0,
        "soak_rss_slope_mb_per_min": (soak.slope_mb_per_min * 100.0).round() / 100.0,
        "soak_rss_mb": soak_curve.iter().map(|(t, r)| [t.round(), (r * 10.0).round() / 10.0]).collect::<Vec<_>>(),
    });
    println!("{json}");
    Ok(())
}
