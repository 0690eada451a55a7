//! HQ's replay of chip attestations: each release under `[chips] attestation =
//! "required"` must come right after a `chip_attested` record whose chain HQ verifies
//! again against the roots of the policy it signed, certifying the transport key the
//! release was sealed to and naming the device. Logs made of chosen records, as a lying
//! site would sign them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_audit::Event;
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::rng::SystemRng;
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, chip, Validity};
use keyfab_testkit::forge::{forged_release, write_forged_log};
use keyfab_testkit::{policy, World, T0};

struct Vendor {
    key: SigningKey,
    root: Vec<u8>,
}

fn vendor(name: &str) -> Vendor {
    let key = SigningKey::generate(&SystemRng).unwrap();
    let validity = Validity {
        not_before: UnixTime(T0 - 86_400),
        not_after: x509::NO_EXPIRY,
    };
    let root = chip::chip_vendor_root(&key, &format!("CN={name}"), validity, &SystemRng).unwrap();
    Vendor { key, root }
}

/// A chip of `v` with serial `serial`: its certificate (DER) and its key's id.
fn chip_of(v: &Vendor, serial: &str) -> (Vec<u8>, String) {
    let key = SigningKey::generate(&SystemRng).unwrap();
    let validity = Validity {
        not_before: UnixTime(T0 - 86_400),
        not_after: UnixTime(T0 + 3_650 * 86_400),
    };
    let cert = chip::issue_chip_certificate(
        &v.key,
        &v.root,
        key.verifying_key().sec1(),
        serial,
        validity,
        &SystemRng,
    )
    .unwrap();
    let id = format!(
        "spki-sha256:{}",
        Fingerprint::of(&key.verifying_key().spki_der()).to_hex()
    );
    (cert, id)
}

fn attested(id: &str, device: &str, chain: &[Vec<u8>], transport_key: &str) -> Event {
    Event::ChipAttested {
        entitlement: id.to_owned(),
        request_id: format!("r-{device}"),
        device_id: device.to_owned(),
        certificate: Fingerprint::of(&chain[0]).to_hex(),
        serial: "01".into(),
        transport_key: Some(transport_key.to_owned()),
        chain: chain
            .iter()
            .map(|c| serde_bytes::ByteBuf::from(c.clone()))
            .collect(),
    }
}

fn denied(id: &str, device: &str, code: &str) -> Event {
    keyfab_testkit::forge::forged_denial(id, device, code)
}

#[test]
fn a_release_without_a_chip_attestation_that_verifies_is_a_violation() {
    let ours = vendor("Chips Inc root");
    let theirs = vendor("Other Chips root");
    let (good, good_key) = chip_of(&ours, "D-1");
    let (foreign, foreign_key) = chip_of(&theirs, "D-1");
    let (named_other, named_other_key) = chip_of(&ours, "D-9");
    let mut broken = good.clone();
    let n = broken.len();
    broken[n - 3] ^= 1;
    let extra = "[chips]\nattestation = \"required\"\nroots = [\"vendor.crt\"]\ndevice_id_from = \"subject-serial\"\n";
    let root_pem = x509::to_pem(&ours.root, "CERTIFICATE");
    type Case<'a> = (&'a str, Vec<Event>, &'a [&'a str]);
    let cases = |id: &str| -> Vec<Case<'_>> {
        let release = || forged_release(id, "D-1");
        vec![
            (
                "clean",
                vec![
                    attested(id, "D-1", std::slice::from_ref(&good), &good_key),
                    release(),
                    denied(id, "D-2", "chip_key_mismatch"),
                ],
                &[],
            ),
            ("none", vec![release()], &["chip_untrusted"]),
            (
                "foreign",
                vec![
                    attested(id, "D-1", std::slice::from_ref(&foreign), &foreign_key),
                    release(),
                ],
                &["chip_untrusted"],
            ),
            (
                "broken",
                vec![
                    attested(id, "D-1", std::slice::from_ref(&broken), &good_key),
                    release(),
                ],
                &["chip_untrusted"],
            ),
            (
                "root-as-chip",
                vec![
                    attested(id, "D-1", std::slice::from_ref(&ours.root), &good_key),
                    release(),
                ],
                &["chip_untrusted"],
            ),
            (
                "other-key",
                vec![
                    attested(id, "D-1", std::slice::from_ref(&good), &foreign_key),
                    release(),
                ],
                &["chip_key_mismatch"],
            ),
            (
                "other-device",
                vec![
                    attested(
                        id,
                        "D-1",
                        std::slice::from_ref(&named_other),
                        &named_other_key,
                    ),
                    release(),
                ],
                &["chip_binding_mismatch"],
            ),
            (
                "unreleased",
                vec![
                    attested(id, "D-1", std::slice::from_ref(&good), &good_key),
                    denied(id, "D-1", "chip_untrusted"),
                ],
                &["chip_attestation_unreleased"],
            ),
            (
                "another-request",
                vec![
                    attested(id, "D-2", std::slice::from_ref(&good), &good_key),
                    release(),
                ],
                &["chip_attestation_unreleased", "chip_untrusted"],
            ),
        ]
    };
    for name in [
        "clean",
        "none",
        "foreign",
        "broken",
        "root-as-chip",
        "other-key",
        "other-device",
        "unreleased",
        "another-request",
    ] {
        let w = World::new();
        let id = w.entitlement(
            name,
            &policy(5, extra, "site"),
            &[("vendor.crt", root_pem.as_bytes())],
        );
        let case = cases(&id).into_iter().find(|c| c.0 == name).unwrap();
        let mut log = vec![(
            T0,
            Event::EntitlementImported {
                entitlement: id.clone(),
                sequence: 1,
                pool_keys: 0,
            },
        )];
        log.extend(case.1.into_iter().map(|e| (T0 + 1, e)));
        let out = w.dir.path().join(format!("{name}.kfa"));
        write_forged_log(&w.site, log, &format!("bundle-{name}"), &out);
        let imported = keyfab_hq::audit::import(&w.hq, &out, None).expect("imported");
        let kinds: Vec<String> = imported
            .violations
            .iter()
            .map(|v| v.kind.to_string())
            .collect();
        assert_eq!(kinds, case.2, "{name}: {:?}", imported.violations);
    }
}

#[test]
fn a_policy_names_its_chip_roots_as_ca_certificates() {
    let w = World::new();
    let ours = vendor("Chips Inc root");
    let (leaf, _) = chip_of(&ours, "D-1");
    let extra = "[chips]\nattestation = \"required\"\nroots = [\"vendor.crt\"]\n";
    let dir = w.dir.path().join("leaf-as-root");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("vendor.crt"), x509::to_pem(&leaf, "CERTIFICATE")).unwrap();
    std::fs::write(dir.join("policy.toml"), policy(5, extra, "site")).unwrap();
    let e = keyfab_hq::entitlement::load_policy(&dir.join("policy.toml")).unwrap_err();
    assert!(e.to_string().contains("chips.roots"), "{e}");
    assert!(e.to_string().contains("not a CA certificate"), "{e}");
    std::fs::write(dir.join("vendor.crt"), b"not a certificate").unwrap();
    let e = keyfab_hq::entitlement::load_policy(&dir.join("policy.toml")).unwrap_err();
    assert!(e.to_string().contains("chips.roots"), "{e}");
}
