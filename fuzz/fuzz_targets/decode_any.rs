//! The full decode entry point: sniffing, every family and encoding, with
//! and without an MQTT 5 content type, under limits drawn from the input.
//! Whatever decodes must respect every limit it was given.
#![no_main]
use edge_gateway::decode::{decode_limited, decoded_size, Limits};
use edge_gateway::model::Value;
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 5] = [
    None,
    Some("application/senml+json"),
    Some("application/senml+cbor"),
    Some("application/json"),
    Some("application/cbor"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&[selector, a, b, c], payload)) = data.split_first_chunk::<4>() else {
        return;
    };
    let content_type = TYPES[selector as usize % TYPES.len()];
    // Small limits half of the time, so the fuzzer reaches every breach.
    let limits = if selector & 0x80 == 0 {
        Limits::default()
    } else {
        Limits {
            max_metric_bytes: 1 + a as usize % 32,
            max_unit_bytes: 1 + b as usize % 8,
            max_string_bytes: 1 + c as usize % 64,
            max_data_bytes: 1 + c as usize % 64,
            max_records: 1 + a as usize % 16,
            max_decoded_bytes: 64 + (b as usize) * 16,
            ..Limits::default()
        }
    };
    let Ok(decoded) = decode_limited(payload, content_type, 1_700_000_000_000_000, &limits) else {
        return;
    };
    assert!(decoded.readings.len() <= limits.max_records);
    let total: usize = decoded.readings.iter().map(decoded_size).sum();
    assert!(total <= limits.max_decoded_bytes);
    for r in &decoded.readings {
        assert!(r.metric.len() <= limits.max_metric_bytes);
        assert!(!r.metric.chars().any(char::is_control));
        if let Some(u) = &r.unit {
            assert!(u.len() <= limits.max_unit_bytes && !u.chars().any(char::is_control));
        }
        match &r.value {
            Value::Text(s) => {
                assert!(s.len() <= limits.max_string_bytes && !s.chars().any(char::is_control))
            }
            Value::Data(d) => assert!(d.len() <= limits.max_data_bytes),
            Value::Number(v) => assert!(v.is_finite()),
            _ => {}
        }
    }
});
