//! The SenML CBOR decoder (the streaming reader), directly (no sniffing in
//! front), checked against the `ciborium` path it replaced: when both take
//! a payload they must read the same readings. On malformed input they may
//! disagree on whether it is usable: ciborium takes byte strings as
//! sequences and nested indefinite-length chunks (RFC 8949 forbids them),
//! and refuses unassigned simple values and most tags (RFC 8949 allows
//! them); the fuzzer found each of those.
#![no_main]
use edge_gateway::decode::{senml, Encoding, Limits};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_700_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_records: 64, ..Limits::default() };
    let streaming = senml::decode_cbor(data, NOW, &limits);
    let reference = senml::parse(data, Encoding::Cbor, limits.max_records)
        .and_then(|records| senml::resolve(&records, NOW, &limits));
    if let (Ok(a), Ok(b)) = (&streaming, &reference) {
        assert_eq!(a, b);
    }
});
