//! Device certificates, DER-encoded directly.
//!
//! A site signs one device certificate per provisioned device, on the provisioning hot
//! path. Everything in it but the subject, serial, validity and device key is the same
//! for every device of a batch CA, so [`DeviceIssuer`] encodes those parts once and each
//! certificate costs one small encoding and the ECDSA signature (a general certificate
//! builder re-derived the constant parts and allocated per field: ~3.4 µs of ~18 µs per
//! certificate here). The shape (FORMATS.md, "Device certificates"):
//!
//! ```text
//! Certificate ::= SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING signature }
//! tbs: [0] v3, serial (16 bytes), ecdsa-with-SHA256, issuer (the batch CA's subject,
//!      as its certificate has it), validity (UTCTime before 2050, GeneralizedTime
//!      from 2050), subject (one RDN per attribute, UTF8String), SubjectPublicKeyInfo,
//!      [3] extensions: authorityKeyIdentifier (the CA's subjectKeyIdentifier),
//!      keyUsage digitalSignature (critical), subjectKeyIdentifier (SHA-256 of the
//!      SubjectPublicKeyInfo, first 20 bytes), basicConstraints CA:FALSE (critical)
//! ```

use super::{dn_attributes, fixed_to_asn1, DevicePublicKey, Validity};
use crate::hash::sha256;
use crate::sign::{EcdsaSigner, SigningKey};
use crate::time::UnixTime;
use crate::{CryptoError, Result};

/// AlgorithmIdentifier ecdsa-with-SHA256 (1.2.840.10045.4.3.2), no parameters.
const ECDSA_SHA256: [u8; 12] = [
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];

/// `[0] { INTEGER 2 }`: version v3.
const VERSION_3: [u8; 5] = [0xa0, 0x03, 0x02, 0x01, 0x02];

/// keyUsage (2.5.29.15), critical, digitalSignature only.
const KEY_USAGE_DIGITAL_SIGNATURE: [u8; 16] = [
    0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x07, 0x80,
];

/// basicConstraints (2.5.29.19), critical, CA:FALSE (an empty SEQUENCE).
const BASIC_CONSTRAINTS_END_ENTITY: [u8; 14] = [
    0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00,
];

const OID_SUBJECT_KEY_IDENTIFIER: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x0e];
const OID_AUTHORITY_KEY_IDENTIFIER: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x23];

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

/// Appends one TLV.
fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    push_wrapped(out, tag, |c| c.extend_from_slice(content));
}

/// Appends `tag` around what `body` writes, and returns what `body` returns: a one-byte
/// length is reserved and widened in place if the content turns out longer, so nesting
/// costs no allocation.
fn push_wrapped<R>(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>) -> R) -> R {
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

/// A batch CA ready to issue device certificates: the parts every certificate shares are
/// encoded once, from its certificate.
pub struct DeviceIssuer {
    key: SigningKey,
    /// The CA's subject Name, exactly as in its certificate (what path building matches).
    issuer_name: Vec<u8>,
    /// The whole authorityKeyIdentifier extension.
    authority_key_id: Vec<u8>,
}

impl DeviceIssuer {
    /// An issuer for the batch CA key and its certificate.
    pub fn new(batch_key: SigningKey, batch_cert: &[u8]) -> Result<Self> {
        let (issuer_name, authority_key_id) = issuer_parts(&batch_key, batch_cert)?;
        Ok(Self {
            key: batch_key,
            issuer_name,
            authority_key_id,
        })
    }

    /// [`super::issue_device_certificate`] under this CA.
    pub fn issue(
        &self,
        subject: &str,
        key: &DevicePublicKey,
        serial: [u8; 16],
        validity: Validity,
    ) -> Result<Vec<u8>> {
        sign(
            &self.key,
            &self.issuer_name,
            &self.authority_key_id,
            subject,
            key,
            serial,
            validity,
        )
    }
}

/// The issuer Name and the authorityKeyIdentifier extension a CA's certificates carry:
/// its subject as encoded in its certificate, and its subjectKeyIdentifier (or, if its
/// certificate has none, the first 20 bytes of SHA-256 of its key).
pub(super) fn issuer_parts(ca_key: &dyn EcdsaSigner, ca_cert: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(ca_cert)
        .map_err(|e| CryptoError::CertificateMalformed(format!("CA certificate: {e}")))?;
    let key_id = cert
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .unwrap_or_else(|| sha256(&ca_key.verifying_key().spki_der())[..20].to_vec());
    let mut aki = Vec::with_capacity(40);
    push_wrapped(&mut aki, SEQUENCE, |e| {
        e.extend_from_slice(&OID_AUTHORITY_KEY_IDENTIFIER);
        push_wrapped(e, OCTET_STRING, |v| {
            push_wrapped(v, SEQUENCE, |s| push_tlv(s, KEY_ID, &key_id));
        });
    });
    Ok((cert.subject().as_raw().to_vec(), aki))
}

/// Encodes the device certificate and signs it with `ca_key`.
pub(super) fn sign(
    ca_key: &dyn EcdsaSigner,
    issuer_name: &[u8],
    authority_key_id: &[u8],
    subject: &str,
    key: &DevicePublicKey,
    serial: [u8; 16],
    validity: Validity,
) -> Result<Vec<u8>> {
    let spki = key.spki_der();
    let mut tbs = Vec::with_capacity(320 + subject.len() + issuer_name.len());
    push_wrapped(&mut tbs, SEQUENCE, |t| -> Result<()> {
        t.extend_from_slice(&VERSION_3);
        push_serial(t, &serial);
        t.extend_from_slice(&ECDSA_SHA256);
        t.extend_from_slice(issuer_name);
        push_wrapped(t, SEQUENCE, |v| {
            push_time(v, validity.not_before)?;
            push_time(v, validity.not_after)
        })?;
        push_name(t, subject)?;
        t.extend_from_slice(&spki);
        push_wrapped(t, EXTENSIONS, |x| {
            push_wrapped(x, SEQUENCE, |exts| {
                exts.extend_from_slice(authority_key_id);
                exts.extend_from_slice(&KEY_USAGE_DIGITAL_SIGNATURE);
                push_wrapped(exts, SEQUENCE, |e| {
                    e.extend_from_slice(&OID_SUBJECT_KEY_IDENTIFIER);
                    push_wrapped(e, OCTET_STRING, |v| {
                        push_tlv(v, OCTET_STRING, &sha256(&spki)[..20]);
                    });
                });
                exts.extend_from_slice(&BASIC_CONSTRAINTS_END_ENTITY);
            });
        });
        Ok(())
    })?;
    let signature = fixed_to_asn1(&ca_key.sign(&tbs)?)?;
    let mut cert = Vec::with_capacity(tbs.len() + signature.len() + 24);
    push_wrapped(&mut cert, SEQUENCE, |c| {
        c.extend_from_slice(&tbs);
        c.extend_from_slice(&ECDSA_SHA256);
        push_wrapped(c, BIT_STRING, |b| {
            b.push(0);
            b.extend_from_slice(&signature);
        });
    });
    Ok(cert)
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

/// The subject: one RDN per attribute, in the order first named, UTF8String values.
fn push_name(out: &mut Vec<u8>, text: &str) -> Result<()> {
    let attributes = dn_attributes(text)?;
    push_wrapped(out, SEQUENCE, |name| {
        for (attribute, value) in &attributes {
            push_wrapped(name, SET, |rdn| {
                push_wrapped(rdn, SEQUENCE, |atv| {
                    atv.extend_from_slice(attribute.oid_der());
                    push_tlv(atv, UTF8_STRING, value.as_bytes());
                });
            });
        }
    });
    Ok(())
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
    use crate::x509::{issue_batch_ca, parse_dn, random_serial, root_certificate, signed_by};
    use rcgen::{CertificateParams, IsCa, Issuer, KeyUsagePurpose, SerialNumber};
    use rustls_pki_types::CertificateDer;

    /// The general builder's device certificate for the same inputs: the reference the
    /// direct encoding must match byte for byte (up to the ECDSA signature, which is
    /// randomized).
    fn reference(
        ca_key: &SigningKey,
        ca_cert: &[u8],
        subject: &str,
        key: &DevicePublicKey,
        serial: [u8; 16],
        validity: Validity,
    ) -> Vec<u8> {
        struct DeviceKey<'a>(&'a DevicePublicKey);
        impl rcgen::PublicKeyData for DeviceKey<'_> {
            fn der_bytes(&self) -> &[u8] {
                match self.0 {
                    DevicePublicKey::P256(p) | DevicePublicKey::Ed25519(p) => p,
                }
            }
            fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
                match self.0 {
                    DevicePublicKey::P256(_) => &rcgen::PKCS_ECDSA_P256_SHA256,
                    DevicePublicKey::Ed25519(_) => &rcgen::PKCS_ED25519,
                }
            }
        }
        let issuer = Issuer::from_ca_cert_der(
            &CertificateDer::from(ca_cert),
            crate::x509::Signer::new(ca_key),
        )
        .unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = parse_dn(subject).unwrap();
        p.not_before = crate::x509::odt(validity.not_before).unwrap();
        p.not_after = crate::x509::odt(validity.not_after).unwrap();
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.use_authority_key_identifier_extension = true;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
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

    fn batch_ca(rng: &SeededRng, common_name: &str) -> (SigningKey, Vec<u8>, Vec<u8>) {
        let root_key = SigningKey::generate(rng).unwrap();
        let v = Validity {
            not_before: UnixTime(1_764_028_800),
            not_after: UnixTime(1_764_028_800).plus_days(3650),
        };
        let root = root_certificate(&root_key, "CN=Root,O=Acme", v, rng).unwrap();
        let key = SigningKey::generate(rng).unwrap();
        let cert =
            issue_batch_ca(&root_key, &root, &key.verifying_key(), common_name, v, rng).unwrap();
        (key, cert, root)
    }

    #[test]
    fn encodes_what_the_general_builder_encodes() {
        let rng = SeededRng::new(11);
        let (ca_key, ca_cert, _) = batch_ca(&rng, "batch 7 of Acme Devices GmbH");
        let issuer = DeviceIssuer::new(
            SigningKey::from_pkcs8(ca_key.to_pkcs8().expose()).unwrap(),
            &ca_cert,
        )
        .unwrap();
        let p256 = DevicePublicKey::P256(
            SigningKey::generate(&rng)
                .unwrap()
                .verifying_key()
                .sec1()
                .to_vec(),
        );
        let ed25519 = DevicePublicKey::Ed25519(vec![0x42; 32]);
        let long = format!("CN={},O=Acme", "d".repeat(300));
        let subjects = [
            "CN=D-1",
            "CN=dev-0001,O=Acme Devices,C=DE",
            "CN= spaced ,OU=Line 3,ST=Bayern,L=München,O=Acme",
            "CN=first,O=Acme,CN=second",
            long.as_str(),
        ];
        let times = [
            (1_764_028_800, 1_764_028_800 + 86_400 * 3650),
            // 2049-12-31T23:59:59 to 2050-01-01: the switch to GeneralizedTime.
            (2_524_607_999, 2_524_608_000),
            // Before 1950, and far ahead.
            (-631_152_001, 32_503_680_000),
        ];
        for subject in subjects {
            for key in [&p256, &ed25519] {
                for (from, until) in times {
                    let validity = Validity {
                        not_before: UnixTime(from),
                        not_after: UnixTime(until),
                    };
                    let serial = random_serial(&rng);
                    let ours = issuer.issue(subject, key, serial, validity).unwrap();
                    let theirs = reference(&ca_key, &ca_cert, subject, key, serial, validity);
                    assert_eq!(tbs(&ours), tbs(&theirs), "{subject} {key:?} {from}");
                    signed_by(&ours, &ca_cert).unwrap();
                    let standalone = crate::x509::issue_device_certificate(
                        &ca_key, &ca_cert, subject, key, serial, validity,
                    )
                    .unwrap();
                    assert_eq!(tbs(&standalone), tbs(&ours));
                }
            }
        }
    }

    #[test]
    fn a_long_certificate_uses_long_form_lengths() {
        let rng = SeededRng::new(12);
        let (ca_key, ca_cert, _) = batch_ca(&rng, "batch");
        let subject = format!("CN={},O={}", "x".repeat(200), "y".repeat(70_000));
        let key = DevicePublicKey::Ed25519(vec![1; 32]);
        let validity = Validity {
            not_before: UnixTime(0),
            not_after: UnixTime(86_400),
        };
        let serial = [0x7f; 16];
        let ours = crate::x509::issue_device_certificate(
            &ca_key, &ca_cert, &subject, &key, serial, validity,
        )
        .unwrap();
        let theirs = reference(&ca_key, &ca_cert, &subject, &key, serial, validity);
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
        let (batch_ca, device) = (read("batch-ca.der"), read("device.der"));
        // The to-be-signed bytes do not depend on the key that signs them.
        let any_key = SigningKey::generate(&SeededRng::new(14)).unwrap();
        let (issuer_name, authority_key_id) = issuer_parts(&any_key, &batch_ca).unwrap();
        let again = sign(
            &any_key,
            &issuer_name,
            &authority_key_id,
            "CN=D-000123,O=Acme Devices,C=DE",
            &DevicePublicKey::P256(read("device-point.bin")),
            *b"\x3akeyfab-vectors!",
            Validity {
                not_before: UnixTime(1_767_225_600),
                not_after: UnixTime(1_767_225_600).plus_days(9131),
            },
        )
        .unwrap();
        assert_eq!(tbs(&again), tbs(&device));
        signed_by(&device, &batch_ca).unwrap();
        signed_by(&batch_ca, &read("root.der")).unwrap();
    }

    #[test]
    fn bad_subjects_and_times_are_refused() {
        let rng = SeededRng::new(13);
        let (ca_key, ca_cert, _) = batch_ca(&rng, "batch");
        let key = DevicePublicKey::Ed25519(vec![1; 32]);
        let ok = Validity {
            not_before: UnixTime(0),
            not_after: UnixTime(86_400),
        };
        for subject in ["", "CN", "CN=", "X=1", "CN=a,,O=b"] {
            assert!(
                crate::x509::issue_device_certificate(
                    &ca_key, &ca_cert, subject, &key, [1; 16], ok
                )
                .is_err(),
                "{subject:?}"
            );
        }
        for t in [i64::MIN, i64::MAX, 253_402_300_800] {
            let v = Validity {
                not_before: UnixTime(0),
                not_after: UnixTime(t),
            };
            assert!(crate::x509::issue_device_certificate(
                &ca_key, &ca_cert, "CN=a", &key, [1; 16], v
            )
            .is_err());
        }
    }
}
