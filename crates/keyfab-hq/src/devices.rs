//! Device certificates after the factory: revocation of one device's certificates, and the
//! CRL each batch CA signs.
//!
//! HQ keeps every batch CA key it makes (sealed under a data key its custody wraps: a
//! token key when HQ uses an HSM), so it can sign a CRL for an entitlement long after the
//! site destroyed its own copy. A revocation is recorded at HQ only: the site never needs
//! it (nothing more is issued under an ended batch CA), the relying parties do, through
//! the CRL.

use crate::entitlement::{list_issued, IssuedRecord};
use crate::report::{manifest, ManifestRow};
use keyfab_crypto::secret::Secret32;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, BatchKey, CrlReason, CrlTimes, RevokedEntry};
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn};
use serde::{Deserialize, Serialize};

/// A batch CA key in HQ's keeping: its PKCS#8 sealed under a data key that HQ's custody
/// wrapped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptKey {
    /// The data key, wrapped by custody.
    pub wrapped_data_key: serde_bytes::ByteBuf,
    /// The key's PKCS#8, sealed under the data key.
    pub sealed: serde_bytes::ByteBuf,
}

fn kept_key_aad(entitlement: &str) -> Vec<u8> {
    format!("keyfab-hq-batch-ca-key-v1\0{entitlement}").into_bytes()
}

/// Seals `key` (entitlement `entitlement`'s batch CA key) for HQ's keeping.
pub(crate) fn keep(node: &Node, entitlement: &str, key: &BatchKey) -> Result<KeptKey> {
    let rng = node.rng.as_ref();
    let dek = Secret32::random(rng);
    let aad = kept_key_aad(entitlement);
    let wrapped = node.custody.wrap_data_key(&dek, &aad, rng)?;
    let sealed = keyfab_crypto::aead::seal_random_nonce(&dek, rng, &aad, key.to_pkcs8().expose())?;
    Ok(KeptKey {
        wrapped_data_key: wrapped.into(),
        sealed: sealed.into(),
    })
}

/// The batch CA key of `issued`, opened by HQ's custody.
fn batch_key(node: &Node, issued: &IssuedRecord) -> Result<BatchKey> {
    let kept = issued.batch_key.as_ref().ok_or_else(|| {
        Error::Precondition(format!(
            "entitlement {} was created before HQ kept batch CA keys: HQ cannot sign for its batch CA",
            issued.id
        ))
    })?;
    let aad = kept_key_aad(&issued.id);
    let dek = node.custody.unwrap_data_key(&kept.wrapped_data_key, &aad)?;
    let pkcs8 = keyfab_crypto::aead::open_random_nonce(&dek, &aad, &kept.sealed)?;
    Ok(BatchKey::from_pkcs8(pkcs8.expose())?)
}

/// One device certificate HQ revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRevocation {
    /// The entitlement whose batch CA issued it.
    pub entitlement: String,
    /// The device.
    pub device_id: String,
    /// The key it certifies (its name in the policy).
    pub key: String,
    /// The certificate's serial, hex.
    pub serial: String,
    /// Why (`key-compromise`, …).
    pub reason: String,
    /// When HQ recorded it (Unix seconds).
    pub revoked_at: i64,
}

fn revocation_prefix(entitlement: &str) -> Vec<u8> {
    format!("certrev/{entitlement}/").into_bytes()
}

fn revocation_key(entitlement: &str, serial: &str) -> Vec<u8> {
    format!("certrev/{entitlement}/{serial}").into_bytes()
}

fn crl_number_key(entitlement: &str) -> Vec<u8> {
    format!("crlnum/{entitlement}").into_bytes()
}

fn issued(node: &Node, entitlement: &str) -> Result<IssuedRecord> {
    list_issued(node)?
        .into_iter()
        .find(|e| e.id == entitlement)
        .ok_or_else(|| Error::NotFound(format!("HQ issued no entitlement '{entitlement}'")))
}

/// Every certificate HQ revoked under `entitlement`, by serial.
pub fn revocations(node: &Node, entitlement: &str) -> Result<Vec<CertRevocation>> {
    node.store
        .scan(Table::Issued, &revocation_prefix(entitlement), usize::MAX)?
        .into_iter()
        .map(|(_, v)| decode(&v.value))
        .collect()
}

/// What [`revoke_device`] did.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRevoked {
    /// The certificates revoked now.
    pub revoked: Vec<CertRevocation>,
    /// The device's certificates that were revoked before (left as they were).
    pub already: Vec<CertRevocation>,
}

/// Revokes every certificate the site's verified audit shows `device_id` received under
/// `entitlement` (with `superseded_only`, those a re-provisioning superseded). A
/// certificate revoked before keeps its first reason and time.
pub fn revoke_device(
    node: &Node,
    (entitlement, device_id): (&str, &str),
    reason: CrlReason,
    superseded_only: bool,
) -> Result<DeviceRevoked> {
    let (_, rows) = manifest(node, entitlement, true)?;
    let rows: Vec<ManifestRow> = rows
        .into_iter()
        .filter(|r| r.device_id == device_id)
        .filter(|r| !superseded_only || r.status == crate::report::DeviceStatus::Superseded)
        .collect();
    if rows.is_empty() {
        return Err(Error::NotFound(format!(
            "no {}certificate of device '{device_id}' under entitlement {entitlement} in the audit HQ verified (import the site's export first)",
            if superseded_only { "superseded " } else { "" }
        )));
    }
    let now = node.now().0;
    let mut txn = Txn::default();
    let mut out = DeviceRevoked {
        revoked: Vec::new(),
        already: Vec::new(),
    };
    for row in rows {
        let key = revocation_key(entitlement, &row.cert_serial);
        if let Some(v) = node.store.get(Table::Issued, &key)? {
            out.already.push(decode(&v.value)?);
            continue;
        }
        let r = CertRevocation {
            entitlement: entitlement.to_owned(),
            device_id: device_id.to_owned(),
            key: row.key,
            serial: row.cert_serial,
            reason: reason.as_str().to_owned(),
            revoked_at: now,
        };
        txn.require_absent(Table::Issued, &key)
            .put(Table::Issued, &key, &encode(&r)?);
        out.revoked.push(r);
    }
    if !txn.is_empty() && !node.store.commit(txn)?.is_committed() {
        return Err(Error::Conflict(
            "the device was revoked meanwhile; run the command again".into(),
        ));
    }
    Ok(out)
}

/// A CRL of an entitlement's batch CA.
#[derive(Debug, Clone)]
pub struct Crl {
    /// The CRL, DER.
    pub der: Vec<u8>,
    /// Its number.
    pub number: u64,
    /// The certificates it lists.
    pub entries: usize,
    /// When the next one is due.
    pub next_update: i64,
}

/// Signs a new CRL for `entitlement`'s batch CA listing every certificate HQ revoked
/// under it, valid for `days` days; its number is one more than the last one's.
pub fn crl(node: &Node, entitlement: &str, days: u32) -> Result<Crl> {
    if days == 0 {
        return Err(Error::InvalidInput("--days must be at least 1".into()));
    }
    let issued = issued(node, entitlement)?;
    let key = batch_key(node, &issued)?;
    let revoked = revocations(node, entitlement)?
        .into_iter()
        .map(|r| {
            Ok(RevokedEntry {
                serial: hex::decode(&r.serial)
                    .map_err(|_| Error::Corrupt(format!("serial of {}", r.device_id)))?,
                revoked_at: UnixTime(r.revoked_at),
                reason: CrlReason::parse(&r.reason)
                    .ok_or_else(|| Error::Corrupt(format!("reason '{}'", r.reason)))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let number_key = crl_number_key(entitlement);
    let seen = node.store.get(Table::Issued, &number_key)?;
    let last = match &seen {
        Some(v) => decode::<u64>(&v.value)?,
        None => 0,
    };
    let now = node.now();
    let times = CrlTimes {
        number: last + 1,
        this_update: now,
        next_update: now.plus_days(i64::from(days)),
    };
    let der = x509::issue_crl(&key, &issued.batch_ca_cert, times, &revoked)?;
    // The number is taken before the CRL leaves: two CRLs never share one.
    let mut txn = Txn::default();
    txn.require_unchanged(Table::Issued, &number_key, seen.as_ref())
        .put(Table::Issued, &number_key, &encode(&times.number)?);
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::Conflict(
            "another CRL of this entitlement was made meanwhile; run the command again".into(),
        ));
    }
    Ok(Crl {
        der,
        number: times.number,
        entries: revoked.len(),
        next_update: times.next_update.0,
    })
}

/// One key a device received, by its public identity.
#[derive(Debug, Clone, Serialize)]
pub struct ShownKey {
    /// Its name in the policy.
    pub name: String,
    /// `spki-sha256:<hex>` or `kcv:<hex>`.
    pub key_id: String,
    /// Its certificate's serial (hex), when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// SHA-256 of that certificate, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// Its last second of validity (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_not_after: Option<String>,
    /// HQ's revocation of that certificate, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<CertRevocation>,
}

/// Where one device came from, as the audit HQ verified tells it.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    /// The device.
    pub device_id: String,
    /// The site that provisioned it.
    pub site: String,
    /// The entitlement it was provisioned under.
    pub entitlement: String,
    /// The product.
    pub product: String,
    /// Its status (`programmed`, `failed`, `unconfirmed`, `revoked`, `superseded`).
    pub status: crate::report::DeviceStatus,
    /// The station that received its keys, when known.
    pub station: Option<String>,
    /// When the site released them (RFC 3339, the site's trusted time).
    pub time: String,
    /// The release's audit record: its sequence in its chain.
    pub audit_sequence: u64,
    /// Its node chain (none: the site chain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_chain: Option<String>,
    /// The checkpoint HQ accepted that covers the record: size and Merkle root (hex).
    pub checkpoint_size: u64,
    /// Its Merkle root, hex.
    pub checkpoint_root: String,
    /// Every key it received.
    pub keys: Vec<ShownKey>,
    /// The chip its keys went to, when the release was attested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chip: Option<ShownChip>,
}

/// The chip a release was attested with.
#[derive(Debug, Clone, Serialize)]
pub struct ShownChip {
    /// SHA-256 of the chip's certificate, hex.
    pub certificate_sha256: String,
    /// Its serial number, hex.
    pub serial: String,
}

/// Every release of `device_id` in the audit HQ verified, across sites and entitlements
/// (normally one).
pub fn show_device(node: &Node, device_id: &str) -> Result<Vec<Provenance>> {
    use keyfab_audit::Event;
    let issued = list_issued(node)?;
    let mut sites: Vec<&str> = issued.iter().map(|i| i.site.as_str()).collect();
    sites.sort_unstable();
    sites.dedup();
    let mut out = Vec::new();
    for site in sites {
        let Some(tree) = crate::audit::site_log(node, site)?.tree else {
            continue;
        };
        let mut mine: Vec<Provenance> = Vec::new();
        // The latest release of the device under each entitlement: what a confirmation
        // is of, and what a re-provisioning supersedes.
        let mut latest: std::collections::HashMap<String, usize> = Default::default();
        let mut attestations = crate::audit::attested::Attestations::default();
        for r in crate::audit::site_records(node, site)? {
            let chip = attestations.next(&r).release.map(|a| ShownChip {
                certificate_sha256: a.certificate,
                serial: a.serial,
            });
            match r.event {
                Event::ProvisionAllowed {
                    entitlement,
                    device_id: d,
                    station,
                    keys,
                    ..
                } if d == device_id => {
                    let product = issued
                        .iter()
                        .find(|i| i.id == entitlement)
                        .map(|i| i.policy.product.clone())
                        .unwrap_or_default();
                    let revoked = revocations(node, &entitlement)?;
                    let keys = keys
                        .into_iter()
                        .map(|k| {
                            let facts = k
                                .certificate
                                .as_ref()
                                .map(|c| x509::cert_facts(c))
                                .transpose()?;
                            Ok(ShownKey {
                                revoked: k
                                    .cert_serial
                                    .as_ref()
                                    .and_then(|s| revoked.iter().find(|r| &r.serial == s).cloned()),
                                cert_sha256: k
                                    .certificate
                                    .as_ref()
                                    .map(|c| keyfab_crypto::hash::Fingerprint::of(c).to_hex()),
                                cert_not_after: facts.map(|f| keyfab_node::rfc3339(f.not_after.0)),
                                cert_serial: k.cert_serial,
                                key_id: k.key_id,
                                name: k.name,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    latest.insert(entitlement.clone(), mine.len());
                    mine.push(Provenance {
                        device_id: d,
                        site: site.to_owned(),
                        entitlement,
                        product,
                        status: crate::report::DeviceStatus::Unconfirmed,
                        station,
                        time: keyfab_node::rfc3339(r.time),
                        audit_sequence: r.sequence,
                        audit_chain: r.chain,
                        checkpoint_size: tree.size,
                        checkpoint_root: hex::encode(tree.root),
                        keys,
                        chip,
                    });
                }
                Event::DeviceConfirmed {
                    entitlement,
                    device_id: d,
                    result,
                    ..
                } if d == device_id => {
                    if let Some(i) = latest.get(&entitlement) {
                        mine[*i].status = crate::report::DeviceStatus::confirmed(&result);
                    }
                }
                Event::QuorumApproved {
                    entitlement,
                    request,
                    ..
                } => {
                    let of_device = keyfab_formats::approval::ApprovalRequest::from_file(&request)
                        .ok()
                        .and_then(|req| req.reprovision)
                        .is_some_and(|r| r.device_id == device_id);
                    if of_device {
                        if let Some(i) = latest.remove(&entitlement) {
                            mine[i].status = crate::report::DeviceStatus::Superseded;
                        }
                    }
                }
                _ => {}
            }
        }
        for p in &mut mine {
            if p.keys.iter().any(|k| k.revoked.is_some()) {
                p.status = crate::report::DeviceStatus::Revoked;
            }
        }
        out.extend(mine);
    }
    if out.is_empty() {
        return Err(Error::NotFound(format!(
            "device '{device_id}' is in no audit HQ verified"
        )));
    }
    Ok(out)
}
