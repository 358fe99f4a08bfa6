//! Counters and gauges shared by all stages: relaxed atomics, one increment
//! per batch or message (never a log line per message), rendered in the
//! Prometheus text format on demand. Every family is named `edge_gateway_*`.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::model::DeadLetterReason;

/// Upper bounds (seconds) of latency histogram buckets; fine between 10 and
/// 500 ms, where the latency targets are, so quantiles read from the
/// buckets are close.
const BUCKETS: [f64; 20] = [
    0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe_micros(&self, micros: u64) {
        let secs = micros as f64 / 1e6;
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(micros, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// All gateway metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_received: AtomicU64,
    pub readings_decoded: AtomicU64,
    pub messages_committed: AtomicU64,
    pub readings_committed: AtomicU64,
    pub batches_committed: AtomicU64,
    pub batch_failures: AtomicU64,
    pub acks_sent: AtomicU64,
    pub intake_paused: AtomicU64,
    pub partitions_created: AtomicU64,
    pub mqtt_reconnects: AtomicU64,
    pub duplicates: AtomicU64,
    pub device_restarts: AtomicU64,
    pub rows_rejected: AtomicU64,
    pub dead_letters_suppressed: AtomicU64,
    pub dedup_evictions: AtomicU64,
    pub series_evicted: AtomicU64,
    pub spool_foreign: AtomicU64,
    /// Writers with work pending and no progress for `pipeline.stall_secs`.
    pub writers_stalled: AtomicU64,
    /// Messages received on the current connection and not yet released
    /// (neither durable nor acknowledged).
    pub messages_in_flight: AtomicU64,
    /// Of those, the messages not yet committed or spooled.
    pub messages_not_durable: AtomicU64,
    /// A stage ended before shutdown: the gateway is stopping.
    pub stage_failed: AtomicBool,
    pub alerts: AtomicU64,
    pub late_readings: AtomicU64,
    /// Series with analytics state, over all shards.
    pub analytics_series: AtomicU64,
    /// Bytes of that state (windows, detectors, rules).
    pub analytics_bytes: AtomicU64,
    /// Bytes of readings held for reordering.
    pub analytics_held_bytes: AtomicU64,
    pub alerts_unpublished: AtomicU64,
    pub spool_batches_written: AtomicU64,
    pub spool_batches_replayed: AtomicU64,
    pub spool_corrupt_files: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub spool_segments: AtomicU64,
    dead_letters: [AtomicU64; DeadLetterReason::ALL.len()],
    pub mqtt_connected: AtomicBool,
    pub mqtt_subscribed: AtomicBool,
    pub db_connected: AtomicBool,
    pub copy_latency: Histogram,
    /// From a message's newest reading timestamp to its commit: the
    /// publish-to-commit latency for devices that stamp readings as they
    /// publish.
    pub reading_to_commit_latency: Histogram,
    alerts_by_rule: Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
    pub receive_to_commit_latency: Histogram,
    ring_occupancy: Mutex<Vec<usize>>,
    writer_queues: Mutex<Vec<usize>>,
    /// The JSON of the last committed alerts, oldest first.
    recent_alerts: Mutex<std::collections::VecDeque<String>>,
}

/// Committed alerts kept for `/alerts`.
pub const RECENT_ALERTS: usize = 50;

impl Metrics {
    /// Counts one dead letter for `reason`.
    pub fn dead_letter(&self, reason: DeadLetterReason) {
        self.dead_letters[reason.index()].fetch_add(1, Relaxed);
    }

    /// Counts one alert transition of `rule` (alerts are rare: a lock is fine).
    pub fn alert(&self, rule: &str, state: crate::alerts::State) {
        let mut map = self
            .alerts_by_rule
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *map.entry((rule.to_string(), state.as_str())).or_insert(0) += 1;
    }

    /// Dead letters counted so far, all reasons.
    pub fn dead_letters_total(&self) -> u64 {
        self.dead_letters.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Records the ring occupancy of every shard (called by the router).
    /// Keeps a committed alert's JSON for `/alerts` (the last
    /// [`RECENT_ALERTS`]).
    pub fn recent_alert(&self, json: &str) {
        let mut recent = self.recent_alerts.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_ALERTS {
            recent.pop_front();
        }
        recent.push_back(json.to_string());
    }

    /// The last committed alert, shortly: `raised hot d1/temperature`.
    pub fn last_alert(&self) -> Option<String> {
        let recent = self.recent_alerts.lock().unwrap_or_else(|p| p.into_inner());
        let v: serde_json::Value = serde_json::from_str(recent.back()?).ok()?;
        Some(format!(
            "{} {} {}/{}",
            v["state"].as_str()?,
            v["rule"].as_str()?,
            v["device_id"].as_str()?,
            v["metric"].as_str()?
        ))
    }

    /// `/alerts`: a JSON array of the last committed alerts, oldest first.
    pub fn render_recent_alerts(&self) -> String {
        let recent = self.recent_alerts.lock().unwrap_or_else(|p| p.into_inner());
        let items: Vec<&str> = recent.iter().map(String::as_str).collect();
        format!("[{}]\n", items.join(","))
    }

    /// Sealed batches waiting in each writer's queue.
    pub fn set_writer_queues(&self, depths: Vec<usize>) {
        *self.writer_queues.lock().unwrap_or_else(|p| p.into_inner()) = depths;
    }

    pub fn set_ring_occupancy(&self, occupancy: Vec<usize>) {
        *self
            .ring_occupancy
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = occupancy;
    }

    /// True when the broker subscription is up and the database reachable.
    pub fn ready(&self) -> bool {
        self.mqtt_subscribed.load(Relaxed)
            && self.db_connected.load(Relaxed)
            && self.writers_stalled.load(Relaxed) == 0
            && !self.stage_failed.load(Relaxed)
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "edge_gateway_messages_received_total",
            "MQTT messages received.",
            self.messages_received.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_readings_decoded_total",
            "Readings decoded from payloads.",
            self.readings_decoded.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_messages_committed_total",
            "Messages whose rows are committed to PostgreSQL.",
            self.messages_committed.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_readings_committed_total",
            "Readings committed to PostgreSQL.",
            self.readings_committed.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_batches_committed_total",
            "COPY batches committed.",
            self.batches_committed.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_batch_failures_total",
            "Batch attempts that failed and were retried.",
            self.batch_failures.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_acks_sent_total",
            "PUBACKs released to the broker.",
            self.acks_sent.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_intake_paused_total",
            "Times intake paused on a full ring.",
            self.intake_paused.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_partitions_created_total",
            "Partitions created.",
            self.partitions_created.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_mqtt_reconnects_total",
            "Broker connection losses.",
            self.mqtt_reconnects.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_alerts_total",
            "Alert transitions (raised or cleared).",
            self.alerts.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_alerts_unpublished_total",
            "Committed alerts that could not be queued for the MQTT alert topic.",
            self.alerts_unpublished.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_late_readings_total",
            "Readings later than analytics.lateness_secs: stored, kept out of analytics.",
            self.late_readings.load(Relaxed),
        );
        gauge(
            &mut out,
            "edge_gateway_analytics_series",
            "Series with analytics state.",
            self.analytics_series.load(Relaxed),
        );
        gauge(
            &mut out,
            "edge_gateway_analytics_state_bytes",
            "Bytes of analytics state (windows, detectors, rules).",
            self.analytics_bytes.load(Relaxed),
        );
        gauge(
            &mut out,
            "edge_gateway_analytics_held_bytes",
            "Bytes of readings held to be put back in time order (rate x lateness).",
            self.analytics_held_bytes.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_duplicates_total",
            "Messages dropped as duplicates (redelivered or re-sent).",
            self.duplicates.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_device_restarts_total",
            "Devices whose message sequence restarted (a new boot id, or a lower sequence with newer readings).",
            self.device_restarts.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_rows_rejected_total",
            "Alert, rollup or sequence-window rows the database refused (left out; their readings stored).",
            self.rows_rejected.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_dead_letters_suppressed_total",
            "Dead letters over limits.max_dead_letters_per_device_minute: counted and acknowledged, not stored.",
            self.dead_letters_suppressed.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_dedup_evictions_total",
            "Sequence windows evicted from memory (device idle past dedup.horizon_secs, or limits.max_dedup_devices).",
            self.dedup_evictions.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_series_evicted_total",
            "Analytics series evicted (idle past analytics.series_idle_secs, or limits.max_series), final rollup written.",
            self.series_evicted.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_spool_foreign_total",
            "Spools of another database set aside, never replayed.",
            self.spool_foreign.load(Relaxed),
        );
        gauge(
            &mut out,
            "edge_gateway_messages_in_flight",
            "Messages received and not yet durable and acknowledged (0 when the gateway has caught up).",
            self.messages_in_flight.load(Relaxed),
        );
        gauge(
            &mut out,
            "edge_gateway_messages_not_durable",
            "Messages received and not yet committed or spooled.",
            self.messages_not_durable.load(Relaxed),
        );
        gauge(
            &mut out,
            "edge_gateway_writers_stalled",
            "Writers with work pending and no progress for pipeline.stall_secs (readiness fails).",
            self.writers_stalled.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_spool_batches_written_total",
            "Batches written to the disk spool.",
            self.spool_batches_written.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_spool_batches_replayed_total",
            "Spooled batches committed to PostgreSQL.",
            self.spool_batches_replayed.load(Relaxed),
        );
        counter(
            &mut out,
            "edge_gateway_spool_corrupt_files_total",
            "Corrupt or torn spool data set aside.",
            self.spool_corrupt_files.load(Relaxed),
        );
        let _ = writeln!(out, "# HELP edge_gateway_spool_bytes Bytes in the disk spool.\n# TYPE edge_gateway_spool_bytes gauge\nedge_gateway_spool_bytes {}", self.spool_bytes.load(Relaxed));
        let _ = writeln!(out, "# HELP edge_gateway_spool_segments Segment files in the disk spool.\n# TYPE edge_gateway_spool_segments gauge\nedge_gateway_spool_segments {}", self.spool_segments.load(Relaxed));
        let _ = writeln!(out, "# HELP edge_gateway_dead_letters_total Messages written to dead_letters, by reason.\n# TYPE edge_gateway_dead_letters_total counter");
        for (i, reason) in DeadLetterReason::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "edge_gateway_dead_letters_total{{reason=\"{reason}\"}} {}",
                self.dead_letters[i].load(Relaxed)
            );
        }
        gauge(
            &mut out,
            "edge_gateway_mqtt_connected",
            "1 while connected to the broker.",
            u64::from(self.mqtt_connected.load(Relaxed)),
        );
        gauge(
            &mut out,
            "edge_gateway_mqtt_subscribed",
            "1 once the topic subscriptions are acknowledged.",
            u64::from(self.mqtt_subscribed.load(Relaxed)),
        );
        gauge(
            &mut out,
            "edge_gateway_db_connected",
            "1 while the last database operation succeeded.",
            u64::from(self.db_connected.load(Relaxed)),
        );
        // One gauge a shard or writer, labelled by its index.
        let per_index =
            |out: &mut String, name: &str, help: &str, label: &str, values: &Mutex<Vec<usize>>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for (i, n) in values
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .enumerate()
                {
                    let _ = writeln!(out, "{name}{{{label}=\"{i}\"}} {n}");
                }
            };
        per_index(
            &mut out,
            "edge_gateway_ring_occupancy",
            "Messages waiting in each shard ring.",
            "shard",
            &self.ring_occupancy,
        );
        per_index(
            &mut out,
            "edge_gateway_writer_queue",
            "Sealed batches waiting in each writer's queue.",
            "writer",
            &self.writer_queues,
        );
        let _ = writeln!(out, "# HELP edge_gateway_alerts_by_rule_total Alert transitions by rule and state.\n# TYPE edge_gateway_alerts_by_rule_total counter");
        for ((rule, state), n) in self
            .alerts_by_rule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let rule = rule.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "edge_gateway_alerts_by_rule_total{{rule=\"{rule}\",state=\"{state}\"}} {n}"
            );
        }
        self.reading_to_commit_latency.render(
            &mut out,
            "edge_gateway_reading_to_commit_seconds",
            "From each message's newest reading timestamp to its commit (publish-to-commit for devices that stamp at publish).",
        );
        self.copy_latency.render(
            &mut out,
            "edge_gateway_copy_seconds",
            "Time to COPY and commit one batch.",
        );
        self.receive_to_commit_latency.render(
            &mut out,
            "edge_gateway_receive_to_commit_seconds",
            "Time from receiving a message to committing its rows (oldest message of a batch).",
        );
        out
    }
}
