//! The demo's detection at the edge, against the simulator's ground truth:
//! the rules it runs (thresholds scaled to the sample rate), and the table
//! of injected anomalies by kind, how many raised an alert, how soon, and
//! the alerts that matched no anomaly (false alarms).

use std::collections::BTreeMap;

use firmware_sim::{episodes, AnomalyKind, SimConfig, METRICS};

use crate::analytics::rules::{Kind, RuleConfig};
use crate::model::Micros;

/// How long after an episode's last sample an alert still counts for it.
const GRACE_MS: i64 = 3_000;

/// The demo's rules for devices sampled `rate` times a second: a jump per
/// sample larger than noise ever makes (spikes and level shifts, by
/// metric), a value frozen for half a second (stuck), a device silent for
/// 1.5 s (dropout), and the anomaly detector (drift and the rest).
pub fn rules(rate: f64) -> Vec<RuleConfig> {
    let rule = |name: &str, kind: Kind, metric: &str| RuleConfig {
        name: name.into(),
        kind,
        metric: metric.into(),
        devices: "*".into(),
        threshold: None,
        clear: None,
        for_secs: 0.0,
        clear_for_secs: 0.0,
        first: None,
        then: None,
        within_secs: 0.0,
    };
    // Per-sample jumps: 14 to 16 times the noise of a difference of two
    // samples, and half the smallest injected shift (3 daily amplitudes).
    let jump = |name: &str, metric: &str, per_sample: f64| RuleConfig {
        threshold: Some(per_sample * rate),
        ..rule(name, Kind::Rate, metric)
    };
    vec![
        jump("jump_temperature", "temperature", 6.0),
        jump("jump_humidity", "humidity", 15.0),
        jump("jump_pressure", "pressure", 450.0),
        RuleConfig {
            threshold: Some(0.0),
            for_secs: 0.5,
            ..rule("stuck", Kind::Stuck, "*")
        },
        RuleConfig {
            for_secs: 1.5,
            ..rule("silent", Kind::Silence, "*")
        },
        RuleConfig {
            threshold: Some(0.9),
            clear: Some(0.5),
            ..rule("anomaly", Kind::Anomaly, "*")
        },
    ]
}

/// A raised alert as read back from `edge.alerts`.
#[derive(Debug, Clone, PartialEq)]
pub struct Raised {
    pub time_ms: i64,
    pub device: String,
    pub metric: String,
    pub rule: String,
}

/// One injected anomaly and the first alert that caught it.
#[derive(Debug, Clone, PartialEq)]
struct Injected {
    device: String,
    metric: String,
    kind: AnomalyKind,
    start_ms: i64,
    end_ms: i64,
    caught: Option<(i64, String)>,
}

/// What a simulator run injected: (device id, metric, kind, first and last
/// sample time in ms).
fn injected(config: &SimConfig, start_ms: i64) -> Vec<Injected> {
    let step = config.step();
    (0..config.devices)
        .flat_map(|d| episodes(config, d).into_iter().map(move |e| (d, e)))
        .map(|(d, e)| Injected {
            device: firmware_sim::device_id(&config.device_prefix, d),
            metric: if e.kind == AnomalyKind::Dropout {
                String::new()
            } else {
                METRICS[e.metric].0.to_string()
            },
            kind: e.kind,
            start_ms: start_ms + e.start as i64 * step,
            end_ms: start_ms + (e.start + e.len - 1) as i64 * step,
            caught: None,
        })
        .collect()
}

/// The detection table: per kind, injected, detected, detection delay
/// (median and worst, in reading time) and the rules that caught them;
/// then the false alarms. Returns the table and whether every spike and
/// level shift was caught.
pub fn table(runs: &[(SimConfig, i64)], alerts: &[Raised]) -> (String, bool) {
    let mut all: Vec<Injected> = runs
        .iter()
        .flat_map(|(config, start_ms)| injected(config, *start_ms))
        .collect();
    // Once the devices have stopped, silence is the truth, not an alarm.
    let run_end = runs
        .iter()
        .map(|(c, start)| start + c.count.unwrap_or(0) as i64 * c.step())
        .max()
        .unwrap_or(i64::MAX);
    let (alerts, after): (Vec<&Raised>, Vec<&Raised>) =
        alerts.iter().partition(|a| a.time_ms <= run_end);
    let mut matched = vec![false; alerts.len()];
    for inj in &mut all {
        for (i, a) in alerts.iter().enumerate() {
            let same_series = a.device == inj.device
                && (a.metric == inj.metric
                    || (inj.kind == AnomalyKind::Dropout && a.metric.is_empty()));
            if same_series && a.time_ms >= inj.start_ms && a.time_ms <= inj.end_ms + GRACE_MS {
                matched[i] = true;
                if inj.caught.as_ref().is_none_or(|(t, _)| a.time_ms < *t) {
                    inj.caught = Some((a.time_ms, a.rule.clone()));
                }
            }
        }
    }
    let mut by_kind: BTreeMap<&str, Vec<&Injected>> = BTreeMap::new();
    for inj in &all {
        by_kind.entry(inj.kind.name()).or_default().push(inj);
    }
    let mut out = format!(
        "  {:<8} {:>8} {:>8} {:>12} {:>12}  {}\n",
        "anomaly", "injected", "alerted", "delay p50", "delay max", "rules"
    );
    for (kind, list) in &by_kind {
        let mut delays: Vec<i64> = list
            .iter()
            .filter_map(|i| i.caught.as_ref().map(|(t, _)| t - i.start_ms))
            .collect();
        delays.sort_unstable();
        let mut rules: Vec<&str> = list
            .iter()
            .filter_map(|i| i.caught.as_ref().map(|(_, r)| r.as_str()))
            .collect();
        rules.sort_unstable();
        rules.dedup();
        let ms = |v: Option<&i64>| v.map_or("-".into(), |v| format!("{v} ms"));
        out.push_str(&format!(
            "  {:<8} {:>8} {:>8} {:>12} {:>12}  {}\n",
            kind,
            list.len(),
            delays.len(),
            ms(delays.get(delays.len() / 2)),
            ms(delays.last()),
            rules.join(", ")
        ));
    }
    let mut false_by_rule: BTreeMap<&str, usize> = BTreeMap::new();
    for (a, _) in alerts.iter().zip(&matched).filter(|(_, m)| !**m) {
        *false_by_rule.entry(a.rule.as_str()).or_default() += 1;
    }
    let false_alarms: usize = false_by_rule.values().sum();
    let by_rule: Vec<String> = false_by_rule
        .iter()
        .map(|(rule, n)| format!("{rule} {n}"))
        .collect();
    out.push_str(&format!(
        "  false alarms: {false_alarms} of {} raised alerts matched no injected anomaly{}\n",
        alerts.len(),
        if by_rule.is_empty() {
            String::new()
        } else {
            format!(" ({})", by_rule.join(", "))
        }
    ));
    if !after.is_empty() {
        out.push_str(&format!(
            "  and {} raised after the devices stopped (silence at the end of the run)\n",
            after.len()
        ));
    }
    let must = all
        .iter()
        .filter(|i| matches!(i.kind, AnomalyKind::Spike | AnomalyKind::Shift));
    let complete = must.clone().all(|i| i.caught.is_some());
    (out, complete)
}

/// Milliseconds from microseconds.
pub fn ms(t: Micros) -> i64 {
    t.div_euclid(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_are_valid() {
        let rules = rules(20.0);
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        for (i, r) in rules.iter().enumerate() {
            assert!(r.validate(i, &names).is_ok(), "{r:?}");
        }
    }

    #[test]
    fn alerts_are_matched_to_episodes_by_series_and_time() {
        let config = SimConfig {
            devices: 2,
            rate: 10.0,
            count: Some(400),
            metrics: 3,
            anomalies: 2,
            anomaly_len: 20,
            device_prefix: "t-".into(),
            ..SimConfig::default()
        };
        let start = 1_000_000;
        let truth = injected(&config, start);
        assert_eq!(truth.len(), 4);
        // An alert at each episode's start, plus one elsewhere.
        let mut alerts: Vec<Raised> = truth
            .iter()
            .map(|i| Raised {
                time_ms: i.start_ms + 100,
                device: i.device.clone(),
                metric: i.metric.clone(),
                rule: "r".into(),
            })
            .collect();
        alerts.push(Raised {
            time_ms: start,
            device: "t-0000".into(),
            metric: "temperature".into(),
            rule: "r".into(),
        });
        let (text, complete) = table(&[(config, start)], &alerts);
        assert!(complete, "{text}");
        assert!(text.contains("false alarms: 1 of 5"), "{text}");
        assert!(text.contains("100 ms"), "{text}");
    }
}
