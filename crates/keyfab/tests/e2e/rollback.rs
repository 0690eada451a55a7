//! Rollback of site state (caught at the site when HQ's next file arrives): a site restored from an older copy is
//! caught by the next receipt or entitlement that carries what HQ acknowledged; receipts
//! also restart the audit-freshness clock.

use crate::common::*;
use keyfab_crypto::time::{FixedClock, UnixTime};

fn hq_at(w: &World, t: i64) -> keyfab_node::Node {
    keyfab_node::Node::open(
        &w.hq,
        keyfab_node::NodeKind::Hq,
        &keyfab_crypto::secret::SecretBytes::new(PASS.as_bytes().to_vec()),
        Box::new(keyfab_crypto::rng::SystemRng),
        Box::new(FixedClock(UnixTime(t))),
        &keyfab_backends::Linked,
    )
    .unwrap()
}

#[test]
fn a_restored_copy_is_detected_by_receipts_and_entitlements() {
    let w = world();
    let policy = w.path("many.toml");
    std::fs::write(
        &policy,
        POLICY
            .replace("{devices}", "50")
            .replace("daily = 1", "daily = 50"),
    )
    .unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "a.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let provision = |device: &str| crate::common::provision(&w, &id, device, &[], None);
    let d1 = ["--request-id", "r-d1"];
    assert_eq!(crate::common::provision(&w, &id, "D-1", &d1, None).code, 0);

    let backup = w.path("site-backup");
    copy_home(&w.site, &backup);

    assert_eq!(provision("D-2").code, 0);
    let cp = w.path("now.kfc");
    checkpoint(&w.site, &cp);
    let now = jiff::Timestamp::now().as_second();
    let receipt =
        keyfab_hq::receipts::acknowledge_checkpoint(&hq_at(&w, now), &std::fs::read(&cp).unwrap())
            .unwrap();
    let kfk = w.path("r.kfk");
    std::fs::write(&kfk, &receipt).unwrap();
    let (later_kfe, _) = create(&w, "shenzhen-1", 5, "later.kfe");

    // Restore the old copy: both the receipt and the next entitlement expose it.
    copy_home(&backup, &w.site);
    let o = keyfab(
        &["site", "receipt", "import", "--home", &s(&w.site), &s(&kfk)],
        None,
    );
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (4, Some("rollback_detected")),
        "{}",
        o.json
    );
    // The first detection stopped the site, audited; what follows changes nothing more.
    let log = ok(&["site", "audit", "verify", "--home", &s(&w.site)]);
    let records = keyfab_site::entitlements::audit_records(&open_site(&w.site)).unwrap();
    assert!(
        matches!(&records.last().unwrap().event, keyfab_audit::Event::SiteLatched { code, .. } if code == "rollback_detected"),
        "{log}"
    );
    let before = snapshot(&w.site);
    let o = import(&w.site, &later_kfe, None);
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (4, Some("rollback_detected")),
        "{}",
        o.json
    );
    // No key leaves the stopped site, in any later process: not for a device it never
    // provisioned (the restored copy would hand D-2's quota and keys out again), not
    // for a retry of a request it answered, not through `site serve`.
    let mut released = 0;
    for (device, extra) in [("D-2", &[][..]), ("D-3", &[][..]), ("D-1", &d1[..])] {
        let o = crate::common::provision(&w, &id, device, extra, None);
        o.assert_error(4, "rollback_detected", "stopped itself");
        released += usize::from(o.json.get("keys").is_some());
    }
    assert_eq!(released, 0);
    let serve = serve_refused(&w.site);
    serve.assert_error(4, "rollback_detected", "stopped itself");
    assert_eq!(before, snapshot(&w.site), "refusals change nothing");
    // It still exports its log, so HQ sees what happened.
    export(&w, "after-rollback.kfa");
}

/// An edited audit record: `site audit verify` finds it and stops the site — no key
/// leaves it afterwards, across restarts — and `site serve` finds it on start.
#[test]
fn an_edited_log_stops_the_site() {
    let w = world();
    let (kfe, id) = create(&w, "shenzhen-1", 10, "e.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    assert_eq!(provision(&w, &id, "E-1", &[], None).code, 0);
    let twin = w.path("twin");
    copy_home(&w.site, &twin);
    // An edit of a record's time, in both copies' stores.
    for home in [&w.site, &twin] {
        edit_audit_record(home, &[0]);
    }
    let o = keyfab(&["site", "audit", "verify", "--home", &s(&w.site)], None);
    o.assert_error(4, "log_broken", "stopped releasing keys");
    let o = provision(&w, &id, "E-2", &[], None);
    o.assert_error(4, "log_broken", "stopped itself");
    // The copy nobody verified: `site serve` verifies before it serves, and stops it.
    let serve = serve_refused(&twin);
    serve.assert_error(4, "log_broken", "the audit chain is broken");
    let o = keyfab(
        &[
            "site",
            "provision",
            "--home",
            &s(&twin),
            "--entitlement",
            &id,
            "--device-id",
            "E-3",
        ],
        None,
    );
    o.assert_error(4, "log_broken", "stopped itself");
}

/// A state edited or restored in part, found before anything is decided: `site
/// provision` looks at the log's end (its stored head against its last stored record),
/// `site serve` also at each entitlement's counters against the records they summarise.
/// Either stops the site.
#[test]
fn a_state_that_does_not_fit_its_log_stops_the_site_at_start() {
    use keyfab_store::{Table, Txn};
    let w = world();
    let id = imported(
        &w,
        "product = \"p\"\ndevices = 10\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\n",
        "counted",
    );
    for device in ["F-1", "F-2"] {
        assert_eq!(provision(&w, &id, device, &[], None).code, 0);
    }
    let (cut, counted) = (w.path("cut"), w.path("counted"));
    copy_home(&w.site, &cut);
    copy_home(&w.site, &counted);
    let provision_at =
        |home: &std::path::Path, device: &str| provision_in(home, &id, device, &[], None);
    // The last row of the log gone (the last device's record), its head left as it was.
    {
        let node = open_site(&cut);
        let rows = node.store.scan(Table::Audit, &[0], usize::MAX).unwrap();
        let (last, _) = rows.last().unwrap();
        let mut txn = Txn::default();
        txn.delete(Table::Audit, last);
        assert!(node.store.commit(txn).unwrap().is_committed());
    }
    provision_at(&cut, "F-3").assert_error(4, "log_broken", "its last stored record is");
    provision_at(&cut, "F-3").assert_error(4, "log_broken", "stopped itself");

    // One device fewer in the counters: the log is whole, so only serve's look finds it.
    {
        let node = open_site(&counted);
        let v = node
            .store
            .get(Table::Counters, id.as_bytes())
            .unwrap()
            .unwrap();
        let mut c: keyfab_site::provision::Counters = keyfab_node::decode(&v.value).unwrap();
        c.total -= 1;
        let mut txn = Txn::default();
        txn.put(
            Table::Counters,
            id.as_bytes(),
            &keyfab_node::encode(&c).unwrap(),
        );
        assert!(node.store.commit(txn).unwrap().is_committed());
    }
    let serve = serve_refused(&counted);
    serve.assert_error(4, "log_broken", "counts 1 devices (2 by day)");
    provision_at(&counted, "F-3").assert_error(4, "log_broken", "stopped itself");
    // The home as it was passes both looks.
    assert_eq!(provision_at(&w.site, "F-3").code, 0);
}

#[test]
fn receipts_are_verified_and_restart_the_audit_freshness_clock() {
    let w = world();
    let policy = w.path("fresh.toml");
    std::fs::write(
        &policy,
        "product = \"p\"\ndevices = 5\naudit_every_days = 1\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n[[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n",
    )
    .unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "fresh.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let in_two_days = jiff::Timestamp::now().as_second() + 2 * 86_400;
    let at = jiff::Timestamp::from_second(in_two_days)
        .unwrap()
        .to_string();
    let provision = |device: &str| crate::common::provision(&w, &id, device, &[], Some(&at));
    let o = provision("D-1");
    assert_eq!(o.json["error"]["code"], "audit_overdue", "{}", o.json);

    let cp = w.path("cp.kfc");
    assert_eq!(
        keyfab(
            &[
                "site",
                "audit",
                "checkpoint",
                "--home",
                &s(&w.site),
                "--out",
                &s(&cp)
            ],
            Some(&at)
        )
        .code,
        0
    );
    let receipt = keyfab_hq::receipts::acknowledge_checkpoint(
        &hq_at(&w, in_two_days),
        &std::fs::read(&cp).unwrap(),
    )
    .unwrap();
    let kfk = w.path("fresh.kfk");
    std::fs::write(&kfk, &receipt).unwrap();

    // A tampered receipt is refused; the real one restarts the clock; a replay is refused.
    let mut bad = receipt.clone();
    let n = bad.len();
    bad[n - 4] ^= 1;
    let tampered = w.path("tampered.kfk");
    std::fs::write(&tampered, &bad).unwrap();
    let o = keyfab(
        &[
            "site",
            "receipt",
            "import",
            "--home",
            &s(&w.site),
            &s(&tampered),
        ],
        Some(&at),
    );
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (4, Some("bad_signature")),
        "{}",
        o.json
    );
    let o = keyfab(
        &["site", "receipt", "import", "--home", &s(&w.site), &s(&kfk)],
        Some(&at),
    );
    assert_eq!(o.code, 0, "{}", o.json);
    let o = keyfab(
        &["site", "receipt", "import", "--home", &s(&w.site), &s(&kfk)],
        Some(&at),
    );
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (4, Some("replayed")),
        "{}",
        o.json
    );
    assert_eq!(provision("D-1").code, 0);
    let o = keyfab(
        &["site", "audit", "verify", "--home", &s(&w.site)],
        Some(&at),
    );
    assert_eq!(o.code, 0, "{}", o.json);
}
