//! Policy modules end to end: the example policies decide at a real site exactly as their
//! cases say and HQ's replay agrees; failing modules deny with `policy_error` and release
//! nothing; bad or tampered modules are refused; HQ flags a log its replay contradicts.

use crate::common::*;
use keyfab_audit::Event;
use keyfab_site::provision::{Programming, ProvisionRequest, Provisioner};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies")
}

fn rfc3339(t: i64) -> String {
    jiff::Timestamp::from_second(t).unwrap().to_string()
}

/// `example`'s policy.toml and module copied into the world, valid from a day ago.
fn example_policy(w: &World, example: &str) -> PathBuf {
    let from = examples().join(example);
    let dir = w.path(example);
    std::fs::create_dir_all(&dir).unwrap();
    let now = jiff::Timestamp::now().as_second();
    let mut policy = String::new();
    for line in std::fs::read_to_string(from.join("policy.toml"))
        .unwrap()
        .lines()
    {
        let line = if line.starts_with("valid_from") {
            format!("valid_from = \"{}\"", rfc3339(now - 86_400))
        } else if line.starts_with("valid_until") {
            format!("valid_until = \"{}\"", rfc3339(now + 400 * 86_400))
        } else {
            line.to_owned()
        };
        policy.push_str(&line);
        policy.push('\n');
    }
    for entry in std::fs::read_dir(&from).unwrap() {
        let p = entry.unwrap().path();
        if matches!(p.extension().and_then(|e| e.to_str()), Some("wasm" | "wat")) {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    path
}

/// Exports the site's log and imports it at HQ, both at `at`: HQ's import report.
fn export_and_reconcile(w: &World, name: &str, at: i64) -> serde_json::Value {
    let when = rfc3339(at);
    let file = w.path(name);
    let o = keyfab(
        &[
            "site",
            "audit",
            "export",
            "--home",
            &s(&w.site),
            "--out",
            &s(&file),
        ],
        Some(&when),
    );
    assert_eq!(o.code, 0, "export: {}", o.json);
    let o = keyfab(
        &["hq", "audit", "import", "--home", &s(&w.hq), &s(&file)],
        Some(&when),
    );
    assert_eq!(o.code, 0, "HQ import: {}", o.json);
    o.json
}

/// Runs `example`'s cases.json against a real site, shifted by whole days so they lie
/// after both this run's clock and `after`, and returns the time of the last case.
fn run_cases_at_site(
    w: &World,
    example: &str,
    id: &str,
    device_format: fn(u64) -> String,
    after: i64,
) -> i64 {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(examples().join(example).join("cases.json")).unwrap(),
    )
    .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    let at = |c: &serde_json::Value| -> i64 {
        c["at"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_second()
    };
    let now = jiff::Timestamp::now().as_second().max(after);
    let shift = ((now - at(&cases[0])).div_euclid(86_400) + 2) * 86_400;

    let clock = TestClock(Arc::new(AtomicI64::new(now)));
    let node = site_with_clock(&w.site, &clock);
    // The cases move the clock days on at a time: a drill, which the site adopts only
    // once told to.
    let jump = &keyfab_site::settings::CLOCK_MAX_JUMP;
    jump.set(&node, jump.max).unwrap();
    keyfab_site::entitlements::import(&node, &w.path(&format!("{example}.kfe")), None).unwrap();
    let site = Provisioner::start(Arc::new(node));
    let mut n = 0u64;
    // Devices given keys, with the station that received them: only it may confirm.
    let mut allowed: Vec<(String, Option<String>)> = Vec::new();
    let mut last = now;
    for (i, case) in cases.iter().enumerate() {
        last = at(case) + shift;
        clock.0.store(last, Ordering::SeqCst);
        let repeat = case["repeat"].as_u64().unwrap_or(1);
        let station = case["station"].as_str().map(str::to_owned);
        if case["confirm"] == "failed" {
            for _ in 0..repeat {
                let (device, received_by) = allowed.pop().expect("a device to report failed");
                site.confirm(
                    &id.parse().unwrap(),
                    &device.parse().unwrap(),
                    Programming::Failed,
                    received_by.map(|s: String| s.parse().unwrap()),
                )
                .unwrap();
            }
            continue;
        }
        let expect = case["expect"].as_str().unwrap();
        for run in 1..=repeat {
            n += 1;
            let device = device_format(n);
            let got = site.provision(ProvisionRequest {
                station: station.as_deref().map(|s| s.parse().unwrap()),
                ..ProvisionRequest::parse(id, &device, format!("r-{n}")).unwrap()
            });
            let (code, message) = match &got {
                Ok(_) => ("allow", String::new()),
                Err(e) => (e.code().as_str(), e.to_string()),
            };
            assert_eq!(
                code,
                expect,
                "{example} case {} run {run} at the site: {message}",
                i + 1
            );
            if let Some(reason) = case["reason"].as_str() {
                assert!(message.contains(reason), "{message} lacks '{reason}'");
            }
            if got.is_ok() {
                allowed.push((device, station.clone()));
            }
        }
    }
    drop(site);
    last
}

#[test]
fn the_example_policies_decide_as_their_cases_say_at_the_site_and_in_hq_replay() {
    let w = world();
    let mut last = 0;
    for (example, format) in [
        (
            "shift-limit",
            (|n| format!("TSV2-{n:08}")) as fn(u64) -> String,
        ),
        ("failure-pause", |n| format!("FP-{n}")),
    ] {
        let (_, id) = create_from(
            &w,
            "shenzhen-1",
            &example_policy(&w, example),
            &format!("{example}.kfe"),
        );
        last = run_cases_at_site(&w, example, &id, format, last);
        let report = export_and_reconcile(&w, &format!("{example}.kfa"), last + 60);
        assert_eq!(
            report["violations"].as_array().unwrap().len(),
            0,
            "HQ's replay of {example} agrees with the site: {report}"
        );
        let refusals = &report["entitlements"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{report}"))["refusals"];
        let expected = if example == "shift-limit" { 2 } else { 3 };
        assert_eq!(refusals["policy_denied"], expected, "{report}");
    }
}

const HEADER: &str = r#"product = "p"
devices = 10
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"
[[keys]]
name = "k"
type = "ed25519"
source = "site"
[code]
module = "rules.wat"
"#;

/// A policy whose module is `wat`, in its own directory of the world.
fn policy_with_module(w: &World, name: &str, wat: &str) -> PathBuf {
    let dir = w.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rules.wat"), wat).unwrap();
    std::fs::write(dir.join("policy.toml"), HEADER).unwrap();
    dir.join("policy.toml")
}

#[test]
fn a_module_that_fails_denies_with_policy_error_and_releases_nothing() {
    let w = world();
    let failing = [
        (
            "loops",
            "(loop $l (br $l)) (i32.const 0)",
            "ran out of fuel",
        ),
        (
            "grows",
            "(loop $l (drop (memory.grow (i32.const 1))) (br $l)) (i32.const 0)",
            "grow memory",
        ),
        ("traps", "unreachable", "unreachable"),
    ];
    let mut ids = Vec::new();
    for (name, body, _) in failing {
        let wat = format!(
            r#"(module (memory (export "memory") 1) (func (export "decide") (result i32) {body}))"#
        );
        let (file, id) = create_from(
            &w,
            "shenzhen-1",
            &policy_with_module(&w, name, &wat),
            &format!("{name}.kfe"),
        );
        assert_eq!(import(&w.site, &file, None).code, 0);
        ids.push(id);
    }
    for ((name, _, why), id) in failing.iter().zip(&ids) {
        let started = std::time::Instant::now();
        let o = provision(&w, id, "D-1", &[], None);
        assert_eq!(o.code, 3, "{name}: {}", o.json);
        assert_eq!(o.json["error"]["code"], "policy_error", "{name}");
        let message = o.json["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{name}: {message}");
        // Fuel, not a watchdog, stops it: well within any station's timeout.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
    let node = open_site(&w.site);
    for id in &ids {
        let c = keyfab_site::provision::counters(&node, id).unwrap();
        assert_eq!(c.total, 0, "nothing was released");
        assert!(c.code.state.is_empty());
    }
    let records = keyfab_site::entitlements::audit_records(&node).unwrap();
    let refused: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::ProvisionDeniedByCode { code, reason, .. } => Some((code, reason)),
            Event::ProvisionAllowed { .. } => panic!("a failing module released keys"),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 3, "each refusal is in the audit log");
    assert!(refused.iter().all(|(code, _)| *code == "policy_error"));
    drop(node);
    let report = export_and_reconcile(&w, "failing.kfa", jiff::Timestamp::now().as_second());
    assert_eq!(
        report["violations"].as_array().unwrap().len(),
        0,
        "HQ's replay fails the same way: {report}"
    );
}

#[test]
fn modules_outside_the_contract_are_refused_at_create_naming_the_problem() {
    let w = world();
    for (name, wat, named) in [
        (
            "wasi",
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
               (memory (export "memory") 1) (func (export "decide") (result i32) (i32.const 0)))"#,
            "wasi_snapshot_preview1.fd_write",
        ),
        (
            "floats",
            r#"(module (memory (export "memory") 1)
               (func (export "decide") (result i32) (i32.trunc_f32_s (f32.const 1.5))))"#,
            "float",
        ),
        (
            "no-decide",
            r#"(module (memory (export "memory") 1) (func (export "allow") (result i32) (i32.const 0)))"#,
            "decide",
        ),
        ("not-wat", "(module", "WAT"),
    ] {
        let policy = policy_with_module(&w, name, wat);
        let out = w.path(&format!("{name}.kfe"));
        let o = try_create(&w, "shenzhen-1", &policy, &out);
        assert_ne!(o.code, 0, "{name}");
        let message = o.json["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("code.module") && message.contains(named),
            "{name}: {message}"
        );
        assert!(!out.exists(), "{name}: nothing written");
    }
}

#[test]
fn a_tampered_module_inside_an_entitlement_is_refused() {
    let w = world();
    let wat = r#"(module (memory (export "memory") 1) (func (export "decide") (result i32) (i32.const 0)))"#;
    let (file, _) = create_from(
        &w,
        "shenzhen-1",
        &policy_with_module(&w, "allow", wat),
        "allow.kfe",
    );
    let bytes = std::fs::read(&file).unwrap();
    let before = snapshot(&w.site);
    // The module travels in the encrypted, signed content: a change anywhere is refused.
    for at in [
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() * 2 / 3,
        bytes.len() - 1,
    ] {
        let mut tampered = bytes.clone();
        tampered[at] ^= 0x01;
        let bad = w.path("tampered.kfe");
        std::fs::write(&bad, &tampered).unwrap();
        let o = import(&w.site, &bad, None);
        assert_eq!(o.code, 4, "byte {at}: {}", o.json);
        assert!(
            matches!(
                o.json["error"]["code"].as_str(),
                Some("bad_signature" | "malformed")
            ),
            "byte {at}: {}",
            o.json
        );
        assert_eq!(snapshot(&w.site), before, "byte {at}: nothing changed");
    }
    assert_eq!(import(&w.site, &file, None).code, 0, "the original imports");
    let listed = ok(&["site", "entitlement", "list", "--home", &s(&w.site)]);
    let code = &listed["entitlements"][0]["policy"]["code"];
    assert_eq!(code["name"], "rules.wat");
    assert_eq!(code["sha256"].as_str().map(str::len), Some(64));
    assert!(code["bytes"].as_u64().unwrap() > 8, "{listed}");
}

#[test]
fn hq_flags_a_log_whose_decisions_its_replay_contradicts() {
    let w = world();
    // Devices whose id ends in 0 are refused with "even"; every other is allowed.
    let wat = r#"(module
  (import "keyfab" "device_id" (func $dev (param i32 i32) (result i32)))
  (import "keyfab" "deny_reason" (func $reason (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "ends in 0")
  (func (export "decide") (result i32)
    (local $n i32)
    (local.set $n (call $dev (i32.const 0) (i32.const 128)))
    (if (i32.eq (i32.load8_u (i32.sub (local.get $n) (i32.const 1))) (i32.const 48))
      (then (drop (call $reason (i32.const 200) (i32.const 9))) (return (i32.const 1))))
    (i32.const 0)))"#;
    let (file, id) = create_from(
        &w,
        "shenzhen-1",
        &policy_with_module(&w, "even", wat),
        "even.kfe",
    );
    assert_eq!(import(&w.site, &file, None).code, 0);
    let site = open_site(&w.site);
    let now = jiff::Timestamp::now().as_second();
    let allowed = |device: &str| forged_release(&id, device);
    let by_code = |device: &str, code: &str, reason: &str| Event::ProvisionDeniedByCode {
        entitlement: id.clone(),
        request_id: format!("r-{device}"),
        device_id: device.into(),
        station: None,
        code: code.into(),
        reason: reason.into(),
    };
    let events = [
        Event::EntitlementImported {
            entitlement: id.clone(),
            sequence: 1,
            pool_keys: 0,
        },
        allowed("D-1"),                                // honest
        by_code("D-10", "policy_denied", "ends in 0"), // honest
        allowed("D-20"),                               // the module refuses it
        by_code("D-3", "policy_denied", "ends in 0"),  // the module allows it
        by_code("D-40", "policy_denied", "invented"),  // refused, for another reason
    ];
    let out = w.path("lies.kfa");
    let timed = events.into_iter().map(|e| (now, e)).collect();
    write_forged_log(&site, timed, &"e".repeat(32), &out);
    drop(site);
    let o = keyfab(
        &["hq", "audit", "import", "--home", &s(&w.hq), &s(&out)],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.json);
    let found: Vec<(String, String)> = o.json["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["device_id"].as_str().unwrap_or("").to_owned(),
                v["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("D-20", "policy_denied"),
        ("D-3", "denied_but_allowed"),
        ("D-40", "code_replay_differs"),
    ]
    .iter()
    .map(|(d, k)| (d.to_string(), k.to_string()))
    .collect();
    assert_eq!(found, expected, "{}", o.json);
}

/// `keyfab policy test --module MODULE --cases CASES`.
fn policy_test(module: &Path, cases: &Path) -> Out {
    keyfab(
        &[
            "policy",
            "test",
            "--module",
            &s(module),
            "--cases",
            &s(cases),
        ],
        None,
    )
}

#[test]
fn policy_test_runs_the_examples_cases_and_names_a_case_that_fails() {
    for (module, cases) in [
        ("shift-limit/shift-limit.wasm", "shift-limit/cases.json"),
        ("failure-pause/rules.wat", "failure-pause/cases.json"),
    ] {
        let o = policy_test(&examples().join(module), &examples().join(cases));
        assert_eq!(o.code, 0, "{module}: {}", o.json);
        assert_eq!(o.json["failed"], 0);
        assert!(o.json["cases"].as_array().unwrap().len() >= 6);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(examples().join("shift-limit/cases.json")).unwrap(),
    )
    .unwrap();
    cases["cases"][0]["repeat"] = 501.into();
    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, cases.to_string()).unwrap();
    let o = policy_test(&examples().join("shift-limit/shift-limit.wasm"), &wrong);
    assert_eq!(o.code, 1);
    assert_eq!(o.json["error"]["code"], "policy_test_failed");
    let message = o.json["error"]["message"].as_str().unwrap();
    assert!(
        message
            .contains("FAIL  a full early shift ×501: expected allow, run 501 gave policy_denied"),
        "{message}"
    );
    std::fs::write(
        &wrong,
        "{\"cases\": [{\"at\": \"yesterday\", \"expect\": \"allow\"}]}",
    )
    .unwrap();
    let o = policy_test(&examples().join("shift-limit/shift-limit.wasm"), &wrong);
    assert_eq!(o.json["error"]["code"], "malformed", "{}", o.json);
}
