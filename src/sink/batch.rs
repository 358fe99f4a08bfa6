//! The batcher's unit of work: rows of whole messages, already encoded.
//!
//! A message's rows never straddle two batches, so one commit makes a whole
//! message durable and its id can be reported to the ack ledger.

use bytes::Bytes;

use super::copy::RowBuffer;
use super::partitions::Partitions;
use crate::model::{Micros, Reading, Value};

/// Columns of `readings` in COPY order.
pub const READINGS_COLUMNS: &str = "time, device_id, metric, value, unit, vs, vb, vd, sum";
/// Columns of `dead_letters` in COPY order.
pub const DEAD_LETTER_COLUMNS: &str = "received_at, topic, device_id, payload, reason, error";

/// A batch being filled by one shard worker.
#[derive(Debug)]
pub struct Batch {
    readings: RowBuffer,
    dead_letters: RowBuffer,
    messages: Vec<u64>,
    partitions: Vec<i64>,
    oldest_received: Option<Micros>,
}

/// A batch ready for the writers: immutable bytes, cheap to retry.
#[derive(Debug, Clone)]
pub struct SealedBatch {
    pub readings: Bytes,
    pub reading_rows: usize,
    pub dead_letters: Bytes,
    pub dead_letter_rows: usize,
    /// Ledger ids of the messages whose rows are all in this batch.
    pub messages: Vec<u64>,
    /// Indexes of the `readings` partitions the rows fall in, sorted.
    pub partitions: Vec<i64>,
    pub oldest_received: Micros,
}

impl Batch {
    pub fn new(expected_rows: usize) -> Batch {
        Batch {
            readings: RowBuffer::new(expected_rows * 64),
            dead_letters: RowBuffer::new(0),
            messages: Vec::new(),
            partitions: Vec::new(),
            oldest_received: None,
        }
    }

    /// Rows of both tables.
    pub fn rows(&self) -> usize {
        self.readings.rows() + self.dead_letters.rows()
    }

    /// True when no message was added.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Records that message `id` (received at `received`) is complete in
    /// this batch once committed.
    pub fn add_message(&mut self, id: u64, received: Micros) {
        self.messages.push(id);
        self.oldest_received = Some(self.oldest_received.map_or(received, |t| t.min(received)));
    }

    /// Encodes `readings` of `device` as `readings` rows.
    pub fn push_readings(&mut self, device: &str, readings: &[Reading], partitions: &Partitions) {
        let mut last_partition = None;
        for r in readings {
            let partition = partitions.index_of(r.time);
            if last_partition != Some(partition) && !self.partitions.contains(&partition) {
                self.partitions.push(partition);
            }
            last_partition = Some(partition);
            let row = self
                .readings
                .row(9)
                .timestamptz(r.time)
                .text(device)
                .text(&r.metric);
            match &r.value {
                Value::Number(v) => row
                    .float8(*v)
                    .opt_text(r.unit.as_deref())
                    .null()
                    .null()
                    .null(),
                Value::Text(s) => row.null().opt_text(r.unit.as_deref()).text(s).null().null(),
                Value::Bool(b) => row
                    .null()
                    .opt_text(r.unit.as_deref())
                    .null()
                    .boolean(*b)
                    .null(),
                Value::Data(d) => row
                    .null()
                    .opt_text(r.unit.as_deref())
                    .null()
                    .null()
                    .bytea(d),
                Value::None => row.null().opt_text(r.unit.as_deref()).null().null().null(),
            }
            .opt_float8(r.sum);
        }
    }

    /// Encodes one `dead_letters` row.
    pub fn push_dead_letter(
        &mut self,
        received: Micros,
        topic: &str,
        device: Option<&str>,
        payload: &[u8],
        reason: &str,
        error: &str,
    ) {
        self.dead_letters
            .row(6)
            .timestamptz(received)
            .text(topic)
            .opt_text(device)
            .bytea(payload)
            .text(reason)
            .text(error);
    }

    /// Finishes the COPY streams.
    pub fn seal(self) -> SealedBatch {
        let reading_rows = self.readings.rows();
        let dead_letter_rows = self.dead_letters.rows();
        let mut partitions = self.partitions;
        partitions.sort_unstable();
        SealedBatch {
            readings: self.readings.finish(),
            reading_rows,
            dead_letters: self.dead_letters.finish(),
            dead_letter_rows,
            messages: self.messages,
            partitions,
            oldest_received: self.oldest_received.unwrap_or(0),
        }
    }
}
