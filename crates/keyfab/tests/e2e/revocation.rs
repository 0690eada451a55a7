//! Revocation: verified like an entitlement; afterwards `revoked`; unused pool keys
//! destroyed and audited; keys already given out still answer their retries.

use crate::common::*;
use keyfab_store::Table;

#[test]
fn revocation_stops_provisioning_and_destroys_unused_pool_keys() {
    let w = world();
    let (kfe, id) = create(&w, "shenzhen-1", 5, "r.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let provision = |device: &str, rid: &str| {
        crate::common::provision(&w, &id, device, &["--request-id", rid], None)
    };
    let first = provision("D-1", "r-1");
    assert_eq!(first.code, 0, "{}", first.json);

    let kfr = w.path("r.kfr");
    revoke(&w, &id, Some("line closed"), &kfr);
    // Tampered, and replayed or misaddressed revocations are refused and change nothing.
    let mut bytes = std::fs::read(&kfr).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 1;
    let tampered = w.path("tampered.kfr");
    std::fs::write(&tampered, &bytes).unwrap();
    let before = snapshot(&w.site);
    let o = import(&w.site, &tampered, None);
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (4, Some("bad_signature")),
        "{}",
        o.json
    );
    assert_eq!(before, snapshot(&w.site));

    let o = import(&w.site, &kfr, None);
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(
        o.json["destroyed_pool_keys"], 12,
        "4 unused slots x 3 pool keys"
    );
    let o = import(&w.site, &kfr, None);
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (4, Some("replayed")),
        "{}",
        o.json
    );

    let o = provision("D-2", "r-2");
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (3, Some("revoked")),
        "{}",
        o.json
    );
    // The device that already has its keys still gets the same answer on a retry.
    let again = provision("D-1", "r-1");
    assert_eq!(again.code, 0, "{}", again.json);
    assert_eq!(again.json["keys"], first.json["keys"]);

    let list = ok(&["site", "entitlement", "list", "--home", &s(&w.site)]);
    assert_eq!(list["entitlements"][0]["state"], "revoked");
    let node = open_site(&w.site);
    let mut prefix = id.as_bytes().to_vec();
    prefix.push(b'/');
    assert_eq!(
        node.store
            .scan(Table::Pool, &prefix, usize::MAX)
            .unwrap()
            .len(),
        3,
        "only the taken slot's keys remain"
    );
    let records = keyfab_site::entitlements::audit_records(&node).unwrap();
    keyfab_audit::verify_chain(&keyfab_audit::Head::genesis(), &records).unwrap();
    assert!(records.iter().any(|r| matches!(
        &r.event,
        keyfab_audit::Event::EntitlementRevoked {
            destroyed_pool_keys: 12,
            ..
        }
    )));

    // A revocation for another site of the same root is not ours.
    node_home(&w);
    let (_, other_id) = create(&w, "penang-2", 2, "o.kfe");
    let okfr = w.path("o.kfr");
    revoke(&w, &other_id, None, &okfr);
    drop(node);
    let o = import(&w.site, &okfr, None);
    assert_eq!(
        (o.code, o.json["error"]["code"].as_str()),
        (4, Some("wrong_recipient")),
        "{}",
        o.json
    );
}

/// A second site of the same root, registered at HQ.
fn node_home(w: &World) {
    let other = node(w.dir.path(), &w.root, "site", "penang-2");
    register(w.dir.path(), &w.hq, &other);
}
