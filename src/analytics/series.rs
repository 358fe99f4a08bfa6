//! One series' analytics state (windows, detector, rule states, the
//! current minute's rollup) and the step that takes one reading, in time
//! order, through all of it. [`super::engine`] owns the series of a worker's
//! devices and decides when readings are released to these steps.

use std::sync::Arc;

use serde_json::{json, Value};

use super::anomaly::{Detector, Settings};
use super::rules::{Kind, RuleConfig, RuleState, Sequence, Silence, State};
use super::window::{Layout, Reorder, Windows};
use crate::alerts::{finite, Alert};
use crate::model::{Micros, Rollup, MICROS_PER_SEC};

/// What analytics produced for a batch.
#[derive(Debug, Default)]
pub struct Outputs {
    pub alerts: Vec<Alert>,
    pub rollups: Vec<Rollup>,
    /// Readings that came later than the lateness allows.
    pub late: u64,
}

/// The state of one series (device and metric): about 0.9 KiB with the
/// default windows and detector and two rules, as the
/// `analytics_memory` test measures. Per-series bytes are what a worker
/// with hundreds of thousands of series is made of: what every series
/// shares (the window layout, the settings, the metric names) is kept once
/// per worker.
pub(super) struct Series {
    pub(super) metric: Arc<str>,
    pub(super) reorder: Reorder,
    pub(super) windows: Windows,
    pub(super) detector: Detector,
    pub(super) rules: Box<[RuleState]>,
    /// Receive time of the newest reading.
    pub(super) last_arrival: Micros,
    /// The current minute's rollup so far; the minute is that of the
    /// newest reading the windows took.
    pub(super) minute: Minute,
}

pub(super) struct DeviceState {
    /// Sorted by metric, with no spare capacity.
    pub(super) series: Vec<Series>,
    pub(super) silence: Vec<(usize, Silence)>,
    pub(super) sequences: Vec<(usize, Sequence)>,
}

impl DeviceState {
    pub(super) fn new(device: &str, rules: &[RuleConfig]) -> DeviceState {
        let of_kind = |kind: Kind| {
            rules
                .iter()
                .enumerate()
                .filter(move |(_, r)| r.kind == kind && super::rules::glob(&r.devices, device))
                .map(|(i, _)| i)
        };
        DeviceState {
            series: Vec::new(),
            silence: of_kind(Kind::Silence)
                .map(|i| (i, Silence::default()))
                .collect(),
            sequences: of_kind(Kind::Sequence)
                .map(|i| (i, Sequence::default()))
                .collect(),
        }
    }
}

impl Series {
    /// Bytes of this series' state, inline and on the heap; the readings
    /// held for reordering are counted apart.
    pub(super) fn memory(&self) -> usize {
        std::mem::size_of::<Series>()
            + self.windows.heap_bytes()
            + std::mem::size_of_val(&*self.rules)
    }

    pub(super) fn new(
        layout: &Layout,
        anomaly: &Settings,
        rules: &[RuleConfig],
        device: &str,
        metric: Arc<str>,
    ) -> Series {
        Series {
            reorder: Reorder::default(),
            windows: Windows::new(layout),
            detector: Detector::new(anomaly),
            rules: rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.applies(device, &metric))
                .map(|(i, _)| RuleState::new(i))
                .collect(),
            metric,
            minute: Minute::default(),
            last_arrival: 0,
        }
    }
}

pub(super) const MINUTE: Micros = 60 * MICROS_PER_SEC;

/// A series' rollup of the current minute so far (`count` 0: none).
/// Device, metric and minute are the series' own, added when it is emitted.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Minute {
    pub(super) count: u32,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) sum: f64,
}

impl Minute {
    pub(super) fn add(&mut self, v: f64) {
        if self.count == 0 {
            *self = Minute {
                count: 1,
                min: v,
                max: v,
                sum: v,
            };
        } else {
            self.count += 1;
            self.min = self.min.min(v);
            self.max = self.max.max(v);
            self.sum += v;
        }
    }

    /// The `rollups_1m` row of this minute, which holds `t`, and resets
    /// it; `None` when it is empty.
    pub(super) fn take(&mut self, t: Micros, device: &Arc<str>, metric: &str) -> Option<Rollup> {
        let m = std::mem::take(self);
        (m.count > 0).then(|| Rollup {
            bucket: t.div_euclid(MINUTE) * MINUTE,
            device: device.clone(),
            metric: metric.into(),
            count: i64::from(m.count),
            min: m.min,
            max: m.max,
            sum: m.sum,
        })
    }
}

/// What every series' steps share, kept once per worker: the window
/// layout, the detector's settings, the rules, whether rollups are made.
pub(super) struct Steps {
    pub(super) layout: Layout,
    pub(super) anomaly: Settings,
    pub(super) rules: Arc<Vec<RuleConfig>>,
    pub(super) rollups: bool,
}

/// Runs readings a reorder buffer released, in time order, through the
/// windows, detector and rules of `series`, then the device's sequence
/// rules over the alerts they raised.
pub(super) fn run_released(
    ctx: &Steps,
    series: &mut Series,
    sequences: &mut [(usize, Sequence)],
    device: &Arc<str>,
    released: &[(Micros, f64)],
    out: &mut Outputs,
) {
    let mut raised = Vec::new();
    for &(t, v) in released {
        step(ctx, series, device, t, v, out, &mut raised);
    }
    let metric = &*series.metric;
    for (name, t) in raised {
        for (i, seq) in sequences.iter_mut() {
            let rule = &ctx.rules[*i];
            if seq.raised(rule, &name, t) {
                let detail = json!({
                    "first": rule.first.as_deref().unwrap_or(""),
                    "then": name,
                });
                out.alerts.push(alert(
                    t,
                    device,
                    metric,
                    &rule.name,
                    State::Raised,
                    None,
                    detail.clone(),
                ));
                out.alerts.push(alert(
                    t,
                    device,
                    metric,
                    &rule.name,
                    State::Cleared,
                    None,
                    detail,
                ));
            }
        }
    }
}

pub(super) fn alert(
    time: Micros,
    device: &Arc<str>,
    metric: &str,
    rule: &str,
    tr: State,
    value: Option<f64>,
    detail: Value,
) -> Alert {
    Alert {
        time,
        device: device.clone(),
        metric: metric.to_string(),
        rule: rule.to_string(),
        state: tr,
        value,
        detail,
    }
}

/// One reading, in time order, through the windows, the detector, the
/// rules and the minute's rollup of `series`.
pub(super) fn step(
    ctx: &Steps,
    series: &mut Series,
    device: &Arc<str>,
    t: Micros,
    v: f64,
    out: &mut Outputs,
    raised: &mut Vec<(String, Micros)>,
) {
    let Series {
        metric,
        windows,
        detector,
        rules,
        minute,
        ..
    } = series;
    let previous = windows.newest();
    windows.push(&ctx.layout, t, v);
    let score = detector.update(&ctx.anomaly, v);
    for state in rules.iter_mut() {
        let rule = &ctx.rules[state.rule()];
        if let Some(tr) = state.update(rule, t, v, score) {
            let mut detail = serde_json::Map::new();
            detail.insert("score".into(), finite((score * 1e4).round() / 1e4));
            for i in 0..ctx.layout.len() {
                if let Some(s) = windows.stats(&ctx.layout, i) {
                    detail.insert(
                        format!("window_{}s", ctx.layout.duration(i) / MICROS_PER_SEC),
                        json!({
                            "count": s.count,
                            "mean": finite(s.mean),
                            "min": finite(s.min),
                            "max": finite(s.max),
                            "std": finite(s.std),
                        }),
                    );
                }
            }
            let detail = Value::Object(detail);
            if tr == State::Raised {
                raised.push((rule.name.clone(), t));
            }
            out.alerts
                .push(alert(t, device, metric, &rule.name, tr, Some(v), detail));
        }
    }
    if ctx.rollups {
        if let Some(previous) = previous.filter(|p| p.div_euclid(MINUTE) != t.div_euclid(MINUTE)) {
            out.rollups.extend(minute.take(previous, device, metric));
        }
        minute.add(v);
    }
}
