//! What to simulate: the run's settings and their checks, device ids,
//! topics and boot ids.

use std::sync::Arc;

use edge_payload::Format;

use crate::faults::AnomalyKind;
use crate::{SimError, METRICS};

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

    /// Milliseconds between a device's samples.
    pub fn step(&self) -> i64 {
        self.step_ms.unwrap_or(if self.rate > 0.0 {
            (1000.0 / self.rate).round().max(1.0) as i64
        } else {
            1000
        })
    }
}

pub(crate) fn broker_addr(url: &str) -> Result<(String, u16), SimError> {
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

/// The topic shard of a device: [`edge_payload::device_hash`] of its id
/// modulo `shards`, so operators can compute it anywhere (deploy/SCALING.md).
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
