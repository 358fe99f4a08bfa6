//! SenML (RFC 8428) decoding and resolution, JSON and CBOR alike.
//!
//! One serde visitor reads records from either encoding straight into
//! [`edge_payload::senml::Record`]: map keys may be the JSON string labels or
//! the CBOR integer labels. Unknown labels are ignored unless they end in `_`
//! (must-understand, RFC 8428 section 4.4), which rejects the pack.
//!
//! Resolution (section 4.6): base fields apply to their own record and every
//! later one until replaced; name = base name + name; time = base time + time,
//! where a result below 2^28 is relative to "now", taken as the receive time;
//! unit = unit or base unit; value = base value + value for numbers; sum =
//! base sum + sum when either is present. A record with base fields only (no
//! name, value or sum) just sets bases, which is how many devices open a pack.

use std::fmt;

use edge_payload::base64url;
use edge_payload::senml::{label, Record};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

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
    let records = parse(body, encoding, limits.max_records)?;
    resolve(&records, received, limits)
}

/// Parses the records of a pack without resolving them; a pack of more
/// than `max_records` records is refused as soon as the next one starts.
pub fn parse(
    body: &[u8],
    encoding: Encoding,
    max_records: usize,
) -> Result<Vec<Record>, DecodeError> {
    let records = match encoding {
        Encoding::Json => {
            let mut de = serde_json::Deserializer::from_slice(body);
            let records = PackSeed { max_records }
                .deserialize(&mut de)
                .map_err(|e| json_error(e, max_records))?;
            de.end().map_err(|e| json_error(e, max_records))?;
            records
        }
        Encoding::Cbor => {
            // ciborium takes no seed: the limit reaches the visitor through
            // this thread's cell for the duration of the call.
            let mut reader = body;
            CBOR_MAX_RECORDS.set(max_records);
            let pack = ciborium::from_reader::<CborPack, _>(&mut reader);
            let records = pack.map_err(|e| cbor_error(&e, max_records))?.0;
            if !reader.is_empty() {
                return Err(DecodeError::Cbor(format!(
                    "{} trailing bytes after the pack",
                    reader.len()
                )));
            }
            records
        }
    };
    Ok(records)
}

/// A message from our own visitor is a SenML rule; anything else is syntax.
const SENML_MARK: &str = "senml: ";
/// The message of our visitor refusing a record past the limit.
const RECORDS_MARK: &str = "edge-gateway: too many records";

/// Our visitor's own errors, told from the syntax errors of the encoding.
fn own_error(text: &str, max_records: usize) -> Option<DecodeError> {
    if text.starts_with(RECORDS_MARK) {
        return Some(DecodeError::TooManyRecords { limit: max_records });
    }
    text.strip_prefix(SENML_MARK)
        .map(|rule| DecodeError::Senml(rule.to_string()))
}

fn json_error(e: serde_json::Error, max_records: usize) -> DecodeError {
    let text = e.to_string();
    own_error(&text, max_records).unwrap_or(DecodeError::Json(text))
}

fn cbor_error<T: fmt::Debug>(e: &ciborium::de::Error<T>, max_records: usize) -> DecodeError {
    match e {
        ciborium::de::Error::Semantic(_, text) => {
            own_error(text, max_records).unwrap_or_else(|| DecodeError::Cbor(text.clone()))
        }
        other => DecodeError::Cbor(format!("{other:?}")),
    }
}

fn rule<E: de::Error>(text: impl fmt::Display) -> E {
    E::custom(format_args!("{SENML_MARK}{text}"))
}

thread_local! {
    static CBOR_MAX_RECORDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A CBOR pack, limited by [`CBOR_MAX_RECORDS`].
struct CborPack(Vec<Record>);

impl<'de> serde::Deserialize<'de> for CborPack {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CborPack, D::Error> {
        let max_records = CBOR_MAX_RECORDS.get();
        PackSeed { max_records }.deserialize(d).map(CborPack)
    }
}

/// A whole pack of at most `max_records` records; deserializes from either
/// encoding.
struct PackSeed {
    max_records: usize,
}

impl<'de> DeserializeSeed<'de> for PackSeed {
    type Value = Vec<Record>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Record>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PackSeed {
    type Value = Vec<Record>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SenML pack (array of records)")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Record>, A::Error> {
        let hint = seq.size_hint().unwrap_or(8).min(4096).min(self.max_records);
        let mut records = Vec::with_capacity(hint);
        while let Some(record) = seq.next_element_seed(RecordSeed)? {
            if records.len() == self.max_records {
                return Err(de::Error::custom(RECORDS_MARK));
            }
            records.push(record);
        }
        Ok(records)
    }
}

struct RecordSeed;

impl<'de> DeserializeSeed<'de> for RecordSeed {
    type Value = Record;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Record, D::Error> {
        d.deserialize_map(RecordVisitor)
    }
}

/// A map key: a known label (as its CBOR integer), an ignorable unknown one,
/// or an unknown must-understand one.
enum Key {
    Known(i64),
    Ignored,
    MustUnderstand(String),
}

fn key_from_str(s: &str) -> Key {
    let known = match s {
        "bver" => label::BVER,
        "bn" => label::BN,
        "bt" => label::BT,
        "bu" => label::BU,
        "bv" => label::BV,
        "bs" => label::BS,
        "n" => label::N,
        "u" => label::U,
        "v" => label::V,
        "vs" => label::VS,
        "vb" => label::VB,
        "s" => label::S,
        "t" => label::T,
        "ut" => label::UT,
        "vd" => label::VD,
        _ if s.ends_with('_') => return Key::MustUnderstand(s.to_string()),
        _ => return Key::Ignored,
    };
    Key::Known(known)
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_any(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SenML label (string or integer)")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Key, E> {
        Ok(key_from_str(s))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
        // Table 4 is conclusive: other integer keys carry no meaning.
        Ok(if (-6..=8).contains(&v) {
            Key::Known(v)
        } else {
            Key::Ignored
        })
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
        Ok(if v <= 8 {
            Key::Known(v as i64)
        } else {
            Key::Ignored
        })
    }
}

/// A number given as an integer or a float in either encoding.
struct Number;

impl<'de> DeserializeSeed<'de> for Number {
    type Value = f64;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<f64, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for Number {
    type Value = f64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }
    fn visit_f32<E: de::Error>(self, v: f32) -> Result<f64, E> {
        Ok(f64::from(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<f64, E> {
        Ok(v as f64)
    }
}

/// A data value: base64url text in JSON, a byte string in CBOR.
struct Data;

impl<'de> DeserializeSeed<'de> for Data {
    type Value = Vec<u8>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for Data {
    type Value = Vec<u8>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a data value (base64url string or byte string)")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<u8>, E> {
        base64url::decode(s).ok_or_else(|| rule("vd is not base64url"))
    }
    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Vec<u8>, E> {
        Ok(b.to_vec())
    }
    fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(b)
    }
}

struct RecordVisitor;

impl<'de> Visitor<'de> for RecordVisitor {
    type Value = Record;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SenML record (map)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
        let mut r = Record::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let label = match key {
                Key::Known(label) => label,
                Key::Ignored => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                Key::MustUnderstand(name) => {
                    return Err(rule(format_args!("unknown must-understand label {name:?}")))
                }
            };
            macro_rules! set {
                ($field:ident, $value:expr) => {{
                    if r.$field.is_some() {
                        return Err(rule(concat!("duplicate label ", stringify!($field))));
                    }
                    r.$field = Some($value);
                }};
            }
            match label {
                label::BVER => set!(bver, map.next_value::<u64>()?),
                label::BN => set!(bn, map.next_value::<String>()?),
                label::BT => set!(bt, map.next_value_seed(Number)?),
                label::BU => set!(bu, map.next_value::<String>()?),
                label::BV => set!(bv, map.next_value_seed(Number)?),
                label::BS => set!(bs, map.next_value_seed(Number)?),
                label::N => set!(n, map.next_value::<String>()?),
                label::U => set!(u, map.next_value::<String>()?),
                label::V => set!(v, map.next_value_seed(Number)?),
                label::VS => set!(vs, map.next_value::<String>()?),
                label::VB => set!(vb, map.next_value::<bool>()?),
                label::S => set!(s, map.next_value_seed(Number)?),
                label::T => set!(t, map.next_value_seed(Number)?),
                label::UT => set!(ut, map.next_value_seed(Number)?),
                label::VD => set!(vd, map.next_value_seed(Data)?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(r)
    }
}

/// True for a name RFC 8428 4.5.1 allows: `[A-Za-z0-9][A-Za-z0-9:./_-]*`.
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b':' | b'.' | b'/' | b'_'))
}

/// Applies base values and relative times (RFC 8428 4.6), within `limits`.
/// Sizes are checked before anything is built: a long base name is never
/// copied into the records it applies to.
///
/// # Errors
/// [`DecodeError::Senml`] naming the record (0-based) and the rule it breaks;
/// the size and text errors of [`Limits`].
pub fn resolve(
    records: &[Record],
    received: Micros,
    limits: &Limits,
) -> Result<Decoded, DecodeError> {
    let mut bn: &str = "";
    let mut bt = 0.0;
    let mut bu: Option<&str> = None;
    let mut bv = 0.0;
    let mut bs: Option<f64> = None;
    let mut version: Option<u64> = None;
    let mut readings = Vec::with_capacity(records.len());
    let mut relative_time = false;
    let mut decoded_bytes = 0usize;
    let fail = |i: usize, what: String| Err(DecodeError::Senml(format!("record {i}: {what}")));
    for (i, r) in records.iter().enumerate() {
        if let Some(v) = r.bver {
            if v > VERSION {
                return fail(i, format!("version {v} is newer than {VERSION}"));
            }
            if version.is_some_and(|seen| seen != v) {
                return fail(i, "records of a pack must share one version".into());
            }
            version = Some(v);
        }
        if let Some(name) = &r.bn {
            bn = name;
        }
        if let Some(t) = r.bt {
            bt = t;
        }
        if let Some(unit) = &r.bu {
            bu = Some(unit);
        }
        if let Some(v) = r.bv {
            bv = v;
        }
        if let Some(s) = r.bs {
            bs = Some(s);
        }
        let value_fields = usize::from(r.v.is_some())
            + usize::from(r.vs.is_some())
            + usize::from(r.vb.is_some())
            + usize::from(r.vd.is_some());
        if value_fields > 1 {
            return fail(i, "more than one value field".into());
        }
        let sum = match (bs, r.s) {
            (None, None) => None,
            (base, own) => Some(base.unwrap_or(0.0) + own.unwrap_or(0.0)),
        };
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
            Value::Number(bv + v)
        } else if let Some(s) = &r.vs {
            Value::Text(s.clone())
        } else if let Some(b) = r.vb {
            Value::Bool(b)
        } else if let Some(d) = &r.vd {
            Value::Data(d.clone())
        } else if r.s.is_some() {
            Value::None
        } else if r.n.is_none() {
            // Base fields only: nothing measured in this record.
            continue;
        } else {
            return fail(i, "no value and no sum".into());
        };
        let name_len = bn.len() + r.n.as_ref().map_or(0, String::len);
        if name_len > limits.max_metric_bytes {
            return Err(DecodeError::TooLong {
                field: Field::Metric,
                len: name_len,
                limit: limits.max_metric_bytes,
            });
        }
        let unit = r.u.as_deref().or(bu);
        if let Some(unit) = unit {
            check_text(Field::Unit, unit, limits.max_unit_bytes)?;
        }
        let name = match &r.n {
            Some(n) => format!("{bn}{n}"),
            None => bn.to_string(),
        };
        if !valid_name(&name) {
            return fail(i, format!("invalid name {name:?}"));
        }
        let seconds = bt + r.t.unwrap_or(0.0);
        let time = if seconds < RELATIVE_LIMIT {
            relative_time = true;
            received.saturating_add(seconds_to_micros(seconds)?)
        } else {
            seconds_to_micros(seconds)?
        };
        let reading = Reading {
            time,
            metric: name,
            value,
            unit: unit.map(str::to_string),
            sum,
        };
        account(&mut decoded_bytes, &reading, limits)?;
        readings.push(reading);
    }
    Ok(Decoded {
        readings,
        seq: None,
        boot: None,
        relative_time,
    })
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
}
