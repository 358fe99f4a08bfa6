//! SenML (RFC 8428) records as they appear on the wire, and their encoders.
//!
//! A [`Record`] holds the fields of one SenML record exactly as sent: base
//! fields unresolved, times possibly relative. Resolution (base name + name,
//! base time + time, relative times against the receive time, ...) is the
//! gateway's job (`edge_gateway::decode::senml`), because it needs the receive
//! time and the validation rules.
//!
//! JSON uses the string labels (`bn`, `n`, `v`, ...); CBOR uses the integer
//! labels of RFC 8428 table 4 (`bn` = -2, `n` = 0, `v` = 2, ...).

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::{base64url, EncodeError, Sample};

/// Integer labels of the CBOR representation (RFC 8428, table 4).
pub mod label {
    pub const BVER: i64 = -1;
    pub const BN: i64 = -2;
    pub const BT: i64 = -3;
    pub const BU: i64 = -4;
    pub const BV: i64 = -5;
    pub const BS: i64 = -6;
    pub const N: i64 = 0;
    pub const U: i64 = 1;
    pub const V: i64 = 2;
    pub const VS: i64 = 3;
    pub const VB: i64 = 4;
    pub const S: i64 = 5;
    pub const T: i64 = 6;
    pub const UT: i64 = 7;
    pub const VD: i64 = 8;
}

/// One SenML record, unresolved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub bver: Option<u64>,
    pub bn: Option<String>,
    pub bt: Option<f64>,
    pub bu: Option<String>,
    pub bv: Option<f64>,
    pub bs: Option<f64>,
    pub n: Option<String>,
    pub u: Option<String>,
    pub v: Option<f64>,
    pub vs: Option<String>,
    pub vb: Option<bool>,
    pub vd: Option<Vec<u8>>,
    pub s: Option<f64>,
    pub t: Option<f64>,
    pub ut: Option<f64>,
}

/// Serializes a record with string labels (JSON) or integer labels (CBOR).
struct Labelled<'a> {
    record: &'a Record,
    cbor: bool,
}

impl Serialize for Labelled<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let r = self.record;
        let mut map = serializer.serialize_map(None)?;
        macro_rules! field {
            ($name:ident, $label:expr) => {
                if let Some(value) = &r.$name {
                    if self.cbor {
                        map.serialize_entry(&$label, value)?;
                    } else {
                        map.serialize_entry(stringify!($name), value)?;
                    }
                }
            };
        }
        field!(bver, label::BVER);
        field!(bn, label::BN);
        field!(bt, label::BT);
        field!(bu, label::BU);
        field!(bv, label::BV);
        field!(bs, label::BS);
        field!(n, label::N);
        field!(u, label::U);
        field!(v, label::V);
        field!(vs, label::VS);
        field!(vb, label::VB);
        if let Some(data) = &r.vd {
            if self.cbor {
                map.serialize_entry(&label::VD, &ByteStr(data))?;
            } else {
                map.serialize_entry("vd", &base64url::encode(data))?;
            }
        }
        field!(s, label::S);
        field!(t, label::T);
        field!(ut, label::UT);
        map.end()
    }
}

/// A borrowed byte slice that serde emits as a byte string (CBOR major
/// type 2) rather than as an array of integers.
struct ByteStr<'a>(&'a [u8]);

impl Serialize for ByteStr<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

struct Pack<'a> {
    records: &'a [Record],
    cbor: bool,
}

impl Serialize for Pack<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.records.iter().map(|record| Labelled {
            record,
            cbor: self.cbor,
        }))
    }
}

/// Encodes a pack as SenML JSON (`application/senml+json`).
///
/// # Errors
/// The serializer's error (none is expected for plain numbers and strings).
pub fn encode_json(records: &[Record]) -> Result<Vec<u8>, EncodeError> {
    Ok(serde_json::to_vec(&Pack {
        records,
        cbor: false,
    })?)
}

/// Encodes a pack as SenML CBOR (`application/senml+cbor`), with integer labels.
///
/// # Errors
/// The serializer's error (none is expected for plain numbers and strings).
pub fn encode_cbor(records: &[Record]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    ciborium::into_writer(
        &Pack {
            records,
            cbor: true,
        },
        &mut out,
    )
    .map_err(|e| EncodeError::Cbor(e.to_string()))?;
    Ok(out)
}

/// Builds the pack a simulated device sends for `samples`: the first record
/// carries the base time, every record a relative `t` and a name; units come
/// from `units`.
pub fn pack_from_samples(
    samples: &[Sample],
    units: &dyn Fn(&str) -> Option<&'static str>,
) -> Vec<Record> {
    let base_ms = samples.first().map_or(0, |s| s.ts_ms);
    let mut records = Vec::with_capacity(samples.iter().map(|s| s.metrics.len()).sum());
    for sample in samples {
        for (name, value) in &sample.metrics {
            let mut record = Record {
                n: Some(name.clone()),
                u: units(name).map(str::to_string),
                v: Some(*value),
                ..Record::default()
            };
            if records.is_empty() {
                record.bt = Some(base_ms as f64 / 1000.0);
            }
            let offset_ms = sample.ts_ms - base_ms;
            if offset_ms != 0 {
                record.t = Some(offset_ms as f64 / 1000.0);
            }
            records.push(record);
        }
    }
    records
}
