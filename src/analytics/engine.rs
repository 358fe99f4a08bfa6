//! The analytics a shard worker runs for its devices: per series a reorder
//! buffer, sliding windows, the anomaly detector and the rules; per device
//! silence and sequence rules; one-minute rollups. Pure state and values,
//! no I/O: alerts and rollups come out as rows for the batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::anomaly::AnomalyConfig;
use super::rules::{RuleConfig, RuleState, State};
pub use super::series::Outputs;
use super::series::{alert, run_released, DeviceState, Series, Steps};
use super::window::Layout;
pub use crate::alerts::Alert;
pub use crate::model::Rollup;
use crate::model::{Micros, MICROS_PER_SEC};

/// `[analytics]`: what the shard workers compute.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsConfig {
    /// Turn edge analytics off entirely (readings are still stored).
    pub enabled: bool,
    /// Sliding windows per series, in seconds; their statistics go into
    /// each alert's detail.
    pub windows_secs: Vec<u64>,
    /// Buckets per window: a window slides in steps of its length divided
    /// by this, and holds this many 32-byte aggregates whatever the rate.
    pub window_buckets: usize,
    /// Readings up to this many seconds out of order are put back in
    /// order; later ones are stored but kept out of the analytics.
    pub lateness_secs: f64,
    /// Write one-minute rollups (count, min, max, avg) per series.
    pub rollups: bool,
    /// PostgreSQL NOTIFY channel for alerts ("" = none).
    pub notify_channel: String,
    /// Alerts are published (QoS 1, after commit) to this prefix followed
    /// by the device id ("" = none).
    pub alert_topic_prefix: String,
    /// A series that receives nothing for this many seconds is evicted, its
    /// final (partial) minute's rollup written; it starts afresh (detector
    /// warm-up included) if the metric comes back.
    pub series_idle_secs: u64,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        AnalyticsConfig {
            enabled: true,
            windows_secs: vec![10, 60, 300],
            window_buckets: 5,
            lateness_secs: 2.0,
            rollups: true,
            notify_channel: "edge_alerts".into(),
            alert_topic_prefix: "alerts/".into(),
            series_idle_secs: 3600,
        }
    }
}

/// What a worker's analytics hold.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Footprint {
    pub series: usize,
    /// Windows, detectors, rules and the series' own fields.
    pub state_bytes: usize,
    /// Readings held for reordering: with the default lateness of 2 s, 32
    /// bytes a series at 1 reading/s, 3.2 KB at 100 readings/s.
    pub held_bytes: usize,
}

/// A worker's analytics for all its devices.
pub struct Analytics {
    config: Arc<AnalyticsConfig>,
    lateness: Micros,
    steps: Steps,
    devices: HashMap<Arc<str>, DeviceState>,
    /// Metric names, each held once for all the series that have it.
    metrics: HashSet<Arc<str>>,
    /// Scratch space for readings released by a reorder buffer.
    released: Vec<(Micros, f64)>,
    /// The analytics' memory as of the last tick.
    footprint: Footprint,
    /// Series held, over all devices.
    series: usize,
    max_series: usize,
    max_series_per_device: usize,
    /// Series evicted so far (idle, or to stay under `max_series`).
    pub evicted: u64,
}

impl Analytics {
    pub fn new(
        config: Arc<AnalyticsConfig>,
        anomaly: AnomalyConfig,
        rules: Arc<Vec<RuleConfig>>,
    ) -> Analytics {
        let durations: Vec<Micros> = config
            .windows_secs
            .iter()
            .map(|&s| (s as Micros).saturating_mul(MICROS_PER_SEC))
            .collect();
        Analytics {
            steps: Steps {
                layout: Layout::new(&durations, config.window_buckets),
                anomaly: anomaly.prepare(),
                rules,
                rollups: config.rollups,
            },
            lateness: (config.lateness_secs * MICROS_PER_SEC as f64) as Micros,
            config,
            devices: HashMap::new(),
            metrics: HashSet::new(),
            released: Vec::new(),
            footprint: Footprint::default(),
            series: 0,
            max_series: usize::MAX,
            max_series_per_device: usize::MAX,
            evicted: 0,
        }
    }

    /// Caps the series held: `per_device` for one device (a message that
    /// would pass it is refused by [`Analytics::admits`]), `total` over all
    /// (the longest-idle series are evicted to stay under it).
    pub fn with_limits(mut self, per_device: usize, total: usize) -> Analytics {
        self.max_series_per_device = per_device.max(1);
        self.max_series = total.max(1);
        self
    }

    /// Series held, over all devices.
    pub fn series(&self) -> usize {
        self.series
    }

    /// False when the metric names of one message would give `device` more
    /// than `limits.max_series_per_device` distinct names (its series and
    /// the new names together).
    pub fn admits<'m>(
        &self,
        device: &str,
        metrics: impl ExactSizeIterator<Item = &'m str>,
    ) -> bool {
        if !self.config.enabled {
            return true;
        }
        let series = self
            .devices
            .get(device)
            .map(|d| &d.series[..])
            .unwrap_or(&[]);
        if series.len() + metrics.len() <= self.max_series_per_device {
            // Even if every name were new it would fit: nearly every message.
            return true;
        }
        let mut new: HashSet<&str> = HashSet::new();
        for m in metrics {
            if series.binary_search_by(|s| (*s.metric).cmp(m)).is_err()
                && new.insert(m)
                && series.len() + new.len() > self.max_series_per_device
            {
                return false;
            }
        }
        true
    }

    /// Evicts series that received nothing since `cutoff`, and then the
    /// longest-idle ones while more than `keep` remain; each evicted series
    /// releases what it held for reordering and emits its last rollup.
    pub fn evict(&mut self, cutoff: Micros, keep: usize, out: &mut Outputs) {
        let mut limit = cutoff;
        if self.series > keep {
            let mut arrivals: Vec<Micros> = self
                .devices
                .values()
                .flat_map(|d| d.series.iter().map(|s| s.last_arrival))
                .collect();
            let cut = self.series - keep;
            arrivals.select_nth_unstable(cut - 1);
            limit = limit.max(arrivals[cut - 1].saturating_add(1));
        }
        let Analytics {
            steps,
            devices,
            released,
            metrics,
            ..
        } = self;
        let mut evicted = 0usize;
        devices.retain(|device, state| {
            let DeviceState {
                series, sequences, ..
            } = state;
            series.retain_mut(|s| {
                if s.last_arrival >= limit {
                    return true;
                }
                released.clear();
                s.reorder.flush(|t, v| released.push((t, v)));
                run_released(steps, s, sequences, device, released, out);
                let newest = s.windows.newest().unwrap_or(0);
                out.rollups.extend(s.minute.take(newest, device, &s.metric));
                evicted += 1;
                false
            });
            !state.series.is_empty() || state.silence.iter().any(|(_, s)| s.is_raised())
        });
        if evicted > 0 {
            // Names no series uses any more.
            metrics.retain(|m| Arc::strong_count(m) > 1);
        }
        self.series -= evicted;
        self.evicted += evicted as u64;
    }

    /// One numeric reading of `metric` from `device` at `t`, received at
    /// `now` (silence is about arrival, not reading time).
    pub fn observe(
        &mut self,
        device: &Arc<str>,
        metric: &str,
        t: Micros,
        v: f64,
        now: Micros,
        out: &mut Outputs,
    ) {
        self.observe_all(device, [(metric, t, v)], now, out);
    }

    /// The numeric readings `(metric, t, v)` of one message from `device`,
    /// received at `now`, in order: as many [`observe`](Self::observe)
    /// calls, with the device looked up once for them all (again only
    /// after an eviction).
    pub fn observe_all<'m>(
        &mut self,
        device: &Arc<str>,
        readings: impl IntoIterator<Item = (&'m str, Micros, f64)>,
        now: Micros,
        out: &mut Outputs,
    ) {
        if !self.config.enabled {
            return;
        }
        let mut readings = readings.into_iter().peekable();
        while readings.peek().is_some() {
            // Set when eviction made no room (never expected): the next
            // reading goes in regardless, so no loop here can spin.
            let mut over = false;
            if self.series >= self.max_series {
                // Make room for a tenth at once, so the sort is amortised.
                let keep = self.max_series - self.max_series.div_ceil(10);
                self.evict(Micros::MIN, keep, out);
                over = self.series >= self.max_series;
            }
            let Analytics {
                steps,
                lateness,
                devices,
                metrics,
                released,
                series: count,
                max_series,
                ..
            } = self;
            let state = match devices.get_mut(device) {
                Some(state) => state,
                None => devices
                    .entry(device.clone())
                    .or_insert_with(|| DeviceState::new(device, &steps.rules)),
            };
            for (i, s) in &mut state.silence {
                if let Some(tr) = s.seen(now) {
                    out.alerts.push(alert(
                        now,
                        device,
                        "",
                        &steps.rules[*i].name,
                        tr,
                        None,
                        "{}".into(),
                    ));
                }
            }
            // Up to the next reading that finds the series at their cap.
            while *count < *max_series || std::mem::take(&mut over) {
                let Some((metric, t, v)) = readings.next() else {
                    break;
                };
                let at = match state.series.binary_search_by(|s| (*s.metric).cmp(metric)) {
                    Ok(at) => at,
                    Err(at) => {
                        let metric = match metrics.get(metric) {
                            Some(m) => m.clone(),
                            None => {
                                let m: Arc<str> = Arc::from(metric);
                                metrics.insert(m.clone());
                                m
                            }
                        };
                        state.series.reserve_exact(1);
                        let series = Series::new(
                            &steps.layout,
                            &steps.anomaly,
                            &steps.rules,
                            device,
                            metric,
                        );
                        state.series.insert(at, series);
                        *count += 1;
                        at
                    }
                };
                let series = &mut state.series[at];
                released.clear();
                if !series
                    .reorder
                    .push(*lateness, t, v, |t, v| released.push((t, v)))
                {
                    out.late += 1;
                    continue;
                }
                series.last_arrival = now;
                run_released(steps, series, &mut state.sequences, device, released, out);
            }
        }
    }

    /// Replaces the rules (SIGHUP reload). A rule whose settings did not
    /// change keeps its state; an alert still raised under a rule that
    /// changed or went away is cleared now, so none stays open forever.
    pub fn set_rules(&mut self, rules: Arc<Vec<RuleConfig>>, now: Micros, out: &mut Outputs) {
        let old = std::mem::replace(&mut self.steps.rules, rules);
        let new = &self.steps.rules;
        let carry = |i: usize| new.iter().position(|r| Some(r) == old.get(i));
        let closed = |name: &str| json!({ "reason": format!("rule {name} changed or removed") });
        for (device, state) in &mut self.devices {
            for series in &mut state.series {
                let metric = &*series.metric;
                let mut kept = Vec::new();
                for rule_state in std::mem::take(&mut series.rules).into_vec() {
                    let i = rule_state.rule();
                    match carry(i) {
                        Some(j) => kept.push(rule_state.moved_to(j)),
                        None if rule_state.is_raised() => {
                            let name = &old[i].name;
                            out.alerts.push(alert(
                                now,
                                device,
                                metric,
                                name,
                                State::Cleared,
                                None,
                                closed(name),
                            ));
                        }
                        None => {}
                    }
                }
                for (j, r) in new.iter().enumerate() {
                    if r.applies(device, metric) && !kept.iter().any(|k| k.rule() == j) {
                        kept.push(RuleState::new(j));
                    }
                }
                series.rules = kept.into_boxed_slice();
            }
            let fresh = DeviceState::new(device, new);
            let mut silence = Vec::new();
            for (j, s) in fresh.silence {
                let previous = state
                    .silence
                    .iter()
                    .find(|(i, _)| carry(*i) == Some(j))
                    .map(|(_, s)| s.clone());
                silence.push((j, previous.unwrap_or(s)));
            }
            for (i, s) in &state.silence {
                if carry(*i).is_none() && s.is_raised() {
                    let name = &old[*i].name;
                    out.alerts.push(alert(
                        now,
                        device,
                        "",
                        name,
                        State::Cleared,
                        None,
                        closed(name),
                    ));
                }
            }
            state.silence = silence;
            state.sequences = fresh
                .sequences
                .into_iter()
                .map(|(j, q)| {
                    let previous = state
                        .sequences
                        .iter()
                        .find(|(i, _)| carry(*i) == Some(j))
                        .map(|(_, q)| q.clone());
                    (j, previous.unwrap_or(q))
                })
                .collect();
        }
    }

    /// The analytics' memory as of the last tick (measured in the pass the
    /// tick makes over every series anyway).
    pub fn memory(&self) -> Footprint {
        self.footprint
    }

    /// At shutdown: runs every reading still held for reordering through
    /// the analytics (so the last `lateness_secs` are not left out) and
    /// emits each series' current, partial minute rollup (the database
    /// merges it with the rest of that minute after a restart).
    pub fn drain(&mut self, out: &mut Outputs) {
        self.release_idle(|_| true, out);
        for (device, state) in &mut self.devices {
            for series in &mut state.series {
                let newest = series.windows.newest().unwrap_or(0);
                out.rollups
                    .extend(series.minute.take(newest, device, &series.metric));
            }
        }
    }

    /// Releases the held readings of series for which `idle(last arrival)`
    /// holds: nothing newer will come to push them out. Returns the memory
    /// of every series, measured in the same pass.
    fn release_idle(&mut self, idle: impl Fn(Micros) -> bool, out: &mut Outputs) -> Footprint {
        let Analytics {
            steps,
            devices,
            released,
            ..
        } = self;
        let mut footprint = Footprint::default();
        for (device, state) in devices.iter_mut() {
            for series in &mut state.series {
                if !series.reorder.is_empty() && idle(series.last_arrival) {
                    released.clear();
                    series.reorder.flush(|t, v| released.push((t, v)));
                    run_released(steps, series, &mut state.sequences, device, released, out);
                }
                footprint.series += 1;
                footprint.state_bytes += series.memory();
                footprint.held_bytes += series.reorder.heap_bytes();
            }
        }
        footprint
    }

    /// A clock tick: silence rules, and the held readings of series that
    /// went quiet for longer than the lateness.
    pub fn tick(&mut self, now: Micros, out: &mut Outputs) {
        let lateness = self.lateness;
        let idle = (self.config.series_idle_secs as Micros).saturating_mul(MICROS_PER_SEC);
        self.evict(now.saturating_sub(idle), self.max_series, out);
        self.footprint = self.release_idle(|last_arrival| now - last_arrival > lateness, out);
        for (device, state) in &mut self.devices {
            for (i, s) in &mut state.silence {
                let rule = &self.steps.rules[*i];
                if let Some(tr) = s.tick(rule, now) {
                    let detail = json!({ "silent_for_secs": rule.for_secs });
                    out.alerts
                        .push(alert(now, device, "", &rule.name, tr, None, detail));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Arc<Vec<RuleConfig>> {
        let text = r#"
            [[rules]]
            name = "hot"
            kind = "above"
            metric = "temp*"
            threshold = 30.0
            clear = 28.0
            [[rules]]
            name = "quiet"
            kind = "silence"
            for_secs = 60.0
            [[rules]]
            name = "hot_then_cold"
            kind = "sequence"
            first = "hot"
            then = "cold"
            within_secs = 120.0
            [[rules]]
            name = "cold"
            kind = "below"
            metric = "temp*"
            threshold = 10.0
        "#;
        #[derive(Deserialize)]
        struct R {
            rules: Vec<RuleConfig>,
        }
        Arc::new(
            toml::from_str::<R>(text)
                .map(|r| r.rules)
                .unwrap_or_default(),
        )
    }

    /// Analytics with the test rules and `lateness_secs`, a device "d1",
    /// and an empty output.
    fn analytics(lateness_secs: f64) -> (Analytics, Arc<str>, Outputs) {
        let config = AnalyticsConfig {
            lateness_secs,
            ..AnalyticsConfig::default()
        };
        let a = Analytics::new(Arc::new(config), AnomalyConfig::default(), rules());
        (a, Arc::from("d1"), Outputs::default())
    }

    /// A message's readings through [`Analytics::observe_all`] give what
    /// one [`Analytics::observe`] call each gives, at the series cap too
    /// (evictions between the readings of one message, the device's own
    /// series among them).
    #[test]
    fn observing_a_message_at_once_is_observing_each_reading() {
        let s = MICROS_PER_SEC;
        let run = |at_once: bool| {
            let (a, _, mut out) = analytics(2.0);
            let mut a = a.with_limits(8, 5);
            for m in 0..40i64 {
                let now = m * 30 * s;
                let device: Arc<str> = Arc::from(format!("d{}", m % 3).as_str());
                let readings: Vec<(String, Micros, f64)> = (0..4)
                    .map(|k| {
                        let v = ((m + k) * 7 % 13) as f64 * 3.0;
                        (format!("temp{}", (m + k) % 6), now + k, v)
                    })
                    .collect();
                let numbers = readings.iter().map(|(n, t, v)| (n.as_str(), *t, *v));
                if at_once {
                    a.observe_all(&device, numbers, now, &mut out);
                } else {
                    for (n, t, v) in numbers {
                        a.observe(&device, n, t, v, now, &mut out);
                    }
                }
                assert!(a.series() <= 5);
                // Silence, raised now and then, cleared by the next message.
                if m % 10 == 9 {
                    a.tick(now + 100 * s, &mut out);
                }
            }
            a.drain(&mut out);
            (out.alerts, out.rollups, out.late, a.evicted)
        };
        let (each, at_once) = (run(false), run(true));
        assert!(each.3 > 0, "the cap evicted series");
        let rules: std::collections::HashSet<&str> =
            each.0.iter().map(|x| x.rule.as_str()).collect();
        assert!(
            rules.contains("hot") && rules.contains("quiet"),
            "{rules:?}"
        );
        assert!(!each.1.is_empty(), "rollups");
        assert_eq!(each, at_once);
    }

    /// Readings held for reordering reach the rules once the series has
    /// been quiet for longer than the lateness (a tick), and at shutdown
    /// (drain), which also emits the partial minute's rollup.
    #[test]
    fn held_readings_are_released_when_the_series_goes_quiet_and_at_shutdown() {
        let (mut a, dev, mut out) = analytics(2.0);
        let s = MICROS_PER_SEC;
        // 20 then 35: "hot" raises on the second reading, which is held.
        a.observe(&dev, "temperature", 0, 20.0, 0, &mut out);
        a.observe(&dev, "temperature", s, 35.0, s, &mut out);
        assert!(out.alerts.is_empty());
        a.tick(2 * s, &mut out);
        assert!(out.alerts.is_empty(), "not quiet for longer than 2 s yet");
        a.tick(4 * s, &mut out);
        let raised: Vec<&str> = out.alerts.iter().map(|x| x.rule.as_str()).collect();
        assert_eq!(raised, ["hot"]);
        assert!(out.rollups.is_empty());
        a.observe(&dev, "temperature", 5 * s, 36.0, 5 * s, &mut out);
        a.drain(&mut out);
        assert_eq!(out.rollups.len(), 1);
        assert_eq!(out.rollups[0].count, 3);
        assert_eq!(out.rollups[0].max, 36.0);
    }

    /// The analytics state of one series with the default windows and
    /// detector and two rules, after a long stream at 1 reading/s, as the
    /// footprint gauge counts it (the `analytics_memory` test measures the
    /// allocations of many series, with what the maps around them cost).
    #[test]
    fn a_series_holds_under_one_kib() {
        let (mut a, dev, mut out) = analytics(AnalyticsConfig::default().lateness_secs);
        for i in 0..5_000i64 {
            let t = i * MICROS_PER_SEC;
            let v = 20.0 + (i % 17) as f64 * 0.1;
            a.observe(&dev, "temperature", t, v, t, &mut out);
            out.rollups.clear();
        }
        let series = &a.devices[&dev].series;
        assert_eq!(series.len(), 1);
        let s = &series[0];
        assert!(
            s.memory() + s.reorder.heap_bytes() <= 1024,
            "{} bytes of state: inline {}, windows {}, rules {}; {} held",
            s.memory(),
            std::mem::size_of::<Series>(),
            s.windows.heap_bytes(),
            std::mem::size_of_val(&*s.rules),
            s.reorder.heap_bytes()
        );
    }

    #[test]
    fn alerts_rollups_silence_and_sequence() {
        let (mut a, dev, mut out) = analytics(0.0);
        let s = MICROS_PER_SEC;
        for (i, v) in [20.0, 31.0, 32.0, 29.0, 27.0, 5.0, 20.0].iter().enumerate() {
            a.observe(
                &dev,
                "temperature",
                i as i64 * 20 * s,
                *v,
                i as i64 * 20 * s,
                &mut out,
            );
        }
        let got: Vec<(&str, &str)> = out
            .alerts
            .iter()
            .map(|x| (x.rule.as_str(), x.state.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("hot", "raised"),
                ("hot", "cleared"),
                ("cold", "raised"),
                ("hot_then_cold", "raised"),
                ("hot_then_cold", "cleared"),
                ("cold", "cleared"),
            ]
        );
        assert!(out.alerts[0].detail.get("window_60s").is_some());
        // Two finished minutes: [0, 60) and [60, 120).
        assert_eq!(out.rollups.len(), 2);
        assert_eq!((out.rollups[0].count, out.rollups[0].max), (3, 32.0));
        let mut quiet = Outputs::default();
        a.tick(6 * 20 * s + 61 * s, &mut quiet);
        assert_eq!(
            quiet
                .alerts
                .iter()
                .map(|x| (x.rule.as_str(), x.state.as_str()))
                .collect::<Vec<_>>(),
            vec![("quiet", "raised")]
        );
        let json = out.alerts[0].to_json();
        assert!(
            serde_json::from_str::<serde_json::Value>(&json).is_ok(),
            "{json}"
        );
    }

    /// Series idle past `series_idle_secs` are evicted at the tick with
    /// their final rollup, and the total cap evicts the longest idle.
    #[test]
    fn idle_and_surplus_series_are_evicted_with_their_rollups() {
        let (a, _, mut out) = analytics(0.0);
        let mut a = a.with_limits(2, 3);
        for i in 0..5 {
            let dev: Arc<str> = Arc::from(format!("d{i}").as_str());
            a.observe(
                &dev,
                "m",
                i * MICROS_PER_SEC,
                1.0,
                i * MICROS_PER_SEC,
                &mut out,
            );
            assert!(a.series() <= 3);
        }
        assert!(a.evicted >= 2);
        let evicted_rollups = out.rollups.len();
        assert_eq!(evicted_rollups as u64, a.evicted, "one final rollup each");
        assert!(a.admits("d4", ["m", "n"].into_iter()));
        assert!(
            !a.admits("d4", ["n", "o"].into_iter()),
            "a third series for d4"
        );
        a.tick(10_000 * MICROS_PER_SEC, &mut out);
        assert_eq!(a.series(), 0, "all idle past the default hour");
        assert_eq!(out.rollups.len(), 5);
    }

    #[test]
    fn late_readings_are_counted_and_kept_out() {
        let (mut a, dev, mut out) = analytics(AnalyticsConfig::default().lateness_secs);
        let s = MICROS_PER_SEC;
        a.observe(&dev, "temperature", 100 * s, 20.0, 0, &mut out);
        a.observe(&dev, "temperature", 99 * s, 20.0, 0, &mut out);
        a.observe(&dev, "temperature", 110 * s, 20.0, 0, &mut out);
        a.observe(&dev, "temperature", 50 * s, 99.0, 0, &mut out);
        assert_eq!(out.late, 1);
        assert!(out.alerts.is_empty());
    }
}
