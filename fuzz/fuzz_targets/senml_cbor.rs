//! The senml decoder on Cbor input, directly (no sniffing in front).
#![no_main]
use edge_gateway::decode::Encoding;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_gateway::decode::senml::decode(data, Encoding::Cbor, 1_700_000_000_000_000, &Default::default());
});
