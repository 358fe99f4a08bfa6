//! Duplicate detection, owned by each shard worker for its devices.
//!
//! Redeliveries (after a gateway or broker restart, a reconnect, or a
//! device re-sending) must never become duplicate rows. Two mechanisms:
//!
//! - **Sequence window** for payloads with a per-device message sequence
//!   (native): the highest sequence seen and a bitmap of the [`WINDOW`]
//!   sequences below it. A sequence above the high mark or an unseen one
//!   inside the window is new (so moderately out-of-order delivery is
//!   accepted); a seen one, or one older than the window, is a duplicate.
//! - **Message identity** for payloads without one (SenML): a 128-bit hash
//!   of device and payload, remembered over a bounded horizon. A pack whose
//!   times are relative to "now" is only checked when the broker marks it a
//!   redelivery (MQTT DUP flag): two such packs with equal bytes may be two
//!   real measurements, so equal bytes alone do not prove a duplicate.
//!
//! Both states are written in the same transaction as the rows
//! (`device_watermarks`, `message_ids`) and loaded at start, so they survive
//! restarts exactly as far as the committed data does.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::model::Micros;

/// Sequences tracked below the highest one seen.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// The sequences of one device seen recently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqWindow {
    high: u64,
    /// Bit `d` set: sequence `high - d` was seen.
    bits: [u64; WORDS],
}

impl SeqWindow {
    /// A window whose only seen sequence is `seq`.
    pub fn starting_at(seq: u64) -> SeqWindow {
        let mut bits = [0; WORDS];
        bits[0] = 1;
        SeqWindow { high: seq, bits }
    }

    /// The highest sequence seen.
    pub fn high(&self) -> u64 {
        self.high
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

/// The identity of a message without a sequence: device and payload.
pub fn identity(device: &str, payload: &[u8]) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(device.as_bytes());
    h.update(&[0xff]);
    h.update(payload);
    h.digest128()
}

/// Identities seen recently, bounded by count and age.
#[derive(Debug, Default)]
pub struct IdentitySet {
    seen: HashSet<u128>,
    order: VecDeque<(Micros, u128)>,
    max: usize,
    horizon: Micros,
}

impl IdentitySet {
    pub fn new(max: usize, horizon: Micros) -> IdentitySet {
        IdentitySet {
            max,
            horizon,
            ..IdentitySet::default()
        }
    }

    /// Records `id` seen at `at`; true when it was not already known.
    pub fn insert(&mut self, id: u128, at: Micros) -> bool {
        while let Some(&(t, old)) = self.order.front() {
            if self.order.len() < self.max && t >= at - self.horizon {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back((at, id));
        true
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A worker's dedup state for all its devices.
#[derive(Debug, Default)]
pub struct Dedup {
    windows: HashMap<Arc<str>, SeqWindow>,
    identities: IdentitySet,
}

/// What the dedup check decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// New: store it, with the state to persist in the same transaction.
    New {
        window: Option<SeqWindow>,
        identity: Option<u128>,
    },
    Duplicate,
}

impl Dedup {
    pub fn new(max_identities: usize, horizon: Micros) -> Dedup {
        Dedup {
            windows: HashMap::new(),
            identities: IdentitySet::new(max_identities, horizon),
        }
    }

    /// Seeds state loaded from the database.
    pub fn restore_window(&mut self, device: Arc<str>, window: SeqWindow) {
        self.windows.insert(device, window);
    }

    /// Seeds an identity loaded from the database.
    pub fn restore_identity(&mut self, id: u128, at: Micros) {
        self.identities.insert(id, at);
    }

    /// Decides whether a message is new and records it.
    pub fn check(
        &mut self,
        device: &Arc<str>,
        seq: Option<u64>,
        payload: &[u8],
        relative_time: bool,
        redelivery: bool,
        at: Micros,
    ) -> Verdict {
        if let Some(seq) = seq {
            let new = match self.windows.get_mut(device) {
                Some(w) => w.accept(seq),
                None => {
                    self.windows
                        .insert(device.clone(), SeqWindow::starting_at(seq));
                    true
                }
            };
            return if new {
                Verdict::New {
                    window: self.windows.get(device).cloned(),
                    identity: None,
                }
            } else {
                Verdict::Duplicate
            };
        }
        if relative_time && !redelivery {
            return Verdict::New {
                window: None,
                identity: None,
            };
        }
        let id = identity(device, payload);
        if self.identities.insert(id, at) {
            Verdict::New {
                window: None,
                identity: Some(id),
            }
        } else {
            Verdict::Duplicate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn identities_are_bounded_by_count_and_age() {
        let mut set = IdentitySet::new(3, 100);
        assert!(set.insert(1, 0));
        assert!(!set.insert(1, 10));
        assert!(set.insert(2, 10));
        assert!(set.insert(3, 20));
        assert!(set.insert(4, 30));
        assert_eq!(set.len(), 3);
        assert!(set.insert(1, 40), "1 was evicted by count");
        assert!(set.insert(5, 500));
        assert_eq!(set.len(), 1, "older than the horizon evicted");
    }

    #[test]
    fn relative_packs_are_checked_only_on_redelivery() {
        let mut d = Dedup::new(100, 1_000_000);
        let dev: Arc<str> = Arc::from("d");
        let p = br#"[{"n":"door","vb":true}]"#;
        assert!(matches!(
            d.check(&dev, None, p, true, false, 0),
            Verdict::New { identity: None, .. }
        ));
        assert!(matches!(
            d.check(&dev, None, p, true, false, 1),
            Verdict::New { identity: None, .. }
        ));
        let abs = br#"[{"n":"t","v":1,"t":1700000000}]"#;
        assert!(matches!(
            d.check(&dev, None, abs, false, false, 2),
            Verdict::New {
                identity: Some(_),
                ..
            }
        ));
        assert_eq!(d.check(&dev, None, abs, false, true, 3), Verdict::Duplicate);
        let other: Arc<str> = Arc::from("e");
        assert!(matches!(
            d.check(&other, None, abs, false, false, 4),
            Verdict::New { .. }
        ));
        assert!(matches!(
            d.check(&dev, Some(1), b"", false, false, 5),
            Verdict::New {
                window: Some(_),
                ..
            }
        ));
        assert_eq!(
            d.check(&dev, Some(1), b"", false, false, 6),
            Verdict::Duplicate
        );
    }
}
