//! HQ refuses an entitlement whose device certificates would outlive the chain above
//! them: devices would stop verifying when HQ's cluster certificate ends.

use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Validity};
use keyfab_node::NodeKind;
use keyfab_testkit::{Root, TestClock, T0};

fn policy(days: &str) -> String {
    format!(
        "product = \"p\"\ndevices = 5\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2027-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = {{ subject = \"CN={{device_id}}\", days = {days} }}\n"
    )
}

#[test]
fn device_certificates_never_outlive_hqs_cluster_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::at(T0);
    // HQ's cluster certificate ends five years after T0; the root never does.
    let mut root = Root::new();
    root.validity = Validity {
        not_before: UnixTime(T0 - 86_400),
        not_after: UnixTime(T0).plus_days(5 * 365),
    };
    let hq = root.node(
        dir.path(),
        NodeKind::Hq,
        "acme-hq",
        &keyfab_node::StoreChoice::Embedded,
        &keyfab_node::BuiltInOnly,
        &clock,
    );
    let site = root.node(
        dir.path(),
        NodeKind::Site,
        "shenzhen-1",
        &keyfab_node::StoreChoice::Embedded,
        &keyfab_node::BuiltInOnly,
        &clock,
    );
    let identity = keyfab_site::identity::export_identity(&site).unwrap();
    keyfab_hq::sites::add_site(&hq, &identity).unwrap();
    let create = |name: &str, days: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, policy(days)).unwrap();
        let policy = keyfab_hq::entitlement::load_policy(&path).unwrap();
        let out = dir.path().join(format!("{name}.kfe"));
        let req = keyfab_hq::entitlement::CreateRequest::new("shenzhen-1", policy, &out);
        (keyfab_hq::entitlement::create(&hq, req), out)
    };
    for (name, days) in [("ten-years", "3650"), ("forever", "\"forever\"")] {
        let (created, out) = create(name, days);
        let err = created.unwrap_err().to_string();
        assert!(
            err.contains("keys[0].certificate.days") && err.contains("HQ's cluster certificate"),
            "{err}"
        );
        assert!(!out.exists());
    }
    // Three years fit inside five: the batch CA lasts exactly as long as its last
    // possible certificate (the window's end plus three years).
    let (created, _) = create("three-years", "1095");
    let id = created.unwrap().id;
    let issued = keyfab_hq::entitlement::list_issued(&hq).unwrap();
    let record = issued.iter().find(|r| r.id == id).unwrap();
    let facts = x509::cert_facts(&record.batch_ca_cert).unwrap();
    assert_eq!(facts.not_after.0, 1_798_761_600 + 1095 * 86_400);
}
