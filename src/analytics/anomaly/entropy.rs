//! The distribution-change channel's raw score: how far the histogram of a
//! series' last readings has moved from its long-run histogram (the
//! relative-entropy detector of Wang et al. 2011, over [`BINS`] bins of the
//! range seen so far). It reacts to changes of shape rather than of level:
//! a flat stretch in a periodic series, a change in noise, a pattern that
//! stops. Everything is incremental: the long-run histogram is decayed
//! lazily, so its logarithms change in one bin per reading, and once the
//! window is full the relative entropy moves by the two bins whose counts
//! change (running sums, recomputed exactly now and then), so a reading
//! costs a few table lookups whatever the window.

use super::likelihood::{div_rem, weight};
use super::table::table;

/// `ln(1 + e^x)` for `x <= 0`, tabulated every 1/64 down to -16 (error
/// below 1e-5; below -16 it is under 1.2e-7, where an `f32` log-weight
/// near 4 no longer resolves it).
fn softplus(x: f64) -> f64 {
    table!(-16.0, 0.0, 64.0, |x: f64| x.exp().ln_1p()).at(x)
}

/// Bins of the value histograms.
pub(super) const BINS: usize = 16;

/// Renormalise the lazily decayed long-run histogram when its scale has
/// grown by this factor (e^4, every 4,000 readings at a weight of 0.001):
/// the scale and the log-weights then stay below about 4, where an `f32`
/// resolves them to 5e-7, a relative error of 5e-7 in each probability.
const MAX_LN_SCALE: f32 = 4.0;

/// Units of the fixed-point `c ln c` sums (2^-20): integer sums have no
/// drift, however long a series runs.
const FIXED: f64 = (1u64 << 20) as f64;

/// `ln c`, `c ln c` and `c ln c` in [`FIXED`] units, for the counts a
/// window can hold (at most [`MAX_WINDOW`]; 0 for 0).
fn logs() -> &'static [(f64, f64, i32); MAX_WINDOW + 1] {
    static TABLE: std::sync::OnceLock<[(f64, f64, i32); MAX_WINDOW + 1]> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [(0.0, 0.0, 0); MAX_WINDOW + 1];
        for (c, slot) in t.iter_mut().enumerate().skip(1) {
            let ln = (c as f64).ln();
            let c_ln_c = c as f64 * ln;
            *slot = (ln, c_ln_c, (c_ln_c * FIXED).round() as i32);
        }
        t
    })
}

/// The log-weight of a bin the long-run histogram has never seen (a
/// probability of e^-100, under any floor; finite, so sums stay finite).
const UNSEEN: f32 = -100.0;

/// The least `alpha` the long-run histogram learns with: a bin seen in the
/// last [`MAX_WINDOW`] readings then keeps a probability of at least
/// `alpha (1 - alpha)^31`, above the floor of 1e-4, so only the newest
/// reading's bin can be under it.
pub(super) const MIN_HISTOGRAM_ALPHA: f64 = 2e-4;

/// Readings between exact recomputations of the running sums (a power of
/// two); the renormalisation of the weights recomputes them too.
const RECOMPUTE: u64 = 1024;

/// How the histograms learn, the same for every series; prepared once
/// with the logarithms a reading would otherwise take.
#[derive(Debug, Clone, Copy)]
pub(super) struct HistogramSettings {
    /// Readings in the recent histogram (1 to [`MAX_WINDOW`]).
    window: usize,
    /// Floor of the long-run histogram's weight, `ln alpha` and
    /// `-ln(1 - alpha)`.
    alpha: f64,
    ln_alpha: f64,
    ln_keep: f64,
}

impl HistogramSettings {
    /// Settings for a recent window of `window` readings and a long-run
    /// weight of at least `alpha` (in (0, 1]).
    pub(super) fn new(window: usize, alpha: f64) -> HistogramSettings {
        HistogramSettings {
            window: window.clamp(1, MAX_WINDOW),
            alpha,
            ln_alpha: alpha.ln(),
            ln_keep: -(-alpha).ln_1p(),
        }
    }
}

/// The most readings in the recent histogram: its ring of 4-bit bins is
/// kept inline in 16 bytes.
pub(super) const MAX_WINDOW: usize = 32;

/// The recent and long-run histograms of one series: 92 bytes.
#[derive(Debug, Clone)]
pub(super) struct Histograms {
    /// Bins of the last `window` readings, two to a byte, in a ring whose
    /// position follows from the reading number.
    ring: [u8; MAX_WINDOW / 2],
    /// The long-run histogram p as `weights / scale`, in logarithms and
    /// decayed lazily: each reading grows `scale` instead of shrinking every
    /// weight, so only the reading's bin changes. Single precision: 64
    /// bytes a series less, for a score that needs no more.
    ln_weights: [f32; BINS],
    ln_scale: f32,
    /// Running sums over the recent window's bin counts c: of `c ln c` in
    /// [`FIXED`] units, and of `c ln weight`. They make the relative
    /// entropy O(1) a reading once the window is full.
    sum_c_ln_c: i32,
    sum_c_ln_w: f32,
}

impl Default for Histograms {
    fn default() -> Self {
        let uniform = (1.0 / BINS as f64).ln() as f32;
        Histograms {
            ring: [0; MAX_WINDOW / 2],
            ln_weights: [uniform; BINS],
            ln_scale: 0.0,
            sum_c_ln_c: 0,
            sum_c_ln_w: 0.0,
        }
    }
}

impl Histograms {
    fn bin(&self, i: usize) -> usize {
        usize::from(self.ring[i / 2] >> (4 * (i % 2)) & 0xf)
    }

    /// How many of the first `window` slots of the ring hold `bin`, four
    /// bits at a time over the ring as one 128-bit word.
    fn count_of(&self, bin: usize, window: usize) -> usize {
        const ONES: u128 = u128::MAX / 0xf; // 0x1111...1: 1 in every nibble
        let valid = if window >= MAX_WINDOW {
            u128::MAX
        } else {
            (1u128 << (4 * window)) - 1
        };
        // A nibble equal to `bin` becomes 0; fold each nibble's bits into
        // its lowest one, which is then 0 exactly for those.
        let x = u128::from_le_bytes(self.ring) ^ (bin as u128 * ONES);
        let folded = x | x >> 1 | x >> 2 | x >> 3;
        (!folded & ONES & valid).count_ones() as usize
    }

    /// The count of each bin in the first `len` slots of the ring.
    fn counts(&self, len: usize) -> [usize; BINS] {
        let mut counts = [0; BINS];
        for i in 0..len {
            counts[self.bin(i)] += 1;
        }
        counts
    }

    /// Sets the running sums exactly from `counts`, and returns the floored
    /// `sum c ln p` over them (with the scale at `ln_scale`).
    fn recompute(&mut self, counts: &[usize; BINS], ln_scale: f64, floor: f64) -> f64 {
        let logs = logs();
        self.sum_c_ln_c = counts.iter().map(|&c| logs[c].2).sum();
        let mut sum_c_ln_w = 0.0;
        let mut sum_c_ln_p = 0.0;
        for (&c, &ln_w) in counts.iter().zip(&self.ln_weights) {
            let c = c as f64;
            sum_c_ln_w += c * f64::from(ln_w);
            sum_c_ln_p += c * (f64::from(ln_w) - ln_scale).max(floor);
        }
        self.sum_c_ln_w = sum_c_ln_w as f32;
        sum_c_ln_p
    }

    /// Takes `v`, the `n`th reading (from 1), binned over `lo .. lo + range`
    /// (all in the first bin while `range` is 0), and returns
    /// `1 - exp(-KL(recent || long-run))` over the last `s.window`
    /// readings; the long-run histogram learns with weight
    /// `max(1/n, s.alpha)`.
    pub(super) fn update(
        &mut self,
        s: &HistogramSettings,
        n: u64,
        v: f64,
        lo: f64,
        range: f64,
    ) -> f64 {
        let bin = if range > 0.0 {
            (((v - lo) / range * BINS as f64).max(0.0) as usize).min(BINS - 1)
        } else {
            0
        };
        let window = s.window;
        let n = n.max(1);
        let pos = div_rem(n - 1, window as u64).1 as usize;
        let len = n.min(window as u64) as usize;
        let full = n > window as u64;
        // The bin the reading replaces, if the ring is full.
        let old = self.bin(pos);
        let logs = logs();
        let ln_scale = f64::from(self.ln_scale);
        let floor = 1e-4f64.ln();
        // KL = sum q ln q - sum q ln p with q = c / len and p floored at
        // 1e-4: (sum c ln c - sum c ln p) / len - ln len, where
        // sum c ln p = sum c ln w - len ln scale.
        let (sum_c_ln_p, count) = if full && n % RECOMPUTE != 0 {
            // O(1): the sums move by the two bins whose counts change.
            // Counted before the store, for the reason `Likelihood` sums
            // its ring first.
            let c_bin = self.count_of(bin, window);
            if bin != old {
                let c_old = self.count_of(old, window);
                self.sum_c_ln_c +=
                    logs[c_bin + 1].2 - logs[c_bin].2 + logs[c_old - 1].2 - logs[c_old].2;
                self.sum_c_ln_w += self.ln_weights[bin] - self.ln_weights[old];
            }
            let mut sum = f64::from(self.sum_c_ln_w) - len as f64 * ln_scale;
            if c_bin == 0 {
                // A bin new to the window is the one that may lie under the
                // floor: one seen in the window got at least `alpha` of the
                // weight since, which stays above it (`alpha` >= 2e-4).
                let ln_p = f64::from(self.ln_weights[bin]) - ln_scale;
                sum += ln_p.max(floor) - ln_p;
            }
            let count = c_bin + 1 - usize::from(bin == old);
            (sum, count)
        } else {
            // Exactly, from the counts as they will be with this reading.
            let mut counts = self.counts(if full { window } else { len - 1 });
            if full {
                counts[old] -= 1;
            }
            counts[bin] += 1;
            (self.recompute(&counts, ln_scale, floor), counts[bin])
        };
        let shift = 4 * (pos % 2);
        let byte = &mut self.ring[pos / 2];
        *byte = (*byte & !(0xf << shift)) | ((bin as u8) << shift);
        let sum_c_ln_c = f64::from(self.sum_c_ln_c) / FIXED;
        let kl = ((sum_c_ln_c - sum_c_ln_p) / len as f64 - logs[len].0).max(0.0);

        // Learn: p = (1 - a) p + a e_bin, as scale /= (1 - a) and
        // weight[bin] += a * scale, the sum taken in log space.
        let a = weight(s.alpha, n);
        if a < 1.0 {
            let (ln_a, ln_keep) = if a == s.alpha {
                (s.ln_alpha, s.ln_keep)
            } else {
                (a.ln(), -(-a).ln_1p())
            };
            let ln_scale = ln_scale + ln_keep;
            self.ln_scale = ln_scale as f32;
            let added = ln_a + ln_scale;
            let ln_w = &mut self.ln_weights[bin];
            let before = *ln_w;
            let (hi, lo) = if f64::from(before) > added {
                (f64::from(before), added)
            } else {
                (added, f64::from(before))
            };
            *ln_w = (hi + softplus(lo - hi)) as f32;
            self.sum_c_ln_w += count as f32 * (*ln_w - before);
        } else {
            self.ln_scale = 0.0;
            self.ln_weights = [UNSEEN; BINS];
            self.ln_weights[bin] = 0.0;
            self.recompute(&self.counts(len), 0.0, floor);
        }
        if self.ln_scale > MAX_LN_SCALE {
            let ln_scale = self.ln_scale;
            for ln_w in &mut self.ln_weights {
                *ln_w = (*ln_w - ln_scale).max(UNSEEN);
            }
            self.ln_scale = 0.0;
            self.recompute(&self.counts(len), 0.0, floor);
        }
        table!(0.0, 16.0, 64.0, |x: f64| 1.0 - (-x).exp()).at(kl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The relative entropy kept incrementally, computed from scratch over
    /// the same bins: the recent window's counts against the long-run
    /// histogram decayed eagerly.
    fn brute_force_kl(bins: &[usize], window: usize, alpha: f64) -> Vec<f64> {
        let mut long = [1.0 / BINS as f64; BINS];
        let mut out = Vec::new();
        for (i, &bin) in bins.iter().enumerate() {
            let recent = &bins[(i + 1).saturating_sub(window)..=i];
            let n = recent.len() as f64;
            let mut kl = 0.0;
            for (b, p) in long.iter().enumerate() {
                let q = recent.iter().filter(|&&x| x == b).count() as f64 / n;
                if q > 0.0 {
                    kl += q * (q / p.max(1e-4)).ln();
                }
            }
            out.push(1.0 - (-kl.max(0.0)).exp());
            let a = alpha.max(1.0 / (i + 1) as f64);
            for (b, p) in long.iter_mut().enumerate() {
                *p = (1.0 - a) * *p + if b == bin { a } else { 0.0 };
            }
        }
        out
    }

    proptest! {
        #[test]
        fn incremental_relative_entropy_equals_recomputation(
            bins in proptest::collection::vec(0usize..BINS, 1..400),
            window in 1usize..=MAX_WINDOW,
        ) {
            let mut h = Histograms::default();
            let s = HistogramSettings::new(window, 0.01);
            let expected = brute_force_kl(&bins, window, 0.01);
            for (i, (bin, want)) in bins.iter().zip(expected).enumerate() {
                // A value in the middle of `bin` over the range 0..16.
                let got = h.update(&s, i as u64 + 1, *bin as f64 + 0.5, 0.0, BINS as f64);
                // The long-run weights are kept in single precision, and
                // `softplus` and `1 - e^-x` are tabulated (errors of 1e-5
                // and 3e-5).
                prop_assert!((got - want).abs() < 1e-4, "{got} vs {want}");
            }
        }
    }

    /// Long runs, past the exact recomputations and the renormalisations,
    /// with bins that come and go: the running sums keep up.
    #[test]
    fn running_sums_stay_exact_over_long_runs() {
        for (alpha, window) in [
            (0.001, 32),
            (0.01, 32),
            (MIN_HISTOGRAM_ALPHA, 32),
            (0.01, 7),
        ] {
            let mut state = 0x2545_f491_4f6c_dd1du64;
            let bins: Vec<usize> = (0..6000)
                .map(|i| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // A few common bins, rare ones, and a stretch of new ones.
                    if (3000..3100).contains(&i) {
                        12 + (state % 4) as usize
                    } else if state % 50 == 0 {
                        (state >> 8) as usize % BINS
                    } else {
                        (state >> 8) as usize % 4
                    }
                })
                .collect();
            let expected = brute_force_kl(&bins, window, alpha);
            let mut h = Histograms::default();
            let s = HistogramSettings::new(window, alpha);
            for (i, (bin, want)) in bins.iter().zip(expected).enumerate() {
                let got = h.update(&s, i as u64 + 1, *bin as f64 + 0.5, 0.0, BINS as f64);
                assert!(
                    (got - want).abs() < 1e-3,
                    "alpha {alpha} window {window} reading {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn softplus_matches_its_function() {
        for i in 0..=200_000 {
            let x = -20.0 + i as f64 * 1e-4;
            let want = x.exp().ln_1p();
            assert!((softplus(x) - want).abs() < 1e-5, "{x}: {}", softplus(x));
        }
    }

    #[test]
    fn rescaling_the_long_run_histogram_keeps_it() {
        let mut h = Histograms::default();
        let s = HistogramSettings::new(32, 0.05);
        let mut last = 0.0;
        // 0.05 per reading grows the scale past e^16 every ~310 readings.
        for i in 0..5_000u64 {
            last = h.update(&s, i + 1, (i % 4) as f64 + 0.5, 0.0, BINS as f64);
        }
        assert!(h.ln_scale <= MAX_LN_SCALE);
        // A steady cycle over four bins matches its long-run histogram.
        assert!(last < 0.05, "{last}");
    }
}
