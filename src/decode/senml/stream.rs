//! SenML CBOR in one pass: the streaming reader ([`crate::decode::cbor`])
//! hands each record's fields, borrowed from the payload, to the
//! [`Resolver`] as they are read.

use std::borrow::Cow;

use edge_payload::base64url;
use edge_payload::senml::label;

use super::visitor::{key_from_str, Key};
use super::{record_error, RecordRef, Resolver};
use crate::decode::cbor::{Entries, Item, Reader};
use crate::decode::{DecodeError, Limits};
use crate::model::{Decoded, Micros};

/// Decodes and resolves a CBOR pack in one pass over the payload, with the
/// streaming reader: the same result and error classes as parsing with
/// `ciborium` ([`super::parse`]) and then [`super::resolve`], without
/// building a record or a string that is not a reading's own.
///
/// # Errors
/// [`DecodeError::Cbor`] for malformed CBOR and for labels of the wrong
/// type, [`DecodeError::TooManyRecords`], and the errors of [`Resolver::push`].
pub fn decode_cbor(body: &[u8], received: Micros, limits: &Limits) -> Result<Decoded, DecodeError> {
    let mut r = Reader::new(body);
    let count = match r.untagged()? {
        Item::Array(count) => count,
        _ => return Err(DecodeError::Cbor("a SenML pack must be an array".into())),
    };
    let mut resolver = Resolver::new(received, limits, count.map_or(8, |n| n as usize));
    let mut records = Entries::new(count);
    let mut rec = RecordRef::default();
    let mut i = 0usize;
    while records.more(&mut r) {
        let item = match r.small_map() {
            Some(pairs) => Item::Map(Some(pairs)),
            None => r.untagged()?,
        };
        if i == limits.max_records {
            return Err(DecodeError::TooManyRecords {
                limit: limits.max_records,
            });
        }
        cbor_record(&mut r, item, i, &mut rec)?;
        resolver.push(i, &mut rec)?;
        i += 1;
    }
    if r.remaining() > 0 {
        return Err(DecodeError::Cbor(format!(
            "{} trailing bytes after the pack",
            r.remaining()
        )));
    }
    Ok(resolver.finish())
}

fn type_error(i: usize, label: &str, expected: &str) -> DecodeError {
    DecodeError::Cbor(format!("record {i}: {label} must be {expected}"))
}

/// Reads record `i`, whose header `item` was just read, into `rec`.
fn cbor_record<'a>(
    r: &mut Reader<'a>,
    item: Item<'a>,
    i: usize,
    rec: &mut RecordRef<'a>,
) -> Result<(), DecodeError> {
    let count = match item {
        Item::Map(count) => count,
        _ => return Err(type_error(i, "a record", "a map")),
    };
    *rec = RecordRef::default();
    let mut pairs = Entries::new(count);
    while pairs.more(r) {
        let key = match r.small_int() {
            Some(label @ -6..=8) => {
                read_field(r, i, rec, label)?;
                continue;
            }
            Some(_) => {
                r.skip()?;
                continue;
            }
            None => r.item()?,
        };
        let label = match key {
            Item::Uint(v) if v <= 8 => v as i64,
            Item::Nint(v) if v < 6 => -1 - v as i64,
            Item::Uint(_) | Item::Nint(_) => {
                r.skip()?;
                continue;
            }
            Item::Text(key) => match key_from_str(&key) {
                Key::Known(label) => label,
                Key::Ignored => {
                    r.skip()?;
                    continue;
                }
                Key::MustUnderstand(name) => {
                    return Err(record_error(
                        i,
                        format_args!("unknown must-understand label {name:?}"),
                    ))
                }
            },
            _ => return Err(type_error(i, "a label", "an integer or a text string")),
        };
        read_field(r, i, rec, label)?;
    }
    Ok(())
}

/// Reads the value of `label` into `rec`.
#[inline]
fn read_field<'a>(
    r: &mut Reader<'a>,
    i: usize,
    rec: &mut RecordRef<'a>,
    label: i64,
) -> Result<(), DecodeError> {
    macro_rules! set {
        ($field:ident, $value:expr) => {{
            if rec.$field.is_some() {
                return Err(record_error(
                    i,
                    concat!("duplicate label ", stringify!($field)),
                ));
            }
            rec.$field = Some($value);
        }};
    }
    let text = |r: &mut Reader<'a>, name| {
        r.text()?
            .ok_or_else(|| type_error(i, name, "a text string"))
    };
    let number = |r: &mut Reader<'a>, name| cbor_number(r, i, name);
    match label {
        label::BVER => set!(
            bver,
            match r.untagged()? {
                Item::Uint(v) => v,
                _ => return Err(type_error(i, "bver", "an unsigned integer")),
            }
        ),
        label::BN => set!(bn, text(r, "bn")?),
        label::BT => set!(bt, number(r, "bt")?),
        label::BU => set!(bu, text(r, "bu")?),
        label::BV => set!(bv, number(r, "bv")?),
        label::BS => set!(bs, number(r, "bs")?),
        label::N => set!(n, text(r, "n")?),
        label::U => set!(u, text(r, "u")?),
        label::V => set!(v, number(r, "v")?),
        label::VS => set!(vs, text(r, "vs")?),
        label::VB => set!(
            vb,
            match r.untagged()? {
                Item::Bool(b) => b,
                _ => return Err(type_error(i, "vb", "a boolean")),
            }
        ),
        label::S => set!(s, number(r, "s")?),
        label::T => set!(t, number(r, "t")?),
        label::UT => set!(ut, number(r, "ut")?),
        label::VD => set!(
            vd,
            match r.item()? {
                Item::Bytes(b) => b,
                Item::Text(s) => Cow::Owned(
                    base64url::decode(&s).ok_or_else(|| record_error(i, "vd is not base64url"))?,
                ),
                _ => return Err(type_error(i, "vd", "a byte string")),
            }
        ),
        _ => r.skip()?,
    }
    Ok(())
}

/// A number: an integer (bignums included) or a float. Values carry no
/// other tag (as with `ciborium`, which the tests compare against).
#[inline]
fn cbor_number(r: &mut Reader<'_>, i: usize, name: &str) -> Result<f64, DecodeError> {
    if let Some(v) = r.plain_number() {
        return Ok(v);
    }
    let item = r.item()?;
    let negative = match item {
        Item::Tag(2) => false,
        Item::Tag(3) => true,
        item => return item.number().ok_or_else(|| type_error(i, name, "a number")),
    };
    match r.item()? {
        Item::Bytes(b) => {
            let magnitude = b
                .iter()
                .fold(0.0, |acc, &byte| acc * 256.0 + f64::from(byte));
            Ok(if negative {
                -1.0 - magnitude
            } else {
                magnitude
            })
        }
        _ => Err(type_error(i, name, "a number")),
    }
}
