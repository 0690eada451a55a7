//! A chip's certificate chain as a station sends it (PEM or DER, read by
//! `read_chip_chain`), checked against a root that is fuzzed too: the input is a 2-byte
//! big-endian length and the root's DER, then the chain's bytes. Never a panic; what
//! verifies is a leaf with facts inside the chain's bounds.
#![no_main]
use keyfab_crypto::x509::chip::{read_chip_chain, verify_chip_chain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let Some((root, sent)) = rest.split_at_checked(usize::from(u16::from_be_bytes(*len))) else {
        return;
    };
    let Ok(chain) = read_chip_chain(sent) else {
        return;
    };
    assert!((1..=keyfab_crypto::x509::chip::MAX_CHIP_CHAIN).contains(&chain.len()));
    if let Ok(leaf) = verify_chip_chain(&chain, &[root]) {
        assert!(leaf.key_id.starts_with("spki-sha256:"));
        assert!(leaf.not_before <= leaf.not_after);
    }
});
