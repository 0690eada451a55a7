//! Unseal shares as typed or pasted by holders: arbitrary text never panics, and only a
//! share of this keystore is ever accepted.
#![no_main]
use keyfab_crypto::rng::SystemRng;
use keyfab_custody::unseal::{split, Unsealer};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static SPLIT: OnceLock<keyfab_custody::unseal::Split> = OnceLock::new();
    let dealt = SPLIT.get_or_init(|| split(2, 3, &SystemRng).expect("split"));
    let text = String::from_utf8_lossy(data);
    let mut unsealer = Unsealer::new(dealt.config.clone());
    if unsealer.submit(&text).is_ok() {
        assert!(dealt.shares.iter().any(|s| s.trim() == text.trim()));
    }
});
