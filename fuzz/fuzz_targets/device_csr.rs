//! A device's CSR as a station sends it: the self-signature is checked and the key's type
//! read from its SubjectPublicKeyInfo. Whatever is accepted must be a key keyfab can
//! certify: its SubjectPublicKeyInfo is the CSR's, byte for byte.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = keyfab_crypto::x509::read_device_csr(data) {
        let spki = key.spki_der();
        assert!(
            data.windows(spki.len()).any(|w| w == spki.as_slice()),
            "the key certified is not the CSR's"
        );
    }
});
