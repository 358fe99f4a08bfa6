//! The native payload: compact, carries a per-device message sequence.
//!
//! One sample:
//! ```json
//! {"seq": 17, "ts": 1732492800123, "m": {"temperature": 21.5, "humidity": 40.2}}
//! ```
//! A batch of samples in one message:
//! ```json
//! {"seq": 18, "samples": [{"ts": 1732492801123, "m": {"temperature": 21.6}},
//!                         {"ts": 1732492802123, "m": {"temperature": 21.7}}]}
//! ```
//! `seq` counts messages per device (it lets the gateway drop redeliveries),
//! `ts` is milliseconds since the Unix epoch, `m` maps metric names to numbers.
//! An optional `boot` is a number the device picks at each boot (random, or
//! a persisted boot counter): the gateway then keys duplicate detection by
//! (boot, seq), so a counter that restarts after a reboot is never taken for
//! a redelivery. Without it the gateway infers restarts from the timestamps.
//! The same shape is used in CBOR with text keys.

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

use crate::{EncodeError, Sample};

/// Metric values of one sample, in the order the device sent them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics(pub Vec<(String, f64)>);

impl Serialize for Metrics {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Metrics {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MetricsVisitor;
        impl<'de> Visitor<'de> for MetricsVisitor {
            type Value = Metrics;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of metric names to numbers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metrics, A::Error> {
                // The length comes from the payload: never trust it for an
                // allocation (a CBOR header may claim 2^64 entries).
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4).min(256));
                while let Some((name, value)) = map.next_entry::<String, f64>()? {
                    out.push((name, value));
                }
                Ok(Metrics(out))
            }
        }
        deserializer.deserialize_map(MetricsVisitor)
    }
}

/// One sample inside a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeSample {
    pub ts: i64,
    pub m: Metrics,
}

/// A native message: either one sample (`ts` + `m`) or a batch (`samples`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeMessage {
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<Metrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<NativeSample>>,
}

impl NativeMessage {
    /// One-sample form when there is one sample, batch form otherwise.
    pub fn from_samples(seq: u64, samples: &[Sample]) -> NativeMessage {
        if let [one] = samples {
            NativeMessage {
                seq,
                boot: None,
                ts: Some(one.ts_ms),
                m: Some(Metrics(one.metrics.clone())),
                samples: None,
            }
        } else {
            NativeMessage {
                seq,
                boot: None,
                ts: None,
                m: None,
                samples: Some(
                    samples
                        .iter()
                        .map(|s| NativeSample {
                            ts: s.ts_ms,
                            m: Metrics(s.metrics.clone()),
                        })
                        .collect(),
                ),
            }
        }
    }
}

/// Encodes as JSON.
///
/// # Errors
/// The serializer's error (none is expected for plain numbers and strings).
pub fn encode_json(message: &NativeMessage) -> Result<Vec<u8>, EncodeError> {
    Ok(serde_json::to_vec(message)?)
}

/// Encodes as CBOR with text keys.
///
/// # Errors
/// The serializer's error (none is expected for plain numbers and strings).
pub fn encode_cbor(message: &NativeMessage) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    ciborium::into_writer(message, &mut out).map_err(|e| EncodeError::Cbor(e.to_string()))?;
    Ok(out)
}
