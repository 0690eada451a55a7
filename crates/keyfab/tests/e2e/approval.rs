//! Quorum approvals: only listed keys count, each key once, before expiry; every refusal
//! changes nothing; the threshold activates the entitlement, and all of it is audited.

use crate::common::*;

#[test]
fn a_quorum_of_distinct_listed_keys_activates() {
    let w = world();
    for name in ["alice", "bob", "carol", "mallory"] {
        ok(&["approver", "keygen", "--out", &s(&w.path(name))]);
    }
    let policy = w.path("gated.toml");
    std::fs::write(
        &policy,
        "product = \"p\"\ndevices = 5\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n\
         [approval]\nthreshold = 2\napprovers = [\"alice.pub\", \"bob.pub\", \"carol.pub\"]\nrequired_for = [\"activate\"]\n",
    )
    .unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "gated.kfe");
    let imported = import(&w.site, &kfe, None);
    assert_eq!(imported.json["state"], "pending_approval");
    let provision = |device: &str| crate::common::provision(&w, &id, device, &[], None);
    let o = provision("D-1");
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (3, Some("approval_required"))
    );
    // The refusal says what to do: how many approvals of which keys, and the commands.
    let says = o.json["error"]["message"].as_str().unwrap();
    assert!(says.contains("needs 2 approvals of `activate`"), "{says}");
    assert!(says.contains("keyfab site approval request"), "{says}");

    let req = w.path("activate.req");
    approval_request(&w, &id, "activate", &req);
    let sign = |who: &str, req: &std::path::Path| {
        let out = w.path(&format!(
            "{who}-{}.approval",
            req.file_name().unwrap().to_string_lossy()
        ));
        sign_approval(&w, who, req, &out);
        out
    };
    let submit = |files: &[&std::path::Path], now: Option<&str>| {
        let mut args = vec![
            "site".to_owned(),
            "approval".into(),
            "submit".into(),
            "--home".into(),
            s(&w.site),
        ];
        args.extend(files.iter().map(|f| s(f)));
        keyfab(&args.iter().map(String::as_str).collect::<Vec<_>>(), now)
    };
    let refused = |files: &[&std::path::Path], now: Option<&str>| {
        let before = snapshot(&w.site);
        let o = submit(files, now);
        assert_eq!(o.code, 4, "{}", o.json);
        assert_eq!(o.json["error"]["code"], "approval_invalid", "{}", o.json);
        assert_eq!(
            before,
            snapshot(&w.site),
            "a refused submission changed the site"
        );
    };

    let alice = sign("alice", &req);
    let o = submit(&[&alice], None);
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(o.json["results"][0]["count"], 1);
    // The same key twice counts once.
    let o = submit(&[&alice], None);
    assert_eq!(o.json["results"][0]["count"], 1, "{}", o.json);
    assert_eq!(o.json["results"][0]["activated"], false);
    assert_eq!(provision("D-1").json["error"]["code"], "approval_required");

    // A key the policy does not list; a tampered approval; an expired request; all
    // refused as a whole, even beside a good approval.
    let mallory = sign("mallory", &req);
    let bob = sign("bob", &req);
    refused(&[&bob, &mallory], None);
    let mut bytes = std::fs::read(&bob).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    let tampered = w.path("tampered.approval");
    std::fs::write(&tampered, &bytes).unwrap();
    refused(&[&tampered], None);
    let later = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(80))
        .unwrap()
        .to_string();
    refused(&[&bob], Some(&later));

    // Bob makes two distinct keys: activated.
    let o = submit(&[&bob], None);
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(o.json["results"][0]["activated"], true);
    let o = provision("D-1");
    assert_eq!(o.code, 0, "{}", o.json);
    // The satisfied request cannot be used again.
    let carol = sign("carol", &req);
    refused(&[&carol], None);

    let records = keyfab_site::entitlements::audit_records(&open_site(&w.site)).unwrap();
    keyfab_audit::verify_chain(&keyfab_audit::Head::genesis(), &records).unwrap();
    let accepted = records
        .iter()
        .filter(|r| matches!(r.event, keyfab_audit::Event::ApprovalAccepted { .. }))
        .count();
    let activated = records
        .iter()
        .filter(|r| matches!(r.event, keyfab_audit::Event::EntitlementActivated { .. }))
        .count();
    assert_eq!((accepted, activated), (2, 1));
}

/// What an approver signs is what they saw: the request is signed by the site and
/// checked up to the root, its summary shown; an expired request, a request no site
/// under the root signed, a changed byte, or no terminal without `--yes` are refused, and
/// nothing is written.
#[test]
fn approvers_see_what_they_sign_and_sign_only_what_holds() {
    let w = world();
    ok(&["approver", "keygen", "--out", &s(&w.path("alice"))]);
    let (id, req) = awaiting_activation(
        &w,
        "product = \"thermostat\"\ndevices = 500\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         [limits]\ndaily = 50\n[stations]\nallowed = [\"line-1\"]\n\
         [[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n\
         [approval]\nthreshold = 1\napprovers = [\"alice.pub\"]\nrequired_for = [\"activate\"]\n",
    );
    let out = w.path("alice.approval");
    let sign =
        |request: &std::path::Path, root: &std::path::Path, extra: &[&str], now: Option<&str>| {
            try_sign_approval(&w, "alice", (request, root), &out, extra, now)
        };
    let root = w.root.join("root.crt");
    // No terminal (the test's standard input is not one) and no --yes: refused.
    sign(&req, &root, &[], None).assert_error(2, "usage", "no terminal to confirm on");
    assert!(!out.exists());
    // Expired: refused, whatever --yes says.
    let later = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(80))
        .unwrap()
        .to_string();
    sign(&req, &root, &["--yes"], Some(&later)).assert_error(
        4,
        "approval_invalid",
        "ask the site for a new one",
    );
    // Another root: the site is not certified under it.
    let other = crate::common::root(w.dir.path(), "other-root");
    let o = sign(&req, &other.join("root.crt"), &["--yes"], None);
    assert_eq!(o.json["error"]["code"], "untrusted_signer", "{}", o.json);
    // One byte of the summary changed: the site's signature no longer holds.
    let bytes = std::fs::read(&req).unwrap();
    let at = bytes
        .windows(b"thermostat".len())
        .position(|w| w == b"thermostat")
        .unwrap();
    let mut forged = bytes.clone();
    forged[at] = b'T';
    let forged_req = w.path("forged.req");
    std::fs::write(&forged_req, &forged).unwrap();
    let o = sign(&forged_req, &root, &["--yes"], None);
    assert_eq!(o.json["error"]["code"], "bad_signature", "{}", o.json);
    assert!(!out.exists());
    // Signed: the output repeats what was approved, and the site accepts it.
    let o = sign(&req, &root, &["--yes"], None);
    assert_eq!(o.code, 0, "{}", o.json);
    let seen = &o.json;
    assert_eq!(
        (
            &seen["site"],
            &seen["entitlement"],
            &seen["action"],
            &seen["product"]
        ),
        (
            &"shenzhen-1".into(),
            &id.as_str().into(),
            &"activate".into(),
            &"thermostat".into()
        ),
        "{seen}"
    );
    assert_eq!(
        (&seen["devices"], &seen["daily_limit"]),
        (&500.into(), &50.into())
    );
    assert_eq!(seen["valid_until"], "2030-01-01T00:00:00Z");
    assert_eq!(seen["stations"], serde_json::json!(["line-1"]));
    let submitted = ok(&[
        "site",
        "approval",
        "submit",
        "--home",
        &s(&w.site),
        &s(&out),
    ]);
    assert_eq!(submitted["results"][0]["activated"], true, "{submitted}");
}

/// An approver's key is sealed under their passphrase unless asked otherwise: a wrong
/// passphrase signs nothing; a drill's key in clear needs none.
#[test]
fn approver_keys_are_sealed_under_a_passphrase_by_default() {
    let w = world();
    let made = ok(&["approver", "keygen", "--out", &s(&w.path("alice"))]);
    assert_eq!(made["sealed"], true);
    let key = std::fs::read(w.path("alice.key")).unwrap();
    assert!(key.starts_with(b"KFKS") && !String::from_utf8_lossy(&key).contains("PRIVATE KEY"));
    let drill = ok(&[
        "approver",
        "keygen",
        "--out",
        &s(&w.path("drill")),
        "--no-passphrase",
    ]);
    assert_eq!(drill["sealed"], false);
    let (_, req) = awaiting_activation(
        &w,
        "product = \"p\"\ndevices = 5\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n\
         [approval]\nthreshold = 2\napprovers = [\"alice.pub\", \"drill.pub\"]\nrequired_for = [\"activate\"]\n",
    );
    let wrong = w.path("wrong.pass");
    std::fs::write(&wrong, "not alice's passphrase").unwrap();
    let out = w.path("alice.approval");
    let wrong = s(&wrong);
    let root = w.root.join("root.crt");
    let o = try_sign_approval(
        &w,
        "alice",
        (&req, &root),
        &out,
        &["--yes", "--passphrase-file", &wrong],
        None,
    );
    assert_eq!(o.json["error"]["code"], "locked", "{}", o.json);
    assert!(!out.exists());
    sign_approval(&w, "alice", &req, &out);
    let drill_out = w.path("drill.approval");
    sign_approval(&w, "drill", &req, &drill_out);
    let submitted = ok(&[
        "site",
        "approval",
        "submit",
        "--home",
        &s(&w.site),
        &s(&out),
        &s(&drill_out),
    ]);
    assert_eq!(submitted["results"][0]["activated"], true, "{submitted}");
}

/// A quorum for an action this version does not carry out would approve nothing: such a
/// policy is refused at `hq entitlement create`, naming the field, and nothing is issued.
#[test]
fn a_quorum_for_an_action_not_carried_out_is_refused() {
    let w = world();
    ok(&["approver", "keygen", "--out", &s(&w.path("alice"))]);
    for action in ["raise-limit", "reprovision"] {
        let policy = w.path("p.toml");
        std::fs::write(
            &policy,
            format!(
                "product = \"p\"\ndevices = 5\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
                 [limits]\ndaily = 2\n\
                 [[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n\
                 [approval]\nthreshold = 1\napprovers = [\"alice.pub\"]\nrequired_for = [\"activate\", \"{action}\"]\n"
            ),
        )
        .unwrap();
        let out = w.path("p.kfe");
        let o = try_create(&w, "shenzhen-1", &policy, &out);
        o.assert_error(1, "invalid_policy", "approval.required_for");
        assert!(!out.exists());
    }
}

/// An entitlement of `policy_text` imported at the site, pending approval, and the site's
/// request to activate it: its id and the request file.
fn awaiting_activation(w: &World, policy_text: &str) -> (String, std::path::PathBuf) {
    let policy = w.path("gated.toml");
    std::fs::write(&policy, policy_text).unwrap();
    let (kfe, id) = create_from(w, "shenzhen-1", &policy, "gated.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let req = w.path("activate.req");
    approval_request(w, &id, "activate", &req);
    (id, req)
}
