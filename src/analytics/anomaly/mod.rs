//! Streaming anomaly detection per series, O(1) time and memory per reading.
//!
//! The detector runs up to four *channels* over a series and reports the
//! largest of their scores; each channel turns a raw score in [0, 1] into
//! an *anomaly likelihood* (the private `likelihood` module): how unusual
//! the average of its last few raw scores is against that average's own
//! long-run distribution, as `-ln Q / ln 1e10` (0.5 is a tail probability
//! of 1e-5, the alarm level). What each channel reacts to:
//! 1. *level*: the reading's z-score against a slowly forgetting mean and
//!    variance (`level_alpha`): spikes, dips and level shifts, and also a
//!    series that turns unusually calm (the likelihood is two-sided);
//! 2. *coarse levels* (`blocks`, 4 and 16 readings): every block, the value
//!    farthest from the block channel's mean gets its own z-score and
//!    likelihood. A block keeps a spike but averages out the noise the
//!    finer channel sees: it catches slower, smaller changes, and a change
//!    of pattern in a periodic series;
//! 3. *distribution* (`distribution`): the relative entropy between the
//!    histogram of the last `histogram_window` readings and the long-run
//!    histogram (the private `entropy` module): changes of shape rather
//!    than of level, a flat stretch in a periodic series, a change in
//!    noise.
//!
//! On top of the channels, two cheap layers: a reading more than
//! `out_of_range` of the range seen so far beyond that range scores 1
//! outright (after the warm-up), and a *refractory* stage: after a score at
//! or above `alarm`, nothing passes for `refractory` readings (one episode,
//! one alarm) but an out-of-range reading, which is news whenever it comes;
//! below it, a score passes only if it beats every score passed in that
//! span. Within a channel, of consecutive alarm-level scores only
//! the first counts.
//!
//! The method follows what generalised in `../shared/nab/RESEARCH.md`:
//! Numenta HTM's final score is mostly an out-of-range override and the
//! likelihood layer, both O(1). No setting depends on a series' range or
//! length, which a gateway never knows in advance. Quality, by
//! `benches/nab_loco.sh` (settings chosen on three NAB categories, scored
//! on the fourth): see the README, which also says which two settings
//! trade false alarms for missed anomalies.
//!
//! State per series: 256 bytes, inline (the `state_sizes` test pins it).

mod entropy;
mod likelihood;
mod table;

use serde::{Deserialize, Serialize};

use self::entropy::{HistogramSettings, Histograms, MAX_WINDOW, MIN_HISTOGRAM_ALPHA};
use self::likelihood::{Channel, ChannelSettings, Likelihood, LikelihoodSettings, MAX_AVERAGE};
use crate::settings::Invalid;

/// The most coarse time scales (`blocks`) a detector runs.
pub const MAX_BLOCKS: usize = 2;

/// Raw scores the distribution channel's likelihood averages: its raw score
/// is already an average over the histogram window, so it needs fewer.
const DISTRIBUTION_AVERAGE: usize = 4;

/// Detector settings (`[anomaly]`); the defaults are meant for any series.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Values each channel only learns from before it gives scores
    /// (readings; blocks for the coarse channels). The out-of-range
    /// override waits as many readings.
    pub warmup: u64,
    /// Smoothing of the mean and variance a value's z-score is taken
    /// against (the weight of a new value, once it is below 1/n).
    pub level_alpha: f64,
    /// Values teach that mean and variance at most this many standard
    /// deviations away (0 = whole): an outlier is scored in full but
    /// learnt as a 3-sigma value, so it does not mask the next one.
    pub level_clip: f64,
    /// Raw scores each channel's likelihood averages (1 to 10).
    pub average: usize,
    /// Smoothing of the likelihood's long-run distribution (the weight of
    /// a new average, once it is below 1/n): how fast "unusual" adapts.
    pub likelihood_alpha: f64,
    /// Block lengths of the coarse channels (at most two, each 2 to 1024;
    /// empty: none).
    pub blocks: Vec<u32>,
    /// Whether the distribution-change channel runs.
    pub distribution: bool,
    /// Readings in its recent histogram (1 to 32).
    pub histogram_window: usize,
    /// Smoothing of its long-run histogram (0.0002 to 1: with less, a bin
    /// seen in the recent window could fall under the probability floor of
    /// 1e-4, which the O(1) relative entropy does not track).
    pub histogram_alpha: f64,
    /// A reading this far beyond the range seen so far (a share of that
    /// range) scores 1 outright, even within an alarm's episode (0 = off).
    pub out_of_range: f64,
    /// The alarm level: a score at or above it starts an episode, during
    /// which (`refractory` readings) nothing else passes but an
    /// out-of-range reading. 0.5 is a tail
    /// probability of 1e-5.
    pub alarm: f64,
    /// Readings an episode lasts (0 = every score passes).
    pub refractory: u64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            warmup: 100,
            level_alpha: 0.001,
            level_clip: 3.0,
            average: 10,
            likelihood_alpha: 0.001,
            blocks: vec![4, 16],
            distribution: true,
            histogram_window: 32,
            histogram_alpha: 0.001,
            out_of_range: 0.05,
            alarm: 0.5,
            refractory: 100,
        }
    }
}

impl AnomalyConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// The first key out of range (as `anomaly.<key>`) and why.
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |key: &str, reason: String| Err(Invalid::new(format!("anomaly.{key}"), reason));
        for (key, v) in [
            ("level_alpha", self.level_alpha),
            ("likelihood_alpha", self.likelihood_alpha),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return bad(key, format!("{v} is outside (0, 1]"));
            }
        }
        if !(self.histogram_alpha >= MIN_HISTOGRAM_ALPHA && self.histogram_alpha <= 1.0) {
            return bad(
                "histogram_alpha",
                format!(
                    "{} is outside {MIN_HISTOGRAM_ALPHA} to 1",
                    self.histogram_alpha
                ),
            );
        }
        for (key, v) in [
            ("level_clip", self.level_clip),
            ("out_of_range", self.out_of_range),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(key, format!("{v} must be 0 or more"));
            }
        }
        if !(self.alarm > 0.0 && self.alarm <= 1.0) {
            return bad("alarm", format!("{} is outside (0, 1]", self.alarm));
        }
        if !(1..=MAX_AVERAGE).contains(&self.average) {
            return bad(
                "average",
                format!("{} is outside 1 to {MAX_AVERAGE}", self.average),
            );
        }
        if self.blocks.len() > MAX_BLOCKS {
            return bad("blocks", format!("at most {MAX_BLOCKS} block lengths"));
        }
        if let Some(b) = self.blocks.iter().find(|b| !(2..=1024).contains(*b)) {
            return bad("blocks", format!("{b} is outside 2 to 1024"));
        }
        if !(1..=MAX_WINDOW).contains(&self.histogram_window) {
            return bad(
                "histogram_window",
                format!("{} is outside 1 to {MAX_WINDOW}", self.histogram_window),
            );
        }
        Ok(())
    }

    /// These settings prepared for the per-reading step.
    pub fn prepare(&self) -> Settings {
        let likelihood = |average| {
            LikelihoodSettings::new(average, self.warmup, self.likelihood_alpha, self.alarm)
        };
        Settings {
            level: ChannelSettings {
                alpha: self.level_alpha,
                clip: self.level_clip,
                likelihood: likelihood(self.average),
            },
            distribution: likelihood(DISTRIBUTION_AVERAGE),
            histograms: HistogramSettings::new(self.histogram_window, self.histogram_alpha),
            config: self.clone(),
        }
    }
}

/// An [`AnomalyConfig`] prepared once for every series of a worker: the
/// channels' settings, with the logarithms a reading would otherwise take.
#[derive(Debug, Clone)]
pub struct Settings {
    config: AnomalyConfig,
    level: ChannelSettings,
    distribution: LikelihoodSettings,
    histograms: HistogramSettings,
}

impl Settings {
    /// The configuration these settings were prepared from.
    pub fn config(&self) -> &AnomalyConfig {
        &self.config
    }
}

/// A coarse channel: the block so far (its value farthest from the
/// channel's mean) and the channel over blocks.
#[derive(Debug, Clone, Default)]
struct Coarse {
    farthest: f64,
    channel: Channel,
}

/// The detector state of one series: 256 bytes, nothing on the heap. The
/// settings are passed to [`Detector::update`] rather than kept, so a
/// gateway with many series holds one copy of them.
#[derive(Debug, Clone)]
pub struct Detector {
    n: u64,
    lo: f64,
    hi: f64,
    /// The last score passed and its reading number. A passed score beats
    /// every score passed within `refractory` before it, so the newest one
    /// still in that span is their maximum: the refractory stage needs no
    /// more than it.
    passed_at: u64,
    passed: f32,
    level: Channel,
    coarse: [Coarse; MAX_BLOCKS],
    distribution: Option<(Histograms, Likelihood<DISTRIBUTION_AVERAGE>)>,
}

impl Detector {
    /// A fresh series, with the channels `settings` turn on.
    pub fn new(settings: &Settings) -> Detector {
        Detector {
            n: 0,
            lo: f64::INFINITY,
            hi: f64::NEG_INFINITY,
            passed_at: 0,
            passed: 0.0,
            level: Channel::default(),
            coarse: Default::default(),
            distribution: settings.config.distribution.then(Default::default),
        }
    }

    /// Learns `v` and returns its anomaly score in [0, 1]. `settings` must
    /// be the ones the detector was made with (they say which channels
    /// run). A value that is not finite scores 0 and is not learnt.
    pub fn update(&mut self, settings: &Settings, v: f64) -> f64 {
        if !v.is_finite() {
            return 0.0;
        }
        let c = &settings.config;
        self.n += 1;
        let n = self.n;
        let level = &settings.level;
        let mut score = self.level.update(level, n, v);

        for (channel, &block) in self.coarse.iter_mut().zip(&c.blocks) {
            let block = u64::from(block.max(1));
            let (blocks, pos) = likelihood::div_rem(n - 1, block);
            let mean = if n > block { channel.channel.mean() } else { v };
            if pos == 0 || (v - mean).abs() > (channel.farthest - mean).abs() {
                channel.farthest = v;
            }
            if pos == block - 1 {
                score = score.max(channel.channel.update(level, blocks + 1, channel.farthest));
            }
        }

        if n == 1 {
            self.lo = v;
            self.hi = v;
        }
        let range = self.hi - self.lo;
        if let Some((histograms, likelihood)) = &mut self.distribution {
            let raw = histograms.update(&settings.histograms, n, v, self.lo, range);
            score = score.max(likelihood.update(&settings.distribution, n, raw));
        }
        let tolerance = c.out_of_range * range;
        let out = c.out_of_range > 0.0
            && n > c.warmup
            && (v > self.hi + tolerance || v < self.lo - tolerance);
        self.lo = self.lo.min(v);
        self.hi = self.hi.max(v);
        if out {
            return self.pass(1.0);
        }
        self.refract(c, score.clamp(0.0, 1.0))
    }

    /// Within `refractory` readings of a passed alarm nothing passes;
    /// within that of a lower passed score, only a higher score passes.
    fn refract(&mut self, c: &AnomalyConfig, score: f64) -> f64 {
        let r = c.refractory;
        if r == 0 || score <= 0.0 {
            return score;
        }
        let max = f64::from(self.passed);
        if self.passed_at.saturating_add(r) > self.n && (score <= max || max >= c.alarm) {
            return 0.0;
        }
        self.pass(score)
    }

    /// Records `score` as the last one passed, and passes it.
    fn pass(&mut self, score: f64) -> f64 {
        self.passed_at = self.n;
        self.passed = score as f32;
        score
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Noise of period 100 with values in 10 .. 11.
    fn noise(i: u64) -> f64 {
        10.0 + ((i * 7919) % 100) as f64 / 100.0
    }

    #[test]
    fn a_spike_after_warmup_scores_high_and_noise_does_not() {
        let p = AnomalyConfig::default().prepare();
        let c = p.config();
        let mut d = Detector::new(&p);
        let mut max_noise: f64 = 0.0;
        for i in 0..2000u64 {
            let s = d.update(&p, noise(i));
            if i > 300 {
                max_noise = max_noise.max(s);
            }
        }
        assert!(max_noise < c.alarm, "noise scored {max_noise}");
        let spike = d.update(&p, 30.0);
        assert_eq!(spike, 1.0, "out of range");
        // Within the episode that spike began, a higher one is news too.
        assert_eq!(d.update(&p, 10.5), 0.0, "refractory");
        assert_eq!(d.update(&p, 60.0), 1.0, "out of range again");
    }

    #[test]
    fn a_jump_inside_the_range_and_a_level_shift_raise_alarms() {
        let c = AnomalyConfig::default();
        let p = c.prepare();
        // A wide range seen early, then noise in its middle.
        for (name, anomaly) in [("jump", [18.0; 3].as_slice()), ("shift", &[14.0; 300])] {
            let mut d = Detector::new(&p);
            d.update(&p, 0.0);
            d.update(&p, 20.0);
            for i in 0..3000u64 {
                d.update(&p, noise(i));
            }
            let best = anomaly.iter().map(|&v| d.update(&p, v)).fold(0.0, f64::max);
            assert!(best >= c.alarm, "{name}: best score {best}");
        }
    }

    /// What the per-series budget (1 KiB with windows and rules) counts
    /// on: sizes the docs state.
    #[test]
    fn state_sizes() {
        use std::mem::size_of;
        assert_eq!(size_of::<Channel>(), 32);
        assert_eq!(size_of::<Histograms>(), 92);
        assert_eq!(size_of::<Detector>(), 256);
    }

    #[test]
    fn scores_stay_in_range_on_odd_input() {
        let c = AnomalyConfig {
            warmup: 2,
            ..AnomalyConfig::default()
        }
        .prepare();
        let mut d = Detector::new(&c);
        for v in [
            0.0,
            0.0,
            0.0,
            1e300,
            -1e300,
            0.0,
            f64::NAN,
            f64::INFINITY,
            5.0,
            5.0,
        ] {
            let s = d.update(&c, v);
            assert!((0.0..=1.0).contains(&s), "{s}");
        }
    }

    proptest! {
        /// The refractory stage against its definition: a score passes
        /// when no alarm passed in the previous `r - 1` readings and it
        /// beats every score passed in them.
        #[test]
        fn refractory_passes_what_beats_every_recent_pass(
            scores in proptest::collection::vec(prop_oneof![Just(0.0), 0.0f64..1.0], 1..300),
            r in 0u64..40,
        ) {
            let c = AnomalyConfig { refractory: r, ..AnomalyConfig::default() };
            let mut d = Detector::new(&c.prepare());
            let mut passed: Vec<(u64, f64)> = Vec::new();
            for (i, &score) in scores.iter().enumerate() {
                let n = i as u64 + 2;
                d.n = n;
                let recent = || passed.iter().filter(|(at, s)| at + r > n && *s > 0.0);
                let beats = recent().all(|&(_, s)| score > s && s < c.alarm);
                let want = if r == 0 || beats { score } else { 0.0 };
                prop_assert_eq!(d.refract(&c, score), want);
                passed.push((n, want));
            }
        }
    }

    #[test]
    fn validate_names_the_key() {
        for (c, key) in [
            (
                AnomalyConfig {
                    level_alpha: 1.5,
                    ..AnomalyConfig::default()
                },
                "anomaly.level_alpha",
            ),
            (
                AnomalyConfig {
                    histogram_window: 0,
                    ..AnomalyConfig::default()
                },
                "anomaly.histogram_window",
            ),
            (
                AnomalyConfig {
                    blocks: vec![4, 16, 64],
                    ..AnomalyConfig::default()
                },
                "anomaly.blocks",
            ),
            (
                AnomalyConfig {
                    histogram_alpha: 1e-4,
                    ..AnomalyConfig::default()
                },
                "anomaly.histogram_alpha",
            ),
            (
                AnomalyConfig {
                    average: 0,
                    ..AnomalyConfig::default()
                },
                "anomaly.average",
            ),
            (
                AnomalyConfig {
                    alarm: 0.0,
                    ..AnomalyConfig::default()
                },
                "anomaly.alarm",
            ),
        ] {
            assert_eq!(c.validate().map_err(|e| e.key), Err(key.to_string()));
        }
        assert_eq!(AnomalyConfig::default().validate(), Ok(()));
    }
}
