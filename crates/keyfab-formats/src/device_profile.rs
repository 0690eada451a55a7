//! A key's certificate profile, as the policy states it, turned into what the batch CA
//! encodes (docs/FORMATS.md, "Device certificates"). HQ builds it when it creates an
//! entitlement, so a profile the site could not encode is refused there; the site builds
//! it once per entitlement and key.

use keyfab_crypto::x509::{AltNameKind, DeviceProfile, ProfileSpec, RawExtension};
use keyfab_crypto::{CryptoError, Result};
use keyfab_policy::certificate::{
    eku_oid, extension_der, AltName, CertificateTemplate, TemplateValues, KEY_USAGE_NAMES,
};

/// The encoder's profile for `template`, with every placeholder but `{device_id}` filled
/// from `values`.
pub fn device_profile(
    template: &CertificateTemplate,
    values: &TemplateValues<'_>,
) -> Result<DeviceProfile> {
    let bad = |m: String| CryptoError::CertificateBuild(m);
    let filled = template.filled(values);
    let key_usage_bits = template
        .key_usage
        .iter()
        .map(|u| {
            KEY_USAGE_NAMES
                .iter()
                .position(|n| n == u)
                .and_then(|bit| u8::try_from(bit).ok())
                .ok_or_else(|| bad(format!("key usage '{u}'")))
        })
        .collect::<Result<Vec<_>>>()?;
    let extended_key_usage = template
        .extended_key_usage
        .iter()
        .map(|e| eku_oid(e).ok_or_else(|| bad(format!("extended key usage '{e}'"))))
        .collect::<Result<Vec<_>>>()?;
    let alt_names = filled
        .alt_names
        .into_iter()
        .map(|n| match n {
            AltName::Dns(v) => (AltNameKind::Dns, v),
            AltName::Uri(v) => (AltNameKind::Uri, v),
            AltName::Email(v) => (AltNameKind::Email, v),
            AltName::Ip(v) => (AltNameKind::Ip, v),
        })
        .collect();
    let extensions = template
        .extensions
        .iter()
        .map(|x| {
            let value = match (&x.utf8, &x.der) {
                (Some(text), None) => utf8_string(text),
                (None, Some(b64)) => extension_der(b64).map_err(bad)?,
                _ => return Err(bad(format!("extension {}: utf8 or der", x.oid))),
            };
            Ok(RawExtension {
                oid: x.oid.clone(),
                critical: x.critical,
                value,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    DeviceProfile::new(&ProfileSpec {
        subject: filled.subject,
        key_usage_bits,
        extended_key_usage,
        alt_names,
        crl_distribution_point: filled.crl_distribution_point,
        extensions,
    })
}

/// DER UTF8String of `text`.
fn utf8_string(text: &str) -> Vec<u8> {
    let len = text.len();
    let mut out = vec![0x0c];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(text.as_bytes());
    out
}
