//! The two layers every channel of the detector shares: a z-score against an
//! exponentially weighted mean and variance (the *raw* score), and the
//! *anomaly likelihood* over raw scores (Ahmad et al. 2017, in O(1) form),
//! which turns "how large is this raw score" into "how unusual is the
//! recent raw score for this series", so one threshold means the same on a
//! noisy series and on a calm one.

/// `ln 1e10`: a likelihood score of 1 is a tail probability of 1e-10, and
/// 0.5 one of 1e-5.
const LN_1E10: f64 = 23.025_850_929_940_457;

/// Floors of the long-run distribution of averaged raw scores, as in
/// Numenta's detector: a series whose raw score never moves still needs a
/// real excursion to look unusual.
const MEAN_FLOOR: f32 = 0.03;
const VAR_FLOOR: f32 = 0.0003;

/// A score the likelihood gives repeats of an alarm: the score of a tail
/// probability of 1e-3 (Numenta's "yellow"), below any alarm level.
const REPEAT_SCORE: f64 = 0.3;

/// Values a z-score takes in whole before it clips them.
const CLIP_AFTER: u64 = 30;

/// The most raw scores a channel's likelihood averages (Numenta's
/// default, and what keeps a [`Channel`] at 32 bytes).
pub const MAX_AVERAGE: usize = 10;

use super::table::table;

/// The weight of the `n`th value (from 1) in a mean that forgets with
/// `alpha`: `max(1/n, alpha)`, without a division once `1/n` is below it.
pub(super) fn weight(alpha: f64, n: u64) -> f64 {
    // Through i64: one instruction, where u64 to f64 takes several.
    let n = n.clamp(1, i64::MAX as u64) as i64 as f64;
    if n * alpha >= 1.0 {
        alpha
    } else {
        1.0 / n
    }
}

/// `(n / d, n % d)` for `d` of at least 1, with a shift and a mask when
/// `d` is a power of two (the default blocks and histogram window are): a
/// 64-bit division is the slowest instruction of a reading's step.
#[inline]
pub(super) fn div_rem(n: u64, d: u64) -> (u64, u64) {
    if d.is_power_of_two() {
        (n >> d.trailing_zeros(), n & (d - 1))
    } else {
        (n / d, n % d)
    }
}

/// The Abramowitz-Stegun (Numerical Recipes) form of erfc(x) for x >= 0,
/// `t exp(poly(t) - x^2)` with `t = 1 / (1 + x / 2)`, accurate to 1.2e-7
/// relative: `(t, poly(t) - x^2)`.
fn erfc_parts(x: f64) -> (f64, f64) {
    let t = 1.0 / (1.0 + 0.5 * x);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    (t, poly - x * x)
}

/// erfc(|x|).
fn erfc_abs(x: f64) -> f64 {
    let (t, exponent) = erfc_parts(x.abs());
    t * exponent.exp()
}

/// ln erfc(|x|), without leaving log space where erfc underflows.
fn ln_erfc_abs(x: f64) -> f64 {
    let x = x.abs();
    let (_, exponent) = erfc_parts(x);
    // ln t = -ln(1 + x / 2).
    exponent - (0.5 * x).ln_1p()
}

/// The standard normal upper tail Q(z).
#[cfg(test)]
pub(super) fn normal_tail(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let erfc = erfc_abs(x);
    0.5 * if x >= 0.0 { erfc } else { 2.0 - erfc }
}

/// `-ln Q(|z|) / ln 1e10`, clamped to [0, 1]: Numenta's log-likelihood
/// score, which spreads out the top end of the tail (0.5 is Q = 1e-5).
#[cfg(test)]
pub(super) fn log_likelihood_score(z: f64) -> f64 {
    unclamped_score(z).clamp(0.0, 1.0)
}

/// `-ln Q(|z|) / ln 1e10`.
fn unclamped_score(z: f64) -> f64 {
    // ln Q = ln(erfc / 2).
    let ln_q = ln_erfc_abs(z * std::f64::consts::FRAC_1_SQRT_2) - std::f64::consts::LN_2;
    -ln_q * (1.0 / LN_1E10)
}

/// `erf(|z| / sqrt 2)`: the probability mass of a standard normal nearer
/// the mean than `z`.
fn mass_nearer(z: f64) -> f64 {
    1.0 - erfc_abs(z * std::f64::consts::FRAC_1_SQRT_2)
}

/// [`mass_nearer`] of `|z|`, tabulated every 1/64 up to 8 (beyond, it is 1
/// to within 1e-15); error below 2e-5, see the tests.
#[inline]
fn mass_table(z: f64) -> f64 {
    table!(0.0, 8.0, 64.0, mass_nearer).at(z.abs())
}

/// [`log_likelihood_score`] of `|z|`, tabulated every 1/64 up to 8 before it
/// is clamped (so no kink is interpolated across: it reaches 1 at 6.36);
/// error below 1e-5, see the tests.
#[inline]
fn score_table(z: f64) -> f64 {
    table!(0.0, 8.0, 64.0, unclamped_score)
        .at(z.abs())
        .clamp(0.0, 1.0)
}

/// A channel over values: each value's distance from an exponentially
/// weighted mean, in exponentially weighted standard deviations, as
/// `erf(|z| / sqrt 2)` in [0, 1] (the probability mass nearer the mean),
/// is the raw score its [`Likelihood`] takes. The weight of a value is
/// `max(1/n, alpha)`: an exact mean and variance at first, a slowly
/// forgetting one later. Once [`CLIP_AFTER`] values are in, a value
/// teaches them at most `clip` standard deviations away (winsorised): one
/// outlier no longer inflates the variance for a thousand readings and
/// hides the next anomaly, while a lasting shift still moves the mean and
/// widens the variance within a few hundred readings.
///
/// 32 bytes: the mean in double precision (a series may sit far from 0),
/// the variance in single (it moves by at most `alpha` of itself), beside
/// a likelihood of at most [`MAX_AVERAGE`] raw scores.
#[derive(Debug, Clone, Default)]
pub(super) struct Channel {
    mean: f64,
    var: f32,
    likelihood: Likelihood<MAX_AVERAGE>,
}

/// How a [`Channel`] learns: the z-score's weight floor and clip, and its
/// likelihood's settings (all shared by every series).
#[derive(Debug, Clone, Copy)]
pub(super) struct ChannelSettings {
    pub alpha: f64,
    pub clip: f64,
    pub likelihood: LikelihoodSettings,
}

impl Channel {
    /// The running mean (the first value once one has been seen).
    pub(super) fn mean(&self) -> f64 {
        self.mean
    }

    /// Scores `v`, the `n`th value (from 1): its anomaly likelihood.
    pub(super) fn update(&mut self, s: &ChannelSettings, n: u64, v: f64) -> f64 {
        let raw = self.raw(s.alpha, s.clip, n, v);
        self.likelihood.update(&s.likelihood, n, raw)
    }

    /// The raw score of `v`, the `n`th value (from 1); then learns it,
    /// clipped to `clip` standard deviations (0: not clipped).
    fn raw(&mut self, alpha: f64, clip: f64, n: u64, v: f64) -> f64 {
        if n <= 1 {
            self.mean = v;
            self.var = 0.0;
            return 0.0;
        }
        let d = v - self.mean;
        let var = f64::from(self.var);
        // In single precision, as the variance is kept (and faster).
        let sd = f64::from(self.var.sqrt());
        let raw = if sd > 0.0 {
            mass_table(d / sd)
        } else if d == 0.0 {
            0.0
        } else {
            1.0
        };
        let a = weight(alpha, n);
        let d = if clip > 0.0 && n > CLIP_AFTER {
            d.clamp(-clip * sd, clip * sd)
        } else {
            d
        };
        self.mean += a * d;
        // Saturates rather than overflowing to infinity, which would stick.
        self.var = ((1.0 - a) * (var + a * d * d)).min(f64::from(f32::MAX)) as f32;
        raw.clamp(0.0, 1.0)
    }
}

/// The anomaly likelihood of one channel: the average of its last
/// `average` raw scores against the long-run mean and variance of that
/// average, as a log-likelihood score. Of consecutive scores at or above
/// `alarm`, only the first keeps its value (the others get
/// [`REPEAT_SCORE`]): a sustained change raises one alarm, at its start.
///
/// `N + 9` bytes: at most `N` raw scores kept as 8-bit fractions (steps
/// of 1/255, far below what moves a likelihood), in a ring whose position
/// follows from `n`; long-run moments in single precision (they move by
/// at most `alpha` of a value in [0, 1]).
#[derive(Debug, Clone)]
pub(super) struct Likelihood<const N: usize> {
    recent: [u8; N],
    alarmed: bool,
    mean: f32,
    var: f32,
}

/// Settings a likelihood is updated with (shared by every series).
#[derive(Debug, Clone, Copy)]
pub(super) struct LikelihoodSettings {
    /// Raw scores averaged (1 to the likelihood's `N`).
    average: usize,
    /// `1 / (255 average)`: the average of a full ring of 8-bit scores.
    scale: f64,
    /// Values (`n`) that only train it.
    warmup: u64,
    /// Floor of the long-run weight.
    alpha: f64,
    /// The score from which consecutive scores are repeats.
    alarm: f64,
}

impl LikelihoodSettings {
    /// Settings for a likelihood of the average of `average` raw scores
    /// (at least 1), learning from the first `warmup` values only, with a
    /// long-run weight of at least `alpha`, repeats from `alarm` on.
    pub(super) fn new(average: usize, warmup: u64, alpha: f64, alarm: f64) -> Self {
        let average = average.max(1);
        LikelihoodSettings {
            average,
            scale: 1.0 / (255.0 * average as f64),
            warmup,
            alpha,
            alarm,
        }
    }
}

impl<const N: usize> Default for Likelihood<N> {
    fn default() -> Self {
        Likelihood {
            recent: [0; N],
            alarmed: false,
            mean: 0.0,
            var: 0.0,
        }
    }
}

impl<const N: usize> Likelihood<N> {
    /// Scores `raw` in [0, 1], the `n`th raw score (from 1), then learns it.
    /// It averages `s.average` raw scores, at most `N`.
    pub(super) fn update(&mut self, s: &LikelihoodSettings, n: u64, raw: f64) -> f64 {
        let k = s.average.clamp(1, N);
        let n = n.max(1);
        let pos = div_rem(n - 1, k as u64).1 as usize;
        // Rounded to the nearest step (`f64::round` is a libm call).
        let fixed = (raw.clamp(0.0, 1.0) * 255.0 + 0.5) as u8;
        // Summed before the store (slots not filled yet are 0): a load
        // over a byte just stored would wait for the store to retire.
        let before: u32 = self.recent[..k].iter().map(|&r| u32::from(r)).sum();
        let sum = before - u32::from(self.recent[pos]) + u32::from(fixed);
        self.recent[pos] = fixed;
        let filled = n.min(k as u64);
        let average = if filled == s.average as u64 {
            f64::from(sum) * s.scale
        } else {
            f64::from(sum) / (255.0 * filled as f64)
        };

        let mut score = 0.0;
        if n > s.warmup {
            // In single precision, as the moments are kept (and faster).
            let mean = self.mean.max(MEAN_FLOOR);
            let sd = self.var.max(VAR_FLOOR).sqrt();
            score = score_table(f64::from((average as f32 - mean) / sd));
            let alarm = score >= s.alarm;
            if alarm && self.alarmed {
                score = score.min(REPEAT_SCORE);
            }
            self.alarmed = alarm;
        }
        let w = weight(s.alpha, n);
        let d = average - f64::from(self.mean);
        self.mean = (f64::from(self.mean) + w * d) as f32;
        self.var = ((1.0 - w) * (f64::from(self.var) + w * d * d)) as f32;
        score
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_tail_matches_known_values() {
        for (z, q) in [
            (0.0, 0.5),
            (1.0, 0.158_655),
            (2.0, 0.022_750),
            (-1.0, 0.841_345),
            (3.0, 0.001_350),
        ] {
            assert!(
                (normal_tail(z) - q).abs() < 1e-6,
                "Q({z}) = {}",
                normal_tail(z)
            );
        }
    }

    #[test]
    fn log_likelihood_score_matches_the_tail() {
        for z in [0.0, 0.5, 1.0, 2.0, 3.0, 5.0] {
            let want = (-normal_tail(z).ln() / 1e10f64.ln()).clamp(0.0, 1.0);
            let got = log_likelihood_score(z);
            assert!((got - want).abs() < 1e-6, "z {z}: {got} vs {want}");
        }
        // Far in the tail, where Q(z) underflows, the score saturates at 1.
        assert_eq!(log_likelihood_score(60.0), 1.0);
    }

    #[test]
    fn the_tables_match_the_functions() {
        for i in 0..=100_000 {
            let z = i as f64 * 1e-4;
            // The mass becomes an 8-bit raw score: 2e-5 is 1/200 of a step.
            for (table, f, tolerance) in [
                (
                    mass_table as fn(f64) -> f64,
                    mass_nearer as fn(f64) -> f64,
                    2e-5,
                ),
                (score_table, log_likelihood_score, 1e-5),
            ] {
                let (got, want) = (table(z), f(z));
                assert!((got - want).abs() < tolerance, "z {z}: {got} vs {want}");
                assert_eq!(table(-z), got);
            }
        }
    }

    #[test]
    fn z_score_is_exact_at_first() {
        let mut z = Channel::default();
        for (n, v) in [1.0, 3.0, 5.0].into_iter().enumerate() {
            z.raw(0.001, 3.0, n as u64 + 1, v);
        }
        assert!((z.mean() - 3.0).abs() < 1e-12);
        // Population variance of 1, 3, 5 (kept in single precision).
        assert!((f64::from(z.var) - 8.0 / 3.0).abs() < 1e-6, "{}", z.var);
    }

    #[test]
    fn z_score_learns_an_outlier_clipped() {
        let mut z = Channel::default();
        for n in 1..=1000u64 {
            z.raw(0.001, 3.0, n, if n % 2 == 0 { 1.0 } else { -1.0 });
        }
        let var = z.var;
        z.raw(0.001, 3.0, 1001, 1e6);
        // As if the outlier were 3 standard deviations out.
        assert!(z.var < var * 1.01, "{var} -> {}", z.var);
        assert!(z.mean() < 0.01, "{}", z.mean());
    }

    #[test]
    fn a_jump_in_raw_scores_is_unlikely_and_its_repeats_are_not_alarms() {
        let s = LikelihoodSettings::new(10, 100, 0.001, 0.5);
        let mut l = Likelihood::<MAX_AVERAGE>::default();
        let mut n = 0;
        let mut quiet: f64 = 0.0;
        for i in 0..2000u64 {
            n += 1;
            let raw = 0.2 + 0.1 * ((i * 7919) % 10) as f64 / 10.0;
            let score = l.update(&s, n, raw);
            if n > 500 {
                quiet = quiet.max(score);
            }
        }
        assert!(quiet < 0.5, "{quiet}");
        let scores: Vec<f64> = (0..10)
            .map(|_| {
                n += 1;
                l.update(&s, n, 1.0)
            })
            .collect();
        let first = scores.iter().position(|&x| x >= 0.5);
        assert!(first.is_some(), "{scores:?}");
        assert!(
            scores.iter().filter(|&&x| x >= 0.5).count() == 1,
            "{scores:?}"
        );
    }
}
