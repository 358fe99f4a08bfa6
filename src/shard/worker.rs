//! Shard worker: drains one ring, decodes and checks each message, and
//! appends its rows (or its dead letter) to the current batch, flushing the
//! batch to the writers when it is full or when its oldest row has waited
//! `flush_interval` (so progress never depends on more input arriving: a
//! broker with a small in-flight window still sees its messages acked).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::dedup::{Dedup, Verdict};
use super::Shard;
use crate::analytics::engine::{Analytics, Footprint, Outputs};
use crate::analytics::rules::RuleConfig;
use crate::decode::decode_limited;
use crate::model::{DeadLetterReason, Message, Micros, MICROS_PER_SEC};
use crate::sink::batch::BatchId;
use crate::sink::settings::PartitionInterval;
use crate::sink::{Batch, SealedBatch};
use crate::telemetry::Metrics;
use tokio::sync::watch;

/// Intake limits and batching for one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub batch_rows: usize,
    pub flush_interval: Duration,
    pub max_payload_bytes: usize,
    /// Readings later than receive time + this are rejected.
    pub max_future: Micros,
    /// Readings earlier than receive time - this are rejected.
    pub max_past: Micros,
    /// `[limits]`: what one device may make the gateway hold or store.
    pub limits: crate::decode::Limits,
    /// How `readings` is partitioned (each row notes its partition).
    pub partitions: PartitionInterval,
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Hands out batch ids: this process's start time and a counter.
#[derive(Debug)]
pub struct BatchIds {
    run: i64,
    next: std::sync::atomic::AtomicI64,
}

impl BatchIds {
    pub fn new() -> BatchIds {
        BatchIds {
            run: crate::model::now_micros(),
            next: std::sync::atomic::AtomicI64::new(1),
        }
    }

    pub fn next(&self) -> BatchId {
        BatchId {
            run: self.run,
            seq: self.next.fetch_add(1, Relaxed),
        }
    }
}

impl Default for BatchIds {
    fn default() -> Self {
        BatchIds::new()
    }
}

/// One shard's worker.
pub struct Worker {
    shard: Arc<Shard>,
    config: WorkerConfig,
    metrics: Arc<Metrics>,
    out: mpsc::Sender<SealedBatch>,
    dedup: Dedup,
    ids: Arc<BatchIds>,
    analytics: Option<Analytics>,
    rules: Option<watch::Receiver<Arc<Vec<RuleConfig>>>>,
    outputs: Outputs,
    batch: Batch,
    deadline: Option<Instant>,
    /// Analytics memory last added to the shared gauges.
    reported: Footprint,
    /// Evictions (dedup windows, series) last added to the counters.
    reported_evictions: (u64, u64),
    /// Dead letters stored per device in the current minute.
    dead_letters: DeadLetterBudget,
}

/// Dead letters per device and minute, so one device sending garbage at
/// full rate fills neither the table nor the disk: beyond the budget they
/// are counted and acknowledged, not stored.
#[derive(Debug, Default)]
struct DeadLetterBudget {
    minute: i64,
    per_device: std::collections::HashMap<Arc<str>, u32>,
    max: u32,
}

impl DeadLetterBudget {
    /// True when `device` may store one more dead letter this minute.
    fn take(&mut self, device: Option<&Arc<str>>, now: Micros) -> bool {
        let minute = now.div_euclid(60 * MICROS_PER_SEC);
        if minute != self.minute {
            self.minute = minute;
            self.per_device.clear();
        }
        let key = device.cloned().unwrap_or_else(|| Arc::from(""));
        let used = self.per_device.entry(key).or_insert(0);
        if *used >= self.max {
            return false;
        }
        *used += 1;
        true
    }
}

impl Worker {
    pub fn new(
        shard: Arc<Shard>,
        config: WorkerConfig,
        metrics: Arc<Metrics>,
        out: mpsc::Sender<SealedBatch>,
        dedup: Dedup,
        ids: Arc<BatchIds>,
    ) -> Worker {
        let batch = Batch::new(config.batch_rows);
        let dead_letters = DeadLetterBudget {
            max: config.limits.max_dead_letters_per_device_minute,
            ..DeadLetterBudget::default()
        };
        Worker {
            shard,
            config,
            metrics,
            out,
            dedup,
            ids,
            analytics: None,
            reported: Footprint::default(),
            reported_evictions: (0, 0),
            dead_letters,
            rules: None,
            outputs: Outputs::default(),
            batch,
            deadline: None,
        }
    }

    /// Runs `analytics` on every new numeric reading (and a clock tick);
    /// `rules` delivers rule sets reloaded on SIGHUP.
    pub fn with_analytics(
        mut self,
        analytics: Analytics,
        rules: Option<watch::Receiver<Arc<Vec<RuleConfig>>>>,
    ) -> Worker {
        self.analytics = Some(analytics);
        self.rules = rules;
        self
    }

    /// Applies a reloaded rule set, if one came.
    fn reload_rules(&mut self) {
        let (Some(rx), Some(analytics)) = (self.rules.as_mut(), self.analytics.as_mut()) else {
            return;
        };
        if rx.has_changed().unwrap_or(false) {
            let rules = rx.borrow_and_update().clone();
            analytics.set_rules(rules, crate::model::now_micros(), &mut self.outputs);
            self.collect_outputs();
        }
    }

    /// Clock tick: a reloaded rule set, then time-based rules (silence),
    /// idle series and dedup windows evicted.
    fn on_tick(&mut self) {
        self.reload_rules();
        let now = crate::model::now_micros();
        self.dedup.evict(now, usize::MAX);
        let evictions = (
            self.dedup.evicted,
            self.analytics.as_ref().map_or(0, |a| a.evicted),
        );
        let was = std::mem::replace(&mut self.reported_evictions, evictions);
        self.metrics
            .dedup_evictions
            .fetch_add(evictions.0 - was.0, Relaxed);
        if let Some(analytics) = &mut self.analytics {
            analytics.tick(now, &mut self.outputs);
            self.metrics
                .series_evicted
                .fetch_add(analytics.evicted - was.1, Relaxed);
            self.reported_evictions.1 = analytics.evicted;
            let now = analytics.memory();
            // Each worker adds the change in its own share.
            let m = &self.metrics;
            let was = std::mem::replace(&mut self.reported, now);
            for (gauge, now, was) in [
                (&m.analytics_series, now.series, was.series),
                (&m.analytics_bytes, now.state_bytes, was.state_bytes),
                (&m.analytics_held_bytes, now.held_bytes, was.held_bytes),
            ] {
                gauge.fetch_add((now as u64).wrapping_sub(was as u64), Relaxed);
            }
            self.collect_outputs();
        }
    }

    /// Moves analytics outputs into the batch, counting them.
    fn collect_outputs(&mut self) {
        let o = &mut self.outputs;
        if o.alerts.is_empty() && o.rollups.is_empty() && o.late == 0 {
            return;
        }
        self.metrics
            .alerts
            .fetch_add(o.alerts.len() as u64, Relaxed);
        for a in &o.alerts {
            self.metrics.alert(&a.rule, a.state);
        }
        self.metrics.late_readings.fetch_add(o.late, Relaxed);
        o.late = 0;
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.config.flush_interval);
        }
        self.batch.push_alerts(o.alerts.drain(..));
        self.batch.push_rollups(o.rollups.drain(..));
    }

    /// Runs until the shard is closed and drained; the last batch is flushed.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let mut handled = 0usize;
            while let Some(message) = self.shard.pop() {
                self.handle(message);
                if self.batch.rows() >= self.config.batch_rows && !self.flush().await {
                    return;
                }
                handled += 1;
                if handled % 1024 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            // Caught up with the ring while the writer has taken every
            // batch sent: send what there is rather than wait for a full
            // batch or the interval. Under load the writer is busy, the
            // queue is not empty, and batches grow to full size by
            // themselves; at moderate rates this halves the wait.
            if self.batch.rows() >= (self.config.batch_rows / 8).max(1)
                && self.out.capacity() == self.out.max_capacity()
                && !self.flush().await
            {
                return;
            }
            if self.shard.is_closed() && self.shard.is_empty() {
                if let Some(analytics) = &mut self.analytics {
                    analytics.drain(&mut self.outputs);
                    self.collect_outputs();
                }
                self.flush().await;
                return;
            }
            let deadline = self.deadline;
            tokio::select! {
                _ = self.shard.wait() => {}
                _ = sleep_until_some(deadline) => {}
                _ = tick.tick() => self.on_tick(),
            }
            if deadline.is_some_and(|d| Instant::now() >= d) && !self.flush().await {
                return;
            }
        }
    }

    /// Sends the current batch to the writers. False when they are gone.
    async fn flush(&mut self) -> bool {
        self.deadline = None;
        if self.batch.is_empty() {
            return true;
        }
        let batch = std::mem::replace(&mut self.batch, Batch::new(self.config.batch_rows));
        self.out.send(batch.seal(self.ids.next())).await.is_ok()
    }

    /// Decodes one message and adds its rows or its dead letter to the batch.
    pub fn handle(&mut self, message: Message) {
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.config.flush_interval);
        }
        let (decoded, device) = match self.check(&message) {
            Ok(ok) => ok,
            Err((reason, error)) => return self.dead_letter(&message, reason, &error),
        };
        if let Some(analytics) = &self.analytics {
            // Every metric name counts (only numeric ones make series, but
            // the bound is on what one device can name).
            let names = decoded.readings.iter().map(|r| &*r.metric);
            if !analytics.admits(&device, names) {
                let error = format!(
                    "the device would pass {} series (limits.max_series_per_device)",
                    self.config.limits.max_series_per_device
                );
                return self.dead_letter(&message, DeadLetterReason::TooManySeries, &error);
            }
        }
        let verdict = self.dedup.check(
            &device,
            &decoded,
            &message.payload,
            message.redelivery,
            message.received,
        );
        match verdict {
            Verdict::Duplicate => {
                self.metrics.duplicates.fetch_add(1, Relaxed);
                self.batch.push_dropped(&message);
            }
            Verdict::New {
                window,
                identity,
                restart,
                verify,
            } => {
                if restart {
                    self.metrics.device_restarts.fetch_add(1, Relaxed);
                }
                self.metrics
                    .readings_decoded
                    .fetch_add(decoded.readings.len() as u64, Relaxed);
                self.batch.push_readings(
                    &message,
                    &decoded.readings,
                    self.config.partitions,
                    window,
                    identity,
                    decoded
                        .seq
                        .filter(|_| verify)
                        .map(|seq| (seq, decoded.boot)),
                );
                if let Some(analytics) = &mut self.analytics {
                    let numbers = decoded.readings.iter().filter_map(|r| match r.value {
                        crate::model::Value::Number(v) => Some((&*r.metric, r.time, v)),
                        _ => None,
                    });
                    analytics.observe_all(&device, numbers, message.received, &mut self.outputs);
                    self.collect_outputs();
                }
            }
        }
    }

    /// Counts a dead letter and stores it, within the device's budget. An
    /// oversized payload is stored cut to the payload limit.
    fn dead_letter(&mut self, message: &Message, reason: DeadLetterReason, error: &str) {
        self.metrics.dead_letter(reason);
        if self
            .dead_letters
            .take(message.device.as_ref(), message.received)
        {
            if message.payload.len() > self.config.max_payload_bytes {
                let mut cut = message.clone();
                cut.payload = cut.payload.slice(..self.config.max_payload_bytes);
                self.batch.push_dead_letter(&cut, reason, error);
                return;
            }
            self.batch.push_dead_letter(message, reason, error);
        } else {
            self.metrics.dead_letters_suppressed.fetch_add(1, Relaxed);
            self.batch.push_dropped(message);
        }
    }

    fn check(
        &self,
        message: &Message,
    ) -> Result<(crate::model::Decoded, Arc<str>), (DeadLetterReason, String)> {
        let Some(device) = message.device.clone() else {
            return Err((
                DeadLetterReason::UnknownTopic,
                format!("topic {:?} matches no configured filter", message.topic),
            ));
        };
        if device.len() > self.config.limits.max_device_id_bytes {
            return Err((
                DeadLetterReason::DeviceIdTooLong,
                format!(
                    "device id of {} bytes, limit {}",
                    device.len(),
                    self.config.limits.max_device_id_bytes
                ),
            ));
        }
        if !crate::model::clean_text(&device) {
            return Err((
                DeadLetterReason::InvalidText,
                "device id holds a NUL or control character".into(),
            ));
        }
        if message.payload.len() > self.config.max_payload_bytes {
            return Err((
                DeadLetterReason::PayloadTooLarge,
                format!(
                    "{} bytes, limit {}",
                    message.payload.len(),
                    self.config.max_payload_bytes
                ),
            ));
        }
        let decoded = decode_limited(
            &message.payload,
            message.content_type.as_deref(),
            message.received,
            &self.config.limits,
        )
        .map_err(|e| (e.reason(), e.to_string()))?;
        let earliest = message.received - self.config.max_past;
        let latest = message.received + self.config.max_future;
        if let Some(r) = decoded
            .readings
            .iter()
            .find(|r| r.time < earliest || r.time > latest)
        {
            return Err((
                DeadLetterReason::TimeSkew,
                format!(
                    "reading {:?} at {} is outside [{}, {}]",
                    r.metric,
                    crate::model::format_rfc3339(r.time),
                    crate::model::format_rfc3339(earliest),
                    crate::model::format_rfc3339(latest)
                ),
            ));
        }
        Ok((decoded, device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::now_micros;
    use crate::shard::Router;
    use bytes::Bytes;

    fn message(id: u64, device: Option<&str>, payload: &[u8]) -> Message {
        Message {
            id,
            device: device.map(Arc::from),
            topic: Arc::from(format!("devices/{}/telemetry", device.unwrap_or("?")).as_str()),
            payload: Bytes::copy_from_slice(payload),
            received: now_micros(),
            content_type: None,
            redelivery: false,
        }
    }

    /// Queues a message on its shard (the tests stay within the ring).
    fn queue(router: &Router, m: Message) {
        assert!(router.try_push(m).is_ok(), "ring full");
    }

    fn setup(batch_rows: usize) -> (Router, Worker, mpsc::Receiver<SealedBatch>, Arc<Metrics>) {
        let config = WorkerConfig {
            batch_rows,
            flush_interval: Duration::from_millis(200),
            max_payload_bytes: 200,
            max_future: 600 * MICROS_PER_SEC,
            max_past: 30 * crate::model::MICROS_PER_DAY,
            limits: crate::decode::Limits::default(),
            partitions: PartitionInterval::Daily,
        };
        let router = Router::new(1, 16);
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(4);
        let worker = Worker::new(
            router.shards()[0].clone(),
            config,
            metrics.clone(),
            tx,
            Dedup::new(1000, i64::MAX / 2),
            Arc::new(BatchIds::new()),
        );
        (router, worker, rx, metrics)
    }

    #[tokio::test]
    async fn bad_messages_become_dead_letters_in_the_same_batch() {
        let (router, worker, mut rx, metrics) = setup(1000);
        let now_ms = now_micros() / 1000;
        let good = format!(r#"{{"seq":1,"ts":{now_ms},"m":{{"a":1,"b":2}}}}"#);
        let future = format!(r#"{{"seq":2,"ts":{},"m":{{"a":1}}}}"#, now_ms + 3_600_000);
        let ancient = r#"{"seq":3,"ts":1000,"m":{"a":1}}"#;
        let messages = [
            message(0, Some("d1"), good.as_bytes()),
            message(1, Some("d1"), b"{not json"),
            message(2, None, good.as_bytes()),
            message(3, Some("d1"), &[b' '; 300]),
            message(4, Some("d1"), future.as_bytes()),
            message(5, Some("d1"), ancient.as_bytes()),
        ];
        for m in messages {
            queue(&router, m);
        }
        router.close();
        worker.run().await;
        let batch = rx.recv().await.expect("one batch");
        assert_eq!(batch.reading_rows, 2);
        assert_eq!(batch.dead_letter_rows, 5);
        assert_eq!(batch.message_ids(), vec![0, 1, 2, 3, 4, 5]);
        let text = metrics.render();
        for reason in ["malformed_json", "unknown_topic", "payload_too_large"] {
            assert!(
                text.contains(&format!(
                    "edge_gateway_dead_letters_total{{reason=\"{reason}\"}} 1"
                )),
                "{reason}"
            );
        }
        assert!(text.contains("edge_gateway_dead_letters_total{reason=\"time_skew\"} 2"));
        assert!(rx.recv().await.is_none());
    }

    /// A lone message is flushed when the interval passes, not only when a
    /// batch fills: with acks held until commit, the broker's window may
    /// never let a batch fill.
    #[tokio::test(start_paused = true)]
    async fn flushes_on_interval_without_more_input() {
        let (router, worker, mut rx, _) = setup(10_000);
        let task = tokio::spawn(worker.run());
        let payload = format!(r#"{{"seq":1,"ts":{},"m":{{"a":1}}}}"#, now_micros() / 1000);
        queue(&router, message(7, Some("d"), payload.as_bytes()));
        let batch = rx.recv().await.expect("flushed by the interval");
        assert_eq!((batch.reading_rows, batch.message_ids()), (1, vec![7]));
        router.close();
        task.await.expect("worker ends after close");
    }

    /// Caught up, with the writer queue empty, a worker sends an eighth of
    /// a batch at once instead of waiting for the interval; with a batch
    /// already queued it keeps filling.
    #[tokio::test(start_paused = true)]
    async fn sends_early_when_caught_up_and_the_writer_is_free() {
        let (router, worker, mut rx, _) = setup(16);
        let task = tokio::spawn(worker.run());
        let now_ms = now_micros() / 1000;
        let started = tokio::time::Instant::now();
        let payload = format!(r#"{{"seq":1,"ts":{now_ms},"m":{{"a":1,"b":2}}}}"#);
        queue(&router, message(1, Some("d"), payload.as_bytes()));
        let batch = rx.recv().await.expect("sent early");
        assert_eq!(batch.reading_rows, 2);
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "before the flush interval"
        );
        router.close();
        task.await.expect("worker ends after close");
    }

    /// Past the per-device budget, dead letters are counted and
    /// acknowledged, not stored; other devices keep their own budget.
    #[tokio::test]
    async fn dead_letters_over_the_device_budget_are_counted_not_stored() {
        let (router, mut worker, mut rx, metrics) = setup(1000);
        worker.dead_letters.max = 2;
        for id in 0..5 {
            queue(&router, message(id, Some("noisy"), b"{bad"));
        }
        queue(&router, message(5, Some("other"), b"{bad"));
        router.close();
        worker.run().await;
        let batch = rx.recv().await.expect("one batch");
        assert_eq!(batch.dead_letter_rows, 3);
        assert_eq!(
            batch.message_ids(),
            vec![0, 1, 2, 3, 4, 5],
            "all acknowledged"
        );
        let text = metrics.render();
        assert!(
            text.contains("edge_gateway_dead_letters_suppressed_total 3"),
            "{text}"
        );
        assert!(text.contains("edge_gateway_dead_letters_total{reason=\"malformed_json\"} 6"));
    }

    /// Batches cut between messages, never inside one.
    #[tokio::test]
    async fn batches_hold_whole_messages() {
        let (router, worker, mut rx, _) = setup(3);
        let now_ms = now_micros() / 1000;
        for id in 0..3 {
            let payload = format!(r#"{{"seq":{id},"ts":{now_ms},"m":{{"a":1,"b":2}}}}"#);
            queue(&router, message(id, Some("d"), payload.as_bytes()));
        }
        router.close();
        worker.run().await;
        let first = rx.recv().await.expect("first batch");
        let second = rx.recv().await.expect("second batch");
        assert_eq!((first.reading_rows, first.message_ids()), (4, vec![0, 1]));
        assert_eq!((second.reading_rows, second.message_ids()), (2, vec![2]));
    }
}
