//! The ack ledger: releases MQTT PUBACKs in receive order, each only once
//! its message is durable.
//!
//! MQTT requires acknowledgements in the order the PUBLISHes arrived, while
//! batches from different shards commit in any order. Every message gets an
//! id in receive order; commits mark ids done; the ledger hands out the acks
//! of the longest done prefix. After a reconnect the broker redelivers what
//! was not acknowledged under new rules, so pending entries of the old
//! connection are dropped ([`AckLedger::reset`]): an ack is never sent on a
//! connection other than the one its message came on.

use std::collections::VecDeque;

/// What is needed to acknowledge one message: its QoS 1 packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingAck {
    pub pkid: u16,
}

#[derive(Debug)]
struct Entry {
    ack: Option<PendingAck>,
    done: bool,
}

/// Ordered ledger of in-flight messages.
#[derive(Debug, Default)]
pub struct AckLedger {
    /// Id of `entries[0]`.
    base: u64,
    entries: VecDeque<Entry>,
    /// Entries not yet marked durable.
    not_durable: usize,
}

impl AckLedger {
    pub fn new() -> AckLedger {
        AckLedger::default()
    }

    /// Registers a received message; `ack` is `None` for QoS 0. Returns its id.
    pub fn register(&mut self, ack: Option<PendingAck>) -> u64 {
        let id = self.base + self.entries.len() as u64;
        self.entries.push_back(Entry { ack, done: false });
        self.not_durable += 1;
        id
    }

    /// Marks `id` durable. Ids from before a [`reset`](Self::reset) or
    /// unknown ids are ignored.
    pub fn complete(&mut self, id: u64) {
        if id >= self.base {
            if let Some(entry) = self.entries.get_mut((id - self.base) as usize) {
                if !entry.done {
                    entry.done = true;
                    self.not_durable -= 1;
                }
            }
        }
    }

    /// Removes the done prefix and returns its acks, in receive order.
    pub fn release(&mut self) -> Vec<PendingAck> {
        let mut acks = Vec::new();
        while self.entries.front().is_some_and(|e| e.done) {
            if let Some(entry) = self.entries.pop_front() {
                self.base += 1;
                acks.extend(entry.ack);
            }
        }
        acks
    }

    /// Forgets every pending entry (the connection they came on is gone).
    pub fn reset(&mut self) {
        self.base += self.entries.len() as u64;
        self.entries.clear();
        self.not_durable = 0;
    }

    /// Messages received and not yet released.
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Messages received and not yet durable (a subset of the pending ones:
    /// a durable message still waits for older ones before its ack).
    pub fn not_durable(&self) -> usize {
        self.not_durable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ack(pkid: u16) -> Option<PendingAck> {
        Some(PendingAck { pkid })
    }

    #[test]
    fn releases_in_receive_order_only() {
        let mut l = AckLedger::new();
        let a = l.register(ack(1));
        let b = l.register(None);
        let c = l.register(ack(3));
        l.complete(c);
        l.complete(c);
        assert!(l.release().is_empty());
        assert_eq!((l.pending(), l.not_durable()), (3, 2));
        l.complete(a);
        assert_eq!(l.release(), vec![PendingAck { pkid: 1 }]);
        l.complete(b);
        assert_eq!(l.release(), vec![PendingAck { pkid: 3 }]);
        assert_eq!(l.pending(), 0);
    }

    #[test]
    fn reset_drops_old_connection() {
        let mut l = AckLedger::new();
        let old = l.register(ack(1));
        l.reset();
        let new = l.register(ack(1));
        l.complete(old);
        assert!(l.release().is_empty());
        assert_eq!(l.not_durable(), 1);
        l.complete(new);
        assert_eq!(l.release(), vec![PendingAck { pkid: 1 }]);
    }

    proptest! {
        /// Whatever order commits arrive in, acks come out exactly once each,
        /// in receive order, and never before their own commit.
        #[test]
        fn any_completion_order(order in Just((0..50u16).collect::<Vec<_>>()).prop_shuffle()) {
            let mut l = AckLedger::new();
            let ids: Vec<u64> = (0..50u16).map(|p| l.register(ack(p))).collect();
            let mut released = Vec::new();
            let mut done = std::collections::HashSet::new();
            for i in order {
                l.complete(ids[i as usize]);
                done.insert(i);
                prop_assert_eq!(l.not_durable(), 50 - done.len());
                for a in l.release() {
                    prop_assert!(done.contains(&a.pkid));
                    released.push(a.pkid);
                }
            }
            prop_assert_eq!(released, (0..50u16).collect::<Vec<_>>());
        }
    }
}
