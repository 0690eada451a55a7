//! `keyfab demo` runs the whole journey and shows each refusal it promises.

#[test]
fn demo_runs_the_journey_with_its_refusals() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .args(["--json", "demo", "--devices", "50"])
        .env_remove("KEYFAB_PASSPHRASE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = j["steps"].as_array().unwrap();
    let find = |prefix: &str| {
        steps
            .iter()
            .find(|s| s["step"].as_str().unwrap().starts_with(prefix))
            .unwrap()
    };
    assert_eq!(find("13.")["result"]["code"], "replayed");
    assert_eq!(find("16.")["result"]["results"][0]["activated"], true);
    assert_eq!(find("19.")["result"]["programmed"], 4);
    assert_eq!(find("20.")["result"]["code"], "chip_key_mismatch");
    assert_eq!(find("21.")["result"]["confirmed"]["result"], "failed");
    assert_eq!(find("21.")["result"]["retry_refused"], true);
    assert_eq!(find("22.")["result"]["code"], "daily_limit_exceeded");
    assert_eq!(find("23.")["result"]["stopped"], true);
    assert!(find("24.")["result"]["records"].as_u64().unwrap() >= 15);
    assert_eq!(
        find("26.")["result"]["violations"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let main = find("28.")["result"]["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["product"] == "thermostat-v2")
        .unwrap()
        .clone();
    assert_eq!(main["today"], 5);
    assert_eq!(main["confirmed"], 4);
    assert_eq!(main["burned"], 1);
    assert_eq!(main["refusals"]["daily_limit_exceeded"], 1);
    assert_eq!(main["refusals"]["chip_key_mismatch"], 1);
}

#[test]
fn demo_refuses_a_directory_that_is_not_empty_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let out = crate::common::keyfab(&["demo", "--dir", dir.path().to_str().unwrap()], None);
    out.assert_error(1, "invalid_input", "not empty");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
}
