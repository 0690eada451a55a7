//! The .kfi verifier on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let root = common::root();
    let _ = keyfab_formats::identity::verify_identity(data, &root, common::NOW);
});
