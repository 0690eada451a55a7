//! Audit records on arbitrary bytes: the strict decoder accepts exactly the canonical
//! encoding, and agrees with the generic serde decoder on it.
#![no_main]
use keyfab_audit::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let strict = Record::from_bytes(data);
    if let Ok(r) = &strict {
        assert_eq!(r.to_bytes(), data, "decoded bytes are not canonical");
    }
    let generic: Result<Record, _> = ciborium::from_reader(data);
    if let Ok(g) = generic {
        // The generic decoder knows no lengths: a hash must also be 32 bytes.
        if g.to_bytes() == data && g.prev_hash.len() == 32 {
            assert_eq!(strict.as_ref().ok(), Some(&g), "canonical record refused");
        }
    }
});
