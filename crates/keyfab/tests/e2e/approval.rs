//! Quorum approvals: only listed keys count, each key once, before expiry; every refusal
//! changes nothing; the threshold activates the entitlement, and all of it is audited.

use crate::common::*;
use std::path::Path;
use std::str::FromStr;

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
    let submit = |files: &[&std::path::Path], now: Option<&str>| submit(&w, files, now);
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

/// A quorum for what the policy cannot do would approve nothing: `raise-limit` without a
/// daily limit to raise is refused at `hq entitlement create`, naming the field, and
/// nothing is issued.
#[test]
fn a_quorum_for_what_the_policy_cannot_do_is_refused() {
    let w = world();
    ok(&["approver", "keygen", "--out", &s(&w.path("alice"))]);
    let policy = w.path("p.toml");
    std::fs::write(
        &policy,
        "product = \"p\"\ndevices = 5\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n\
         [approval]\nthreshold = 1\napprovers = [\"alice.pub\"]\nrequired_for = [\"activate\", \"raise-limit\"]\n",
    )
    .unwrap();
    let out = w.path("p.kfe");
    let o = try_create(&w, "shenzhen-1", &policy, &out);
    o.assert_error(1, "invalid_policy", "approval.required_for");
    o.assert_error(1, "invalid_policy", "set limits.daily");
    assert!(!out.exists());
}

/// A policy of 20 devices, 2 a day (UTC), whose daily limit a quorum of 2 of alice, bob
/// and carol may raise.
const RAISABLE: &str = "product = \"p\"\ndevices = 20\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
     [limits]\ndaily = 2\n\
     [[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n\
     [approval]\nthreshold = 2\napprovers = [\"alice.pub\", \"bob.pub\", \"carol.pub\"]\nrequired_for = [\"raise-limit\"]\n";

/// A world with alice, bob, carol (listed) and mallory (not), and `policy_text`
/// imported at its site: the world and the entitlement's id.
fn with_approvers(policy_text: &str) -> (World, String) {
    let w = world();
    for name in ["alice", "bob", "carol", "mallory"] {
        ok(&["approver", "keygen", "--out", &s(&w.path(name))]);
    }
    let policy = w.path("quorum.toml");
    std::fs::write(&policy, policy_text).unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "quorum.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    (w, id)
}

/// `site approval request --action raise-limit` for `daily` devices a day on `day` into
/// `out`, however it ends.
fn request_raise(w: &World, id: &str, daily: &str, (from, to): (&str, &str), out: &Path) -> Out {
    let action = [
        "--action",
        "raise-limit",
        "--daily",
        daily,
        "--from-day",
        from,
        "--to-day",
        to,
    ];
    try_approval_request(w, id, &action, out)
}

/// `site approval submit` of `files` at `now`.
fn submit(w: &World, files: &[&Path], now: Option<&str>) -> Out {
    let mut args = vec![
        "site".to_owned(),
        "approval".into(),
        "submit".into(),
        "--home".into(),
        s(&w.site),
    ];
    args.extend(files.iter().map(|f| s(f)));
    keyfab(&args.iter().map(String::as_str).collect::<Vec<_>>(), now)
}

/// The time `hours` from now (RFC 3339) and its day in UTC.
fn hours_ahead(hours: i64) -> (String, String) {
    let t = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(hours))
        .unwrap();
    (t.to_string(), t.strftime("%Y-%m-%d").to_string())
}

/// A raise of the daily limit for tomorrow, approved 2 of 3, lets exactly the raised
/// number through that day and the policy's the day after; below the threshold, or
/// from a key the policy does not list, it changes nothing; HQ's replay, which proves
/// the quorum from the log, finds no violation.
#[test]
fn a_raise_approved_by_a_quorum_lets_exactly_the_raised_number_through_that_day() {
    let (w, id) = with_approvers(RAISABLE);
    let (_, today) = hours_ahead(0);
    let (t1, day1) = hours_ahead(24);
    let (t2, _) = hours_ahead(48);
    let provision =
        |device: &str, now: &str| crate::common::provision(&w, &id, device, &[], Some(now));
    let (now, _) = hours_ahead(0);
    for d in ["D-1", "D-2"] {
        assert_eq!(provision(d, &now).code, 0);
    }
    provision("D-3", &now).assert_error(3, "daily_limit_exceeded", "");

    // Raises that the policy cannot carry are refused, and nothing is written.
    let req = w.path("raise.req");
    let before = snapshot(&w.site);
    for (daily, days, says) in [
        (
            "2",
            (day1.as_str(), day1.as_str()),
            "not above the policy's daily limit of 2",
        ),
        (
            "21",
            (day1.as_str(), day1.as_str()),
            "quota of 20 devices, which only HQ can change",
        ),
        ("5", (day1.as_str(), today.as_str()), "raise.to_day"),
        ("5", ("2026-13-01", day1.as_str()), "not a date"),
        ("5", ("2026-01-01", "2026-01-02"), "has passed"),
    ] {
        request_raise(&w, &id, daily, days, &req).assert_error(1, "invalid_input", says);
        assert!(!req.exists());
    }
    let o = keyfab(
        &[
            "site",
            "approval",
            "request",
            "--home",
            &s(&w.site),
            "--entitlement",
            &id,
            "--action",
            "raise-limit",
            "--daily",
            "5",
            "--out",
            &s(&req),
        ],
        None,
    );
    assert_eq!(o.code, 2, "{}", o.json);
    assert_eq!(
        before,
        snapshot(&w.site),
        "a refused request changed the site"
    );

    let o = request_raise(&w, &id, "5", (&day1, &day1), &req);
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(
        o.json["raise"],
        serde_json::json!({"daily": 5, "from_day": day1, "to_day": day1})
    );
    let approval = |who: &str| {
        let (out, seen) = approve(&w, who, &req);
        // The approver saw what is raised, and that the quota stays.
        assert_eq!(seen["raise"]["daily"], 5, "{seen}");
        out
    };

    // Under the threshold, or with a key the policy does not list: nothing raised.
    let alice = approval("alice");
    let o = submit(&w, &[&alice], None);
    assert_eq!(
        (o.code, &o.json["results"][0]["count"]),
        (0, &1.into()),
        "{}",
        o.json
    );
    assert!(o.json["results"][0].get("raised").is_none(), "{}", o.json);
    let mallory = approval("mallory");
    let before = snapshot(&w.site);
    submit(&w, &[&mallory], None).assert_error(4, "approval_invalid", "not listed");
    assert_eq!(
        before,
        snapshot(&w.site),
        "a refused submission changed the site"
    );
    for d in ["T1-1", "T1-2"] {
        assert_eq!(provision(d, &t1).code, 0);
    }
    provision("T1-3", &t1).assert_error(3, "daily_limit_exceeded", "");

    // Bob makes two: the raise is in force for that day.
    let bob = approval("bob");
    let o = submit(&w, &[&bob], Some(&t1));
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(o.json["results"][0]["count"], 2);
    assert_eq!(o.json["results"][0]["raised"]["daily"], 5, "{}", o.json);
    if std::env::var_os("KEYFAB_BLESS").is_some() {
        bless_raise_seeds(&w, &req, &alice);
    }
    let listed = keyfab(
        &["site", "entitlement", "list", "--home", &s(&w.site)],
        Some(&t1),
    );
    let e = &listed.json["entitlements"][0];
    assert_eq!(
        (&e["daily_limit"], &e["today"], &e["left_today"]),
        (&5.into(), &2.into(), &3.into()),
        "{e}"
    );
    for d in ["T1-3", "T1-4", "T1-5"] {
        assert_eq!(provision(d, &t1).code, 0, "{d}");
    }
    provision("T1-6", &t1).assert_error(3, "daily_limit_exceeded", "");
    // A satisfied request cannot be used again.
    let carol = approval("carol");
    submit(&w, &[&carol], Some(&t1)).assert_error(4, "approval_invalid", "did not issue");

    // The day after: the policy's limit again.
    for d in ["T2-1", "T2-2"] {
        assert_eq!(provision(d, &t2).code, 0);
    }
    provision("T2-3", &t2).assert_error(3, "daily_limit_exceeded", "");

    // HQ proves the quorum from the log and finds every release within the limits.
    let kfa = w.path("raised.kfa");
    let o = try_export_at(&w.site, &kfa, Some(&t2));
    assert_eq!(o.code, 0, "{}", o.json);
    let o = keyfab(
        &["hq", "audit", "import", "--home", &s(&w.hq), &s(&kfa)],
        Some(&t2),
    );
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(o.json["violations"], serde_json::json!([]), "{}", o.json);
    let report = keyfab(&["hq", "report", "--home", &s(&w.hq)], Some(&t2));
    let e = &report.json["entitlements"][0];
    assert_eq!(e["released"], 9, "{e}");
    assert_eq!(
        e["raises"],
        serde_json::json!([{"daily": 5, "from_day": day1, "to_day": day1}]),
        "{e}"
    );
}

/// A site that records a raise its approvals do not prove — too few of them, or
/// approvals of another request — is caught by HQ: the raise is not in force in the
/// replay, and the releases above the policy's limit are violations.
#[test]
fn a_raise_the_approvals_do_not_prove_is_caught_by_hq() {
    use keyfab_audit::Event;
    let (w, id) = with_approvers(RAISABLE);
    let (now, day) = hours_ahead(0);
    let now = jiff::Timestamp::from_str(&now).unwrap().as_second();
    let (asked, other) = (w.path("asked.req"), w.path("other.req"));
    assert_eq!(request_raise(&w, &id, "5", (&day, &day), &asked).code, 0);
    assert_eq!(request_raise(&w, &id, "4", (&day, &day), &other).code, 0);
    let approvals = detached_approvals(&w, &asked, &["alice", "bob"]);
    let quorum = |request: &Path, approvals: &[serde_bytes::ByteBuf]| {
        quorum_record(&id, "raise-limit", request, approvals)
    };
    let imported = Event::EntitlementImported {
        entitlement: id.clone(),
        sequence: 1,
        pool_keys: 0,
    };
    let allowed = |device: &str| forged_release(&id, device);
    let events = vec![
        (now, imported),
        // One approval of two.
        (now, quorum(&asked, &approvals[..1])),
        // Two approvals, of another request than the one kept.
        (now, quorum(&other, &approvals)),
        (now, allowed("D-1")),
        (now, allowed("D-2")),
        (now, allowed("D-3")),
        (now, allowed("D-4")),
    ];
    let violations = hq_violations_in_forged_log(&w, events);
    let kinds: Vec<(&str, &str)> = violations
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap(),
                v["device_id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("quorum_not_proven", ""),
            ("quorum_not_proven", ""),
            ("daily_limit_exceeded", "D-3"),
            ("daily_limit_exceeded", "D-4"),
        ],
        "{violations:?}"
    );
    let details: Vec<&str> = violations
        .iter()
        .map(|v| v["detail"].as_str().unwrap())
        .collect();
    assert!(
        details[0].contains("1 of 2 distinct listed approvers"),
        "{details:?}"
    );
    assert!(details[1].contains("signature"), "{details:?}");
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

/// Writes the fuzz seeds of a raise: its request, an approval of it detached as the log
/// keeps it, and the `quorum_approved` record.
fn bless_raise_seeds(w: &World, req: &Path, approval: &Path) {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    std::fs::copy(req, seeds.join("approval/raise.kfq")).unwrap();
    let detached = keyfab_formats::approval::detach(&std::fs::read(approval).unwrap()).unwrap();
    std::fs::write(seeds.join("approval/raise-detached.kfp"), detached).unwrap();
    let records = keyfab_site::entitlements::audit_records(&open_site(&w.site)).unwrap();
    let quorum = records
        .iter()
        .find(|r| matches!(r.event, keyfab_audit::Event::QuorumApproved { .. }))
        .unwrap();
    std::fs::write(
        seeds.join("audit_record/quorum_approved.cbor"),
        quorum.to_bytes(),
    )
    .unwrap();
}

/// 5 devices, each an identity key made at the site with a certificate; re-provisioning
/// a device needs 2 of alice, bob and carol.
const REPROVISIONABLE: &str = "product = \"p\"\ndevices = 5\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
     [[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = { subject = \"CN={device_id},O=Acme\", days = 365 }\n\
     [approval]\nthreshold = 2\napprovers = [\"alice.pub\", \"bob.pub\", \"carol.pub\"]\nrequired_for = [\"reprovision\"]\n";

/// `site approval request --action reprovision` of `device` (with `reason`) into `out`,
/// however it ends.
fn request_reprovision(w: &World, id: &str, device: &str, reason: &str, out: &Path) -> Out {
    let action = [
        "--action",
        "reprovision",
        "--device-id",
        device,
        "--reason",
        reason,
    ];
    try_approval_request(w, id, &action, out)
}

/// A returned unit, re-provisioned on a quorum's approval: new keys and a new
/// certificate, once; its earlier keys burned and its earlier certificate superseded
/// (in `hq device show` and the manifest, and revocable on its own); without the
/// quorum, `device_already_provisioned`; it counts against the quota; HQ's replay finds
/// no violation.
#[test]
fn a_device_reprovisioned_after_approval_gets_new_keys_once() {
    let (w, id) = with_approvers(REPROVISIONABLE);
    let provision = |device: &str| crate::common::provision(&w, &id, device, &[], None);
    assert_eq!(provision("D-1").code, 0);
    provision("D-1").assert_error(3, "device_already_provisioned", "");

    // Only a provisioned device is re-provisioned; a bad reason is refused.
    let req = w.path("rma.req");
    let before = snapshot(&w.site);
    request_reprovision(&w, &id, "D-2", "RMA 1", &req).assert_error(
        1,
        "invalid_input",
        "holds no keys",
    );
    request_reprovision(&w, &id, "D-1", "two\nlines", &req).assert_error(
        1,
        "invalid_input",
        "--reason",
    );
    assert!(!req.exists());
    assert_eq!(
        before,
        snapshot(&w.site),
        "a refused request changed the site"
    );

    let o = request_reprovision(&w, &id, "D-1", "RMA 7781: chip replaced", &req);
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(o.json["reprovision"]["device_id"], "D-1", "{}", o.json);
    if std::env::var_os("KEYFAB_BLESS").is_some() {
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/approval");
        std::fs::copy(&req, seeds.join("reprovision.kfq")).unwrap();
    }
    let approval = |who: &str| {
        let (out, seen) = approve(&w, who, &req);
        // The approver saw which device, and why.
        assert_eq!(
            seen["reprovision"]["reason"], "RMA 7781: chip replaced",
            "{seen}"
        );
        out
    };
    // One approval of two: nothing changes.
    let o = submit(&w, &[&approval("alice")], None);
    assert_eq!(
        (o.code, &o.json["results"][0]["count"]),
        (0, &1.into()),
        "{}",
        o.json
    );
    provision("D-1").assert_error(3, "device_already_provisioned", "");
    let o = submit(&w, &[&approval("bob")], None);
    assert_eq!(o.json["results"][0]["reprovisioned"], "D-1", "{}", o.json);
    // New keys, once.
    assert_eq!(provision("D-1").code, 0);
    provision("D-1").assert_error(3, "device_already_provisioned", "");
    submit(&w, &[&approval("carol")], None).assert_error(4, "approval_invalid", "did not issue");

    let report = hq_finds_no_violations(&w, "rma.kfa");
    let e = &report["entitlements"][0];
    assert_eq!(
        (&e["released"], &e["unused"], &e["superseded"]),
        (&2.into(), &3.into(), &1.into()),
        "{e}"
    );
    let shown = ok(&["hq", "device", "show", "--home", &s(&w.hq), "D-1"]);
    let releases = shown["releases"].as_array().unwrap();
    assert_eq!(releases.len(), 2, "{shown}");
    assert_eq!(
        (
            releases[0]["status"].as_str(),
            releases[1]["status"].as_str()
        ),
        (Some("superseded"), Some("unconfirmed"))
    );
    let (old, new) = (&releases[0]["keys"][0], &releases[1]["keys"][0]);
    assert_ne!(old["key_id"], new["key_id"]);
    assert_ne!(old["cert_serial"], new["cert_serial"]);
    // The manifest registers the new certificate; the old one only when asked for.
    let manifest = |name: &str, extra: &[&str]| {
        hq_manifest(&w, &id, "json", name, extra);
        let text = std::fs::read_to_string(w.path(name)).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["devices"].clone()
    };
    let current = manifest("m.json", &[]);
    assert_eq!(current.as_array().unwrap().len(), 1, "{current}");
    assert_eq!(current[0]["cert_serial"], new["cert_serial"]);
    let all = manifest("all.json", &["--include-failed"]);
    let statuses: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 2);
    assert!(statuses.contains(&"superseded"), "{all}");
    // The superseded certificate goes on the CRL on its own.
    let revoked = revoke_device(&w, &id, "D-1", "superseded", &["--superseded-only"]);
    let serials: Vec<&serde_json::Value> = revoked["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["serial"])
        .collect();
    assert_eq!(serials, [&old["cert_serial"]], "{revoked}");
}

/// A second provisioning the approvals the log keeps do not prove is caught by HQ:
/// re-provisioned on one approval of two, or twice on one approval; one proven by the
/// quorum passes.
#[test]
fn a_second_provisioning_without_a_proven_quorum_is_caught_by_hq() {
    use keyfab_audit::Event;
    let (w, id) = with_approvers(REPROVISIONABLE);
    assert_eq!(crate::common::provision(&w, &id, "D-2", &[], None).code, 0);
    let req = w.path("rma.req");
    assert_eq!(request_reprovision(&w, &id, "D-2", "RMA 2", &req).code, 0);
    let approvals = detached_approvals(&w, &req, &["alice", "bob"]);
    let quorum =
        |approvals: &[serde_bytes::ByteBuf]| quorum_record(&id, "reprovision", &req, approvals);
    let now = jiff::Timestamp::now().as_second();
    let allowed = |device: &str| forged_release(&id, device);
    let events = vec![
        (
            now,
            Event::EntitlementImported {
                entitlement: id.clone(),
                sequence: 1,
                pool_keys: 0,
            },
        ),
        (now, allowed("D-2")),
        (now, quorum(&approvals[..1])),
        (now, allowed("D-2")),
        (now, quorum(&approvals)),
        (now, allowed("D-2")),
        (now, allowed("D-2")),
    ];
    let violations = hq_violations_in_forged_log(&w, events);
    let kinds: Vec<(&str, u64)> = violations
        .iter()
        .map(|v| (v["kind"].as_str().unwrap(), v["sequence"].as_u64().unwrap()))
        .collect();
    // Record 3: one approval proves nothing; record 4: so that release is a second one;
    // record 6 is allowed by the quorum of record 5; record 7 is one more.
    assert_eq!(
        kinds,
        [
            ("quorum_not_proven", 3),
            ("device_already_provisioned", 4),
            ("device_already_provisioned", 7)
        ],
        "{violations:?}"
    );
}

/// `who` signs `req` (confirmed with `--yes`): the approval file, and what the approver
/// was shown.
fn approve(w: &World, who: &str, req: &Path) -> (std::path::PathBuf, serde_json::Value) {
    let name = req.file_stem().unwrap().to_string_lossy();
    let out = w.path(&format!("{who}-{name}.approval"));
    let root = w.root.join("root.crt");
    let o = try_sign_approval(w, who, (req, &root), &out, &["--yes"], None);
    assert_eq!(o.code, 0, "{}", o.json);
    (out, o.json)
}

/// `req` signed by each of `who`, each approval detached as the log keeps it.
fn detached_approvals(w: &World, req: &Path, who: &[&str]) -> Vec<serde_bytes::ByteBuf> {
    who.iter()
        .map(|who| {
            let (out, _) = approve(w, who, req);
            let detached = keyfab_formats::approval::detach(&std::fs::read(out).unwrap());
            serde_bytes::ByteBuf::from(detached.unwrap())
        })
        .collect()
}

/// The `quorum_approved` record a site would write for `request` with `approvals`.
fn quorum_record(
    id: &str,
    action: &str,
    request: &Path,
    approvals: &[serde_bytes::ByteBuf],
) -> keyfab_audit::Event {
    let file = std::fs::read(request).unwrap();
    let nonce = keyfab_formats::approval::ApprovalRequest::from_file(&file)
        .unwrap()
        .nonce;
    keyfab_audit::Event::QuorumApproved {
        entitlement: id.to_owned(),
        action: action.to_owned(),
        nonce,
        request: serde_bytes::ByteBuf::from(file),
        approvals: approvals.to_vec(),
    }
}
