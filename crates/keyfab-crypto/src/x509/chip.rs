//! A chip's identity as its vendor certified it: the X.509 chain a secure element carries
//! (leaf: the chip's attestation or transport key; then the vendor's intermediates), up
//! to one of the roots an entitlement's policy names. What the site checks before it
//! seals anything to a chip's key: the chain, then that the key is the leaf's.
//!
//! Vendor chains are not keyfab's: any extended key usage is accepted (vendors use their
//! own, or none), signatures may be ECDSA P-256/P-384, Ed25519 or RSA (TPM endorsement
//! certificates), and an expired chip certificate may be accepted when the policy says so
//! (chip certificates often carry validity periods that end long before the chip does).

use super::{cert_facts, CertificateDer};
use crate::hash::Fingerprint;
use crate::time::UnixTime;
use crate::{CryptoError, Result};

/// Most certificates a chip chain may have (leaf and intermediates).
pub const MAX_CHIP_CHAIN: usize = 4;
/// Largest certificate of a chip chain, in bytes (DER).
pub const MAX_CHIP_CERT_BYTES: usize = 4096;
/// Largest chip chain as sent (PEM text or DER), in bytes.
pub const MAX_CHIP_CHAIN_BYTES: usize = 2 * MAX_CHIP_CHAIN * MAX_CHIP_CERT_BYTES;

/// The facts of a chip's leaf certificate, once its chain verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChipLeaf {
    /// `spki-sha256:<hex>` of the key the leaf certifies, its SubjectPublicKeyInfo in
    /// the form keyfab writes (so it compares with transport and CSR keys).
    pub key_id: String,
    /// SHA-256 of the leaf certificate (DER).
    pub fingerprint: Fingerprint,
    /// The leaf's serial number, hex.
    pub serial_hex: String,
    /// The latest start of validity of the chain's certificates.
    pub not_before: UnixTime,
    /// The earliest end of validity of the chain's certificates.
    pub not_after: UnixTime,
    /// The subject's commonName, if any.
    pub subject_cn: Option<String>,
    /// The subject's serialNumber attribute (2.5.4.5), if any.
    pub subject_serial: Option<String>,
    /// The subjectAltName URIs.
    pub san_uris: Vec<String>,
}

/// Why a chain is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChipRefusal {
    /// Too many certificates, one too large, or not DER.
    #[error("chip chain malformed: {0}")]
    Malformed(String),
    /// No path to a trusted root, a bad signature, a CA as the leaf, certificates never
    /// valid at the same time.
    #[error("chip chain not trusted: {0}")]
    Untrusted(String),
}

/// Any extended key usage, or none: vendors certify chips for purposes of their own.
struct AnyPurpose;

impl webpki::ExtendedKeyUsageValidator for AnyPurpose {
    fn validate(
        &self,
        _: webpki::KeyPurposeIdIter<'_, '_>,
    ) -> std::result::Result<(), webpki::Error> {
        Ok(())
    }
}

/// The certificates of a chain as a station sends it: PEM text (`CERTIFICATE` blocks,
/// leaf first) or DER certificates one after another. Bounded before anything is parsed.
pub fn read_chip_chain(bytes: &[u8]) -> std::result::Result<Vec<Vec<u8>>, ChipRefusal> {
    let malformed = |m: String| ChipRefusal::Malformed(m);
    if bytes.len() > MAX_CHIP_CHAIN_BYTES {
        return Err(malformed(format!(
            "{} bytes, at most {MAX_CHIP_CHAIN_BYTES}",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes).ok();
    let chain = match text.filter(|t| t.contains("-----BEGIN")) {
        Some(text) => {
            let blocks = super::pem_blocks(text).map_err(|e| malformed(e.to_string()))?;
            let mut certs = Vec::new();
            for (tag, der) in blocks {
                if tag != "CERTIFICATE" {
                    return Err(malformed(format!("a {tag} block, only CERTIFICATE")));
                }
                certs.push(der);
            }
            certs
        }
        None => split_der(bytes).ok_or_else(|| malformed("neither PEM nor DER".into()))?,
    };
    if chain.is_empty() || chain.len() > MAX_CHIP_CHAIN {
        return Err(malformed(format!(
            "{} certificates, 1 to {MAX_CHIP_CHAIN}",
            chain.len()
        )));
    }
    Ok(chain)
}

/// DER items one after another, each a definite-length SEQUENCE.
fn split_der(mut rest: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        if out.len() == MAX_CHIP_CHAIN {
            return None;
        }
        let (&tag, after) = rest.split_first()?;
        let (&first, after) = after.split_first()?;
        let (len, after) = match first {
            0..=0x7f => (usize::from(first), after),
            0x81 => (usize::from(*after.first()?), after.get(1..)?),
            0x82 => (
                usize::from(u16::from_be_bytes([*after.first()?, *after.get(1)?])),
                after.get(2..)?,
            ),
            _ => return None,
        };
        if tag != 0x30 || len > after.len() {
            return None;
        }
        let whole = rest.len() - after.len() + len;
        out.push(rest.get(..whole)?.to_vec());
        rest = rest.get(whole..)?;
    }
    Some(out)
}

/// Verifies `chain` (leaf first, then intermediates) to one of `roots`: signatures,
/// basic constraints and path lengths (a CA certificate cannot be the leaf), a leaf key
/// usage, when present, that allows digitalSignature or keyAgreement, and a time at which
/// every certificate of the path was valid — the latest start of validity in the chain.
/// Whether the chain is valid *now* is the policy's to judge
/// ([`ChipLeaf::not_before`], [`ChipLeaf::not_after`]): chip certificates often end long
/// before the chip, and a policy may accept that.
pub fn verify_chip_chain(
    chain: &[Vec<u8>],
    roots: &[&[u8]],
) -> std::result::Result<ChipLeaf, ChipRefusal> {
    let malformed = |m: String| ChipRefusal::Malformed(m);
    let untrusted = |m: String| ChipRefusal::Untrusted(m);
    let [leaf, intermediates @ ..] = chain else {
        return Err(malformed("no certificate".into()));
    };
    if chain.len() > MAX_CHIP_CHAIN {
        return Err(malformed(format!(
            "{} certificates, at most {MAX_CHIP_CHAIN}",
            chain.len()
        )));
    }
    if let Some(big) = chain.iter().find(|c| c.len() > MAX_CHIP_CERT_BYTES) {
        return Err(malformed(format!(
            "a certificate of {} bytes, at most {MAX_CHIP_CERT_BYTES}",
            big.len()
        )));
    }
    let mut facts = Vec::with_capacity(chain.len());
    for cert in chain {
        facts.push(cert_facts(cert).map_err(|e| malformed(e.to_string()))?);
    }
    let not_before = facts
        .iter()
        .map(|f| f.not_before)
        .max()
        .unwrap_or(UnixTime(0));
    let not_after = facts
        .iter()
        .map(|f| f.not_after)
        .min()
        .unwrap_or(UnixTime(0));
    super::webpki_path(
        roots,
        intermediates,
        leaf,
        (not_before, None),
        AnyPurpose,
        None,
    )
    .map_err(|e| untrusted(e.to_string()))?;
    leaf_facts(leaf, not_before, not_after)
}

/// What the leaf says, after its chain verified.
fn leaf_facts(
    leaf: &[u8],
    not_before: UnixTime,
    not_after: UnixTime,
) -> std::result::Result<ChipLeaf, ChipRefusal> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| ChipRefusal::Malformed(e.to_string()))?;
    if let Ok(Some(ku)) = cert.key_usage() {
        if !(ku.value.digital_signature() || ku.value.key_agreement()) {
            return Err(ChipRefusal::Untrusted(
                "the leaf's key usage allows neither signing nor key agreement".into(),
            ));
        }
    }
    let subject = cert.subject();
    let subject_cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_owned);
    let subject_serial = subject
        .iter_by_oid(&x509_parser::oid_registry::OID_X509_SERIALNUMBER)
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_owned);
    let mut san_uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                san_uris.push((*uri).to_owned());
            }
        }
    }
    let spki = cert.public_key().raw;
    // A key keyfab reads compares in the form keyfab writes; any other is named by its
    // bytes as sent, and matches nothing a request presents.
    let key_id = match super::device_public_key(spki) {
        Ok(key) => crate::devicekey::public_key_id(&key).to_text(),
        Err(_) => crate::devicekey::KeyId::Public(Fingerprint::of(spki)).to_text(),
    };
    Ok(ChipLeaf {
        key_id,
        fingerprint: Fingerprint::of(leaf),
        serial_hex: hex::encode(cert.raw_serial()),
        not_before,
        not_after,
        subject_cn,
        subject_serial,
        san_uris,
    })
}

/// A chip vendor's root for drills and the simulator: self-signed, P-256, path length 1.
pub fn chip_vendor_root(
    key: &dyn crate::sign::EcdsaSigner,
    subject: &str,
    validity: super::Validity,
    rng: &dyn crate::rng::SecureRng,
) -> Result<Vec<u8>> {
    let mut p = super::base_params(super::parse_dn(subject)?, validity, rng)?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.use_authority_key_identifier_extension = false;
    let cert = p
        .self_signed(&super::Signer::new(key))
        .map_err(super::build_err)?;
    Ok(cert.der().to_vec())
}

/// The vendor certifies a chip's P-256 key (its transport or attestation key): an end
/// entity, keyUsage keyAgreement and digitalSignature, the chip's serial number in the
/// subject (`CN=<serial>`, serialNumber `<serial>`) and as `urn:chip:<serial>`.
pub fn issue_chip_certificate(
    vendor_key: &dyn crate::sign::EcdsaSigner,
    vendor_cert: &[u8],
    chip_point: &[u8],
    chip_serial: &str,
    validity: super::Validity,
    rng: &dyn crate::rng::SecureRng,
) -> Result<Vec<u8>> {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, chip_serial);
    dn.push(
        rcgen::DnType::CustomDnType(vec![2, 5, 4, 5]),
        rcgen::DnValue::PrintableString(
            chip_serial
                .try_into()
                .map_err(|_| CryptoError::CertificateBuild("chip serial".into()))?,
        ),
    );
    let mut p = super::base_params(dn, validity, rng)?;
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyAgreement,
    ];
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("urn:chip:{chip_serial}")
            .try_into()
            .map_err(|_| CryptoError::CertificateBuild("chip serial".into()))?,
    )];
    let signer = super::Signer::new(vendor_key);
    let issuer = rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(vendor_cert), &signer)
        .map_err(super::build_err)?;
    let cert = p
        .signed_by(&super::P256Public(chip_point.to_vec()), &issuer)
        .map_err(super::build_err)?;
    Ok(cert.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SystemRng;
    use crate::sign::SigningKey;
    use crate::x509::Validity;

    const NOW: UnixTime = UnixTime(1_800_000_000);

    fn years(from: i64, n: i64) -> Validity {
        Validity {
            not_before: UnixTime(from),
            not_after: UnixTime(from).plus_days(365 * n),
        }
    }

    struct Vendor {
        key: SigningKey,
        root: Vec<u8>,
    }

    fn vendor(name: &str) -> Vendor {
        let key = SigningKey::generate(&SystemRng).unwrap();
        let root =
            chip_vendor_root(&key, &format!("CN={name}"), years(0, 100), &SystemRng).unwrap();
        Vendor { key, root }
    }

    fn chip(v: &Vendor, serial: &str, validity: Validity) -> (SigningKey, Vec<u8>) {
        let key = SigningKey::generate(&SystemRng).unwrap();
        let cert = issue_chip_certificate(
            &v.key,
            &v.root,
            key.verifying_key().sec1(),
            serial,
            validity,
            &SystemRng,
        )
        .unwrap();
        (key, cert)
    }

    fn verify(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> std::result::Result<ChipLeaf, ChipRefusal> {
        let roots: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
        verify_chip_chain(chain, &roots)
    }

    #[test]
    fn a_chip_of_a_trusted_vendor_verifies_with_its_facts() {
        let v = vendor("Chips Inc root");
        let (key, cert) = chip(&v, "0123ABCD", years(0, 100));
        let roots = [v.root.clone()];
        let leaf = verify(std::slice::from_ref(&cert), &roots).unwrap();
        let spki = key.verifying_key().spki_der();
        assert_eq!(
            leaf.key_id,
            format!("spki-sha256:{}", Fingerprint::of(&spki).to_hex())
        );
        assert_eq!(
            (leaf.not_before, leaf.not_after),
            (UnixTime(0), UnixTime(0).plus_days(36_500))
        );
        assert_eq!(leaf.fingerprint, Fingerprint::of(&cert));
        assert_eq!(leaf.subject_cn.as_deref(), Some("0123ABCD"));
        assert_eq!(leaf.subject_serial.as_deref(), Some("0123ABCD"));
        assert_eq!(leaf.san_uris, ["urn:chip:0123ABCD"]);
    }

    #[test]
    fn another_vendor_a_broken_signature_and_a_ca_leaf_are_refused() {
        let v = vendor("Chips Inc root");
        let other = vendor("Other Chips root");
        let roots = [v.root.clone()];
        let (_, foreign) = chip(&other, "1", years(0, 100));
        assert!(matches!(
            verify(&[foreign], &roots),
            Err(ChipRefusal::Untrusted(_))
        ));
        let (_, mut cert) = chip(&v, "2", years(0, 100));
        let n = cert.len();
        cert[n - 3] ^= 1;
        assert!(verify(&[cert], &roots).is_err());
        // The vendor's own root is a CA: it cannot stand as a chip.
        assert!(verify(std::slice::from_ref(&v.root), &roots).is_err());
        // Expired: the chain verifies; its validity is the policy's to judge.
        let (_, old) = chip(&v, "3", years(0, 10));
        let leaf = verify(&[old], &roots).unwrap();
        assert!(leaf.not_after < NOW);
    }

    #[test]
    fn chains_are_read_from_pem_or_der_within_bounds() {
        let v = vendor("Chips Inc root");
        let (_, cert) = chip(&v, "4", years(0, 100));
        let pem = format!(
            "{}{}",
            crate::x509::to_pem(&cert, "CERTIFICATE"),
            crate::x509::to_pem(&v.root, "CERTIFICATE")
        );
        assert_eq!(
            read_chip_chain(pem.as_bytes()).unwrap(),
            [cert.clone(), v.root.clone()]
        );
        let der = [cert.clone(), v.root.clone()].concat();
        assert_eq!(
            read_chip_chain(&der).unwrap(),
            [cert.clone(), v.root.clone()]
        );
        let key = crate::x509::to_pem(&[0x30, 0], "PRIVATE KEY");
        assert!(read_chip_chain(key.as_bytes()).is_err());
        assert!(read_chip_chain(&der[..der.len() - 1]).is_err());
        assert!(read_chip_chain(b"").is_err());
        assert!(read_chip_chain(&cert.repeat(5)).is_err());
        assert!(read_chip_chain(&vec![0x30; MAX_CHIP_CHAIN_BYTES + 1]).is_err());
    }

    #[test]
    fn bounds_are_enforced_before_parsing() {
        let roots: [Vec<u8>; 0] = [];
        assert!(matches!(
            verify(&[], &roots),
            Err(ChipRefusal::Malformed(_))
        ));
        assert!(matches!(
            verify(&vec![vec![0x30; 10]; 5], &roots),
            Err(ChipRefusal::Malformed(_))
        ));
        assert!(matches!(
            verify(&[vec![0x30; 5000]], &roots),
            Err(ChipRefusal::Malformed(_))
        ));
    }
}
