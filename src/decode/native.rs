//! Native payload decoding: `{"seq", "ts", "m"}` or `{"seq", "samples"}`, JSON
//! or CBOR, into readings. See `edge_payload::native` for the format.

use edge_payload::native::{Metrics, NativeMessage};

use super::{account, check_text, DecodeError, Encoding, Field, Limits};
use crate::model::{Decoded, Micros, Reading, Value};

/// Decodes a native message.
///
/// # Errors
/// [`DecodeError::Json`]/[`DecodeError::Cbor`] for syntax and type errors
/// (unknown fields included), [`DecodeError::Native`] for a message that has
/// neither or both forms or an empty metric name, [`DecodeError::TimeOutOfRange`]
/// for a timestamp that does not fit, and the errors of [`Limits`].
pub fn decode(body: &[u8], encoding: Encoding, limits: &Limits) -> Result<Decoded, DecodeError> {
    let message: NativeMessage = match encoding {
        Encoding::Json => {
            serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?
        }
        Encoding::Cbor => {
            let mut reader = body;
            let message = ciborium::from_reader(&mut reader).map_err(|e| match e {
                ciborium::de::Error::Semantic(_, text) => DecodeError::Cbor(text),
                other => DecodeError::Cbor(format!("{other:?}")),
            })?;
            if !reader.is_empty() {
                return Err(DecodeError::Cbor(format!(
                    "{} trailing bytes after the message",
                    reader.len()
                )));
            }
            message
        }
    };
    if message.seq > i64::MAX as u64 {
        return Err(DecodeError::Native("seq must be below 2^63".into()));
    }
    let mut out = Readings {
        readings: Vec::new(),
        bytes: 0,
        limits,
    };
    match (message.ts, message.m, message.samples) {
        (Some(ts), Some(m), None) => out.push_sample(ts, m)?,
        (None, None, Some(samples)) => {
            let records: usize = samples.iter().map(|s| s.m.0.len()).sum();
            if records > limits.max_records {
                return Err(DecodeError::TooManyRecords {
                    limit: limits.max_records,
                });
            }
            out.readings.reserve(records);
            for sample in samples {
                out.push_sample(sample.ts, sample.m)?;
            }
        }
        _ => {
            return Err(DecodeError::Native(
                "expected either \"ts\" and \"m\" or \"samples\"".into(),
            ))
        }
    }
    Ok(Decoded {
        readings: out.readings,
        seq: Some(message.seq),
        boot: message.boot,
        relative_time: false,
    })
}

/// Readings being collected, with their size so far.
struct Readings<'l> {
    readings: Vec<Reading>,
    bytes: usize,
    limits: &'l Limits,
}

impl Readings<'_> {
    fn push_sample(&mut self, ts_ms: i64, metrics: Metrics) -> Result<(), DecodeError> {
        let time: Micros = ts_ms.checked_mul(1000).ok_or(DecodeError::TimeOutOfRange)?;
        if self.readings.len() + metrics.0.len() > self.limits.max_records {
            return Err(DecodeError::TooManyRecords {
                limit: self.limits.max_records,
            });
        }
        for (metric, value) in metrics.0 {
            if metric.is_empty() {
                return Err(DecodeError::Native("empty metric name".into()));
            }
            check_text(Field::Metric, &metric, self.limits.max_metric_bytes)?;
            let reading = Reading {
                time,
                metric,
                value: Value::Number(value),
                unit: None,
                sum: None,
            };
            account(&mut self.bytes, &reading, self.limits)?;
            self.readings.push(reading);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode as decode_any;

    fn num(time: Micros, metric: &str, v: f64) -> Reading {
        Reading {
            time,
            metric: metric.into(),
            value: Value::Number(v),
            unit: None,
            sum: None,
        }
    }

    #[test]
    fn single_sample_json() {
        let got = decode_any(
            br#"{"seq":7,"ts":1700000000123,"m":{"t":21.5,"h":40}}"#,
            None,
            0,
        );
        assert_eq!(
            got,
            Ok(Decoded {
                readings: vec![
                    num(1_700_000_000_123_000, "t", 21.5),
                    num(1_700_000_000_123_000, "h", 40.0)
                ],
                seq: Some(7),
                boot: None,
                relative_time: false,
            })
        );
    }

    #[test]
    fn batch_json() {
        let got = decode_any(
            br#"{"seq":8,"samples":[{"ts":1000,"m":{"a":1}},{"ts":2000,"m":{"a":2,"b":3}}]}"#,
            None,
            0,
        );
        assert_eq!(
            got.map(|d| d.readings),
            Ok(vec![
                num(1_000_000, "a", 1.0),
                num(2_000_000, "a", 2.0),
                num(2_000_000, "b", 3.0)
            ])
        );
    }

    /// CBOR written by hand, byte by byte, not by our encoder:
    /// {"seq": 1, "ts": 1000, "m": {"x": 1.5}}
    #[test]
    fn single_sample_cbor_hand_written() {
        let bytes = [
            0xa3, 0x63, b's', b'e', b'q', 0x01, 0x62, b't', b's', 0x19, 0x03, 0xe8, 0x61, b'm',
            0xa1, 0x61, b'x', 0xf9, 0x3e, 0x00,
        ];
        let got = decode_any(&bytes, None, 0);
        assert_eq!(
            got,
            Ok(Decoded {
                readings: vec![num(1_000_000, "x", 1.5)],
                seq: Some(1),
                boot: None,
                relative_time: false,
            })
        );
    }

    /// Found by fuzzing: a CBOR map header claiming an enormous length made
    /// the decoder try to allocate for it and panic.
    #[test]
    fn huge_declared_lengths_are_errors_not_panics() {
        let crash = [
            0x52, 0xd9, 0xd9, 0xf7, 0xbf, 0x61, 0x6d, 0xbb, 0x61, 0x6d, 0xc8, 0xc8, 0x00, 0x04,
            0x1f, 0x5f,
        ];
        assert!(decode_any(&crash[1..], None, 0).is_err());
        // {"m": map of 2^63 entries} without the entries.
        let claim = [
            0xa1, 0x61, b'm', 0xbb, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(decode_any(&claim, None, 0).is_err());
        // [ array of 2^63 records ] (SenML) likewise.
        let records = [0x9b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_any(&records, None, 0).is_err());
    }

    #[test]
    fn shape_errors() {
        for bad in [
            &br#"{"seq":1}"#[..],
            br#"{"seq":1,"ts":1,"m":{"a":1},"samples":[]}"#,
            br#"{"seq":1,"ts":1,"m":{"":1}}"#,
        ] {
            assert!(
                matches!(decode_any(bad, None, 0), Err(DecodeError::Native(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            decode_any(br#"{"seq":1,"ts":1,"m":{"a":"x"}}"#, None, 0),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode_any(br#"{"seq":1,"ts":1,"m":{},"zz":1}"#, None, 0),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode_any(
                br#"{"seq":1,"ts":9223372036854775807,"m":{"a":1}}"#,
                None,
                0
            ),
            Err(DecodeError::TimeOutOfRange)
        ));
    }
}
