//! The keyfab PKI in X.509 v3.
//!
//! ```text
//! root CA (offline; pathlen 2)
//!   └─ cluster CA, role hq|site (certificate policy carries the role; pathlen 1)
//!        ├─ service signing certificate   (EKU role, keyUsage digitalSignature)
//!        ├─ service HPKE certificate      (EKU role, keyUsage keyAgreement)
//!        └─ batch CA of one entitlement    (HQ only; policy device-ca; pathlen 0) ─ device certs
//! ```
//!
//! A role is an OID under keyfab's arc. CAs carry it as a certificate policy
//! (certificatePolicies, non-critical), service certificates as an extended key usage.
//! CAs do not carry it as an extended key usage because HQ's cluster CA and the batch CAs
//! sit in every device chain, and TLS stacks read an EKU on a CA as a restriction of the
//! whole path: a device chain would fail `clientAuth` checks. Validation requires the
//! role on every non-root certificate of the path, so a site certificate can never act as
//! HQ. Paths have an exact shape (leaf, cluster CA, root): a longer chain is refused.

use crate::sign::{EcdsaSigner, VerifyingKey};
use crate::time::UnixTime;
use crate::{CryptoError, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CustomExtension,
    DistinguishedName, DnType, IsCa, Issuer, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

mod batch_key;
pub mod chip;
mod device_cert;
mod line;
pub use batch_key::{BatchKey, BatchKeyType};
pub(crate) use device_cert::{push_tlv, push_wrapped};
pub use device_cert::{AltNameKind, DeviceIssuer, DeviceProfile, ProfileSpec, RawExtension};
pub use line::{issue_server_certificate, issue_station_certificate, line_ca_certificate};

/// keyfab's OID arc: 2.25.73303038137255920152163058607138772276 (a UUID OID, X.667),
/// followed by `.1.<n>` for roles. The constants are the DER contents of each OID.
pub(crate) const ARC: [u8; 19] = [
    0x69, 0xee, 0xa5, 0xd3, 0xb4, 0x8a, 0xb9, 0xaa, 0xb3, 0xff, 0x88, 0xe8, 0xdd, 0xa5, 0xae, 0xeb,
    0xce, 0xaa, 0x34,
];
const fn role_oid(n: u8) -> [u8; 21] {
    let mut out = [0u8; 21];
    let mut i = 0;
    while i < ARC.len() {
        out[i] = ARC[i];
        i += 1;
    }
    out[19] = 0x01;
    out[20] = n;
    out
}
static OID_ROLE_HQ: [u8; 21] = role_oid(1);
static OID_ROLE_SITE: [u8; 21] = role_oid(2);
static OID_ROLE_STATION: [u8; 21] = role_oid(3);
static OID_ROLE_DEVICE_CA: [u8; 21] = role_oid(4);

/// What a certificate may act as. Carried as an extended key usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Headquarters' cluster.
    Hq,
    /// A site's cluster.
    Site,
    /// A production-line station (client of the station API).
    Station,
    /// An entitlement's batch CA, which issues device certificates.
    DeviceCa,
}

impl Role {
    fn oid(self) -> &'static [u8] {
        match self {
            Role::Hq => &OID_ROLE_HQ,
            Role::Site => &OID_ROLE_SITE,
            Role::Station => &OID_ROLE_STATION,
            Role::DeviceCa => &OID_ROLE_DEVICE_CA,
        }
    }
    /// The name the CLI and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Hq => "hq",
            Role::Site => "site",
            Role::Station => "station",
            Role::DeviceCa => "device-ca",
        }
    }
    /// The cluster role named `s` (`hq` or `site`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hq" => Some(Role::Hq),
            "site" => Some(Role::Site),
            _ => None,
        }
    }
}

/// What a leaf certificate's key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Signing.
    Signing,
    /// HPKE: files are sealed to it.
    KeyAgreement,
}

const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

pub(crate) const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

const P384_SPKI_PREFIX: [u8; 23] = [
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

/// DER SubjectPublicKeyInfo of an uncompressed P-384 point.
pub fn p384_spki(point: &[u8]) -> Vec<u8> {
    let mut v = P384_SPKI_PREFIX.to_vec();
    v.extend_from_slice(point);
    v
}

/// DER SubjectPublicKeyInfo of an uncompressed P-256 point.
pub fn p256_spki(point: &[u8]) -> Vec<u8> {
    let mut v = P256_SPKI_PREFIX.to_vec();
    v.extend_from_slice(point);
    v
}

pub(crate) fn p256_point_from_spki(spki: &[u8]) -> Result<Vec<u8>> {
    match spki.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 => Ok(point.to_vec()),
        _ => Err(CryptoError::InvalidKey("not a P-256 SubjectPublicKeyInfo")),
    }
}

/// Any of our signers as an rcgen signer (X.509 wants ASN.1 ECDSA signatures).
struct Signer<'a>(&'a dyn EcdsaSigner, Vec<u8>);

impl<'a> Signer<'a> {
    fn new(key: &'a dyn EcdsaSigner) -> Self {
        Self(key, key.verifying_key().sec1().to_vec())
    }
}

impl rcgen::PublicKeyData for Signer<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.1
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for Signer<'_> {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        let fixed = self.0.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError)?;
        fixed_to_asn1(&fixed).map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// A P-256 public key that is not one of our signing keys (an HPKE key, a CSR's key).
struct P256Public(Vec<u8>);

impl rcgen::PublicKeyData for P256Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A name attribute a keyfab certificate may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameAttribute {
    CommonName,
    Organization,
    OrganizationalUnit,
    Country,
    StateOrProvince,
    Locality,
}

impl NameAttribute {
    fn parse(key: &str) -> Option<Self> {
        Some(match key {
            "CN" => Self::CommonName,
            "O" => Self::Organization,
            "OU" => Self::OrganizationalUnit,
            "C" => Self::Country,
            "ST" => Self::StateOrProvince,
            "L" => Self::Locality,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::CommonName => "CN",
            Self::Organization => "O",
            Self::OrganizationalUnit => "OU",
            Self::Country => "C",
            Self::StateOrProvince => "ST",
            Self::Locality => "L",
        }
    }

    fn dn_type(self) -> DnType {
        match self {
            Self::CommonName => DnType::CommonName,
            Self::Organization => DnType::OrganizationName,
            Self::OrganizationalUnit => DnType::OrganizationalUnitName,
            Self::Country => DnType::CountryName,
            Self::StateOrProvince => DnType::StateOrProvinceName,
            Self::Locality => DnType::LocalityName,
        }
    }

    /// The attribute type's OID, DER-encoded (2.5.4.x).
    fn oid_der(self) -> &'static [u8] {
        match self {
            Self::CommonName => &[0x06, 0x03, 0x55, 0x04, 0x03],
            Self::Organization => &[0x06, 0x03, 0x55, 0x04, 0x0a],
            Self::OrganizationalUnit => &[0x06, 0x03, 0x55, 0x04, 0x0b],
            Self::Country => &[0x06, 0x03, 0x55, 0x04, 0x06],
            Self::StateOrProvince => &[0x06, 0x03, 0x55, 0x04, 0x08],
            Self::Locality => &[0x06, 0x03, 0x55, 0x04, 0x07],
        }
    }
}

/// Reads `CN=...,O=...` (CN, O, OU, C, ST, L): each attribute once, where it is first
/// named, with the value it is last given; values trimmed and never empty.
fn dn_attributes(text: &str) -> Result<Vec<(NameAttribute, &str)>> {
    let mut out: Vec<(NameAttribute, &str)> = Vec::with_capacity(4);
    for part in text.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| CryptoError::CertificateBuild(format!("'{part}' is not KEY=value")))?;
        let v = v.trim();
        if v.is_empty() {
            return Err(CryptoError::CertificateBuild(format!(
                "'{part}' has no value"
            )));
        }
        let attribute = NameAttribute::parse(k.trim()).ok_or_else(|| {
            CryptoError::CertificateBuild(format!(
                "unsupported attribute '{}' (use CN, O, OU, C, ST, L)",
                k.trim()
            ))
        })?;
        match out.iter_mut().find(|(a, _)| *a == attribute) {
            Some(named) => named.1 = v,
            None => out.push((attribute, v)),
        }
    }
    Ok(out)
}

/// Parses `CN=...,O=...` (CN, O, OU, C, ST, L) into a distinguished name.
pub fn parse_dn(text: &str) -> Result<DistinguishedName> {
    let mut dn = DistinguishedName::new();
    for (attribute, value) in dn_attributes(text)? {
        dn.push(attribute.dn_type(), value);
    }
    Ok(dn)
}

fn odt(t: UnixTime) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(t.0)
        .map_err(|_| CryptoError::CertificateBuild("time out of range".into()))
}

fn serial(rng: &dyn crate::rng::SecureRng) -> SerialNumber {
    SerialNumber::from_slice(&random_serial(rng))
}

fn eku(roles: &[Role]) -> CustomExtension {
    let oids: Vec<&[u8]> = roles.iter().map(|r| r.oid()).collect();
    eku_oids(&oids)
}

/// A certificatePolicies extension (non-critical) naming `role`: how a CA carries its
/// role without restricting the purposes of the paths it is in (see the module doc).
fn role_policy(role: Role) -> CustomExtension {
    // certificatePolicies ::= SEQUENCE OF PolicyInformation ::= SEQUENCE { OID }
    let oid = role.oid();
    let mut content = vec![0x30, oid.len() as u8 + 4, 0x30, oid.len() as u8 + 2, 0x06];
    content.push(oid.len() as u8);
    content.extend_from_slice(oid);
    CustomExtension::from_oid_content(&[2, 5, 29, 32], content)
}

/// The date RFC 5280 §4.1.2.5 gives a certificate with no well-defined expiration:
/// 9999-12-31T23:59:59Z (`99991231235959Z`).
pub const NO_EXPIRY: UnixTime = UnixTime(253_402_300_799);

/// An extended key usage extension of these OIDs (DER contents of each).
fn eku_oids(oids: &[&[u8]]) -> CustomExtension {
    // ExtKeyUsageSyntax ::= SEQUENCE SIZE (1..MAX) OF KeyPurposeId
    let mut seq = Vec::new();
    for oid in oids {
        seq.push(0x06);
        seq.push(oid.len() as u8);
        seq.extend_from_slice(oid);
    }
    let mut content = vec![0x30, seq.len() as u8];
    content.extend(seq);
    CustomExtension::from_oid_content(&[2, 5, 29, 37], content)
}

/// Validity and serial of a certificate to issue.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// The first second it is valid.
    pub not_before: UnixTime,
    /// The last second it is valid.
    pub not_after: UnixTime,
}

fn base_params(
    subject: DistinguishedName,
    validity: Validity,
    rng: &dyn crate::rng::SecureRng,
) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject;
    p.not_before = odt(validity.not_before)?;
    p.not_after = odt(validity.not_after)?;
    p.serial_number = Some(serial(rng));
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

fn build_err(e: rcgen::Error) -> CryptoError {
    CryptoError::CertificateBuild(e.to_string())
}

/// The self-signed root CA certificate.
pub fn root_certificate(
    key: &dyn EcdsaSigner,
    subject: &str,
    validity: Validity,
    rng: &dyn crate::rng::SecureRng,
) -> Result<Vec<u8>> {
    let mut p = base_params(parse_dn(subject)?, validity, rng)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(2));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = false;
    let cert = p.self_signed(&Signer::new(key)).map_err(build_err)?;
    Ok(cert.der().to_vec())
}

/// A PKCS#10 request for a cluster certificate, subject `CN=<name>`.
pub fn cluster_csr(key: &dyn EcdsaSigner, name: &str) -> Result<Vec<u8>> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let csr = p.serialize_request(&Signer::new(key)).map_err(build_err)?;
    Ok(csr.der().to_vec())
}

/// The subject name and key of a CSR, after checking its self-signature.
pub struct CsrInfo {
    /// The subject's common name.
    pub common_name: String,
    /// The key the CSR asks to certify.
    pub public_key: VerifyingKey,
}

/// Reads a DER CSR and checks its self-signature.
pub fn read_csr(der: &[u8]) -> Result<CsrInfo> {
    let params =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
            .map_err(|e| CryptoError::CertificateMalformed(format!("CSR: {e}")))?;
    let public_key = VerifyingKey::from_sec1(rcgen::PublicKeyData::der_bytes(&params.public_key))?;
    let common_name = params
        .params
        .distinguished_name
        .get(&DnType::CommonName)
        .and_then(|v| match v {
            rcgen::DnValue::Utf8String(s) => Some(s.clone()),
            rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
            _ => None,
        })
        .ok_or_else(|| CryptoError::CertificateMalformed("CSR has no CN".into()))?;
    Ok(CsrInfo {
        common_name,
        public_key,
    })
}

/// The root signs a cluster CA for `role`. Only the CSR's name and key are taken from it.
pub fn issue_cluster_certificate(
    root_key: &dyn EcdsaSigner,
    root_cert: &[u8],
    csr: &CsrInfo,
    role: Role,
    validity: Validity,
    rng: &dyn crate::rng::SecureRng,
) -> Result<Vec<u8>> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, csr.common_name.as_str());
    dn.push(
        DnType::OrganizationalUnitName,
        format!("keyfab {}", role.as_str()),
    );
    let mut p = base_params(dn, validity, rng)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.custom_extensions.push(role_policy(role));
    let signer = Signer::new(root_key);
    let issuer =
        Issuer::from_ca_cert_der(&CertificateDer::from(root_cert), &signer).map_err(build_err)?;
    let cert = p
        .signed_by(&P256Public(csr.public_key.sec1().to_vec()), &issuer)
        .map_err(build_err)?;
    Ok(cert.der().to_vec())
}

/// What a service certificate says: whose key, for what, until when.
#[derive(Debug, Clone, Copy)]
pub struct ServiceCert<'a> {
    /// Uncompressed P-256 point of the certified key.
    pub subject_point: &'a [u8],
    /// The subject's common name.
    pub common_name: &'a str,
    /// The role it carries.
    pub role: Role,
    /// What its key is for.
    pub purpose: Purpose,
    /// When it is valid.
    pub validity: Validity,
}

/// A cluster issues one of its own service certificates (signing or HPKE key).
pub fn issue_service_certificate(
    cluster_key: &dyn EcdsaSigner,
    cluster_cert: &[u8],
    req: ServiceCert<'_>,
    rng: &dyn crate::rng::SecureRng,
) -> Result<Vec<u8>> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.common_name);
    let mut p = base_params(dn, req.validity, rng)?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![match req.purpose {
        Purpose::Signing => KeyUsagePurpose::DigitalSignature,
        Purpose::KeyAgreement => KeyUsagePurpose::KeyAgreement,
    }];
    p.custom_extensions.push(eku(&[req.role]));
    let signer = Signer::new(cluster_key);
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cluster_cert), &signer)
        .map_err(build_err)?;
    let cert = p
        .signed_by(&P256Public(req.subject_point.to_vec()), &issuer)
        .map_err(build_err)?;
    Ok(cert.der().to_vec())
}

/// HQ's cluster CA issues an entitlement's batch CA: path length 0, role device-ca (so it
/// can never act as HQ or a site). Its validity must cover every device certificate it
/// may sign — to the last day of the window plus the certificates' lifetime — or devices
/// stop verifying when it ends; the window itself is enforced by the site, not here.
pub fn issue_batch_ca(
    hq_cluster_key: &dyn EcdsaSigner,
    hq_cluster_cert: &[u8],
    batch_key: &BatchKey,
    common_name: &str,
    validity: Validity,
    rng: &dyn crate::rng::SecureRng,
) -> Result<Vec<u8>> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    let mut p = base_params(dn, validity, rng)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.custom_extensions.push(role_policy(Role::DeviceCa));
    let signer = Signer::new(hq_cluster_key);
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(hq_cluster_cert), &signer)
        .map_err(build_err)?;
    let cert = p
        .signed_by(&batch_key::BatchPublic::of(batch_key), &issuer)
        .map_err(build_err)?;
    Ok(cert.der().to_vec())
}

/// A device's public key, as certified in its device certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePublicKey {
    /// Uncompressed SEC1 point.
    P256(Vec<u8>),
    /// Uncompressed SEC1 point (97 bytes).
    P384(Vec<u8>),
    /// 32-byte Ed25519 public key.
    Ed25519(Vec<u8>),
    /// An RSA key: its whole SubjectPublicKeyInfo (rsaEncryption, NULL parameters).
    Rsa(Vec<u8>),
}

impl DevicePublicKey {
    /// DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        match self {
            DevicePublicKey::P256(p) => p256_spki(p),
            DevicePublicKey::P384(p) => p384_spki(p),
            DevicePublicKey::Rsa(spki) => spki.clone(),
            DevicePublicKey::Ed25519(k) => {
                let mut v = ED25519_SPKI_PREFIX.to_vec();
                v.extend_from_slice(k);
                v
            }
        }
    }
}

/// Reads a device's CSR and checks its self-signature: proof that the device holds the
/// private key. P-256, P-384, Ed25519 and RSA (2048 or 3072 bits) keys are accepted.
pub fn read_device_csr(der: &[u8]) -> Result<DevicePublicKey> {
    use x509_parser::prelude::*;
    // rcgen checks the self-signature; the key's type is read from its
    // SubjectPublicKeyInfo (the signature algorithm does not tell the curve: OpenSSL
    // signs a P-384 CSR with ecdsa-with-SHA256 by default).
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
        .map_err(|e| CryptoError::CertificateMalformed(format!("CSR: {e}")))?;
    let (_, req) = X509CertificationRequest::from_der(der)
        .map_err(|e| CryptoError::CertificateMalformed(format!("CSR: {e}")))?;
    device_public_key(req.certification_request_info.subject_pki.raw)
}

/// The device key a SubjectPublicKeyInfo holds: P-256, P-384 (named curve,
/// uncompressed), Ed25519 or RSA of 2048 or 3072 bits.
pub fn device_public_key(spki: &[u8]) -> Result<DevicePublicKey> {
    if let Some(point) = spki.strip_prefix(&P256_SPKI_PREFIX[..]) {
        VerifyingKey::from_sec1(point)?;
        return Ok(DevicePublicKey::P256(point.to_vec()));
    }
    if let Some(point) = spki.strip_prefix(&P384_SPKI_PREFIX[..]) {
        // A CSR's signature verified under this point, or a chip's certificate names
        // it: compared, never used to verify.
        if point.len() == 97 && point[0] == 0x04 {
            return Ok(DevicePublicKey::P384(point.to_vec()));
        }
    }
    if let Some(key) = spki.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
        if key.len() == 32 {
            return Ok(DevicePublicKey::Ed25519(key.to_vec()));
        }
    }
    match rsa_bits(spki) {
        Some(2048 | 3072) => Ok(DevicePublicKey::Rsa(spki.to_vec())),
        Some(bits) => Err(CryptoError::CertificateMalformed(format!(
            "the RSA key has {bits} bits: 2048 or 3072 are accepted"
        ))),
        None => Err(CryptoError::CertificateMalformed(
            "the key must be P-256, P-384 (named curve, uncompressed), Ed25519 or RSA (2048 or 3072 bits)".into(),
        )),
    }
}

/// The modulus size in bits of an RSA SubjectPublicKeyInfo; `None` if it is not one.
pub fn rsa_bits(spki: &[u8]) -> Option<usize> {
    use x509_parser::prelude::*;
    let (_, info) = SubjectPublicKeyInfo::from_der(spki).ok()?;
    match info.parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Some(rsa.key_size()),
        _ => None,
    }
}

/// A certificate serial: 16 random bytes, positive, no leading zero byte.
pub fn random_serial(rng: &dyn crate::rng::SecureRng) -> [u8; 16] {
    let mut b = [0u8; 16];
    rng.fill(&mut b);
    b[0] = (b[0] & 0x7f) | 0x01;
    b
}

/// What a caller may rely on after [`validate_chain`].
#[derive(Debug, Clone)]
pub struct ValidatedLeaf {
    /// The subject's common name.
    pub common_name: String,
    /// Uncompressed P-256 point of the leaf's key.
    pub public_point: Vec<u8>,
    /// Common name of the cluster CA that issued the leaf (the cluster's name).
    pub cluster_name: String,
    /// The last second it is valid.
    pub not_after: UnixTime,
}

/// Facts read from one certificate (no trust implied).
#[derive(Debug, Clone)]
pub struct CertFacts {
    /// The subject's common name.
    pub common_name: String,
    /// Uncompressed P-256 point of its key, when it is a P-256 key.
    pub public_point: Option<Vec<u8>>,
    /// The first second it is valid.
    pub not_before: UnixTime,
    /// The last second it is valid.
    pub not_after: UnixTime,
    /// The serial number, hex.
    pub serial_hex: String,
    /// The role it carries.
    pub roles: Vec<Role>,
    /// Whether it is a CA (basicConstraints).
    pub is_ca: bool,
}

/// The DER SubjectPublicKeyInfo of a certificate (any key type).
pub fn cert_spki(der: &[u8]) -> Result<Vec<u8>> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| CryptoError::CertificateMalformed(e.to_string()))?;
    Ok(cert.public_key().raw.to_vec())
}

/// What a certificate says, read without trusting it.
pub fn cert_facts(der: &[u8]) -> Result<CertFacts> {
    use x509_parser::prelude::*;
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| CryptoError::CertificateMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CryptoError::CertificateMalformed("trailing bytes".into()));
    }
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    let public_point = p256_point_from_spki(cert.public_key().raw).ok();
    // A role is read where either kind of certificate carries it: the EKU of a service
    // certificate, the certificate policies of a CA (and the EKU of CAs made before).
    let mut role_oids: Vec<&[u8]> = Vec::new();
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        role_oids.extend(eku.value.other.iter().map(|oid| oid.as_bytes()));
    }
    for ext in cert.iter_extensions() {
        if let ParsedExtension::CertificatePolicies(policies) = ext.parsed_extension() {
            role_oids.extend(policies.iter().map(|p| p.policy_id.as_bytes()));
        }
    }
    let mut roles = Vec::new();
    for r in [Role::Hq, Role::Site, Role::Station, Role::DeviceCa] {
        if role_oids.contains(&r.oid()) {
            roles.push(r);
        }
    }
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    Ok(CertFacts {
        common_name,
        public_point,
        not_before: UnixTime(cert.validity().not_before.timestamp()),
        not_after: UnixTime(cert.validity().not_after.timestamp()),
        serial_hex: hex::encode(cert.raw_serial()),
        roles,
        is_ca,
    })
}

fn key_usage_allows(
    der: &[u8],
    check: impl Fn(&x509_parser::extensions::KeyUsage) -> bool,
) -> bool {
    use x509_parser::prelude::*;
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => matches!(cert.key_usage(), Ok(Some(ku)) if check(ku.value)),
        Err(_) => false,
    }
}

/// Validates `chain` = [leaf, cluster CA] up to `root_cert` at time `now`, for `role` and
/// `purpose`. Checks signatures, validity periods, basicConstraints and path length
/// (webpki), the role on every non-root certificate, key usage (webpki ignores it) and
/// the exact path shape.
pub fn validate_chain(
    root_cert: &[u8],
    chain: &[Vec<u8>],
    role: Role,
    purpose: Purpose,
    now: UnixTime,
) -> Result<ValidatedLeaf> {
    let [leaf, cluster] = chain else {
        return Err(CryptoError::Untrusted(format!(
            "expected a chain of 2 certificates (leaf, cluster CA), got {}",
            chain.len()
        )));
    };
    let exact_shape = |path: &webpki::VerifiedPath<'_>| -> std::result::Result<(), webpki::Error> {
        if path.intermediate_certificates().count() == 1 {
            Ok(())
        } else {
            Err(webpki::Error::MaximumPathDepthExceeded)
        }
    };
    webpki_path(
        &[root_cert],
        std::slice::from_ref(cluster),
        leaf,
        (now, None),
        // The leaf must carry the role as its EKU (checked below); a CA carries it as a
        // certificate policy, so an EKU is only checked where present.
        webpki::KeyUsage::required_if_present(role.oid()),
        Some(&exact_shape),
    )?;

    // Defence in depth on what webpki does not look at.
    let cluster_facts = cert_facts(cluster)?;
    if !cluster_facts.is_ca || cluster_facts.roles != [role] {
        return Err(CryptoError::Untrusted(format!(
            "cluster certificate is not a {} CA",
            role.as_str()
        )));
    }
    if !key_usage_allows(cluster, |ku| ku.key_cert_sign()) {
        return Err(CryptoError::Untrusted(
            "cluster certificate may not sign certificates".into(),
        ));
    }
    let leaf_facts = cert_facts(leaf)?;
    if leaf_facts.is_ca || leaf_facts.roles != [role] {
        return Err(CryptoError::Untrusted(format!(
            "leaf certificate is not a {} service certificate",
            role.as_str()
        )));
    }
    let usage_ok = match purpose {
        Purpose::Signing => key_usage_allows(leaf, |ku| ku.digital_signature()),
        Purpose::KeyAgreement => key_usage_allows(leaf, |ku| ku.key_agreement()),
    };
    if !usage_ok {
        return Err(CryptoError::Untrusted(format!(
            "leaf certificate key usage does not allow {purpose:?}"
        )));
    }
    let public_point = leaf_facts
        .public_point
        .ok_or(CryptoError::InvalidKey("leaf key is not P-256"))?;
    Ok(ValidatedLeaf {
        common_name: leaf_facts.common_name,
        public_point,
        cluster_name: cluster_facts.common_name,
        not_after: leaf_facts.not_after,
    })
}

/// Checks that `cluster_cert` was issued by `root_cert` for `role` and is valid at `now`.
/// Used when a cluster installs its own certificate.
pub fn validate_cluster_certificate(
    root_cert: &[u8],
    cluster_cert: &[u8],
    role: Role,
    now: UnixTime,
) -> Result<CertFacts> {
    let facts = cert_facts(cluster_cert)?;
    if !facts.is_ca || facts.roles != [role] {
        return Err(CryptoError::Untrusted(format!(
            "certificate is not a {} cluster CA",
            role.as_str()
        )));
    }
    if now < facts.not_before {
        return Err(CryptoError::NotYetValid);
    }
    if now > facts.not_after {
        return Err(CryptoError::Expired);
    }
    // webpki needs an end entity to build a path: verify the issuer signature directly.
    signed_by(cluster_cert, root_cert)
        .map_err(|e| CryptoError::Untrusted(format!("not issued by this root: {e}")))?;
    Ok(facts)
}

/// Checks that `issuer` issued and signed `cert`: issuer name and signature (ECDSA P-256
/// or P-384, Ed25519, RSA: whatever x509-parser verifies through aws-lc).
fn signed_by(cert: &[u8], issuer: &[u8]) -> Result<()> {
    use x509_parser::prelude::*;
    let (_, issuer) = X509Certificate::from_der(issuer)
        .map_err(|e| CryptoError::CertificateMalformed(e.to_string()))?;
    let (_, cert) = X509Certificate::from_der(cert)
        .map_err(|e| CryptoError::CertificateMalformed(e.to_string()))?;
    if cert.issuer() != issuer.subject() {
        return Err(CryptoError::Untrusted("issuer name does not match".into()));
    }
    cert.verify_signature(Some(issuer.public_key()))
        .map_err(|_| CryptoError::Untrusted("signature does not verify".into()))
}

/// Verifies a device certificate as a device (or its programmer) would: `leaf` issued by
/// `chain[0]` (the entitlement's batch CA, role device-ca), issued by `chain[1]` (HQ's
/// cluster CA, role hq), issued by `root_cert`; every certificate valid at `now`.
/// Returns the leaf's facts.
pub fn verify_device_certificate(
    root_cert: &[u8],
    chain: &[Vec<u8>],
    leaf: &[u8],
    now: UnixTime,
) -> Result<CertFacts> {
    let [batch, hq] = chain else {
        return Err(CryptoError::Untrusted(format!(
            "expected a chain of 2 certificates (batch CA, HQ cluster CA), got {}",
            chain.len()
        )));
    };
    let path = [
        (leaf, batch.as_slice(), None),
        (batch.as_slice(), hq.as_slice(), Some(Role::DeviceCa)),
        (hq.as_slice(), root_cert, Some(Role::Hq)),
    ];
    for (cert, issuer, role) in path {
        let facts = cert_facts(cert)?;
        if now < facts.not_before {
            return Err(CryptoError::NotYetValid);
        }
        if now > facts.not_after {
            return Err(CryptoError::Expired);
        }
        if let Some(role) = role {
            if !facts.is_ca || facts.roles != [role] {
                return Err(CryptoError::Untrusted(format!(
                    "'{}' is not a {} CA",
                    facts.common_name,
                    role.as_str()
                )));
            }
        }
        signed_by(cert, issuer)?;
    }
    let root = cert_facts(root_cert)?;
    if now < root.not_before || now > root.not_after || !root.is_ca {
        return Err(CryptoError::Untrusted(
            "root certificate not valid now".into(),
        ));
    }
    cert_facts(leaf)
}

/// Verifies `leaf` as a TLS server verifies a client's certificate (rustls-webpki, the
/// path builder rustls uses): a path through `intermediates` to `root_cert`, signatures,
/// validity of every certificate at `at`, basic constraints, and the clientAuth extended
/// key usage on every certificate that has one; with `crl` (DER, the leaf issuer's), that
/// the leaf is not on it. What a cloud checks when a device connects with its keyfab
/// identity.
pub fn verify_client_certificate(
    root_cert: &[u8],
    intermediates: &[Vec<u8>],
    leaf: &[u8],
    at: UnixTime,
    crl: Option<&[u8]>,
) -> Result<()> {
    let parsed = crl
        .map(|der| {
            webpki::BorrowedCertRevocationList::from_der(der)
                .map(webpki::CertRevocationList::from)
                .map_err(|e| CryptoError::CertificateMalformed(format!("CRL: {e:?}")))
        })
        .transpose()?;
    let crls: Vec<&webpki::CertRevocationList<'_>> = parsed.iter().collect();
    let revocation = match crls.is_empty() {
        true => None,
        false => Some(
            webpki::RevocationOptionsBuilder::new(&crls)
                .map_err(|_| CryptoError::Internal)?
                .with_depth(webpki::RevocationCheckDepth::EndEntity)
                .build(),
        ),
    };
    webpki_path(
        &[root_cert],
        intermediates,
        leaf,
        (at, revocation),
        webpki::KeyUsage::client_auth(),
        None,
    )
}

/// A check of the path webpki found, beyond its own.
type PathCheck<'a> =
    dyn Fn(&webpki::VerifiedPath<'_>) -> std::result::Result<(), webpki::Error> + 'a;

/// The signature algorithms a path may use: keyfab's own chains are ECDSA, vendors' chip
/// chains may also be Ed25519 or RSA.
static PATH_ALGORITHMS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
    webpki::aws_lc_rs::ED25519,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512,
];

/// A path from `leaf` through `intermediates` to one of `roots` at `at`, by
/// rustls-webpki: signatures ([`PATH_ALGORITHMS`]), validity, basic constraints and path
/// length, `usage` on extended key usages, and `verify_path` on the path found.
fn webpki_path(
    roots: &[&[u8]],
    intermediates: &[Vec<u8>],
    leaf: &[u8],
    (at, revocation): (UnixTime, Option<webpki::RevocationOptions<'_>>),
    usage: impl webpki::ExtendedKeyUsageValidator,
    verify_path: Option<&PathCheck<'_>>,
) -> Result<()> {
    let anchors = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(&CertificateDer::from(*r)).map(|a| a.to_owned()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CryptoError::Untrusted(format!("root certificate: {e}")))?;
    let leaf_der = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| CryptoError::CertificateMalformed(e.to_string()))?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let when = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(at.0).unwrap_or(0),
    ));
    ee.verify_for_usage(
        PATH_ALGORITHMS,
        &anchors,
        &intermediates,
        when,
        usage,
        revocation,
        verify_path,
    )
    .map(|_| ())
    .map_err(|e| match e {
        webpki::Error::CertRevoked => CryptoError::Untrusted("the certificate is revoked".into()),
        webpki::Error::CertExpired { .. } => CryptoError::Expired,
        webpki::Error::CertNotValidYet { .. } => CryptoError::NotYetValid,
        other => CryptoError::Untrusted(format!("{other:?}")),
    })
}

/// Converts fixed `r ‖ s` to an ASN.1 ECDSA-Sig-Value (SEQUENCE of two INTEGERs).
fn fixed_to_asn1(sig: &[u8]) -> Result<Vec<u8>> {
    if sig.len() != 64 {
        return Err(CryptoError::BadSignature);
    }
    let int = |half: &[u8]| {
        let trimmed: Vec<u8> = half.iter().copied().skip_while(|b| *b == 0).collect();
        let mut body = Vec::with_capacity(33);
        if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
            body.push(0);
        }
        body.extend(trimmed);
        let mut out = vec![0x02, body.len() as u8];
        out.extend(body);
        out
    };
    let mut seq = int(&sig[..32]);
    seq.extend(int(&sig[32..]));
    let mut out = vec![0x30, seq.len() as u8];
    out.extend(seq);
    Ok(out)
}

/// PEM with LF line endings.
pub fn to_pem(der: &[u8], tag: &str) -> String {
    let mut out = String::with_capacity(pem_len(der.len(), tag));
    write_pem(&mut out, der, tag);
    out
}

/// [`to_pem`] for a private key: the text is zeroized when dropped, and it is written in
/// place, so no other copy of the key (DER or base64) is left in freed memory.
pub fn to_pem_secret(der: &[u8], tag: &str) -> zeroize::Zeroizing<String> {
    let mut out = zeroize::Zeroizing::new(String::with_capacity(pem_len(der.len(), tag)));
    write_pem(&mut out, der, tag);
    out
}

/// The length of the PEM text of `der_len` bytes: the exact capacity, so it is never
/// reallocated (a reallocation would leave the old buffer behind unzeroized).
fn pem_len(der_len: usize, tag: &str) -> usize {
    let b64 = der_len.div_ceil(3) * 4;
    let lines = b64.div_ceil(64);
    2 * tag.len() + 32 + b64 + lines
}

/// PEM with LF line endings, 64 base64 characters per line (RFC 7468), appended to `out`
/// one line at a time from a buffer on the stack.
fn write_pem(out: &mut String, der: &[u8], tag: &str) {
    use base64::Engine;
    out.push_str("-----BEGIN ");
    out.push_str(tag);
    out.push_str("-----\n");
    let mut line = [0u8; 64];
    for chunk in der.chunks(48) {
        let n = base64::engine::general_purpose::STANDARD
            .encode_slice(chunk, &mut line)
            .unwrap_or(0);
        out.push_str(std::str::from_utf8(&line[..n]).unwrap_or_default());
        out.push('\n');
    }
    zeroize::Zeroize::zeroize(&mut line);
    out.push_str("-----END ");
    out.push_str(tag);
    out.push_str("-----\n");
}

/// Reads one PEM block with the given tag.
/// Every PEM block of `text`, in order: its tag and its DER.
pub fn pem_blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let blocks =
        pem::parse_many(text).map_err(|_| CryptoError::CertificateMalformed("not PEM".into()))?;
    Ok(blocks
        .into_iter()
        .map(|p| (p.tag().to_owned(), p.into_contents()))
        .collect())
}

/// The DER inside PEM text whose label is `tag`.
pub fn from_pem(text: &str, tag: &str) -> Result<Vec<u8>> {
    let p = pem::parse(text).map_err(|_| CryptoError::CertificateMalformed("not PEM".into()))?;
    if p.tag() != tag {
        return Err(CryptoError::CertificateMalformed(format!(
            "PEM block is {}, expected {tag}",
            p.tag()
        )));
    }
    Ok(p.into_contents())
}

#[cfg(test)]
mod pem_tests {
    use super::*;

    /// The same text as the `pem` crate writes (LF endings), at every length around the
    /// line and padding boundaries, with exactly the capacity reserved.
    #[test]
    fn pem_text_matches_the_pem_crate() {
        for len in (0..200).chain([1000, 4095]) {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            for tag in ["CERTIFICATE", "PRIVATE KEY"] {
                let theirs = pem::encode_config(
                    &pem::Pem::new(tag, der.clone()),
                    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
                );
                let ours = to_pem(&der, tag);
                assert_eq!(ours, theirs, "{len} {tag}");
                assert_eq!(ours.capacity(), ours.len(), "{len}");
                assert_eq!(*to_pem_secret(&der, tag), theirs);
                assert_eq!(from_pem(&ours, tag).unwrap(), der);
            }
        }
    }
}

/// Why a device certificate is revoked (RFC 5280 §5.3.1 CRLReason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlReason {
    /// unspecified (0).
    Unspecified,
    /// keyCompromise (1): the device's key is known or suspected to be out.
    KeyCompromise,
    /// affiliationChanged (3).
    AffiliationChanged,
    /// superseded (4): the device has a newer certificate.
    Superseded,
    /// cessationOfOperation (5): the device is scrapped or retired.
    CessationOfOperation,
    /// privilegeWithdrawn (9).
    PrivilegeWithdrawn,
}

impl CrlReason {
    /// Every reason, in code order.
    pub const ALL: [CrlReason; 6] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
        Self::PrivilegeWithdrawn,
    ];

    /// The name the CLI and records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "key-compromise",
            Self::AffiliationChanged => "affiliation-changed",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessation-of-operation",
            Self::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }

    /// The reason named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    fn rcgen(self) -> rcgen::RevocationReason {
        match self {
            Self::Unspecified => rcgen::RevocationReason::Unspecified,
            Self::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            Self::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            Self::Superseded => rcgen::RevocationReason::Superseded,
            Self::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            Self::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        }
    }
}

/// One revoked certificate on a CRL.
#[derive(Debug, Clone)]
pub struct RevokedEntry {
    /// Its serial number's bytes, as in the certificate.
    pub serial: Vec<u8>,
    /// When the revocation was recorded.
    pub revoked_at: UnixTime,
    /// Why.
    pub reason: CrlReason,
}

/// What a CRL states besides its entries.
#[derive(Debug, Clone, Copy)]
pub struct CrlTimes {
    /// The CRL's number: higher for each CRL of the same CA.
    pub number: u64,
    /// When it was made.
    pub this_update: UnixTime,
    /// When the next one will be made at the latest: relying parties treat it as stale
    /// afterwards.
    pub next_update: UnixTime,
}

/// An RFC 5280 CRL v2 signed by the CA of `ca_cert` (which must allow cRLSign):
/// authorityKeyIdentifier and cRLNumber extensions, a reasonCode on each entry. DER.
pub fn issue_crl(
    ca_key: &BatchKey,
    ca_cert: &[u8],
    times: CrlTimes,
    revoked: &[RevokedEntry],
) -> Result<Vec<u8>> {
    let revoked_certs = revoked
        .iter()
        .map(|r| {
            Ok(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&r.serial),
                revocation_time: odt(r.revoked_at)?,
                reason_code: Some(r.reason.rcgen()),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = rcgen::CertificateRevocationListParams {
        this_update: odt(times.this_update)?,
        next_update: odt(times.next_update)?,
        crl_number: SerialNumber::from(times.number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let signer = batch_key::BatchSigner::new(ca_key);
    let issuer =
        Issuer::from_ca_cert_der(&CertificateDer::from(ca_cert), &signer).map_err(build_err)?;
    let crl = params.signed_by(&issuer).map_err(build_err)?;
    Ok(crl.der().to_vec())
}
