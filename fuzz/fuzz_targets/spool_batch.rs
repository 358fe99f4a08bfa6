//! Spool records read back after a crash: decoding arbitrary bytes never
//! panics, and whatever decodes re-encodes to the same bytes.
#![no_main]
use edge_gateway::sink::SealedBatch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(batch) = SealedBatch::decode(data) {
        let again = batch.encode();
        assert_eq!(SealedBatch::decode(&again), Some(batch));
    }
});
