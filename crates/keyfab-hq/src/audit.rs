//! HQ's side of the return path: import a site's audit bundle, check that it continues
//! what HQ accepted before, and reconcile every record against the policy.
//!
//! Import follows the verification order of docs/FORMATS.md (size cap → signature → chain to HQ's root with
//! role site and a registered site → decrypt → strict parse), then continuity (`replayed`
//! for a known bundle, `log_gap` when an export is missing, `log_fork` when the bundle
//! conflicts with what HQ accepted), the consistency proof, every record's sequence and
//! hash link, and the records' Merkle root against the signed checkpoint. Any failure
//! refuses the whole bundle and changes nothing.
//!
//! Reconciliation then re-runs `keyfab_policy`'s `decide` — the code the site ran — over
//! each decision, with HQ's own replica of the counters, and records every divergence as
//! a violation. A site can sign anything; it cannot make HQ agree.
//!
//! Here: the import's steps — verify the sender, check continuity, stage and reconcile,
//! commit. `stage`: the two threads that check and stage the records. `reconcile`: each
//! record against what HQ issued.

pub(crate) mod attested;
mod reconcile;
mod stage;
mod violation;

pub use violation::ViolationKind;

use crate::sites::get_site;
use keyfab_audit::merkle::{self, Frontier, Hash};
use keyfab_audit::{Event, Head, Record};
use keyfab_crypto::hash::Fingerprint;
use keyfab_formats::audit_bundle::{open_bundle, verify_bundle};
use keyfab_formats::checkpoint::TreeHead;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn};
use reconcile::Reconciler;
use serde::{Deserialize, Serialize};
use stage::{discard_staged, stage_records, Checked};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

/// What HQ knows of one site's log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteLog {
    /// The site chain's last record: sequence, hash and time.
    pub sequence: u64,
    /// Its leaf hash.
    pub hash: serde_bytes::ByteBuf,
    /// Its time.
    pub time: i64,
    /// Each node chain's last record, by chain id (cluster sites).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub chains: BTreeMap<String, ChainEnd>,
    /// The last accepted checkpoint, and the frontier that extends it.
    pub tree: Option<TreeHead>,
    /// The right edge of the Merkle tree past the checkpoint (height, root).
    pub frontier: Vec<(u32, serde_bytes::ByteBuf)>,
    /// Every checkpoint accepted, and every bundle id seen.
    pub checkpoints: Vec<TreeHead>,
    /// Every bundle id imported.
    pub bundles: Vec<String>,
    /// The latest receipt time the site's own log shows it imported.
    pub acknowledged_at: i64,
    /// The highest TPM rollback counter value the site's log recorded (sites bound to
    /// one): every later value must be above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_counter: Option<u64>,
}

/// The last record HQ accepted of one node chain.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainEnd {
    /// Its sequence within the chain.
    pub sequence: u64,
    /// Its leaf hash.
    pub hash: serde_bytes::ByteBuf,
    /// Its time.
    pub time: i64,
}

/// Where each chain of a site's log ends: the site chain, and every node chain seen.
#[derive(Debug, Clone)]
struct Heads {
    site: Head,
    chains: HashMap<String, Head>,
}

impl Heads {
    fn of(log: &SiteLog) -> Self {
        let head = |sequence: u64, hash: &[u8], time: i64| Head {
            sequence,
            hash: hash.try_into().unwrap_or([0u8; 32]),
            time: if sequence == 0 { i64::MIN } else { time },
        };
        Heads {
            site: head(log.sequence, &log.hash, log.time),
            chains: log
                .chains
                .iter()
                .map(|(id, c)| (id.clone(), head(c.sequence, &c.hash, c.time)))
                .collect(),
        }
    }

    /// The head `r` must continue: its chain's (a chain not seen yet starts empty).
    fn of_record(&mut self, r: &Record) -> &mut Head {
        match &r.chain {
            None => &mut self.site,
            Some(id) => self.chains.entry(id.clone()).or_insert_with(Head::genesis),
        }
    }

    /// Writes these heads into `log`.
    fn store(&self, log: &mut SiteLog) {
        let time = |h: &Head| if h.sequence == 0 { 0 } else { h.time };
        log.sequence = self.site.sequence;
        log.hash = serde_bytes::ByteBuf::from(self.site.hash.to_vec());
        log.time = time(&self.site);
        log.chains = self
            .chains
            .iter()
            .map(|(id, h)| {
                let end = ChainEnd {
                    sequence: h.sequence,
                    hash: serde_bytes::ByteBuf::from(h.hash.to_vec()),
                    time: time(h),
                };
                (id.clone(), end)
            })
            .collect();
    }
}

/// HQ's replica of one entitlement, rebuilt from the site's log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replica {
    /// The site imported it.
    pub imported: bool,
    /// Its `activate` approval quorum was met.
    pub activated: bool,
    /// The site applied HQ's revocation.
    pub revoked: bool,
    /// Who approved `activate`, by key fingerprint.
    pub approvers: BTreeSet<String>,
    /// The raises of the daily limit a proven quorum approved, in log order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raises: Vec<keyfab_policy::Raise>,
    /// Devices a proven quorum allowed one more provisioning that has not happened yet.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub reprovisions: BTreeSet<String>,
    /// Devices whose keys a proven re-provisioning superseded (burned).
    #[serde(default)]
    pub superseded: u64,
    /// Devices released.
    pub total: u64,
    /// Every pool slot below this one was taken.
    pub next_pool: u64,
    /// Slots taken above `next_pool`, `[start, end)`, sorted and apart: cluster nodes
    /// take slots from ranges of their own, so slots arrive out of order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool_taken_beyond: Vec<(u64, u64)>,
    /// Devices released per calendar day of the policy's time zone.
    pub days: BTreeMap<String, u64>,
    /// Refusals by code.
    pub refusals: BTreeMap<String, u64>,
    /// Pool keys the site destroyed.
    pub destroyed: u64,
    /// Violations found in its records.
    pub violations: u64,
    /// Devices their station reported programmed.
    #[serde(default)]
    pub confirmed: u64,
    /// Devices whose programming failed: their keys are burned.
    #[serde(default)]
    pub burned: u64,
    /// The policy module's inputs and state, replayed (policies with `[code]` only).
    #[serde(default)]
    pub code: keyfab_policy_code::CodeCounters,
}

impl Replica {
    /// Whether pool slot `index` was taken before.
    fn pool_taken(&self, index: u64) -> bool {
        index < self.next_pool
            || self
                .pool_taken_beyond
                .iter()
                .any(|&(start, end)| start <= index && index < end)
    }

    /// Marks pool slot `index` taken (not taken before).
    fn take_pool_slot(&mut self, index: u64) {
        let ranges = &mut self.pool_taken_beyond;
        let at = ranges.partition_point(|&(_, end)| end < index);
        match ranges.get_mut(at) {
            Some(r) if r.1 == index => r.1 += 1,
            Some(r) if r.0 == index + 1 => r.0 = index,
            _ => ranges.insert(at, (index, index + 1)),
        }
        // Join a range that now touches the next one.
        if let (Some(&(_, end)), Some(&(next_start, next_end))) =
            (ranges.get(at), ranges.get(at + 1))
        {
            if end == next_start {
                ranges[at].1 = next_end;
                ranges.remove(at + 1);
            }
        }
        // Ranges that reach down to `next_pool` fold into it.
        while let Some(&(start, end)) = ranges.first() {
            if start > self.next_pool {
                break;
            }
            self.next_pool = self.next_pool.max(end);
            ranges.remove(0);
        }
    }
}

/// A record of a site's log that breaks what HQ issued or the policy allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Violation {
    /// The site's name.
    pub site: String,
    /// The record's place in the site's log (1 for the first; its sequence on a site of
    /// one chain).
    pub sequence: u64,
    /// The entitlement it concerns, if one.
    pub entitlement: Option<String>,
    /// The device it concerns, if one.
    pub device_id: Option<String>,
    /// What went wrong, written as its name.
    pub kind: ViolationKind,
    /// What was found, for the report.
    pub detail: String,
}

/// What one import of a bundle found.
#[derive(Debug, Clone, Default)]
pub struct Imported {
    /// The site's name.
    pub site: String,
    /// The bundle id.
    pub bundle: String,
    /// Records it carried.
    pub records: u64,
    /// The site's checkpoint HQ accepted with it.
    pub head: Option<TreeHead>,
    /// When the site made that checkpoint.
    pub checkpoint_time: i64,
    /// The violations it showed.
    pub violations: Vec<Violation>,
    /// HQ's replica of each entitlement after it.
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

/// The entitlement and device id of a decision record.
fn device_of(r: &Record) -> Option<(&str, &str)> {
    match &r.event {
        Event::ProvisionAllowed {
            entitlement,
            device_id,
            ..
        }
        | Event::ProvisionDenied {
            entitlement,
            device_id,
            ..
        }
        | Event::ProvisionDeniedByCode {
            entitlement,
            device_id,
            ..
        } => Some((entitlement, device_id)),
        _ => None,
    }
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
    // Verify: the bundle's signature, its sender, and its place after what HQ holds.
    let envelope = verify_sender(node, path)?;
    let recipient = node.recipient_for(&envelope.header.recipient)?;
    let h = envelope.header.clone();
    let log_v = node.store.get(Table::Audit, &log_key(&h.site))?;
    let mut log: SiteLog = log_v
        .as_ref()
        .map(|v| decode(&v.value))
        .transpose()?
        .unwrap_or_default();
    let accepted = check_continuity(&log, &h)?;
    let frontier = Frontier::from_parts(
        accepted.size,
        log.frontier
            .iter()
            .map(|(l, b)| (*l, b.as_slice().try_into().unwrap_or([0u8; 32])))
            .collect(),
    )
    .ok_or_else(|| Error::Corrupt("stored frontier".into()))?;

    // Stage and reconcile, in one pass on two threads: one decrypts the records and
    // checks each one's place in the chain and the Merkle tree; the other reconciles
    // them and stages them in the store. Staged rows lie beyond the accepted head,
    // invisible to every reader, until the final commit moves the head; a bundle that
    // fails anywhere has them removed, so HQ's state is as it was.
    let accepted_sequence = accepted.size;
    let start = Heads::of(&log);
    discard_staged(node, &h.site, accepted_sequence)?;
    let reader = open_bundle(&envelope, recipient)?;
    let staged = match stage_records(node, &h, reader, start, frontier, &mut log, progress) {
        Ok((checked, rec, batch)) => {
            let Reconciler {
                replicas,
                violations,
                ..
            } = rec;
            commit_import(node, &h, log, log_v, checked, replicas, violations, batch)
        }
        Err(e) => Err(e),
    };
    if staged.is_err() {
        // If this fails too, the next import removes what is left.
        let _ = discard_staged(node, &h.site, accepted_sequence);
    }
    staged
}

/// Verifies `path` as an audit bundle for this HQ — sealed to its current HPKE key or
/// an earlier one (keys rotated since) — from a registered site, signed under the
/// cluster certificate registered for it.
fn verify_sender(
    node: &Node,
    path: &Path,
) -> Result<keyfab_formats::Verified<keyfab_formats::audit_bundle::BundleEnvelope>> {
    let envelope = verify_bundle(
        path,
        &node.root_cert()?,
        node.now(),
        &node.name,
        &node.recipient_fingerprints()?,
    )?;
    let site_name = &envelope.header.site;
    let (site, _) = get_site(node, site_name).map_err(|_| {
        Error::Verification(keyfab_formats::FormatError::UntrustedSigner(format!(
            "site '{site_name}' is not registered"
        )))
    })?;
    if site.cluster_cert != envelope.chain[1] {
        return Err(Error::Verification(
            keyfab_formats::FormatError::UntrustedSigner(format!(
                "bundle is signed under another cluster certificate than the one registered for '{site_name}'"
            )),
        ));
    }
    Ok(envelope)
}

/// Checks that bundle `h` continues exactly what HQ accepted of the site's log: not
/// imported before (`replayed`), starting where HQ's copy ends (`log_gap` after it,
/// `log_fork` on another history), its checkpoint agreeing with every one HQ accepted,
/// its consistency proof holding. Returns the head HQ accepted.
fn check_continuity(
    log: &SiteLog,
    h: &keyfab_formats::audit_bundle::BundleHeader,
) -> Result<TreeHead> {
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
    Ok(accepted)
}

/// Commits an import: the replicas and violations reconciled, the staged records made
/// visible by moving the site's log to the bundle's head — guarded on the log as read,
/// so a concurrent import of the same site makes this one fail whole.
#[allow(clippy::too_many_arguments)]
fn commit_import(
    node: &Node,
    h: &keyfab_formats::audit_bundle::BundleHeader,
    mut log: SiteLog,
    log_v: Option<keyfab_store::Versioned>,
    checked: Checked,
    replicas: BTreeMap<String, Replica>,
    violations: Vec<Violation>,
    mut txn: Txn,
) -> Result<Imported> {
    let Checked {
        heads,
        frontier,
        count,
    } = checked;
    for (ent, replica) in &replicas {
        txn.put(Table::Audit, &replica_key(&h.site, ent), &encode(replica)?);
    }
    for (n, v) in violations.iter().enumerate() {
        txn.put(
            Table::Audit,
            &violation_key(&h.site, v.sequence, n),
            &encode(v)?,
        );
    }
    heads.store(&mut log);
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
        return Err(Error::Conflict(
            "HQ state changed meanwhile; import again".into(),
        ));
    }
    Ok(Imported {
        site: h.site.clone(),
        bundle: h.id.clone(),
        records: count,
        head: Some(h.to),
        checkpoint_time: h.checkpoint_time,
        violations,
        per_entitlement: replicas,
    })
}

/// What HQ has accepted of `site`'s log (empty before its first import).
pub fn site_log(node: &Node, site: &str) -> Result<SiteLog> {
    Ok(node
        .store
        .get(Table::Audit, &log_key(site))?
        .map(|v| decode::<SiteLog>(&v.value))
        .transpose()?
        .unwrap_or_default())
}

/// Every record of `site` HQ has accepted, in order.
pub fn site_records(node: &Node, site: &str) -> Result<Vec<Record>> {
    let accepted = site_log(node, site)?.tree.map_or(0, |t| t.size);
    let mut prefix = record_key(site, 0);
    prefix.truncate(prefix.len() - 8);
    let mut out = Vec::new();
    for (key, v) in node.store.scan(Table::Audit, &prefix, usize::MAX)? {
        // A row keyed past the accepted end was staged by an import still running.
        let first = key
            .get(prefix.len()..)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(u64::MAX, u64::from_be_bytes);
        if first > accepted {
            continue;
        }
        for bytes in keyfab_audit::split_row(&v.value).map_err(|e| Error::Corrupt(e.to_string()))? {
            out.push(Record::from_bytes(bytes).map_err(|e| Error::Corrupt(e.to_string()))?);
        }
    }
    Ok(out)
}

/// A record of a verified bundle that does not decode: the site signed bytes that are
/// not an audit record.
fn malformed(m: &str) -> Error {
    Error::Verification(keyfab_formats::FormatError::malformed(
        keyfab_formats::Malformed::Field,
        m,
    ))
}

#[cfg(test)]
mod tests {
    use super::Replica;

    #[test]
    fn pool_slots_taken_in_any_order_are_each_taken_once() {
        let mut rep = Replica::default();
        // Two nodes' ranges, interleaved: 0..4 and 10..13, then the gap 4..10.
        let order = [0, 10, 1, 11, 2, 12, 3, 5, 4, 7, 6, 9, 8];
        for (n, &slot) in order.iter().enumerate() {
            assert!(!rep.pool_taken(slot), "slot {slot} taken too early");
            rep.take_pool_slot(slot);
            for &earlier in &order[..=n] {
                assert!(rep.pool_taken(earlier), "slot {earlier} forgotten");
            }
            assert!(!rep.pool_taken(13));
        }
        assert_eq!((rep.next_pool, rep.pool_taken_beyond.len()), (13, 0));
        // A slot left unused (given back, never taken) stays a hole, never "taken".
        rep.take_pool_slot(15);
        assert!(!rep.pool_taken(14) && rep.pool_taken(15));
    }
}
