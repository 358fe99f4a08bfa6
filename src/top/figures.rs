//! What `top` shows, computed from two scrapes of a running gateway's
//! `/metrics` one interval apart (rates, latency quantiles over the
//! interval) and from its `/alerts` (the last alerts).

use std::collections::BTreeMap;

use crate::local::probe;

/// One scrape: every sample of `/metrics` by its full name (labels
/// included, as written).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    /// Parses Prometheus text.
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect();
        Scrape {
            samples,
            text: text.to_string(),
        }
    }

    /// An unlabelled sample (0 when absent).
    pub fn get(&self, name: &str) -> f64 {
        self.samples.get(name).copied().unwrap_or(0.0)
    }

    /// The samples of `name` by the value of its one label.
    pub fn labelled(&self, name: &str) -> Vec<(String, f64)> {
        let prefix = format!("{name}{{");
        self.samples
            .iter()
            .filter_map(|(k, v)| {
                let label = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let (_, value) = label.split_once("=\"")?;
                Some((value.to_string(), *v))
            })
            .collect()
    }

    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        probe::buckets(&self.text, name)
    }
}

/// The figures of one refresh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Seconds between the two scrapes.
    pub secs: f64,
    pub received_per_s: f64,
    pub decoded_per_s: f64,
    pub committed_per_s: f64,
    pub acked_per_s: f64,
    pub readings_committed: f64,
    pub in_flight: f64,
    pub not_durable: f64,
    /// Messages waiting in each shard's ring.
    pub rings: Vec<(String, f64)>,
    /// Sealed batches waiting in each writer's queue.
    pub writer_queues: Vec<(String, f64)>,
    pub spool_bytes: f64,
    pub spool_segments: f64,
    pub writers_stalled: f64,
    /// Publish-to-commit over the interval, in ms (`None`: nothing committed).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Dead letters by reason, in all.
    pub dead_letters: Vec<(String, f64)>,
    pub series: f64,
    pub analytics_bytes: f64,
    pub alerts_total: f64,
    pub db_connected: bool,
    pub mqtt_connected: bool,
}

impl Figures {
    /// The figures between `before` and `now`, `secs` apart.
    pub fn between(before: &Scrape, now: &Scrape, secs: f64) -> Figures {
        let rate = |name: &str| ((now.get(name) - before.get(name)) / secs.max(1e-3)).max(0.0);
        let latency = "edge_gateway_reading_to_commit_seconds";
        let (b, a) = (before.buckets(latency), now.buckets(latency));
        Figures {
            secs,
            received_per_s: rate("edge_gateway_messages_received_total"),
            decoded_per_s: rate("edge_gateway_readings_decoded_total"),
            committed_per_s: rate("edge_gateway_readings_committed_total"),
            acked_per_s: rate("edge_gateway_acks_sent_total"),
            readings_committed: now.get("edge_gateway_readings_committed_total"),
            in_flight: now.get("edge_gateway_messages_in_flight"),
            not_durable: now.get("edge_gateway_messages_not_durable"),
            rings: now.labelled("edge_gateway_ring_occupancy"),
            writer_queues: now.labelled("edge_gateway_writer_queue"),
            spool_bytes: now.get("edge_gateway_spool_bytes"),
            spool_segments: now.get("edge_gateway_spool_segments"),
            writers_stalled: now.get("edge_gateway_writers_stalled"),
            p50_ms: probe::quantile_ms(&b, &a, 0.5),
            p99_ms: probe::quantile_ms(&b, &a, 0.99),
            dead_letters: now
                .labelled("edge_gateway_dead_letters_total")
                .into_iter()
                .filter(|(_, n)| *n > 0.0)
                .collect(),
            series: now.get("edge_gateway_analytics_series"),
            analytics_bytes: now.get("edge_gateway_analytics_state_bytes")
                + now.get("edge_gateway_analytics_held_bytes"),
            alerts_total: now.get("edge_gateway_alerts_total"),
            db_connected: now.get("edge_gateway_db_connected") > 0.0,
            mqtt_connected: now.get("edge_gateway_mqtt_connected") > 0.0,
        }
    }

    /// One line of plain text (`top --plain`).
    pub fn line(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        let ring: f64 = self.rings.iter().map(|(_, n)| n).sum();
        let dead: f64 = self.dead_letters.iter().map(|(_, n)| n).sum();
        format!(
            "in {:.0} msg/s | decoded {:.0}/s | committed {:.0}/s | acked {:.0} msg/s | rings {ring:.0} | in flight {:.0} | spool {} | p50 {} ms p99 {} ms | dead letters {dead:.0} | series {:.0} | alerts {:.0} | db {} | mqtt {}",
            self.received_per_s,
            self.decoded_per_s,
            self.committed_per_s,
            self.acked_per_s,
            self.in_flight,
            bytes(self.spool_bytes),
            ms(self.p50_ms),
            ms(self.p99_ms),
            self.series,
            self.alerts_total,
            up(self.db_connected),
            up(self.mqtt_connected),
        )
    }
}

/// "up" or "DOWN".
pub fn up(connected: bool) -> &'static str {
    if connected {
        "up"
    } else {
        "DOWN"
    }
}

/// A byte count for people.
pub fn bytes(n: f64) -> String {
    match n {
        n if n >= 1024.0 * 1024.0 * 1024.0 => format!("{:.1} GiB", n / (1024.0 * 1024.0 * 1024.0)),
        n if n >= 1024.0 * 1024.0 => format!("{:.1} MiB", n / (1024.0 * 1024.0)),
        n if n >= 1024.0 => format!("{:.1} KiB", n / 1024.0),
        n => format!("{n:.0} B"),
    }
}

/// One recent alert as `/alerts` gives it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct RecentAlert {
    pub time: String,
    pub device_id: String,
    pub metric: String,
    pub rule: String,
    pub state: String,
    pub value: Option<f64>,
}

/// The last alerts, newest first (empty when the endpoint has none or
/// cannot be read).
pub fn parse_alerts(body: &str) -> Vec<RecentAlert> {
    let mut alerts: Vec<RecentAlert> = serde_json::from_str::<Vec<serde_json::Value>>(body)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    alerts.reverse();
    alerts
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "edge_gateway_messages_received_total 100\nedge_gateway_readings_committed_total 1000\nedge_gateway_reading_to_commit_seconds_bucket{le=\"0.01\"} 0\nedge_gateway_reading_to_commit_seconds_bucket{le=\"0.1\"} 0\nedge_gateway_reading_to_commit_seconds_bucket{le=\"+Inf\"} 0\n";
    const NOW: &str = "# HELP x\nedge_gateway_messages_received_total 300\nedge_gateway_readings_committed_total 5000\nedge_gateway_db_connected 1\nedge_gateway_ring_occupancy{shard=\"0\"} 7\nedge_gateway_ring_occupancy{shard=\"1\"} 0\nedge_gateway_dead_letters_total{reason=\"malformed_json\"} 3\nedge_gateway_dead_letters_total{reason=\"empty\"} 0\nedge_gateway_reading_to_commit_seconds_bucket{le=\"0.01\"} 50\nedge_gateway_reading_to_commit_seconds_bucket{le=\"0.1\"} 100\nedge_gateway_reading_to_commit_seconds_bucket{le=\"+Inf\"} 100\n";

    #[test]
    fn rates_rings_reasons_and_quantiles_come_from_two_scrapes() {
        let f = Figures::between(&Scrape::parse(BEFORE), &Scrape::parse(NOW), 2.0);
        assert_eq!(f.received_per_s, 100.0);
        assert_eq!(f.committed_per_s, 2000.0);
        assert_eq!(f.rings, vec![("0".into(), 7.0), ("1".into(), 0.0)]);
        assert_eq!(f.dead_letters, vec![("malformed_json".into(), 3.0)]);
        assert!(f.db_connected && !f.mqtt_connected);
        let p50 = f.p50_ms.unwrap_or_default();
        assert!((p50 - 10.0).abs() < 0.5, "{p50}");
        let line = f.line();
        assert!(
            line.contains("in 100 msg/s") && line.contains("db up") && line.contains("mqtt DOWN"),
            "{line}"
        );
    }

    #[test]
    fn recent_alerts_are_read_newest_first() {
        let body = r#"[{"time":"t1","device_id":"d","metric":"m","rule":"hot","state":"raised","value":50.0,"detail":{}},
                       {"time":"t2","device_id":"d","metric":"m","rule":"hot","state":"cleared","value":null,"detail":{}}]"#;
        let alerts = parse_alerts(body);
        assert_eq!(alerts.len(), 2);
        assert_eq!(
            (alerts[0].time.as_str(), alerts[0].state.as_str()),
            ("t2", "cleared")
        );
        assert!(parse_alerts("not json").is_empty());
    }
}
