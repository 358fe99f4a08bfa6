//! `firmware-sim`: simulated devices for edge-gateway tests, demos and load.

use anyhow::Context;
use clap::Parser;
use edge_payload::Format;
use firmware_sim::{AnomalyKind, SimConfig};
use tokio_util::sync::CancellationToken;

/// Publishes realistic sensor data from simulated devices over MQTT.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Samples per second per device (0 = as fast as the broker accepts).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Samples per device, then stop.
    #[arg(long, conflicts_with = "seconds", required_unless_present = "seconds")]
    count: Option<u64>,
    /// Run for this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// senml-cbor, senml-json, native-cbor or native-json.
    #[arg(long, default_value = "senml-cbor")]
    format: Format,
    /// MQTT QoS, 0 or 1.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Seed of the deterministic signals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Metrics per sample (1-4: temperature, humidity, pressure, vibration).
    #[arg(long, default_value_t = 2)]
    metrics: usize,
    /// Samples packed into one message.
    #[arg(long, default_value_t = 1)]
    pack: usize,
    /// Timestamp of the first sample, ms since the Unix epoch (default: now).
    #[arg(long)]
    start_ms: Option<i64>,
    /// Milliseconds between samples (default: 1000 / rate).
    #[arg(long)]
    step_ms: Option<i64>,
    /// Stamp each message's newest sample with its publish time (for
    /// publish-to-commit latency; --start-ms is then ignored).
    #[arg(long)]
    live_time: bool,
    /// Device id prefix (ids are prefix + 4 digits).
    #[arg(long, default_value = "sim-")]
    device_prefix: String,
    /// Topic template; {device} is replaced by the device id, {shard} by
    /// s<n> with n = FNV-1a(device id) mod --topic-shards.
    #[arg(long, default_value = "devices/{device}/telemetry")]
    topic: String,
    /// Shards for {shard} in --topic.
    #[arg(long, default_value_t = 1)]
    topic_shards: usize,
    /// MQTT client id.
    #[arg(long, default_value = "firmware-sim")]
    client_id: String,
    /// Share of messages published twice on purpose (0-1).
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Share of messages published after the device's next message (0-1).
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Share of messages replaced by malformed payloads (0-1).
    #[arg(long, default_value_t = 0.0)]
    malformed: f64,
    /// Keep the MQTT session across reconnects (clean session off).
    #[arg(long)]
    persistent: bool,
    /// Anomaly episodes to inject per device (needs --count).
    #[arg(long, default_value_t = 0)]
    anomalies: usize,
    /// Kinds of injected anomaly, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "spike,shift,drift,stuck,dropout"
    )]
    anomaly_kinds: Vec<AnomalyKind>,
    /// Samples an anomaly episode lasts (spikes: one).
    #[arg(long, default_value_t = 30)]
    anomaly_len: u64,
    /// Write the injected anomalies (device,metric,kind,start_ms,end_ms) here.
    #[arg(long)]
    ground_truth: Option<std::path::PathBuf>,
    /// Replay this timestamp,value CSV as the first metric of device 0.
    #[arg(long)]
    replay_csv: Option<std::path::PathBuf>,
    /// Native formats: reboot every device after this many messages, its
    /// sequence starting again at 1 (0 = never).
    #[arg(long, default_value_t = 0)]
    reboot_every: u64,
    /// With --reboot-every: send a boot id that changes at each boot.
    #[arg(long)]
    boot_id: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let replay = match &a.replay_csv {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--replay-csv {}", path.display()))?;
            Some(firmware_sim::load_replay_csv(&text)?)
        }
        None => None,
    };
    let mut config = SimConfig {
        broker: a.broker,
        devices: a.devices,
        rate: a.rate,
        count: a.count,
        seconds: a.seconds,
        format: a.format,
        qos: a.qos,
        seed: a.seed,
        metrics: a.metrics,
        pack: a.pack,
        start_ms: a.start_ms,
        step_ms: a.step_ms,
        live_time: a.live_time,
        device_prefix: a.device_prefix,
        topic: a.topic,
        topic_shards: a.topic_shards,
        client_id: a.client_id,
        progress: true,
        duplicate_rate: a.duplicates,
        reorder_rate: a.reorder,
        malformed_rate: a.malformed,
        persistent: a.persistent,
        anomalies: a.anomalies,
        anomaly_kinds: a.anomaly_kinds,
        anomaly_len: a.anomaly_len,
        replay,
        reboot_every: a.reboot_every,
        boot_ids: a.boot_id,
    };
    // Fix the start so the ground truth names the real times.
    let start_ms = config.start_ms.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    });
    config.start_ms = Some(start_ms);
    if let Some(path) = &a.ground_truth {
        std::fs::write(path, firmware_sim::ground_truth_csv(&config, start_ms))
            .with_context(|| format!("--ground-truth {}", path.display()))?;
    }
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        }
    });
    let summary = firmware_sim::run(&config, stop).await?;
    eprintln!(
        "firmware-sim: published {} messages ({} readings) from {} devices in {:.1} s, {} acknowledged; \
         on purpose: {} duplicated, {} reordered, {} malformed",
        summary.messages,
        summary.readings,
        summary.devices,
        summary.elapsed.as_secs_f64(),
        summary.acked,
        summary.duplicates,
        summary.reordered,
        summary.malformed
    );
    println!("{}", summary.to_json());
    Ok(())
}
