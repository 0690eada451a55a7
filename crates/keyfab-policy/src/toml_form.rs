//! `policy.toml` as an author writes it.
//!
//! TOML cannot hold both `devices = 1000` and a `[devices]` table, so the device id rule
//! lives in `[device_ids]`: `id_pattern = "^TSV2-[0-9]{8}$"`.

use crate::certificate::CertificateTemplate;
use crate::model::*;
use crate::PolicyError;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyToml {
    product: String,
    devices: i64,
    valid_from: String,
    valid_until: String,
    audit_every_days: Option<i64>,
    limits: Option<LimitsToml>,
    device_ids: Option<DeviceIdsToml>,
    stations: Option<StationsToml>,
    #[serde(default)]
    keys: Vec<KeyToml>,
    batch_ca_key: Option<String>,
    approval: Option<ApprovalToml>,
    code: Option<CodeToml>,
    chips: Option<ChipsToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChipsToml {
    attestation: String,
    /// Paths of the vendor root certificates (PEM or DER), relative to the policy file.
    #[serde(default)]
    roots: Vec<String>,
    device_id_from: Option<String>,
    #[serde(default)]
    accept_expired: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeToml {
    /// Path of the `.wasm` module, relative to the policy file.
    module: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsToml {
    daily: Option<i64>,
    timezone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceIdsToml {
    id_pattern: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StationsToml {
    allowed: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyToml {
    name: String,
    #[serde(rename = "type")]
    key_type: String,
    source: String,
    certificate: Option<CertificateTemplate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalToml {
    threshold: i64,
    approvers: Vec<String>,
    required_for: Option<Vec<String>>,
}

/// A parsed `policy.toml` whose approver key files have not been read yet.
#[derive(Debug, Clone)]
pub struct PolicyDraft {
    policy: Policy,
    approver_paths: Vec<String>,
    code_path: Option<String>,
    chip_root_paths: Vec<String>,
}

fn timestamp(field: &str, text: &str) -> Result<i64, PolicyError> {
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|e| {
            PolicyError::new(
                field,
                format!("'{text}' is not an RFC 3339 time such as 2026-11-25T00:00:00Z ({e})"),
            )
        })
}

fn positive(field: &str, v: i64) -> Result<u64, PolicyError> {
    u64::try_from(v)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| PolicyError::new(field, format!("{v} must be at least 1")))
}

fn small(field: &str, v: i64) -> Result<u32, PolicyError> {
    u32::try_from(positive(field, v)?)
        .map_err(|_| PolicyError::new(field, format!("{v} is too large")))
}

impl PolicyDraft {
    /// Parses and validates everything that does not need the approver key files.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let raw: PolicyToml = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_owned();
            let hint = if msg.contains("duplicate key") && msg.contains("devices") {
                " (put id_pattern under [device_ids]: TOML cannot have both `devices = N` and a [devices] table)"
            } else {
                ""
            };
            let field = field_of_toml_error(&e, text);
            PolicyError::new(field, format!("{}{hint}", msg.trim()))
        })?;
        let keys = raw
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let key_type = KeyType::parse(&k.key_type).ok_or_else(|| {
                    PolicyError::new(
                        format!("keys[{i}].type"),
                        format!(
                            "'{}' is not one of {}",
                            k.key_type,
                            KeyType::ALL.map(KeyType::as_str).join(", ")
                        ),
                    )
                })?;
                let source = match k.source.as_str() {
                    "hq-pool" => KeySource::HqPool,
                    "site" => KeySource::Site,
                    "device" => KeySource::Device,
                    "derived" => KeySource::Derived,
                    other => {
                        return Err(PolicyError::new(
                            format!("keys[{i}].source"),
                            format!("'{other}' is not one of hq-pool, site, device, derived"),
                        ))
                    }
                };
                let certificate = k.certificate.clone();
                Ok(KeySpec {
                    name: k.name.clone(),
                    key_type,
                    source,
                    certificate,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (approval, approver_paths) = match raw.approval {
            Some(a) => {
                let threshold = u32::try_from(a.threshold).map_err(|_| {
                    PolicyError::new(
                        "approval.threshold",
                        format!("{} is out of range", a.threshold),
                    )
                })?;
                let required_for = a
                    .required_for
                    .unwrap_or_else(|| vec!["activate".into()])
                    .iter()
                    .map(|s| match s.as_str() {
                        "activate" => Ok(Action::Activate),
                        "reprovision" => Ok(Action::Reprovision),
                        "raise-limit" => Ok(Action::RaiseLimit),
                        other => Err(PolicyError::new(
                            "approval.required_for",
                            format!("'{other}' is not one of activate, reprovision, raise-limit"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut seen = std::collections::BTreeSet::new();
                for p in &a.approvers {
                    if !seen.insert(p) {
                        return Err(PolicyError::new(
                            "approval.approvers",
                            format!("'{p}' is listed twice"),
                        ));
                    }
                }
                (
                    Some(Approval {
                        threshold,
                        // Placeholders with the right count, so threshold checks run now;
                        // `finish` puts the real keys in.
                        approver_keys: a.approvers.clone(),
                        required_for,
                    }),
                    a.approvers,
                )
            }
            None => (None, Vec::new()),
        };
        let limits = raw.limits.unwrap_or(LimitsToml {
            daily: None,
            timezone: None,
        });
        let policy = Policy {
            product: raw.product,
            devices: positive("devices", raw.devices)?,
            valid_from: timestamp("valid_from", &raw.valid_from)?,
            valid_until: timestamp("valid_until", &raw.valid_until)?,
            audit_every_days: raw
                .audit_every_days
                .map(|d| small("audit_every_days", d))
                .transpose()?,
            daily_limit: limits
                .daily
                .map(|d| positive("limits.daily", d))
                .transpose()?,
            timezone: limits.timezone.unwrap_or_else(|| "UTC".into()),
            device_id_pattern: raw.device_ids.and_then(|d| d.id_pattern),
            allowed_stations: raw.stations.and_then(|s| s.allowed),
            keys,
            batch_ca_key: match raw.batch_ca_key.as_deref() {
                None | Some("ec-p256") => BatchCaKey::EcP256,
                Some("ec-p384") => BatchCaKey::EcP384,
                Some(other) => {
                    return Err(PolicyError::new(
                        "batch_ca_key",
                        format!("'{other}' is not one of ec-p256, ec-p384"),
                    ))
                }
            },
            approval,
            code: None,
            chips: raw.chips.as_ref().map(chips_of).transpose()?,
        };
        policy.validate()?;
        let code_path = match raw.code {
            Some(c) if c.module.trim().is_empty() => {
                return Err(PolicyError::new("code.module", "must name a .wasm file"))
            }
            Some(c) => Some(c.module),
            None => None,
        };
        let chip_root_paths = raw.chips.map(|c| c.roots).unwrap_or_default();
        Ok(Self {
            policy,
            approver_paths,
            code_path,
            chip_root_paths,
        })
    }

    /// The chip vendor root files `[chips] roots` lists, relative to the policy file.
    pub fn chip_root_paths(&self) -> &[String] {
        &self.chip_root_paths
    }

    /// Puts in the chip vendor roots (DER, in the order of [`Self::chip_root_paths`]),
    /// which the caller read and checked to be CA certificates.
    pub fn with_chip_roots(mut self, roots: Vec<Vec<u8>>) -> Result<Self, PolicyError> {
        match &mut self.policy.chips {
            None if roots.is_empty() => Ok(self),
            Some(c) if roots.len() == self.chip_root_paths.len() => {
                c.roots = roots.into_iter().map(serde_bytes::ByteBuf::from).collect();
                self.chip_root_paths.clear();
                Ok(self)
            }
            _ => Err(PolicyError::new(
                "chips.roots",
                "every listed root needs its certificate",
            )),
        }
    }

    /// The policy module file `[code] module` names, relative to the policy file.
    pub fn code_path(&self) -> Option<&str> {
        self.code_path.as_deref()
    }

    /// Puts in the policy module the caller read from [`Self::code_path`] and checked.
    pub fn with_code(mut self, code: PolicyCode) -> Self {
        self.policy.code = Some(code);
        self
    }

    /// The approver key files the policy lists, relative to the policy file.
    pub fn approver_paths(&self) -> &[String] {
        &self.approver_paths
    }

    /// Puts in the approver public keys (PEM, in the order of [`Self::approver_paths`]) and
    /// returns the final, validated policy.
    pub fn finish(mut self, approver_keys_pem: Vec<String>) -> Result<Policy, PolicyError> {
        if let Some(a) = &mut self.policy.approval {
            if approver_keys_pem.len() != self.approver_paths.len() {
                return Err(PolicyError::new(
                    "approval.approvers",
                    "every listed approver needs its public key",
                ));
            }
            a.approver_keys = approver_keys_pem;
        } else if !approver_keys_pem.is_empty() {
            return Err(PolicyError::new(
                "approval",
                "keys given but no [approval] section",
            ));
        }
        if !self.chip_root_paths.is_empty() {
            return Err(PolicyError::new(
                "chips.roots",
                "the root certificate files have not been read",
            ));
        }
        if self.code_path.is_some() && self.policy.code.is_none() {
            return Err(PolicyError::new(
                "code.module",
                "the module file has not been read",
            ));
        }
        self.policy.validate()?;
        Ok(self.policy)
    }
}

/// `[chips]` as the policy carries it, with the root paths as placeholders until
/// [`PolicyDraft::with_chip_roots`] puts the certificates in.
fn chips_of(c: &ChipsToml) -> Result<Chips, PolicyError> {
    let attestation = match c.attestation.as_str() {
        "off" => Attestation::Off,
        "optional" => Attestation::Optional,
        "required" => Attestation::Required,
        other => {
            return Err(PolicyError::new(
                "chips.attestation",
                format!("'{other}' is not one of required, optional, off"),
            ))
        }
    };
    let device_id_from = match c.device_id_from.as_deref() {
        None | Some("none") => ChipIdFrom::None,
        Some("subject-serial") => ChipIdFrom::SubjectSerial,
        Some("subject-cn") => ChipIdFrom::SubjectCn,
        Some("san-uri") => ChipIdFrom::SanUri,
        Some(other) => {
            return Err(PolicyError::new(
                "chips.device_id_from",
                format!("'{other}' is not one of subject-serial, subject-cn, san-uri, none"),
            ))
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    for p in &c.roots {
        if !seen.insert(p) {
            return Err(PolicyError::new(
                "chips.roots",
                format!("'{p}' is listed twice"),
            ));
        }
    }
    Ok(Chips {
        attestation,
        roots: c
            .roots
            .iter()
            .map(|p| serde_bytes::ByteBuf::from(p.as_bytes().to_vec()))
            .collect(),
        device_id_from,
        accept_expired: c.accept_expired,
    })
}

/// Best effort at naming the field a TOML error is about: the key at the error's line.
fn field_of_toml_error(e: &toml::de::Error, text: &str) -> String {
    if let Some(name) = e
        .message()
        .split('`')
        .nth(1)
        .filter(|_| e.message().starts_with("unknown field"))
    {
        return name.to_owned();
    }
    if let Some(span) = e.span() {
        let line_start = text[..span.start.min(text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line = text[line_start..].lines().next().unwrap_or("");
        if let Some((k, _)) = line.split_once('=') {
            return k.trim().to_owned();
        }
        return line.trim().trim_matches(['[', ']']).to_owned();
    }
    "policy".to_owned()
}
