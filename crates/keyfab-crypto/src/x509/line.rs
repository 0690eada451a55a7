//! The production line's own small PKI, for mutual TLS between a site and its stations.
//!
//! ```text
//! line CA of one site (self-signed, pathlen 0; its key in the site's custody)
//!   ├─ server certificate of `keyfab site serve`  (EKU serverAuth; DNS/IP names)
//!   └─ station certificate, CN = station name      (EKU clientAuth + role station)
//! ```
//!
//! Stations trust only their site's line CA, and the site trusts only stations its line
//! CA issued: a station of another site, whose certificate another line CA signed, fails
//! the TLS handshake. The line CA is apart from the root hierarchy on purpose: the root
//! stays offline, and TLS stacks want serverAuth/clientAuth on every CA of a path, which
//! the cluster CAs (role EKUs only) do not carry.

use super::{base_params, build_err, eku_oids, parse_dn, P256Public, Role, Signer, Validity};
use crate::sign::EcdsaSigner;
use crate::{CryptoError, Result};
use rcgen::{BasicConstraints, DistinguishedName, DnType, IsCa, Issuer, KeyUsagePurpose, SanType};
use rustls_pki_types::CertificateDer;

/// id-kp-serverAuth (1.3.6.1.5.5.7.3.1) and id-kp-clientAuth (1.3.6.1.5.5.7.3.2).
const SERVER_AUTH: [u8; 8] = [0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const CLIENT_AUTH: [u8; 8] = [0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// The self-signed line CA of site `site`.
pub fn line_ca_certificate(
    key: &dyn EcdsaSigner,
    site: &str,
    validity: Validity,
    rng: &dyn crate::rng::SecureRng,
) -> Result<Vec<u8>> {
    let mut dn = parse_dn(&format!("CN={site} line CA"))?;
    dn.push(DnType::OrganizationalUnitName, "keyfab line");
    let mut p = base_params(dn, validity, rng)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = false;
    let cert = p.self_signed(&Signer::new(key)).map_err(build_err)?;
    Ok(cert.der().to_vec())
}

/// The line CA certifies a station's P-256 key under the station's name.
pub fn issue_station_certificate(
    ca_key: &dyn EcdsaSigner,
    ca_cert: &[u8],
    station_point: &[u8],
    name: &str,
    validity: Validity,
    rng: &dyn crate::rng::SecureRng,
) -> Result<Vec<u8>> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    let mut p = base_params(dn, validity, rng)?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.custom_extensions
        .push(eku_oids(&[&CLIENT_AUTH, Role::Station.oid()]));
    sign(p, ca_key, ca_cert, station_point)
}

/// The line CA certifies the serving key of `keyfab site serve` for `names` (DNS names
/// or IP addresses the stations use in their URLs).
pub fn issue_server_certificate(
    ca_key: &dyn EcdsaSigner,
    ca_cert: &[u8],
    server_point: &[u8],
    site: &str,
    names: &[String],
    validity: Validity,
    rng: &dyn crate::rng::SecureRng,
) -> Result<Vec<u8>> {
    if names.is_empty() {
        return Err(CryptoError::CertificateBuild(
            "a server certificate needs at least one name".into(),
        ));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, site);
    let mut p = base_params(dn, validity, rng)?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.custom_extensions.push(eku_oids(&[&SERVER_AUTH]));
    p.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) if is_host_name(n) => n
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(build_err),
            Err(_) => Err(CryptoError::CertificateBuild(format!(
                "'{n}' is neither a host name nor an IP address"
            ))),
        })
        .collect::<Result<_>>()?;
    sign(p, ca_key, ca_cert, server_point)
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
fn is_host_name(n: &str) -> bool {
    n.len() <= 253
        && n.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn sign(
    p: rcgen::CertificateParams,
    ca_key: &dyn EcdsaSigner,
    ca_cert: &[u8],
    point: &[u8],
) -> Result<Vec<u8>> {
    let signer = Signer::new(ca_key);
    let issuer =
        Issuer::from_ca_cert_der(&CertificateDer::from(ca_cert), &signer).map_err(build_err)?;
    let cert = p
        .signed_by(&P256Public(point.to_vec()), &issuer)
        .map_err(build_err)?;
    Ok(cert.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;
    use crate::sign::SigningKey;
    use crate::time::UnixTime;

    #[test]
    fn line_certificates_say_who_and_what() {
        let rng = SeededRng::new(7);
        let validity = Validity {
            not_before: UnixTime(1_700_000_000),
            not_after: UnixTime(1_900_000_000),
        };
        let ca = SigningKey::generate(&rng).unwrap();
        let ca_cert = line_ca_certificate(&ca, "shenzhen-1", validity, &rng).unwrap();
        let station = SigningKey::generate(&rng).unwrap();
        let cert = issue_station_certificate(
            &ca,
            &ca_cert,
            station.verifying_key().sec1(),
            "line-1",
            validity,
            &rng,
        )
        .unwrap();
        let facts = super::super::cert_facts(&cert).unwrap();
        assert_eq!(facts.common_name, "line-1");
        assert_eq!(facts.roles, vec![Role::Station]);
        assert!(!facts.is_ca);
        let ca_facts = super::super::cert_facts(&ca_cert).unwrap();
        assert!(ca_facts.is_ca);
        let server = issue_server_certificate(
            &ca,
            &ca_cert,
            station.verifying_key().sec1(),
            "shenzhen-1",
            &["localhost".into(), "127.0.0.1".into()],
            validity,
            &rng,
        )
        .unwrap();
        assert_eq!(
            super::super::cert_facts(&server).unwrap().common_name,
            "shenzhen-1"
        );
        assert!(issue_server_certificate(
            &ca,
            &ca_cert,
            station.verifying_key().sec1(),
            "s",
            &["not a name!".into()],
            validity,
            &rng
        )
        .is_err());
    }
}
