//! A chip opening a package: arbitrary encapsulated keys and ciphertexts never open
//! (and never panic).
#![no_main]
use keyfab_crypto::hpke::HpkeSecretKey;
use keyfab_formats::chip::{open_keys, Binding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(chip) = HpkeSecretKey::from_bytes(&[7u8; 32]) else {
        return;
    };
    let binding = Binding {
        site: "vector-site",
        entitlement: "e1",
        device_id: "D-1",
    };
    let (enc, rest) = data.split_at(data.len().min(65));
    let (first, second) = rest.split_at(rest.len() / 2);
    let sealed: [(&str, &[u8]); 2] = [("identity", first), ("firmware", second)];
    assert!(open_keys(&chip, &binding, enc, &sealed).is_err());
});
