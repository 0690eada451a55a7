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
    assert_eq!(find("12.")["result"]["code"], "replayed");
    assert_eq!(find("15.")["result"]["code"], "daily_limit_exceeded");
    assert_eq!(find("20.")["result"]["results"][0]["activated"], true);
    assert!(find("21.")["result"]["keys"][0]["certificate_pem"].is_string());
    assert!(find("22.")["result"]["records"].as_u64().unwrap() >= 10);
    assert_eq!(
        find("24.")["result"]["violations"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let main = find("26.")["result"]["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["product"] == "thermostat-v2")
        .unwrap()
        .clone();
    assert_eq!(main["today"], 3);
    assert_eq!(main["refusals"]["daily_limit_exceeded"], 1);
}
