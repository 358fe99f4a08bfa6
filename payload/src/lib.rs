//! Payload model and encoders shared by `edge-gateway` and `firmware-sim`.
//!
//! The gateway decodes what devices publish; the simulator encodes what devices
//! publish. Both sides use the types here so the two can never drift apart: a
//! change to a format is a change to this crate, checked by the round-trip
//! tests of both.
//!
//! Two payload families exist, each in JSON and in CBOR:
//! - **SenML** (RFC 8428): a pack (array) of records with base fields; see [`senml`].
//! - **Native**: a map with a per-device message sequence number and one sample
//!   or a batch of samples; see [`native`].

pub mod base64url;
pub mod native;
pub mod senml;

use std::fmt;
use std::str::FromStr;

/// The four wire formats a device may publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    SenmlCbor,
    SenmlJson,
    NativeCbor,
    NativeJson,
}

impl Format {
    /// Every format, in a stable order.
    pub const ALL: [Format; 4] = [
        Format::SenmlCbor,
        Format::SenmlJson,
        Format::NativeCbor,
        Format::NativeJson,
    ];

    /// The name used on command lines and in config (`senml-cbor`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Format::SenmlCbor => "senml-cbor",
            Format::SenmlJson => "senml-json",
            Format::NativeCbor => "native-cbor",
            Format::NativeJson => "native-json",
        }
    }

    /// The MQTT 5 content type for this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::SenmlCbor => "application/senml+cbor",
            Format::SenmlJson => "application/senml+json",
            Format::NativeCbor => "application/cbor",
            Format::NativeJson => "application/json",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for a format name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFormat(pub String);

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown format {:?}: expected senml-cbor, senml-json, native-cbor or native-json",
            self.0
        )
    }
}

impl std::error::Error for UnknownFormat {}

impl FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFormat(s.to_string()))
    }
}

/// 64-bit FNV-1a of a device id: how the gateway assigns devices to shard
/// workers and how topic shards are computed (deploy/SCALING.md), so both
/// sides always agree. Stable across runs, platforms and versions.
pub fn device_hash(device: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// One timestamped sample of several metrics, the unit a device measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Metric name and value, in the order the device reports them.
    pub metrics: Vec<(String, f64)>,
}

/// Why a payload could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("CBOR: {0}")]
    Cbor(String),
}

/// Encodes `samples` of one device as a single message in `format`.
///
/// `seq` is the per-device message sequence number; only the native format
/// carries it. `units` gives the unit of each metric by name, used by SenML.
///
/// # Errors
/// The serializer's error (none is expected for plain numbers and strings).
pub fn encode(
    format: Format,
    seq: u64,
    samples: &[Sample],
    units: &dyn Fn(&str) -> Option<&'static str>,
) -> Result<Vec<u8>, EncodeError> {
    encode_with_boot(format, seq, None, samples, units)
}

/// [`encode`], with the device's boot id (native formats only).
///
/// # Errors
/// As [`encode`].
pub fn encode_with_boot(
    format: Format,
    seq: u64,
    boot: Option<u64>,
    samples: &[Sample],
    units: &dyn Fn(&str) -> Option<&'static str>,
) -> Result<Vec<u8>, EncodeError> {
    let native = || native::NativeMessage {
        boot,
        ..native::NativeMessage::from_samples(seq, samples)
    };
    match format {
        Format::SenmlCbor => senml::encode_cbor(&senml::pack_from_samples(samples, units)),
        Format::SenmlJson => senml::encode_json(&senml::pack_from_samples(samples, units)),
        Format::NativeCbor => native::encode_cbor(&native()),
        Format::NativeJson => native::encode_json(&native()),
    }
}

#[cfg(test)]
mod tests {
    /// Published FNV-1a 64 test vectors: the hash must never change.
    #[test]
    fn device_hash_is_fnv1a_64() {
        assert_eq!(super::device_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::device_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::device_hash("foobar"), 0x8594_4171_f739_67e8);
    }
}
