//! Sliding time windows per series: count, mean, min, max, standard
//! deviation and last value over the readings of about the last `duration`.
//!
//! Readings enter in time order (the [`Reorder`] buffer before the windows
//! sees to that). A window is a ring of `buckets` partial aggregates, each
//! covering `duration / buckets` of time: a reading joins the aggregate of
//! its bucket, a bucket that falls out of the window is overwritten, and
//! the window's statistics merge the ring. So the window slides in steps of
//! one bucket (a 10 s window of 5 buckets covers the current 2 s bucket and
//! the four before it), which is what buys a fixed, small memory whatever
//! the reading rate: 40 bytes a bucket, 600 bytes for three windows of 5
//! buckets, where keeping every reading of a 5-minute window at 100
//! readings/s would take 30,000 entries. Updates are O(1) (a bucket merge;
//! at most `buckets` buckets cleared when time jumps). Aggregates are
//! merged with Chan et al.'s parallel formulas, never by subtracting what
//! leaves, so the variance stays accurate however long the stream.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

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

/// Count, mean, sum of squared deviations, min and max of some readings.
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

/// One sliding window: a ring of bucket aggregates.
#[derive(Debug, Clone)]
pub struct Window {
    /// Time each bucket covers (at least 1 µs).
    width: Micros,
    /// Index (time / width) of the newest bucket; `i64::MIN` before any
    /// reading.
    newest: i64,
    /// Bucket `k` lives at `k mod buckets.len()`.
    buckets: Box<[Agg]>,
    last: f64,
}

impl Window {
    /// A window of `duration` in `buckets` steps (at least 1).
    pub fn new(duration: Micros, buckets: usize) -> Window {
        let n = buckets.max(1);
        Window {
            width: (duration.max(1) as u64).div_ceil(n as u64).max(1) as Micros,
            newest: i64::MIN,
            buckets: vec![Agg::EMPTY; n].into_boxed_slice(),
            last: f64::NAN,
        }
    }

    /// The window length (rounded up to whole buckets).
    pub fn duration(&self) -> Micros {
        self.width * self.buckets.len() as Micros
    }

    /// Time each bucket covers: the step the window slides in.
    pub fn step(&self) -> Micros {
        self.width
    }

    fn slot(&self, k: i64) -> usize {
        k.rem_euclid(self.buckets.len() as i64) as usize
    }

    /// Adds a reading at `t` (not earlier than the previous one's bucket).
    pub fn push(&mut self, t: Micros, v: f64) {
        let k = t.div_euclid(self.width);
        self.advance(k);
        if k.saturating_add(self.buckets.len() as i64) <= self.newest {
            return; // older than the window; the reorder buffer prevents it
        }
        let slot = self.slot(k);
        self.buckets[slot] = Agg::merge(self.buckets[slot], Agg::one(v));
        self.last = v;
    }

    /// Makes bucket `k` the newest, clearing the buckets it passes.
    fn advance(&mut self, k: i64) {
        let len = self.buckets.len() as i64;
        let newest = self.newest;
        if k <= newest {
            return;
        }
        if newest != i64::MIN && k - newest < len {
            for j in newest + 1..=k {
                let slot = self.slot(j);
                self.buckets[slot] = Agg::EMPTY;
            }
        } else {
            self.buckets.fill(Agg::EMPTY);
        }
        self.newest = k;
    }

    /// Drops the buckets that have left the window by `now`.
    pub fn expire(&mut self, now: Micros) {
        if self.newest != i64::MIN {
            self.advance(now.div_euclid(self.width));
        }
    }

    /// Current statistics; `None` when the window is empty.
    pub fn stats(&self) -> Option<Stats> {
        let agg = self
            .buckets
            .iter()
            .fold(Agg::EMPTY, |acc, b| Agg::merge(acc, *b));
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

    /// Bytes on the heap this window holds (its ring).
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }
}

/// Puts readings that arrive out of order back in order, holding each for
/// `lateness` after the newest time seen. A reading older than what was
/// already released is *late*: it is still stored, but kept out of the
/// windows (the caller counts it).
#[derive(Debug, Clone)]
pub struct Reorder {
    lateness: Micros,
    newest: Micros,
    released: Micros,
    heap: BinaryHeap<Reverse<(Micros, u64, OrdF64)>>,
    arrivals: u64,
}

/// `f64` with a total order, for the heap.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrdF64(f64);

impl Eq for OrdF64 {}

impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Reorder {
    pub fn new(lateness: Micros) -> Reorder {
        Reorder {
            lateness,
            newest: Micros::MIN,
            released: Micros::MIN,
            heap: BinaryHeap::new(),
            arrivals: 0,
        }
    }

    /// Offers a reading; false when it is late (older than released ones).
    pub fn push(&mut self, t: Micros, v: f64) -> bool {
        if t < self.released {
            return false;
        }
        self.arrivals += 1;
        self.newest = self.newest.max(t);
        self.heap.push(Reverse((t, self.arrivals, OrdF64(v))));
        true
    }

    /// Bytes on the heap held for readings waiting to be released.
    pub fn heap_bytes(&self) -> usize {
        self.heap.capacity() * std::mem::size_of::<Reverse<(Micros, u64, OrdF64)>>()
    }

    /// True when no reading is held.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Releases every held reading, in time order.
    pub fn flush(&mut self, mut out: impl FnMut(Micros, f64)) {
        while let Some(Reverse((t, _, v))) = self.heap.pop() {
            self.released = t;
            out(t, v.0);
        }
        self.heap.shrink_to(16);
    }

    /// Releases, in time order, the readings older than newest - lateness.
    pub fn release(&mut self, mut out: impl FnMut(Micros, f64)) {
        let until = self.newest.saturating_sub(self.lateness);
        while let Some(&Reverse((t, _, v))) = self.heap.peek() {
            if t > until {
                break;
            }
            self.heap.pop();
            self.released = t;
            out(t, v.0);
        }
        // Give back what a burst grew: the buffer holds `lateness` worth of
        // readings, so its size follows the series' current rate.
        let (len, cap) = (self.heap.len(), self.heap.capacity());
        if cap > 16 && len < cap / 4 {
            self.heap.shrink_to(len * 2);
        }
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

    fn close(a: f64, b: f64, scale: f64) -> bool {
        (a - b).abs() <= 1e-7 * scale.max(1.0)
    }

    proptest! {
        /// Readings arrive out of order (up to the lateness); after every
        /// release the window statistics equal a brute-force recomputation
        /// over the released readings, and late ones are exactly those
        /// older than what was already released.
        #[test]
        fn windows_match_brute_force_with_out_of_order_arrivals(
            steps in prop::collection::vec((0i64..3_000_000, -5_000_000i64..0, -1000.0f64..1000.0), 1..300),
            duration in 1_000_000i64..60_000_000,
            buckets in 1usize..12,
        ) {
            let lateness = 2_000_000;
            let mut reorder = Reorder::new(lateness);
            let mut window = Window::new(duration, buckets);
            let mut released: Vec<(Micros, f64)> = Vec::new();
            let mut clock = 0i64;
            for (advance, jitter, v) in steps {
                clock += advance;
                let t = clock + jitter.max(-lateness);
                let accepted = reorder.push(t, v);
                let newest_released = released.last().map_or(Micros::MIN, |s| s.0);
                prop_assert_eq!(accepted, t >= newest_released);
                let mut out = Vec::new();
                reorder.release(|t, v| out.push((t, v)));
                for (t, v) in out {
                    prop_assert!(released.last().is_none_or(|s| s.0 <= t), "released in order");
                    released.push((t, v));
                    window.push(t, v);
                    let want = brute(&released, t, window.step(), buckets as i64);
                    let got = window.stats();
                    let (Some(w), Some(g)) = (want, got) else {
                        prop_assert_eq!(want.is_none(), got.is_none());
                        continue;
                    };
                    let scale = w.max.abs().max(w.min.abs());
                    prop_assert_eq!((g.count, g.min, g.max, g.last), (w.count, w.min, w.max, w.last));
                    prop_assert!(close(g.mean, w.mean, scale), "mean {} vs {}", g.mean, w.mean);
                    prop_assert!(close(g.std, w.std, scale), "std {} vs {}", g.std, w.std);
                }
            }
        }
    }

    #[test]
    fn expires_by_time_without_new_readings() {
        // 10 µs in 5 buckets of 2.
        let mut w = Window::new(10, 5);
        w.push(0, 1.0);
        w.push(5, 3.0);
        assert_eq!(w.stats().map(|s| (s.count, s.mean)), Some((2, 2.0)));
        // At 12 the window is buckets 2..=6 (times 4..=13): the reading at
        // 0 has left.
        w.expire(12);
        assert_eq!(w.stats().map(|s| (s.count, s.min)), Some((1, 3.0)));
        w.expire(13);
        assert_eq!(w.stats().map(|s| s.count), Some(1));
        w.expire(14);
        assert!(w.stats().is_none());
    }

    #[test]
    fn memory_is_fixed_whatever_the_rate() {
        let mut w = Window::new(300_000_000, 5);
        let before = w.heap_bytes();
        for i in 0..100_000i64 {
            w.push(i * 1_000, i as f64);
        }
        assert_eq!(w.heap_bytes(), before);
        assert_eq!(before, 5 * 40);
        assert_eq!(w.stats().map(|s| s.count), Some(100_000));
    }
}
