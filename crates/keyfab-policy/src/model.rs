//! The canonical policy, as signed into an entitlement.

use crate::certificate::CertificateTemplate;
use crate::PolicyError;
use serde::{Deserialize, Serialize};

/// Largest quota one entitlement may carry.
pub const MAX_DEVICES: u64 = 100_000_000;
/// Bound on the compiled size of `id_pattern`, so a pattern cannot exhaust the site.
pub const MAX_PATTERN_BYTES: usize = 1 << 20;

/// The type of a device key (`type` in a `[[keys]]` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyType {
    /// ECDSA on P-256 (`ec-p256`); may carry a device certificate.
    #[serde(rename = "ec-p256")]
    EcP256,
    /// ECDSA on P-384 (`ec-p384`).
    #[serde(rename = "ec-p384")]
    EcP384,
    /// Ed25519 (`ed25519`).
    #[serde(rename = "ed25519")]
    Ed25519,
    /// RSA with a 2048-bit modulus (`rsa-2048`): made where it is used (source `site`
    /// or `device`), never pooled.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA with a 3072-bit modulus (`rsa-3072`).
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    /// A 256-bit AES key (`aes-256`).
    #[serde(rename = "aes-256")]
    Aes256,
}

impl KeyType {
    /// The name a policy file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Ed25519 => "ed25519",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Aes256 => "aes-256",
        }
    }

    /// Every type, in the order the policy file lists them.
    pub const ALL: [KeyType; 6] = [
        Self::EcP256,
        Self::EcP384,
        Self::Ed25519,
        Self::Rsa2048,
        Self::Rsa3072,
        Self::Aes256,
    ];

    /// The type a policy file names `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// An RSA key.
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa2048 | Self::Rsa3072)
    }
    /// A key pair (with a public key to certify), not a secret key.
    pub fn is_asymmetric(self) -> bool {
        !matches!(self, Self::Aes256)
    }
}

/// Where a device key comes from (`source` in a `[[keys]]` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeySource {
    /// Generated at HQ and shipped, encrypted, in the entitlement.
    #[serde(rename = "hq-pool")]
    HqPool,
    /// Generated at the site when a device is provisioned.
    #[serde(rename = "site")]
    Site,
    /// The device sends its public key in a CSR and receives a certificate.
    #[serde(rename = "device")]
    Device,
    /// AES-256 diversified from the entitlement's master secret by device id.
    #[serde(rename = "derived")]
    Derived,
}

impl KeySource {
    /// The name a policy file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HqPool => "hq-pool",
            Self::Site => "site",
            Self::Device => "device",
            Self::Derived => "derived",
        }
    }
}

/// The key of an entitlement's batch CA (`batch_ca_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum BatchCaKey {
    /// ECDSA P-256, device certificates signed ecdsa-with-SHA256 (the default).
    #[default]
    #[serde(rename = "ec-p256")]
    EcP256,
    /// ECDSA P-384, device certificates signed ecdsa-with-SHA384.
    #[serde(rename = "ec-p384")]
    EcP384,
}

impl BatchCaKey {
    /// The name a policy file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
        }
    }

    /// Whether it is the default (left out of the encoding, so policies without it keep
    /// their bytes).
    pub fn is_default(&self) -> bool {
        *self == Self::EcP256
    }
}

/// What a quorum of approvers may have to approve (`required_for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Action {
    /// Starting production under an imported entitlement.
    #[serde(rename = "activate")]
    Activate,
    /// Giving a device that already has keys new ones.
    #[serde(rename = "reprovision")]
    Reprovision,
    /// Raising the daily limit for a run of policy days.
    #[serde(rename = "raise-limit")]
    RaiseLimit,
}

impl Action {
    /// The name a policy file and the CLI use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Activate => "activate",
            Self::Reprovision => "reprovision",
            Self::RaiseLimit => "raise-limit",
        }
    }
}

/// One key every device receives (a `[[keys]]` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The key's name, unique in the policy (it names the key in answers and records).
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub key_type: KeyType,
    /// Where it comes from.
    pub source: KeySource,
    /// The device certificate it gets, if any.
    pub certificate: Option<CertificateTemplate>,
}

/// The approval quorum (`[approval]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// How many distinct approvers must sign.
    pub threshold: u32,
    /// Approver public keys, PEM `PUBLIC KEY` (embedded by HQ from the listed files).
    pub approver_keys: Vec<String>,
    /// The actions that need the quorum.
    pub required_for: Vec<Action>,
}

/// Whether a request must prove its chip (`[chips] attestation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Attestation {
    /// Chip certificate chains are not looked at.
    #[serde(rename = "off")]
    Off,
    /// A request without a chain is decided as before; a chain sent is checked, and a
    /// chain that fails refuses the request.
    #[serde(rename = "optional")]
    Optional,
    /// Every request needs a chain that verifies: what the docs recommend.
    #[serde(rename = "required")]
    Required,
}

impl Attestation {
    /// The name a policy file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

/// Where the device id must appear in the chip's certificate (`[chips] device_id_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChipIdFrom {
    /// The subject's serialNumber attribute (2.5.4.5) is the device id.
    #[serde(rename = "subject-serial")]
    SubjectSerial,
    /// The subject's commonName is the device id.
    #[serde(rename = "subject-cn")]
    SubjectCn,
    /// A subjectAltName URI is the device id, or ends in `:` and the device id
    /// (`urn:chip:0123ABCD` names `0123ABCD`).
    #[serde(rename = "san-uri")]
    SanUri,
    /// The device id is not bound to the chip.
    #[serde(rename = "none")]
    None,
}

impl ChipIdFrom {
    /// The name a policy file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SubjectSerial => "subject-serial",
            Self::SubjectCn => "subject-cn",
            Self::SanUri => "san-uri",
            Self::None => "none",
        }
    }
}

/// Most vendor roots a policy may name.
pub const MAX_CHIP_ROOTS: usize = 16;
/// Largest vendor root certificate, in bytes (DER).
pub const MAX_CHIP_ROOT_BYTES: usize = 4096;

/// The chips a policy accepts (`[chips]`): what a request proves of the chip it
/// provisions before any key is released to it (docs/THREAT-MODEL.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chips {
    /// Whether a chain is required, optional or not looked at.
    pub attestation: Attestation,
    /// The chip vendors' root certificates (DER), embedded by HQ from the listed files.
    pub roots: Vec<serde_bytes::ByteBuf>,
    /// Where the device id must appear in the chip's certificate.
    pub device_id_from: ChipIdFrom,
    /// Whether a chip certificate outside its validity is accepted (chip certificates
    /// often end long before the chip does).
    pub accept_expired: bool,
}

impl Chips {
    /// Whether chains are looked at.
    pub fn checks(&self) -> bool {
        self.attestation != Attestation::Off
    }
}

/// The policy as signed into an entitlement. Times are Unix seconds (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The product the devices are.
    pub product: String,
    /// The quota: at most this many devices, ever.
    pub devices: u64,
    /// The first second the site may provision.
    pub valid_from: i64,
    /// The second from which the site may no longer provision.
    pub valid_until: i64,
    /// The site stops provisioning when HQ has not acknowledged its audit for this long.
    pub audit_every_days: Option<u32>,
    /// At most this many devices per calendar day of `timezone`.
    pub daily_limit: Option<u64>,
    /// IANA time zone in which a "day" of the daily limit starts.
    pub timezone: String,
    /// A regular expression every device id must match, whole.
    pub device_id_pattern: Option<String>,
    /// The only stations that may provision, when given.
    pub allowed_stations: Option<Vec<String>>,
    /// The keys every device receives.
    pub keys: Vec<KeySpec>,
    /// The batch CA's key type: what signs the device certificates.
    #[serde(default, skip_serializing_if = "BatchCaKey::is_default")]
    pub batch_ca_key: BatchCaKey,
    /// The approval quorum, when the policy has one.
    pub approval: Option<Approval>,
    /// The policy module (`[code]`), run after the built-in rules. Absent from the
    /// encoding when there is none, so entitlements without code keep their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<PolicyCode>,
    /// The chips it accepts (`[chips]`); absent from the encoding when the policy has
    /// none, so entitlements without it keep their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chips: Option<Chips>,
}

/// A WebAssembly policy module as it travels, signed, in the entitlement
/// (docs/POLICY-CODE.md). `keyfab-policy-code` checks and runs it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyCode {
    /// The file name the author gave in `[code] module`, for reports.
    pub name: String,
    /// SHA-256 of `module`, lowercase hex: how reports and the audit name the module.
    pub sha256: String,
    /// The WebAssembly module's bytes.
    #[serde(with = "serde_bytes")]
    pub module: Vec<u8>,
}

impl std::fmt::Debug for PolicyCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyCode")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("bytes", &self.module.len())
            .finish()
    }
}

impl Policy {
    /// When an entitlement last acknowledged at `last_acknowledged` pauses
    /// (`audit_overdue`) without a newer receipt; none without `audit_every_days`.
    pub fn audit_due_at(&self, last_acknowledged: i64) -> Option<i64> {
        self.audit_every_days
            .map(|d| last_acknowledged.saturating_add(i64::from(d) * 86_400))
    }

    /// Every rule a policy must satisfy. Returns the first broken one, naming its field
    /// (as written in `policy.toml`).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.product.trim().is_empty() {
            return Err(PolicyError::new("product", "must not be empty"));
        }
        if self.devices == 0 || self.devices > MAX_DEVICES {
            return Err(PolicyError::new(
                "devices",
                format!("must be between 1 and {MAX_DEVICES}"),
            ));
        }
        if self.valid_until <= self.valid_from {
            return Err(PolicyError::new(
                "valid_until",
                "must be later than valid_from",
            ));
        }
        if self.audit_every_days == Some(0) {
            return Err(PolicyError::new("audit_every_days", "must be at least 1"));
        }
        if let Some(daily) = self.daily_limit {
            if daily == 0 {
                return Err(PolicyError::new("limits.daily", "must be at least 1"));
            }
            if daily > self.devices {
                return Err(PolicyError::new(
                    "limits.daily",
                    format!("must not exceed devices ({})", self.devices),
                ));
            }
        }
        if jiff::tz::TimeZone::get(&self.timezone).is_err() {
            return Err(PolicyError::new(
                "limits.timezone",
                format!("'{}' is not an IANA time zone", self.timezone),
            ));
        }
        if let Some(p) = &self.device_id_pattern {
            compile_pattern(p)?;
        }
        if let Some(stations) = &self.allowed_stations {
            if stations.is_empty() {
                return Err(PolicyError::new(
                    "stations.allowed",
                    "must list at least one station (omit it to allow every station)",
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for s in stations {
                check_name("stations.allowed", s)?;
                if !seen.insert(s) {
                    return Err(PolicyError::new(
                        "stations.allowed",
                        format!("'{s}' is listed twice"),
                    ));
                }
            }
        }
        self.validate_keys()?;
        if let Some(a) = &self.approval {
            validate_approval(a, self.daily_limit)?;
        }
        if let Some(c) = &self.chips {
            validate_chips(c)?;
        }
        if let Some(c) = &self.code {
            let hex_ok = c.sha256.len() == 64
                && c.sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok || c.module.is_empty() {
                return Err(PolicyError::new(
                    "code.module",
                    "the embedded module or its SHA-256 is malformed",
                ));
            }
        }
        Ok(())
    }

    fn validate_keys(&self) -> Result<(), PolicyError> {
        if self.keys.is_empty() {
            return Err(PolicyError::new(
                "keys",
                "at least one [[keys]] entry is needed",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let field = |f: &str| format!("keys[{i}].{f}");
            check_name(&field("name"), &k.name)?;
            if !names.insert(&k.name) {
                return Err(PolicyError::new(
                    field("name"),
                    format!("'{}' is used by two keys", k.name),
                ));
            }
            match (k.source, k.key_type) {
                (KeySource::Derived, KeyType::Aes256) => {}
                (KeySource::Derived, t) => {
                    return Err(PolicyError::new(
                        field("type"),
                        format!("source 'derived' makes aes-256 keys, not {}", t.as_str()),
                    ))
                }
                (KeySource::Device, KeyType::Aes256) => {
                    return Err(PolicyError::new(
                        field("type"),
                        "source 'device' needs an asymmetric key (ec-p256, ec-p384, ed25519, rsa-2048, rsa-3072)",
                    ))
                }
                (KeySource::HqPool, t) if t.is_rsa() => {
                    return Err(PolicyError::new(
                        field("type"),
                        format!(
                            "{} keys are made where they are used (source 'site' or 'device'): a pool would have HQ generate one RSA key per device, hours per 100,000 devices",
                            t.as_str()
                        ),
                    ))
                }
                _ => {}
            }
            match &k.certificate {
                Some(c) => {
                    if !k.key_type.is_asymmetric() {
                        return Err(PolicyError::new(
                            field("certificate"),
                            "aes-256 keys cannot have a certificate",
                        ));
                    }
                    c.validate(&field("certificate"), k.key_type)?;
                }
                None if k.source == KeySource::Device => {
                    return Err(PolicyError::new(
                        field("certificate"),
                        "source 'device' needs a certificate (it is all the device receives)",
                    ))
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Whether `action` needs a quorum of approvals under this policy.
    /// How many distinct listed approvers an approval needs: the policy's threshold, or
    /// with no `[approval]` section `u32::MAX` — nobody can approve anything then (fail
    /// closed), at the site and in HQ's replay alike.
    pub fn approval_threshold(&self) -> u32 {
        self.approval.as_ref().map_or(u32::MAX, |a| a.threshold)
    }

    /// Whether `action` needs the approval quorum.
    pub fn requires_approval(&self, action: Action) -> bool {
        self.approval
            .as_ref()
            .is_some_and(|a| a.required_for.contains(&action))
    }

    /// The last second a device certificate issued under this policy may be valid: the
    /// last second of the window plus the longest certificate lifetime (or
    /// [`crate::certificate::NO_EXPIRY`]); `None` when no key has a certificate. The batch
    /// CA, and every CA above it, must be valid until then.
    pub fn certificates_end(&self) -> Option<i64> {
        self.keys
            .iter()
            .filter_map(|k| k.certificate.as_ref())
            .map(|c| match c.days {
                crate::Lifetime::Days(d) => self
                    .valid_until
                    .saturating_add(i64::from(d).saturating_mul(86_400))
                    .min(crate::certificate::NO_EXPIRY),
                crate::Lifetime::Forever => crate::certificate::NO_EXPIRY,
            })
            .max()
    }

    /// How many keys of `source` each device receives.
    pub fn keys_from(&self, source: KeySource) -> impl Iterator<Item = &KeySpec> {
        self.keys.iter().filter(move |k| k.source == source)
    }
}

fn validate_chips(c: &Chips) -> Result<(), PolicyError> {
    if c.checks() && c.roots.is_empty() {
        return Err(PolicyError::new(
            "chips.roots",
            format!(
                "attestation '{}' needs at least one chip vendor root",
                c.attestation.as_str()
            ),
        ));
    }
    if c.roots.len() > MAX_CHIP_ROOTS {
        return Err(PolicyError::new(
            "chips.roots",
            format!("{} roots, at most {MAX_CHIP_ROOTS}", c.roots.len()),
        ));
    }
    if let Some(big) = c.roots.iter().find(|r| r.len() > MAX_CHIP_ROOT_BYTES) {
        return Err(PolicyError::new(
            "chips.roots",
            format!(
                "a root of {} bytes, at most {MAX_CHIP_ROOT_BYTES}",
                big.len()
            ),
        ));
    }
    Ok(())
}

fn validate_approval(a: &Approval, daily_limit: Option<u64>) -> Result<(), PolicyError> {
    if a.approver_keys.is_empty() {
        return Err(PolicyError::new(
            "approval.approvers",
            "must list at least one approver",
        ));
    }
    if a.threshold == 0 {
        return Err(PolicyError::new("approval.threshold", "must be at least 1"));
    }
    if a.threshold as usize > a.approver_keys.len() {
        return Err(PolicyError::new(
            "approval.threshold",
            format!(
                "{} is more than the {} listed approvers",
                a.threshold,
                a.approver_keys.len()
            ),
        ));
    }
    if a.required_for.is_empty() {
        return Err(PolicyError::new(
            "approval.required_for",
            "must name at least one action (activate, reprovision, raise-limit)",
        ));
    }
    let unique: std::collections::BTreeSet<_> = a.required_for.iter().collect();
    if unique.len() != a.required_for.len() {
        return Err(PolicyError::new(
            "approval.required_for",
            "an action is listed twice",
        ));
    }
    // A quorum for what the policy cannot do would approve nothing.
    if a.required_for.contains(&Action::RaiseLimit) && daily_limit.is_none() {
        return Err(PolicyError::new(
            "approval.required_for",
            "'raise-limit' needs a daily limit to raise: set limits.daily",
        ));
    }
    Ok(())
}

/// Compiles a device id pattern with a size bound. Anchors are the author's to write.
pub fn compile_pattern(pattern: &str) -> Result<regex::Regex, PolicyError> {
    regex::RegexBuilder::new(pattern)
        .size_limit(MAX_PATTERN_BYTES)
        .build()
        .map_err(|e| PolicyError::new("device_ids.id_pattern", format!("not a valid regex: {e}")))
}

/// Names (keys, stations): 1–64 of `[A-Za-z0-9._-]`.
fn check_name(field: &str, name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PolicyError::new(
            field,
            format!("'{name}' must be 1-64 characters of A-Z a-z 0-9 . _ -"),
        ))
    }
}
