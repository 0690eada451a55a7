//! Entitlement round trip and every refusal, through the real binary. Each refusal exits
//! 4 with its own code and leaves the site's home byte for byte unchanged.

use crate::common::*;

#[test]
fn create_import_list_round_trip() {
    let w = world();
    let (kfe, id) = create(&w, "shenzhen-1", 10, "a.kfe");
    let o = import(&w.site, &kfe, None);
    assert_eq!(o.code, 0, "{}", o.json);
    let j = o.json;
    assert_eq!(j["id"], id.as_str());
    assert_eq!(j["pool_keys"], 30);
    let list = ok(&["site", "entitlement", "list", "--home", &s(&w.site)]);
    let e = &list["entitlements"][0];
    assert_eq!(e["id"], id.as_str());
    assert_eq!(e["policy"]["product"], "thermostat-v2");
    assert_eq!(e["policy"]["daily_limit"], 1);
    assert_eq!(e["policy"]["timezone"], "Asia/Shanghai");
    assert_eq!(e["keys"].as_array().unwrap().len(), 3);
    for k in e["keys"].as_array().unwrap() {
        assert_eq!(k["pool_keys"], 10, "{k}");
    }
    assert_eq!(e["state"], "active");
    let issued = ok(&["hq", "entitlement", "list", "--home", &s(&w.hq)]);
    assert_eq!(issued["entitlements"][0]["sequence"], 1);
}

fn refused(w: &World, file: &std::path::Path, code: &str, now: Option<&str>) {
    let before = snapshot(&w.site);
    let o = import(&w.site, file, now);
    assert_eq!(o.code, 4, "{}: {}", file.display(), o.json);
    assert_eq!(
        o.json["error"]["code"],
        code,
        "{}: {}",
        file.display(),
        o.json
    );
    assert_eq!(
        before,
        snapshot(&w.site),
        "site state changed after refusing {}",
        file.display()
    );
}

#[test]
fn each_defect_gets_its_own_code_and_changes_nothing() {
    let w = world();
    let (kfe, _) = create(&w, "shenzhen-1", 3, "good.kfe");
    let bytes = std::fs::read(&kfe).unwrap();

    let truncated = w.path("truncated.kfe");
    std::fs::write(&truncated, &bytes[..bytes.len() - 7]).unwrap();
    refused(&w, &truncated, "malformed", None);

    let trailing = w.path("trailing.kfe");
    std::fs::write(&trailing, [bytes.as_slice(), b"x"].concat()).unwrap();
    refused(&w, &trailing, "malformed", None);

    let mut v2 = bytes.clone();
    v2[7] = 2;
    let version_2 = w.path("version_2.kfe");
    std::fs::write(&version_2, &v2).unwrap();
    let o = import(&w.site, &version_2, None);
    assert!(
        o.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unsupported version v2"),
        "{}",
        o.json
    );

    // Addressed to another site of the same root.
    let other = node(w.dir.path(), &w.root, "site", "penang-2");
    register(w.dir.path(), &w.hq, &other);
    let (to_other, _) = create(&w, "penang-2", 3, "other.kfe");
    refused(&w, &to_other, "wrong_recipient", None);

    // An HQ under a foreign root, which registered our site's identity by other means.
    let foreign_root = root(w.dir.path(), "foreign-root");
    let foreign_hq = node(w.dir.path(), &foreign_root, "hq", "evil-hq");
    let kfi = w.path("shenzhen-1.kfi");
    let o = keyfab(
        &["hq", "site", "add", "--home", &s(&foreign_hq), &s(&kfi)],
        None,
    );
    assert_eq!(
        o.code, 4,
        "a foreign HQ must not accept our site's identity: {}",
        o.json
    );
    assert_eq!(o.json["error"]["code"], "untrusted_signer");

    // The HQ certificate has expired at the injected time.
    refused(&w, &kfe, "expired", Some("2040-01-01T00:00:00Z"));

    // The good file imports; the same file again is a replay.
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    refused(&w, &kfe, "replayed", None);

    // A lower sequence after a higher one.
    let (seq3, _) = create(&w, "shenzhen-1", 3, "seq3.kfe");
    let (seq4, _) = create(&w, "shenzhen-1", 3, "seq4.kfe");
    let _ = seq3;
    assert_eq!(import(&w.site, &seq4, None).code, 0);
    refused(&w, &w.path("seq3.kfe"), "replayed", None);
}

#[test]
fn wrong_passphrase_is_locked_exit_1() {
    let w = world();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"));
    let out = cmd
        .args([
            "--json",
            "site",
            "entitlement",
            "list",
            "--home",
            &s(&w.site),
        ])
        .env("KEYFAB_PASSPHRASE", "not the passphrase")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["error"]["code"], "locked");
}

#[test]
fn invalid_policy_is_named_and_writes_nothing() {
    let w = world();
    let bad = w.path("bad.toml");
    std::fs::write(
        &bad,
        POLICY
            .replace("{devices}", "10")
            .replace("daily = 1", "daily = 11"),
    )
    .unwrap();
    let before = snapshot(&w.hq);
    let out = w.path("never.kfe");
    let o = try_create(&w, "shenzhen-1", &bad, &out);
    assert_eq!(o.code, 1, "{}", o.json);
    assert_eq!(o.json["error"]["code"], "invalid_policy");
    assert!(
        o.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.daily"),
        "{}",
        o.json
    );
    assert!(!out.exists());
    assert_eq!(before, snapshot(&w.hq));
}

#[test]
fn hq_issues_no_entitlement_whose_window_has_ended() {
    let w = world();
    let policy = w.path("ended.toml");
    std::fs::write(
        &policy,
        std::fs::read_to_string(crate::common::policy(w.dir.path(), 5))
            .unwrap()
            .replace(
                "valid_until = \"2030-01-01T00:00:00Z\"",
                "valid_until = \"2026-02-01T00:00:00Z\"",
            ),
    )
    .unwrap();
    assert!(std::fs::read_to_string(&policy)
        .unwrap()
        .contains("2026-02-01"));
    let before = snapshot(&w.hq);
    let out = w.path("ended.kfe");
    let o = try_create(&w, "shenzhen-1", &policy, &out);
    o.assert_error(1, "invalid_policy", "valid_until");
    assert!(o.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2026-02-01T00:00:00Z"));
    assert!(!out.exists());
    assert_eq!(
        before,
        snapshot(&w.hq),
        "nothing issued, no sequence number used"
    );
}
