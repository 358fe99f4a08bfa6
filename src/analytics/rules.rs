//! Rules: conditions on a series (or a device) that raise and clear alerts.
//!
//! Every rule is a small state machine per series, driven in time order:
//! a condition must hold for `for_secs` before the alert is raised, and the
//! clear condition (with hysteresis: `clear` instead of `threshold`) must
//! hold for `clear_for_secs` before it clears. So a noisy crossing gives one
//! raise and one clear, never one alert per reading.
//!
//! Kinds: `above`, `below` (the value), `rate` (absolute change per second),
//! `stuck` (no change for `for_secs`), `anomaly` (the detector's score),
//! `silence` (no reading from a device for `for_secs`, checked on a clock
//! tick), and `sequence` (rule `first` raised, then rule `then` within
//! `within_secs`, on the same device: the complex-event case).

use serde::{Deserialize, Serialize};

pub use crate::alerts::State;
use crate::model::{Micros, MICROS_PER_SEC};
use crate::settings::Invalid;

/// What kind of condition a rule checks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Above,
    Below,
    Rate,
    Stuck,
    Anomaly,
    Silence,
    Sequence,
}

/// One `[[rules]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name, stored in `alerts.rule`.
    pub name: String,
    pub kind: Kind,
    /// Metric name pattern; `*` matches any run of characters.
    #[serde(default = "any")]
    pub metric: String,
    /// Device id pattern; `*` matches any run of characters.
    #[serde(default = "any")]
    pub devices: String,
    /// Level that raises (above, below, rate, anomaly (default 0.5); stuck:
    /// the largest change still counted as "no change").
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Level that clears (hysteresis); defaults to `threshold`.
    #[serde(default)]
    pub clear: Option<f64>,
    /// Seconds the condition must hold before raising.
    #[serde(default)]
    pub for_secs: f64,
    /// Seconds the clear condition must hold before clearing.
    #[serde(default)]
    pub clear_for_secs: f64,
    /// `sequence`: the rule that must raise first...
    #[serde(default)]
    pub first: Option<String>,
    /// ...and the rule that must raise after it...
    #[serde(default)]
    pub then: Option<String>,
    /// ...within this many seconds.
    #[serde(default)]
    pub within_secs: f64,
}

fn any() -> String {
    "*".into()
}

/// True when `text` matches `pattern`, where `*` matches any run.
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

impl RuleConfig {
    /// Checks a rule; `names` are all rule names (for `sequence`).
    ///
    /// # Errors
    /// [`Invalid`] keyed by the rule's position and name (`rules[2] (hot)`)
    /// when the rule cannot work or its name is not unique among `names`.
    pub fn validate(&self, index: usize, names: &[&str]) -> Result<(), Invalid> {
        let key = || format!("rules[{index}] ({})", self.name);
        if names.iter().filter(|n| **n == self.name).count() > 1 {
            return Err(Invalid::new(key(), "rule names must be unique"));
        }
        self.check(names)
            .map_err(|reason| Invalid::new(key(), reason))
    }

    /// The reason a rule cannot work, if any.
    fn check(&self, names: &[&str]) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("name must not be empty".into());
        }
        let needs_threshold = matches!(self.kind, Kind::Above | Kind::Below | Kind::Rate);
        if needs_threshold && self.threshold.is_none() {
            return Err(format!("kind {:?} needs threshold", self.kind).to_lowercase());
        }
        if let (Some(t), Some(c)) = (self.threshold, self.clear) {
            let wrong_side = match self.kind {
                Kind::Above | Kind::Rate | Kind::Anomaly => c > t,
                Kind::Below => c < t,
                _ => false,
            };
            if wrong_side {
                return Err("clear must be on the normal side of threshold (hysteresis)".into());
            }
        }
        if !(self.for_secs >= 0.0 && self.clear_for_secs >= 0.0) {
            return Err("for_secs and clear_for_secs must be >= 0".into());
        }
        if self.kind == Kind::Silence && self.for_secs <= 0.0 {
            return Err("silence needs for_secs > 0".into());
        }
        if self.kind == Kind::Sequence {
            for (key, name) in [("first", &self.first), ("then", &self.then)] {
                match name {
                    Some(n) if names.contains(&n.as_str()) && n != &self.name => {}
                    _ => return Err(format!("sequence needs {key} = the name of another rule")),
                }
            }
            if self.within_secs <= 0.0 {
                return Err("sequence needs within_secs > 0".into());
            }
        }
        Ok(())
    }

    /// True when the rule looks at readings of `metric` from `device`.
    pub fn applies(&self, device: &str, metric: &str) -> bool {
        !matches!(self.kind, Kind::Silence | Kind::Sequence)
            && glob(&self.devices, device)
            && glob(&self.metric, metric)
    }
}

/// The state machine of one rule on one series: 32 bytes, as there is one
/// per rule and series.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleState {
    /// Since when the condition (or, when raised, the clear condition)
    /// holds; `NONE` when it does not.
    since: Micros,
    /// Rate: the previous reading; stuck: the start of the current run of
    /// equal values (time `NONE` before the first).
    memo: (Micros, f64),
    /// The rule's index in the rule list.
    rule: u32,
    raised: bool,
}

/// "No time" in [`RuleState`].
const NONE: Micros = Micros::MIN;

impl RuleState {
    /// The state of rule `rule` (its index in the rule list) on a new
    /// series.
    pub fn new(rule: usize) -> RuleState {
        RuleState {
            since: NONE,
            memo: (NONE, 0.0),
            rule: rule as u32,
            raised: false,
        }
    }

    /// The rule's index in the rule list.
    pub fn rule(&self) -> usize {
        self.rule as usize
    }

    /// The same state for the same rule at index `rule` of a new rule
    /// list (a reload that kept it).
    pub fn moved_to(self, rule: usize) -> RuleState {
        RuleState {
            rule: rule as u32,
            ..self
        }
    }

    /// Feeds one reading (and the detector's score); returns a transition
    /// when the alert is raised or cleared.
    pub fn update(&mut self, rule: &RuleConfig, t: Micros, v: f64, score: f64) -> Option<State> {
        let threshold = rule.threshold.unwrap_or(match rule.kind {
            Kind::Anomaly => 0.5,
            _ => 0.0,
        });
        let clear = rule.clear.unwrap_or(threshold);
        let (bad, good) = match rule.kind {
            Kind::Above => (v > threshold, v <= clear),
            Kind::Below => (v < threshold, v >= clear),
            Kind::Anomaly => (score >= threshold, score < clear),
            Kind::Rate => {
                let (pt, pv) = self.memo;
                let rate = (pt != NONE && t > pt)
                    .then(|| (v - pv).abs() / ((t - pt) as f64 / MICROS_PER_SEC as f64));
                self.memo = (t, v);
                match rate {
                    Some(r) => (r > threshold, r <= clear),
                    None => return None,
                }
            }
            Kind::Stuck => {
                let run_start = match self.memo {
                    (start, first) if start != NONE && (v - first).abs() <= threshold => start,
                    _ => {
                        self.memo = (t, v);
                        t
                    }
                };
                let stuck = t.saturating_sub(run_start) >= secs(rule.for_secs);
                // Duration is measured by the run itself, not by `since`.
                return self.step(stuck, !stuck, t, 0, 0);
            }
            Kind::Silence | Kind::Sequence => return None,
        };
        self.step(bad, good, t, secs(rule.for_secs), secs(rule.clear_for_secs))
    }

    fn step(
        &mut self,
        bad: bool,
        good: bool,
        t: Micros,
        hold: Micros,
        clear_hold: Micros,
    ) -> Option<State> {
        let (wanted, hold) = if self.raised {
            (good, clear_hold)
        } else {
            (bad, hold)
        };
        if !wanted {
            self.since = NONE;
            return None;
        }
        if self.since == NONE {
            self.since = t;
        }
        if t.saturating_sub(self.since) < hold {
            return None;
        }
        self.raised = !self.raised;
        self.since = NONE;
        Some(if self.raised {
            State::Raised
        } else {
            State::Cleared
        })
    }

    pub fn is_raised(&self) -> bool {
        self.raised
    }
}

fn secs(s: f64) -> Micros {
    (s * MICROS_PER_SEC as f64) as Micros
}

/// Silence per device: raised when the device has sent nothing for
/// `for_secs`, cleared by its next reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Silence {
    last_seen: Option<Micros>,
    raised: bool,
}

impl Silence {
    /// A reading from the device at `t` (wall clock).
    pub fn seen(&mut self, t: Micros) -> Option<State> {
        self.last_seen = Some(self.last_seen.map_or(t, |s| s.max(t)));
        std::mem::take(&mut self.raised).then_some(State::Cleared)
    }

    /// True while the silence alert is raised.
    pub fn is_raised(&self) -> bool {
        self.raised
    }

    /// A clock tick at `now`.
    pub fn tick(&mut self, rule: &RuleConfig, now: Micros) -> Option<State> {
        let last = self.last_seen?;
        if !self.raised && now - last >= secs(rule.for_secs) {
            self.raised = true;
            return Some(State::Raised);
        }
        None
    }
}

/// Sequence per device: remembers when `first` last raised.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sequence {
    first_at: Option<Micros>,
}

impl Sequence {
    /// Another rule raised on the device at `t`; true when this completes
    /// the sequence (`first`, then `then` within the window).
    pub fn raised(&mut self, rule: &RuleConfig, name: &str, t: Micros) -> bool {
        if Some(name) == rule.first.as_deref() {
            self.first_at = Some(t);
            return false;
        }
        if Some(name) == rule.then.as_deref() {
            if let Some(first) = self.first_at {
                if t >= first && t - first <= secs(rule.within_secs) {
                    self.first_at = None;
                    return true;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(kind: Kind, threshold: f64, clear: Option<f64>, for_secs: f64) -> RuleConfig {
        RuleConfig {
            name: "r".into(),
            kind,
            metric: "*".into(),
            devices: "*".into(),
            threshold: Some(threshold),
            clear,
            for_secs,
            clear_for_secs: 0.0,
            first: None,
            then: None,
            within_secs: 0.0,
        }
    }

    const S: Micros = MICROS_PER_SEC;

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("temp*", "temperature"));
        assert!(glob("*:temp", "urn:dev:temp"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    proptest! {
        /// A signal that rises through the threshold and falls back, with
        /// noise larger than the hysteresis band can cross it many times
        /// but not the band: one raise, then one clear.
        #[test]
        fn a_noisy_crossing_raises_once_and_clears_once(noise in prop::collection::vec(-0.9f64..0.9, 300)) {
            let r = rule(Kind::Above, 80.0, Some(78.0), 0.0);
            let mut state = RuleState::new(0);
            let mut events = Vec::new();
            for (i, n) in noise.iter().enumerate() {
                // 70 -> 90 -> 70, each step plus noise within +-0.9.
                let base = if i < 150 { 70.0 + i as f64 * 20.0 / 150.0 } else { 90.0 - (i - 150) as f64 * 20.0 / 150.0 };
                if let Some(tr) = state.update(&r, i as Micros * S, base + n, 0.0) {
                    events.push(tr);
                }
            }
            prop_assert_eq!(events, vec![State::Raised, State::Cleared]);
        }
    }

    #[test]
    fn minimum_duration_filters_short_excursions() {
        let r = rule(Kind::Above, 10.0, None, 5.0);
        let mut s = RuleState::new(0);
        let values = [
            (0, 11.0),
            (3, 12.0),
            (4, 9.0),
            (5, 11.0),
            (9, 11.0),
            (10, 11.0),
            (11, 5.0),
        ];
        let got: Vec<_> = values
            .iter()
            .filter_map(|&(t, v)| s.update(&r, t * S, v, 0.0).map(|x| (t, x)))
            .collect();
        assert_eq!(got, vec![(10, State::Raised), (11, State::Cleared)]);
    }

    #[test]
    fn below_rate_stuck_and_anomaly() {
        let below = rule(Kind::Below, 5.0, Some(6.0), 0.0);
        let mut s = RuleState::new(0);
        let seq: Vec<_> = [7.0, 4.0, 5.5, 6.5]
            .iter()
            .enumerate()
            .filter_map(|(i, &v)| s.update(&below, i as Micros * S, v, 0.0))
            .collect();
        assert_eq!(seq, vec![State::Raised, State::Cleared]);

        let rate = rule(Kind::Rate, 2.0, None, 0.0);
        let mut s = RuleState::new(0);
        let seq: Vec<_> = [0.0, 1.0, 5.0, 6.0]
            .iter()
            .enumerate()
            .filter_map(|(i, &v)| s.update(&rate, i as Micros * S, v, 0.0))
            .collect();
        assert_eq!(seq, vec![State::Raised, State::Cleared]);

        let stuck = rule(Kind::Stuck, 0.0, None, 10.0);
        let mut s = RuleState::new(0);
        let seq: Vec<_> = [(0, 3.0), (5, 3.0), (10, 3.0), (12, 3.0), (13, 4.0)]
            .iter()
            .filter_map(|&(t, v)| s.update(&stuck, t * S, v, 0.0).map(|x| (t, x)))
            .collect();
        assert_eq!(seq, vec![(10, State::Raised), (13, State::Cleared)]);

        let anomaly = RuleConfig {
            threshold: None,
            ..rule(Kind::Anomaly, 0.0, None, 0.0)
        };
        let mut s = RuleState::new(0);
        let seq: Vec<_> = [0.1, 0.6, 0.2]
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| s.update(&anomaly, i as Micros * S, 1.0, p))
            .collect();
        assert_eq!(seq, vec![State::Raised, State::Cleared]);
    }

    #[test]
    fn silence_and_sequence() {
        let silence = RuleConfig {
            kind: Kind::Silence,
            ..rule(Kind::Silence, 0.0, None, 30.0)
        };
        let mut s = Silence::default();
        assert_eq!(
            s.tick(&silence, 100 * S),
            None,
            "never seen: nothing to miss"
        );
        assert_eq!(s.seen(0), None);
        assert_eq!(s.tick(&silence, 29 * S), None);
        assert_eq!(s.tick(&silence, 30 * S), Some(State::Raised));
        assert_eq!(s.tick(&silence, 40 * S), None);
        assert_eq!(s.seen(41 * S), Some(State::Cleared));

        let seq = RuleConfig {
            kind: Kind::Sequence,
            first: Some("door".into()),
            then: Some("cold".into()),
            within_secs: 60.0,
            ..rule(Kind::Sequence, 0.0, None, 0.0)
        };
        let mut q = Sequence::default();
        assert!(!q.raised(&seq, "cold", 0));
        assert!(!q.raised(&seq, "door", 10 * S));
        assert!(!q.raised(&seq, "cold", 100 * S), "too late");
        assert!(!q.raised(&seq, "door", 200 * S));
        assert!(q.raised(&seq, "cold", 230 * S));
        assert!(!q.raised(&seq, "cold", 231 * S), "once per first");
    }

    #[test]
    fn validation_names_the_problem() {
        let names = ["a", "b"];
        assert!(rule(Kind::Above, 1.0, Some(2.0), 0.0)
            .validate(0, &names)
            .is_err());
        assert!(rule(Kind::Below, 1.0, Some(0.5), 0.0)
            .validate(0, &names)
            .is_err());
        let mut no_threshold = rule(Kind::Above, 0.0, None, 0.0);
        no_threshold.threshold = None;
        assert!(no_threshold
            .validate(0, &names)
            .unwrap_err()
            .reason
            .contains("threshold"));
        let seq = RuleConfig {
            kind: Kind::Sequence,
            first: Some("a".into()),
            then: Some("zz".into()),
            within_secs: 1.0,
            ..rule(Kind::Sequence, 0.0, None, 0.0)
        };
        assert!(seq.validate(0, &names).unwrap_err().reason.contains("then"));
    }
}
