//! What HQ knows, for people and programs: per site and entitlement, produced today
//! against the daily limit, total against the quota, refusals by code, violations; and
//! device manifests built from verified audit records only.

use crate::audit::{replica_key, Replica, Violation};
use crate::entitlement::{list_issued, IssuedRecord};
use keyfab_audit::Event;
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::time::UnixTime;
use keyfab_node::{decode, Node, Result};
use keyfab_policy::CompiledPolicy;
use keyfab_store::Table;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct EntitlementReport {
    pub site: String,
    pub entitlement: String,
    pub product: String,
    pub quota: u64,
    pub daily_limit: Option<u64>,
    pub released: u64,
    /// Released devices their station reported programmed, and failed (keys burned).
    pub confirmed: u64,
    pub burned: u64,
    pub today: u64,
    pub unused: u64,
    pub destroyed: u64,
    pub revoked: bool,
    pub refusals: std::collections::BTreeMap<String, u64>,
    pub violations: u64,
    /// Devices released per calendar day (policy time zone).
    pub days: std::collections::BTreeMap<String, u64>,
    /// The IANA time zone those days and `today` are counted in.
    pub timezone: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub generated_at: i64,
    pub entitlements: Vec<EntitlementReport>,
    pub violations: Vec<Violation>,
}

pub fn report(node: &Node, now: UnixTime) -> Result<Report> {
    let mut entitlements = Vec::new();
    for issued in list_issued(node)? {
        let replica: Replica = node
            .store
            .get(Table::Audit, &replica_key(&issued.site, &issued.id))?
            .map(|v| decode(&v.value))
            .transpose()?
            .unwrap_or_default();
        let policy = CompiledPolicy::new(issued.policy.clone())?;
        let today = replica
            .days
            .get(&policy.day_of(now.0))
            .copied()
            .unwrap_or(0);
        entitlements.push(EntitlementReport {
            site: issued.site.clone(),
            entitlement: issued.id.clone(),
            product: issued.policy.product.clone(),
            quota: issued.policy.devices,
            daily_limit: issued.policy.daily_limit,
            released: replica.total,
            confirmed: replica.confirmed,
            burned: replica.burned,
            today,
            unused: issued
                .policy
                .devices
                .saturating_sub(replica.total + replica.destroyed),
            destroyed: replica.destroyed,
            revoked: replica.revoked || issued.revoked_at.is_some(),
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

/// One device key with a certificate, as the site's verified audit shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestRow {
    pub device_id: String,
    pub entitlement: String,
    pub key: String,
    pub key_id: String,
    pub cert_serial: String,
    pub public_key_pem: String,
    pub certificate_pem: String,
    /// SHA-256 of the certificate (DER), hex.
    pub certificate_sha256: String,
}

/// Every released device key of `entitlement` that has a certificate, in audit order.
pub fn manifest(node: &Node, entitlement: &str) -> Result<(IssuedRecord, Vec<ManifestRow>)> {
    let issued = list_issued(node)?
        .into_iter()
        .find(|e| e.id == entitlement)
        .ok_or_else(|| {
            keyfab_node::Error::NotFound(format!("HQ issued no entitlement '{entitlement}'"))
        })?;
    let mut rows = Vec::new();
    for r in crate::audit::site_records(node, &issued.site)? {
        let Event::ProvisionAllowed {
            entitlement: e,
            device_id,
            keys,
            ..
        } = r.event
        else {
            continue;
        };
        if e != entitlement {
            continue;
        }
        for k in keys {
            let Some(cert) = k.certificate else { continue };
            let spki = keyfab_crypto::x509::cert_spki(&cert)?;
            rows.push(ManifestRow {
                device_id: device_id.clone(),
                entitlement: e.clone(),
                key: k.name,
                key_id: k.key_id,
                cert_serial: k.cert_serial.unwrap_or_default(),
                public_key_pem: keyfab_crypto::x509::to_pem(&spki, "PUBLIC KEY"),
                certificate_pem: keyfab_crypto::x509::to_pem(&cert, "CERTIFICATE"),
                certificate_sha256: Fingerprint::of(&cert).to_hex(),
            });
        }
    }
    Ok((issued, rows))
}
