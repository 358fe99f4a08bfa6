//! The signal model: every value a pure function of (seed, device, metric,
//! sample index), with a daily cycle, drift and noise, and the anomalies of
//! [`crate::faults`] applied.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use edge_payload::Sample;

use crate::config::SimConfig;
use crate::faults::{episodes, AnomalyKind};
use crate::{SimError, METRICS};

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// SplitMix64: a well-mixed hash of the inputs, the only randomness used.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub(crate) fn unit_float(h: u64) -> f64 {
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
