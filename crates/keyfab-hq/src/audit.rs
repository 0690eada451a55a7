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

use crate::device_index::DeviceIndex;
use crate::entitlement::{issued_key, IssuedRecord};
use crate::sites::get_site;
use keyfab_audit::merkle::{self, Frontier, Hash};
use keyfab_audit::{Event, Head, Record};
use keyfab_crypto::hash::Fingerprint;
use keyfab_formats::audit_bundle::{open_bundle, verify_bundle};
use keyfab_formats::checkpoint::TreeHead;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_policy::{CompiledPolicy, Decision, DenyCode, EntitlementState};
use keyfab_store::{Outcome, Table, Txn};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

/// What HQ knows of one site's log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteLog {
    /// The site chain's last record: sequence, hash and time.
    pub sequence: u64,
    pub hash: serde_bytes::ByteBuf,
    pub time: i64,
    /// Each node chain's last record, by chain id (cluster sites).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub chains: BTreeMap<String, ChainEnd>,
    /// The last accepted checkpoint, and the frontier that extends it.
    pub tree: Option<TreeHead>,
    pub frontier: Vec<(u32, serde_bytes::ByteBuf)>,
    /// Every checkpoint accepted, and every bundle id seen.
    pub checkpoints: Vec<TreeHead>,
    pub bundles: Vec<String>,
    /// The latest receipt time the site's own log shows it imported.
    pub acknowledged_at: i64,
}

/// The last record HQ accepted of one node chain.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainEnd {
    pub sequence: u64,
    pub hash: serde_bytes::ByteBuf,
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
    pub imported: bool,
    pub activated: bool,
    pub revoked: bool,
    pub approvers: BTreeSet<String>,
    pub total: u64,
    /// Every pool slot below this one was taken.
    pub next_pool: u64,
    /// Slots taken above `next_pool`, `[start, end)`, sorted and apart: cluster nodes
    /// take slots from ranges of their own, so slots arrive out of order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool_taken_beyond: Vec<(u64, u64)>,
    pub days: BTreeMap<String, u64>,
    pub refusals: BTreeMap<String, u64>,
    pub destroyed: u64,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Violation {
    pub site: String,
    /// The record's place in the site's log (1 for the first; its sequence on a site of
    /// one chain).
    pub sequence: u64,
    pub entitlement: Option<String>,
    pub device_id: Option<String>,
    /// What went wrong: a policy code the decision broke (`daily_limit_exceeded`, …), or
    /// `unknown_entitlement`, `pool_key_reused`, `pool_key_not_issued`,
    /// `timestamp_backwards`, `approver_not_listed`, `activated_without_quorum`,
    /// `revoked_without_revocation`, `denied_but_allowed`, `confirmed_without_release`,
    /// `malformed_confirmation`, `clock_reset_not_issued`, `code_replay_differs` (the policy module, replayed,
    /// refuses differently from what the site recorded).
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
    // Sealed to HQ's current HPKE key, or to an earlier one (keys rotated since).
    let envelope = verify_bundle(
        path,
        &node.root_cert()?,
        node.now(),
        &node.name,
        &node.recipient_fingerprints()?,
    )?;
    let recipient = node.recipient_for(&envelope.header.recipient)?;
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
    let frontier = Frontier::from_parts(
        accepted.size,
        log.frontier
            .iter()
            .map(|(l, b)| (*l, b.as_slice().try_into().unwrap_or([0u8; 32])))
            .collect(),
    )
    .ok_or_else(|| Error::InvalidState("stored frontier".into()))?;

    // One pass, on two threads: one decrypts the records and checks each one's place in
    // the chain and the Merkle tree; the other reconciles them and stages them in the
    // store. Staged rows lie beyond the accepted head, invisible to every reader, until
    // the final commit moves the head; a bundle that fails anywhere has them removed, so
    // HQ's state is as it was.
    let accepted_sequence = accepted.size;
    let start = Heads::of(&log);
    discard_staged(node, &h.site, accepted_sequence)?;
    let reader = open_bundle(&envelope, recipient)?;
    let outcome = stage_records(node, &h, reader, start, frontier, &mut log, progress);
    let (checked, rec, batch) = match outcome {
        Ok(done) => done,
        Err(e) => {
            // If this fails too, the next import removes what is left.
            let _ = discard_staged(node, &h.site, accepted_sequence);
            return Err(e);
        }
    };
    let Checked {
        heads,
        frontier,
        count,
    } = checked;
    let mut txn = batch;
    let Reconciler {
        replicas,
        violations,
        ..
    } = rec;
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
    let committed = node.store.commit(txn).map(Outcome::is_committed);
    if !matches!(committed, Ok(true)) {
        let _ = discard_staged(node, &h.site, accepted_sequence);
        committed?;
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
        per_entitlement: replicas,
    })
}

/// Chunks of records in flight between the two threads (a chunk is at most 1 MiB):
/// enough to keep both busy, few enough that memory stays flat.
const CHUNKS_IN_FLIGHT: usize = 4;

/// A chunk of the bundle, checked: its records decoded, and its bytes, which are stored
/// as they are (a chunk has the layout of an audit row).
struct CheckedChunk {
    records: Vec<Record>,
    bytes: Vec<u8>,
}

/// What the checking thread proved: the records continue HQ's heads without a gap or a
/// broken link, and these are the new heads and Merkle frontier.
struct Checked {
    heads: Heads,
    frontier: Frontier,
    count: u64,
}

/// Decrypts and checks the records on one thread while this one reconciles and stages
/// them. Returns the proof of the chain, the reconciler's findings, and the final
/// transaction's writes so far (the last row and devices); the caller commits.
fn stage_records<'a>(
    node: &'a Node,
    h: &keyfab_formats::audit_bundle::BundleHeader,
    reader: keyfab_formats::audit_bundle::RecordReader,
    start: Heads,
    frontier: Frontier,
    log: &'a mut SiteLog,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<(Checked, Reconciler<'a>, Txn)> {
    let mut rec = Reconciler::new(node, &h.site, log);
    let (send, receive) = std::sync::mpsc::sync_channel(CHUNKS_IN_FLIGHT);
    let (give_back, take_back) = std::sync::mpsc::channel();
    let (checked, staged) = std::thread::scope(|scope| {
        let checker = scope
            .spawn(move || check_records(h, reader, start, frontier, &send, &take_back, progress));
        let staged = reconcile_batches(node, &h.site, h.from.size, &mut rec, &receive, &give_back);
        // A reconciler that stopped early closes the channel, which stops the checker.
        drop(receive);
        let checked = checker
            .join()
            .unwrap_or_else(|_| Err(Error::InvalidState("record checker failed".into())));
        (checked, staged)
    });
    // The checker's verdict first: a bad bundle is the news, not what it caused later.
    // (`None`: the checker stopped because the reconciler did, whose error follows.)
    let checked = checked?;
    let batch = staged?;
    let checked = checked.ok_or_else(|| Error::InvalidState("record checker stopped".into()))?;
    if checked.frontier.size() != h.to.size || checked.frontier.root() != h.to.root {
        return Err(Error::Verification(
            keyfab_formats::FormatError::BadSignature(
                "the records do not match the signed checkpoint".into(),
            ),
        ));
    }
    Ok((checked, rec, batch))
}

/// The checking thread: every record decrypts, parses strictly, follows the one before
/// it in its chain and names this site; its leaf joins the Merkle frontier (over the
/// whole log, chains merged as the site merged them). `Ok(None)`: stopped because the
/// reconciling thread is gone.
fn check_records(
    h: &keyfab_formats::audit_bundle::BundleHeader,
    mut reader: keyfab_formats::audit_bundle::RecordReader,
    start: Heads,
    mut frontier: Frontier,
    send: &std::sync::mpsc::SyncSender<CheckedChunk>,
    spent: &std::sync::mpsc::Receiver<CheckedChunk>,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<Option<Checked>> {
    let total = h.to.size - h.from.size;
    let mut heads = start;
    let mut count = 0u64;
    while let Some(chunk) = reader.next_chunk()? {
        // Chunks come back once reconciled, to be freed by the thread that allocated
        // them: freeing in the other thread cost glibc's allocator a second per million
        // records.
        while let Ok(done) = spent.try_recv() {
            drop(done);
        }
        let mut records = Vec::new();
        for bytes in chunk.records() {
            let bytes = bytes?;
            let r = Record::from_bytes(bytes).map_err(|e| malformed(&format!("record: {e}")))?;
            let head = heads.of_record(&r);
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
            let leaf = merkle::leaf_hash(bytes);
            frontier.push(leaf);
            *head = Head {
                sequence: r.sequence,
                hash: leaf,
                // A clock reset HQ issued moves the time back (checked when reconciled).
                time: match r.resets_time() {
                    true => r.time,
                    false => head.time.max(r.time),
                },
            };
            records.push(r);
        }
        count += records.len() as u64;
        let checked = CheckedChunk {
            records,
            bytes: chunk.into_bytes(),
        };
        if send.send(checked).is_err() {
            return Ok(None);
        }
        if let Some(p) = progress {
            p(count, total);
        }
    }
    Ok(Some(Checked {
        heads,
        frontier,
        count,
    }))
}

/// The reconciling thread: reconciles each chunk and stages it as a row of records, with
/// the device index rows it changed, in a commit without an fsync of its own (only the
/// final commit counts). The last chunk is not staged but returned, to go into the final
/// commit: a bundle of one chunk (a few thousand records) is then never staged at all.
fn reconcile_batches(
    node: &Node,
    site: &str,
    accepted: u64,
    rec: &mut Reconciler<'_>,
    receive: &std::sync::mpsc::Receiver<CheckedChunk>,
    give_back: &std::sync::mpsc::Sender<CheckedChunk>,
) -> Result<Txn> {
    let mut pending: Option<Txn> = None;
    // Rows are keyed by the place of their first record in the site's log.
    let mut position = accepted;
    for mut chunk in receive {
        if chunk.records.is_empty() {
            continue;
        }
        let first = position + 1;
        rec.prefetch(&chunk.records)?;
        for r in &chunk.records {
            position += 1;
            rec.position = position;
            rec.record(r)?;
        }
        if let Some(mut staged) = pending.take() {
            staged.non_durable();
            node.store.commit(staged)?;
        }
        let mut txn = Txn::default();
        txn.put_owned(
            Table::Audit,
            record_key(site, first),
            std::mem::take(&mut chunk.bytes),
        );
        rec.stage_new_devices(&mut txn, false);
        pending = Some(txn);
        // The checker frees it (or, gone already, this thread does).
        let _ = give_back.send(chunk);
    }
    let mut last = pending.unwrap_or_default();
    rec.stage_new_devices(&mut last, true);
    Ok(last)
}

/// Removes what an import staged beyond the accepted head (`accepted`) of `site`'s log:
/// its record rows and the device index rows of the devices those records released. An
/// import that failed does this itself; one that died midway leaves it to the next.
/// Each page of rows goes in one commit, so this too can stop and be run again.
fn discard_staged(node: &Node, site: &str, accepted: u64) -> Result<()> {
    let mut prefix = record_key(site, 0);
    prefix.truncate(prefix.len() - 8);
    let from = record_key(site, accepted + 1);
    loop {
        let rows = node.store.scan_from(Table::Audit, &prefix, &from, 16)?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut txn = Txn::default();
        let mut index = DeviceIndex::default();
        for (key, row) in &rows {
            let records = keyfab_audit::split_row(&row.value)
                .map_err(|e| Error::InvalidState(e.to_string()))?;
            for bytes in records {
                let r =
                    Record::from_bytes(bytes).map_err(|e| Error::InvalidState(e.to_string()))?;
                if let (Event::ProvisionAllowed { .. }, Some((entitlement, device))) =
                    (&r.event, device_of(&r))
                {
                    // Only what this import added: an earlier release stays.
                    index.released(node.store.as_ref(), entitlement, device)?;
                    index.forget_after(entitlement, device, accepted);
                }
            }
            txn.delete(Table::Audit, key);
        }
        index.stage(&mut txn, true);
        node.store.commit(txn)?;
    }
}

/// Every record of `site` HQ has accepted, in order.
pub fn site_records(node: &Node, site: &str) -> Result<Vec<Record>> {
    let accepted = node
        .store
        .get(Table::Audit, &log_key(site))?
        .map(|v| decode::<SiteLog>(&v.value))
        .transpose()?
        .and_then(|l| l.tree)
        .map_or(0, |t| t.size);
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
        for bytes in
            keyfab_audit::split_row(&v.value).map_err(|e| Error::InvalidState(e.to_string()))?
        {
            out.push(Record::from_bytes(bytes).map_err(|e| Error::InvalidState(e.to_string()))?);
        }
    }
    Ok(out)
}

fn malformed(m: &str) -> Error {
    Error::Verification(keyfab_formats::FormatError::Malformed(m.to_owned()))
}

/// What reconciliation needs of one entitlement, looked up once per import.
struct Issued {
    record: IssuedRecord,
    policy: CompiledPolicy,
    /// Indexes of the policy's `hq-pool` key specs.
    pool_specs: Vec<usize>,
    /// The policy module, compiled once for the replay.
    code: Option<keyfab_policy_code::PolicyModule>,
}

/// A decision as the site's log records it.
#[derive(Clone, Copy)]
enum Recorded<'a> {
    Allowed,
    /// Refused with `code`; `reason` is the policy module's, when it refused.
    Denied {
        code: &'a String,
        reason: Option<&'a String>,
    },
}

struct Reconciler<'a> {
    node: &'a Node,
    site: String,
    log: &'a mut SiteLog,
    /// The place in the site's log of the record being reconciled.
    position: u64,
    /// Each chain's latest record time (`None`: the site chain). Time runs forward
    /// within a chain; nodes' clocks differ a little, so not across chains.
    last_times: HashMap<Option<String>, i64>,
    /// Entitlements HQ issued to this site (`None`: not issued, or to another site).
    issued: HashMap<String, Option<Arc<Issued>>>,
    /// The devices released before, by earlier imports or earlier in this one.
    devices: DeviceIndex,
    /// The last pool-key id row read, by chunk: releases walk a chunk in order.
    pool_row: Option<((String, u64), Vec<u8>)>,
    /// The last calendar day computed, and for which entitlement.
    last_day: Option<(Arc<Issued>, keyfab_policy::DaySpan)>,
    replicas: BTreeMap<String, Replica>,
    violations: Vec<Violation>,
    /// The clock resets HQ issued to this site, read when the log first carries one.
    clock_resets: Option<Vec<crate::sites::ClockResetIssued>>,
}

impl<'a> Reconciler<'a> {
    fn clock_resets(&mut self) -> Result<&[crate::sites::ClockResetIssued]> {
        if self.clock_resets.is_none() {
            let (site, _) = crate::sites::get_site(self.node, &self.site)?;
            self.clock_resets = Some(site.clock_resets);
        }
        Ok(self.clock_resets.as_deref().unwrap_or_default())
    }

    fn new(node: &'a Node, site: &str, log: &'a mut SiteLog) -> Self {
        let heads = Heads::of(log);
        let mut last_times: HashMap<Option<String>, i64> = heads
            .chains
            .into_iter()
            .map(|(id, h)| (Some(id), h.time))
            .collect();
        last_times.insert(None, heads.site.time);
        Self {
            node,
            site: site.to_owned(),
            log,
            position: 0,
            last_times,
            issued: HashMap::new(),
            devices: DeviceIndex::default(),
            pool_row: None,
            last_day: None,
            replicas: BTreeMap::new(),
            violations: Vec::new(),
            clock_resets: None,
        }
    }

    fn violation(
        &mut self,
        entitlement: Option<&str>,
        device: Option<&str>,
        kind: &str,
        detail: String,
    ) {
        if let Some(e) = entitlement {
            if let Some(rep) = self.replicas.get_mut(e) {
                rep.violations += 1;
            }
        }
        self.violations.push(Violation {
            site: self.site.clone(),
            sequence: self.position,
            entitlement: entitlement.map(str::to_owned),
            device_id: device.map(str::to_owned),
            kind: kind.to_owned(),
            detail,
        });
    }

    /// The entitlement as HQ issued it to this site, if it did.
    fn issued(&mut self, id: &str) -> Result<Option<Arc<Issued>>> {
        if let Some(found) = self.issued.get(id) {
            return Ok(found.clone());
        }
        let found = match self.node.store.get(Table::Issued, &issued_key(id))? {
            Some(v) => {
                let record: IssuedRecord = decode(&v.value)?;
                if record.site == self.site {
                    let policy = CompiledPolicy::new(record.policy.clone())?;
                    let pool_specs = record
                        .policy
                        .keys
                        .iter()
                        .enumerate()
                        .filter(|(_, k)| k.source == keyfab_policy::KeySource::HqPool)
                        .map(|(i, _)| i)
                        .collect();
                    let code = record
                        .policy
                        .code
                        .as_ref()
                        .map(keyfab_policy_code::load_embedded)
                        .transpose()
                        .map_err(|e| {
                            keyfab_policy::PolicyError::new("code.module", e.to_string())
                        })?;
                    Some(Arc::new(Issued {
                        record,
                        policy,
                        pool_specs,
                        code,
                    }))
                } else {
                    None
                }
            }
            None => None,
        };
        self.issued.insert(id.to_owned(), found.clone());
        Ok(found)
    }

    /// The calendar day of `time` under `issued`'s policy.
    fn day_of(&mut self, issued: &Arc<Issued>, time: i64) -> String {
        if let Some((policy, span)) = &self.last_day {
            if Arc::ptr_eq(policy, issued) && span.contains(time) {
                return span.day.clone();
            }
        }
        let span = issued.policy.day_span(time);
        let day = span.day.clone();
        self.last_day = Some((issued.clone(), span));
        day
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
            self.replicas.insert(id.to_owned(), r);
        }
        self.replicas
            .get_mut(id)
            .ok_or_else(|| Error::InvalidState("replica".into()))
    }

    /// Loads, in one snapshot, what the index knows of the devices of `records`.
    fn prefetch(&mut self, records: &[Record]) -> Result<()> {
        let devices = records.iter().filter_map(device_of);
        self.devices.load(self.node.store.as_ref(), devices)
    }

    /// Adds the device index rows changed since they were last written to `txn`, when
    /// enough have changed, or with `all`.
    fn stage_new_devices(&mut self, txn: &mut Txn, all: bool) {
        self.devices.stage(txn, all);
    }

    fn record(&mut self, r: &Record) -> Result<()> {
        let last_time = self.last_times.entry(r.chain.clone()).or_insert(i64::MIN);
        // A clock reset goes back to its own time; whether HQ issued it is checked below.
        let backwards = r.time < *last_time && !r.resets_time();
        *last_time = match r.resets_time() {
            true => r.time,
            false => (*last_time).max(r.time),
        };
        if backwards {
            self.violation(
                None,
                None,
                "timestamp_backwards",
                format!(
                    "record {} is earlier than the one before it in its chain",
                    self.position
                ),
            );
        }
        match &r.event {
            Event::EntitlementImported { entitlement, .. } => {
                if self.issued(entitlement)?.is_none() {
                    self.violation(
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
                    Some(entry) => entry.record.policy.approval.as_ref().is_some_and(|a| {
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
                    .and_then(|entry| entry.record.policy.approval.as_ref().map(|a| a.threshold))
                    .unwrap_or(u32::MAX);
                let count = self.replica(entitlement)?.approvers.len();
                if count < threshold as usize {
                    self.violation(
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
                    .is_some_and(|entry| entry.record.revoked_at.is_some());
                if !revoked_by_hq {
                    self.violation(
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
                    Recorded::Allowed,
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
                    Recorded::Denied { code, reason: None },
                    None,
                    &[],
                )?;
            }
            Event::ProvisionDeniedByCode {
                entitlement,
                device_id,
                station,
                code,
                reason,
                ..
            } => {
                self.decision(
                    r,
                    entitlement,
                    device_id,
                    station.as_deref(),
                    Recorded::Denied {
                        code,
                        reason: Some(reason),
                    },
                    None,
                    &[],
                )?;
            }
            Event::DeviceConfirmed {
                entitlement,
                device_id,
                result,
                ..
            } => {
                let released = self.issued(entitlement)?.is_some()
                    && self
                        .devices
                        .released(self.node.store.as_ref(), entitlement, device_id)?
                        .is_some();
                if !released {
                    self.violation(
                        Some(entitlement),
                        Some(device_id),
                        "confirmed_without_release",
                        "a confirmation of a device that received no keys".into(),
                    );
                }
                let code_day = match self.issued(entitlement)? {
                    Some(entry) if entry.code.is_some() => Some(self.day_of(&entry, r.time)),
                    _ => None,
                };
                let rep = self.replica(entitlement)?;
                match result.as_str() {
                    "programmed" => rep.confirmed += 1,
                    "failed" => {
                        rep.burned += 1;
                        // Only the first confirmation of a device reaches the log.
                        if let (Some(day), true) = (code_day, released) {
                            rep.code.record_failed(&day);
                        }
                    }
                    _ => {}
                }
                if !matches!(result.as_str(), "programmed" | "failed") {
                    self.violation(
                        Some(entitlement),
                        Some(device_id),
                        "malformed_confirmation",
                        format!("unknown result '{result}'"),
                    );
                }
            }
            Event::StationMismatch { entitlement, .. } => {
                // Nothing was released: an attempt, counted with the refusals.
                if self.issued(entitlement)?.is_some() {
                    *self
                        .replica(entitlement)?
                        .refusals
                        .entry("station_not_allowed".into())
                        .or_insert(0) += 1;
                }
            }
            Event::ClockReset {
                to,
                size,
                acknowledged_at,
                ..
            } => {
                let issued = self.clock_resets()?.iter().any(|c| {
                    c.acknowledged_at == *acknowledged_at
                        && c.trusted_time == *to
                        && c.size == *size
                });
                if issued && r.time == *to {
                    self.log.acknowledged_at = self.log.acknowledged_at.max(*acknowledged_at);
                } else {
                    self.violation(
                        None,
                        None,
                        "clock_reset_not_issued",
                        format!(
                            "the site's trusted time was reset to {} on a receipt of {} HQ did not issue",
                            keyfab_node::rfc3339(*to),
                            keyfab_node::rfc3339(*acknowledged_at)
                        ),
                    );
                }
            }
            Event::ClockRollback { .. }
            | Event::ClockAhead { .. }
            | Event::SiteLatched { .. }
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
        recorded: Recorded<'_>,
        pool_index: Option<u64>,
        keys: &[keyfab_audit::AuditedKey],
    ) -> Result<()> {
        let allowed = matches!(recorded, Recorded::Allowed);
        let Some(entry) = self.issued(entitlement)? else {
            if allowed {
                self.violation(
                    Some(entitlement),
                    Some(device_id),
                    "unknown_entitlement",
                    "keys released under an entitlement HQ never issued to this site".into(),
                );
            }
            return Ok(());
        };
        let already = self
            .devices
            .released(self.node.store.as_ref(), entitlement, device_id)?
            .is_some();
        let acknowledged = entry.record.created_at.max(self.log.acknowledged_at);
        let day = self.day_of(&entry, r.time);
        let state = {
            let rep = self.replica(entitlement)?;
            EntitlementState {
                revoked: rep.revoked,
                activated: rep.activated,
                last_acknowledged: acknowledged,
                total: rep.total,
                today: rep.days.get(&day).copied().unwrap_or(0),
            }
        };
        let built_in = entry.policy.decide(
            &state,
            &keyfab_policy::Request {
                device_id,
                station,
                already_provisioned: already,
            },
            r.time,
        );
        // The module runs where the site ran it: after the built-in rules allowed.
        let (decision, reason) = match (built_in, &entry.code) {
            (Decision::Allow, Some(module)) => {
                let counted = keyfab_policy_code::Counted {
                    total: state.total,
                    today: state.today,
                };
                let policy = &entry.policy;
                let evaluation = self
                    .replica(entitlement)?
                    .code
                    .evaluate(module, policy, r.time, &day, counted, device_id, station);
                match evaluation.verdict {
                    keyfab_policy_code::Verdict::Allow => (Decision::Allow, None),
                    keyfab_policy_code::Verdict::Deny { reason } => {
                        (Decision::Deny(DenyCode::PolicyDenied), Some(reason))
                    }
                    keyfab_policy_code::Verdict::Error { reason } => {
                        (Decision::Deny(DenyCode::PolicyError), Some(reason))
                    }
                }
            }
            (other, _) => (other, None),
        };
        if let Recorded::Denied {
            code,
            reason: recorded_reason,
        } = recorded
        {
            *self
                .replica(entitlement)?
                .refusals
                .entry(code.clone())
                .or_insert(0) += 1;
            match decision {
                Decision::Allow => self.violation(
                    Some(entitlement),
                    Some(device_id),
                    "denied_but_allowed",
                    format!("the site refused with {code}, the policy allows it"),
                ),
                Decision::Deny(c) if recorded_reason.is_some() => {
                    // A module's refusal must replay exactly: the same code, and for
                    // `policy_denied` the same reason.
                    let same = c.code() == code
                        && (c != DenyCode::PolicyDenied
                            || reason.as_deref() == recorded_reason.map(String::as_str));
                    if !same {
                        self.violation(Some(entitlement),
                            Some(device_id),
                            "code_replay_differs",
                            format!(
                                "the site's module refused with {code} ({}), the replay gives {} ({})",
                                recorded_reason.map_or("", String::as_str),
                                c.code(),
                                reason.as_deref().unwrap_or("")
                            ),
                        );
                    }
                }
                Decision::Deny(_) => {}
            }
            return Ok(());
        }
        if let Decision::Deny(c) = decision {
            let because = reason.map(|r| format!(" ({r})")).unwrap_or_default();
            self.violation(
                Some(entitlement),
                Some(device_id),
                c.code(),
                format!(
                    "keys released although the policy refuses: {}{because}",
                    c.code()
                ),
            );
        }
        // Pool keys: a slot never taken before, and exactly the keys HQ put there.
        if !entry.pool_specs.is_empty() {
            let taken = match pool_index {
                Some(index) => self.replica(entitlement)?.pool_taken(index),
                None => false,
            };
            match pool_index {
                Some(index) if !taken => {
                    for (spec_no, key_index) in entry.pool_specs.iter().enumerate() {
                        let audited = keys.get(*key_index).map_or("", |k| k.key_id.as_str());
                        if !self.pool_key_matches(&entry.record, spec_no, index, audited)? {
                            self.violation(
                                Some(entitlement),
                                Some(device_id),
                                "pool_key_not_issued",
                                format!("slot {index}: {audited} is not the key HQ put there"),
                            );
                        }
                    }
                }
                Some(index) => {
                    self.violation(
                        Some(entitlement),
                        Some(device_id),
                        "pool_key_reused",
                        format!("slot {index} was given out before"),
                    );
                }
                None => {
                    self.violation(
                        Some(entitlement),
                        Some(device_id),
                        "pool_key_not_issued",
                        "no pool slot recorded".into(),
                    );
                }
            }
        }
        // A device released twice keeps the index entry of its first release.
        self.devices.insert(entitlement, device_id, self.position);
        let has_code = entry.code.is_some();
        let rep = self.replica(entitlement)?;
        rep.total += 1;
        if has_code {
            rep.code.record_allowed(&day, station);
        }
        match rep.days.get_mut(&day) {
            Some(n) => *n += 1,
            None => {
                rep.days.insert(day, 1);
            }
        }
        if let Some(index) = pool_index {
            rep.take_pool_slot(index);
        }
        Ok(())
    }

    fn pool_key_matches(
        &mut self,
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
        let cached = self
            .pool_row
            .as_ref()
            .is_some_and(|((id, c), _)| *id == issued.id && *c == chunk);
        if !cached {
            let Some(row) = self.node.store.get(
                Table::Issued,
                &crate::entitlement::pool_ids_key(&issued.id, chunk),
            )?
            else {
                return Ok(false);
            };
            self.pool_row = Some(((issued.id.clone(), chunk), row.value));
        }
        let Some((_, row)) = &self.pool_row else {
            return Ok(false);
        };
        let at = ((index % kpc) * 32) as usize;
        let Some(id) = row.get(at..at + 32) else {
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
