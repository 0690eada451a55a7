//! Sealed unseal shares (`.kfs`) on arbitrary bytes: parsing refuses cleanly, and
//! opening with the holder's key gives the share only for the file sealed to it.
#![no_main]
use keyfab_crypto::hpke::HpkeSecretKey;
use keyfab_formats::sealed_share::SealedShare;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static HOLDER: OnceLock<HpkeSecretKey> = OnceLock::new();
    let holder = HOLDER.get_or_init(|| {
        HpkeSecretKey::from_bytes(include_bytes!("../../tests/vectors/sealed-share/holder.key"))
            .expect("the vector's key")
    });
    if let Ok(share) = SealedShare::parse(data) {
        assert!(!share.node.is_empty() && share.node.len() <= 128);
        if share.open(holder).is_ok() {
            // Only the committed valid file opens: anything else would be a forgery.
            assert_eq!(data, include_bytes!("../../tests/vectors/sealed-share/valid.kfs"));
        }
    }
});
