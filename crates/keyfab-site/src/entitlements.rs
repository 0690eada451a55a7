//! Entitlement import (in the verification order of docs/FORMATS.md, then replay checks, then the store) and the
//! entitlement list.
//!
//! Pool keys are re-encrypted under a data key of their own entitlement (AES-256-GCM,
//! nonce = key spec ‖ index, AAD = the row key) and written in batches under a staging
//! marker; the entitlement record, the sequence high-water mark and the removal of the
//! marker commit in one guarded transaction. Until that commit nothing is visible; an
//! interrupted import is swept at the next one. A failed import changes nothing.

use crate::audit_log::Appender;
use keyfab_audit::{Event, Record};
use keyfab_crypto::aead::AeadKey;
use keyfab_crypto::secret::Secret32;
use keyfab_formats::entitlement::{open_entitlement, verify_entitlement, PoolSpec, KEY_LEN};
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_policy::{CompiledPolicy, EntitlementState, EntitlementStatus, Policy};
use keyfab_store::{Table, Txn};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub(crate) const HQ_SEQUENCE: &[u8] = b"hq_sequence";
const HQ_RECIPIENT: &[u8] = b"hq_recipient";

/// Where audit exports go: HQ's name, cluster certificate and HPKE certificate, as the
/// latest imported entitlement carried them (already checked against the root).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HqRecipient {
    /// HQ's cluster name.
    pub hq: String,
    /// HQ's cluster certificate (DER).
    pub cluster_cert: serde_bytes::ByteBuf,
    /// HQ's HPKE certificate (DER): what audit exports are sealed to.
    pub hpke_cert: serde_bytes::ByteBuf,
}

/// Where this site's audit exports go: HQ's certificates from its latest entitlement.
pub fn hq_recipient(node: &Node) -> Result<Option<HqRecipient>> {
    node.store
        .get(Table::Meta, HQ_RECIPIENT)?
        .map(|v| decode(&v.value))
        .transpose()
}

/// The last sequence number accepted from HQ (entitlements and revocations share it).
pub(crate) fn read_hq_sequence(node: &Node) -> Result<(u64, Option<keyfab_store::Versioned>)> {
    let seen = node.store.get(Table::Meta, HQ_SEQUENCE)?;
    let last = match &seen {
        Some(v) => u64::from_be_bytes(
            v.value
                .as_slice()
                .try_into()
                .map_err(|_| Error::Corrupt("hq sequence".into()))?,
        ),
        None => 0,
    };
    Ok((last, seen))
}

/// What the site stores per entitlement. Secrets are sealed under the entitlement's data
/// key, which is itself wrapped by custody.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitlementRecord {
    /// The entitlement id.
    pub id: String,
    /// HQ's per-site sequence number.
    pub sequence: u64,
    /// HQ's cluster name.
    pub hq: String,
    /// When HQ made it.
    pub created_at: i64,
    /// When this site imported it.
    pub imported_at: i64,
    /// The policy the site enforces.
    pub policy: Policy,
    /// The batch CA's certificate (DER).
    #[serde(with = "serde_bytes")]
    pub batch_ca_cert: Vec<u8>,
    /// HQ's cluster certificate: issuer of the batch CA, the middle of device chains.
    #[serde(with = "serde_bytes", default)]
    pub hq_cluster_cert: Vec<u8>,
    /// The entitlement's data key, wrapped by custody.
    #[serde(with = "serde_bytes")]
    pub wrapped_data_key: Vec<u8>,
    /// Batch CA key PKCS#8, sealed under the data key.
    #[serde(with = "serde_bytes")]
    pub sealed_batch_ca_key: Vec<u8>,
    /// Master secret for derived keys, sealed under the data key.
    #[serde(with = "serde_bytes")]
    pub sealed_master_secret: Vec<u8>,
    /// The pool keys it carried, per key spec.
    pub pool: Vec<PoolSpec>,
}

impl EntitlementRecord {
    /// The state right after import: active, unless the policy wants a quorum first.
    pub fn state(&self) -> EntitlementStatus {
        if self
            .policy
            .requires_approval(keyfab_policy::Action::Activate)
        {
            EntitlementStatus::PendingApproval
        } else {
            EntitlementStatus::Active
        }
    }
}

/// An imported entitlement as it stands now: the one reading `site entitlement list`,
/// the station API and the metrics all show, so no view can tell another story.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Standing {
    /// What the next decision does for an acceptable device (the policy's own rules,
    /// [`CompiledPolicy::status`]).
    pub state: EntitlementStatus,
    /// Devices released.
    pub provisioned: u64,
    /// Devices the quota still allows.
    pub left: u64,
    /// Of those, the ones cluster nodes hold reserved and have not used yet.
    pub reserved_by_nodes: u64,
    /// Today, in the policy's time zone (`YYYY-MM-DD`).
    pub day: String,
    /// Devices released today.
    pub today: u64,
    /// Today's daily limit: the policy's, or a quorum's raise in force today (none: no
    /// daily limit).
    pub daily_limit: Option<u64>,
    /// Devices today's share still allows (none: no daily limit).
    pub left_today: Option<u64>,
    /// The raises of the daily limit a quorum approved, today's or not.
    pub raises: Vec<keyfab_policy::Raise>,
    /// When the entitlement pauses for want of an audit receipt (Unix seconds; none:
    /// the policy asks for no audit).
    pub audit_due_at: Option<i64>,
    /// Pool keys not handed out and not destroyed, by key name.
    pub pool_keys_left: std::collections::BTreeMap<String, u64>,
}

/// Where `record` stands at the node's trusted time.
pub fn standing(node: &Node, record: &EntitlementRecord) -> Result<Standing> {
    let now = node.now().0;
    let policy = CompiledPolicy::new(record.policy.clone())?;
    let (c, reserved_by_nodes) = crate::provision::counters_and_held(node, &record.id)?;
    let day = policy.day_of(now);
    let today = c.days.get(&day).copied().unwrap_or(0);
    let last_acknowledged = crate::checkpoints::acknowledged(node)?
        .map_or(record.created_at, |a| {
            a.acknowledged_at.max(record.created_at)
        });
    let state = EntitlementState {
        revoked: c.revoked,
        activated: c.activated
            || !record
                .policy
                .requires_approval(keyfab_policy::Action::Activate),
        last_acknowledged,
        total: c.total,
        today,
        raised_daily: c.raised_on(&day),
    };
    let daily_limit = policy.daily_limit(state.raised_daily);
    // Slots handed out: every slot up to `next_pool`, less those given back. A
    // revocation destroys every slot no device took.
    let given_back: u64 = c
        .returned_pool
        .iter()
        .map(|(s, e)| e.saturating_sub(*s))
        .sum();
    let taken = c.next_pool.saturating_sub(given_back);
    let pool_keys_left = record
        .pool
        .iter()
        .map(|spec| {
            let left = if c.revoked {
                0
            } else {
                spec.count.saturating_sub(taken)
            };
            (spec.key.clone(), left)
        })
        .collect();
    Ok(Standing {
        state: policy.status(&state, now),
        provisioned: c.total,
        left: record.policy.devices.saturating_sub(c.total),
        reserved_by_nodes,
        today,
        daily_limit,
        left_today: daily_limit.map(|d| d.saturating_sub(today)),
        raises: c.raises,
        day,
        audit_due_at: record.policy.audit_due_at(last_acknowledged),
        pool_keys_left,
    })
}

/// What importing an entitlement did.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The entitlement id.
    pub id: String,
    /// HQ's per-site sequence number.
    pub sequence: u64,
    /// HQ's cluster name.
    pub hq: String,
    /// Pool keys imported.
    pub pool_keys: u64,
    /// `active`, or `pending_approval` when it needs its quorum first.
    pub state: EntitlementStatus,
}

fn record_key(id: &str) -> Vec<u8> {
    id.as_bytes().to_vec()
}

/// Row key of one pool key: `id ‖ '/' ‖ spec (u8) ‖ index (u64 BE)`.
pub fn pool_row_key(id: &str, spec: u8, index: u64) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(b'/');
    k.push(spec);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub(crate) fn pool_nonce(spec: u8, index: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[0] = spec;
    n[4..].copy_from_slice(&index.to_be_bytes());
    n
}

pub(crate) fn dek_aad(id: &str) -> Vec<u8> {
    format!("keyfab-site-dek-v1/{id}").into_bytes()
}

/// Removes pool rows of imports that never committed (a crash mid-import).
fn sweep_staging(node: &Node) -> Result<()> {
    for (key, _) in node.store.scan(Table::Staging, b"", usize::MAX)? {
        let id = String::from_utf8_lossy(&key).into_owned();
        let mut prefix = id.as_bytes().to_vec();
        prefix.push(b'/');
        let mut txn = Txn::default();
        txn.delete_prefix(Table::Pool, &prefix)
            .delete(Table::Staging, &key);
        node.store.commit(txn)?;
    }
    Ok(())
}

/// Imports an entitlement file. Every refusal leaves the store as it was.
pub fn import(
    node: &Node,
    path: &Path,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<Imported> {
    // Sealed to this site's current HPKE key, or to an earlier one (keys rotated since).
    let envelope = verify_entitlement(
        path,
        &node.root_cert()?,
        node.now(),
        &node.name,
        &node.recipient_fingerprints()?,
    )?;
    let recipient = node.recipient_for(&envelope.header.recipient)?;

    // Replay: sequence numbers from HQ only go up (a decrease is an attack).
    let (last, seq_seen) = read_hq_sequence(node)?;
    let h = &envelope.header;
    if node
        .store
        .get(Table::Entitlements, &record_key(&h.id))?
        .is_some()
    {
        return Err(Error::Replayed(format!(
            "entitlement {} was already imported",
            h.id
        )));
    }
    if h.sequence <= last {
        return Err(Error::Replayed(format!(
            "sequence {} is not after the last accepted sequence {last}",
            h.sequence
        )));
    }

    let (content, mut pool_reader) = open_entitlement(&envelope, recipient)?;
    // The policy module: the one HQ hashed and signed, and runnable here.
    if let Some(code) = &content.policy.code {
        keyfab_policy_code::load_embedded(code).map_err(|e| {
            Error::Verification(keyfab_formats::FormatError::malformed(
                keyfab_formats::Malformed::Field,
                format!("policy module: {e}"),
            ))
        })?;
    }
    // HQ's last accepted checkpoint of this site must still be in the log (tier B).
    if let Some(acked) = &content.acknowledged {
        crate::checkpoints::check_consistent(node, acked)?;
    }
    // Where audit exports go: HQ's encryption key, certified under the same HQ cluster.
    keyfab_crypto::x509::validate_chain(
        &node.root_cert()?,
        &[content.hq_hpke_cert.clone(), envelope.chain[1].clone()],
        keyfab_crypto::x509::Role::Hq,
        keyfab_crypto::x509::Purpose::KeyAgreement,
        node.now(),
    )
    .map_err(|e| {
        Error::Verification(keyfab_formats::FormatError::UntrustedSigner(format!(
            "HQ encryption certificate: {e}"
        )))
    })?;
    sweep_staging(node)?;

    let rng = node.rng.as_ref();
    let dek = Secret32::random(rng);
    let wrapped_data_key = node
        .custody
        .wrap_data_key(&dek, &dek_aad(&content.id), rng)?;
    let aead = AeadKey::new(&dek)?;
    let sealed_batch_ca_key = keyfab_crypto::aead::seal_random_nonce(
        &dek,
        rng,
        b"batch-ca-key",
        &content.secrets.batch_ca_key,
    )?;
    let sealed_master_secret = keyfab_crypto::aead::seal_random_nonce(
        &dek,
        rng,
        b"master-secret",
        &content.secrets.master_secret,
    )?;

    let mut staging = Txn::default();
    staging.put(Table::Staging, content.id.as_bytes(), b"");
    // The final commit is guarded on this mark as written: an import swept away by
    // another one's `sweep_staging` meanwhile (its pool rows deleted) does not land.
    let staged_at = match node.store.commit(staging)? {
        keyfab_store::Outcome::Committed(revision) => revision,
        keyfab_store::Outcome::Conflict => {
            return Err(Error::Conflict(
                "the import could not begin; import again".into(),
            ))
        }
    };

    let total: u64 = content.pool.iter().map(|p| p.count).sum();
    // Pool rows go in commits of at most 16,384, or what the store takes in one (etcd:
    // 128 writes); they stay invisible until the final commit below, so splitting them
    // splits nothing a reader sees.
    let limits = node.store.commit_limits();
    let mut stage = || -> Result<()> {
        let mut done = 0u64;
        let mut batch = Txn::default();
        while let Some((c, secrets)) = pool_reader.next_chunk()? {
            let spec = u8::try_from(c.spec)
                .map_err(|_| Error::InvalidInput("too many key specs".into()))?;
            for (i, secret) in secrets.expose().chunks_exact(KEY_LEN).enumerate() {
                let index = c.first + i as u64;
                let key = pool_row_key(&content.id, spec, index);
                let sealed = aead.seal(pool_nonce(spec, index), &key, secret)?;
                if batch.len() >= 16_384 || !batch.fits(limits, 1, key.len() + sealed.len(), 0) {
                    node.store.commit(std::mem::take(&mut batch))?;
                }
                batch.put_owned(Table::Pool, key, sealed);
            }
            done += c.count;
            if let Some(p) = progress {
                p(done, total);
            }
        }
        if !batch.is_empty() {
            node.store.commit(batch)?;
        }
        Ok(())
    };
    let abort = |node: &Node| {
        let mut prefix = content.id.as_bytes().to_vec();
        prefix.push(b'/');
        let mut t = Txn::default();
        // Never the rows of an import that did land (a commit whose answer was lost).
        t.require_absent(Table::Entitlements, &record_key(&content.id))
            .delete_prefix(Table::Pool, &prefix)
            .delete(Table::Staging, content.id.as_bytes());
        let _ = node.store.commit(t);
    };
    if let Err(e) = stage() {
        abort(node);
        return Err(e);
    }

    let record = EntitlementRecord {
        id: content.id.clone(),
        sequence: content.sequence,
        hq: content.hq.clone(),
        created_at: content.created_at,
        imported_at: node.now().0,
        policy: content.policy.clone(),
        batch_ca_cert: content.batch_ca_cert.clone(),
        hq_cluster_cert: envelope.chain[1].clone(),
        wrapped_data_key,
        sealed_batch_ca_key,
        sealed_master_secret,
        pool: content.pool.clone(),
    };
    // The import is audited in the same transaction that makes it visible.
    let record_bytes = encode(&record)?;
    let hq_recipient = encode(&HqRecipient {
        hq: content.hq.clone(),
        cluster_cert: serde_bytes::ByteBuf::from(envelope.chain[1].clone()),
        hpke_cert: serde_bytes::ByteBuf::from(content.hq_hpke_cert.clone()),
    })?;
    let landed = crate::audit_log::until_landed(node, || {
        let mut txn = Txn::default();
        let mut log = Appender::begin(node, &mut txn)?;
        log.append(
            &mut txn,
            record.imported_at,
            Event::EntitlementImported {
                entitlement: record.id.clone(),
                sequence: record.sequence,
                pool_keys: total,
            },
        )?;
        log.finish(&mut txn);
        txn.require_absent(Table::Entitlements, &record_key(&record.id))
            .require_unchanged(Table::Meta, HQ_SEQUENCE, seq_seen.as_ref())
            .require_revision(Table::Staging, record.id.as_bytes(), Some(staged_at))
            .put(Table::Entitlements, &record_key(&record.id), &record_bytes)
            .put(Table::Meta, HQ_SEQUENCE, &record.sequence.to_be_bytes())
            .put(Table::Meta, HQ_RECIPIENT, &hq_recipient)
            .delete(Table::Staging, record.id.as_bytes());
        Ok(node.store.commit(txn)?.is_committed().then_some(()))
    });
    match landed {
        Ok(Some(())) => {}
        Ok(None) => {
            abort(node);
            return Err(
                if read_hq_sequence(node)?.1.map(|v| v.revision) != seq_seen.map(|v| v.revision) {
                    Error::Replayed("a concurrent import changed the sequence".into())
                } else {
                    Error::Conflict("site state changed meanwhile; import again".into())
                },
            );
        }
        Err(e) => {
            abort(node);
            return Err(e);
        }
    }
    Ok(Imported {
        id: record.id.clone(),
        sequence: record.sequence,
        hq: record.hq.clone(),
        pool_keys: total,
        state: record.state(),
    })
}

/// The site's audit records, oldest first.
pub fn audit_records(node: &Node) -> Result<Vec<Record>> {
    crate::audit_log::record_bytes(node)?
        .iter()
        .map(|b| Record::from_bytes(b).map_err(|e| Error::Corrupt(e.to_string())))
        .collect()
}

/// Every imported entitlement.
pub fn list(node: &Node) -> Result<Vec<EntitlementRecord>> {
    node.store
        .scan(Table::Entitlements, b"", usize::MAX)?
        .into_iter()
        .map(|(_, v)| decode(&v.value))
        .collect()
}
