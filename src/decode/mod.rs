//! Decode stage: payload bytes (+ receive time) to readings, or a typed error.
//!
//! Pure functions, no I/O, so the shard workers, `replay`, the benches and the
//! fuzz targets all drive the same code. The encoding (JSON or CBOR) is taken
//! from the MQTT 5 content type when the publisher set a known one, otherwise
//! sniffed: JSON text starts with `[` or `{` after optional white space, which
//! no SenML or native CBOR item can. The family is told from the shape: an
//! array is a SenML pack, a map is a native message.

pub mod cbor;
mod names;
pub mod native;
pub mod senml;

use serde::{Deserialize, Serialize};

use crate::model::{DeadLetterReason, Decoded, Micros};
use crate::settings::Invalid;

/// Longest device id and metric name together, in bytes: with the rest of
/// an index key (time, sequence) it stays under PostgreSQL's B-tree entry
/// limit of 2,704 bytes.
pub const MAX_KEY_TEXT_BYTES: usize = 2000;

/// `[limits]`: what one device may make the gateway hold or store. Every
/// breach makes the message a dead letter with its own reason (and counter);
/// the defaults keep every stored key far inside PostgreSQL's index limit
/// (2,704 bytes a B-tree entry).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest device id (the topic level the filter's `+` matches), in bytes.
    pub max_device_id_bytes: usize,
    /// Longest metric name (SenML base name + name), in bytes.
    pub max_metric_bytes: usize,
    /// Longest unit, in bytes.
    pub max_unit_bytes: usize,
    /// Longest string value (SenML `vs`), in bytes.
    pub max_string_bytes: usize,
    /// Longest data value (SenML `vd`, decoded), in bytes.
    pub max_data_bytes: usize,
    /// Most readings (SenML records) in one message.
    pub max_records: usize,
    /// Most memory the decoded readings of one message may take, in bytes
    /// (each reading counts about 100 bytes plus its text).
    pub max_decoded_bytes: usize,
    /// Most distinct metric names one device may have at a time (its series
    /// plus the names of the message at hand); a message bringing one more
    /// is a dead letter (`too_many_series`).
    /// Idle series are evicted (`analytics.series_idle_secs`).
    pub max_series_per_device: usize,
    /// Most series the gateway tracks in all (analytics state is about
    /// 1 KiB each): when full, the longest-idle series is evicted (its
    /// final rollup written) to make room.
    pub max_series: usize,
    /// Most devices whose native sequence window is kept in memory (about
    /// 200 bytes each); when full, the longest-idle device is evicted (a
    /// redelivery of it is then checked against its stored window).
    pub max_dedup_devices: usize,
    /// Dead letters stored per device and minute; beyond it they are
    /// counted (`edge_gateway_dead_letters_suppressed_total`) and
    /// acknowledged, not stored.
    pub max_dead_letters_per_device_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_device_id_bytes: 128,
            max_metric_bytes: 128,
            max_unit_bytes: 32,
            max_string_bytes: 1024,
            max_data_bytes: 1024,
            max_records: 10_000,
            max_decoded_bytes: 4 << 20,
            max_series_per_device: 1000,
            max_series: 1_000_000,
            max_dedup_devices: 1_000_000,
            max_dead_letters_per_device_minute: 60,
        }
    }
}

impl Limits {
    /// Checks the `limits.*` keys: each at least 1, and a device id and a
    /// metric name that fit together in one B-tree index entry of
    /// PostgreSQL (2,704 bytes) with the rest of the key.
    ///
    /// # Errors
    /// The first [`Invalid`] found.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (key, v) in [
            ("limits.max_device_id_bytes", self.max_device_id_bytes),
            ("limits.max_metric_bytes", self.max_metric_bytes),
            ("limits.max_unit_bytes", self.max_unit_bytes),
            ("limits.max_string_bytes", self.max_string_bytes),
            ("limits.max_data_bytes", self.max_data_bytes),
            ("limits.max_records", self.max_records),
            ("limits.max_decoded_bytes", self.max_decoded_bytes),
            ("limits.max_series_per_device", self.max_series_per_device),
            ("limits.max_series", self.max_series),
            ("limits.max_dedup_devices", self.max_dedup_devices),
        ] {
            if v == 0 {
                return Err(Invalid::new(key, "must be at least 1"));
            }
        }
        if self.max_device_id_bytes + self.max_metric_bytes > MAX_KEY_TEXT_BYTES {
            return Err(Invalid::new(
                "limits.max_metric_bytes",
                format!("with limits.max_device_id_bytes, must add up to at most {MAX_KEY_TEXT_BYTES} (the stored keys must fit a PostgreSQL index entry)"),
            ));
        }
        Ok(())
    }
}

/// What one reading costs in memory: the struct and the text and bytes it
/// owns.
pub fn decoded_size(r: &crate::model::Reading) -> usize {
    std::mem::size_of::<crate::model::Reading>()
        + r.metric.len()
        + r.unit.as_ref().map_or(0, |u| u.len())
        + match &r.value {
            crate::model::Value::Text(s) => s.len(),
            crate::model::Value::Data(d) => d.len(),
            _ => 0,
        }
}

/// A field whose size or content is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Metric,
    Unit,
    String,
    Data,
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Field::Metric => "metric name",
            Field::Unit => "unit",
            Field::String => "string value",
            Field::Data => "data value",
        })
    }
}

/// Why a payload could not be used. Each variant has a stable
/// [`reason`](DecodeError::reason) used as a metrics label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("payload is neither a SenML pack (array) nor a native message (map)")]
    UnknownShape,
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("malformed CBOR: {0}")]
    Cbor(String),
    #[error("SenML: {0}")]
    Senml(String),
    #[error("native: {0}")]
    Native(String),
    #[error("metric {metric:?}: value is not finite")]
    NotFinite { metric: String },
    #[error("time out of range")]
    TimeOutOfRange,
    #[error("{field} of {len} bytes, limit {limit}")]
    TooLong {
        field: Field,
        len: usize,
        limit: usize,
    },
    #[error("{field} holds a NUL or control character")]
    InvalidText { field: Field },
    #[error("more than {limit} records")]
    TooManyRecords { limit: usize },
    #[error("decoded readings take more than {limit} bytes")]
    DecodedTooLarge { limit: usize },
}

impl From<cbor::CborError> for DecodeError {
    fn from(e: cbor::CborError) -> DecodeError {
        DecodeError::Cbor(e.to_string())
    }
}

impl DecodeError {
    /// A short, stable label for counters and the dead-letter table.
    pub fn reason(&self) -> DeadLetterReason {
        match self {
            DecodeError::Empty => DeadLetterReason::Empty,
            DecodeError::UnknownShape => DeadLetterReason::UnknownShape,
            DecodeError::Json(_) => DeadLetterReason::MalformedJson,
            DecodeError::Cbor(_) => DeadLetterReason::MalformedCbor,
            DecodeError::Senml(_) => DeadLetterReason::InvalidSenml,
            DecodeError::Native(_) => DeadLetterReason::InvalidNative,
            DecodeError::NotFinite { .. } => DeadLetterReason::NotFinite,
            DecodeError::TimeOutOfRange => DeadLetterReason::TimeOutOfRange,
            DecodeError::TooLong { field, .. } => match field {
                Field::Metric => DeadLetterReason::MetricTooLong,
                Field::Unit => DeadLetterReason::UnitTooLong,
                Field::String => DeadLetterReason::StringTooLong,
                Field::Data => DeadLetterReason::DataTooLong,
            },
            DecodeError::InvalidText { .. } => DeadLetterReason::InvalidText,
            DecodeError::TooManyRecords { .. } => DeadLetterReason::TooManyRecords,
            DecodeError::DecodedTooLarge { .. } => DeadLetterReason::DecodedTooLarge,
        }
    }
}

/// Checks a text field against its size limit and for control characters.
pub(crate) fn check_text(field: Field, s: &str, limit: usize) -> Result<(), DecodeError> {
    if s.len() > limit {
        return Err(DecodeError::TooLong {
            field,
            len: s.len(),
            limit,
        });
    }
    if !crate::model::clean_text(s) {
        return Err(DecodeError::InvalidText { field });
    }
    Ok(())
}

/// Adds one reading's [`decoded_size`] to `total`, failing past the limit.
pub(crate) fn account(
    total: &mut usize,
    r: &crate::model::Reading,
    limits: &Limits,
) -> Result<(), DecodeError> {
    *total += decoded_size(r);
    if *total > limits.max_decoded_bytes {
        return Err(DecodeError::DecodedTooLarge {
            limit: limits.max_decoded_bytes,
        });
    }
    Ok(())
}

/// The wire encoding of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Cbor,
}

/// The payload family, told from the outermost item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Senml,
    Native,
}

/// CBOR self-describe tag 55799 (`d9 d9 f7`), which a publisher may prepend.
const CBOR_SELF_DESCRIBE: [u8; 3] = [0xd9, 0xd9, 0xf7];

/// Tells encoding and family from the MQTT 5 content type (when known) and
/// the first meaningful byte.
pub fn sniff<'p>(
    payload: &'p [u8],
    content_type: Option<&str>,
) -> Result<(Encoding, Family, &'p [u8]), DecodeError> {
    let by_type = content_type.and_then(|ct| {
        let ct = ct.split(';').next().unwrap_or("").trim();
        match ct {
            "application/senml+json" => Some((Encoding::Json, Some(Family::Senml))),
            "application/senml+cbor" => Some((Encoding::Cbor, Some(Family::Senml))),
            "application/json" => Some((Encoding::Json, None)),
            "application/cbor" => Some((Encoding::Cbor, None)),
            _ => None,
        }
    });
    let trimmed = {
        let start = payload
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            .ok_or(DecodeError::Empty)?;
        &payload[start..]
    };
    let json_first = match trimmed.first() {
        Some(b'[') => Some(Family::Senml),
        Some(b'{') => Some(Family::Native),
        _ => None,
    };
    let encoding = match by_type {
        Some((encoding, _)) => encoding,
        None if json_first.is_some() => Encoding::Json,
        None => Encoding::Cbor,
    };
    match encoding {
        Encoding::Json => {
            let family = json_first.ok_or(DecodeError::UnknownShape)?;
            Ok((Encoding::Json, family, trimmed))
        }
        Encoding::Cbor => {
            let body = payload
                .strip_prefix(&CBOR_SELF_DESCRIBE[..])
                .unwrap_or(payload);
            let first = *body.first().ok_or(DecodeError::Empty)?;
            let family = match first >> 5 {
                4 => Family::Senml,
                5 => Family::Native,
                _ => return Err(DecodeError::UnknownShape),
            };
            Ok((Encoding::Cbor, family, body))
        }
    }
}

/// [`decode_limited`] with the default [`Limits`] (replay, benches, tests).
///
/// # Errors
/// As for [`decode_limited`].
pub fn decode(
    payload: &[u8],
    content_type: Option<&str>,
    received: Micros,
) -> Result<Decoded, DecodeError> {
    decode_limited(payload, content_type, received, &Limits::default())
}

/// Decodes a payload received at `received` (used for SenML relative times),
/// within `limits`.
///
/// # Errors
/// Any [`DecodeError`]: the payload is then unusable as a whole and belongs in
/// the dead-letter table; no partial result is returned.
pub fn decode_limited(
    payload: &[u8],
    content_type: Option<&str>,
    received: Micros,
    limits: &Limits,
) -> Result<Decoded, DecodeError> {
    let (encoding, family, body) = sniff(payload, content_type)?;
    let decoded = match family {
        Family::Senml => senml::decode(body, encoding, received, limits)?,
        Family::Native => native::decode(body, encoding, limits)?,
    };
    for reading in &decoded.readings {
        let finite = match reading.value {
            crate::model::Value::Number(v) => v.is_finite(),
            _ => true,
        } && reading.sum.is_none_or(f64::is_finite);
        if !finite {
            return Err(DecodeError::NotFinite {
                metric: reading.metric.to_string(),
            });
        }
    }
    Ok(decoded)
}

/// Seconds as an `f64` (SenML) to microseconds, rejecting what does not fit.
pub(crate) fn seconds_to_micros(seconds: f64) -> Result<Micros, DecodeError> {
    let us = (seconds * 1e6).round();
    // ±(2^62) µs is about ±146,000 years: far beyond any real timestamp.
    if us.is_finite() && us.abs() < 4.6e18 {
        Ok(us as i64)
    } else {
        Err(DecodeError::TimeOutOfRange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_json_and_cbor_families() {
        assert_eq!(
            sniff(b" [ ]", None).map(|r| (r.0, r.1)),
            Ok((Encoding::Json, Family::Senml))
        );
        assert_eq!(
            sniff(b"\n{}", None).map(|r| (r.0, r.1)),
            Ok((Encoding::Json, Family::Native))
        );
        assert_eq!(
            sniff(&[0x81, 0xa0], None).map(|r| (r.0, r.1)),
            Ok((Encoding::Cbor, Family::Senml))
        );
        assert_eq!(
            sniff(&[0xa1, 0x00], None).map(|r| (r.0, r.1)),
            Ok((Encoding::Cbor, Family::Native))
        );
        assert_eq!(
            sniff(&[0xd9, 0xd9, 0xf7, 0x80], None).map(|r| (r.0, r.1)),
            Ok((Encoding::Cbor, Family::Senml))
        );
        assert_eq!(sniff(b"", None), Err(DecodeError::Empty));
        assert_eq!(
            sniff(b"42", None).map(|r| r.1),
            Err(DecodeError::UnknownShape)
        );
    }

    use crate::model::{Reading, Value};
    use edge_payload::{Format, Sample};
    use proptest::prelude::*;

    fn samples() -> impl Strategy<Value = Vec<Sample>> {
        let metric = "[a-z][a-z0-9_]{0,11}";
        let sample = (
            1_500_000_000_000i64..2_000_000_000_000,
            prop::collection::vec((metric, -1e12f64..1e12), 1..4),
        );
        prop::collection::vec(sample, 1..6).prop_map(|mut v| {
            // Packs carry times relative to the first sample.
            v.sort_by_key(|s| s.0);
            v.into_iter()
                .map(|(ts_ms, metrics)| Sample { ts_ms, metrics })
                .collect()
        })
    }

    proptest! {
        /// Whatever the simulator encodes, in any of the four formats, the
        /// gateway decodes back to the same readings.
        #[test]
        fn every_format_round_trips(samples in samples(), seq in 0u64..u64::MAX) {
            for format in Format::ALL {
                let want: Vec<Reading> = samples
                    .iter()
                    .flat_map(|s| s.metrics.iter().map(move |(m, v)| Reading {
                        time: s.ts_ms * 1000,
                        metric: m.as_str().into(),
                        value: Value::Number(*v),
                        unit: None,
                        sum: None,
                    }))
                    .collect();
                let seq = seq & (i64::MAX as u64);
                let payload = edge_payload::encode(format, seq, &samples, &|_| None).unwrap_or_else(|e| panic!("{e}"));
                let decoded = decode(&payload, None, 0);
                let got = decoded.map(|d| (d.readings, d.seq));
                let want_seq = matches!(format, Format::NativeCbor | Format::NativeJson).then_some(seq);
                prop_assert_eq!(got, Ok((want, want_seq)), "{}", format);
            }
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, None, 0);
        }

        /// Truncating a valid payload anywhere gives an error, not a panic
        /// and not a silently shorter pack.
        #[test]
        fn truncated_payloads_are_errors(samples in samples(), cut in 0.0f64..1.0) {
            for format in Format::ALL {
                let payload = edge_payload::encode(format, 1, &samples, &|_| None).unwrap_or_else(|e| panic!("{e}"));
                let at = ((payload.len() as f64) * cut) as usize;
                prop_assert!(decode(&payload[..at], None, 0).is_err(), "{} cut at {}", format, at);
            }
        }
    }

    /// A long base name is refused before it is copied into any record:
    /// 9,000 records under a 100,000-byte base name would be 900 MB.
    #[test]
    fn limits_are_checked_before_anything_is_built() {
        let mut pack = format!(r#"[{{"bn":"{}","v":0}}"#, "a".repeat(100_000));
        for i in 0..9000 {
            pack.push_str(&format!(r#",{{"v":{i}}}"#));
        }
        pack.push(']');
        assert_eq!(
            decode(pack.as_bytes(), None, 0).map_err(|e| e.reason()),
            Err(DeadLetterReason::MetricTooLong)
        );
        let limits = Limits {
            max_records: 3,
            ..Limits::default()
        };
        let four = br#"[{"n":"a","v":1},{"n":"a","v":2},{"n":"a","v":3},{"n":"a","v":4}]"#;
        for payload in [&four[..], &senml_cbor_of(four)] {
            assert_eq!(
                decode_limited(payload, None, 0, &limits).map_err(|e| e.reason()),
                Err(DeadLetterReason::TooManyRecords)
            );
        }
        let native =
            br#"{"seq":1,"samples":[{"ts":1,"m":{"a":1,"b":2}},{"ts":2,"m":{"a":1,"b":2}}]}"#;
        assert_eq!(
            decode_limited(native, None, 0, &limits).map_err(|e| e.reason()),
            Err(DeadLetterReason::TooManyRecords)
        );
        let cases: [(&[u8], DeadLetterReason); 5] = [
            (
                br#"{"seq":1,"ts":1,"m":{"a\u0000b":1}}"#,
                DeadLetterReason::InvalidText,
            ),
            (
                br#"[{"n":"a","u":"\u0001","v":1}]"#,
                DeadLetterReason::InvalidText,
            ),
            (
                br#"[{"n":"a","vs":"x\u0000y"}]"#,
                DeadLetterReason::InvalidText,
            ),
            (
                br#"[{"n":"a","u":"0123456789012345678901234567890123","v":1}]"#,
                DeadLetterReason::UnitTooLong,
            ),
            (
                br#"[{"n":"a","vd":"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo"}]"#,
                DeadLetterReason::DataTooLong,
            ),
        ];
        let small = Limits {
            max_data_bytes: 16,
            ..Limits::default()
        };
        for (payload, reason) in cases {
            assert_eq!(
                decode_limited(payload, None, 0, &small).map_err(|e| e.reason()),
                Err(reason),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        // Room for two readings, not three.
        let tight = Limits {
            max_decoded_bytes: 2 * decoded_size(&crate::model::Reading {
                time: 0,
                metric: "a".into(),
                value: crate::model::Value::Number(1.0),
                unit: None,
                sum: None,
            }) + 1,
            ..Limits::default()
        };
        let three = br#"[{"n":"a","v":1},{"n":"a","v":2},{"n":"a","v":3}]"#;
        assert_eq!(
            decode_limited(three, None, 0, &tight).map_err(|e| e.reason()),
            Err(DeadLetterReason::DecodedTooLarge)
        );
    }

    /// The same pack re-encoded as CBOR with text keys.
    fn senml_cbor_of(json: &[u8]) -> Vec<u8> {
        let value: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
        let mut out = Vec::new();
        let _ = ciborium::into_writer(&value, &mut out);
        out
    }

    #[test]
    fn content_type_overrides_sniffing() {
        // 0x5b is '[' in ASCII but a CBOR byte string header: the content
        // type says CBOR, so it is not taken for JSON.
        assert_eq!(
            sniff(&[0x5b], Some("application/senml+cbor")).map(|r| r.1),
            Err(DecodeError::UnknownShape)
        );
    }
}
