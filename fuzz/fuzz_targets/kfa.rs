//! The audit bundle verifier on arbitrary bytes: refuse cleanly, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let root = common::root();
    let fp = keyfab_crypto::hash::Fingerprint([0u8; 32]);
    let _ = keyfab_formats::audit_bundle::verify_bundle(data, &root, common::NOW, "vector-hq", &[fp]);
});
