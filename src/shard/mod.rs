//! Shard router and ring buffers: each device hashes to one shard; each shard
//! is a bounded lock-free ring (crossbeam `ArrayQueue`) drained by exactly
//! one [`worker`], which owns all state of its devices, so the hot path takes
//! no lock. A full ring refuses [`Router::try_push`]: the intake holds that
//! message and takes no more from the broker until it fits (backpressure);
//! nothing is dropped.

pub mod dedup;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use tokio::sync::Notify;

use crate::model::Message;

/// One shard's ring and its wake-up signal.
#[derive(Debug)]
pub struct Shard {
    ring: ArrayQueue<Message>,
    wake: Notify,
    closed: AtomicBool,
}

impl Shard {
    /// Takes the next message, if any.
    pub fn pop(&self) -> Option<Message> {
        self.ring.pop()
    }

    /// Waits until a message may be available or the shard is closed.
    pub async fn wait(&self) {
        self.wake.notified().await;
    }

    /// True once intake has stopped for good.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

/// Routes messages to shards by device.
#[derive(Debug)]
pub struct Router {
    shards: Vec<Arc<Shard>>,
}

/// The shard of a device ([`edge_payload::device_hash`] modulo `shards`).
pub fn shard_of(device: &str, shards: usize) -> usize {
    (edge_payload::device_hash(device) % shards.max(1) as u64) as usize
}

impl Router {
    /// `count` shards with rings of `capacity` messages each.
    pub fn new(count: usize, capacity: usize) -> Router {
        Router {
            shards: (0..count.max(1))
                .map(|_| {
                    Arc::new(Shard {
                        ring: ArrayQueue::new(capacity.max(1)),
                        wake: Notify::new(),
                        closed: AtomicBool::new(false),
                    })
                })
                .collect(),
        }
    }

    /// The shards, for spawning their workers.
    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    /// Queues `message` on its device's shard, or gives it back when the
    /// ring is full (having woken the worker to drain it).
    ///
    /// # Errors
    /// The message itself, when its shard's ring is full.
    pub fn try_push(&self, message: Message) -> Result<(), Message> {
        let device = message.device.as_deref().unwrap_or("");
        let shard = &self.shards[shard_of(device, self.shards.len())];
        let result = shard.ring.push(message);
        shard.wake.notify_one();
        result
    }

    /// Stops intake: workers drain what is queued, flush and exit.
    pub fn close(&self) {
        for shard in &self.shards {
            shard.closed.store(true, Ordering::Release);
            shard.wake.notify_one();
        }
    }

    /// Messages waiting per shard.
    pub fn occupancy(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.len()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_is_stable_and_spreads() {
        assert_eq!(shard_of("sim-0001", 4), shard_of("sim-0001", 4));
        let mut counts = [0usize; 4];
        for i in 0..1000 {
            counts[shard_of(&format!("dev-{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
    }
}
