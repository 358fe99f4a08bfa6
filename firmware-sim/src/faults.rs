//! What goes wrong, on purpose: anomaly episodes in the signal (spikes,
//! level shifts, drift, stuck values, dropouts) and faults of the messages
//! (duplicates, reordering, malformed payloads), deterministic per seed.

use crate::config::SimConfig;
use crate::signal::{mix, unit_float};

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
