//! The return path: export → import → reconcile → receipt → report → manifest, and the
//! refusals that keep HQ's view of a site honest.

use crate::common::*;

const POLICY2: &str = "product = \"p\"\ndevices = 10\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
[limits]\ndaily = 2\n\
[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\ncertificate = { subject = \"CN={device_id},O=Acme\", days = 365 }\n\
[[keys]]\nname = \"fw\"\ntype = \"aes-256\"\nsource = \"derived\"\n";

fn entitlement(w: &World, body: &str) -> String {
    let policy = w.path("p2.toml");
    std::fs::write(&policy, body).unwrap();
    let (kfe, id) = create_from(w, "shenzhen-1", &policy, "p2.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    id
}

fn hq_import(w: &World, file: &std::path::Path) -> Out {
    keyfab(
        &["hq", "audit", "import", "--home", &s(&w.hq), &s(file)],
        None,
    )
}

#[test]
fn report_and_manifest_match_the_provisioning() {
    let w = world();
    let id = entitlement(&w, POLICY2);
    let d1 = provision(&w, &id, "D-1", &[], None);
    let d2 = provision(&w, &id, "D-2", &[], None);
    assert_eq!((d1.code, d2.code), (0, 0));
    assert_eq!(
        provision(&w, &id, "D-3", &[], None).json["error"]["code"],
        "daily_limit_exceeded"
    );
    let kfa = export(&w, "a.kfa");
    let kfk = w.path("a.kfk");
    let o = hq_import_with_receipt(&w, &kfa, &kfk);
    assert_eq!(
        o["violations"].as_array().unwrap().len(),
        0,
        "an honest site has no violations: {o}"
    );
    assert_eq!(
        keyfab(
            &["site", "receipt", "import", "--home", &s(&w.site), &s(&kfk)],
            None
        )
        .code,
        0
    );

    let report = ok(&["hq", "report", "--home", &s(&w.hq)]);
    let e = report["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["entitlement"] == id.as_str())
        .unwrap();
    assert_eq!(e["released"], 2);
    assert_eq!(e["today"], 2);
    assert_eq!(e["daily_limit"], 2);
    assert_eq!(e["quota"], 10);
    assert_eq!(e["refusals"]["daily_limit_exceeded"], 1);
    assert_eq!(e["violations"], 0);
    assert_eq!(e["timezone"], "UTC");
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .args(["hq", "report", "--home", &s(&w.hq)])
        .env("KEYFAB_PASSPHRASE", PASS)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("2/2") && text.contains("2/10") && text.contains("daily_limit_exceeded 1"),
        "{text}"
    );

    let html = w.path("r.html");
    ok(&[
        "hq",
        "report",
        "--home",
        &s(&w.hq),
        "--format",
        "html",
        "--out",
        &s(&html),
    ]);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("<svg")
            && page.contains("daily limit 2")
            && page.contains("daily_limit_exceeded")
            && page.contains("<th>programmed / failed</th>")
            && page.contains(&format!("<td>{} / {}</td>", e["confirmed"], e["burned"]))
            && page.contains("(days in UTC)"),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("<script"),
        "the page must need nothing else"
    );
    // --format decides what is printed, or written: JSON to standard output is JSON;
    // with --out, standard output only says where.
    let plain = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"))
            .args(args)
            .env("KEYFAB_PASSPHRASE", PASS)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let printed = plain(&["hq", "report", "--home", &s(&w.hq), "--format", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&printed).expect("JSON on stdout");
    assert_eq!(parsed["entitlements"], report["entitlements"]);
    let json_file = w.path("r.json");
    let said = plain(&[
        "hq",
        "report",
        "--home",
        &s(&w.hq),
        "--format",
        "json",
        "--out",
        &s(&json_file),
    ]);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(
        said.contains(&s(&json_file)) && !said.contains("ENTITLEMENT"),
        "{said}"
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_file).unwrap()).unwrap();
    assert_eq!(written["entitlements"], report["entitlements"]);

    // The manifest carries exactly the certificates the devices received.
    let out = manifest(&w, &id, "json", "m.json");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = m["devices"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, dev) in rows.iter().zip([&d1, &d2]) {
        assert_eq!(row["device_id"], dev.json["device_id"]);
        assert_eq!(
            row["certificate_pem"],
            dev.json["keys"][0]["certificate_pem"]
        );
        assert_eq!(row["key_id"], dev.json["keys"][0]["key_id"]);
        let der =
            keyfab_crypto::x509::from_pem(row["certificate_pem"].as_str().unwrap(), "CERTIFICATE")
                .unwrap();
        assert_eq!(
            row["certificate_sha256"],
            keyfab_crypto::hash::Fingerprint::of(&der).to_hex()
        );
        assert!(row["public_key_pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN PUBLIC KEY"));
    }
    let csv = manifest(&w, &id, "csv", "m.csv");
    // A manifest already written is not overwritten.
    let before = std::fs::read(&csv).unwrap();
    keyfab(
        &[
            "hq",
            "manifest",
            "--home",
            &s(&w.hq),
            "--entitlement",
            &id,
            "--format",
            "json",
            "--out",
            &s(&csv),
        ],
        None,
    )
    .assert_error(1, "invalid_input", "no manifest was written");
    assert_eq!(std::fs::read(&csv).unwrap(), before);
    assert!(std::fs::read_to_string(&csv)
        .unwrap()
        .starts_with("device_id,entitlement,key,"));
    let iot = manifest(&w, &id, "aws-iot", "m.jsonl");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&iot)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["ThingName"], "D-1");
    assert!(lines[0]["CertificatePem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----\n"));
}

/// `hq manifest` of entitlement `id` in `format`, written to `name` in the world.
fn manifest(w: &World, id: &str, format: &str, name: &str) -> std::path::PathBuf {
    let out = w.path(name);
    ok(&[
        "hq",
        "manifest",
        "--home",
        &s(&w.hq),
        "--entitlement",
        id,
        "--format",
        format,
        "--out",
        &s(&out),
    ]);
    out
}

fn refused(w: &World, file: &std::path::Path, code: &str) {
    let before = snapshot(&w.hq);
    let o = hq_import(w, file);
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (4, Some(code)),
        "{}: {}",
        file.display(),
        o.json
    );
    assert_eq!(
        before,
        snapshot(&w.hq),
        "HQ state changed after refusing {}",
        file.display()
    );
}

#[test]
fn gaps_replays_and_forks_are_refused_and_change_nothing() {
    let w = world();
    let id = entitlement(&w, &POLICY2.replace("daily = 2", "daily = 10"));
    provision(&w, &id, "D-1", &[], None);
    let a1 = export(&w, "a1.kfa");
    provision(&w, &id, "D-2", &[], None);
    let a2 = export(&w, "a2.kfa");
    refused(&w, &a2, "log_gap");
    assert_eq!(hq_import(&w, &a1).code, 0);
    refused(&w, &a1, "replayed");
    assert_eq!(hq_import(&w, &a2).code, 0);

    // Two continuations of the same checkpoint: a copy of the site goes its own way.
    let twin = w.path("twin");
    copy_home(&w.site, &twin);
    provision(&w, &id, "D-3", &[], None);
    let a3 = export(&w, "a3.kfa");
    assert_eq!(
        keyfab(
            &[
                "site",
                "provision",
                "--home",
                &s(&twin),
                "--entitlement",
                &id,
                "--device-id",
                "T-1"
            ],
            None
        )
        .code,
        0
    );
    let fork = w.path("fork.kfa");
    ok(&[
        "site",
        "audit",
        "export",
        "--home",
        &s(&twin),
        "--out",
        &s(&fork),
    ]);
    assert_eq!(hq_import(&w, &a3).code, 0);
    refused(&w, &fork, "log_fork");

    // Not for this HQ: a bundle for a foreign HQ is not ours.
    let mut bytes = std::fs::read(&a3).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    let tampered = w.path("tampered.kfa");
    std::fs::write(&tampered, &bytes).unwrap();
    refused(&w, &tampered, "bad_signature");
}

#[test]
fn a_site_that_signs_forbidden_decisions_is_caught() {
    use keyfab_audit::Event;
    let w = world();
    let id = entitlement(
        &w,
        "product = \"p\"\ndevices = 3\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n[limits]\ndaily = 2\n[[keys]]\nname = \"k\"\ntype = \"ed25519\"\nsource = \"site\"\n",
    );
    let site = open_site(&w.site);
    let now = jiff::Timestamp::now().as_second();
    let allowed = |device: &str| forged_release(&id, device);
    let events = [
        (
            now,
            Event::EntitlementImported {
                entitlement: id.clone(),
                sequence: 1,
                pool_keys: 0,
            },
        ),
        (now, allowed("D-1")),
        (now, allowed("D-2")),
        (now, allowed("D-3")),       // over the daily limit of 2
        (now - 100, allowed("D-1")), // the same device again, and back in time
        (
            now,
            Event::EntitlementRevoked {
                entitlement: id.clone(),
                sequence: 9,
                reason: "invented".into(),
                destroyed_pool_keys: 0,
            },
        ),
    ];
    let out = w.path("lies.kfa");
    write_forged_log(&site, events.into(), &"f".repeat(32), &out);
    drop(site);
    let o = hq_import(&w, &out);
    assert_eq!(
        o.code, 0,
        "a signed, well-formed log is imported and judged: {}",
        o.json
    );
    let kinds: Vec<&str> = o.json["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "daily_limit_exceeded",
        "device_already_provisioned",
        "timestamp_backwards",
        "revoked_without_revocation",
    ] {
        assert!(kinds.contains(&kind), "{kind} not reported: {kinds:?}");
    }
    let report = ok(&["hq", "report", "--home", &s(&w.hq)]);
    assert!(report["violations"].as_array().unwrap().len() >= 4);
}

#[test]
fn each_node_chain_is_checked_on_its_own() {
    use keyfab_audit::Event;
    let w = world();
    entitlement(&w, POLICY2);
    let site = open_site(&w.site);
    let now = jiff::Timestamp::now().as_second();
    let setting = |n: u32| Event::SettingChanged {
        name: format!("s{n}"),
        value: String::new(),
    };
    // Two nodes whose clocks differ by a few seconds, merged in commit order, and the
    // site chain between them: time runs forward within each chain, not across.
    let events = vec![
        (Some("n01"), now, setting(1)),
        (Some("n02"), now - 3, setting(2)),
        (None, now, setting(3)),
        (Some("n01"), now + 1, setting(4)),
        (Some("n02"), now - 2, setting(5)),
    ];
    let merged = w.path("merged.kfa");
    write_forged_chains(&site, events.clone(), &"a".repeat(32), &merged);
    let o = hq_import(&w, &merged);
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(
        o.json["violations"].as_array().unwrap().len(),
        0,
        "{}",
        o.json
    );

    // A chain that goes back in time is flagged.
    let w = world();
    entitlement(&w, POLICY2);
    let site = open_site(&w.site);
    let mut back = events.clone();
    back[4].1 = now - 10;
    let out = w.path("back.kfa");
    write_forged_chains(&site, back, &"b".repeat(32), &out);
    let o = hq_import(&w, &out);
    assert_eq!(o.code, 0, "{}", o.json);
    let v = &o.json["violations"][0];
    assert_eq!(
        (v["kind"].as_str(), v["sequence"].as_u64()),
        (Some("timestamp_backwards"), Some(5)),
        "{}",
        o.json
    );

    // A record missing from one chain, or one chain's record linked into another, is
    // refused outright.
    let w = world();
    entitlement(&w, POLICY2);
    let site = open_site(&w.site);
    let chained = |events: Vec<(Option<&str>, i64, Event)>| -> Vec<keyfab_audit::Record> {
        let mut heads: std::collections::HashMap<Option<&str>, keyfab_audit::Head> =
            Default::default();
        events
            .into_iter()
            .map(|(chain, t, e)| {
                let head = heads
                    .entry(chain)
                    .or_insert_with(keyfab_audit::Head::genesis);
                let mut r = head.next(t, &site.name, e);
                r.chain = chain.map(str::to_owned);
                *head = keyfab_audit::Head::after(&r).unwrap();
                r
            })
            .collect()
    };
    let mut gap = chained(events.clone());
    gap.remove(1);
    let out = w.path("gap.kfa");
    write_forged_records(&site, gap, &"c".repeat(32), &out);
    refused(&w, &out, "log_gap");
    let mut moved = chained(events);
    moved[3].chain = Some("n02".into());
    let out = w.path("moved.kfa");
    write_forged_records(&site, moved, &"d".repeat(32), &out);
    refused(&w, &out, "log_fork");
}

/// `hq status --json` against a known state: before any audit, a site that has sent none
/// and an entitlement pausing tomorrow are warnings; after one, the site's records and
/// the entitlement's releases show, and a quota nearly spent is a warning.
#[test]
fn hq_status_reads_at_a_glance() {
    let w = world();
    let policy = w.path("status.toml");
    let text = POLICY2
        .replace("devices = 10\n", "devices = 20\naudit_every_days = 1\n")
        .replace("[limits]\ndaily = 2\n", "");
    std::fs::write(&policy, text).unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "status.kfe");
    let hq = s(&w.hq);
    let before = ok(&["hq", "status", "--home", &hq]);
    assert_eq!(before["sites"][0]["site"], "shenzhen-1", "{before}");
    assert_eq!(before["sites"][0]["records"], 0);
    assert_eq!(before["entitlements"][0]["id"], id.as_str());
    assert_eq!(before["entitlements"][0]["released"], 0);
    let clock = before["clock"].as_i64().unwrap();
    let due = before["entitlements"][0]["audit_due_at"].as_i64().unwrap();
    assert!(due > clock && due - clock <= 86_400, "{before}");
    let warnings = before["warnings"].to_string();
    assert!(
        warnings.contains("pauses") && warnings.contains("no audit imported yet"),
        "{warnings}"
    );

    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let ids: Vec<String> = (0..19).map(|i| format!("S-{i:04}")).collect();
    provision_lot(&w, &id, &ids, &w.path("status-out"), &[]);
    hq_finds_no_violations(&w, "status.kfa");
    let after = ok(&["hq", "status", "--home", &hq]);
    assert!(
        after["sites"][0]["records"].as_u64().unwrap() > 19,
        "{after}"
    );
    assert_eq!(after["sites"][0]["exports"], 1);
    assert_eq!(after["entitlements"][0]["released"], 19);
    assert_eq!(after["entitlements"][0]["state"], "active");
    assert_eq!(after["violations"], 0);
    let warnings = after["warnings"].to_string();
    assert!(warnings.contains("1 devices of 20 left"), "{warnings}");
    assert!(!warnings.contains("no audit imported yet"), "{warnings}");
}
