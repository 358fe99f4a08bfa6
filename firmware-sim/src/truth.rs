//! The oracle: what a `--count` run published, reading by reading, and its
//! anomaly ground truth, so tests compare the database with the truth.

use crate::config::{device_id, SimConfig};
use crate::faults::{episodes, faults, AnomalyKind};
use crate::signal::sample;
use crate::METRICS;

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
