//! SenML (RFC 8428) decoding and resolution, JSON and CBOR alike.
//!
//! Both encodings are read in one pass, each record's fields borrowed from
//! the payload and resolved at once by the one [`Resolver`]: CBOR, the
//! encoding of high-rate devices, by the streaming reader ([`super::cbor`],
//! [`decode_cbor`]); JSON by a serde visitor over `serde_json`
//! ([`decode_json`]). That visitor also reads CBOR through `ciborium` into
//! owned [`edge_payload::senml::Record`]s ([`parse`]), which the tests and
//! the fuzz target use as the reference for the streaming path.
//! Map keys may be the JSON string labels or the CBOR integer labels.
//! Unknown labels are ignored unless they end in `_` (must-understand, RFC
//! 8428 section 4.4), which rejects the pack.
//!
//! Resolution (section 4.6): base fields apply to their own record and every
//! later one until replaced; name = base name + name; time = base time + time,
//! where a result below 2^28 is relative to "now", taken as the receive time;
//! unit = unit or base unit; value = base value + value for numbers; sum =
//! base sum + sum when either is present. A record with base fields only (no
//! name, value or sum) just sets bases, which is how many devices open a pack.
//!
//! Layout: this module resolves ([`Resolver`]); `stream` reads CBOR with the
//! streaming reader; `visitor` is the serde path (JSON, and CBOR through
//! `ciborium` as the tests' reference).

mod stream;
mod visitor;

use std::borrow::Cow;

use edge_payload::senml::Record;

pub use stream::decode_cbor;
pub use visitor::{decode_json, parse};

use super::names::Names;
use super::{account, check_text, seconds_to_micros, DecodeError, Encoding, Field, Limits};
use crate::model::{Decoded, Micros, Reading, Value};

/// The SenML version this decoder implements (RFC 8428: 10).
pub const VERSION: u64 = 10;

/// Times below this many seconds are relative to "now" (RFC 8428 4.5.3).
const RELATIVE_LIMIT: f64 = 268_435_456.0;

/// Decodes and resolves a pack.
///
/// # Errors
/// [`DecodeError::Json`]/[`DecodeError::Cbor`] for syntax or type errors,
/// [`DecodeError::Senml`] for packs that break RFC 8428 rules.
pub fn decode(
    body: &[u8],
    encoding: Encoding,
    received: Micros,
    limits: &Limits,
) -> Result<Decoded, DecodeError> {
    match encoding {
        Encoding::Cbor => decode_cbor(body, received, limits),
        Encoding::Json => decode_json(body, received, limits),
    }
}

/// True for a name RFC 8428 4.5.1 allows: `[A-Za-z0-9][A-Za-z0-9:./_-]*`.
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b':' | b'.' | b'/' | b'_'))
}

/// Record `i` breaks an RFC 8428 rule: `what`.
pub(super) fn record_error(i: usize, what: impl std::fmt::Display) -> DecodeError {
    DecodeError::Senml(format!("record {i}: {what}"))
}

/// One record's fields as sent: borrowed from the payload by both decoders
/// (text with JSON escapes or in CBOR chunks is owned), or from a parsed
/// [`Record`] on the reference path ([`resolve`]).
#[derive(Debug, Default)]
pub struct RecordRef<'a> {
    pub bver: Option<u64>,
    pub bn: Option<Cow<'a, str>>,
    pub bt: Option<f64>,
    pub bu: Option<Cow<'a, str>>,
    pub bv: Option<f64>,
    pub bs: Option<f64>,
    pub n: Option<Cow<'a, str>>,
    pub u: Option<Cow<'a, str>>,
    pub v: Option<f64>,
    pub vs: Option<Cow<'a, str>>,
    pub vb: Option<bool>,
    pub vd: Option<Cow<'a, [u8]>>,
    pub s: Option<f64>,
    pub t: Option<f64>,
    pub ut: Option<f64>,
}

impl<'a> From<&'a Record> for RecordRef<'a> {
    fn from(r: &'a Record) -> RecordRef<'a> {
        let text = |s: &'a Option<String>| s.as_deref().map(Cow::Borrowed);
        RecordRef {
            bver: r.bver,
            bn: text(&r.bn),
            bt: r.bt,
            bu: text(&r.bu),
            bv: r.bv,
            bs: r.bs,
            n: text(&r.n),
            u: text(&r.u),
            v: r.v,
            vs: text(&r.vs),
            vb: r.vb,
            vd: r.vd.as_deref().map(Cow::Borrowed),
            s: r.s,
            t: r.t,
            ut: r.ut,
        }
    }
}

/// Applies base values and relative times (RFC 8428 4.6), within `limits`,
/// to records parsed beforehand ([`parse`]): the reference the one-pass
/// decoders are tested against.
///
/// # Errors
/// As for [`Resolver::push`].
pub fn resolve(
    records: &[Record],
    received: Micros,
    limits: &Limits,
) -> Result<Decoded, DecodeError> {
    let mut resolver = Resolver::new(received, limits, records.len());
    for (i, r) in records.iter().enumerate() {
        resolver.push(i, &mut RecordRef::from(r))?;
    }
    Ok(resolver.finish())
}

/// Resolution as records arrive: the bases in force and the readings so
/// far. Sizes are checked before anything is built: a long base name is
/// never copied into the records it applies to.
pub struct Resolver<'a, 'l> {
    bn: Cow<'a, str>,
    bt: f64,
    bu: Option<Cow<'a, str>>,
    bv: f64,
    bs: Option<f64>,
    version: Option<u64>,
    readings: Vec<Reading>,
    /// Full names and units of the readings so far, shared among them.
    names: Names,
    units: Names,
    relative_time: bool,
    decoded_bytes: usize,
    received: Micros,
    limits: &'l Limits,
}

impl<'a, 'l> Resolver<'a, 'l> {
    /// A resolver for a pack received at `received`; `hint` records are
    /// expected (capped: it may come from the payload).
    pub fn new(received: Micros, limits: &'l Limits, hint: usize) -> Resolver<'a, 'l> {
        Resolver {
            bn: Cow::Borrowed(""),
            bt: 0.0,
            bu: None,
            bv: 0.0,
            bs: None,
            version: None,
            readings: Vec::with_capacity(hint.min(4096).min(limits.max_records)),
            names: Names::default(),
            units: Names::default(),
            relative_time: false,
            decoded_bytes: 0,
            received,
            limits,
        }
    }

    /// Takes record `i` (0-based): updates the bases, and adds its reading.
    ///
    /// # Errors
    /// [`DecodeError::Senml`] naming the record and the rule it breaks; the
    /// size and text errors of [`Limits`].
    pub fn push(&mut self, i: usize, r: &mut RecordRef<'a>) -> Result<(), DecodeError> {
        let fail = |what: String| Err(record_error(i, what));
        if let Some(v) = r.bver {
            if v > VERSION {
                return fail(format!("version {v} is newer than {VERSION}"));
            }
            if self.version.is_some_and(|seen| seen != v) {
                return fail("records of a pack must share one version".into());
            }
            self.version = Some(v);
        }
        if let Some(name) = r.bn.take() {
            self.bn = name;
        }
        if let Some(t) = r.bt {
            self.bt = t;
        }
        if let Some(unit) = r.bu.take() {
            self.bu = Some(unit);
        }
        if let Some(v) = r.bv {
            self.bv = v;
        }
        if let Some(s) = r.bs {
            self.bs = Some(s);
        }
        let value_fields = usize::from(r.v.is_some())
            + usize::from(r.vs.is_some())
            + usize::from(r.vb.is_some())
            + usize::from(r.vd.is_some());
        if value_fields > 1 {
            return fail("more than one value field".into());
        }
        let sum = match (self.bs, r.s) {
            (None, None) => None,
            (base, own) => Some(base.unwrap_or(0.0) + own.unwrap_or(0.0)),
        };
        let limits = self.limits;
        if let Some(s) = &r.vs {
            check_text(Field::String, s, limits.max_string_bytes)?;
        }
        if let Some(d) = &r.vd {
            if d.len() > limits.max_data_bytes {
                return Err(DecodeError::TooLong {
                    field: Field::Data,
                    len: d.len(),
                    limit: limits.max_data_bytes,
                });
            }
        }
        let value = if let Some(v) = r.v {
            Value::Number(self.bv + v)
        } else if let Some(s) = r.vs.take() {
            Value::Text(s.into_owned())
        } else if let Some(b) = r.vb {
            Value::Bool(b)
        } else if let Some(d) = r.vd.take() {
            Value::Data(d.into_owned())
        } else if r.s.is_some() {
            Value::None
        } else if r.n.is_none() {
            // Base fields only: nothing measured in this record.
            return Ok(());
        } else {
            return fail("no value and no sum".into());
        };
        let own = r.n.as_deref().unwrap_or("");
        let name_len = self.bn.len() + own.len();
        if name_len > limits.max_metric_bytes {
            return Err(DecodeError::TooLong {
                field: Field::Metric,
                len: name_len,
                limit: limits.max_metric_bytes,
            });
        }
        let unit = match r.u.as_deref().or(self.bu.as_deref()) {
            Some(unit) => Some(self.units.intern("", unit, |unit| {
                check_text(Field::Unit, unit, limits.max_unit_bytes)
            })?),
            None => None,
        };
        let metric = self.names.intern(&self.bn, own, |name| {
            if valid_name(name) {
                Ok(())
            } else {
                fail(format!("invalid name {name:?}"))
            }
        })?;
        let seconds = self.bt + r.t.unwrap_or(0.0);
        let time = if seconds < RELATIVE_LIMIT {
            self.relative_time = true;
            self.received.saturating_add(seconds_to_micros(seconds)?)
        } else {
            seconds_to_micros(seconds)?
        };
        let reading = Reading {
            time,
            metric,
            value,
            unit,
            sum,
        };
        account(&mut self.decoded_bytes, &reading, limits)?;
        self.readings.push(reading);
        Ok(())
    }

    /// The readings of the pack.
    pub fn finish(self) -> Decoded {
        Decoded {
            readings: self.readings,
            seq: None,
            boot: None,
            relative_time: self.relative_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode as decode_any, DecodeError};

    const NOW: Micros = 1_700_000_000_000_000;

    fn num(time: Micros, metric: &str, v: f64, unit: Option<&str>) -> Reading {
        Reading {
            time,
            metric: metric.into(),
            value: Value::Number(v),
            unit: unit.map(Into::into),
            sum: None,
        }
    }

    /// RFC 8428 section 5.1.2 "Multiple Data Points", resolved as 5.1.4 shows.
    #[test]
    fn rfc_multiple_data_points_json() {
        let pack = br#"[
            {"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,"bu":"%RH","v":20},
            {"u":"lon","v":24.30621},
            {"u":"lat","v":50.048677}
        ]"#;
        // 5.1.2 has records without names; give them names as 5.1.3 does.
        let pack = String::from_utf8_lossy(pack)
            .replace(r#"{"u":"lon""#, r#"{"n":"lon","u":"lon""#)
            .replace(r#"{"u":"lat""#, r#"{"n":"lat","u":"lat""#);
        let got = decode_any(pack.as_bytes(), None, NOW).map(|d| d.readings);
        let t = 1_320_067_464_000_000;
        assert_eq!(
            got,
            Ok(vec![
                num(t, "urn:dev:ow:10e2073a01080063:", 20.0, Some("%RH")),
                num(t, "urn:dev:ow:10e2073a01080063:lon", 24.30621, Some("lon")),
                num(t, "urn:dev:ow:10e2073a01080063:lat", 50.048677, Some("lat")),
            ])
        );
    }

    /// RFC 8428 section 6: the CBOR dump printed in the RFC, byte for byte
    /// (written by an encoder that is not ours), for the second example of
    /// section 5.1.2. Its `bver` is 5, older than 10, which is accepted.
    #[test]
    fn rfc_cbor_dump_decodes_to_the_json_example() {
        let hex: String = [
            "87a721781b75726e3a6465763a6f773a3130653230373361303130383030363a",
            "22fb41d303a15b00106223614120050067766f6c7461676501615602fb405e06",
            "6666666666a3006763757272656e74062402fb3ff3333333333333a300676375",
            "7272656e74062302fb3ff4cccccccccccda3006763757272656e74062202fb3f",
            "f6666666666666a3006763757272656e74062102f93e00a3006763757272656e",
            "74062002fb3ff999999999999aa3006763757272656e74060002fb3ffb333333",
            "333333",
        ]
        .concat();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or_default())
            .collect();
        assert_eq!(bytes.len(), 0xc3);
        let got = decode_any(&bytes, None, NOW).map(|d| d.readings);
        let base = 1_276_020_076_001_000;
        let name = "urn:dev:ow:10e2073a0108006:";
        let mut want = vec![num(base, &format!("{name}voltage"), 120.1, Some("V"))];
        for (back, v) in [(5, 1.2), (4, 1.3), (3, 1.4), (2, 1.5), (1, 1.6), (0, 1.7)] {
            want.push(num(
                base - back * 1_000_000,
                &format!("{name}current"),
                v,
                Some("A"),
            ));
        }
        assert_eq!(got, Ok(want));
        // The JSON form of the same example resolves identically.
        let json = br#"[
            {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
             "bu":"A","bver":5,"n":"voltage","u":"V","v":120.1},
            {"n":"current","t":-5,"v":1.2},{"n":"current","t":-4,"v":1.3},
            {"n":"current","t":-3,"v":1.4},{"n":"current","t":-2,"v":1.5},
            {"n":"current","t":-1,"v":1.6},{"n":"current","v":1.7}]"#;
        assert_eq!(decode_any(json, None, NOW).map(|d| d.readings), got);
    }

    #[test]
    fn relative_times_resolve_against_receive_time() {
        let got = decode_any(br#"[{"n":"a","v":1},{"n":"b","t":-10,"v":2}]"#, None, NOW)
            .map(|d| d.readings);
        assert_eq!(
            got,
            Ok(vec![
                num(NOW, "a", 1.0, None),
                num(NOW - 10_000_000, "b", 2.0, None)
            ])
        );
    }

    #[test]
    fn base_value_and_sum_and_other_value_types() {
        let got = decode_any(
            br#"[{"bn":"d:","bv":100,"bs":5,"n":"x","v":1.5},
                 {"n":"s","vs":"open"},
                 {"n":"b","vb":true},
                 {"n":"raw","vd":"AQID"},
                 {"n":"e","s":2}]"#,
            None,
            NOW,
        )
        .map(|d| d.readings);
        let r = got.unwrap_or_default();
        assert_eq!(r.len(), 5);
        assert_eq!(r[0].value, Value::Number(101.5));
        assert_eq!(r[0].sum, Some(5.0));
        assert_eq!(r[1].value, Value::Text("open".into()));
        assert_eq!(r[2].value, Value::Bool(true));
        assert_eq!(r[3].value, Value::Data(vec![1, 2, 3]));
        assert_eq!((r[4].value.clone(), r[4].sum), (Value::None, Some(7.0)));
        assert!(r
            .iter()
            .all(|x| x.time == NOW && x.metric.starts_with("d:")));
    }

    #[test]
    fn base_only_record_sets_bases() {
        let got = decode_any(
            br#"[{"bn":"dev1/","bt":1700000000},{"n":"t","v":1}]"#,
            None,
            NOW,
        )
        .map(|d| d.readings);
        assert_eq!(
            got,
            Ok(vec![num(1_700_000_000_000_000, "dev1/t", 1.0, None)])
        );
    }

    #[test]
    fn rule_violations_are_senml_errors() {
        for (pack, needle) in [
            (&br#"[{"n":"a","v":1,"vs":"x"}]"#[..], "more than one value"),
            (br#"[{"n":"a"}]"#, "no value"),
            (br#"[{"n":"a b","v":1}]"#, "invalid name"),
            (br#"[{"n":"-a","v":1}]"#, "invalid name"),
            (br#"[{"bver":11,"n":"a","v":1}]"#, "version"),
            (br#"[{"n":"a","v":1,"x_":1}]"#, "must-understand"),
            (br#"[{"n":"a","v":1,"n":"b"}]"#, "duplicate"),
        ] {
            match decode_any(pack, None, NOW) {
                Err(DecodeError::Senml(text)) => assert!(text.contains(needle), "{text}"),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(pack)),
            }
        }
    }

    #[test]
    fn unknown_labels_are_ignored() {
        let got =
            decode_any(br#"[{"n":"a","v":1,"foo":{"x":[1,2]}}]"#, None, NOW).map(|d| d.readings);
        assert_eq!(got, Ok(vec![num(NOW, "a", 1.0, None)]));
    }

    #[test]
    fn syntax_errors_are_json_or_cbor_errors() {
        assert!(matches!(
            decode_any(b"[{\"n\":", None, NOW),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode_any(br#"[{"n":"a","v":"1"}]"#, None, NOW),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode_any(&[0x81, 0xa1, 0x02], None, NOW),
            Err(DecodeError::Cbor(_))
        ));
        assert!(matches!(
            decode_any(&[0x80, 0x00], None, NOW),
            Err(DecodeError::Cbor(_))
        ));
    }

    #[test]
    fn non_finite_values_are_rejected() {
        // CBOR can carry NaN where JSON cannot: [{0: "a", 2: NaN}]
        let bytes = [0x81, 0xa2, 0x00, 0x61, b'a', 0x02, 0xf9, 0x7e, 0x00];
        assert!(matches!(
            decode_any(&bytes, None, NOW),
            Err(DecodeError::NotFinite { .. })
        ));
    }

    /// The streaming CBOR path against the `ciborium` one (parse, then
    /// resolve): the same readings, or both an error (which one may differ
    /// for a payload with several faults: the streaming path stops at the
    /// first record at fault, `ciborium` parses every record first).
    fn same_as_ciborium(bytes: &[u8], limits: &Limits) -> Result<(), String> {
        let streaming = decode_cbor(bytes, NOW, limits);
        let reference =
            parse(bytes, Encoding::Cbor, limits.max_records).and_then(|r| resolve(&r, NOW, limits));
        let same = match (&streaming, &reference) {
            (Ok(a), Ok(b)) => a == b,
            (Err(_), Err(_)) => true,
            // ciborium takes a (tagged) byte string for a sequence; the
            // dispatcher only hands arrays to SenML anyway.
            // ciborium also takes nested indefinite-length string chunks,
            // which RFC 8949 (3.2.3) forbids.
            (Err(DecodeError::Cbor(e)), Ok(_)) if e.contains("a chunk of an indefinite string") => {
                true
            }
            (Err(_), Ok(_)) => {
                let mut r = crate::decode::cbor::Reader::new(bytes);
                loop {
                    let at = r.position();
                    if !matches!(r.item(), Ok(crate::decode::cbor::Item::Tag(_))) {
                        break bytes.get(at).is_some_and(|b| b >> 5 == 2);
                    }
                }
            }
            _ => false,
        };
        if same {
            Ok(())
        } else {
            Err(format!(
                "{bytes:02x?}\nstreaming {streaming:?}\nciborium  {reference:?}"
            ))
        }
    }

    fn record() -> impl Strategy<Value = Record> {
        let name = proptest::option::of("[a-z][a-z0-9:._-]{0,6}|-x| a");
        let number = proptest::option::of(prop_oneof![
            any::<i32>().prop_map(f64::from),
            -1e12f64..1e12,
            Just(1.7e9),
        ]);
        (
            (name.clone(), name.clone(), number.clone(), number.clone()),
            (number.clone(), number.clone(), number.clone()),
            (
                proptest::option::of("[a-z%]{0,4}"),
                proptest::option::of("[ -~]{0,8}"),
                proptest::option::of(any::<bool>()),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..6)),
                proptest::option::of(0u64..12),
            ),
        )
            .prop_map(
                |((bn, n, bt, t), (v, bv, s), (u, vs, vb, vd, bver))| Record {
                    bn,
                    n,
                    bt,
                    t,
                    v,
                    bv,
                    s,
                    u,
                    vs,
                    vb,
                    vd,
                    bver,
                    ..Record::default()
                },
            )
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn streaming_cbor_decodes_as_ciborium_does(
            records in proptest::collection::vec(record(), 0..6),
            cuts in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
            truncate in proptest::option::of(any::<proptest::sample::Index>()),
            max_records in 1usize..8,
        ) {
            let mut bytes = edge_payload::senml::encode_cbor(&records).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let limits = Limits { max_records, ..Limits::default() };
            same_as_ciborium(&bytes, &limits).map_err(TestCaseError::fail)?;
            // Damaged copies: flipped bytes, a cut tail.
            if !bytes.is_empty() {
                for (at, byte) in &cuts {
                    let at = at.index(bytes.len());
                    bytes[at] = *byte;
                }
                if let Some(len) = truncate {
                    bytes.truncate(len.index(bytes.len()));
                }
                same_as_ciborium(&bytes, &limits).map_err(TestCaseError::fail)?;
            }
        }

        /// JSON read in one pass ([`decode_json`]) gives what parsing all
        /// records and then resolving them gives: the same readings, or
        /// both an error (which one may differ when a pack breaks both the
        /// syntax and a rule). Names with escapes take the owned path.
        #[test]
        fn streaming_json_decodes_as_parse_then_resolve(
            records in proptest::collection::vec(record(), 0..6),
            escape in any::<bool>(),
            cuts in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
            max_records in 1usize..8,
        ) {
            let mut bytes = edge_payload::senml::encode_json(&records).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if escape {
                // "\u0061" is "a": the same pack, with escapes.
                bytes = String::from_utf8_lossy(&bytes).replace("\"a", "\"\\u0061").into_bytes();
            }
            let limits = Limits { max_records, ..Limits::default() };
            for round in 0..2 {
                if round == 1 {
                    for (at, byte) in &cuts {
                        if !bytes.is_empty() {
                            let at = at.index(bytes.len());
                            bytes[at] = *byte;
                        }
                    }
                }
                let streaming = decode_json(&bytes, NOW, &limits);
                let reference = parse(&bytes, Encoding::Json, limits.max_records)
                    .and_then(|r| resolve(&r, NOW, &limits));
                let same = match (&streaming, &reference) {
                    (Ok(a), Ok(b)) => a == b,
                    (Err(_), Err(_)) => true,
                    _ => false,
                };
                prop_assert!(same, "{}\nstreaming {:?}\nreference {:?}", String::from_utf8_lossy(&bytes), streaming, reference);
            }
        }
    }

    #[test]
    fn streaming_cbor_takes_what_ciborium_takes() {
        let limits = Limits::default();
        for bytes in [
            // Indefinite pack and record, a text key, an ignored nested value.
            &[
                0x9f, 0xbf, 0x00, 0x61, b'a', 0x02, 0x01, 0x63, b'f', b'o', b'o', 0x82, 0x01, 0x02,
                0xff, 0xff,
            ][..],
            // Chunked name, half-float value, a tag around the pack.
            &[
                0xc1, 0x81, 0xa2, 0x00, 0x7f, 0x61, b'a', 0x61, b'b', 0xff, 0x02, 0xf9, 0x3c, 0x00,
            ],
            // Unknown integer label 9 and -7 skipped.
            &[0x81, 0xa3, 0x00, 0x61, b'a', 0x09, 0x80, 0x26, 0xa0],
            // The value as a bignum.
            &[0x81, 0xa2, 0x00, 0x61, b'a', 0x02, 0xc2, 0x42, 0x01, 0x00],
            // A map that is not closed, a break in the wrong place.
            &[0x81, 0xbf, 0x00, 0x61, b'a'],
            &[0x81, 0xff],
            // Tags: on a record, on a key, on a value (found by fuzzing).
            &[0x81, 0xc1, 0xa2, 0x00, 0x61, b'a', 0x02, 0x01],
            &[0x81, 0xa2, 0xc1, 0x00, 0x61, b'a', 0x02, 0x01],
            &[0x81, 0xa2, 0x00, 0x61, b'a', 0x02, 0xc5, 0x01],
            &[0x81, 0xa2, 0x00, 0xc1, 0x61, b'a', 0x02, 0x01],
            // An indefinite map ending after a key, in an ignored value.
            &[0x81, 0xbf, 0x2a, 0xbf, 0x2a, 0x41, 0x81, 0xf6, 0xff, 0xff],
        ] {
            if let Err(e) = same_as_ciborium(bytes, &limits) {
                panic!("{e}");
            }
        }
    }
}
