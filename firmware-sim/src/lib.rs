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

mod config;
mod faults;
mod publish;
mod signal;
mod truth;

pub use config::{boot_and_seq, device_id, topic_of, topic_shard, SimConfig};
pub use faults::{episodes, faults, malformed_payload, AnomalyKind, Episode, Faults};
pub use publish::{run, Summary};
pub use signal::{load_replay_csv, sample, value};
pub use truth::{expected_readings, ground_truth_csv, ExpectedReading};

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
