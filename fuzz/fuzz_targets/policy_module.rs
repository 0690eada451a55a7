//! The policy-module loader on arbitrary bytes: no panic; whatever loads also evaluates
//! without panicking (a verdict of any kind), and a failed evaluation leaves the state
//! as it was.
#![no_main]
use keyfab_policy_code::{Facts, ModuleState, PolicyModule, Request, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(module) = PolicyModule::load(data) {
        let mut state = ModuleState::default();
        let request = Request {
            device_id: "TSV2-00000001",
            station: Some("line-1"),
            facts: Facts::default(),
        };
        let e = module.evaluate(&request, &mut state);
        if matches!(e.verdict, Verdict::Error { .. }) {
            assert!(state.is_empty());
        }
        assert!(state.within_bounds());
    }
});
