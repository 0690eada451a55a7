//! A chip's certificate chain as a station would forward it, checked against roots that
//! are fuzzed too: `n` (1-5, from the first byte) certificates, each a 2-byte big-endian
//! length and its DER; the last one is the root, the others the chain, leaf first. Never
//! a panic; what verifies is a leaf with facts.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&count, mut rest)) = data.split_first() else {
        return;
    };
    let mut certs = Vec::new();
    for _ in 0..(count % 5 + 1) {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else {
            return;
        };
        let len = usize::from(u16::from_be_bytes(*len));
        let Some((cert, tail)) = tail.split_at_checked(len) else {
            return;
        };
        certs.push(cert.to_vec());
        rest = tail;
    }
    let Some(root) = certs.pop() else { return };
    let roots = [root];
    let trust = keyfab_crypto::x509::chip::ChipTrust {
        roots: &roots,
        accept_expired: count & 0x80 != 0,
    };
    let now = keyfab_crypto::time::UnixTime(1_800_000_000);
    if let Ok(leaf) = keyfab_crypto::x509::chip::verify_chip_chain(&certs, &trust, now) {
        assert!(!leaf.spki.is_empty());
    }
});
