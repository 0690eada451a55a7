//! The device certificate profile of a key (`[[keys]] certificate = {…}`): what the batch
//! CA puts in each device certificate. Checked whole here, at `entitlement create` and
//! again at import, so the site never meets a profile it cannot encode.
//!
//! Placeholders: `{device_id}`, `{product}`, `{site}` and `{entitlement}` in subject
//! values and alternative names; all but `{device_id}` in the CRL distribution point (one
//! CRL per batch CA). A placeholder is replaced inside one value, after the subject is
//! split into attributes, so a device id holding `,OU=` cannot add an attribute.

use crate::model::KeyType;
use crate::PolicyError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest device certificate lifetime accepted in days (100 years; beyond, use
/// `"forever"`).
pub const MAX_CERT_DAYS: u32 = 36_500;
/// 9999-12-31T23:59:59Z, RFC 5280's notAfter for "no well-defined expiration", in Unix
/// seconds.
pub const NO_EXPIRY: i64 = 253_402_300_799;
/// At most this many alternative names, and this many extra extensions, per profile.
pub const MAX_PROFILE_ITEMS: usize = 16;
/// Longest value of one alternative name, extension or URL, in bytes.
pub const MAX_PROFILE_VALUE_BYTES: usize = 1024;

/// How long a device certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// This many days from issue.
    Days(u32),
    /// No well-defined end: notAfter `99991231235959Z` (RFC 5280 §4.1.2.5), what IEEE
    /// 802.1AR recommends for a device identity that lives as long as the device.
    Forever,
}

impl Serialize for Lifetime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Days(d) => s.serialize_u32(*d),
            Self::Forever => s.serialize_str("forever"),
        }
    }
}

impl<'de> Deserialize<'de> for Lifetime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Days(i64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Days(n) => u32::try_from(n)
                .map(Self::Days)
                .map_err(|_| serde::de::Error::custom(format!("{n} days is out of range"))),
            Raw::Word(w) if w == "forever" => Ok(Self::Forever),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "'{w}' is neither a number of days nor \"forever\""
            ))),
        }
    }
}

impl Lifetime {
    /// The policy file's form: `3650` or `"forever"`.
    pub fn describe(self) -> String {
        match self {
            Self::Days(d) => format!("{d} days"),
            Self::Forever => "forever".into(),
        }
    }
}

/// One subject alternative name (`{ dns = "…" }`, `{ uri = "…" }`, `{ email = "…" }`,
/// `{ ip = "…" }`), a template except for `ip`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum AltName {
    /// dNSName.
    Dns(String),
    /// uniformResourceIdentifier.
    Uri(String),
    /// rfc822Name.
    Email(String),
    /// iPAddress: a literal IPv4 or IPv6 address.
    Ip(String),
}

/// An extension the profile adds as it is (`{ oid = "…", critical = false, utf8 = "…" }`
/// or `der = "<base64 of one DER value>"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraExtension {
    /// Dotted OID.
    pub oid: String,
    /// Whether a verifier that does not know it must refuse the certificate.
    #[serde(default)]
    pub critical: bool,
    /// The value as a UTF8String.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utf8: Option<String>,
    /// The value as DER, base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub der: Option<String>,
}

/// The device certificate a key gets, signed by the entitlement's batch CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateTemplate {
    /// Distinguished name (CN, O, OU, C, ST, L), with placeholders in its values.
    pub subject: String,
    /// How long the certificate is valid from issue.
    pub days: Lifetime,
    /// Extended key usages: `client-auth`, `server-auth`, `code-signing`,
    /// `email-protection` or a dotted OID. Empty: no extension (any purpose).
    #[serde(default = "default_eku")]
    pub extended_key_usage: Vec<String>,
    /// Key usages: `digital-signature`, `non-repudiation`, `key-encipherment`,
    /// `data-encipherment`, `key-agreement`.
    #[serde(default = "default_key_usage")]
    pub key_usage: Vec<String>,
    /// Subject alternative names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<AltName>,
    /// Extensions added as given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<ExtraExtension>,
    /// The URL (http or https) where relying parties fetch the batch CA's CRL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_distribution_point: Option<String>,
}

/// What mutual TLS to the major IoT clouds expects of a device certificate.
pub fn default_eku() -> Vec<String> {
    vec!["client-auth".into()]
}

/// A signing key's usage: what the default [`default_eku`] needs.
pub fn default_key_usage() -> Vec<String> {
    vec!["digital-signature".into()]
}

/// The named extended key usages and their OIDs.
pub const EKU_NAMES: [(&str, &str); 4] = [
    ("client-auth", "1.3.6.1.5.5.7.3.2"),
    ("server-auth", "1.3.6.1.5.5.7.3.1"),
    ("code-signing", "1.3.6.1.5.5.7.3.3"),
    ("email-protection", "1.3.6.1.5.5.7.3.4"),
];

/// The key usage names, in the order of their bit in the KeyUsage BIT STRING.
pub const KEY_USAGE_NAMES: [&str; 5] = [
    "digital-signature",
    "non-repudiation",
    "key-encipherment",
    "data-encipherment",
    "key-agreement",
];

/// Extensions the profile's own fields (or the batch CA) set: never added twice.
const RESERVED_EXTENSIONS: [(&str, &str); 7] = [
    ("2.5.29.14", "subjectKeyIdentifier"),
    ("2.5.29.15", "keyUsage (use key_usage)"),
    ("2.5.29.17", "subjectAltName (use subject_alt_names)"),
    ("2.5.29.19", "basicConstraints"),
    (
        "2.5.29.31",
        "cRLDistributionPoints (use crl_distribution_point)",
    ),
    ("2.5.29.35", "authorityKeyIdentifier"),
    ("2.5.29.37", "extKeyUsage (use extended_key_usage)"),
];

/// The attributes a subject may name.
pub const SUBJECT_ATTRIBUTES: [&str; 6] = ["CN", "O", "OU", "C", "ST", "L"];

/// Placeholders a template may use.
const PLACEHOLDERS: [&str; 4] = ["{device_id}", "{product}", "{site}", "{entitlement}"];

/// The values placeholders stand for, for one entitlement (the device id comes per
/// device).
#[derive(Debug, Clone, Copy)]
pub struct TemplateValues<'a> {
    /// The policy's product.
    pub product: &'a str,
    /// The site's name.
    pub site: &'a str,
    /// The entitlement id.
    pub entitlement: &'a str,
}

impl TemplateValues<'_> {
    /// `template` with every placeholder but `{device_id}` replaced.
    pub fn fill(&self, template: &str) -> String {
        template
            .replace("{product}", self.product)
            .replace("{site}", self.site)
            .replace("{entitlement}", self.entitlement)
    }
}

/// The subject's attributes in order, each named once (a name given twice is refused).
pub fn subject_attributes(subject: &str) -> Result<Vec<(&str, &str)>, String> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for part in subject.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not KEY=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if !SUBJECT_ATTRIBUTES.contains(&k) {
            return Err(format!("attribute '{k}' is not one of CN, O, OU, C, ST, L"));
        }
        if v.is_empty() {
            return Err(format!("'{part}' has an empty value"));
        }
        if out.iter().any(|(name, _)| *name == k) {
            return Err(format!("attribute '{k}' is given twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

impl CertificateTemplate {
    /// The profile as a policy gives it with only a subject and a lifetime.
    pub fn new(subject: impl Into<String>, days: Lifetime) -> Self {
        Self {
            subject: subject.into(),
            days,
            extended_key_usage: default_eku(),
            key_usage: default_key_usage(),
            subject_alt_names: Vec::new(),
            extensions: Vec::new(),
            crl_distribution_point: None,
        }
    }

    /// Every rule of a profile for a key of `key_type`; `field` names the profile in
    /// errors (`keys[0].certificate`).
    pub fn validate(&self, field: &str, key_type: KeyType) -> Result<(), PolicyError> {
        let at = |f: &str| format!("{field}.{f}");
        let err = |f: &str, m: String| PolicyError::new(at(f), m);
        for (_, value) in subject_attributes(&self.subject).map_err(|m| err("subject", m))? {
            check_placeholders(value, &PLACEHOLDERS).map_err(|m| err("subject", m))?;
        }
        if let Lifetime::Days(d) = self.days {
            if d == 0 || d > MAX_CERT_DAYS {
                return Err(err(
                    "days",
                    format!("must be between 1 and {MAX_CERT_DAYS}, or \"forever\""),
                ));
            }
        }
        let mut ekus = std::collections::BTreeSet::new();
        for e in &self.extended_key_usage {
            let oid = eku_oid(e).ok_or_else(|| {
                err(
                    "extended_key_usage",
                    format!("'{e}' is not client-auth, server-auth, code-signing, email-protection or a dotted OID"),
                )
            })?;
            if !ekus.insert(oid) {
                return Err(err("extended_key_usage", format!("'{e}' is listed twice")));
            }
        }
        self.validate_key_usage(&at("key_usage"), key_type)?;
        if self.subject_alt_names.len() > MAX_PROFILE_ITEMS {
            return Err(err(
                "subject_alt_names",
                format!("at most {MAX_PROFILE_ITEMS} names"),
            ));
        }
        for (i, name) in self.subject_alt_names.iter().enumerate() {
            validate_alt_name(name).map_err(|m| err(&format!("subject_alt_names[{i}]"), m))?;
        }
        if self.extensions.len() > MAX_PROFILE_ITEMS {
            return Err(err(
                "extensions",
                format!("at most {MAX_PROFILE_ITEMS} extensions"),
            ));
        }
        let mut oids = std::collections::BTreeSet::new();
        for (i, x) in self.extensions.iter().enumerate() {
            validate_extension(x).map_err(|m| err(&format!("extensions[{i}]"), m))?;
            if !oids.insert(x.oid.as_str()) {
                return Err(err(
                    &format!("extensions[{i}].oid"),
                    format!("{} is added twice", x.oid),
                ));
            }
        }
        if let Some(url) = &self.crl_distribution_point {
            validate_url(url, &PLACEHOLDERS[1..]).map_err(|m| err("crl_distribution_point", m))?;
        }
        Ok(())
    }

    fn validate_key_usage(&self, field: &str, key_type: KeyType) -> Result<(), PolicyError> {
        if self.key_usage.is_empty() {
            return Err(PolicyError::new(
                field,
                "must name at least one usage (digital-signature for an identity key)",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for u in &self.key_usage {
            if !KEY_USAGE_NAMES.contains(&u.as_str()) {
                return Err(PolicyError::new(
                    field,
                    format!("'{u}' is not one of {}", KEY_USAGE_NAMES.join(", ")),
                ));
            }
            if !seen.insert(u.as_str()) {
                return Err(PolicyError::new(field, format!("'{u}' is listed twice")));
            }
            // RFC 8813 §3 (EC keys encipher nothing) and RFC 8410 §5 (Ed25519 signs only).
            // RFC 4055: RSA keys sign or encipher, never agree on keys.
            let impossible = match key_type {
                KeyType::EcP256 | KeyType::EcP384 => {
                    matches!(u.as_str(), "key-encipherment" | "data-encipherment")
                }
                KeyType::Ed25519 => !matches!(u.as_str(), "digital-signature" | "non-repudiation"),
                KeyType::Rsa2048 | KeyType::Rsa3072 => u == "key-agreement",
                KeyType::Aes256 => true,
            };
            if impossible {
                return Err(PolicyError::new(
                    field,
                    format!("'{u}' is not possible for a {} key", key_type.as_str()),
                ));
            }
        }
        Ok(())
    }

    /// The placeholders this profile uses, filled for one entitlement.
    pub fn filled(&self, values: &TemplateValues<'_>) -> FilledTemplate {
        FilledTemplate {
            subject: subject_attributes(&self.subject)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), values.fill(v)))
                .collect(),
            alt_names: self
                .subject_alt_names
                .iter()
                .map(|n| match n {
                    AltName::Dns(v) => AltName::Dns(values.fill(v)),
                    AltName::Uri(v) => AltName::Uri(values.fill(v)),
                    AltName::Email(v) => AltName::Email(values.fill(v)),
                    AltName::Ip(v) => AltName::Ip(v.clone()),
                })
                .collect(),
            crl_distribution_point: self.crl_distribution_point.as_ref().map(|u| values.fill(u)),
        }
    }
}

/// Where the policy's certificate profiles put a device id inside a name, and so what a
/// device id must be for the name to stay what the policy author wrote: a station sends
/// the id, and an id of `*` in `{device_id}.devices.example.com` would otherwise get a
/// wildcard certificate for every device's host name. Refused ids are refused by the
/// policy (`device_id_rejected`), before anything is made.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdInNames {
    /// In a DNS name: letters, digits, `-` and `.`, neither first nor last, no `..`.
    dns: bool,
    /// In an e-mail address: no `@`.
    email: bool,
    /// In a URI: none of `? # % [ ]`, which would change its structure.
    uri: bool,
}

impl IdInNames {
    /// What `policy`'s profiles ask.
    pub fn of(policy: &crate::Policy) -> Self {
        let mut out = Self::default();
        for name in policy
            .keys
            .iter()
            .filter_map(|k| k.certificate.as_ref())
            .flat_map(|c| &c.subject_alt_names)
        {
            match name {
                AltName::Dns(t) => out.dns |= t.contains("{device_id}"),
                AltName::Email(t) => out.email |= t.contains("{device_id}"),
                AltName::Uri(t) => out.uri |= t.contains("{device_id}"),
                AltName::Ip(_) => {}
            }
        }
        out
    }

    /// Whether `device_id` keeps every name it goes into well-formed.
    pub fn accepts(&self, device_id: &str) -> bool {
        let dns_ok = || {
            device_id.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        };
        (!self.dns || dns_ok())
            && (!self.email || !device_id.contains('@'))
            && (!self.uri || !device_id.contains(['?', '#', '%', '[', ']']))
    }
}

/// A profile's templates for one entitlement: only `{device_id}` is left to fill.
#[derive(Debug, Clone)]
pub struct FilledTemplate {
    /// Subject attributes (CN, O, …) and their values.
    pub subject: Vec<(String, String)>,
    /// Alternative names.
    pub alt_names: Vec<AltName>,
    /// The CRL's URL.
    pub crl_distribution_point: Option<String>,
}

/// The OID of a named or dotted extended key usage; `None` if it is neither.
pub fn eku_oid(name: &str) -> Option<String> {
    if let Some((_, oid)) = EKU_NAMES.iter().find(|(n, _)| *n == name) {
        return Some((*oid).to_owned());
    }
    oid_arcs(name).map(|_| name.to_owned())
}

/// The arcs of a dotted OID: at least two, the first 0–2, the second below 40 under 0 and
/// 1 (X.690 §8.19.4), each at most 2^128 − 1 (a UUID arc fits); `None` otherwise.
pub fn oid_arcs(text: &str) -> Option<Vec<u128>> {
    if text.len() > 128 {
        return None;
    }
    let arcs: Vec<u128> = text
        .split('.')
        .map(|a| {
            let canonical = !a.is_empty()
                && a.bytes().all(|b| b.is_ascii_digit())
                && (a == "0" || !a.starts_with('0'));
            canonical.then(|| a.parse::<u128>().ok()).flatten()
        })
        .collect::<Option<_>>()?;
    match arcs.as_slice() {
        [first, second, ..] if *first <= 2 && (*first == 2 || *second < 40) => Some(arcs),
        _ => None,
    }
}

fn check_placeholders(value: &str, allowed: &[&str]) -> Result<(), String> {
    let mut rest = value.to_owned();
    for p in allowed {
        rest = rest.replace(p, "");
    }
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "'{value}' has a placeholder other than {}",
            allowed.join(", ")
        ));
    }
    Ok(())
}

/// Characters an IA5String of a DNS name, URI or e-mail may hold here: printable ASCII
/// without spaces (what a device id is, so a filled template stays IA5).
fn ia5_ok(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| b.is_ascii_graphic())
}

fn validate_alt_name(name: &AltName) -> Result<(), String> {
    let (value, kind) = match name {
        AltName::Ip(v) => {
            return v
                .parse::<std::net::IpAddr>()
                .map(|_| ())
                .map_err(|_| format!("ip '{v}' is not an IPv4 or IPv6 address"));
        }
        AltName::Dns(v) => (v, "dns"),
        AltName::Uri(v) => (v, "uri"),
        AltName::Email(v) => (v, "email"),
    };
    if value.len() > MAX_PROFILE_VALUE_BYTES || !ia5_ok(value) {
        return Err(format!(
            "{kind} must be 1-{MAX_PROFILE_VALUE_BYTES} printable ASCII characters without spaces"
        ));
    }
    check_placeholders(value, &PLACEHOLDERS)?;
    let sample = fill_sample(value);
    let ok = match name {
        AltName::Dns(_) => sample.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        }),
        AltName::Uri(_) => sample.split_once(':').is_some_and(|(scheme, rest)| {
            !rest.is_empty()
                && scheme
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphabetic())
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        }),
        AltName::Email(_) => sample
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@')),
        AltName::Ip(_) => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{kind} '{value}' is not a valid {kind} name"))
    }
}

/// A template with each placeholder replaced by a sample value, to check its syntax.
fn fill_sample(template: &str) -> String {
    PLACEHOLDERS
        .iter()
        .fold(template.to_owned(), |t, p| t.replace(p, "x1"))
}

fn validate_url(url: &str, allowed: &[&str]) -> Result<(), String> {
    if url.len() > MAX_PROFILE_VALUE_BYTES || !ia5_ok(url) {
        return Err(format!(
            "must be 1-{MAX_PROFILE_VALUE_BYTES} printable ASCII characters without spaces"
        ));
    }
    check_placeholders(url, allowed)?;
    let host = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match host {
        Some(h) if !h.is_empty() && !h.starts_with('/') => Ok(()),
        _ => Err(format!("'{url}' is not an http:// or https:// URL")),
    }
}

fn validate_extension(x: &ExtraExtension) -> Result<(), String> {
    if oid_arcs(&x.oid).is_none() {
        return Err(format!("oid '{}' is not a dotted OID", x.oid));
    }
    if let Some((_, what)) = RESERVED_EXTENSIONS.iter().find(|(o, _)| *o == x.oid) {
        return Err(format!("oid {} is {what}, which keyfab sets", x.oid));
    }
    match (&x.utf8, &x.der) {
        (Some(text), None) if text.len() <= MAX_PROFILE_VALUE_BYTES => Ok(()),
        (None, Some(b64)) => {
            let der = extension_der(b64)?;
            if der.len() > MAX_PROFILE_VALUE_BYTES {
                return Err(format!("der is over {MAX_PROFILE_VALUE_BYTES} bytes"));
            }
            Ok(())
        }
        (Some(_), None) => Err(format!("utf8 is over {MAX_PROFILE_VALUE_BYTES} bytes")),
        _ => Err("give exactly one of utf8 or der".into()),
    }
}

/// The DER of an extension's `der` value: base64 of exactly one DER value.
pub fn extension_der(b64: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("der is not base64: {e}"))?;
    match one_tlv_len(&der) {
        Some(n) if n == der.len() => Ok(der),
        _ => Err("der is not exactly one DER value (tag, definite length, contents)".into()),
    }
}

/// The length of the TLV at the start of `der` (low-tag-number form, definite length).
fn one_tlv_len(der: &[u8]) -> Option<usize> {
    let (&tag, rest) = der.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    header.checked_add(len).filter(|end| *end <= der.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> CertificateTemplate {
        CertificateTemplate::new("CN={device_id},O=Acme", Lifetime::Days(3650))
    }

    fn refused(t: &CertificateTemplate, key: KeyType) -> String {
        t.validate("keys[0].certificate", key).unwrap_err().field
    }

    #[test]
    fn a_plain_profile_passes_and_defaults_to_client_auth() {
        profile().validate("c", KeyType::EcP256).unwrap();
        assert_eq!(profile().extended_key_usage, ["client-auth"]);
        assert_eq!(profile().key_usage, ["digital-signature"]);
    }

    #[test]
    fn each_impossible_field_is_named() {
        let mut t = profile();
        t.key_usage = vec!["key-encipherment".into()];
        assert_eq!(
            refused(&t, KeyType::EcP256),
            "keys[0].certificate.key_usage"
        );
        t.key_usage = vec!["key-agreement".into()];
        assert_eq!(
            refused(&t, KeyType::Ed25519),
            "keys[0].certificate.key_usage"
        );
        let mut t = profile();
        t.extended_key_usage = vec!["client".into()];
        assert_eq!(
            refused(&t, KeyType::EcP256),
            "keys[0].certificate.extended_key_usage"
        );
        let mut t = profile();
        t.subject_alt_names = vec![AltName::Ip("{device_id}".into())];
        assert_eq!(
            refused(&t, KeyType::EcP256),
            "keys[0].certificate.subject_alt_names[0]"
        );
        let mut t = profile();
        t.extensions = vec![ExtraExtension {
            oid: "2.5.29.17".into(),
            critical: false,
            utf8: Some("x".into()),
            der: None,
        }];
        assert_eq!(
            refused(&t, KeyType::EcP256),
            "keys[0].certificate.extensions[0]"
        );
        let mut t = profile();
        t.crl_distribution_point = Some("http://crl.example/{device_id}.crl".into());
        assert_eq!(
            refused(&t, KeyType::EcP256),
            "keys[0].certificate.crl_distribution_point"
        );
        let mut t = profile();
        t.subject = "CN={device_id},CN=again".into();
        assert_eq!(refused(&t, KeyType::EcP256), "keys[0].certificate.subject");
        let mut t = profile();
        t.days = Lifetime::Days(0);
        assert_eq!(refused(&t, KeyType::EcP256), "keys[0].certificate.days");
    }

    #[test]
    fn a_device_id_cannot_change_a_name_it_goes_into() {
        let rules = IdInNames {
            dns: true,
            email: true,
            uri: true,
        };
        for ok in ["D-1", "dev.42", "TSV2-00000001"] {
            assert!(rules.accepts(ok), "{ok}");
        }
        for bad in ["*", "a_b", "-a", "a-", "a..b", ".a", "a@b", "a?b", "a#b"] {
            assert!(!rules.accepts(bad), "{bad}");
        }
        // Only what a profile uses restricts: a subject alone takes any id.
        assert!(IdInNames::default().accepts("a_b@*"));
    }

    #[test]
    fn oids_are_canonical_dotted_decimal() {
        assert!(oid_arcs("1.3.6.1.4.1.99999.1").is_some());
        assert!(oid_arcs("2.25.73303038137255920152163058607138772276").is_some());
        for bad in ["1", "3.1", "1.40", "1.03", "1..2", "a.b", ""] {
            assert!(oid_arcs(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn der_values_are_one_whole_tlv() {
        assert!(extension_der("MAA=").is_ok()); // SEQUENCE {}
        assert!(extension_der("MAI=").is_err()); // length 2, nothing after
        assert!(extension_der("MAAwAA==").is_err()); // two values
        assert!(extension_der("!!").is_err());
    }

    #[test]
    fn lifetime_reads_a_number_or_forever() {
        let t: Lifetime = toml::Value::Integer(30).try_into().unwrap();
        assert_eq!(t, Lifetime::Days(30));
        let t: Lifetime = toml::Value::String("forever".into()).try_into().unwrap();
        assert_eq!(t, Lifetime::Forever);
        assert!(toml::Value::String("always".into())
            .try_into::<Lifetime>()
            .is_err());
    }
}
