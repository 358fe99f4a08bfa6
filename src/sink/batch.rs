//! The batcher's unit of work: rows of whole messages, already encoded.
//!
//! A message's rows never straddle two batches, so one commit makes a whole
//! message durable and its id can be reported to the ack ledger. Each
//! message keeps the byte range of its rows and its raw payload, so the
//! writer can leave out a message the database already holds, or isolate
//! one the database rejects and store it as a dead letter instead.
//!
//! A sealed batch also has a binary form ([`SealedBatch::encode`]) for the
//! spool: versioned, length-prefixed fields, no self-describing overhead.

use std::ops::Range;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::copy::{RowBuffer, HEADER};
use super::settings::PartitionInterval;
use crate::alerts::{Alert, AlertNotice};
use crate::model::seq_window::SeqWindow;
use crate::model::{DeadLetterReason, Micros, Reading, Rollup, Value};

/// Columns of `readings` in COPY order.
pub const READINGS_COLUMNS: &str = "time, device_id, metric, value, unit, vs, vb, vd, sum";
/// Columns of `alerts` in COPY order.
pub const ALERT_COLUMNS: &str = "time, device_id, metric, rule, state, value, detail";
/// Columns of `rollups_1m` (and its staging table) in COPY order.
pub const ROLLUP_COLUMNS: &str = "bucket, device_id, metric, count, min, max, avg";
/// Columns of `dead_letters` in COPY order.
pub const DEAD_LETTER_COLUMNS: &str = "received_at, topic, device_id, payload, reason, error";

/// Identifies a batch across retries, spooling and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId {
    /// When the process that made the batch started, in µs.
    pub run: i64,
    /// The batch's number within that run, from 1.
    pub seq: i64,
}

/// One message inside a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageEntry {
    /// Ledger id (meaningful only in the process that received it).
    pub id: u64,
    pub received: Micros,
    pub topic: Arc<str>,
    pub device: Option<Arc<str>>,
    pub payload: Bytes,
    /// Byte range of its rows in the readings stream (empty for dead letters).
    pub rows: Range<usize>,
    pub row_count: u32,
    /// Newest reading time among its rows (0 when it has none).
    pub newest: Micros,
    /// Identity to record in `message_ids` (payloads without a sequence).
    pub identity: Option<u128>,
    /// The identity is recorded but never drops the message: a SenML pack
    /// with times relative to "now" may repeat its bytes as a new
    /// measurement (only a redelivery of it is a duplicate).
    pub repeat_ok: bool,
    /// A redelivery whose device's sequence window was not in memory, with
    /// its `(seq, boot)`: the commit checks it against the stored window
    /// (`device_watermarks`) and leaves it out if that window had it.
    pub verify: Option<(u64, Option<u64>)>,
}

/// A batch being filled by one shard worker.
#[derive(Debug)]
pub struct Batch {
    readings: RowBuffer,
    dead_letters: RowBuffer,
    messages: Vec<MessageEntry>,
    /// Latest sequence window per device in this batch.
    watermarks: Vec<(Arc<str>, SeqWindow)>,
    partitions: Vec<i64>,
    oldest_received: Option<Micros>,
    alerts: RowBuffer,
    rollups: RowBuffer,
    notifications: Vec<AlertNotice>,
}

/// A batch ready for the writers: immutable bytes, cheap to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedBatch {
    pub id: BatchId,
    pub readings: Bytes,
    pub reading_rows: usize,
    pub dead_letters: Bytes,
    pub dead_letter_rows: usize,
    pub messages: Vec<MessageEntry>,
    pub watermarks: Vec<(Arc<str>, SeqWindow)>,
    /// Indexes of the `readings` partitions the rows fall in, sorted.
    pub partitions: Vec<i64>,
    pub oldest_received: Micros,
    pub alerts: Bytes,
    pub alert_rows: usize,
    pub rollups: Bytes,
    pub rollup_rows: usize,
    /// Each alert's device and JSON: sent with NOTIFY in the transaction and
    /// published to MQTT after the commit.
    pub notifications: Vec<AlertNotice>,
}

impl Batch {
    pub fn new(expected_rows: usize) -> Batch {
        Batch {
            readings: RowBuffer::new(expected_rows * 64),
            dead_letters: RowBuffer::new(0),
            messages: Vec::new(),
            watermarks: Vec::new(),
            partitions: Vec::new(),
            oldest_received: None,
            alerts: RowBuffer::new(0),
            rollups: RowBuffer::new(0),
            notifications: Vec::new(),
        }
    }

    /// Rows of both tables.
    pub fn rows(&self) -> usize {
        self.readings.rows() + self.dead_letters.rows()
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.alerts.is_empty() && self.rollups.is_empty()
    }

    /// Adds alert rows, each with the notice told once it is committed.
    pub fn push_alerts(&mut self, alerts: impl IntoIterator<Item = Alert>) {
        for a in alerts {
            self.alerts
                .row(7)
                .timestamptz(a.time)
                .text(&a.device)
                .text(&a.metric)
                .text(&a.rule)
                .text(a.state.as_str())
                .opt_float8(a.value)
                .jsonb(&a.detail_text());
            self.notifications.push(a.notice());
        }
    }

    /// Adds finished one-minute rollups.
    pub fn push_rollups(&mut self, rollups: impl IntoIterator<Item = Rollup>) {
        for r in rollups {
            self.rollups
                .row(7)
                .timestamptz(r.bucket)
                .text(&r.device)
                .text(&r.metric)
                .int8(r.count)
                .float8(r.min)
                .float8(r.max)
                .float8(r.sum / r.count as f64);
        }
    }

    fn entry(&mut self, message: &crate::model::Message) -> MessageEntry {
        self.oldest_received = Some(
            self.oldest_received
                .map_or(message.received, |t| t.min(message.received)),
        );
        MessageEntry {
            id: message.id,
            received: message.received,
            topic: message.topic.clone(),
            device: message.device.clone(),
            payload: message.payload.clone(),
            rows: 0..0,
            row_count: 0,
            newest: 0,
            identity: None,
            repeat_ok: false,
            verify: None,
        }
    }

    /// Adds a message whose rows are lost to nobody: a duplicate, counted
    /// and acknowledged, with nothing stored.
    pub fn push_dropped(&mut self, message: &crate::model::Message) {
        let mut entry = self.entry(message);
        entry.payload = Bytes::new();
        self.messages.push(entry);
    }

    /// Adds a message and encodes its `readings` rows.
    pub fn push_readings(
        &mut self,
        message: &crate::model::Message,
        readings: &[Reading],
        partitions: PartitionInterval,
        window: Option<SeqWindow>,
        identity: Option<(u128, bool)>,
        verify: Option<(u64, Option<u64>)>,
    ) {
        let mut entry = self.entry(message);
        let device = message.device.as_deref().unwrap_or("");
        let start = self.readings.len();
        encode_readings(
            &mut self.readings,
            device,
            readings,
            partitions,
            &mut self.partitions,
        );
        entry.rows = start..self.readings.len();
        entry.row_count = readings.len() as u32;
        entry.newest = readings.iter().map(|r| r.time).max().unwrap_or(0);
        entry.identity = identity.map(|(id, _)| id);
        entry.repeat_ok = identity.is_some_and(|(_, repeat_ok)| repeat_ok);
        entry.verify = verify;
        if let (Some(window), Some(device)) = (window, &message.device) {
            match self.watermarks.iter_mut().find(|(d, _)| d == device) {
                Some(slot) => slot.1 = window,
                None => self.watermarks.push((device.clone(), window)),
            }
        }
        self.messages.push(entry);
    }

    /// Adds a message as one `dead_letters` row.
    pub fn push_dead_letter(
        &mut self,
        message: &crate::model::Message,
        reason: DeadLetterReason,
        error: &str,
    ) {
        let entry = self.entry(message);
        encode_dead_letter(
            &mut self.dead_letters,
            message.received,
            &message.topic,
            message.device.as_deref(),
            &message.payload,
            reason,
            error,
        );
        self.messages.push(entry);
    }

    /// Finishes the COPY streams.
    pub fn seal(self, id: BatchId) -> SealedBatch {
        let reading_rows = self.readings.rows();
        let dead_letter_rows = self.dead_letters.rows();
        let (alert_rows, rollup_rows) = (self.alerts.rows(), self.rollups.rows());
        let mut partitions = self.partitions;
        partitions.sort_unstable();
        SealedBatch {
            id,
            readings: self.readings.finish(),
            reading_rows,
            dead_letters: self.dead_letters.finish(),
            dead_letter_rows,
            messages: self.messages,
            watermarks: self.watermarks,
            partitions,
            oldest_received: self
                .oldest_received
                .unwrap_or_else(crate::model::now_micros),
            alerts: self.alerts.finish(),
            alert_rows,
            rollups: self.rollups.finish(),
            rollup_rows,
            notifications: self.notifications,
        }
    }
}

/// Encodes `readings` of `device` as rows, noting their partitions.
pub fn encode_readings(
    out: &mut RowBuffer,
    device: &str,
    readings: &[Reading],
    partitions: PartitionInterval,
    seen: &mut Vec<i64>,
) {
    let mut last_partition = None;
    for r in readings {
        let partition = partitions.index_of(r.time);
        if last_partition != Some(partition) && !seen.contains(&partition) {
            seen.push(partition);
        }
        last_partition = Some(partition);
        let row = out.row(9).timestamptz(r.time).text(device).text(&r.metric);
        let unit = r.unit.as_deref();
        match &r.value {
            Value::Number(v) => row.float8(*v).opt_text(unit).null().null().null(),
            Value::Text(s) => row.null().opt_text(unit).text(s).null().null(),
            Value::Bool(b) => row.null().opt_text(unit).null().boolean(*b).null(),
            Value::Data(d) => row.null().opt_text(unit).null().null().bytea(d),
            Value::None => row.null().opt_text(unit).null().null().null(),
        }
        .opt_float8(r.sum);
    }
}

/// Longest topic, device id or error text stored in a dead letter, in
/// bytes; longer ones are cut (the payload is stored whole). Dead letters
/// have no index, so nothing a device sends can make their COPY fail.
const DEAD_LETTER_TEXT_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Encodes one `dead_letters` row.
pub fn encode_dead_letter(
    out: &mut RowBuffer,
    received: Micros,
    topic: &str,
    device: Option<&str>,
    payload: &[u8],
    reason: DeadLetterReason,
    error: &str,
) {
    let cut = |s| truncate(s, DEAD_LETTER_TEXT_BYTES);
    out.row(6)
        .timestamptz(received)
        .text(cut(topic))
        .opt_text(device.map(cut))
        .bytea(payload)
        .text(reason.as_str())
        .text(cut(error));
}

impl SealedBatch {
    /// Ledger ids of its messages.
    pub fn message_ids(&self) -> Vec<u64> {
        self.messages.iter().map(|m| m.id).collect()
    }

    /// A COPY stream holding only the rows of messages for which `keep` is
    /// true, with its row count.
    pub fn readings_where(&self, keep: impl Fn(&MessageEntry) -> bool) -> (Bytes, usize) {
        let mut out = BytesMut::with_capacity(self.readings.len());
        out.put_slice(HEADER);
        let mut rows = 0;
        for m in self.messages.iter().filter(|m| keep(m)) {
            if let Some(slice) = self.readings.get(m.rows.clone()) {
                out.put_slice(slice);
                rows += m.row_count as usize;
            }
        }
        out.put_slice(&super::copy::TRAILER);
        (out.freeze(), rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Message;
    use proptest::prelude::*;

    fn message(id: u64, device: Option<&str>, payload: Vec<u8>) -> Message {
        Message {
            id,
            device: device.map(Arc::from),
            topic: Arc::from("devices/x/telemetry"),
            payload: Bytes::from(payload),
            received: 1_700_000_000_000_000 + id as i64,
            content_type: None,
            redelivery: false,
        }
    }

    proptest! {
        /// The spool form round-trips any batch, and any strict prefix of
        /// it is rejected rather than read as a shorter batch.
        #[test]
        fn spool_form_round_trips(
            entries in prop::collection::vec(
                (prop::option::of("[a-z0-9-]{1,12}"), prop::collection::vec(any::<u8>(), 0..64),
                 prop::collection::vec((-1e9f64..1e9, 0i64..1_000_000), 0..5), any::<Option<u128>>(),
                 prop::option::of(0u64..10_000), any::<bool>()),
                0..12),
            cut in 0.0f64..1.0,
        ) {
            let mut batch = Batch::new(16);
            for (i, (device, payload, values, identity, seq, dead)) in entries.into_iter().enumerate() {
                let m = message(i as u64, device.as_deref(), payload);
                if dead || device.is_none() {
                    batch.push_dead_letter(&m, DeadLetterReason::MalformedJson, "bad");
                    continue;
                }
                let readings: Vec<Reading> = values
                    .iter()
                    .map(|&(v, t)| Reading { time: m.received + t, metric: "m".into(), value: Value::Number(v), unit: None, sum: None })
                    .collect();
                let window = seq.map(|s| SeqWindow::starting_at(s).with_state(s.checked_sub(5), (s % 3) as u32, s as i64));
                // Every third sequenced message is a redelivery to verify.
                let verify = seq.filter(|s| s % 3 == 0).map(|s| (s, s.checked_sub(7)));
                batch.push_readings(&m, &readings, PartitionInterval::Daily, window, identity.map(|id| (id, id % 2 == 0)), verify);
            }
            let sealed = batch.seal(BatchId { run: 7, seq: 9 });
            let bytes = sealed.encode();
            prop_assert_eq!(SealedBatch::decode(&bytes), Some(sealed.clone()));
            let at = ((bytes.len() as f64) * cut) as usize;
            prop_assert_eq!(SealedBatch::decode(&bytes[..at]), None);
            // Selecting every message reproduces the readings stream.
            let (all, rows) = sealed.readings_where(|_| true);
            prop_assert_eq!((all, rows), (sealed.readings.clone(), sealed.reading_rows));
        }
    }
}
