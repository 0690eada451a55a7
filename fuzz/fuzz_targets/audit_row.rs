//! Stored audit rows on arbitrary bytes: unpacking refuses what it cannot read (no panic,
//! no allocation beyond the row bound), and a row that unpacks splits or is refused.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(framed) = keyfab_audit::unpack_row(data) {
        assert!(framed.len() <= keyfab_audit::MAX_ROW_BYTES.max(data.len()));
        if let Ok(records) = keyfab_audit::split_row(&framed) {
            let mut again = Vec::new();
            for r in &records {
                keyfab_audit::frame_into(&mut again, r);
            }
            assert_eq!(again, framed.as_ref(), "framing does not round-trip");
            let packed = keyfab_audit::pack_row(&framed);
            assert_eq!(
                keyfab_audit::unpack_row(&packed).ok().as_deref(),
                Some(framed.as_ref()),
                "packing does not round-trip"
            );
        }
    }
});
