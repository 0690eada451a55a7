//! The embedded store's journal on arbitrary bytes (a file left by a crash, or damaged):
//! reading it never panics nor allocates beyond the entry bound, and the entries it reads
//! encode back to bytes that read the same.
#![no_main]
use keyfab_store::journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = journal::parse(data) {
        let mut again = journal::MAGIC.to_vec();
        for e in &entries {
            assert!(e.ops.iter().all(|(k, _)| !k.is_empty()), "a key without its table byte");
            journal::encode_into(
                &mut again,
                e.revision,
                e.ops.iter().map(|(k, v)| journal::OpRef {
                    table: k[0],
                    key: &k[1..],
                    value: v.as_deref(),
                }),
            );
        }
        assert_eq!(journal::parse(&again).ok(), Some(entries), "entries do not round-trip");
    }
});
