//! The policy parser on arbitrary text; whatever it accepts must also validate.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(draft) = keyfab_policy::PolicyDraft::parse(text) {
            let n = draft.approver_paths().len();
            if let Ok(policy) = draft.finish(vec!["key".into(); n]) {
                assert!(policy.validate().is_ok());
            }
        }
    }
});
