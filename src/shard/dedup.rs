//! Duplicate detection, owned by each shard worker for its devices.
//!
//! Redeliveries (after a gateway or broker restart, a reconnect, or a
//! device re-sending) must never become duplicate rows. Two mechanisms:
//!
//! - **Sequence window** for payloads with a per-device message sequence
//!   (native): the highest sequence seen and a bitmap of the [`WINDOW`]
//!   sequences below it. A sequence above the high mark or an unseen one
//!   inside the window is new (so moderately out-of-order delivery is
//!   accepted); a seen one, or one older than the window, is a duplicate,
//!   unless the device restarted:
//! - **Restarts.** Devices reboot and most do not persist their counter. A
//!   device that sends a boot id (native `boot`) starts a new window with
//!   each new boot id. Without one, a sequence the window refuses whose
//!   readings are newer than any the device sent before cannot be a repeat
//!   (a repeat carries the same timestamps): it is a restart, and starts a
//!   new window. Each new window has the next epoch, so the stored window
//!   moves forward even though the sequence went back. Only true repeats are
//!   dropped.
//! - **Message identity** for payloads without one (SenML): a 128-bit hash
//!   of device and payload, remembered over a bounded horizon. A pack whose
//!   times are relative to "now" is only checked when the broker marks it a
//!   redelivery (MQTT DUP flag): two such packs with equal bytes may be two
//!   real measurements, so equal bytes alone do not prove a duplicate.
//!
//! Both states are written in the same transaction as the rows
//! (`device_watermarks`, `message_ids`) and loaded at start, so they survive
//! restarts exactly as far as the committed data does. A window evicted
//! from memory (over `limits.max_dedup_devices`) is only in the database:
//! a redelivery (MQTT DUP) of such a device is marked for the writer to
//! check against the stored window in its commit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

pub use crate::model::seq_window::{Admission, SeqWindow, WINDOW};
use crate::model::{Decoded, Micros};

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

/// A device's window and when the device last sent.
#[derive(Debug)]
struct Device {
    window: SeqWindow,
    touched: Micros,
    /// A restart of this device was logged already.
    logged: bool,
}

/// A worker's dedup state for all its devices.
#[derive(Debug, Default)]
pub struct Dedup {
    devices: HashMap<Arc<str>, Device>,
    identities: IdentitySet,
    horizon: Micros,
    max_devices: usize,
    /// Windows evicted so far (idle or over the cap).
    pub evicted: u64,
}

/// What the dedup check decided for one message. Returned by value once a
/// message and consumed at once: boxing the window would cost an
/// allocation per message for nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Verdict {
    /// New: store it, with the state to persist in the same transaction.
    New {
        window: Option<SeqWindow>,
        /// The identity to record, and whether the bytes may repeat as a
        /// new message (a pack with times relative to "now").
        identity: Option<(u128, bool)>,
        /// The device restarted its sequence with this message.
        restart: bool,
        /// A redelivery of a device whose window is not in memory (evicted
        /// over `limits.max_dedup_devices`, or idle): the writer checks it
        /// against the stored window in the commit.
        verify: bool,
    },
    Duplicate,
}

impl Dedup {
    /// Identities are remembered up to `max_identities` and `horizon`;
    /// sequence windows of devices silent longer than `horizon` are evicted
    /// (their state is in `device_watermarks` until it is pruned past the
    /// same horizon), and at most `max_devices` windows are kept.
    pub fn new(max_identities: usize, horizon: Micros) -> Dedup {
        Dedup::with_max_devices(max_identities, horizon, usize::MAX)
    }

    /// [`Dedup::new`] with a cap on the windows kept.
    pub fn with_max_devices(max_identities: usize, horizon: Micros, max_devices: usize) -> Dedup {
        Dedup {
            devices: HashMap::new(),
            identities: IdentitySet::new(max_identities, horizon),
            horizon,
            max_devices: max_devices.max(1),
            evicted: 0,
        }
    }

    /// Seeds state loaded from the database (or the spool), last used at `at`.
    pub fn restore_window(&mut self, device: Arc<str>, window: SeqWindow, at: Micros) {
        self.devices.insert(
            device,
            Device {
                window,
                touched: at,
                logged: false,
            },
        );
    }

    /// Windows held.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Evicts the windows of devices silent for longer than the horizon,
    /// then the longest-silent ones while more than `keep` remain.
    pub fn evict(&mut self, now: Micros, keep: usize) {
        let before = self.devices.len();
        let cutoff = now.saturating_sub(self.horizon);
        self.devices.retain(|_, d| d.touched >= cutoff);
        if self.devices.len() > keep {
            let mut times: Vec<Micros> = self.devices.values().map(|d| d.touched).collect();
            let cut = self.devices.len() - keep;
            times.select_nth_unstable(cut - 1);
            let limit = times[cut - 1];
            let mut to_remove = cut;
            self.devices.retain(|_, d| {
                if to_remove > 0 && d.touched <= limit {
                    to_remove -= 1;
                    false
                } else {
                    true
                }
            });
        }
        self.evicted += (before - self.devices.len()) as u64;
    }

    /// Seeds an identity loaded from the database.
    pub fn restore_identity(&mut self, id: u128, at: Micros) {
        self.identities.insert(id, at);
    }

    /// Decides whether a message of `device` is new and records it; `at` is
    /// its receive time.
    pub fn check(
        &mut self,
        device: &Arc<str>,
        decoded: &Decoded,
        payload: &[u8],
        redelivery: bool,
        at: Micros,
    ) -> Verdict {
        if let Some(seq) = decoded.seq {
            let newest = decoded
                .readings
                .iter()
                .map(|r| r.time)
                .max()
                .unwrap_or(Micros::MIN);
            return self.check_seq(device, seq, decoded.boot, newest, redelivery, at);
        }
        let id = identity(device, payload);
        if decoded.relative_time && !redelivery {
            // Equal bytes may be a new measurement: record, never drop.
            self.identities.insert(id, at);
            return Verdict::New {
                window: None,
                identity: Some((id, true)),
                restart: false,
                verify: false,
            };
        }
        if self.identities.insert(id, at) {
            Verdict::New {
                window: None,
                identity: Some((id, decoded.relative_time)),
                restart: false,
                verify: false,
            }
        } else {
            Verdict::Duplicate
        }
    }

    fn check_seq(
        &mut self,
        device: &Arc<str>,
        seq: u64,
        boot: Option<u64>,
        newest: Micros,
        redelivery: bool,
        at: Micros,
    ) -> Verdict {
        let Some(d) = self.devices.get_mut(device) else {
            if self.devices.len() >= self.max_devices {
                // Make room for a tenth at once, so the sort is amortised.
                let keep = self.max_devices - self.max_devices.div_ceil(10);
                self.evict(at, keep);
            }
            let window = SeqWindow::starting_at(seq).with_state(boot, 0, newest);
            self.devices.insert(
                device.clone(),
                Device {
                    window: window.clone(),
                    touched: at,
                    logged: false,
                },
            );
            return Verdict::New {
                window: Some(window),
                identity: None,
                restart: false,
                verify: redelivery,
            };
        };
        d.touched = at;
        let restart = match d.window.admit(seq, boot, newest) {
            Admission::New => false,
            Admission::Restart => true,
            Admission::Repeat => return Verdict::Duplicate,
        };
        if restart && !d.logged {
            d.logged = true;
            let epoch = d.window.epoch();
            tracing::info!(device = %device, seq, boot, epoch, "device restarted its message sequence");
        }
        Verdict::New {
            window: Some(d.window.clone()),
            identity: None,
            restart,
            verify: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn decoded(seq: Option<u64>, boot: Option<u64>, time: Micros, relative: bool) -> Decoded {
        Decoded {
            readings: vec![crate::model::Reading {
                time,
                metric: "m".into(),
                value: crate::model::Value::Number(1.0),
                unit: None,
                sum: None,
            }],
            seq,
            boot,
            relative_time: relative,
        }
    }

    fn is_new(v: &Verdict) -> bool {
        matches!(v, Verdict::New { .. })
    }

    #[test]
    fn relative_packs_are_recorded_and_dropped_only_on_redelivery() {
        let mut d = Dedup::new(100, 1_000_000);
        let dev: Arc<str> = Arc::from("d");
        let p = br#"[{"n":"door","vb":true}]"#;
        let rel = decoded(None, None, 0, true);
        assert!(matches!(
            d.check(&dev, &rel, p, false, 0),
            Verdict::New {
                identity: Some((_, true)),
                ..
            }
        ));
        // The same bytes again, not a redelivery: a new measurement.
        assert!(is_new(&d.check(&dev, &rel, p, false, 1)));
        // Redelivered: its identity was recorded the first time.
        assert_eq!(d.check(&dev, &rel, p, true, 2), Verdict::Duplicate);
        let abs = br#"[{"n":"t","v":1,"t":1700000000}]"#;
        let absolute = decoded(None, None, 0, false);
        assert!(matches!(
            d.check(&dev, &absolute, abs, false, 2),
            Verdict::New {
                identity: Some((_, false)),
                ..
            }
        ));
        assert_eq!(d.check(&dev, &absolute, abs, false, 3), Verdict::Duplicate);
        let other: Arc<str> = Arc::from("e");
        assert!(is_new(&d.check(&other, &absolute, abs, false, 4)));
        let native = decoded(Some(1), None, 10, false);
        assert!(matches!(
            d.check(&dev, &native, b"", false, 5),
            Verdict::New {
                window: Some(_),
                ..
            }
        ));
        assert_eq!(d.check(&dev, &native, b"", false, 6), Verdict::Duplicate);
    }

    #[test]
    fn a_restarted_counter_with_newer_readings_is_a_restart_not_a_duplicate() {
        let mut d = Dedup::new(100, i64::MAX / 4);
        let dev: Arc<str> = Arc::from("d");
        for seq in 1..=1500 {
            assert!(is_new(&d.check(
                &dev,
                &decoded(Some(seq), None, seq as i64 * 10, false),
                b"",
                false,
                0
            )));
        }
        // A true repeat (same timestamps) is still a duplicate...
        assert_eq!(
            d.check(&dev, &decoded(Some(3), None, 30, false), b"", false, 0),
            Verdict::Duplicate
        );
        assert_eq!(
            d.check(
                &dev,
                &decoded(Some(1400), None, 14_000, false),
                b"",
                false,
                0
            ),
            Verdict::Duplicate
        );
        // ...while the counter starting again with newer readings is not.
        let first = d.check(&dev, &decoded(Some(1), None, 20_000, false), b"", false, 0);
        assert!(
            matches!(first, Verdict::New { restart: true, window: Some(ref w), .. } if w.epoch() == 1)
        );
        for seq in 2..=200 {
            let v = d.check(
                &dev,
                &decoded(Some(seq), None, 20_000 + seq as i64, false),
                b"",
                false,
                0,
            );
            assert!(
                matches!(v, Verdict::New { restart: false, .. }),
                "seq {seq}"
            );
        }
        // And a redelivery of the new boot's messages is a duplicate.
        assert_eq!(
            d.check(
                &dev,
                &decoded(Some(150), None, 20_150, false),
                b"",
                false,
                0
            ),
            Verdict::Duplicate
        );
    }

    #[test]
    fn a_new_boot_id_starts_a_new_window() {
        let mut d = Dedup::new(100, i64::MAX / 4);
        let dev: Arc<str> = Arc::from("d");
        for seq in 1..=10 {
            assert!(is_new(&d.check(
                &dev,
                &decoded(Some(seq), Some(7), 100, false),
                b"",
                false,
                0
            )));
        }
        // Same timestamps even (a device without a clock): the boot id says.
        let v = d.check(&dev, &decoded(Some(1), Some(8), 100, false), b"", false, 0);
        assert!(matches!(v, Verdict::New { restart: true, .. }));
        assert_eq!(
            d.check(&dev, &decoded(Some(1), Some(8), 100, false), b"", false, 0),
            Verdict::Duplicate
        );
        assert!(is_new(&d.check(
            &dev,
            &decoded(Some(2), Some(8), 100, false),
            b"",
            false,
            0
        )));
    }

    #[test]
    fn idle_and_surplus_windows_are_evicted() {
        let mut d = Dedup::with_max_devices(100, 1_000, 10);
        for i in 0..25 {
            let dev: Arc<str> = Arc::from(format!("d{i}").as_str());
            assert!(is_new(&d.check(
                &dev,
                &decoded(Some(1), None, 0, false),
                b"",
                false,
                i
            )));
            assert!(d.devices() <= 10);
        }
        d.evict(10_000, usize::MAX);
        assert_eq!(d.devices(), 0, "all idle past the horizon");
        assert!(d.evicted >= 25);
    }

    /// A message the broker redelivers after a reconnect, whose device's
    /// window was evicted over the cap, is marked for the writer to check
    /// against the stored window (`tests/hostile.rs` device churn stored
    /// 220,767 rows for 200,000 readings when it was taken as new).
    #[test]
    fn a_redelivery_of_an_evicted_device_is_verified() {
        let mut d = Dedup::with_max_devices(100, 1_000_000, 10);
        let first: Arc<str> = Arc::from("d0");
        let message = decoded(Some(7), None, 5, false);
        assert!(matches!(
            d.check(&first, &message, b"", false, 0),
            Verdict::New { verify: false, .. }
        ));
        for i in 1..30 {
            let dev: Arc<str> = Arc::from(format!("d{i}").as_str());
            d.check(&dev, &decoded(Some(1), None, 0, false), b"", false, i);
        }
        assert!(d.evicted > 0);
        assert!(matches!(
            d.check(&first, &message, b"", true, 40),
            Verdict::New { verify: true, .. }
        ));
        // Known again now: a further redelivery is caught in memory.
        assert_eq!(d.check(&first, &message, b"", true, 41), Verdict::Duplicate);
        // A new device's first message, not redelivered, needs no check.
        let fresh: Arc<str> = Arc::from("fresh");
        assert!(matches!(
            d.check(&fresh, &message, b"", false, 42),
            Verdict::New { verify: false, .. }
        ));
    }
}
