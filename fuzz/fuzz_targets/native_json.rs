//! The native decoder on Json input, directly (no sniffing in front).
#![no_main]
use edge_gateway::decode::Encoding;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_gateway::decode::native::decode(data, Encoding::Json, &Default::default());
});
