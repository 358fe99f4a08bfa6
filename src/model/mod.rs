//! The shared model every stage speaks: readings, messages, and time.
//!
//! Times are `i64` microseconds since the Unix epoch everywhere inside the
//! gateway (PostgreSQL's `timestamptz` resolution), converted only at the
//! edges: SenML seconds and native milliseconds on the way in, PostgreSQL's
//! 2000-01-01 epoch on the way out.

pub mod seq_window;

use bytes::Bytes;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch.
pub type Micros = i64;

pub const MICROS_PER_SEC: i64 = 1_000_000;
pub const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SEC;

/// The current wall-clock time in microseconds since the Unix epoch.
pub fn now_micros() -> Micros {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// The value a reading carries. SenML allows strings, booleans and binary
/// data beside numbers; numeric analytics only look at [`Value::Number`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Bool(bool),
    Text(String),
    Data(Vec<u8>),
    /// A SenML record with a sum and no value.
    None,
}

/// One measurement of one metric of one device at one time. The device is
/// known from the message, so it is not repeated here.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub time: Micros,
    pub metric: Arc<str>,
    pub value: Value,
    pub unit: Option<Arc<str>>,
    /// SenML `s` (+ `bs`): the integral of the value over time.
    pub sum: Option<f64>,
}

/// What one payload decodes to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decoded {
    pub readings: Vec<Reading>,
    /// The per-device message sequence, where the format carries one (native).
    pub seq: Option<u64>,
    /// The boot (session) id the device chose at its last boot, if it sends
    /// one (native): sequences restart with it.
    pub boot: Option<u64>,
    /// True when some time was relative to "now" (SenML times below 2^28),
    /// so the same bytes received twice may be two real measurements.
    pub relative_time: bool,
}

/// A message as it leaves the source: routed by device, decoded by the shard
/// worker that owns the device.
#[derive(Debug, Clone)]
pub struct Message {
    /// Position in receive order; the ack ledger releases PUBACKs by it.
    pub id: u64,
    /// The device id from the topic; `None` when no filter matched.
    pub device: Option<Arc<str>>,
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub received: Micros,
    /// The MQTT 5 content type, when the publisher set one.
    pub content_type: Option<Arc<str>>,
    /// The broker marked this delivery as a retransmission (DUP flag).
    pub redelivery: bool,
}

/// Why a message became a dead letter: the `reason` column of
/// `dead_letters` and the label of `edge_gateway_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    Empty,
    UnknownShape,
    MalformedJson,
    MalformedCbor,
    InvalidSenml,
    InvalidNative,
    NotFinite,
    TimeOutOfRange,
    TimeSkew,
    PayloadTooLarge,
    UnknownTopic,
    /// The device id (the topic level) is longer than `limits.max_device_id_bytes`.
    DeviceIdTooLong,
    /// A device id, metric name, unit or string value holds a NUL or a
    /// control character.
    InvalidText,
    MetricTooLong,
    UnitTooLong,
    StringTooLong,
    DataTooLong,
    TooManyRecords,
    DecodedTooLarge,
    /// The device already has `limits.max_series_per_device` metric names.
    TooManySeries,
    RejectedByDatabase,
}

impl DeadLetterReason {
    /// Every reason, in metric order.
    pub const ALL: [DeadLetterReason; 21] = [
        DeadLetterReason::Empty,
        DeadLetterReason::UnknownShape,
        DeadLetterReason::MalformedJson,
        DeadLetterReason::MalformedCbor,
        DeadLetterReason::InvalidSenml,
        DeadLetterReason::InvalidNative,
        DeadLetterReason::NotFinite,
        DeadLetterReason::TimeOutOfRange,
        DeadLetterReason::TimeSkew,
        DeadLetterReason::PayloadTooLarge,
        DeadLetterReason::UnknownTopic,
        DeadLetterReason::DeviceIdTooLong,
        DeadLetterReason::InvalidText,
        DeadLetterReason::MetricTooLong,
        DeadLetterReason::UnitTooLong,
        DeadLetterReason::StringTooLong,
        DeadLetterReason::DataTooLong,
        DeadLetterReason::TooManyRecords,
        DeadLetterReason::DecodedTooLarge,
        DeadLetterReason::TooManySeries,
        DeadLetterReason::RejectedByDatabase,
    ];

    /// The stable label stored and exported.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Empty => "empty",
            DeadLetterReason::UnknownShape => "unknown_shape",
            DeadLetterReason::MalformedJson => "malformed_json",
            DeadLetterReason::MalformedCbor => "malformed_cbor",
            DeadLetterReason::InvalidSenml => "invalid_senml",
            DeadLetterReason::InvalidNative => "invalid_native",
            DeadLetterReason::NotFinite => "not_finite",
            DeadLetterReason::TimeOutOfRange => "time_out_of_range",
            DeadLetterReason::TimeSkew => "time_skew",
            DeadLetterReason::PayloadTooLarge => "payload_too_large",
            DeadLetterReason::UnknownTopic => "unknown_topic",
            DeadLetterReason::DeviceIdTooLong => "device_id_too_long",
            DeadLetterReason::InvalidText => "invalid_text",
            DeadLetterReason::MetricTooLong => "metric_too_long",
            DeadLetterReason::UnitTooLong => "unit_too_long",
            DeadLetterReason::StringTooLong => "string_too_long",
            DeadLetterReason::DataTooLong => "data_too_long",
            DeadLetterReason::TooManyRecords => "too_many_records",
            DeadLetterReason::DecodedTooLarge => "decoded_too_large",
            DeadLetterReason::TooManySeries => "too_many_series",
            DeadLetterReason::RejectedByDatabase => "rejected_by_database",
        }
    }

    /// Position in [`DeadLetterReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// True for text that may be stored and used as a key: no NUL and no other
/// control character (PostgreSQL rejects NUL in `text`; control characters
/// in names only ever make look-alike keys).
pub fn clean_text(s: &str) -> bool {
    // Printable ASCII (nearly every name) is clean: one vectorisable pass.
    s.bytes().all(|b| (0x20..0x7f).contains(&b)) || !s.chars().any(char::is_control)
}

/// Days since 1970-01-01 to a civil (year, month, day), proleptic Gregorian.
/// Howard Hinnant's `civil_from_days`.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Civil (year, month, day) to days since 1970-01-01; inverse of
/// [`civil_from_days`]. Howard Hinnant's `days_from_civil`.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats microseconds since the epoch as RFC 3339 UTC with microseconds.
pub fn format_rfc3339(t: Micros) -> String {
    let days = t.div_euclid(MICROS_PER_DAY);
    let in_day = t.rem_euclid(MICROS_PER_DAY);
    let (y, mo, d) = civil_from_days(days);
    let secs = in_day / MICROS_PER_SEC;
    let us = in_day % MICROS_PER_SEC;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{us:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// One finished one-minute bucket of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub bucket: Micros,
    pub device: Arc<str>,
    pub metric: Arc<str>,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(10_957), (2000, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_416), (2025, 11, 24));
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn reasons_are_in_index_order() {
        for (i, r) in DeadLetterReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
    }

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            format_rfc3339(1_732_492_800_123_456),
            "2024-11-25T00:00:00.123456Z"
        );
    }
}
