//! firmware-sim: simulated devices publishing realistic sensor data over MQTT.
//!
//! Every value is a pure function of (seed, device, metric, sample index), so
//! a test can recompute exactly what a run published ([`expected_readings`])
//! and compare it with what landed in the database. Signals have a daily
//! cycle with a per-device phase, a slow drift, and Gaussian noise.
//!
//! The library is what the `firmware-sim` binary runs and what
//! `edge-gateway demo` embeds; it shares only the payload model and encoders
//! (`edge-payload`) with the gateway.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edge_payload::{Format, Sample};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// Metrics a simulated device can report: name, unit, base, daily amplitude,
/// noise standard deviation, drift per day.
pub const METRICS: [(&str, &str, f64, f64, f64, f64); 4] = [
    ("temperature", "Cel", 21.0, 4.0, 0.3, 0.5),
    ("humidity", "%RH", 45.0, 10.0, 1.0, -1.0),
    ("pressure", "Pa", 101_325.0, 300.0, 20.0, 0.0),
    ("vibration", "m/s2", 0.2, 0.05, 0.02, 0.01),
];

/// The SenML unit of a metric.
pub fn unit_of(metric: &str) -> Option<&'static str> {
    METRICS.iter().find(|m| m.0 == metric).map(|m| m.1)
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("--broker: expected mqtt://host:port, got {0:?}")]
    Broker(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot encode a payload: {0}")]
    Encode(#[from] edge_payload::EncodeError),
    #[error("{unacked} of {published} QoS 1 messages were not acknowledged by the broker within {secs} s")]
    Unacked {
        published: u64,
        unacked: u64,
        secs: u64,
    },
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// `mqtt://host:port`.
    pub broker: String,
    pub devices: usize,
    /// Samples per second per device; 0 publishes as fast as the broker accepts.
    pub rate: f64,
    /// Samples per device; `None` runs until `seconds` or until stopped.
    pub count: Option<u64>,
    pub seconds: Option<f64>,
    pub format: Format,
    /// 0 or 1.
    pub qos: u8,
    pub seed: u64,
    /// How many of [`METRICS`] each sample carries (1 to 4).
    pub metrics: usize,
    /// Samples packed into one message.
    pub pack: usize,
    /// Timestamp of sample 0 in ms since the epoch; default: now.
    pub start_ms: Option<i64>,
    /// Milliseconds between samples; default: 1000 / rate (1000 when rate is 0).
    pub step_ms: Option<i64>,
    /// Stamp each message's newest sample with the time it is published
    /// (earlier samples of a pack `step_ms` before it), so the gateway's
    /// reading-to-commit histogram measures publish-to-commit latency.
    /// `start_ms` is then ignored and [`expected_readings`] does not apply.
    pub live_time: bool,
    /// Device ids are this prefix and a 4-digit index.
    pub device_prefix: String,
    /// Topic with `{device}` in place of the device id, and optionally
    /// `{shard}` in place of `s<n>`, n = [`topic_shard`] of the device.
    pub topic: String,
    /// Shards for `{shard}` in the topic.
    pub topic_shards: usize,
    pub client_id: String,
    /// Print progress to stderr every second.
    pub progress: bool,
    /// Share of messages published twice (a device re-sending).
    pub duplicate_rate: f64,
    /// Share of messages published after the device's next one.
    pub reorder_rate: f64,
    /// Share of messages replaced by a malformed payload; their samples are
    /// not part of [`expected_readings`].
    pub malformed_rate: f64,
    /// Keep the MQTT session across reconnects (clean session off), so
    /// nothing in flight is lost when the broker restarts.
    pub persistent: bool,
    /// Anomaly episodes injected per device (needs `count`).
    pub anomalies: usize,
    /// Kinds to draw episodes from.
    pub anomaly_kinds: Vec<AnomalyKind>,
    /// Samples an episode lasts (a spike is always one sample).
    pub anomaly_len: u64,
    /// Values replayed, in order, as the first metric of device 0
    /// (`--replay-csv`), instead of the simulated signal.
    pub replay: Option<Arc<[f64]>>,
    /// Native formats: every device reboots after this many messages and
    /// its sequence starts again at 1 (0 = never), as devices that do not
    /// persist their counter do. Readings keep their times.
    pub reboot_every: u64,
    /// With reboots: send a boot id (native `boot`) that changes at each
    /// boot, as the gateway recommends.
    pub boot_ids: bool,
}

/// Kinds of injected anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnomalyKind {
    /// One sample far above the signal (8 daily amplitudes).
    Spike,
    /// The level moves up by 3 daily amplitudes for the episode.
    Shift,
    /// A ramp up to 4 daily amplitudes over the episode.
    Drift,
    /// The value freezes at its first value of the episode.
    Stuck,
    /// The device sends nothing during the episode.
    Dropout,
}

impl AnomalyKind {
    pub const ALL: [AnomalyKind; 5] = [
        AnomalyKind::Spike,
        AnomalyKind::Shift,
        AnomalyKind::Drift,
        AnomalyKind::Stuck,
        AnomalyKind::Dropout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::Spike => "spike",
            AnomalyKind::Shift => "shift",
            AnomalyKind::Drift => "drift",
            AnomalyKind::Stuck => "stuck",
            AnomalyKind::Dropout => "dropout",
        }
    }
}

impl std::str::FromStr for AnomalyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AnomalyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown anomaly kind {s:?}: expected spike, shift, drift, stuck or dropout"
                )
            })
    }
}

/// One injected anomaly: samples `start..start + len` of `device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Episode {
    pub device: usize,
    /// Index into [`METRICS`] (all metrics for a dropout).
    pub metric: usize,
    pub kind: AnomalyKind,
    pub start: u64,
    pub len: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            broker: "mqtt://127.0.0.1:1883".into(),
            devices: 10,
            rate: 1.0,
            count: None,
            seconds: None,
            format: Format::SenmlCbor,
            qos: 1,
            seed: 1,
            metrics: 2,
            pack: 1,
            start_ms: None,
            step_ms: None,
            live_time: false,
            device_prefix: "sim-".into(),
            topic: "devices/{device}/telemetry".into(),
            topic_shards: 1,
            client_id: "firmware-sim".into(),
            progress: false,
            duplicate_rate: 0.0,
            reorder_rate: 0.0,
            malformed_rate: 0.0,
            persistent: false,
            anomalies: 0,
            anomaly_kinds: AnomalyKind::ALL.to_vec(),
            anomaly_len: 30,
            replay: None,
            reboot_every: 0,
            boot_ids: false,
        }
    }
}

impl SimConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`SimError::Invalid`] naming the option.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |s: &str| Err(SimError::Invalid(s.to_string()));
        if self.devices == 0 {
            return bad("--devices must be at least 1");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return bad("--rate must be a number >= 0");
        }
        if !(1..=METRICS.len()).contains(&self.metrics) {
            return bad("--metrics must be 1 to 4");
        }
        if self.pack == 0 || self.pack > 10_000 {
            return bad("--pack must be 1 to 10000");
        }
        if self.qos > 1 {
            return bad("--qos must be 0 or 1");
        }
        if self.count.is_none() && self.seconds.is_none() {
            return bad("give --count or --seconds");
        }
        for (name, rate) in [
            ("--duplicates", self.duplicate_rate),
            ("--reorder", self.reorder_rate),
            ("--malformed", self.malformed_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(SimError::Invalid(format!(
                    "{name} must be a share from 0 to 1"
                )));
            }
        }
        if self.anomalies > 0 {
            let count = self
                .count
                .ok_or_else(|| SimError::Invalid("--anomalies needs --count".into()))?;
            if self.anomaly_kinds.is_empty() || self.anomaly_len == 0 {
                return Err(SimError::Invalid(
                    "--anomaly-kinds and --anomaly-len must not be empty or 0".into(),
                ));
            }
            if count < (self.anomalies as u64 + 1) * (self.anomaly_len * 2 + 10) {
                return Err(SimError::Invalid(
                    "--count too small for that many --anomalies of --anomaly-len samples".into(),
                ));
            }
        }
        if !self.topic.contains("{device}") {
            return bad("--topic must contain {device}");
        }
        broker_addr(&self.broker).map(|_| ())
    }

    fn step(&self) -> i64 {
        self.step_ms.unwrap_or(if self.rate > 0.0 {
            (1000.0 / self.rate).round().max(1.0) as i64
        } else {
            1000
        })
    }
}

fn broker_addr(url: &str) -> Result<(String, u16), SimError> {
    let rest = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| SimError::Broker(url.into()))?;
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .unwrap_or((rest, "1883"));
    let port = port.parse().map_err(|_| SimError::Broker(url.into()))?;
    Ok((host.to_string(), port))
}

/// The topic shard of a device: [`edge_payload::device_hash`] of its id
/// modulo `shards`, so operators can compute it anywhere (deploy/SCALING.md).
/// The sequence number and boot id device `d` sends with its `seq`-th
/// message (1-based), with [`SimConfig::reboot_every`] applied.
pub fn boot_and_seq(config: &SimConfig, d: usize, seq: u64) -> (u64, Option<u64>) {
    if config.reboot_every == 0 {
        return (seq, None);
    }
    let boot = (seq - 1) / config.reboot_every;
    let wire = (seq - 1) % config.reboot_every + 1;
    let id = config
        .boot_ids
        .then(|| edge_payload::device_hash(&format!("{}:{d}:{boot}", config.seed)));
    (wire, id)
}

pub fn topic_shard(device: &str, shards: usize) -> usize {
    (edge_payload::device_hash(device) % shards.max(1) as u64) as usize
}

/// The topic `device` publishes on.
pub fn topic_of(config: &SimConfig, device: &str) -> String {
    config.topic.replace("{device}", device).replace(
        "{shard}",
        &format!("s{}", topic_shard(device, config.topic_shards)),
    )
}

/// Id of device `index`.
pub fn device_id(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:04}")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// SplitMix64: a well-mixed hash of the inputs, the only randomness used.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn unit_float(h: u64) -> f64 {
    ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// The value of `metric` of `device` for sample `index` taken at `ts_ms`.
pub fn value(seed: u64, device: usize, metric: usize, index: u64, ts_ms: i64) -> f64 {
    let (_, _, base, amplitude, noise, drift) = METRICS[metric];
    let days = ts_ms as f64 / 86_400_000.0;
    let phase = unit_float(mix(seed ^ mix(device as u64 + 1))) * std::f64::consts::TAU;
    let h =
        mix(seed
            ^ mix((device as u64) << 32 ^ (metric as u64) << 24 ^ index.wrapping_mul(0x100_0001)));
    // Box-Muller from two halves of the hash.
    let (u1, u2) = (unit_float(h), unit_float(mix(h)));
    let gauss = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    let raw = base
        + amplitude * (std::f64::consts::TAU * days + phase).sin()
        + drift * days.fract()
        + noise * gauss;
    // Sensors report a fixed resolution.
    (raw * 1e4).round() / 1e4
}

/// The anomaly episodes of `device`, in time order: one in each of
/// `anomalies` equal stretches after the first fifth of the run (which
/// stays normal, so detectors can learn), at a seeded offset.
pub fn episodes(config: &SimConfig, device: usize) -> Vec<Episode> {
    let (Some(count), n) = (config.count, config.anomalies) else {
        return Vec::new();
    };
    if n == 0 || config.anomaly_kinds.is_empty() {
        return Vec::new();
    }
    let warm = count / 5;
    let stretch = (count - warm) / n as u64;
    (0..n as u64)
        .map(|e| {
            let h = mix(config.seed ^ mix(0xa11 << 40 ^ (device as u64) << 20 ^ e));
            let kind = config.anomaly_kinds[(h % config.anomaly_kinds.len() as u64) as usize];
            let len = if kind == AnomalyKind::Spike {
                1
            } else {
                config.anomaly_len
            };
            let room = stretch.saturating_sub(len + 1).max(1);
            Episode {
                device,
                metric: (mix(h) % config.metrics as u64) as usize,
                kind,
                start: warm + e * stretch + (mix(h ^ 7) % room),
                len,
            }
        })
        .collect()
}

/// The ground truth of a `--count` run: one CSV row per episode,
/// `device,metric,kind,start_ms,end_ms` (end = the episode's last sample).
pub fn ground_truth_csv(config: &SimConfig, start_ms: i64) -> String {
    let mut out = String::from("device,metric,kind,start_ms,end_ms\n");
    for d in 0..config.devices {
        for e in episodes(config, d) {
            let metric = if e.kind == AnomalyKind::Dropout {
                "*"
            } else {
                METRICS[e.metric].0
            };
            out.push_str(&format!(
                "{},{metric},{},{},{}\n",
                device_id(&config.device_prefix, d),
                e.kind.name(),
                start_ms + e.start as i64 * config.step(),
                start_ms + (e.start + e.len - 1) as i64 * config.step()
            ));
        }
    }
    out
}

/// Reads `timestamp,value` rows (header optional) for `--replay-csv`.
///
/// # Errors
/// The line that has no number in its second column.
pub fn load_replay_csv(text: &str) -> Result<Arc<[f64]>, SimError> {
    let mut values = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(v) = line.split(',').nth(1) else {
            continue;
        };
        match v.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => values.push(v),
            _ if i == 0 => {}
            _ => {
                return Err(SimError::Invalid(format!(
                    "--replay-csv line {}: {v:?} is not a number",
                    i + 1
                )))
            }
        }
    }
    if values.is_empty() {
        return Err(SimError::Invalid("--replay-csv has no rows".into()));
    }
    Ok(values.into())
}

/// Sample `index` of `device`, with any anomaly applied; a sample in a
/// dropout has no metrics.
pub fn sample(config: &SimConfig, start_ms: i64, device: usize, index: u64) -> Sample {
    let ts_ms = start_ms + index as i64 * config.step();
    let episode = episodes(config, device)
        .into_iter()
        .find(|e| (e.start..e.start + e.len).contains(&index));
    if episode.is_some_and(|e| e.kind == AnomalyKind::Dropout) {
        return Sample {
            ts_ms,
            metrics: Vec::new(),
        };
    }
    let signal = |m: usize, i: u64, ts: i64| match (&config.replay, device, m) {
        (Some(replay), 0, 0) => replay[(i % replay.len() as u64) as usize],
        _ => value(config.seed, device, m, i, ts),
    };
    let metrics = (0..config.metrics)
        .map(|m| {
            let mut v = signal(m, index, ts_ms);
            if let Some(e) = episode.filter(|e| e.metric == m) {
                let amplitude = METRICS[m].3;
                let k = index - e.start;
                v = match e.kind {
                    AnomalyKind::Spike => v + 8.0 * amplitude,
                    AnomalyKind::Shift => v + 3.0 * amplitude,
                    AnomalyKind::Drift => v + 4.0 * amplitude * (k + 1) as f64 / e.len as f64,
                    AnomalyKind::Stuck => {
                        signal(m, e.start, start_ms + e.start as i64 * config.step())
                    }
                    AnomalyKind::Dropout => v,
                };
                v = (v * 1e4).round() / 1e4;
            }
            (METRICS[m].0.to_string(), v)
        })
        .collect();
    Sample { ts_ms, metrics }
}

/// Which faults hit message `message` of `device` (deterministic per seed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    pub duplicate: bool,
    pub reorder: bool,
    /// `Some(kind)`: replaced by malformed payload number `kind` (0-3).
    pub malformed: Option<u8>,
}

/// The faults of one message.
pub fn faults(config: &SimConfig, device: usize, message: u64) -> Faults {
    let roll = |salt: u64| {
        unit_float(mix(
            config.seed ^ mix(salt << 56 ^ (device as u64) << 32 ^ message)
        ))
    };
    Faults {
        duplicate: roll(1) < config.duplicate_rate,
        reorder: roll(2) < config.reorder_rate,
        malformed: (roll(3) < config.malformed_rate).then(|| (roll(4) * 4.0) as u8 % 4),
    }
}

/// A payload no decoder accepts, of one of four kinds: a valid payload cut
/// in half, broken JSON, JSON of the wrong shape, CBOR garbage.
pub fn malformed_payload(kind: u8, valid: &[u8]) -> Vec<u8> {
    match kind {
        0 => valid[..valid.len() / 2].to_vec(),
        1 => b"{\"seq\": 1, \"ts\": ".to_vec(),
        2 => b"{\"hello\": \"world\"}".to_vec(),
        _ => vec![0xff, 0x00, 0x13, 0x37],
    }
}

/// One reading as the database should hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedReading {
    pub device: String,
    pub metric: String,
    pub ts_ms: i64,
    pub value: f64,
}

/// Every reading a `--count` run starting at `start_ms` publishes.
pub fn expected_readings(config: &SimConfig, start_ms: i64) -> Vec<ExpectedReading> {
    let count = config.count.unwrap_or(0);
    let mut out = Vec::with_capacity(config.devices * count as usize * config.metrics);
    for d in 0..config.devices {
        let device = device_id(&config.device_prefix, d);
        for i in 0..count {
            if faults(config, d, i / config.pack as u64)
                .malformed
                .is_some()
            {
                continue;
            }
            let s = sample(config, start_ms, d, i);
            for (metric, value) in s.metrics {
                out.push(ExpectedReading {
                    device: device.clone(),
                    metric,
                    ts_ms: s.ts_ms,
                    value,
                });
            }
        }
    }
    out
}

/// What a run published.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub devices: usize,
    pub messages: u64,
    pub readings: u64,
    /// QoS 1 messages the broker acknowledged.
    pub acked: u64,
    /// Messages published a second time on purpose.
    pub duplicates: u64,
    /// Messages published after the device's next one on purpose.
    pub reordered: u64,
    /// Malformed messages published instead of real ones.
    pub malformed: u64,
    pub start_ms: i64,
    pub elapsed: Duration,
}

impl Summary {
    /// One line of JSON with every figure.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"devices\":{},\"messages\":{},\"readings\":{},\"acked\":{},\"duplicates\":{},\"reordered\":{},\"malformed\":{},\"start_ms\":{},\"elapsed_s\":{:.3},\"readings_per_s\":{:.1}}}",
            self.devices,
            self.messages,
            self.readings,
            self.acked,
            self.duplicates,
            self.reordered,
            self.malformed,
            self.start_ms,
            self.elapsed.as_secs_f64(),
            self.readings as f64 / self.elapsed.as_secs_f64().max(1e-9)
        )
    }
}

/// Publishes until `count` samples per device are out, `seconds` have
/// passed, or `stop` is cancelled; with QoS 1, waits for every PUBACK.
///
/// # Errors
/// Invalid config, or QoS 1 messages the broker never acknowledged.
pub async fn run(config: &SimConfig, stop: CancellationToken) -> Result<Summary, SimError> {
    config.validate()?;
    let (host, port) = broker_addr(&config.broker)?;
    let mut options = MqttOptions::new(&config.client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(16 << 20, 16 << 20)
        .set_inflight(1000)
        .set_clean_session(!config.persistent);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let acked = Arc::new(AtomicU64::new(0));
    let driver_stop = CancellationToken::new();
    let driver = tokio::spawn({
        let acked = acked.clone();
        let driver_stop = driver_stop.clone();
        async move {
            loop {
                tokio::select! {
                    _ = driver_stop.cancelled() => return,
                    event = eventloop.poll() => match event {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Relaxed);
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("firmware-sim: broker connection: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }
    });

    let qos = if config.qos == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let start_ms = config.start_ms.unwrap_or_else(now_ms);
    let started = Instant::now();
    let deadline = config.seconds.map(|s| started + Duration::from_secs_f64(s));
    let topics: Vec<String> = (0..config.devices)
        .map(|d| topic_of(config, &device_id(&config.device_prefix, d)))
        .collect();
    let mut summary = Summary {
        devices: config.devices,
        start_ms,
        ..Summary::default()
    };
    let mut next_progress = started + Duration::from_secs(1);
    let mut index: u64 = 0;
    let mut seq: u64 = 1;
    // Per device: a message held back to be published after the next one.
    let mut held: Vec<Option<Vec<u8>>> = vec![None; config.devices];
    'outer: loop {
        let n = match config.count {
            Some(count) if index >= count => break,
            Some(count) => (count - index).min(config.pack as u64),
            None => config.pack as u64,
        };
        for (d, topic) in topics.iter().enumerate() {
            if config.rate > 0.0 {
                // Devices spread evenly over the round rather than all
                // publishing at its start: a steady load, not bursts.
                let offset = d as f64 * n as f64 / config.devices as f64;
                let due = started + Duration::from_secs_f64((index as f64 + offset) / config.rate);
                if due > Instant::now() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = stop.cancelled() => break 'outer,
                    }
                }
            }
            if stop.is_cancelled() || deadline.is_some_and(|t| Instant::now() >= t) {
                break 'outer;
            }
            let start_ms = if config.live_time {
                now_ms() - (index + n - 1) as i64 * config.step()
            } else {
                start_ms
            };
            let samples: Vec<Sample> = (index..index + n)
                .map(|i| sample(config, start_ms, d, i))
                .filter(|s| !s.metrics.is_empty())
                .collect();
            if samples.is_empty() {
                // The whole message falls in a dropout.
                continue;
            }
            let readings: u64 = samples.iter().map(|s| s.metrics.len() as u64).sum();
            let (wire_seq, boot) = boot_and_seq(config, d, seq);
            let mut payload =
                edge_payload::encode_with_boot(config.format, wire_seq, boot, &samples, &unit_of)?;
            let fault = faults(config, d, seq - 1);
            match fault.malformed {
                Some(kind) => {
                    payload = malformed_payload(kind, &payload);
                    summary.malformed += 1;
                }
                None => summary.readings += readings,
            }
            let last = config.count.is_some_and(|c| index + n >= c);
            let mut out = Vec::with_capacity(3);
            if fault.reorder && !last && held[d].is_none() {
                held[d] = Some(payload.clone());
                summary.reordered += 1;
            } else {
                out.push(payload.clone());
                out.extend(held[d].take());
            }
            if fault.duplicate {
                out.push(payload);
                summary.duplicates += 1;
            }
            for payload in out {
                if client
                    .publish(topic.as_str(), qos, false, payload)
                    .await
                    .is_err()
                {
                    break 'outer;
                }
                summary.messages += 1;
            }
        }
        seq += 1;
        index += n;
        if config.progress && Instant::now() >= next_progress {
            next_progress += Duration::from_secs(1);
            eprintln!(
                "firmware-sim: {} messages, {} readings, {:.0} readings/s",
                summary.messages,
                summary.readings,
                summary.readings as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    // Messages still held back (the run was cut short) go out last.
    for (d, payload) in held.iter_mut().enumerate() {
        if let Some(payload) = payload.take() {
            if client
                .publish(topics[d].as_str(), qos, false, payload)
                .await
                .is_ok()
            {
                summary.messages += 1;
            }
        }
    }
    let mut result = Ok(());
    if qos == QoS::AtLeastOnce {
        let wait = Instant::now();
        while acked.load(Relaxed) < summary.messages && wait.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = acked.load(Relaxed);
        if got < summary.messages {
            result = Err(SimError::Unacked {
                published: summary.messages,
                unacked: summary.messages - got,
                secs: 60,
            });
        }
    }
    summary.acked = acked.load(Relaxed);
    summary.elapsed = started.elapsed();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    driver_stop.cancel();
    result.map(|()| summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_deterministic_per_seed() {
        assert_eq!(value(1, 2, 0, 3, 1_000), value(1, 2, 0, 3, 1_000));
        assert_ne!(value(1, 2, 0, 3, 1_000), value(2, 2, 0, 3, 1_000));
        assert_ne!(value(1, 2, 0, 3, 1_000), value(1, 3, 0, 3, 1_000));
    }

    #[test]
    fn signals_stay_in_a_plausible_range() {
        for (m, (name, _, base, amplitude, noise, drift)) in METRICS.iter().enumerate() {
            let bound = amplitude + drift.abs() + 6.0 * noise;
            for i in 0..5_000u64 {
                let v = value(42, (i % 7) as usize, m, i, i as i64 * 60_000);
                assert!((v - base).abs() <= bound, "{name}: {v}");
            }
        }
    }

    #[test]
    fn anomalies_are_placed_applied_and_written_as_ground_truth() {
        let config = SimConfig {
            devices: 2,
            count: Some(1000),
            metrics: 2,
            step_ms: Some(1000),
            anomalies: 3,
            anomaly_len: 20,
            ..SimConfig::default()
        };
        for d in 0..2 {
            let eps = episodes(&config, d);
            assert_eq!(eps.len(), 3);
            assert!(
                eps.windows(2).all(|w| w[0].start + w[0].len <= w[1].start),
                "{eps:?}"
            );
            assert!(eps[0].start >= 200, "the first fifth stays normal");
            for e in &eps {
                let inside = sample(&config, 0, d, e.start);
                let normal = SimConfig {
                    anomalies: 0,
                    ..config.clone()
                };
                let plain = sample(&normal, 0, d, e.start);
                match e.kind {
                    AnomalyKind::Dropout => assert!(inside.metrics.is_empty()),
                    AnomalyKind::Spike => {
                        assert!(inside.metrics[e.metric].1 > plain.metrics[e.metric].1 + 20.0)
                    }
                    _ => assert_eq!(inside.metrics.len(), 2),
                }
            }
        }
        let truth = ground_truth_csv(&config, 0);
        assert_eq!(truth.lines().count(), 1 + 6);
        assert!(truth.starts_with("device,metric,kind,start_ms,end_ms\n"));
        let dropped: u64 = (0..2)
            .flat_map(|d| episodes(&config, d))
            .filter(|e| e.kind == AnomalyKind::Dropout)
            .map(|e| e.len * 2)
            .sum();
        assert_eq!(
            expected_readings(&config, 0).len() as u64,
            2 * 1000 * 2 - dropped
        );
    }

    #[test]
    fn replay_csv_drives_the_first_metric_of_device_0() {
        let replay =
            load_replay_csv("timestamp,value\n2024-01-01 00:00:00,5\n2024-01-01 00:05:00,7.5\n")
                .ok();
        assert_eq!(replay.as_deref(), Some(&[5.0, 7.5][..]));
        let config = SimConfig {
            replay,
            metrics: 2,
            ..SimConfig::default()
        };
        assert_eq!(sample(&config, 0, 0, 1).metrics[0].1, 7.5);
        assert_eq!(sample(&config, 0, 0, 2).metrics[0].1, 5.0);
        assert_ne!(sample(&config, 0, 1, 1).metrics[0].1, 7.5);
        assert!(load_replay_csv("timestamp,value\nx,abc\n").is_err());
    }

    #[test]
    fn expected_readings_cover_every_sample() {
        let config = SimConfig {
            devices: 3,
            count: Some(5),
            metrics: 2,
            step_ms: Some(10),
            ..SimConfig::default()
        };
        let readings = expected_readings(&config, 1_000);
        assert_eq!(readings.len(), 30);
        assert_eq!(readings[0].device, "sim-0000");
        assert_eq!(readings[0].ts_ms, 1_000);
        assert_eq!(readings[29].ts_ms, 1_040);
    }
}
