//! The serde path of SenML decoding: one visitor reads a record from JSON
//! (string labels) or, through `ciborium`, CBOR (integer labels) into a
//! [`RecordRef`]. JSON packs stream through it into the [`Resolver`]
//! ([`decode_json`]), strings borrowed from the payload where they hold no
//! escape; [`parse`] collects owned [`Record`]s, and its CBOR side is the
//! reference the streaming CBOR reader is tested against.

use std::fmt;

use std::borrow::Cow;

use edge_payload::base64url;
use edge_payload::senml::{label, Record};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

use super::{RecordRef, Resolver};
use crate::decode::{DecodeError, Encoding, Limits};
use crate::model::{Decoded, Micros};

/// Decodes and resolves a JSON pack in one pass: each record goes to the
/// [`Resolver`] as soon as it is read, its strings borrowed from the
/// payload unless they hold an escape. The same result as [`parse`] then
/// [`super::resolve`] for a valid pack; a pack that breaks both the syntax
/// and a SenML rule is refused for whichever comes first.
///
/// # Errors
/// [`DecodeError::Json`] for syntax and type errors,
/// [`DecodeError::TooManyRecords`], and the errors of [`Resolver::push`].
pub fn decode_json<'a>(
    body: &'a [u8],
    received: Micros,
    limits: &Limits,
) -> Result<Decoded, DecodeError> {
    let mut resolver = Resolver::new(received, limits, 8);
    let mut refused = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = Pack {
        max_records: limits.max_records,
        each: |i, record: &mut RecordRef<'a>| resolver.push(i, record),
        refused: &mut refused,
    };
    let read = seed.deserialize(&mut de).and_then(|()| de.end());
    match (read, refused) {
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(json_error(e, limits.max_records)),
        (Ok(()), None) => Ok(resolver.finish()),
    }
}

/// A whole pack, each record handed to `each` as it is read (filled in
/// place, then reused for the next); a pack of more than `max_records`
/// records is refused as the next one starts. What `each` refuses stops the
/// read and is left in `refused` (serde's errors carry only text).
struct Pack<'r, F> {
    max_records: usize,
    each: F,
    refused: &'r mut Option<DecodeError>,
}

impl<'de, F> DeserializeSeed<'de> for Pack<'_, F>
where
    F: FnMut(usize, &mut RecordRef<'de>) -> Result<(), DecodeError>,
{
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F> Visitor<'de> for Pack<'_, F>
where
    F: FnMut(usize, &mut RecordRef<'de>) -> Result<(), DecodeError>,
{
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SenML pack (array of records)")
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        let mut record = RecordRef::default();
        while let Some(()) = seq.next_element_seed(RecordInto(&mut record))? {
            if i == self.max_records {
                return Err(de::Error::custom(RECORDS_MARK));
            }
            if let Err(e) = (self.each)(i, &mut record) {
                *self.refused = Some(e);
                return Err(de::Error::custom("edge-gateway: refused by the resolver"));
            }
            i += 1;
        }
        Ok(())
    }
}

/// The records of a pack, owned: the reference path ([`parse`]).
fn collect<'de, D: Deserializer<'de>>(d: D, max_records: usize) -> Result<Vec<Record>, D::Error> {
    let mut records = Vec::new();
    let mut refused = None;
    Pack {
        max_records,
        each: |_, record: &mut RecordRef<'de>| {
            records.push(owned(std::mem::take(record)));
            Ok(())
        },
        refused: &mut refused,
    }
    .deserialize(d)?;
    Ok(records)
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
            let records = collect(&mut de, max_records).map_err(|e| json_error(e, max_records))?;
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
        collect(d, CBOR_MAX_RECORDS.get()).map(CborPack)
    }
}

/// The owned copy of a record.
fn owned(r: RecordRef<'_>) -> Record {
    let text = |s: Option<Cow<'_, str>>| s.map(Cow::into_owned);
    Record {
        bver: r.bver,
        bn: text(r.bn),
        bt: r.bt,
        bu: text(r.bu),
        bv: r.bv,
        bs: r.bs,
        n: text(r.n),
        u: text(r.u),
        v: r.v,
        vs: text(r.vs),
        vb: r.vb,
        vd: r.vd.map(Cow::into_owned),
        s: r.s,
        t: r.t,
        ut: r.ut,
    }
}

/// Reads one record into the one it holds (filled in place: a record is
/// some 300 bytes, which moving through serde's results would copy over
/// and over).
struct RecordInto<'r, 'de>(&'r mut RecordRef<'de>);

impl<'de> DeserializeSeed<'de> for RecordInto<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// A text string, borrowed from the payload when the deserializer can.
struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        // `deserialize_string`: ciborium joins chunked text only there;
        // serde_json still lends what it can.
        d.deserialize_string(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(s))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s.to_string()))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s))
    }
}

/// A map key: a known label (as its CBOR integer), an ignorable unknown one,
/// or an unknown must-understand one.
pub(super) enum Key {
    Known(i64),
    Ignored,
    MustUnderstand(String),
}

pub(super) fn key_from_str(s: &str) -> Key {
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

impl<'de> Visitor<'de> for RecordInto<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SenML record (map)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let r = self.0;
        *r = RecordRef::default();
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
                label::BN => set!(bn, map.next_value_seed(Text)?),
                label::BT => set!(bt, map.next_value_seed(Number)?),
                label::BU => set!(bu, map.next_value_seed(Text)?),
                label::BV => set!(bv, map.next_value_seed(Number)?),
                label::BS => set!(bs, map.next_value_seed(Number)?),
                label::N => set!(n, map.next_value_seed(Text)?),
                label::U => set!(u, map.next_value_seed(Text)?),
                label::V => set!(v, map.next_value_seed(Number)?),
                label::VS => set!(vs, map.next_value_seed(Text)?),
                label::VB => set!(vb, map.next_value::<bool>()?),
                label::S => set!(s, map.next_value_seed(Number)?),
                label::T => set!(t, map.next_value_seed(Number)?),
                label::UT => set!(ut, map.next_value_seed(Number)?),
                label::VD => set!(vd, Cow::Owned(map.next_value_seed(Data)?)),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}
