//! The policy parser on arbitrary text; whatever it accepts must also validate, and every
//! certificate profile it accepts must encode (HQ and the site build them from a valid
//! policy and never expect a refusal there).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(draft) = keyfab_policy::PolicyDraft::parse(text) {
            let n = draft.approver_paths().len();
            if let Ok(policy) = draft.finish(vec!["key".into(); n]) {
                assert!(policy.validate().is_ok());
                let values = keyfab_policy::certificate::TemplateValues {
                    product: &policy.product,
                    site: "site-1",
                    entitlement: "00112233445566778899aabbccddeeff",
                };
                for key in &policy.keys {
                    if let Some(t) = &key.certificate {
                        let profile = keyfab_formats::device_profile::device_profile(t, &values);
                        assert!(profile.is_ok(), "{t:?}: {profile:?}");
                    }
                }
            }
        }
    }
});
