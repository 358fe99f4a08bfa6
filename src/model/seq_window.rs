//! The sequence window of one device: which of its recent message
//! sequences were seen, in its current boot. The shard's dedup computes it;
//! the sink stores it (`device_watermarks`, the spool) in the same
//! transaction as the rows it admitted, so it is shared vocabulary here.

use super::Micros;

/// Sequences tracked below the highest one seen.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// What a window makes of one message's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Not seen in this boot: new.
    New,
    /// The device restarted: a new window began with this sequence.
    Restart,
    /// Seen before (or older than the window) in this boot: a repeat.
    Repeat,
}

/// The sequences of one device seen recently, in its current boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqWindow {
    high: u64,
    /// Bit `d` set: sequence `high - d` was seen.
    bits: [u64; WORDS],
    /// The device's boot id, when it sends one.
    boot: Option<u64>,
    /// Restarts seen so far (the window of a later epoch wins).
    epoch: u32,
    /// Newest reading time among the accepted messages.
    newest: Micros,
}

impl SeqWindow {
    /// A window whose only seen sequence is `seq`.
    pub fn starting_at(seq: u64) -> SeqWindow {
        let mut bits = [0; WORDS];
        bits[0] = 1;
        SeqWindow {
            high: seq,
            bits,
            boot: None,
            epoch: 0,
            newest: Micros::MIN,
        }
    }

    /// The highest sequence seen.
    pub fn high(&self) -> u64 {
        self.high
    }

    /// The boot id of the current window, if the device sends one.
    pub fn boot(&self) -> Option<u64> {
        self.boot
    }

    /// How many restarts came before this window.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Newest reading time accepted in this window.
    pub fn newest(&self) -> Micros {
        self.newest
    }

    /// The same window with its boot id, epoch and newest reading time set
    /// (as stored in `device_watermarks` or the spool).
    pub fn with_state(mut self, boot: Option<u64>, epoch: u32, newest: Micros) -> SeqWindow {
        self.boot = boot;
        self.epoch = epoch;
        self.newest = newest;
        self
    }

    fn get(&self, d: u64) -> bool {
        self.bits[(d / 64) as usize] >> (d % 64) & 1 == 1
    }

    fn set(&mut self, d: u64) {
        self.bits[(d / 64) as usize] |= 1 << (d % 64);
    }

    /// Shifts the window up by `n` (the high mark moves up by `n`).
    fn shift(&mut self, n: u64) {
        if n >= WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let (words, bits) = ((n / 64) as usize, (n % 64) as u32);
        for i in (0..WORDS).rev() {
            let lo = i.checked_sub(words).map_or(0, |j| self.bits[j]);
            let below = i.checked_sub(words + 1).map_or(0, |j| self.bits[j]);
            self.bits[i] = if bits == 0 {
                lo
            } else {
                lo << bits | below >> (64 - bits)
            };
        }
    }

    /// Records `seq`; true when it was not seen before.
    pub fn accept(&mut self, seq: u64) -> bool {
        if seq > self.high {
            self.shift(seq - self.high);
            self.high = seq;
            self.set(0);
            return true;
        }
        let d = self.high - seq;
        if d >= WINDOW || self.get(d) {
            return false;
        }
        self.set(d);
        true
    }

    /// The bitmap as bytes, for `device_watermarks.window`.
    pub fn window_bytes(&self) -> Vec<u8> {
        self.bits.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Admits `seq` of a message whose newest reading is at `newest`, sent
    /// in `boot` (when the device names its boots). A new boot id, or a
    /// sequence the window refuses whose readings are newer than any before,
    /// is a restart: the window starts again at `seq` in the next epoch. (A
    /// window stored before the newest time was recorded knows no time: no
    /// inference then, a refused sequence stays a repeat.)
    pub fn admit(&mut self, seq: u64, boot: Option<u64>, newest: Micros) -> Admission {
        let restart = if boot.is_some() && boot != self.boot {
            true
        } else if self.accept(seq) {
            self.newest = self.newest.max(newest);
            false
        } else if self.newest != Micros::MIN && newest > self.newest {
            true
        } else {
            return Admission::Repeat;
        };
        if !restart {
            return Admission::New;
        }
        let epoch = self.epoch.saturating_add(1);
        *self = SeqWindow::starting_at(seq).with_state(boot, epoch, newest);
        Admission::Restart
    }

    /// Restores a window saved with [`window_bytes`](Self::window_bytes); a
    /// bitmap of the wrong size (or none) keeps only the high mark.
    pub fn restore(high: u64, window: &[u8]) -> SeqWindow {
        let mut w = SeqWindow::starting_at(high);
        if window.len() == WORDS * 8 {
            for (i, chunk) in window.chunks_exact(8).enumerate() {
                let mut b = [0; 8];
                b.copy_from_slice(chunk);
                w.bits[i] = u64::from_le_bytes(b);
            }
            w.set(0);
        } else {
            // Unknown history below the high mark: treat all of it as seen.
            w.bits = [u64::MAX; WORDS];
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn window_accepts_new_and_out_of_order_once() {
        let mut w = SeqWindow::starting_at(10);
        assert!(!w.accept(10));
        assert!(w.accept(12));
        assert!(w.accept(11));
        assert!(!w.accept(11));
        assert!(w.accept(12 + 200));
        assert!(w.accept(100));
        assert!(!w.accept(100));
        assert!(w.accept(5000));
        assert!(!w.accept(5000 - WINDOW));
    }

    #[test]
    fn window_survives_a_round_trip_through_bytes() {
        let mut w = SeqWindow::starting_at(1);
        for s in [3, 7, 70, 64, 700] {
            w.accept(s);
        }
        let back = SeqWindow::restore(w.high(), &w.window_bytes());
        assert_eq!(back, w);
        let mut unknown = SeqWindow::restore(700, &[]);
        assert!(!unknown.accept(699));
        assert!(unknown.accept(701));
    }

    proptest! {
        /// Against a brute-force set: within the window, every sequence is
        /// accepted exactly once, in any order.
        #[test]
        fn window_matches_brute_force(seqs in prop::collection::vec(0u64..3000, 1..400)) {
            let mut w = SeqWindow::starting_at(seqs[0]);
            let mut seen = HashSet::from([seqs[0]]);
            let mut high = seqs[0];
            for &s in &seqs[1..] {
                let expect = if s > high || (high - s < WINDOW && !seen.contains(&s)) {
                    seen.insert(s);
                    high = high.max(s);
                    true
                } else {
                    false
                };
                prop_assert_eq!(w.accept(s), expect, "seq {}", s);
            }
        }
    }
}
