//! Sliding time windows per series: count, mean, min, max, standard
//! deviation and last value over the readings of the last `duration`.
//!
//! Readings enter in time order (the [`Reorder`] buffer before the windows
//! sees to that). The window is a two-stack queue of partial aggregates
//! (sliding-window aggregation): new readings join a running aggregate,
//! old ones leave from a stack of suffix aggregates that is rebuilt from
//! the other stack when it runs empty, so each update is O(1) amortised.
//! Aggregates are merged with Chan et al.'s parallel formulas, never by
//! subtracting what leaves, so the variance stays accurate however long the
//! stream. Memory is bounded: a window keeps at most `cap` readings; past
//! that the oldest leave early, so a window is "the last `duration`, at most
//! `cap` readings".

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

/// One sliding window.
#[derive(Debug, Clone)]
pub struct Window {
    duration: Micros,
    cap: usize,
    /// Oldest readings, oldest on top, each with the aggregate of itself and
    /// every reading below it.
    front: Vec<(Micros, f64, Agg)>,
    /// Newest readings in arrival order, and their running aggregate.
    back: Vec<(Micros, f64)>,
    back_agg: Agg,
}

impl Window {
    pub fn new(duration: Micros, cap: usize) -> Window {
        Window {
            duration,
            cap: cap.max(1),
            front: Vec::new(),
            back: Vec::new(),
            back_agg: Agg::EMPTY,
        }
    }

    /// The window length.
    pub fn duration(&self) -> Micros {
        self.duration
    }

    /// Readings in the window.
    pub fn len(&self) -> usize {
        self.front.len() + self.back.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a reading at `t` (not earlier than the previous one).
    pub fn push(&mut self, t: Micros, v: f64) {
        self.back.push((t, v));
        self.back_agg = Agg::merge(self.back_agg, Agg::one(v));
        self.expire(t);
    }

    /// The oldest reading still in the window.
    pub fn first(&self) -> Option<(Micros, f64)> {
        self.front
            .last()
            .map(|&(t, v, _)| (t, v))
            .or_else(|| self.back.first().copied())
    }

    fn pop_oldest(&mut self) {
        if self.front.is_empty() {
            let mut acc = Agg::EMPTY;
            for &(t, v) in self.back.iter().rev() {
                acc = Agg::merge(Agg::one(v), acc);
                self.front.push((t, v, acc));
            }
            self.back.clear();
            self.back_agg = Agg::EMPTY;
        }
        self.front.pop();
    }

    /// Drops readings older than `now - duration` (and past the cap).
    pub fn expire(&mut self, now: Micros) {
        let cutoff = now - self.duration;
        while let Some((t, _)) = self.first() {
            if t > cutoff && self.len() <= self.cap {
                break;
            }
            self.pop_oldest();
        }
    }

    /// Current statistics; `None` when the window is empty.
    pub fn stats(&self) -> Option<Stats> {
        let last = self
            .back
            .last()
            .map(|s| s.1)
            .or_else(|| self.front.first().map(|s| s.1))?;
        let agg = Agg::merge(self.front.last().map_or(Agg::EMPTY, |s| s.2), self.back_agg);
        Some(Stats {
            count: agg.n as usize,
            mean: agg.mean,
            min: agg.min,
            max: agg.max,
            std: (agg.m2 / agg.n).max(0.0).sqrt(),
            last,
        })
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn brute(
        samples: &[(Micros, f64)],
        now: Micros,
        duration: Micros,
        cap: usize,
    ) -> Option<Stats> {
        let inside: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 > now - duration)
            .map(|s| s.1)
            .collect();
        let inside = &inside[inside.len().saturating_sub(cap)..];
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
            cap in 5usize..200,
        ) {
            let lateness = 2_000_000;
            let mut reorder = Reorder::new(lateness);
            let mut window = Window::new(duration, cap);
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
                    let want = brute(&released, t, duration, cap);
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
        let mut w = Window::new(10, 100);
        w.push(0, 1.0);
        w.push(5, 3.0);
        assert_eq!(w.stats().map(|s| (s.count, s.mean)), Some((2, 2.0)));
        w.expire(12);
        assert_eq!(w.stats().map(|s| (s.count, s.min)), Some((1, 3.0)));
        w.expire(15);
        assert!(w.stats().is_none());
    }
}
