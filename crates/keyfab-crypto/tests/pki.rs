//! The keyfab PKI: roles, expiry, foreign roots and path shape.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_crypto::hpke::HpkeSecretKey;
use keyfab_crypto::rng::SystemRng;
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::*;
use keyfab_crypto::CryptoError;

const NOW: UnixTime = UnixTime(1_764_028_800); // 2025-11-25

fn validity(days: i64) -> Validity {
    Validity {
        not_before: NOW,
        not_after: NOW.plus_days(days),
    }
}

struct Cluster {
    key: SigningKey,
    cert: Vec<u8>,
}

fn root(rng: &SystemRng) -> (SigningKey, Vec<u8>) {
    let k = SigningKey::generate(rng).unwrap();
    let c = root_certificate(&k, "CN=Test Root,O=Acme", validity(3650), rng).unwrap();
    (k, c)
}

fn cluster(root: &(SigningKey, Vec<u8>), name: &str, role: Role, rng: &SystemRng) -> Cluster {
    let key = SigningKey::generate(rng).unwrap();
    let csr = read_csr(&cluster_csr(&key, name).unwrap()).unwrap();
    assert_eq!(csr.common_name, name);
    let cert = issue_cluster_certificate(&root.0, &root.1, &csr, role, validity(365), rng).unwrap();
    Cluster { key, cert }
}

fn service(c: &Cluster, role: Role, purpose: Purpose, days: i64, rng: &SystemRng) -> Vec<Vec<u8>> {
    let point = match purpose {
        Purpose::Signing => SigningKey::generate(rng)
            .unwrap()
            .verifying_key()
            .sec1()
            .to_vec(),
        Purpose::KeyAgreement => HpkeSecretKey::generate(rng)
            .public_key()
            .unwrap()
            .sec1()
            .to_vec(),
    };
    let req = ServiceCert {
        subject_point: &point,
        common_name: "svc",
        role,
        purpose,
        validity: validity(days),
    };
    let leaf = issue_service_certificate(&c.key, &c.cert, req, rng).unwrap();
    vec![leaf, c.cert.clone()]
}

#[test]
fn valid_chains_validate_for_their_role_and_purpose() {
    let rng = SystemRng;
    let r = root(&rng);
    let hq = cluster(&r, "acme-hq", Role::Hq, &rng);
    let chain = service(&hq, Role::Hq, Purpose::Signing, 30, &rng);
    let leaf = validate_chain(&r.1, &chain, Role::Hq, Purpose::Signing, NOW).unwrap();
    assert_eq!(leaf.cluster_name, "acme-hq");
    let chain = service(&hq, Role::Hq, Purpose::KeyAgreement, 30, &rng);
    validate_chain(&r.1, &chain, Role::Hq, Purpose::KeyAgreement, NOW).unwrap();
    // A key-agreement certificate is not a signing certificate.
    assert!(validate_chain(&r.1, &chain, Role::Hq, Purpose::Signing, NOW).is_err());
    validate_cluster_certificate(&r.1, &hq.cert, Role::Hq, NOW).unwrap();
}

#[test]
fn site_certificate_never_acts_as_hq() {
    let rng = SystemRng;
    let r = root(&rng);
    let site = cluster(&r, "shenzhen-1", Role::Site, &rng);
    // A site cluster that stamps its own leaf with the HQ role.
    let forged = service(&site, Role::Hq, Purpose::Signing, 30, &rng);
    assert!(matches!(
        validate_chain(&r.1, &forged, Role::Hq, Purpose::Signing, NOW),
        Err(CryptoError::Untrusted(_))
    ));
    let honest = service(&site, Role::Site, Purpose::Signing, 30, &rng);
    assert!(validate_chain(&r.1, &honest, Role::Hq, Purpose::Signing, NOW).is_err());
    assert!(validate_cluster_certificate(&r.1, &site.cert, Role::Hq, NOW).is_err());
}

#[test]
fn expiry_comes_from_the_injected_time() {
    let rng = SystemRng;
    let r = root(&rng);
    let hq = cluster(&r, "acme-hq", Role::Hq, &rng);
    let chain = service(&hq, Role::Hq, Purpose::Signing, 10, &rng);
    assert!(matches!(
        validate_chain(&r.1, &chain, Role::Hq, Purpose::Signing, NOW.plus_days(11)),
        Err(CryptoError::Expired)
    ));
    assert!(matches!(
        validate_chain(
            &r.1,
            &chain,
            Role::Hq,
            Purpose::Signing,
            UnixTime(NOW.0 - 86_400)
        ),
        Err(CryptoError::NotYetValid)
    ));
}

#[test]
fn foreign_root_and_wrong_shape_are_untrusted() {
    let rng = SystemRng;
    let r = root(&rng);
    let other = root(&rng);
    let hq = cluster(&other, "acme-hq", Role::Hq, &rng);
    let chain = service(&hq, Role::Hq, Purpose::Signing, 30, &rng);
    assert!(validate_chain(&r.1, &chain, Role::Hq, Purpose::Signing, NOW).is_err());
    assert!(validate_cluster_certificate(&r.1, &hq.cert, Role::Hq, NOW).is_err());
    let mut long = chain.clone();
    long.push(other.1.clone());
    assert!(validate_chain(&other.1, &long, Role::Hq, Purpose::Signing, NOW).is_err());
    assert!(validate_chain(&other.1, &chain[..1], Role::Hq, Purpose::Signing, NOW).is_err());
}

#[test]
fn batch_ca_cannot_act_as_hq() {
    let rng = SystemRng;
    let r = root(&rng);
    let hq = cluster(&r, "acme-hq", Role::Hq, &rng);
    let batch_key = SigningKey::generate(&rng).unwrap();
    let batch = issue_batch_ca(
        &hq.key,
        &hq.cert,
        &keyfab_crypto::x509::BatchKey::from_pkcs8(batch_key.to_pkcs8().expose()).unwrap(),
        "batch",
        validity(30),
        &rng,
    )
    .unwrap();
    let batch_cluster = Cluster {
        key: batch_key,
        cert: batch,
    };
    let forged = service(&batch_cluster, Role::Hq, Purpose::Signing, 30, &rng);
    assert!(validate_chain(&r.1, &forged, Role::Hq, Purpose::Signing, NOW).is_err());
}
