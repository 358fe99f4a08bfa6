//! The full decode entry point: sniffing, every family and encoding, with
//! and without an MQTT 5 content type.
#![no_main]
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 5] = [
    None,
    Some("application/senml+json"),
    Some("application/senml+cbor"),
    Some("application/json"),
    Some("application/cbor"),
];

fuzz_target!(|data: &[u8]| {
    let (selector, payload) = data.split_first().map_or((0, data), |(s, rest)| (*s, rest));
    let content_type = TYPES[selector as usize % TYPES.len()];
    let _ = edge_gateway::decode::decode(payload, content_type, 1_700_000_000_000_000);
});
