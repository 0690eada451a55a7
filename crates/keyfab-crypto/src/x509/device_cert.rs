//! Device certificates, DER-encoded directly.
//!
//! A site signs one device certificate per provisioned device, on the provisioning hot
//! path. Everything in it but the subject, alternative names, serial, validity and device
//! key is the same for every device of a key's profile, so [`DeviceIssuer`] holds the
//! batch CA's parts and [`DeviceProfile`] the profile's, each encoded once, and each
//! certificate costs one small encoding and the ECDSA signature (a general certificate
//! builder re-derived the constant parts and allocated per field: ~3.4 µs of ~18 µs per
//! certificate here). The shape (FORMATS.md, "Device certificates"):
//!
//! ```text
//! Certificate ::= SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING signature }
//! tbs: [0] v3, serial (16 bytes), ecdsa-with-SHA256, issuer (the batch CA's subject,
//!      as its certificate has it), validity (UTCTime before 2050, GeneralizedTime
//!      from 2050), subject (one RDN per attribute, UTF8String), SubjectPublicKeyInfo,
//!      [3] extensions, in this order:
//!        authorityKeyIdentifier (the CA's subjectKeyIdentifier),
//!        subjectAltName (when the profile names any),
//!        keyUsage (critical; the profile's, digitalSignature by default),
//!        extKeyUsage (the profile's, clientAuth by default; absent when it lists none),
//!        cRLDistributionPoints (when the profile gives a URL),
//!        subjectKeyIdentifier (SHA-256 of the SubjectPublicKeyInfo, first 20 bytes),
//!        basicConstraints CA:FALSE (critical),
//!        the profile's extra extensions, in its order
//! ```

use super::{dn_attributes, BatchKey, DevicePublicKey, NameAttribute, Validity};
use crate::hash::sha256;
use crate::time::UnixTime;
use crate::{CryptoError, Result};

/// `[0] { INTEGER 2 }`: version v3.
const VERSION_3: [u8; 5] = [0xa0, 0x03, 0x02, 0x01, 0x02];

/// basicConstraints (2.5.29.19), critical, CA:FALSE (an empty SEQUENCE).
const BASIC_CONSTRAINTS_END_ENTITY: [u8; 14] = [
    0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00,
];

const OID_SUBJECT_KEY_IDENTIFIER: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x0e];
const OID_AUTHORITY_KEY_IDENTIFIER: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x23];
const OID_SUBJECT_ALT_NAME: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x11];
const OID_KEY_USAGE: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x0f];
const OID_EXT_KEY_USAGE: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x25];
const OID_CRL_DISTRIBUTION_POINTS: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x1f];
/// `BOOLEAN TRUE`: an extension's critical flag.
const CRITICAL: [u8; 3] = [0x01, 0x01, 0xff];

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const BIT_STRING: u8 = 0x03;
const UTF8_STRING: u8 = 0x0c;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const EXTENSIONS: u8 = 0xa3;
const KEY_ID: u8 = 0x80;
const OBJECT_IDENTIFIER: u8 = 0x06;
/// `[0]` constructed: DistributionPoint's distributionPoint, and its fullName.
const CONTEXT_0: u8 = 0xa0;

/// Appends one TLV.
pub(crate) fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    push_wrapped(out, tag, |c| c.extend_from_slice(content));
}

/// Appends `tag` around what `body` writes, and returns what `body` returns: a one-byte
/// length is reserved and widened in place if the content turns out longer, so nesting
/// costs no allocation.
pub(crate) fn push_wrapped<R>(
    out: &mut Vec<u8>,
    tag: u8,
    body: impl FnOnce(&mut Vec<u8>) -> R,
) -> R {
    out.push(tag);
    let len_at = out.len();
    out.push(0);
    let returned = body(out);
    let len = out.len() - len_at - 1;
    if len < 0x80 {
        out[len_at] = len as u8;
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out[len_at] = 0x80 | (bytes.len() - skip) as u8;
        out.splice(len_at + 1..len_at + 1, bytes[skip..].iter().copied());
    }
    returned
}

/// A subject alternative name's kind (its GeneralName choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AltNameKind {
    /// dNSName `[2]`.
    Dns,
    /// uniformResourceIdentifier `[6]`.
    Uri,
    /// rfc822Name `[1]`.
    Email,
    /// iPAddress `[7]`: the text is a literal IPv4 or IPv6 address.
    Ip,
}

impl AltNameKind {
    fn tag(self) -> u8 {
        match self {
            Self::Email => 0x81,
            Self::Dns => 0x82,
            Self::Uri => 0x86,
            Self::Ip => 0x87,
        }
    }
}

/// An extension added as it is.
#[derive(Debug, Clone)]
pub struct RawExtension {
    /// Dotted OID.
    pub oid: String,
    /// Its critical flag.
    pub critical: bool,
    /// The extnValue's contents: one DER value.
    pub value: Vec<u8>,
}

/// What a device certificate profile asks for, as the policy gives it (checked there).
#[derive(Debug, Clone)]
pub struct ProfileSpec {
    /// Subject attributes (`CN`, `O`, `OU`, `C`, `ST`, `L`) and values, where `{device_id}`
    /// stands for the device's id.
    pub subject: Vec<(String, String)>,
    /// KeyUsage bits by number (0 digitalSignature … 4 keyAgreement).
    pub key_usage_bits: Vec<u8>,
    /// Extended key usage OIDs, dotted; none: no extension.
    pub extended_key_usage: Vec<String>,
    /// Subject alternative names; `{device_id}` stands for the device's id.
    pub alt_names: Vec<(AltNameKind, String)>,
    /// The CRL's URL, when there is one.
    pub crl_distribution_point: Option<String>,
    /// Extensions added after the others, in order.
    pub extensions: Vec<RawExtension>,
}

/// A profile encoded once: the parts of the extensions every device shares, and the
/// templates of those that carry its id.
#[derive(Debug, Clone)]
pub struct DeviceProfile {
    subject: Vec<(NameAttribute, String)>,
    alt_names: Vec<(AltNameKind, String)>,
    /// keyUsage, extKeyUsage and cRLDistributionPoints, encoded.
    after_alt_names: Vec<u8>,
    /// basicConstraints and the extra extensions, encoded.
    after_key_id: Vec<u8>,
}

const DEVICE_ID: &str = "{device_id}";

impl DeviceProfile {
    /// Encodes what every certificate of `spec` shares; refuses what cannot be encoded.
    pub fn new(spec: &ProfileSpec) -> Result<Self> {
        let bad = |m: String| CryptoError::CertificateBuild(m);
        let subject = spec
            .subject
            .iter()
            .map(|(k, v)| {
                NameAttribute::parse(k)
                    .map(|a| (a, v.clone()))
                    .ok_or_else(|| bad(format!("unsupported attribute '{k}'")))
            })
            .collect::<Result<Vec<_>>>()?;
        if subject.is_empty() {
            return Err(bad("the subject names no attribute".into()));
        }
        for (kind, value) in &spec.alt_names {
            if *kind == AltNameKind::Ip {
                value
                    .parse::<std::net::IpAddr>()
                    .map_err(|_| bad(format!("'{value}' is not an IP address")))?;
            } else if !value.is_ascii() {
                return Err(bad(format!("'{value}' is not ASCII")));
            }
        }
        let mut after_alt_names = Vec::with_capacity(64);
        if spec.key_usage_bits.is_empty() || spec.key_usage_bits.iter().any(|b| *b > 7) {
            return Err(bad("key usage bits must be 0-7, at least one".into()));
        }
        let bits = spec
            .key_usage_bits
            .iter()
            .fold(0u8, |acc, bit| acc | (0x80 >> bit));
        push_extension(&mut after_alt_names, &OID_KEY_USAGE, true, |v| {
            // DER: trailing zero bits are not encoded, their count leads the BIT STRING.
            push_tlv(v, BIT_STRING, &[bits.trailing_zeros() as u8, bits]);
        });
        if !spec.extended_key_usage.is_empty() {
            let oids = spec
                .extended_key_usage
                .iter()
                .map(|o| oid_der(o))
                .collect::<Result<Vec<_>>>()?;
            push_extension(&mut after_alt_names, &OID_EXT_KEY_USAGE, false, |v| {
                push_wrapped(v, SEQUENCE, |seq| {
                    for oid in &oids {
                        seq.extend_from_slice(oid);
                    }
                });
            });
        }
        if let Some(url) = &spec.crl_distribution_point {
            if !url.is_ascii() {
                return Err(bad("the CRL URL is not ASCII".into()));
            }
            push_extension(
                &mut after_alt_names,
                &OID_CRL_DISTRIBUTION_POINTS,
                false,
                |v| {
                    push_wrapped(v, SEQUENCE, |points| {
                        push_wrapped(points, SEQUENCE, |point| {
                            push_wrapped(point, CONTEXT_0, |name| {
                                push_wrapped(name, CONTEXT_0, |full| {
                                    push_tlv(full, AltNameKind::Uri.tag(), url.as_bytes());
                                });
                            });
                        });
                    });
                },
            );
        }
        let mut after_key_id = BASIC_CONSTRAINTS_END_ENTITY.to_vec();
        for x in &spec.extensions {
            let oid = oid_der(&x.oid)?;
            push_wrapped(&mut after_key_id, SEQUENCE, |e| {
                e.extend_from_slice(&oid);
                if x.critical {
                    e.extend_from_slice(&CRITICAL);
                }
                push_tlv(e, OCTET_STRING, &x.value);
            });
        }
        Ok(Self {
            subject,
            alt_names: spec.alt_names.clone(),
            after_alt_names,
            after_key_id,
        })
    }

    /// A profile of only a subject (`CN=...,O=...`, `{device_id}` in its values) and the
    /// default usages: digitalSignature, clientAuth.
    pub fn with_subject(subject: &str) -> Result<Self> {
        Self::new(&ProfileSpec {
            subject: dn_attributes(subject)?
                .into_iter()
                .map(|(a, v)| (a.name().to_owned(), v.to_owned()))
                .collect(),
            key_usage_bits: vec![0],
            extended_key_usage: vec![CLIENT_AUTH.to_owned()],
            alt_names: Vec::new(),
            crl_distribution_point: None,
            extensions: Vec::new(),
        })
    }
}

/// id-kp-clientAuth, dotted.
const CLIENT_AUTH: &str = "1.3.6.1.5.5.7.3.2";

/// Appends one Extension: `SEQUENCE { OID, [critical], OCTET STRING { value } }`.
fn push_extension(out: &mut Vec<u8>, oid: &[u8], critical: bool, value: impl FnOnce(&mut Vec<u8>)) {
    push_wrapped(out, SEQUENCE, |e| {
        e.extend_from_slice(oid);
        if critical {
            e.extend_from_slice(&CRITICAL);
        }
        push_wrapped(e, OCTET_STRING, value);
    });
}

/// The DER OBJECT IDENTIFIER of a dotted OID (arcs up to 2^128 - 1, X.690 §8.19).
pub(crate) fn oid_der(text: &str) -> Result<Vec<u8>> {
    let bad = || CryptoError::CertificateBuild(format!("'{text}' is not a dotted OID"));
    let arcs = text
        .split('.')
        .map(|a| a.parse::<u128>().map_err(|_| bad()))
        .collect::<Result<Vec<_>>>()?;
    let [first, second, rest @ ..] = arcs.as_slice() else {
        return Err(bad());
    };
    if *first > 2 || (*first < 2 && *second >= 40) {
        return Err(bad());
    }
    let head = first
        .checked_mul(40)
        .and_then(|f| f.checked_add(*second))
        .ok_or_else(bad)?;
    let mut content = Vec::new();
    for arc in std::iter::once(&head).chain(rest) {
        let mut groups = vec![(*arc & 0x7f) as u8];
        let mut v = *arc >> 7;
        while v > 0 {
            groups.push((v & 0x7f) as u8 | 0x80);
            v >>= 7;
        }
        content.extend(groups.iter().rev());
    }
    let mut out = Vec::with_capacity(content.len() + 2);
    push_tlv(&mut out, OBJECT_IDENTIFIER, &content);
    Ok(out)
}

/// A batch CA ready to issue device certificates: the parts every certificate shares are
/// encoded once, from its certificate.
pub struct DeviceIssuer {
    key: BatchKey,
    /// The CA's subject Name, exactly as in its certificate (what path building matches).
    issuer_name: Vec<u8>,
    /// The whole authorityKeyIdentifier extension.
    authority_key_id: Vec<u8>,
    /// The CA certificate's last second: no device certificate outlives it.
    not_after: UnixTime,
}

impl DeviceIssuer {
    /// An issuer for the batch CA key and its certificate.
    pub fn new(batch_key: BatchKey, batch_cert: &[u8]) -> Result<Self> {
        let (issuer_name, authority_key_id) = issuer_parts(&batch_key, batch_cert)?;
        let not_after = super::cert_facts(batch_cert)?.not_after;
        Ok(Self {
            key: batch_key,
            issuer_name,
            authority_key_id,
            not_after,
        })
    }

    /// The device certificate of `device_id`'s `key` under `profile`. Its validity ends
    /// no later than the CA's, so the chain verifies for as long as the certificate does.
    pub fn issue(
        &self,
        profile: &DeviceProfile,
        device_id: &str,
        key: &DevicePublicKey,
        serial: [u8; 16],
        validity: Validity,
    ) -> Result<Vec<u8>> {
        let validity = Validity {
            not_before: validity.not_before,
            not_after: validity.not_after.min(self.not_after),
        };
        sign(
            &self.key,
            &Parts {
                issuer_name: &self.issuer_name,
                authority_key_id: &self.authority_key_id,
                profile,
            },
            device_id,
            key,
            serial,
            validity,
        )
    }
}

/// The issuer Name and the authorityKeyIdentifier extension a CA's certificates carry:
/// its subject as encoded in its certificate, and its subjectKeyIdentifier (or, if its
/// certificate has none, the first 20 bytes of SHA-256 of its key).
pub(super) fn issuer_parts(ca_key: &BatchKey, ca_cert: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(ca_cert)
        .map_err(|e| CryptoError::CertificateMalformed(format!("CA certificate: {e}")))?;
    let key_id = cert
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .unwrap_or_else(|| sha256(&ca_key.spki_der())[..20].to_vec());
    let mut aki = Vec::with_capacity(40);
    push_wrapped(&mut aki, SEQUENCE, |e| {
        e.extend_from_slice(&OID_AUTHORITY_KEY_IDENTIFIER);
        push_wrapped(e, OCTET_STRING, |v| {
            push_wrapped(v, SEQUENCE, |s| push_tlv(s, KEY_ID, &key_id));
        });
    });
    Ok((cert.subject().as_raw().to_vec(), aki))
}

/// What a device certificate takes from its CA and its profile.
struct Parts<'a> {
    issuer_name: &'a [u8],
    authority_key_id: &'a [u8],
    profile: &'a DeviceProfile,
}

/// Encodes the device certificate and signs it with `ca_key`.
fn sign(
    ca_key: &BatchKey,
    parts: &Parts<'_>,
    device_id: &str,
    key: &DevicePublicKey,
    serial: [u8; 16],
    validity: Validity,
) -> Result<Vec<u8>> {
    let spki = key.spki_der();
    let profile = parts.profile;
    let mut tbs = Vec::with_capacity(384 + parts.issuer_name.len() + profile.after_key_id.len());
    push_wrapped(&mut tbs, SEQUENCE, |t| -> Result<()> {
        t.extend_from_slice(&VERSION_3);
        push_serial(t, &serial);
        t.extend_from_slice(ca_key.signature_algorithm());
        t.extend_from_slice(parts.issuer_name);
        push_wrapped(t, SEQUENCE, |v| {
            push_time(v, validity.not_before)?;
            push_time(v, validity.not_after)
        })?;
        push_name(t, &profile.subject, device_id);
        t.extend_from_slice(&spki);
        push_wrapped(t, EXTENSIONS, |x| {
            push_wrapped(x, SEQUENCE, |exts| -> Result<()> {
                exts.extend_from_slice(parts.authority_key_id);
                if !profile.alt_names.is_empty() {
                    push_alt_names(exts, &profile.alt_names, device_id)?;
                }
                exts.extend_from_slice(&profile.after_alt_names);
                push_wrapped(exts, SEQUENCE, |e| {
                    e.extend_from_slice(&OID_SUBJECT_KEY_IDENTIFIER);
                    push_wrapped(e, OCTET_STRING, |v| {
                        push_tlv(v, OCTET_STRING, &sha256(&spki)[..20]);
                    });
                });
                exts.extend_from_slice(&profile.after_key_id);
                Ok(())
            })
        })
    })?;
    let signature = ca_key.sign_asn1(&tbs)?;
    let mut cert = Vec::with_capacity(tbs.len() + signature.len() + 24);
    push_wrapped(&mut cert, SEQUENCE, |c| {
        c.extend_from_slice(&tbs);
        c.extend_from_slice(ca_key.signature_algorithm());
        push_wrapped(c, BIT_STRING, |b| {
            b.push(0);
            b.extend_from_slice(&signature);
        });
    });
    Ok(cert)
}

/// The subjectAltName extension with the device's id in its templates.
fn push_alt_names(
    out: &mut Vec<u8>,
    names: &[(AltNameKind, String)],
    device_id: &str,
) -> Result<()> {
    let mut filled = Vec::with_capacity(names.len());
    for (kind, template) in names {
        let value = match kind {
            AltNameKind::Ip => match template.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(a)) => a.octets().to_vec(),
                Ok(std::net::IpAddr::V6(a)) => a.octets().to_vec(),
                Err(_) => {
                    return Err(CryptoError::CertificateBuild(format!(
                        "'{template}' is not an IP address"
                    )))
                }
            },
            _ => {
                let value = template.replace(DEVICE_ID, device_id);
                // IA5String: a device id that is not ASCII cannot be in a name.
                if !value.is_ascii() {
                    return Err(CryptoError::CertificateBuild(
                        "an alternative name would not be ASCII".into(),
                    ));
                }
                value.into_bytes()
            }
        };
        filled.push((kind.tag(), value));
    }
    push_extension(out, &OID_SUBJECT_ALT_NAME, false, |v| {
        push_wrapped(v, SEQUENCE, |seq| {
            for (tag, value) in &filled {
                push_tlv(seq, *tag, value);
            }
        });
    });
    Ok(())
}

/// A positive INTEGER of the serial's bytes (a leading zero byte if its top bit is set).
fn push_serial(out: &mut Vec<u8>, serial: &[u8; 16]) {
    push_wrapped(out, INTEGER, |i| {
        if serial[0] & 0x80 != 0 {
            i.push(0);
        }
        i.extend_from_slice(serial);
    });
}

/// The subject: one RDN per attribute, in the profile's order, UTF8String values with the
/// device's id in them. The id goes inside one value: it cannot add an attribute.
fn push_name(out: &mut Vec<u8>, subject: &[(NameAttribute, String)], device_id: &str) {
    push_wrapped(out, SEQUENCE, |name| {
        for (attribute, template) in subject {
            push_wrapped(name, SET, |rdn| {
                push_wrapped(rdn, SEQUENCE, |atv| {
                    atv.extend_from_slice(attribute.oid_der());
                    push_tlv(
                        atv,
                        UTF8_STRING,
                        template.replace(DEVICE_ID, device_id).as_bytes(),
                    );
                });
            });
        }
    });
}

/// RFC 5280 §4.1.2.5: UTCTime for 1950–2049, GeneralizedTime otherwise, in seconds, `Z`.
fn push_time(out: &mut Vec<u8>, t: UnixTime) -> Result<()> {
    let out_of_range = || CryptoError::CertificateBuild("time out of range".into());
    let dt = time::OffsetDateTime::from_unix_timestamp(t.0).map_err(|_| out_of_range())?;
    let year = u32::try_from(dt.year()).map_err(|_| out_of_range())?;
    if year > 9999 {
        return Err(out_of_range());
    }
    let (tag, century) = if (1950..2050).contains(&year) {
        (UTC_TIME, None)
    } else {
        (GENERALIZED_TIME, Some((year / 100) as u8))
    };
    push_wrapped(out, tag, |v| {
        let mut two_digits = |n: u8| v.extend_from_slice(&[b'0' + n / 10, b'0' + n % 10]);
        if let Some(c) = century {
            two_digits(c);
        }
        two_digits((year % 100) as u8);
        for field in [
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
        ] {
            two_digits(field);
        }
        v.push(b'Z');
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;
    use crate::sign::SigningKey;
    use crate::x509::{issue_batch_ca, random_serial, root_certificate, signed_by};
    use crate::x509::{BatchKey, BatchKeyType};
    use rcgen::{
        CertificateParams, CrlDistributionPoint, CustomExtension, DistinguishedName,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType, SerialNumber,
    };
    use rustls_pki_types::CertificateDer;

    /// The general builder's device certificate for the same inputs: the reference the
    /// direct encoding must match byte for byte (up to the ECDSA signature, which is
    /// randomized).
    fn reference(
        ca_key: &BatchKey,
        ca_cert: &[u8],
        spec: &ProfileSpec,
        device_id: &str,
        key: &DevicePublicKey,
        serial: [u8; 16],
        validity: Validity,
    ) -> Vec<u8> {
        struct DeviceKey<'a>(&'a DevicePublicKey);
        impl rcgen::PublicKeyData for DeviceKey<'_> {
            fn der_bytes(&self) -> &[u8] {
                match self.0 {
                    DevicePublicKey::P256(p)
                    | DevicePublicKey::P384(p)
                    | DevicePublicKey::Ed25519(p) => p,
                    DevicePublicKey::Rsa(_) => unimplemented!("the reference takes no RSA key"),
                }
            }
            fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
                match self.0 {
                    DevicePublicKey::P256(_) => &rcgen::PKCS_ECDSA_P256_SHA256,
                    DevicePublicKey::P384(_) => &rcgen::PKCS_ECDSA_P384_SHA384,
                    DevicePublicKey::Ed25519(_) => &rcgen::PKCS_ED25519,
                    DevicePublicKey::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
                }
            }
        }
        let arcs = |oid: &str| -> Vec<u64> { oid.split('.').map(|a| a.parse().unwrap()).collect() };
        let issuer = Issuer::from_ca_cert_der(
            &CertificateDer::from(ca_cert),
            crate::x509::batch_key::BatchSigner::new(ca_key),
        )
        .unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        for (k, v) in &spec.subject {
            dn.push(
                NameAttribute::parse(k).unwrap().dn_type(),
                v.replace(DEVICE_ID, device_id),
            );
        }
        p.distinguished_name = dn;
        p.not_before = crate::x509::odt(validity.not_before).unwrap();
        p.not_after = crate::x509::odt(validity.not_after).unwrap();
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.use_authority_key_identifier_extension = true;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = spec
            .key_usage_bits
            .iter()
            .map(|b| match b {
                0 => KeyUsagePurpose::DigitalSignature,
                1 => KeyUsagePurpose::ContentCommitment,
                2 => KeyUsagePurpose::KeyEncipherment,
                3 => KeyUsagePurpose::DataEncipherment,
                _ => KeyUsagePurpose::KeyAgreement,
            })
            .collect();
        p.extended_key_usages = spec
            .extended_key_usage
            .iter()
            .map(|o| ExtendedKeyUsagePurpose::Other(arcs(o)))
            .collect();
        p.subject_alt_names = spec
            .alt_names
            .iter()
            .map(|(kind, v)| {
                let v = v.replace(DEVICE_ID, device_id);
                match kind {
                    AltNameKind::Dns => SanType::DnsName(v.try_into().unwrap()),
                    AltNameKind::Uri => SanType::URI(v.try_into().unwrap()),
                    AltNameKind::Email => SanType::Rfc822Name(v.try_into().unwrap()),
                    AltNameKind::Ip => SanType::IpAddress(v.parse().unwrap()),
                }
            })
            .collect();
        p.crl_distribution_points = spec
            .crl_distribution_point
            .iter()
            .map(|u| CrlDistributionPoint {
                uris: vec![u.clone()],
            })
            .collect();
        for x in &spec.extensions {
            let mut ext = CustomExtension::from_oid_content(&arcs(&x.oid), x.value.clone());
            ext.set_criticality(x.critical);
            p.custom_extensions.push(ext);
        }
        p.signed_by(&DeviceKey(key), &issuer)
            .unwrap()
            .der()
            .to_vec()
    }

    fn tbs(cert: &[u8]) -> Vec<u8> {
        use x509_parser::prelude::*;
        let (rest, c) = X509Certificate::from_der(cert).unwrap();
        assert!(rest.is_empty());
        c.tbs_certificate.as_ref().to_vec()
    }

    fn batch_ca(rng: &SeededRng, common_name: &str) -> (BatchKey, Vec<u8>, Vec<u8>) {
        batch_ca_of(rng, common_name, BatchKeyType::EcP256)
    }

    fn batch_ca_of(
        rng: &SeededRng,
        common_name: &str,
        kind: BatchKeyType,
    ) -> (BatchKey, Vec<u8>, Vec<u8>) {
        let root_key = SigningKey::generate(rng).unwrap();
        let v = Validity {
            not_before: UnixTime(-2_000_000_000),
            not_after: crate::x509::NO_EXPIRY,
        };
        let root = root_certificate(&root_key, "CN=Root,O=Acme", v, rng).unwrap();
        let key = BatchKey::generate(kind).unwrap();
        let cert = issue_batch_ca(&root_key, &root, &key, common_name, v, rng).unwrap();
        (key, cert, root)
    }

    fn issuer_of(ca_key: &BatchKey, ca_cert: &[u8]) -> DeviceIssuer {
        DeviceIssuer::new(
            BatchKey::from_pkcs8(ca_key.to_pkcs8().expose()).unwrap(),
            ca_cert,
        )
        .unwrap()
    }

    fn subject_spec(subject: &str) -> ProfileSpec {
        ProfileSpec {
            subject: dn_attributes(subject)
                .unwrap()
                .into_iter()
                .map(|(a, v)| (a.name().to_owned(), v.to_owned()))
                .collect(),
            key_usage_bits: vec![0],
            extended_key_usage: vec![CLIENT_AUTH.into()],
            alt_names: Vec::new(),
            crl_distribution_point: None,
            extensions: Vec::new(),
        }
    }

    /// Every part a profile can ask for at once.
    fn full_spec() -> ProfileSpec {
        ProfileSpec {
            subject: vec![
                ("CN".into(), "{device_id}".into()),
                ("O".into(), "Acme, Inc.".into()),
                ("OU".into(), "line {device_id}".into()),
            ],
            key_usage_bits: vec![0, 1, 4],
            extended_key_usage: vec![
                "1.3.6.1.5.5.7.3.2".into(),
                "1.3.6.1.5.5.7.3.1".into(),
                "1.3.6.1.4.1.99999.7.1".into(),
            ],
            alt_names: vec![
                (AltNameKind::Dns, "{device_id}.devices.example.com".into()),
                (AltNameKind::Uri, "urn:acme:device:{device_id}".into()),
                (AltNameKind::Email, "ops+{device_id}@example.com".into()),
                (AltNameKind::Ip, "192.0.2.7".into()),
                (AltNameKind::Ip, "2001:db8::7".into()),
            ],
            crl_distribution_point: Some("http://crl.example.com/batch-1.crl".into()),
            extensions: vec![
                RawExtension {
                    oid: "1.3.6.1.4.1.99999.1".into(),
                    critical: false,
                    value: vec![0x0c, 0x02, b'h', b'i'],
                },
                RawExtension {
                    oid: "1.3.6.1.4.1.99999.2".into(),
                    critical: true,
                    value: vec![0x30, 0x00],
                },
            ],
        }
    }

    #[test]
    fn encodes_what_the_general_builder_encodes() {
        let rng = SeededRng::new(11);
        let (ca_key, ca_cert, _) = batch_ca(&rng, "batch 7 of Acme Devices GmbH");
        let issuer = issuer_of(&ca_key, &ca_cert);
        let p256 = DevicePublicKey::P256(
            SigningKey::generate(&rng)
                .unwrap()
                .verifying_key()
                .sec1()
                .to_vec(),
        );
        let ed25519 = DevicePublicKey::Ed25519(vec![0x42; 32]);
        let p384 = crate::devicekey::expand(
            crate::devicekey::DeviceKeyType::EcP384,
            &crate::secret::Secret32::new([7; 32]),
        )
        .unwrap()
        .public
        .unwrap();
        let long = format!("CN={{device_id}},O={}", "d".repeat(300));
        let specs = [
            subject_spec("CN={device_id}"),
            subject_spec("CN=dev-{device_id},O=Acme Devices,C=DE"),
            subject_spec("CN= spaced ,OU=Line 3,ST=Bayern,L=München,O=Acme"),
            subject_spec(&long),
            full_spec(),
        ];
        let times = [
            (1_764_028_800, 1_764_028_800 + 86_400 * 3650),
            // 2049-12-31T23:59:59 to 2050-01-01: the switch to GeneralizedTime.
            (2_524_607_999, 2_524_608_000),
            // Before 1950, and no well-defined end.
            (-631_152_001, crate::x509::NO_EXPIRY.0),
        ];
        for spec in &specs {
            let profile = DeviceProfile::new(spec).unwrap();
            for key in [&p256, &ed25519, &p384] {
                for (from, until) in times {
                    let validity = Validity {
                        not_before: UnixTime(from),
                        not_after: UnixTime(until),
                    };
                    let serial = random_serial(&rng);
                    let ours = issuer
                        .issue(&profile, "D-1,OU=x", key, serial, validity)
                        .unwrap();
                    let theirs =
                        reference(&ca_key, &ca_cert, spec, "D-1,OU=x", key, serial, validity);
                    assert_eq!(tbs(&ours), tbs(&theirs), "{spec:?} {key:?} {from}");
                    signed_by(&ours, &ca_cert).unwrap();
                }
            }
        }
    }

    #[test]
    fn a_p384_batch_ca_signs_with_sha384_as_the_general_builder_would() {
        let rng = SeededRng::new(18);
        let (ca_key, ca_cert, _) = batch_ca_of(&rng, "batch P-384", BatchKeyType::EcP384);
        assert_eq!(ca_key.key_type(), BatchKeyType::EcP384);
        let issuer = issuer_of(&ca_key, &ca_cert);
        let key = DevicePublicKey::Ed25519(vec![3; 32]);
        let validity = Validity {
            not_before: UnixTime(1_764_028_800),
            not_after: crate::x509::NO_EXPIRY,
        };
        let spec = full_spec();
        let serial = random_serial(&rng);
        let ours = issuer
            .issue(
                &DeviceProfile::new(&spec).unwrap(),
                "D-9",
                &key,
                serial,
                validity,
            )
            .unwrap();
        let theirs = reference(&ca_key, &ca_cert, &spec, "D-9", &key, serial, validity);
        assert_eq!(tbs(&ours), tbs(&theirs));
        signed_by(&ours, &ca_cert).unwrap();
        // ecdsa-with-SHA384 in both places it is named.
        let alg = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
        assert_eq!(ours.windows(alg.len()).filter(|w| *w == alg).count(), 2);
    }

    #[test]
    fn a_device_id_stays_inside_its_attribute() {
        use x509_parser::prelude::*;
        let rng = SeededRng::new(15);
        let (ca_key, ca_cert, _) = batch_ca(&rng, "batch");
        let profile = DeviceProfile::with_subject("CN={device_id},O=Acme").unwrap();
        let cert = issuer_of(&ca_key, &ca_cert)
            .issue(
                &profile,
                "D-1,OU=Injected",
                &DevicePublicKey::Ed25519(vec![1; 32]),
                [1; 16],
                crate::x509::Validity {
                    not_before: UnixTime(0),
                    not_after: UnixTime(86_400),
                },
            )
            .unwrap();
        let (_, c) = X509Certificate::from_der(&cert).unwrap();
        assert_eq!(c.subject().iter_organizational_unit().count(), 0);
        assert_eq!(
            c.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "D-1,OU=Injected"
        );
    }

    #[test]
    fn no_certificate_outlives_its_ca() {
        let rng = SeededRng::new(16);
        let root_key = SigningKey::generate(&rng).unwrap();
        let v = Validity {
            not_before: UnixTime(0),
            not_after: UnixTime(86_400 * 400),
        };
        let root = root_certificate(&root_key, "CN=Root", v, &rng).unwrap();
        let key = BatchKey::generate(BatchKeyType::EcP256).unwrap();
        let ca = issue_batch_ca(&root_key, &root, &key, "b", v, &rng).unwrap();
        let cert = issuer_of(&key, &ca)
            .issue(
                &DeviceProfile::with_subject("CN={device_id}").unwrap(),
                "d",
                &DevicePublicKey::Ed25519(vec![1; 32]),
                [1; 16],
                Validity {
                    not_before: UnixTime(0),
                    not_after: crate::x509::NO_EXPIRY,
                },
            )
            .unwrap();
        assert_eq!(
            crate::x509::cert_facts(&cert).unwrap().not_after,
            UnixTime(86_400 * 400)
        );
    }

    #[test]
    fn a_long_certificate_uses_long_form_lengths() {
        let rng = SeededRng::new(12);
        let (ca_key, ca_cert, _) = batch_ca(&rng, "batch");
        let subject = format!("CN={},O={}", "x".repeat(200), "y".repeat(70_000));
        let spec = subject_spec(&subject);
        let key = DevicePublicKey::Ed25519(vec![1; 32]);
        let validity = Validity {
            not_before: UnixTime(0),
            not_after: UnixTime(86_400),
        };
        let serial = [0x7f; 16];
        let ours = issuer_of(&ca_key, &ca_cert)
            .issue(
                &DeviceProfile::new(&spec).unwrap(),
                "d",
                &key,
                serial,
                validity,
            )
            .unwrap();
        let theirs = reference(&ca_key, &ca_cert, &spec, "d", &key, serial, validity);
        assert_eq!(tbs(&ours), tbs(&theirs));
        signed_by(&ours, &ca_cert).unwrap();
    }

    /// The committed vector (`tests/vectors/device-certificate/`, README there): the
    /// certificate's to-be-signed bytes are what this encoder makes from its inputs, and
    /// the batch CA's signature over them verifies.
    #[test]
    fn the_committed_vector_is_reproduced() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/vectors/device-certificate"
        );
        let read = |name: &str| std::fs::read(format!("{dir}/{name}")).unwrap();
        let mut spec = full_spec();
        spec.subject = vec![
            ("CN".into(), "{device_id}".into()),
            ("O".into(), "Acme Devices".into()),
            ("C".into(), "DE".into()),
        ];
        // OpenSSL refuses a certificate with a critical extension it does not know.
        spec.extensions[1].critical = false;
        let profile = DeviceProfile::new(&spec).unwrap();
        let validity = Validity {
            not_before: UnixTime(1_767_225_600),
            not_after: crate::x509::NO_EXPIRY,
        };
        let device_key = DevicePublicKey::P256(read("device-point.bin"));
        let serial = *b"\x3akeyfab-vectors!";
        if std::env::var_os("KEYFAB_BLESS").is_some() {
            // A new root and batch CA (keys not kept), and the certificate under them.
            let rng = SeededRng::new(17);
            let root_key = SigningKey::generate(&rng).unwrap();
            let root =
                root_certificate(&root_key, "CN=Vector Root,O=Acme", validity, &rng).unwrap();
            let key = BatchKey::generate(BatchKeyType::EcP256).unwrap();
            let ca =
                issue_batch_ca(&root_key, &root, &key, "Acme batch 1", validity, &rng).unwrap();
            let cert = issuer_of(&key, &ca)
                .issue(&profile, "D-000123", &device_key, serial, validity)
                .unwrap();
            std::fs::write(format!("{dir}/root.der"), root).unwrap();
            std::fs::write(format!("{dir}/batch-ca.der"), ca).unwrap();
            std::fs::write(format!("{dir}/device.der"), cert).unwrap();
        }
        let (batch_ca, device) = (read("batch-ca.der"), read("device.der"));
        // The to-be-signed bytes do not depend on the key that signs them.
        let any_key = BatchKey::generate(BatchKeyType::EcP256).unwrap();
        let (issuer_name, authority_key_id) = issuer_parts(&any_key, &batch_ca).unwrap();
        let again = sign(
            &any_key,
            &Parts {
                issuer_name: &issuer_name,
                authority_key_id: &authority_key_id,
                profile: &profile,
            },
            "D-000123",
            &device_key,
            serial,
            validity,
        )
        .unwrap();
        assert_eq!(tbs(&again), tbs(&device));
        signed_by(&device, &batch_ca).unwrap();
        signed_by(&batch_ca, &read("root.der")).unwrap();
    }

    #[test]
    fn bad_profiles_and_times_are_refused() {
        for subject in ["", "CN", "CN=", "X=1", "CN=a,,O=b"] {
            assert!(DeviceProfile::with_subject(subject).is_err(), "{subject:?}");
        }
        let mut spec = full_spec();
        spec.extended_key_usage = vec!["3.1".into()];
        assert!(DeviceProfile::new(&spec).is_err());
        let mut spec = full_spec();
        spec.alt_names = vec![(AltNameKind::Ip, "{device_id}".into())];
        assert!(DeviceProfile::new(&spec).is_err());
        let rng = SeededRng::new(13);
        let (ca_key, ca_cert, _) = batch_ca(&rng, "batch");
        let issuer = issuer_of(&ca_key, &ca_cert);
        let profile = DeviceProfile::with_subject("CN=a").unwrap();
        let key = DevicePublicKey::Ed25519(vec![1; 32]);
        for t in [i64::MIN, 253_402_300_800 - 86_400 * 366 * 10_000] {
            let v = Validity {
                not_before: UnixTime(t),
                not_after: UnixTime(0),
            };
            assert!(issuer.issue(&profile, "d", &key, [1; 16], v).is_err());
        }
    }

    #[test]
    fn oids_encode_as_x690_says() {
        assert_eq!(
            oid_der("1.3.6.1.5.5.7.3.2").unwrap(),
            [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02]
        );
        // keyfab's own arc (a UUID arc, far beyond 64 bits).
        let mut ours = vec![0x06, 19];
        ours.extend_from_slice(&crate::x509::ARC);
        assert_eq!(
            oid_der("2.25.73303038137255920152163058607138772276").unwrap(),
            ours
        );
        for bad in ["1", "3.1", "1.40", "x.1"] {
            assert!(oid_der(bad).is_err(), "{bad}");
        }
    }
}
