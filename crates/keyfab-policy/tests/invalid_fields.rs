//! Every invalid policy field is refused, and the message names the field.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_policy::PolicyDraft;

const VALID: &str = r#"
product = "thermostat-v2"
devices = 1000
valid_from  = "2026-11-25T00:00:00Z"
valid_until = "2027-02-01T00:00:00Z"
audit_every_days = 14

[limits]
daily = 200
timezone = "Asia/Shanghai"

[device_ids]
id_pattern = "^TSV2-[0-9]{8}$"

[stations]
allowed = ["line-1", "line-2"]

[[keys]]
name = "identity"
type = "ec-p256"
source = "hq-pool"
certificate = { subject = "CN={device_id},O=Acme", days = 3650 }

[[keys]]
name = "fw"
type = "aes-256"
source = "derived"

[approval]
threshold = 2
approvers = ["alice.pub", "bob.pub", "carol.pub"]
required_for = ["activate"]
"#;

fn refused(edit: (&str, &str), field: &str) {
    assert!(
        VALID.contains(edit.0),
        "test edit does not apply: {}",
        edit.0
    );
    let text = VALID.replacen(edit.0, edit.1, 1);
    let err = PolicyDraft::parse(&text).expect_err(&format!("accepted: {}", edit.1));
    let shown = err.to_string();
    assert!(
        shown.contains(field),
        "message `{shown}` does not name `{field}`"
    );
}

#[test]
fn the_valid_policy_parses() {
    let d = PolicyDraft::parse(VALID).unwrap();
    assert_eq!(d.approver_paths(), ["alice.pub", "bob.pub", "carol.pub"]);
    let p = d.finish(vec!["a".into(), "b".into(), "c".into()]).unwrap();
    assert_eq!(p.devices, 1000);
    assert_eq!(p.timezone, "Asia/Shanghai");
}

#[test]
fn every_invalid_field_is_named() {
    let cases: &[((&str, &str), &str)] = &[
        (("product = \"thermostat-v2\"", "product = \"\""), "product"),
        (("devices = 1000", "devices = 0"), "devices"),
        (("devices = 1000", "devices = -5"), "devices"),
        (("devices = 1000", "devices = \"many\""), "devices"),
        (
            (
                "valid_from  = \"2026-11-25T00:00:00Z\"",
                "valid_from = \"yesterday\"",
            ),
            "valid_from",
        ),
        (
            (
                "valid_until = \"2027-02-01T00:00:00Z\"",
                "valid_until = \"2026-11-25T00:00:00Z\"",
            ),
            "valid_until",
        ),
        (
            ("audit_every_days = 14", "audit_every_days = 0"),
            "audit_every_days",
        ),
        (("daily = 200", "daily = 2000"), "limits.daily"),
        (("daily = 200", "daily = 0"), "limits.daily"),
        (
            (
                "timezone = \"Asia/Shanghai\"",
                "timezone = \"Mars/Olympus\"",
            ),
            "limits.timezone",
        ),
        (
            (
                "id_pattern = \"^TSV2-[0-9]{8}$\"",
                "id_pattern = \"^TSV2-[0-9\"",
            ),
            "id_pattern",
        ),
        (
            ("allowed = [\"line-1\", \"line-2\"]", "allowed = []"),
            "stations.allowed",
        ),
        (
            (
                "allowed = [\"line-1\", \"line-2\"]",
                "allowed = [\"line-1\", \"line-1\"]",
            ),
            "stations.allowed",
        ),
        (
            (
                "allowed = [\"line-1\", \"line-2\"]",
                "allowed = [\"line 1\"]",
            ),
            "stations.allowed",
        ),
        (("name = \"identity\"", "name = \"fw\""), "keys[1].name"),
        (("name = \"identity\"", "name = \"\""), "keys[0].name"),
        (
            ("type = \"ec-p256\"", "type = \"rsa-2048\""),
            "keys[0].type",
        ),
        (
            ("source = \"hq-pool\"", "source = \"cloud\""),
            "keys[0].source",
        ),
        (("type = \"aes-256\"", "type = \"ed25519\""), "keys[1].type"),
        (("days = 3650", "days = 0"), "keys[0].certificate.days"),
        (
            (
                "subject = \"CN={device_id},O=Acme\"",
                "subject = \"CN={serial}\"",
            ),
            "keys[0].certificate.subject",
        ),
        (
            ("subject = \"CN={device_id},O=Acme\"", "subject = \"XX=1\""),
            "keys[0].certificate.subject",
        ),
        (("threshold = 2", "threshold = 4"), "approval.threshold"),
        (("threshold = 2", "threshold = 0"), "approval.threshold"),
        (
            (
                "approvers = [\"alice.pub\", \"bob.pub\", \"carol.pub\"]",
                "approvers = [\"alice.pub\", \"alice.pub\"]",
            ),
            "approval.approvers",
        ),
        (
            (
                "required_for = [\"activate\"]",
                "required_for = [\"launch\"]",
            ),
            "approval.required_for",
        ),
        (
            ("required_for = [\"activate\"]", "required_for = []"),
            "approval.required_for",
        ),
        (
            (
                "audit_every_days = 14",
                "audit_every_days = 14\ncolour = \"red\"",
            ),
            "colour",
        ),
        (("daily = 200", "daily = 200\nweekly = 5"), "weekly"),
        (("[device_ids]", "[devices]"), "devices"),
    ];
    for (edit, field) in cases {
        refused(*edit, field);
    }
}

#[test]
fn missing_keys_and_device_source_without_certificate_are_named() {
    let no_keys = VALID.split("[[keys]]").next().unwrap().to_owned()
        + "[approval]\nthreshold = 1\napprovers = [\"a.pub\"]\n";
    let e = PolicyDraft::parse(&no_keys).unwrap_err();
    assert!(e.to_string().contains("keys"), "{e}");

    let device = VALID.replace(
        "source = \"hq-pool\"\ncertificate = { subject = \"CN={device_id},O=Acme\", days = 3650 }",
        "source = \"device\"",
    );
    let e = PolicyDraft::parse(&device).unwrap_err();
    assert!(e.to_string().contains("keys[0].certificate"), "{e}");
}
