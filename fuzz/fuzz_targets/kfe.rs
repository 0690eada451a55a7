//! The .kfe verifier on arbitrary bytes: it must refuse cleanly, never panic or hang.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let root = common::root();
    let fp = keyfab_crypto::hash::Fingerprint([0u8; 32]);
    let _ = keyfab_formats::entitlement::verify_entitlement(data, &root, common::NOW, "vector-site", &[fp]);
});
