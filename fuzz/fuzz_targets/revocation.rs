//! The revocation verifier on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let root = common::root();
    let fp = keyfab_crypto::hash::Fingerprint([0u8; 32]);
    let _ = keyfab_formats::revocation::verify_revocation(data, &root, common::NOW, "vector-site", &[fp]);
});
