//! Native payload decoding: `{"seq", "ts", "m"}` or `{"seq", "samples"}`, JSON
//! or CBOR, into readings. See `edge_payload::native` for the format.

use edge_payload::native::{Metrics, NativeMessage};

use super::cbor::{Entries, Item, Reader};
use super::names::Names;
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
        Encoding::Cbor => return decode_cbor(body, limits),
    };
    if message.seq > i64::MAX as u64 {
        return Err(DecodeError::Native("seq must be below 2^63".into()));
    }
    let mut out = Readings {
        readings: Vec::new(),
        names: Names::default(),
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

/// Decodes a native CBOR message in one pass with the streaming reader:
/// the same result as `ciborium` into [`NativeMessage`], without the
/// intermediate message (metric names go straight into the readings).
///
/// # Errors
/// As for [`decode`].
pub fn decode_cbor(body: &[u8], limits: &Limits) -> Result<Decoded, DecodeError> {
    let mut r = Reader::new(body);
    let mut out = Readings {
        readings: Vec::new(),
        names: Names::default(),
        bytes: 0,
        limits,
    };
    let mut message = Top::default();
    let mut fields = match r.untagged()? {
        Item::Map(count) => Entries::new(count),
        _ => return Err(DecodeError::Cbor("a native message must be a map".into())),
    };
    while fields.more(&mut r) {
        let Some(key) = r.text()? else {
            return Err(DecodeError::Cbor(
                "a native key must be a text string".into(),
            ));
        };
        let duplicate = || DecodeError::Cbor(format!("duplicate field {key:?}"));
        match key.as_ref() {
            "seq" => {
                let seq = unsigned(&mut r, "seq")?;
                if message.seq.replace(seq).is_some() {
                    return Err(duplicate());
                }
            }
            "boot" => {
                let boot = unsigned(&mut r, "boot")?;
                if message.boot.replace(boot).is_some() {
                    return Err(duplicate());
                }
            }
            "ts" => {
                let ts = timestamp(&mut r)?;
                if message.ts.replace(ts).is_some() {
                    return Err(duplicate());
                }
            }
            "m" => {
                // Read once "ts" is known (it may come after "m").
                if message.m.replace(r.clone()).is_some() {
                    return Err(duplicate());
                }
                r.skip()?;
            }
            "samples" => {
                if message.samples {
                    return Err(duplicate());
                }
                message.samples = true;
                samples(&mut r, &mut out)?;
            }
            other => return Err(DecodeError::Cbor(format!("unknown field {other:?}"))),
        }
    }
    if r.remaining() > 0 {
        return Err(DecodeError::Cbor(format!(
            "{} trailing bytes after the message",
            r.remaining()
        )));
    }
    let Some(seq) = message.seq else {
        return Err(DecodeError::Cbor("missing field \"seq\"".into()));
    };
    if seq > i64::MAX as u64 {
        return Err(DecodeError::Native("seq must be below 2^63".into()));
    }
    match (message.ts, message.m, message.samples) {
        (Some(ts), Some(mut m), false) => metrics(&mut m, ts, &mut out)?,
        (None, None, true) => {}
        _ => {
            return Err(DecodeError::Native(
                "expected either \"ts\" and \"m\" or \"samples\"".into(),
            ))
        }
    }
    Ok(Decoded {
        readings: out.readings,
        seq: Some(seq),
        boot: message.boot,
        relative_time: false,
    })
}

/// The top-level fields of a native CBOR message as they are read.
#[derive(Default)]
struct Top<'a> {
    seq: Option<u64>,
    boot: Option<u64>,
    ts: Option<i64>,
    /// Where the "m" map starts.
    m: Option<Reader<'a>>,
    samples: bool,
}

fn unsigned(r: &mut Reader<'_>, name: &str) -> Result<u64, DecodeError> {
    match r.untagged()? {
        Item::Uint(v) => Ok(v),
        _ => Err(DecodeError::Cbor(format!(
            "{name} must be an unsigned integer"
        ))),
    }
}

fn timestamp(r: &mut Reader<'_>) -> Result<i64, DecodeError> {
    match r.untagged()? {
        Item::Uint(v) if v <= i64::MAX as u64 => Ok(v as i64),
        Item::Nint(v) if v <= i64::MAX as u64 => Ok(-1 - v as i64),
        _ => Err(DecodeError::Cbor("ts must be an integer (i64)".into())),
    }
}

/// The "samples" array: each a map of "ts" and "m".
fn samples(r: &mut Reader<'_>, out: &mut Readings) -> Result<(), DecodeError> {
    let count = match r.untagged()? {
        Item::Array(count) => count,
        _ => return Err(DecodeError::Cbor("samples must be an array".into())),
    };
    if let Some(n) = count {
        out.readings
            .reserve((n as usize).min(out.limits.max_records).min(4096));
    }
    let mut samples = Entries::new(count);
    while samples.more(r) {
        let pairs = match r.small_map() {
            Some(pairs) => Some(pairs),
            None => match r.untagged()? {
                Item::Map(pairs) => pairs,
                _ => return Err(DecodeError::Cbor("a sample must be a map".into())),
            },
        };
        // "m" is read where it stands once "ts" is known (devices send "ts"
        // first); before it, it is skipped and read at the end.
        let (mut ts, mut m, mut m_read) = (None, None, false);
        let mut fields = Entries::new(pairs);
        while fields.more(r) {
            let Some(key) = r.text()? else {
                return Err(DecodeError::Cbor(
                    "a sample key must be a text string".into(),
                ));
            };
            match (key.as_ref(), ts) {
                ("ts", None) => ts = Some(timestamp(r)?),
                ("m", _) if m.is_none() && !m_read => match ts {
                    Some(ts) => {
                        metrics(r, ts, out)?;
                        m_read = true;
                    }
                    None => {
                        m = Some(r.clone());
                        r.skip()?;
                    }
                },
                _ => {
                    return Err(DecodeError::Cbor(format!(
                        "unknown or duplicate sample field {key:?}"
                    )))
                }
            }
        }
        match (ts, m) {
            (Some(_), None) if m_read => {}
            (Some(ts), Some(mut m)) => metrics(&mut m, ts, out)?,
            _ => return Err(DecodeError::Cbor("a sample needs \"ts\" and \"m\"".into())),
        }
    }
    Ok(())
}

/// An "m" map of metric names to numbers, at `ts_ms`.
fn metrics(r: &mut Reader<'_>, ts_ms: i64, out: &mut Readings) -> Result<(), DecodeError> {
    let time: Micros = ts_ms.checked_mul(1000).ok_or(DecodeError::TimeOutOfRange)?;
    let mut pairs = match r.untagged()? {
        Item::Map(count) => Entries::new(count),
        _ => return Err(DecodeError::Cbor("m must be a map".into())),
    };
    while pairs.more(r) {
        let Some(name) = r.text()? else {
            return Err(DecodeError::Cbor(
                "a metric name must be a text string".into(),
            ));
        };
        let value = match r.plain_number() {
            Some(value) => value,
            None => r
                .untagged()?
                .number()
                .ok_or_else(|| DecodeError::Cbor(format!("metric {name:?} must be a number")))?,
        };
        out.push(time, &name, value)?;
    }
    Ok(())
}

/// Readings being collected, with their size so far.
struct Readings<'l> {
    readings: Vec<Reading>,
    /// The metric names so far, shared among the readings.
    names: Names,
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
            self.push(time, &metric, value)?;
        }
        Ok(())
    }

    fn push(&mut self, time: Micros, metric: &str, value: f64) -> Result<(), DecodeError> {
        if self.readings.len() == self.limits.max_records {
            return Err(DecodeError::TooManyRecords {
                limit: self.limits.max_records,
            });
        }
        let metric = self.names.intern("", metric, |metric| {
            if metric.is_empty() {
                return Err(DecodeError::Native("empty metric name".into()));
            }
            check_text(Field::Metric, metric, self.limits.max_metric_bytes)
        })?;
        let reading = Reading {
            time,
            metric,
            value: Value::Number(value),
            unit: None,
            sum: None,
        };
        account(&mut self.bytes, &reading, self.limits)?;
        self.readings.push(reading);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode as decode_any;
    use edge_payload::native::NativeMessage;

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

    /// The `ciborium` path the streaming decoder replaced.
    fn via_ciborium(body: &[u8], limits: &Limits) -> Result<Decoded, DecodeError> {
        let mut reader = body;
        let message: NativeMessage =
            ciborium::from_reader(&mut reader).map_err(|e| DecodeError::Cbor(format!("{e:?}")))?;
        if !reader.is_empty() {
            return Err(DecodeError::Cbor("trailing bytes".into()));
        }
        let json = serde_json::to_vec(&message).map_err(|e| DecodeError::Json(e.to_string()))?;
        decode(&json, Encoding::Json, limits)
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn streaming_cbor_decodes_as_ciborium_does(
            seq in prop_oneof![0u64..1000, Just(u64::MAX)],
            boot in proptest::option::of(0u64..10),
            samples in proptest::collection::vec(
                (prop_oneof![0i64..2_000_000_000_000, Just(i64::MAX), Just(-5)],
                 proptest::collection::vec(("[a-z]{0,3}", -1e6f64..1e6), 0..4)),
                0..4),
            cuts in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
            max_records in 1usize..10,
        ) {
            let samples: Vec<edge_payload::Sample> = samples
                .into_iter()
                .map(|(ts_ms, metrics)| edge_payload::Sample { ts_ms, metrics })
                .collect();
            let mut message = NativeMessage::from_samples(seq, &samples);
            message.boot = boot;
            let mut bytes = edge_payload::native::encode_cbor(&message)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let limits = Limits { max_records, ..Limits::default() };
            for round in 0..2 {
                if round == 1 {
                    for (at, byte) in &cuts {
                        let at = at.index(bytes.len());
                        bytes[at] = *byte;
                    }
                }
                let streaming = decode_cbor(&bytes, &limits);
                let reference = via_ciborium(&bytes, &limits);
                let same = match (&streaming, &reference) {
                    (Ok(a), Ok(b)) => a == b,
                    (Err(_), Err(_)) => true,
                    // ciborium takes a byte string for a sequence or a map
                    // of numbers; the streaming reader does not.
                    (Err(DecodeError::Cbor(e)), Ok(_)) => {
                        e.contains("must be") && bytes.iter().any(|b| b >> 5 == 2)
                    }
                    _ => false,
                };
                prop_assert!(same, "{:02x?}\nstreaming {:?}\nciborium  {:?}", bytes, streaming, reference);
            }
        }
    }
}
