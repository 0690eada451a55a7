//! Receipts and checkpoints on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let root = common::root();
    let fp = keyfab_crypto::hash::Fingerprint([0u8; 32]);
    let _ = keyfab_formats::checkpoint::verify_receipt(data, &root, common::NOW, "vector-site", &[fp]);
    let _ = keyfab_formats::checkpoint::verify_checkpoint(data, &root, common::NOW);
});
