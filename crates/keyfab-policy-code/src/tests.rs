use super::*;

fn module(wat: &str) -> Result<PolicyModule, ModuleError> {
    PolicyModule::load(&wat::parse_str(wat).expect("test WAT parses"))
}

fn request(facts: Facts) -> Request<'static> {
    Request {
        device_id: "TSV2-00000001",
        station: Some("line-1"),
        facts,
    }
}

const HEAD: &str = r#"
  (import "keyfab" "input" (func $input (param i32) (result i64)))
  (import "keyfab" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "keyfab" "state_set" (func $set (param i32 i32 i32 i32) (result i32)))
  (import "keyfab" "deny_reason" (func $reason (param i32 i32) (result i32)))
  (memory (export "memory") 1)
"#;

/// Denies the fourth device of a day, counting in its own state; says why.
fn day_limit() -> PolicyModule {
    module(&format!(
        r#"(module {HEAD}
  (data (i32.const 0) "n")
  (data (i32.const 16) "three a day")
  (func (export "decide") (result i32)
    (local $n i32)
    (if (i32.eq (call $get (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 4)) (i32.const 4))
      (then (local.set $n (i32.load (i32.const 8)))))
    (if (i32.ge_u (local.get $n) (i32.const 3))
      (then (drop (call $reason (i32.const 16) (i32.const 11))) (return (i32.const 1))))
    (i32.store (i32.const 8) (i32.add (local.get $n) (i32.const 1)))
    (drop (call $set (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 4)))
    (i32.const 0)))"#
    ))
    .expect("valid module")
}

#[test]
fn a_module_decides_and_its_state_carries_to_the_next_decision() {
    let m = day_limit();
    let mut state = ModuleState::default();
    for _ in 0..3 {
        let e = m.evaluate(&request(Facts::default()), &mut state);
        assert_eq!(e.verdict, Verdict::Allow);
        assert!(e.fuel_used > 0 && e.fuel_used < 1_000);
    }
    assert_eq!(state.get("n"), Some(&3u32.to_le_bytes()[..]));
    let e = m.evaluate(&request(Facts::default()), &mut state);
    assert_eq!(
        e.verdict,
        Verdict::Deny {
            reason: "three a day".into()
        }
    );
    // The same inputs give the same verdict and state: what HQ relies on to replay.
    let mut replay = ModuleState::default();
    for _ in 0..4 {
        m.evaluate(&request(Facts::default()), &mut replay);
    }
    assert_eq!(replay, state);
}

#[test]
fn inputs_and_strings_reach_the_module() {
    let m = module(
        r#"(module
  (import "keyfab" "input" (func $input (param i32) (result i64)))
  (import "keyfab" "device_id" (func $dev (param i32 i32) (result i32)))
  (import "keyfab" "station" (func $station (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "decide") (result i32)
    ;; deny unless today == 7, the device id is 13 bytes starting with 'T' and there is
    ;; no station
    (if (i64.ne (call $input (i32.const 4)) (i64.const 7)) (then (return (i32.const 1))))
    (if (i32.ne (call $dev (i32.const 0) (i32.const 64)) (i32.const 13)) (then (return (i32.const 1))))
    (if (i32.ne (i32.load8_u (i32.const 0)) (i32.const 84)) (then (return (i32.const 1))))
    (if (i32.ne (call $station (i32.const 100) (i32.const 8)) (i32.const -1)) (then (return (i32.const 1))))
    (i32.const 0)))"#,
    )
    .expect("valid");
    let facts = Facts {
        today: 7,
        ..Facts::default()
    };
    let mut state = ModuleState::default();
    let mut req = request(facts);
    assert!(matches!(
        m.evaluate(&req, &mut state).verdict,
        Verdict::Deny { .. }
    ));
    req.station = None;
    assert_eq!(m.evaluate(&req, &mut state).verdict, Verdict::Allow);
    req.facts.today = 8;
    assert!(matches!(
        m.evaluate(&req, &mut state).verdict,
        Verdict::Deny { .. }
    ));
}

fn error_of(m: &PolicyModule) -> String {
    let mut state = ModuleState::default();
    match m.evaluate(&request(Facts::default()), &mut state).verdict {
        Verdict::Error { reason } => reason,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn a_module_that_loops_forever_runs_out_of_fuel() {
    let m = module(
        r#"(module (memory (export "memory") 1)
  (func (export "decide") (result i32) (loop $l (br $l)) (i32.const 0)))"#,
    )
    .expect("valid");
    let started = std::time::Instant::now();
    assert!(error_of(&m).contains("fuel"), "{}", error_of(&m));
    // Not a timing assertion of speed, a sanity bound: fuel stops it, not a watchdog.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn a_module_that_allocates_without_bound_hits_the_memory_limit() {
    let m = module(
        r#"(module (memory (export "memory") 1)
  (func (export "decide") (result i32)
    (loop $l (drop (memory.grow (i32.const 1))) (br $l)) (i32.const 0)))"#,
    )
    .expect("valid");
    assert!(error_of(&m).contains("memory"), "{}", error_of(&m));
}

#[test]
fn a_trap_undoes_the_state_the_module_wrote() {
    let m = module(&format!(
        r#"(module {HEAD}
  (data (i32.const 0) "k")
  (func (export "decide") (result i32)
    (drop (call $set (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1)))
    unreachable))"#
    ))
    .expect("valid");
    let mut state = ModuleState::default();
    state.write("before", Some(b"1")).expect("small");
    let before = state.clone().into_committed();
    let e = m.evaluate(&request(Facts::default()), &mut state);
    assert!(matches!(e.verdict, Verdict::Error { ref reason } if reason.contains("unreachable")));
    assert_eq!(state, before);
}

#[test]
fn misuse_of_the_host_api_fails_closed() {
    for body in [
        // unknown input id
        "(drop (call $input (i32.const 99))) (i32.const 0)",
        // a pointer past the end of memory
        "(drop (call $set (i32.const 70000) (i32.const 1) (i32.const 0) (i32.const 1))) (i32.const 0)",
        // a value longer than the bound
        "(drop (call $set (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 300))) (i32.const 0)",
        // an empty key
        "(drop (call $set (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1))) (i32.const 0)",
        // a verdict that is neither 0 nor 1
        "(i32.const 2)",
    ] {
        let m = module(&format!(
            r#"(module {HEAD} (data (i32.const 0) "k") (func (export "decide") (result i32) {body}))"#
        ))
        .expect("valid");
        let mut state = ModuleState::default();
        let e = m.evaluate(&request(Facts::default()), &mut state);
        assert!(matches!(e.verdict, Verdict::Error { .. }), "{body}: {e:?}");
        assert!(state.is_empty());
    }
}

#[test]
fn the_state_is_bounded() {
    // 65 distinct one-byte keys: the 65th write fails.
    let m = module(&format!(
        r#"(module {HEAD}
  (func (export "decide") (result i32)
    (local $i i32)
    (loop $l
      (i32.store8 (i32.const 0) (i32.add (i32.const 48) (local.get $i)))
      (drop (call $set (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 65))))
    (i32.const 0)))"#
    ))
    .expect("valid");
    assert!(error_of(&m).contains("state entries"), "{}", error_of(&m));
}

#[test]
fn modules_outside_the_contract_are_refused_naming_the_problem() {
    let cases = [
        (
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
               (memory (export "memory") 1) (func (export "decide") (result i32) (i32.const 0)))"#,
            "wasi_snapshot_preview1.fd_write",
        ),
        (
            r#"(module (import "keyfab" "clock" (func (result i64)))
               (memory (export "memory") 1) (func (export "decide") (result i32) (i32.const 0)))"#,
            "keyfab.clock",
        ),
        (
            r#"(module (import "keyfab" "input" (func (param i64) (result i64)))
               (memory (export "memory") 1) (func (export "decide") (result i32) (i32.const 0)))"#,
            "input",
        ),
        (
            r#"(module (memory (export "memory") 1) (func (export "allow") (result i32) (i32.const 0)))"#,
            "does not export the function `decide",
        ),
        (
            r#"(module (func (export "decide") (result i32) (i32.const 0)))"#,
            "memory",
        ),
        (
            r#"(module (memory (export "memory") 1) (func (export "decide") (param i32) (result i32) (i32.const 0)))"#,
            "() -> i32",
        ),
        (
            r#"(module (memory (export "memory") 1)
               (func (export "decide") (result i32) (i32.trunc_f32_s (f32.const 1.5))))"#,
            "float",
        ),
        (
            r#"(module (memory (export "memory") 1) (func $s) (start $s)
               (func (export "decide") (result i32) (i32.const 0)))"#,
            "start",
        ),
        (
            r#"(module (memory (export "memory") 17) (func (export "decide") (result i32) (i32.const 0)))"#,
            "",
        ),
    ];
    for (wat, named) in cases {
        let err = module(wat).expect_err(wat).to_string();
        assert!(
            err.to_lowercase().contains(&named.to_lowercase()),
            "{wat}\n→ {err}"
        );
    }
    assert!(matches!(
        PolicyModule::load(b"\0asm garbage"),
        Err(ModuleError::Invalid(_))
    ));
    assert!(matches!(
        PolicyModule::load(&vec![0; MAX_MODULE_BYTES + 1]),
        Err(ModuleError::TooLarge(_))
    ));
}
