//! Shared helpers for the black-box tests: the real `edge-gateway` binary
//! as a subprocess, configured by a file like an operator would, against a
//! throwaway PostgreSQL and a real broker started by the project itself.

#![allow(dead_code)]
// Test helpers: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_gateway::local::{free_port, probe};
use edge_payload::Format;
use firmware_sim::AnomalyKind;
use firmware_sim::{ExpectedReading, SimConfig};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// A gateway process with its own config file, spool and client id, which
/// stay the same across restarts (like a real deployment).
pub struct Gateway {
    child: Option<Child>,
    pub http_port: u16,
    dir: tempfile::TempDir,
    config: PathBuf,
    /// The test defaults `extra` tables are merged over.
    base: String,
    /// Log lines of processes run before the current one.
    earlier_logs: String,
}

impl Gateway {
    /// Writes a config file (the test defaults with the tables of `extra`
    /// merged over them), starts the gateway, and returns once `/readyz`
    /// answers 200.
    pub fn start(mqtt_url: &str, database_url: &str, extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir for the gateway");
        let http_port = free_port().expect("free port");
        let spool = dir.path().join("spool");
        let base = format!(
            "[mqtt]\nurl = \"{mqtt_url}\"\nclient_id = \"gw-{http_port}\"\n\
             [database]\nurl = \"{database_url}\"\nflush_interval_ms = 50\nretry_min_ms = 50\n\
             [spool]\ndir = \"{}\"\n\
             [http]\naddr = \"127.0.0.1:{http_port}\"\n",
            spool.display()
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, merge_toml(&base, extra)).expect("write gateway.toml");
        let mut gw = Gateway {
            child: None,
            http_port,
            dir,
            config: path,
            base,
            earlier_logs: String::new(),
        };
        gw.spawn();
        gw
    }

    /// Starts the process (again) and waits until it is ready.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log_path = self.dir.path().join("gateway.log");
        self.earlier_logs
            .push_str(&std::fs::read_to_string(&log_path).unwrap_or_default());
        let log = std::fs::File::create(&log_path).expect("gateway log");
        let child = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,rumqttd=off")
            .env_remove(edge_gateway::config::ENV_MQTT_URL)
            .env_remove(edge_gateway::config::ENV_DATABASE_URL)
            .env_remove(edge_gateway::config::ENV_HTTP_ADDR)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn edge-gateway");
        self.child = Some(child);
        let ready = eventually_blocking(Duration::from_secs(60), || {
            if self.exited() {
                return Some(false);
            }
            (http_get(self.http_port, "/readyz").map(|(s, _)| s) == Some(200)).then_some(true)
        });
        if ready != Some(true) {
            panic!("gateway not ready within 60 s; log:\n{}", self.log());
        }
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// The logs of every process so far.
    pub fn log(&self) -> String {
        let current =
            std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default();
        format!("{}{current}", self.earlier_logs)
    }

    /// Rewrites the config file with other `extra` tables (the process
    /// sees it at its next start or SIGHUP).
    pub fn rewrite_config(&self, extra: &str) {
        std::fs::write(&self.config, merge_toml(&self.base, extra)).expect("rewrite gateway.toml");
    }

    /// Writes `text` as the config file as it is (to test refusals).
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write gateway.toml");
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the running process.
    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status();
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        !self.exited()
    }

    /// The spool directory.
    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// One counter or gauge value from `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        probe::metric(&self.metrics(), name)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        probe::process(self.pid()?).map(|f| f.peak_rss_kib)
    }

    /// Waits up to `timeout` for the process to exit; its exit code (None
    /// when it is still running or died by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let status = probe::wait_exit(self.child.as_mut()?, timeout)?;
        self.child = None;
        status.code()
    }

    /// Kills the process with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `within` for the exit; returns whether
    /// it exited successfully in time.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        probe::terminate(&mut child, within).is_some_and(|s| s.success())
    }

    /// SIGTERM with a generous deadline.
    pub fn stop(&mut self) -> bool {
        self.terminate(Duration::from_secs(40))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `base` TOML with the tables of `extra` merged over it, as TOML text.
fn merge_toml(base: &str, extra: &str) -> String {
    let mut config: toml::Table = toml::from_str(base).expect("base config");
    let extra: toml::Table = toml::from_str(extra).expect("extra config is TOML");
    for (name, table) in extra {
        match (config.get_mut(&name), table) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => into.extend(from),
            (_, value) => {
                config.insert(name, value);
            }
        }
    }
    toml::to_string(&config).expect("render config")
}

pub use edge_gateway::local::probe::http_get;

/// How often [`eventually`] looks.
const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it gives a value or `within` has passed (`None`
/// then). The one way the tests wait for something they can observe.
pub async fn eventually<T>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for code outside the runtime (the process helpers).
pub use edge_gateway::local::probe::poll as eventually_blocking;

/// Connects to PostgreSQL.
pub async fn db(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(conn);
    client
}

/// Polls `sql` (a single bigint) until it reaches `want` or `timeout` passes;
/// returns the last value.
pub async fn wait_for_count(client: &Client, sql: &str, want: i64, timeout: Duration) -> i64 {
    let count = async || {
        client
            .query_one(sql, &[])
            .await
            .map_or(-1, |r| r.get::<_, i64>(0))
    };
    match eventually(timeout, async || Some(count().await).filter(|n| *n >= want)).await {
        Some(n) => n,
        None => count().await,
    }
}

/// Waits until the gateway's counter or gauge `name` reaches `at_least`;
/// fails the test, with the gateway's log, when it does not within `within`.
pub async fn wait_metric(gateway: &Gateway, name: &str, at_least: f64, within: Duration) {
    let reached = eventually(within, async || {
        (gateway.metric(name)? >= at_least).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "{name} stayed under {at_least} ({:?}) for {within:?}; log:\n{}",
        gateway.metric(name),
        gateway.log()
    );
}

/// [`wait_metric`] for a counter that must end at exactly `value`: once it
/// is reached, it must not have gone past it; fails with the gateway's log.
pub async fn wait_metric_exactly(gateway: &Gateway, name: &str, value: f64, within: Duration) {
    wait_metric(gateway, name, value, within).await;
    assert_eq!(
        gateway.metric(name),
        Some(value),
        "{name}; log:\n{}",
        gateway.log()
    );
}

/// Waits until every message the gateway received is committed or spooled
/// but `held` (messages a test keeps from committing): a duplicate would be
/// in the tables by then.
pub async fn caught_up(gateway: &Gateway, held: u64) {
    let settled = eventually(Duration::from_secs(60), async || {
        (gateway.metric("edge_gateway_messages_not_durable")? <= held as f64).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "messages left uncommitted; log:\n{}",
        gateway.log()
    );
}

/// Checks that the readings of devices starting with `prefix` are exactly
/// `expected`: each once, with the right device, metric, time and value.
pub async fn assert_exactly(client: &Client, prefix: &str, expected: &[ExpectedReading]) {
    let rows = client
        .query(
            "SELECT device_id, metric, (extract(epoch from time) * 1000000)::bigint, value \
             FROM edge.readings WHERE starts_with(device_id, $1)",
            &[&prefix],
        )
        .await
        .expect("query readings");
    let mut stored: HashMap<(String, String, i64), Vec<Option<f64>>> = HashMap::new();
    for row in &rows {
        stored
            .entry((row.get(0), row.get(1), row.get(2)))
            .or_default()
            .push(row.get(3));
    }
    let mut missing = 0;
    let mut wrong = Vec::new();
    for e in expected {
        match stored.remove(&(e.device.clone(), e.metric.clone(), e.ts_ms * 1000)) {
            None => missing += 1,
            Some(values) if values != vec![Some(e.value)] => wrong.push((e.clone(), values)),
            Some(_) => {}
        }
    }
    assert_eq!(
        missing,
        0,
        "{prefix}: {missing} of {} readings missing",
        expected.len()
    );
    assert!(
        wrong.is_empty(),
        "{prefix}: {} readings duplicated or with wrong values, e.g. {:?}",
        wrong.len(),
        wrong.first()
    );
    assert!(
        stored.is_empty(),
        "{prefix}: {} unexpected rows, e.g. {:?}",
        stored.len(),
        stored.iter().next()
    );
    assert_eq!(rows.len(), expected.len());
}

/// Waits until every reading `config` published has landed, then checks
/// they are exactly the expected ones (see [`assert_exactly`]).
pub async fn assert_landed(client: &Client, gateway: &Gateway, config: &SimConfig) {
    let start_ms = config.start_ms.expect("tests fix start_ms");
    let expected = firmware_sim::expected_readings(config, start_ms);
    let prefix = &config.device_prefix;
    let count =
        format!("SELECT count(*) FROM edge.readings WHERE starts_with(device_id, '{prefix}')");
    let got = wait_for_count(
        client,
        &count,
        expected.len() as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        got,
        expected.len() as i64,
        "{prefix}: gateway log:\n{}",
        gateway.log()
    );
    caught_up(gateway, 0).await;
    assert_exactly(client, prefix, &expected).await;
}

/// A simulator config for `devices` x `count` samples of 2 metrics.
pub fn sim(
    broker: &str,
    format: edge_payload::Format,
    devices: usize,
    count: u64,
    start_ms: i64,
) -> SimConfig {
    SimConfig {
        broker: broker.to_string(),
        devices,
        rate: 0.0,
        count: Some(count),
        format,
        qos: 1,
        seed: 7,
        metrics: 2,
        pack: 1,
        start_ms: Some(start_ms),
        step_ms: Some(1000),
        device_prefix: format!("{}-", format.name()),
        client_id: format!("sim-{}-{}", format.name(), start_ms),
        ..SimConfig::default()
    }
}

/// Runs the simulator in a task; the task panics if the run fails.
pub fn spawn_sim(config: &SimConfig) -> tokio::task::JoinHandle<firmware_sim::Summary> {
    let config = config.clone();
    tokio::spawn(async move {
        firmware_sim::run(&config, CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", config.device_prefix))
    })
}

/// Runs `config` without a sample count until the returned token is
/// cancelled (or 600 s pass).
pub fn spawn_sim_until_stopped(
    config: &SimConfig,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut config = config.clone();
    config.count = None;
    config.seconds = Some(600.0);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            if let Err(e) = firmware_sim::run(&config, stop).await {
                panic!("{}: {e}", config.device_prefix);
            }
        }
    });
    (stop, task)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    edge_gateway::model::now_micros() / 1000
}

/// Path of a binary the tests need, or a panic saying what to install.
pub fn require_binary(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found: install it (Debian: apt-get install {package})")
        })
}

/// `mosquitto_pub` publishing QoS 1 to `topic` on the local broker.
fn mosquitto_pub_to(port: u16, topic: &str) -> Command {
    let mut command = Command::new(require_binary("mosquitto_pub", "mosquitto-clients"));
    command.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
    ]);
    command
}

/// Publishes the file at `path` as one QoS 1 message with `mosquitto_pub -f`.
pub fn mosquitto_pub_file(port: u16, topic: &str, path: &std::path::Path) {
    let status = mosquitto_pub_to(port, topic)
        .arg("-f")
        .arg(path)
        .status()
        .expect("spawn mosquitto_pub");
    assert!(status.success(), "mosquitto_pub -f failed");
}

/// Publishes `lines` (one message each, QoS 1) with `mosquitto_pub -l`, a
/// client that is not ours, pausing `pause` between lines; `args` are extra
/// options (client id, session). Returns once mosquitto_pub has exited.
pub fn mosquitto_pub(port: u16, topic: &str, lines: &[String], pause: Duration, args: &[&str]) {
    use std::io::Write;
    let mut child = mosquitto_pub_to(port, topic)
        .arg("-l")
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn mosquitto_pub");
    if let Some(mut stdin) = child.stdin.take() {
        for line in lines {
            writeln!(stdin, "{line}").expect("write to mosquitto_pub");
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }
    assert!(
        child.wait().expect("mosquitto_pub exit").success(),
        "mosquitto_pub failed"
    );
}

pub const DEVICES: usize = 10;
/// Samples per device; with 2 metrics each, 2,000 readings per device.
pub const SAMPLES: u64 = 1000;

/// Publishes 10 devices x 2,000 readings in each of the four formats at once
/// and checks every reading landed exactly once.
pub async fn four_formats(sim_broker: &str, gateway: &Gateway, db_url: &str) {
    let start_ms = now_ms() - 3_600_000;
    let sims: Vec<_> = Format::ALL
        .into_iter()
        .map(|format| {
            let config = sim(sim_broker, format, DEVICES, SAMPLES, start_ms);
            tokio::spawn(async move {
                let summary = firmware_sim::run(&config, CancellationToken::new()).await;
                (config, summary)
            })
        })
        .collect();
    let mut configs = Vec::new();
    for s in sims {
        let (config, summary) = s.await.expect("sim task");
        let summary = summary.unwrap_or_else(|e| panic!("{}: {e}", config.format));
        assert_eq!(summary.readings, DEVICES as u64 * SAMPLES * 2);
        assert_eq!(summary.acked, summary.messages);
        configs.push(config);
    }
    let client = db(db_url).await;
    for config in &configs {
        assert_landed(&client, gateway, config).await;
    }
    let total = (4 * DEVICES as u64 * SAMPLES * 2) as i64;
    let dead: i64 = client
        .query_one("SELECT count(*) FROM edge.dead_letters", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    assert_eq!(dead, 0);
    assert_eq!(
        gateway.metric("edge_gateway_readings_committed_total"),
        Some(total as f64)
    );
}

/// LISTENs on `channel` and collects payloads; the client must be kept
/// alive as long as notifications are wanted.
pub async fn collect_notifications(
    url: &str,
    channel: &str,
) -> (Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    use futures_util::StreamExt;
    tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("listen");
    (client, got)
}

/// Alert rules for [`two_gateways_split_the_fleet`]: spikes raise alerts.
pub const SPIKE_RULES: &str = r#"
[analytics]
lateness_secs = 0.0
[[rules]]
name = "spike"
kind = "above"
metric = "temperature"
threshold = 40.0
clear = 38.0
"#;

/// Two gateways on one broker, each subscribed to one topic shard, writing
/// to `db_url`; 10 devices publish under `devices/s<n>/<device>/telemetry`
/// with injected spikes. Checks every reading is stored once and each
/// gateway committed exactly its shard's readings and raised exactly its
/// shard's alerts; returns the gateways and the alerts stored.
pub async fn two_gateways_split_the_fleet(broker_url: &str, db_url: &str) -> (Vec<Gateway>, i64) {
    let gateways: Vec<Gateway> = (0..2)
        .map(|shard| {
            let extra =
                format!("[mqtt]\ntopics = [\"devices/s{shard}/+/telemetry\"]\n{SPIKE_RULES}");
            Gateway::start(broker_url, db_url, &extra)
        })
        .collect();

    let start_ms = (now_ms() / 1000 - 7200) * 1000;
    let mut config = sim(broker_url, Format::NativeCbor, 10, 600, start_ms);
    config.metrics = 1;
    config.topic = "devices/{shard}/{device}/telemetry".into();
    config.topic_shards = 2;
    config.anomalies = 3;
    config.anomaly_kinds = vec![AnomalyKind::Spike];
    let summary = firmware_sim::run(&config, CancellationToken::new())
        .await
        .expect("sim");
    let client = db(db_url).await;
    assert_landed(&client, &gateways[0], &config).await;

    // What each shard should have: its devices' readings and spike alerts.
    let mut readings = [0u64; 2];
    let mut alerts = [0u64; 2];
    for d in 0..config.devices {
        let device = firmware_sim::device_id(&config.device_prefix, d);
        let shard = firmware_sim::topic_shard(&device, 2);
        readings[shard] += config.count.unwrap_or(0);
        alerts[shard] += 2 * firmware_sim::episodes(&config, d).len() as u64;
    }
    assert!(
        readings[0] > 0 && readings[1] > 0,
        "both shards have devices"
    );
    assert_eq!(readings[0] + readings[1], summary.readings);
    for (shard, gateway) in gateways.iter().enumerate() {
        assert_eq!(
            gateway.metric("edge_gateway_readings_committed_total"),
            Some(readings[shard] as f64),
            "gateway {shard}"
        );
        assert_eq!(
            gateway.metric("edge_gateway_alerts_total"),
            Some(alerts[shard] as f64),
            "gateway {shard}"
        );
    }
    let stored_alerts: i64 = client
        .query_one("SELECT count(*) FROM edge.alerts", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    assert_eq!(stored_alerts as u64, alerts[0] + alerts[1]);
    (gateways, stored_alerts)
}
