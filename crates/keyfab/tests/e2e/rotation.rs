//! Service key rotation at the site and at HQ: what was sealed to, or signed with, the
//! previous keys still opens and verifies; new files use the new keys.
use crate::common::*;

fn imports(w: &World, kfe: &std::path::Path) {
    let out = import(&w.site, kfe, None);
    assert_eq!(out.code, 0, "{}", out.json);
}

fn provisions(w: &World, id: &str, device: &str) {
    let out = provision(w, id, device, &["--request-id", device], None);
    assert_eq!(out.code, 0, "{}", out.json);
}

#[test]
fn rotated_keys_keep_every_file_working_old_and_new() {
    let w = world();
    let site = s(&w.site);
    let (kfe1, id1) = create(&w, "shenzhen-1", 10, "first.kfe");
    imports(&w, &kfe1);
    provisions(&w, &id1, "TSV2-00000001");
    // A bundle signed with the site's first keys, exported before the rotation.
    let before = export(&w, "before.kfa");

    let rotated = ok(&["site", "rotate-keys", "--home", &site]);
    assert_eq!(rotated["generation"], 2, "{rotated}");
    // HQ does not know the new keys yet: what it seals goes to the previous key, which
    // the site still opens.
    let (kfe2, id2) = create(&w, "shenzhen-1", 10, "second.kfe");
    imports(&w, &kfe2);
    provisions(&w, &id2, "TSV2-00000002");
    // What the previous keys signed still verifies at HQ.
    ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&before)]);

    // HQ learns the new keys from the site's new identity file and seals to them.
    let kfi = w.path("rotated.kfi");
    ok(&[
        "site",
        "identity",
        "export",
        "--home",
        &site,
        "--out",
        &s(&kfi),
    ]);
    ok(&["hq", "site", "add", "--home", &s(&w.hq), &s(&kfi)]);
    let (kfe3, id3) = create(&w, "shenzhen-1", 10, "third.kfe");
    imports(&w, &kfe3);
    provisions(&w, &id3, "TSV2-00000003");
    let node = open_site(&w.site);
    let recipients = node.recipient_fingerprints().unwrap();
    assert_eq!(recipients.len(), 2, "the current key and the previous one");
    let header = |path: &std::path::Path| {
        keyfab_formats::entitlement::verify_entitlement(
            path,
            &node.root_cert().unwrap(),
            node.now(),
            "shenzhen-1",
            &recipients,
        )
        .unwrap()
        .into_inner()
        .header
        .recipient
    };
    assert_eq!(
        header(&kfe3),
        recipients[0].to_hex(),
        "sealed to the new key"
    );
    assert_eq!(
        header(&kfe2),
        recipients[1].to_hex(),
        "sealed to the previous key"
    );
    // The rotation is in the site's audit log.
    let rotation_recorded = keyfab_site::entitlements::audit_records(&node)
        .unwrap()
        .iter()
        .any(|r| matches!(&r.event, keyfab_audit::Event::SettingChanged { name, .. } if name == "service_keys"));
    assert!(rotation_recorded);
    drop(node);

    // HQ rotates too: a bundle the site seals to HQ's previous key still imports, and
    // the site's new signature verifies.
    let hq_rotated = ok(&["hq", "rotate-keys", "--home", &s(&w.hq)]);
    assert_eq!(hq_rotated["generation"], 2, "{hq_rotated}");
    let report = export_import_report(&w, "after.kfa");
    assert_eq!(
        report["entitlements"].as_array().unwrap().len(),
        3,
        "{report}"
    );
    ok(&["site", "audit", "verify", "--home", &site]);
}
