//! HQ's side of the return path: import a site's audit bundle, check that it continues
//! what HQ accepted before, and reconcile every record against the policy.
//!
//! Import follows DESIGN.md invariant 1 (size cap → signature → chain to HQ's root with
//! role site and a registered site → decrypt → strict parse), then continuity (`replayed`
//! for a known bundle, `log_gap` when an export is missing, `log_fork` when the bundle
//! conflicts with what HQ accepted), the consistency proof, every record's sequence and
//! hash link, and the records' Merkle root against the signed checkpoint. Any failure
//! refuses the whole bundle and changes nothing.
//!
//! Reconciliation then re-runs `keyfab_policy`'s `decide` — the code the site ran — over
//! each decision, with HQ's own replica of the counters, and records every divergence as
//! a violation. A site can sign anything; it cannot make HQ agree.

use crate::entitlement::{issued_key, IssuedRecord};
use crate::sites::get_site;
use keyfab_audit::merkle::{self, Frontier, Hash};
use keyfab_audit::{Event, Head, Record};
use keyfab_crypto::hash::Fingerprint;
use keyfab_custody::Custody;
use keyfab_formats::audit_bundle::{open_bundle, verify_bundle};
use keyfab_formats::checkpoint::TreeHead;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_policy::{CompiledPolicy, Decision, EntitlementState};
use keyfab_store::{Store, Table, Txn};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// What HQ knows of one site's log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteLog {
    /// The last record's sequence, hash and time.
    pub sequence: u64,
    pub hash: serde_bytes::ByteBuf,
    pub time: i64,
    /// The last accepted checkpoint, and the frontier that extends it.
    pub tree: Option<TreeHead>,
    pub frontier: Vec<(u32, serde_bytes::ByteBuf)>,
    /// Every checkpoint accepted, and every bundle id seen.
    pub checkpoints: Vec<TreeHead>,
    pub bundles: Vec<String>,
    /// The latest receipt time the site's own log shows it imported.
    pub acknowledged_at: i64,
}

/// HQ's replica of one entitlement, rebuilt from the site's log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replica {
    pub imported: bool,
    pub activated: bool,
    pub revoked: bool,
    pub approvers: BTreeSet<String>,
    pub total: u64,
    pub next_pool: u64,
    pub days: BTreeMap<String, u64>,
    pub refusals: BTreeMap<String, u64>,
    pub destroyed: u64,
    pub violations: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Violation {
    pub site: String,
    pub sequence: u64,
    pub entitlement: Option<String>,
    pub device_id: Option<String>,
    /// What went wrong: a policy code the decision broke (`daily_limit_exceeded`, …), or
    /// `unknown_entitlement`, `pool_key_reused`, `pool_key_not_issued`,
    /// `timestamp_backwards`, `approver_not_listed`, `activated_without_quorum`,
    /// `revoked_without_revocation`, `denied_but_allowed`.
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct Imported {
    pub site: String,
    pub bundle: String,
    pub records: u64,
    pub head: Option<TreeHead>,
    pub checkpoint_time: i64,
    pub violations: Vec<Violation>,
    pub per_entitlement: BTreeMap<String, Replica>,
}

fn log_key(site: &str) -> Vec<u8> {
    format!("log/{site}").into_bytes()
}

pub(crate) fn record_key(site: &str, sequence: u64) -> Vec<u8> {
    let mut k = format!("rec/{site}/").into_bytes();
    k.extend_from_slice(&sequence.to_be_bytes());
    k
}

pub(crate) fn replica_key(site: &str, entitlement: &str) -> Vec<u8> {
    format!("replica/{site}/{entitlement}").into_bytes()
}

fn device_key(entitlement: &str, device: &str) -> Vec<u8> {
    format!("device/{entitlement}/{device}").into_bytes()
}

fn violation_key(site: &str, sequence: u64, n: usize) -> Vec<u8> {
    let mut k = format!("violation/{site}/").into_bytes();
    k.extend_from_slice(&sequence.to_be_bytes());
    k.extend_from_slice(&(n as u32).to_be_bytes());
    k
}

/// Imports and reconciles a bundle. Nothing changes unless everything verifies.
pub fn import(
    node: &Node,
    path: &Path,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<Imported> {
    let service = node.service()?;
    let recipient = node.custody.hpke(&service.hpke_handle)?;
    let envelope = verify_bundle(
        path,
        &node.root_cert()?,
        node.now(),
        &node.name,
        recipient.public_key()?.fingerprint(),
    )?;
    let h = envelope.header.clone();
    // A registered site, and this site's own cluster certificate.
    let (site, _) = get_site(node, &h.site).map_err(|_| {
        Error::Verification(keyfab_formats::FormatError::UntrustedSigner(format!(
            "site '{}' is not registered",
            h.site
        )))
    })?;
    if site.cluster_cert != envelope.chain[1] {
        return Err(Error::Verification(
            keyfab_formats::FormatError::UntrustedSigner(format!(
            "bundle is signed under another cluster certificate than the one registered for '{}'",
            h.site
        )),
        ));
    }
    let log_v = node.store.get(Table::Audit, &log_key(&h.site))?;
    let mut log: SiteLog = log_v
        .as_ref()
        .map(|v| decode(&v.value))
        .transpose()?
        .unwrap_or_default();
    if log.bundles.contains(&h.id) {
        return Err(Error::Replayed(format!(
            "bundle {} was already imported",
            h.id
        )));
    }
    let empty = TreeHead {
        size: 0,
        root: merkle::root(&[]),
    };
    let accepted = log.tree.unwrap_or(empty);
    if h.from != accepted {
        if h.from.size > accepted.size {
            return Err(Error::LogGap(format!(
                "the bundle starts after record {}, HQ has the log up to {}: an export is missing",
                h.from.size, accepted.size
            )));
        }
        return Err(Error::LogFork(format!(
            "the bundle continues from record {} with another history than HQ accepted up to {}",
            h.from.size, accepted.size
        )));
    }
    if log
        .checkpoints
        .iter()
        .any(|c| c.size == h.to.size && c.root != h.to.root)
    {
        return Err(Error::LogFork(
            "the checkpoint conflicts with one HQ accepted".into(),
        ));
    }
    let proof: Vec<Hash> = h
        .consistency
        .iter()
        .map(|b| b.as_slice().try_into().unwrap_or([0u8; 32]))
        .collect();
    if h.from.size > 0
        && !merkle::verify_consistency(h.from.size, h.to.size, &h.from.root, &h.to.root, &proof)
    {
        return Err(Error::LogFork(
            "the consistency proof does not hold: the log was rewritten".into(),
        ));
    }
    let mut frontier = Frontier::from_parts(
        accepted.size,
        log.frontier
            .iter()
            .map(|(l, b)| (*l, b.as_slice().try_into().unwrap_or([0u8; 32])))
            .collect(),
    )
    .ok_or_else(|| Error::InvalidState("stored frontier".into()))?;

    // Pass 1: decrypt and check every record's place in the chain and the Merkle root,
    // writing nothing. Only a bundle that passes is reconciled and stored.
    let total = h.to.size - h.from.size;
    let start = Head {
        sequence: log.sequence,
        hash: log.hash.as_slice().try_into().unwrap_or([0u8; 32]),
        time: if log.sequence == 0 {
            i64::MIN
        } else {
            log.time
        },
    };
    let mut reader = open_bundle(&envelope, recipient)?;
    let mut head = start;
    let mut count = 0u64;
    while let Some(bytes) = reader.next_record()? {
        let r = Record::from_bytes(&bytes).map_err(|e| malformed(&format!("record: {e}")))?;
        if r.sequence != head.sequence + 1 {
            return Err(Error::LogGap(format!(
                "record {} follows record {}",
                r.sequence, head.sequence
            )));
        }
        if r.prev_hash.as_slice() != head.hash.as_slice() || r.site != h.site {
            return Err(Error::LogFork(format!(
                "record {} does not chain to the one before it",
                r.sequence
            )));
        }
        let leaf = merkle::leaf_hash(&bytes);
        frontier.push(leaf);
        head = Head {
            sequence: r.sequence,
            hash: leaf,
            time: head.time.max(r.time),
        };
        count += 1;
        if let Some(p) = progress {
            if count.is_multiple_of(4096) || count == total {
                p(count, total);
            }
        }
    }
    if frontier.size() != h.to.size || frontier.root() != h.to.root {
        return Err(Error::Verification(
            keyfab_formats::FormatError::BadSignature(
                "the records do not match the signed checkpoint".into(),
            ),
        ));
    }

    // Pass 2: reconcile and store, in batches. Rows written here lie beyond the accepted
    // head until the final commit moves it, so no reader sees a half import; the staging
    // commits need no fsync of their own.
    let mut reader = open_bundle(&envelope, recipient)?;
    let accepted_sequence = log.sequence;
    let mut rec = Reconciler::new(node, &h.site, &mut log, accepted_sequence);
    let mut row = Vec::new();
    let mut row_first = None;
    let mut batch = Txn::default();
    let mut pending: Vec<(Record, Vec<u8>)> = Vec::with_capacity(PREFETCH);
    loop {
        let next = reader.next_record()?;
        let done = next.is_none();
        if let Some(bytes) = next {
            let r = Record::from_bytes(&bytes).map_err(|e| malformed(&format!("record: {e}")))?;
            pending.push((r, bytes));
        }
        if pending.len() < PREFETCH && !done {
            continue;
        }
        let records: Vec<Record> = pending.iter().map(|(r, _)| r.clone()).collect();
        rec.prefetch(&records)?;
        for (r, bytes) in pending.drain(..) {
            rec.record(&r)?;
            row_first.get_or_insert(r.sequence);
            keyfab_audit::frame_into(&mut row, &bytes);
            if row.len() >= RECORD_ROW_BYTES {
                batch.put(
                    Table::Audit,
                    &record_key(&h.site, row_first.take().unwrap_or(r.sequence)),
                    &row,
                );
                row.clear();
                for d in rec.take_new_devices() {
                    batch.put(Table::Audit, &d.0, &d.1.to_be_bytes());
                }
                let mut staged = std::mem::take(&mut batch);
                staged.non_durable();
                node.store.commit(staged)?;
            }
        }
        if done {
            break;
        }
    }
    let mut txn = batch;
    if let Some(first) = row_first {
        txn.put(Table::Audit, &record_key(&h.site, first), &row);
    }
    for d in rec.take_new_devices() {
        txn.put(Table::Audit, &d.0, &d.1.to_be_bytes());
    }
    let Reconciler {
        replicas,
        violations,
        ..
    } = rec;
    for (ent, (replica, _)) in &replicas {
        txn.put(Table::Audit, &replica_key(&h.site, ent), &encode(replica)?);
    }
    for (n, v) in violations.iter().enumerate() {
        txn.put(
            Table::Audit,
            &violation_key(&h.site, v.sequence, n),
            &encode(v)?,
        );
    }
    log.sequence = head.sequence;
    log.hash = serde_bytes::ByteBuf::from(head.hash.to_vec());
    log.time = if head.sequence == 0 { 0 } else { head.time };
    log.tree = Some(h.to);
    let (_, parts) = frontier.to_parts();
    log.frontier = parts
        .into_iter()
        .map(|(l, h)| (l, serde_bytes::ByteBuf::from(h.to_vec())))
        .collect();
    log.checkpoints.push(h.to);
    log.bundles.push(h.id.clone());
    txn.require_unchanged(Table::Audit, &log_key(&h.site), log_v.as_ref())
        .put(Table::Audit, &log_key(&h.site), &encode(&log)?);
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::InvalidState(
            "HQ state changed meanwhile; import again".into(),
        ));
    }
    Ok(Imported {
        site: h.site.clone(),
        bundle: h.id,
        records: count,
        head: Some(h.to),
        checkpoint_time: h.checkpoint_time,
        violations,
        per_entitlement: replicas.into_iter().map(|(k, (r, _))| (k, r)).collect(),
    })
}

/// Records are reconciled in groups of this many, their devices looked up at once.
const PREFETCH: usize = 1024;

/// Records are stored in rows of about this many bytes (one B-tree entry per row).
const RECORD_ROW_BYTES: usize = 256 * 1024;

/// Every record of `site` HQ has accepted, in order.
pub fn site_records(node: &Node, site: &str) -> Result<Vec<Record>> {
    let accepted = node
        .store
        .get(Table::Audit, &log_key(site))?
        .map(|v| decode::<SiteLog>(&v.value))
        .transpose()?
        .map_or(0, |l| l.sequence);
    let mut prefix = record_key(site, 0);
    prefix.truncate(prefix.len() - 8);
    let mut out = Vec::new();
    for (_, v) in node.store.scan(Table::Audit, &prefix, usize::MAX)? {
        for bytes in
            keyfab_audit::split_row(&v.value).map_err(|e| Error::InvalidState(e.to_string()))?
        {
            let r = Record::from_bytes(bytes).map_err(|e| Error::InvalidState(e.to_string()))?;
            if r.sequence <= accepted {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn malformed(m: &str) -> Error {
    Error::Verification(keyfab_formats::FormatError::Malformed(m.to_owned()))
}

struct Reconciler<'a> {
    node: &'a Node,
    site: String,
    log: &'a mut SiteLog,
    last_time: i64,
    issued: HashMap<String, Option<std::sync::Arc<(IssuedRecord, CompiledPolicy)>>>,
    /// Whether earlier imports released a device, looked up for a batch of records at once.
    prefetched: HashMap<Vec<u8>, bool>,
    replicas: BTreeMap<String, (Replica, ())>,
    /// Devices released in this import (hash of their key), and those not yet stored.
    devices: std::collections::HashSet<[u8; 32]>,
    new_devices: Vec<(Vec<u8>, u64)>,
    /// Stored device rows count only up to the accepted head: later ones are leftovers of
    /// an import that did not finish.
    accepted_sequence: u64,
    violations: Vec<Violation>,
}

impl<'a> Reconciler<'a> {
    fn new(node: &'a Node, site: &str, log: &'a mut SiteLog, accepted_sequence: u64) -> Self {
        let last_time = if log.sequence == 0 {
            i64::MIN
        } else {
            log.time
        };
        Self {
            node,
            site: site.to_owned(),
            log,
            last_time,
            issued: HashMap::new(),
            prefetched: HashMap::new(),
            replicas: BTreeMap::new(),
            devices: Default::default(),
            new_devices: Vec::new(),
            accepted_sequence,
            violations: Vec::new(),
        }
    }

    fn violation(
        &mut self,
        r: &Record,
        entitlement: Option<&str>,
        device: Option<&str>,
        kind: &str,
        detail: String,
    ) {
        if let Some(e) = entitlement {
            if let Some((rep, _)) = self.replicas.get_mut(e) {
                rep.violations += 1;
            }
        }
        self.violations.push(Violation {
            site: self.site.clone(),
            sequence: r.sequence,
            entitlement: entitlement.map(str::to_owned),
            device_id: device.map(str::to_owned),
            kind: kind.to_owned(),
            detail,
        });
    }

    /// The entitlement as HQ issued it to this site, if it did.
    fn issued(
        &mut self,
        id: &str,
    ) -> Result<Option<std::sync::Arc<(IssuedRecord, CompiledPolicy)>>> {
        if !self.issued.contains_key(id) {
            let found = match self.node.store.get(Table::Issued, &issued_key(id))? {
                Some(v) => {
                    let rec: IssuedRecord = decode(&v.value)?;
                    if rec.site == self.site {
                        let policy = CompiledPolicy::new(rec.policy.clone())?;
                        Some(std::sync::Arc::new((rec, policy)))
                    } else {
                        None
                    }
                }
                None => None,
            };
            self.issued.insert(id.to_owned(), found);
        }
        Ok(self.issued.get(id).cloned().flatten())
    }

    fn replica(&mut self, id: &str) -> Result<&mut Replica> {
        if !self.replicas.contains_key(id) {
            let stored = self
                .node
                .store
                .get(Table::Audit, &replica_key(&self.site, id))?;
            let r = stored
                .map(|v| decode(&v.value))
                .transpose()?
                .unwrap_or_default();
            self.replicas.insert(id.to_owned(), (r, ()));
        }
        self.replicas
            .get_mut(id)
            .map(|(r, _)| r)
            .ok_or_else(|| Error::InvalidState("replica".into()))
    }

    fn device_seen(&self, key: &[u8]) -> Result<bool> {
        if self.devices.contains(&keyfab_crypto::hash::sha256(key)) {
            return Ok(true);
        }
        if let Some(seen) = self.prefetched.get(key) {
            return Ok(*seen);
        }
        Ok(match self.node.store.get(Table::Audit, key)? {
            Some(v) => v
                .value
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .is_ok_and(|seq| seq <= self.accepted_sequence),
            None => false,
        })
    }

    /// Looks up, in one snapshot, whether earlier imports released the devices of
    /// `records`.
    fn prefetch(&mut self, records: &[Record]) -> Result<()> {
        let keys: Vec<Vec<u8>> = records
            .iter()
            .filter_map(|r| match &r.event {
                Event::ProvisionAllowed {
                    entitlement,
                    device_id,
                    ..
                }
                | Event::ProvisionDenied {
                    entitlement,
                    device_id,
                    ..
                } => Some(device_key(entitlement, device_id)),
                _ => None,
            })
            .collect();
        let lookups: Vec<(Table, &[u8])> =
            keys.iter().map(|k| (Table::Audit, k.as_slice())).collect();
        let found = self.node.store.get_many(&lookups)?;
        self.prefetched.clear();
        for (k, v) in keys.into_iter().zip(found) {
            let seen = v.is_some_and(|v| {
                v.value
                    .as_slice()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .is_ok_and(|seq| seq <= self.accepted_sequence)
            });
            self.prefetched.insert(k, seen);
        }
        Ok(())
    }

    fn take_new_devices(&mut self) -> Vec<(Vec<u8>, u64)> {
        std::mem::take(&mut self.new_devices)
    }

    fn record(&mut self, r: &Record) -> Result<()> {
        if r.time < self.last_time {
            self.violation(
                r,
                None,
                None,
                "timestamp_backwards",
                format!("record {} is earlier than the one before it", r.sequence),
            );
        }
        self.last_time = self.last_time.max(r.time);
        match &r.event {
            Event::EntitlementImported { entitlement, .. } => {
                if self.issued(entitlement)?.is_none() {
                    self.violation(
                        r,
                        Some(entitlement),
                        None,
                        "unknown_entitlement",
                        "HQ issued no such entitlement to this site".into(),
                    );
                }
                self.replica(entitlement)?.imported = true;
            }
            Event::ReceiptImported {
                acknowledged_at, ..
            } => {
                self.log.acknowledged_at = self.log.acknowledged_at.max(*acknowledged_at);
            }
            Event::ApprovalAccepted {
                entitlement,
                approver,
                ..
            } => {
                let listed = match self.issued(entitlement)? {
                    Some(entry) => entry.0.policy.approval.as_ref().is_some_and(|a| {
                        a.approver_keys.iter().any(|pem| {
                            keyfab_crypto::sign::VerifyingKey::from_pem(pem)
                                .is_ok_and(|k| k.fingerprint().to_hex() == *approver)
                        })
                    }),
                    None => false,
                };
                if listed {
                    self.replica(entitlement)?
                        .approvers
                        .insert(approver.clone());
                } else {
                    self.violation(
                        r,
                        Some(entitlement),
                        None,
                        "approver_not_listed",
                        format!("approver {approver}"),
                    );
                }
            }
            Event::EntitlementActivated { entitlement } => {
                let threshold = self
                    .issued(entitlement)?
                    .and_then(|entry| entry.0.policy.approval.as_ref().map(|a| a.threshold))
                    .unwrap_or(u32::MAX);
                let count = self.replica(entitlement)?.approvers.len();
                if count < threshold as usize {
                    self.violation(
                        r,
                        Some(entitlement),
                        None,
                        "activated_without_quorum",
                        format!("{count} of {threshold} approvers"),
                    );
                }
                self.replica(entitlement)?.activated = true;
            }
            Event::EntitlementRevoked {
                entitlement,
                destroyed_pool_keys,
                ..
            } => {
                let revoked_by_hq = self
                    .issued(entitlement)?
                    .is_some_and(|entry| entry.0.revoked_at.is_some());
                if !revoked_by_hq {
                    self.violation(
                        r,
                        Some(entitlement),
                        None,
                        "revoked_without_revocation",
                        "HQ issued no revocation".into(),
                    );
                }
                let rep = self.replica(entitlement)?;
                rep.revoked = true;
                rep.destroyed += destroyed_pool_keys;
            }
            Event::ProvisionAllowed {
                entitlement,
                device_id,
                station,
                pool_index,
                keys,
                ..
            } => {
                self.decision(
                    r,
                    entitlement,
                    device_id,
                    station.as_deref(),
                    true,
                    None,
                    *pool_index,
                    keys,
                )?;
            }
            Event::ProvisionDenied {
                entitlement,
                device_id,
                station,
                code,
                ..
            } => {
                self.decision(
                    r,
                    entitlement,
                    device_id,
                    station.as_deref(),
                    false,
                    Some(code),
                    None,
                    &[],
                )?;
            }
            Event::ClockRollback { .. }
            | Event::SettingChanged { .. }
            | Event::AuditExported { .. } => {}
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn decision(
        &mut self,
        r: &Record,
        entitlement: &str,
        device_id: &str,
        station: Option<&str>,
        allowed: bool,
        code: Option<&String>,
        pool_index: Option<u64>,
        keys: &[keyfab_audit::AuditedKey],
    ) -> Result<()> {
        let Some(entry) = self.issued(entitlement)? else {
            if allowed {
                self.violation(
                    r,
                    Some(entitlement),
                    Some(device_id),
                    "unknown_entitlement",
                    "keys released under an entitlement HQ never issued to this site".into(),
                );
            }
            return Ok(());
        };
        let (issued, policy) = (&entry.0, &entry.1);
        let dev_key = device_key(entitlement, device_id);
        let already = self.device_seen(&dev_key)?;
        let acknowledged = issued.created_at.max(self.log.acknowledged_at);
        let day = policy.day_of(r.time);
        let (state, next_pool) = {
            let rep = self.replica(entitlement)?;
            let state = EntitlementState {
                revoked: rep.revoked,
                activated: rep.activated,
                last_acknowledged: acknowledged,
                total: rep.total,
                today: rep.days.get(&day).copied().unwrap_or(0),
            };
            (state, rep.next_pool)
        };
        let decision = policy.decide(
            &state,
            &keyfab_policy::Request {
                device_id,
                station,
                already_provisioned: already,
            },
            r.time,
        );
        if !allowed {
            *self
                .replica(entitlement)?
                .refusals
                .entry(code.cloned().unwrap_or_default())
                .or_insert(0) += 1;
            if decision == Decision::Allow {
                self.violation(
                    r,
                    Some(entitlement),
                    Some(device_id),
                    "denied_but_allowed",
                    format!(
                        "the site refused with {}, the policy allows it",
                        code.cloned().unwrap_or_default()
                    ),
                );
            }
            return Ok(());
        }
        if let Decision::Deny(c) = decision {
            self.violation(
                r,
                Some(entitlement),
                Some(device_id),
                c.code(),
                format!("keys released although the policy refuses: {}", c.code()),
            );
        }
        // Pool keys: the next slot, and exactly the keys HQ put there.
        let pool_specs: Vec<usize> = issued
            .policy
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.source == keyfab_policy::KeySource::HqPool)
            .map(|(i, _)| i)
            .collect();
        if !pool_specs.is_empty() {
            match pool_index {
                Some(index) if index == next_pool => {
                    for (spec_no, key_index) in pool_specs.iter().enumerate() {
                        let audited = keys
                            .get(*key_index)
                            .map(|k| k.key_id.clone())
                            .unwrap_or_default();
                        if !self.pool_key_matches(issued, spec_no, index, &audited)? {
                            self.violation(
                                r,
                                Some(entitlement),
                                Some(device_id),
                                "pool_key_not_issued",
                                format!("slot {index}: {audited} is not the key HQ put there"),
                            );
                        }
                    }
                }
                Some(index) if index < next_pool => {
                    self.violation(
                        r,
                        Some(entitlement),
                        Some(device_id),
                        "pool_key_reused",
                        format!("slot {index} was given out before"),
                    );
                }
                other => {
                    self.violation(
                        r,
                        Some(entitlement),
                        Some(device_id),
                        "pool_key_not_issued",
                        format!("slot {other:?} where {} was next", next_pool),
                    );
                }
            }
        }
        self.devices.insert(keyfab_crypto::hash::sha256(&dev_key));
        self.new_devices.push((dev_key, r.sequence));
        let rep = self.replica(entitlement)?;
        rep.total += 1;
        *rep.days.entry(day).or_insert(0) += 1;
        if let Some(index) = pool_index {
            rep.next_pool = rep.next_pool.max(index + 1);
        }
        Ok(())
    }

    fn pool_key_matches(
        &self,
        issued: &IssuedRecord,
        spec: usize,
        index: u64,
        audited: &str,
    ) -> Result<bool> {
        let kpc = u64::from(issued.keys_per_chunk.max(1));
        // Chunk numbering as in the file: specs one after another, chunk 1 first.
        let mut chunk = 1u64;
        for p in issued.pool.iter().take(spec) {
            chunk += p.count.div_ceil(kpc);
        }
        chunk += index / kpc;
        let Some(row) = self.node.store.get(
            Table::Issued,
            &crate::entitlement::pool_ids_key(&issued.id, chunk),
        )?
        else {
            return Ok(false);
        };
        let at = ((index % kpc) * 32) as usize;
        let Some(id) = row.value.get(at..at + 32) else {
            return Ok(false);
        };
        let expected = if let Some(hex) = audited.strip_prefix("spki-sha256:") {
            Fingerprint::from_hex(hex).map(|f| f.0.to_vec())
        } else if let Some(hex) = audited.strip_prefix("kcv:") {
            hex::decode(hex).ok().map(|mut k| {
                k.resize(32, 0);
                k
            })
        } else {
            None
        };
        Ok(expected.as_deref() == Some(id))
    }
}
