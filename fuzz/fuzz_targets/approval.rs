//! Approval requests and approvals on arbitrary bytes: refuse cleanly; a request that
//! parses carries a signature that verified, and one a root must still vouch for;
//! detached approvals, as the audit log keeps them, attach to a request or are refused.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if keyfab_formats::approval::ApprovalRequest::from_file(data).is_ok() {
        // No site certificate chains to a root the fuzzer cannot sign under.
        let root = include_bytes!("../seeds/root.der");
        let now = keyfab_crypto::time::UnixTime(1_800_000_000);
        assert!(keyfab_formats::approval::verify_request(data, root, now).is_err());
    }
    let key = keyfab_crypto::sign::VerifyingKey::from_pem(include_str!("../seeds/approver.pub")).unwrap();
    let _ = keyfab_formats::approval::verify_approval(data, &[key.clone()]);
    // As HQ reads a log's detached approvals: put the request back, then verify.
    let request = include_bytes!("../seeds/approval/raise.kfq");
    if let Ok(file) = keyfab_formats::approval::attach(data, request) {
        let _ = keyfab_formats::approval::verify_approval(&file, &[key]);
    }
    if let Ok(detached) = keyfab_formats::approval::detach(data) {
        assert!(keyfab_formats::approval::detach(&detached).is_ok());
    }
});
