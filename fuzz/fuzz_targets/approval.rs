//! Approval requests and approvals on arbitrary bytes: refuse cleanly; a request that
//! parses re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = keyfab_formats::approval::ApprovalRequest::from_file(data) {
        assert_eq!(r.to_file().unwrap(), data);
    }
    let key = keyfab_crypto::sign::VerifyingKey::from_pem(include_str!("../seeds/approver.pub")).unwrap();
    let _ = keyfab_formats::approval::verify_approval(data, &[key]);
});
