//! What HQ knows, for people and programs: per site and entitlement, produced today
//! against the daily limit, total against the quota, refusals by code, violations; and
//! device manifests built from verified audit records only.

use crate::audit::{replica_key, site_log, Replica, Violation};
use crate::entitlement::{list_issued, IssuedRecord};
use keyfab_audit::Event;
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::time::UnixTime;
use keyfab_node::{decode, Node, Result};
use keyfab_policy::{CompiledPolicy, EntitlementState, EntitlementStatus};
use keyfab_store::Table;
use serde::Serialize;

/// One entitlement at one site, from verified audit data.
#[derive(Debug, Clone, Serialize)]
pub struct EntitlementReport {
    /// The site.
    pub site: String,
    /// The entitlement id.
    pub entitlement: String,
    /// Its per-site sequence number.
    pub sequence: u64,
    /// Where it stands as far as HQ knows: HQ's own revocation, and the site's log as
    /// imported so far (the policy's rules, as the site applies them).
    pub state: EntitlementStatus,
    /// The product.
    pub product: String,
    /// Its window: the first second devices may be provisioned.
    pub valid_from: i64,
    /// The first second they no longer may.
    pub valid_until: i64,
    /// The quota.
    pub quota: u64,
    /// The policy's daily limit, if any.
    pub daily_limit: Option<u64>,
    /// The raises of the daily limit a quorum approved, as the replay proved them.
    pub raises: Vec<keyfab_policy::Raise>,
    /// Devices released.
    pub released: u64,
    /// Released devices their station reported programmed, and failed (keys burned).
    pub confirmed: u64,
    /// Released devices whose programming failed (keys burned).
    pub burned: u64,
    /// Releases a proven re-provisioning superseded (keys burned, the device given new
    /// ones, counted in `released` again).
    pub superseded: u64,
    /// Devices released today (policy time zone).
    pub today: u64,
    /// What is left of the quota.
    pub unused: u64,
    /// Pool keys destroyed.
    pub destroyed: u64,
    /// Revoked.
    pub revoked: bool,
    /// Device certificates HQ revoked under it (`hq device revoke`).
    pub revoked_certificates: u64,
    /// Refusals by code.
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// Violations found.
    pub violations: u64,
    /// Devices released per calendar day (policy time zone).
    pub days: std::collections::BTreeMap<String, u64>,
    /// The IANA time zone those days and `today` are counted in.
    pub timezone: String,
}

impl EntitlementReport {
    /// The daily limit on `day`: the policy's, or a proven raise in force that day.
    pub fn daily_limit_on(&self, day: &str) -> Option<u64> {
        keyfab_policy::lifted(
            self.daily_limit,
            keyfab_policy::raised_on(&self.raises, day),
        )
    }
}

/// HQ's report over every site and entitlement.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it was made.
    pub generated_at: i64,
    /// The entitlement id.
    pub entitlements: Vec<EntitlementReport>,
    /// Every violation found.
    pub violations: Vec<Violation>,
}

/// The report as of `now`.
pub fn report(node: &Node, now: UnixTime) -> Result<Report> {
    let mut entitlements = Vec::new();
    // Each site's last acknowledgment, read once per site.
    let mut acknowledged_at: std::collections::BTreeMap<String, i64> = Default::default();
    for issued in list_issued(node)? {
        let replica: Replica = node
            .store
            .get(Table::Audit, &replica_key(&issued.site, &issued.id))?
            .map(|v| decode(&v.value))
            .transpose()?
            .unwrap_or_default();
        let policy = CompiledPolicy::new(issued.policy.clone())?;
        let day = policy.day_of(now.0);
        let today = replica.days.get(&day).copied().unwrap_or(0);
        let revoked = replica.revoked || issued.revoked_at.is_some();
        let acknowledged = match acknowledged_at.get(&issued.site) {
            Some(at) => *at,
            None => {
                let at = site_log(node, &issued.site)?.acknowledged_at;
                acknowledged_at.insert(issued.site.clone(), at);
                at
            }
        };
        let state = policy.status(
            &EntitlementState {
                revoked,
                activated: replica.activated
                    || !issued
                        .policy
                        .requires_approval(keyfab_policy::Action::Activate),
                last_acknowledged: acknowledged.max(issued.created_at),
                total: replica.total,
                today,
                raised_daily: keyfab_policy::raised_on(&replica.raises, &day),
            },
            now.0,
        );
        entitlements.push(EntitlementReport {
            site: issued.site.clone(),
            entitlement: issued.id.clone(),
            sequence: issued.sequence,
            state,
            valid_from: issued.policy.valid_from,
            valid_until: issued.policy.valid_until,
            product: issued.policy.product.clone(),
            quota: issued.policy.devices,
            daily_limit: issued.policy.daily_limit,
            raises: replica.raises.clone(),
            released: replica.total,
            confirmed: replica.confirmed,
            burned: replica.burned,
            superseded: replica.superseded,
            today,
            unused: issued
                .policy
                .devices
                .saturating_sub(replica.total + replica.destroyed),
            destroyed: replica.destroyed,
            revoked,
            revoked_certificates: crate::devices::revocations(node, &issued.id)?.len() as u64,
            refusals: replica.refusals.clone(),
            violations: replica.violations,
            days: replica.days.clone(),
            timezone: issued.policy.timezone.clone(),
        });
    }
    let violations = node
        .store
        .scan(Table::Audit, b"violation/", usize::MAX)?
        .into_iter()
        .map(|(_, v)| decode(&v.value))
        .collect::<Result<Vec<Violation>>>()?;
    Ok(Report {
        generated_at: now.0,
        entitlements,
        violations,
    })
}

/// Where a manifest's device stands, from the site's verified audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// The station confirmed the device programmed: register it.
    Programmed,
    /// The station confirmed programming failed: its keys are burned, the device is
    /// scrap. Left out of a manifest unless asked for.
    Failed,
    /// Keys released, no confirmation (yet): the station may not have programmed it.
    Unconfirmed,
    /// HQ revoked its certificate (`hq device revoke`): on the batch CA's CRL.
    Revoked,
    /// A quorum approved re-provisioning the device: these keys were burned and the
    /// device got new ones (another row). Left out of a manifest unless asked for; put
    /// it on the CRL with `hq device revoke` where relying parties must refuse it.
    Superseded,
}

impl DeviceStatus {
    /// The status a station's confirmation gives (`programmed`, else `failed`).
    pub fn confirmed(result: &str) -> Self {
        if result == "programmed" {
            Self::Programmed
        } else {
            Self::Failed
        }
    }

    /// The name manifests use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Programmed => "programmed",
            Self::Failed => "failed",
            Self::Unconfirmed => "unconfirmed",
            Self::Revoked => "revoked",
            Self::Superseded => "superseded",
        }
    }
}

/// One device key with a certificate, as the site's verified audit shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestRow {
    /// The device id.
    pub device_id: String,
    /// The entitlement id.
    pub entitlement: String,
    /// The key's name in the policy.
    pub key: String,
    /// Where the device stands.
    pub status: DeviceStatus,
    /// The station that received the keys, when the site knew it.
    pub station: Option<String>,
    /// When the site released the keys (RFC 3339, the site's trusted time).
    pub time: String,
    /// The sequence of the release's audit record in its chain.
    pub audit_sequence: u64,
    /// The node chain of that record; none for the site chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_chain: Option<String>,
    /// The key's public identity (`spki-sha256:` or `kcv:`).
    pub key_id: String,
    /// The device certificate's serial, hex.
    pub cert_serial: String,
    /// The device's public key, PEM.
    pub public_key_pem: String,
    /// The device certificate, PEM.
    pub certificate_pem: String,
    /// The device certificate, DER.
    #[serde(skip)]
    pub certificate_der: Vec<u8>,
    /// SHA-256 of the certificate (DER), hex.
    pub certificate_sha256: String,
    /// SHA-256 of the chip certificate the release was attested with (DER), hex; none
    /// for a device released without chip attestation.
    pub chip_certificate_sha256: Option<String>,
}

/// An entitlement's device certificates from the site's verified audit: every released
/// key that has one, with its device's status, sorted by device id then key. Devices whose
/// keys were burned (confirmed `failed`) are left out unless `include_failed`.
pub fn manifest(
    node: &Node,
    entitlement: &str,
    include_failed: bool,
) -> Result<(IssuedRecord, Vec<ManifestRow>)> {
    let issued = list_issued(node)?
        .into_iter()
        .find(|e| e.id == entitlement)
        .ok_or_else(|| {
            keyfab_node::Error::NotFound(format!("HQ issued no entitlement '{entitlement}'"))
        })?;
    let mut rows: Vec<ManifestRow> = Vec::new();
    // Each device's rows of its latest release: a confirmation is of that release, and a
    // re-provisioning supersedes it.
    let mut latest: std::collections::HashMap<String, Vec<usize>> = Default::default();
    let mut attestations = crate::audit::attested::Attestations::default();
    for r in crate::audit::site_records(node, &issued.site)? {
        let chip = attestations.next(&r).release;
        match r.event {
            Event::DeviceConfirmed {
                entitlement: e,
                device_id,
                result,
                ..
            } if e == entitlement => {
                for i in latest.get(&device_id).into_iter().flatten() {
                    rows[*i].status = DeviceStatus::confirmed(&result);
                }
            }
            Event::QuorumApproved {
                entitlement: e,
                request,
                ..
            } if e == entitlement => {
                let device = keyfab_formats::approval::ApprovalRequest::from_file(&request)
                    .ok()
                    .and_then(|req| req.reprovision)
                    .map(|r| r.device_id);
                for i in device.and_then(|d| latest.remove(&d)).into_iter().flatten() {
                    rows[i].status = DeviceStatus::Superseded;
                }
            }
            Event::ProvisionAllowed {
                entitlement: e,
                device_id,
                station,
                keys,
                ..
            } if e == entitlement => {
                let chip_certificate = chip.map(|a| a.certificate);
                let first = rows.len();
                for k in keys {
                    let Some(cert) = k.certificate else { continue };
                    let cert = cert.into_vec();
                    let spki = keyfab_crypto::x509::cert_spki(&cert)?;
                    rows.push(ManifestRow {
                        device_id: device_id.clone(),
                        entitlement: e.clone(),
                        key: k.name,
                        status: DeviceStatus::Unconfirmed,
                        station: station.clone(),
                        time: keyfab_node::rfc3339(r.time),
                        audit_sequence: r.sequence,
                        audit_chain: r.chain.clone(),
                        key_id: k.key_id,
                        cert_serial: k.cert_serial.unwrap_or_default(),
                        public_key_pem: keyfab_crypto::x509::to_pem(&spki, "PUBLIC KEY"),
                        certificate_pem: keyfab_crypto::x509::to_pem(&cert, "CERTIFICATE"),
                        certificate_sha256: Fingerprint::of(&cert).to_hex(),
                        certificate_der: cert,
                        chip_certificate_sha256: chip_certificate.clone(),
                    });
                }
                latest.insert(device_id, (first..rows.len()).collect());
            }
            _ => {}
        }
    }
    let revoked: std::collections::HashSet<String> =
        crate::devices::revocations(node, entitlement)?
            .into_iter()
            .map(|r| r.serial)
            .collect();
    for row in &mut rows {
        if revoked.contains(&row.cert_serial) {
            row.status = DeviceStatus::Revoked;
        }
    }
    // Burned keys — failed, or superseded by a re-provisioning — only when asked for.
    rows.retain(|r| {
        include_failed || !matches!(r.status, DeviceStatus::Failed | DeviceStatus::Superseded)
    });
    rows.sort_by(|a, b| (&a.device_id, &a.key).cmp(&(&b.device_id, &b.key)));
    Ok((issued, rows))
}

/// The certificates a cloud registers to trust an entitlement's devices, leaf first: its
/// batch CA, the HQ cluster CA that issued it, and the root.
pub fn ca_chain(node: &Node, issued: &IssuedRecord) -> Result<Vec<Vec<u8>>> {
    let issuer = match &issued.hq_cluster_cert {
        Some(cert) => cert.to_vec(),
        None => node.cluster_cert()?,
    };
    Ok(vec![
        issued.batch_ca_cert.clone(),
        issuer,
        node.root_cert()?,
    ])
}
