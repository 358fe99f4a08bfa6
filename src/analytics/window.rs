//! Sliding time windows per series: count, mean, min, max, standard
//! deviation and last value over the readings of about the last `duration`
//! of each window, and the reorder buffer that feeds them in time order.
//!
//! A window is a ring of `buckets` partial aggregates, each covering
//! `duration / buckets` of time: a reading joins the aggregate of its
//! bucket, a bucket that falls out of the window is overwritten, and the
//! window's statistics merge the ring. So the window slides in steps of
//! one bucket (a 10 s window of 5 buckets covers the current 2 s bucket and
//! the four before it), which is what buys a fixed, small memory whatever
//! the reading rate: 32 bytes a bucket, 480 bytes for three windows of 5
//! buckets, where keeping every reading of a 5-minute window at 100
//! readings/s would take 30,000 entries. Updates are O(1) (a bucket merge;
//! at most `buckets` buckets cleared when time jumps). Aggregates are
//! merged with Chan et al.'s parallel formulas, never by subtracting what
//! leaves, so the variance stays accurate however long the stream.
//!
//! The windows of a series share one [`Windows`] value (one allocation, one
//! newest time and last value) and the [`Layout`] they are cut by is kept
//! once per worker: with hundreds of thousands of series, per-series bytes
//! are what the gateway's memory is made of. A bucket keeps its count as a
//! `u32` and its sum of squared deviations as an `f32` (computed in `f64`,
//! rounded when stored): the standard deviation carries about six
//! significant digits, count, mean, min and max are exact.

use std::collections::VecDeque;

use crate::model::Micros;

/// Statistics of a window at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Population standard deviation.
    pub std: f64,
    pub last: f64,
}

/// Count, mean, sum of squared deviations, min and max of some readings,
/// at full precision while merging.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Agg {
    n: f64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl Agg {
    const EMPTY: Agg = Agg {
        n: 0.0,
        mean: 0.0,
        m2: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
    };

    fn one(v: f64) -> Agg {
        Agg {
            n: 1.0,
            mean: v,
            m2: 0.0,
            min: v,
            max: v,
        }
    }

    /// Welford's update with one value: [`Agg::merge`] with `Agg::one(v)`,
    /// with one division instead of two (this is every reading's step).
    fn add(self, v: f64) -> Agg {
        if self.n == 0.0 {
            return Agg::one(v);
        }
        let n = self.n + 1.0;
        let inv = 1.0 / n;
        let delta = v - self.mean;
        Agg {
            n,
            mean: self.mean + delta * inv,
            m2: self.m2 + delta * delta * (self.n * inv),
            min: self.min.min(v),
            max: self.max.max(v),
        }
    }

    /// Chan, Golub & LeVeque's pairwise update.
    fn merge(a: Agg, b: Agg) -> Agg {
        if a.n == 0.0 {
            return b;
        }
        if b.n == 0.0 {
            return a;
        }
        let n = a.n + b.n;
        let delta = b.mean - a.mean;
        Agg {
            n,
            mean: a.mean + delta * (b.n / n),
            m2: a.m2 + b.m2 + delta * delta * (a.n * b.n / n),
            min: a.min.min(b.min),
            max: a.max.max(b.max),
        }
    }
}

/// An [`Agg`] as a bucket stores it: 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    mean: f64,
    min: f64,
    max: f64,
    n: u32,
    m2: f32,
}

impl Bucket {
    const EMPTY: Bucket = Bucket {
        mean: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        n: 0,
        m2: 0.0,
    };

    fn get(self) -> Agg {
        Agg {
            n: f64::from(self.n),
            mean: self.mean,
            m2: f64::from(self.m2),
            min: self.min,
            max: self.max,
        }
    }

    fn store(a: Agg) -> Bucket {
        Bucket {
            mean: a.mean,
            min: a.min,
            max: a.max,
            n: a.n as u32,
            m2: a.m2 as f32,
        }
    }
}

/// How the windows of every series are cut: per window its bucket width;
/// all windows have the same number of buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Time each bucket of window `i` covers (at least 1 µs).
    widths: Box<[Micros]>,
    buckets: usize,
}

impl Layout {
    /// Windows of the given `durations`, each in `buckets` steps (at
    /// least 1).
    pub fn new(durations: &[Micros], buckets: usize) -> Layout {
        let buckets = buckets.max(1);
        Layout {
            widths: durations
                .iter()
                .map(|d| (d.max(&1).unsigned_abs()).div_ceil(buckets as u64).max(1) as Micros)
                .collect(),
            buckets,
        }
    }

    /// How many windows.
    pub fn len(&self) -> usize {
        self.widths.len()
    }

    /// True when there are no windows.
    pub fn is_empty(&self) -> bool {
        self.widths.is_empty()
    }

    /// The length of window `i` (rounded up to whole buckets).
    pub fn duration(&self, i: usize) -> Micros {
        self.widths[i] * self.buckets as Micros
    }

    /// Time each bucket of window `i` covers: the step it slides in.
    pub fn step(&self, i: usize) -> Micros {
        self.widths[i]
    }
}

/// The windows of one series: for window `i`, bucket `k` (time / width)
/// lives at `i * buckets + k mod buckets`.
#[derive(Debug, Clone)]
pub struct Windows {
    /// Time of the newest reading; `Micros::MIN` before any.
    newest: Micros,
    last: f64,
    buckets: Box<[Bucket]>,
}

impl Windows {
    /// Empty windows cut by `layout`.
    pub fn new(layout: &Layout) -> Windows {
        Windows {
            newest: Micros::MIN,
            last: f64::NAN,
            buckets: vec![Bucket::EMPTY; layout.len() * layout.buckets].into_boxed_slice(),
        }
    }

    /// Time of the newest reading pushed, if any.
    pub fn newest(&self) -> Option<Micros> {
        (self.newest != Micros::MIN).then_some(self.newest)
    }

    /// Adds a reading at `t`, which must not be older than the newest
    /// reading's bucket in any window (the reorder buffer sees to that;
    /// an older one is ignored). `layout` must be the one they were made
    /// with.
    pub fn push(&mut self, layout: &Layout, t: Micros, v: f64) {
        let n = layout.buckets as i64;
        for (i, &width) in layout.widths.iter().enumerate() {
            let ring = &mut self.buckets[i * layout.buckets..(i + 1) * layout.buckets];
            let k = t.div_euclid(width);
            let newest = if self.newest == Micros::MIN {
                i64::MIN
            } else {
                self.newest.div_euclid(width)
            };
            if k > newest {
                // Clear the buckets between the newest one and k.
                if newest != i64::MIN && k - newest < n {
                    for j in newest + 1..=k {
                        ring[j.rem_euclid(n) as usize] = Bucket::EMPTY;
                    }
                } else {
                    ring.fill(Bucket::EMPTY);
                }
            } else if k.saturating_add(n) <= newest {
                continue; // older than the window
            }
            let slot = &mut ring[k.rem_euclid(n) as usize];
            *slot = Bucket::store(slot.get().add(v));
        }
        if t >= self.newest {
            self.newest = t;
            self.last = v;
        }
    }

    /// Statistics of window `i`; `None` when it is empty.
    pub fn stats(&self, layout: &Layout, i: usize) -> Option<Stats> {
        let agg = self.buckets[i * layout.buckets..(i + 1) * layout.buckets]
            .iter()
            .fold(Agg::EMPTY, |acc, b| Agg::merge(acc, b.get()));
        if agg.n == 0.0 {
            return None;
        }
        Some(Stats {
            count: agg.n as usize,
            mean: agg.mean,
            min: agg.min,
            max: agg.max,
            std: (agg.m2 / agg.n).max(0.0).sqrt(),
            last: self.last,
        })
    }

    /// Bytes on the heap these windows hold (their buckets).
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }
}

/// Puts readings that arrive out of order back in order, holding each for
/// `lateness` after the newest time seen. A reading older than what was
/// already released is *late*: it is still stored, but kept out of the
/// windows (the caller counts it). The held readings are kept sorted
/// (readings mostly come in order, so that is an append); equal times stay
/// in arrival order.
#[derive(Debug, Clone)]
pub struct Reorder {
    held: VecDeque<(Micros, f64)>,
    released: Micros,
}

impl Default for Reorder {
    fn default() -> Self {
        Reorder {
            held: VecDeque::new(),
            released: Micros::MIN,
        }
    }
}

impl Reorder {
    /// Offers a reading and releases, in time order, the held readings
    /// older than the newest time minus `lateness`. False when the reading
    /// is late (older than released ones): nothing is released then.
    pub fn push(
        &mut self,
        lateness: Micros,
        t: Micros,
        v: f64,
        mut out: impl FnMut(Micros, f64),
    ) -> bool {
        if t < self.released {
            return false;
        }
        let newest = self.held.back().map_or(t, |&(b, _)| b.max(t));
        let until = newest.saturating_sub(lateness);
        if t > until {
            // Release first, so a steady stream holds `lateness` worth of
            // readings and never one more.
            self.release_until(until, &mut out);
            self.insert(t, v);
        } else {
            self.insert(t, v);
            self.release_until(until, &mut out);
        }
        // Give back what a burst grew: the buffer holds `lateness` worth of
        // readings, so its size follows the series' current rate.
        let (len, cap) = (self.held.len(), self.held.capacity());
        if cap > 16 && len < cap / 4 {
            self.held.shrink_to(len * 2);
        }
        true
    }

    fn insert(&mut self, t: Micros, v: f64) {
        if self.held.len() == self.held.capacity() {
            // Double, from 2: a series at 1 reading/s with a 2 s lateness
            // holds two.
            self.held.reserve_exact(self.held.len().max(2));
        }
        match self.held.back() {
            Some(&(b, _)) if b > t => {
                let at = self.held.partition_point(|&(h, _)| h <= t);
                self.held.insert(at, (t, v));
            }
            _ => self.held.push_back((t, v)),
        }
    }

    fn release_until(&mut self, until: Micros, out: &mut impl FnMut(Micros, f64)) {
        while let Some(&(t, v)) = self.held.front() {
            if t > until {
                break;
            }
            self.held.pop_front();
            self.released = t;
            out(t, v);
        }
    }

    /// Bytes on the heap held for readings waiting to be released.
    pub fn heap_bytes(&self) -> usize {
        self.held.capacity() * std::mem::size_of::<(Micros, f64)>()
    }

    /// True when no reading is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Releases every held reading, in time order, and frees the buffer.
    pub fn flush(&mut self, mut out: impl FnMut(Micros, f64)) {
        self.release_until(Micros::MAX, &mut out);
        self.held = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The readings of the window's buckets: from the start of the bucket
    /// `buckets - 1` before the one `now` falls in.
    fn brute(samples: &[(Micros, f64)], now: Micros, width: Micros, buckets: i64) -> Option<Stats> {
        let from = (now.div_euclid(width) - buckets + 1) * width;
        let inside: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 >= from)
            .map(|s| s.1)
            .collect();
        let n = inside.len();
        let last = *inside.last()?;
        let mean = inside.iter().sum::<f64>() / n as f64;
        let var = inside.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        Some(Stats {
            count: n,
            mean,
            min: inside.iter().copied().fold(f64::INFINITY, f64::min),
            max: inside.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            std: var.sqrt(),
            last,
        })
    }

    /// Within `tolerance` relative to the magnitude of the values.
    fn close(a: f64, b: f64, scale: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * scale.max(1.0)
    }

    proptest! {
        /// Readings arrive out of order (up to the lateness); after every
        /// release the statistics of each window equal a brute-force
        /// recomputation over the released readings (the standard
        /// deviation to the single precision a bucket stores it in), and
        /// late ones are exactly those older than what was already
        /// released.
        #[test]
        fn windows_match_brute_force_with_out_of_order_arrivals(
            steps in prop::collection::vec((0i64..3_000_000, -5_000_000i64..0, -1000.0f64..1000.0), 1..300),
            durations in prop::collection::vec(1_000_000i64..60_000_000, 1..4),
            buckets in 1usize..12,
        ) {
            let lateness = 2_000_000;
            let layout = Layout::new(&durations, buckets);
            let mut reorder = Reorder::default();
            let mut windows = Windows::new(&layout);
            let mut released: Vec<(Micros, f64)> = Vec::new();
            let mut clock = 0i64;
            for (advance, jitter, v) in steps {
                clock += advance;
                let t = clock + jitter.max(-lateness);
                let mut out = Vec::new();
                let accepted = reorder.push(lateness, t, v, |t, v| out.push((t, v)));
                let newest_released = released.last().map_or(Micros::MIN, |s| s.0);
                prop_assert_eq!(accepted, t >= newest_released);
                for (t, v) in out {
                    prop_assert!(released.last().is_none_or(|s| s.0 <= t), "released in order");
                    released.push((t, v));
                    windows.push(&layout, t, v);
                    for i in 0..layout.len() {
                        let want = brute(&released, t, layout.step(i), buckets as i64);
                        let got = windows.stats(&layout, i);
                        let (Some(w), Some(g)) = (want, got) else {
                            prop_assert_eq!(want.is_none(), got.is_none());
                            continue;
                        };
                        let scale = w.max.abs().max(w.min.abs());
                        prop_assert_eq!((g.count, g.min, g.max, g.last), (w.count, w.min, w.max, w.last));
                        prop_assert!(close(g.mean, w.mean, scale, 1e-7), "mean {} vs {}", g.mean, w.mean);
                        prop_assert!(close(g.std, w.std, scale, 2e-5), "std {} vs {}", g.std, w.std);
                    }
                }
            }
        }
    }

    #[test]
    fn buckets_leave_the_window_as_time_moves_on() {
        // 10 µs in 5 buckets of 2.
        let layout = Layout::new(&[10], 5);
        let mut w = Windows::new(&layout);
        w.push(&layout, 0, 1.0);
        w.push(&layout, 5, 3.0);
        assert_eq!(
            w.stats(&layout, 0).map(|s| (s.count, s.mean)),
            Some((2, 2.0))
        );
        // At 12 the window is buckets 2..=6 (times 4..=13): the reading at
        // 0 has left.
        w.push(&layout, 12, 5.0);
        assert_eq!(
            w.stats(&layout, 0).map(|s| (s.count, s.min)),
            Some((2, 3.0))
        );
        w.push(&layout, 14, 7.0);
        assert_eq!(
            w.stats(&layout, 0).map(|s| (s.count, s.min, s.last)),
            Some((2, 5.0, 7.0))
        );
        // A jump past the whole window clears it.
        w.push(&layout, 100, 9.0);
        assert_eq!(w.stats(&layout, 0).map(|s| s.count), Some(1));
        assert_eq!(w.newest(), Some(100));
    }

    #[test]
    fn memory_is_fixed_whatever_the_rate() {
        let layout = Layout::new(&[10_000_000, 60_000_000, 300_000_000], 5);
        let mut w = Windows::new(&layout);
        let before = w.heap_bytes();
        for i in 0..100_000i64 {
            w.push(&layout, i * 1_000, i as f64);
        }
        assert_eq!(w.heap_bytes(), before);
        assert_eq!(before, 3 * 5 * 32);
        assert_eq!(w.stats(&layout, 2).map(|s| s.count), Some(100_000));
    }

    /// A steady stream holds `lateness` worth of readings and no more; a
    /// quiet series' buffer is freed by `flush`.
    #[test]
    fn a_steady_stream_holds_the_lateness_and_no_more() {
        let mut r = Reorder::default();
        let mut released = Vec::new();
        for i in 0..100i64 {
            assert!(r.push(2, i, i as f64, |t, _| released.push(t)));
        }
        assert_eq!(released, (0..98).collect::<Vec<_>>());
        assert_eq!(r.heap_bytes(), 2 * 16);
        r.flush(|t, _| released.push(t));
        assert_eq!(released.len(), 100);
        assert_eq!(r.heap_bytes(), 0);
        assert!(!r.push(2, 50, 0.0, |_, _| {}), "older than released");
    }
}
