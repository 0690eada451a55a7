//! `site audit export`: the records since the last export, for HQ, in a `.kfa`.
//!
//! The export is recorded (audited, its range and bundle id kept) before the file is
//! written, so the site never forgets a range it handed out — but kept as *unfinished*
//! until the file is durably on disk. While an export is unfinished (the write failed,
//! the process was killed), the next export writes that same range under the same bundle
//! id again instead of moving on, so rerunning the same command after any failure gives
//! a bundle HQ accepts: never a gap. `--again` rewrites the last range on request.

use crate::audit_log::{Appender, RecordStream};
use crate::entitlements::hq_recipient;
use keyfab_audit::{merkle, Event};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::hpke::HpkePublicKey;
use keyfab_crypto::x509;
use keyfab_formats::audit_bundle::{write_bundle, BundleFields};
use keyfab_formats::checkpoint::TreeHead;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn};
use serde::{Deserialize, Serialize};
use std::path::Path;

const EXPORTS: &[u8] = b"exports";

/// The last export and the one before it: `--again` rewrites the range between them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Exports {
    previous: TreeHead,
    last: TreeHead,
    last_id: String,
    last_time: i64,
    /// The last export's file was not known to be on disk yet (absent in stores written
    /// before: their exports were finished).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    unfinished: bool,
}

fn empty() -> TreeHead {
    TreeHead {
        size: 0,
        root: merkle::root(&[]),
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The bundle id.
    pub bundle: String,
    /// The log's head at the previous export.
    pub from: TreeHead,
    /// The log's head now: the checkpoint the bundle carries.
    pub to: TreeHead,
    /// Records in the bundle.
    pub records: u64,
    /// The file's size.
    pub bytes: u64,
    /// The last export did not finish (its file was never known to be written): this
    /// wrote its range again, under its bundle id, instead of a new one.
    pub finished_earlier: bool,
}

/// How many audit records no export has carried yet.
pub fn records_unexported(node: &Node) -> Result<u64> {
    let exported = last_export(node)?.map_or(0, |(size, _)| size);
    Ok(crate::audit_log::log_size(node)?.saturating_sub(exported))
}

/// The last export: the records it carried up to, and when it was made.
pub fn last_export(node: &Node) -> Result<Option<(u64, i64)>> {
    Ok(match node.store.get(Table::Meta, EXPORTS)? {
        Some(v) => {
            let e = decode::<Exports>(&v.value)?;
            Some((e.last.size, e.last_time))
        }
        None => None,
    })
}

/// Exports the log since the last export to `out`, sealed to HQ.
pub fn export(
    node: &Node,
    out: &Path,
    again: bool,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<Exported> {
    // A copy of the home taken before this export is behind the TPM from now on.
    crate::rollback_counter::advance(node)?;
    // An export shows every key destruction that is due.
    crate::batch_key::retire_ended(node)?;
    let hq = hq_recipient(node)?.ok_or_else(|| {
        Error::Precondition(
            "no entitlement imported yet: this site does not know HQ's encryption key".into(),
        )
    })?;
    let recipient_leaf = x509::cert_facts(&hq.hpke_cert)?;
    let recipient = HpkePublicKey::from_sec1(
        &recipient_leaf
            .public_point
            .ok_or_else(|| Error::Corrupt("HQ encryption key".into()))?,
    )?;
    check_out(out)?;
    let seen = node.store.get(Table::Meta, EXPORTS)?;
    let exports: Option<Exports> = seen.as_ref().map(|v| decode(&v.value)).transpose()?;
    // Pass 1: only the leaf hashes (32 bytes a record) stay in memory, for the tree
    // head and the consistency proof; the records are read again in pass 2.
    let leaves = RecordStream::new(node)?
        .map(|r| r.map(|bytes| merkle::leaf_hash(&bytes)))
        .collect::<Result<Vec<merkle::Hash>>>()?;

    let unfinished = exports.as_ref().is_some_and(|e| e.unfinished);
    let (from, to, id, time) = if again || unfinished {
        let e = exports.ok_or_else(|| Error::Precondition("nothing was exported yet".into()))?;
        (e.previous, e.last, e.last_id, e.last_time)
    } else {
        let from = exports.map_or_else(empty, |e| e.last);
        let mut id = [0u8; 16];
        node.rng.fill(&mut id);
        let id = hex::encode(id);
        let time = node.now().0;
        let to = TreeHead {
            size: leaves.len() as u64,
            root: merkle::root(&leaves),
        };
        // Record the export first (atomically with its audit record). Records the
        // serving site appends meanwhile go to the next export.
        let e = encode(&Exports {
            previous: from,
            last: to,
            last_id: id.clone(),
            last_time: time,
            unfinished: true,
        })?;
        let landed = crate::audit_log::until_landed(node, || {
            let mut txn = Txn::default();
            let mut log = Appender::begin(node, &mut txn)?;
            log.append(
                &mut txn,
                time,
                Event::AuditExported {
                    bundle: id.clone(),
                    from_size: from.size,
                    to_size: to.size,
                    root: hex::encode(to.root),
                },
            )?;
            log.finish(&mut txn);
            txn.require_unchanged(Table::Meta, EXPORTS, seen.as_ref())
                .put(Table::Meta, EXPORTS, &e);
            Ok(node.store.commit(txn)?.is_committed().then_some(()))
        })?;
        if landed.is_none() {
            return Err(Error::Conflict(
                "site state changed meanwhile; export again".into(),
            ));
        }
        (from, to, id, time)
    };
    let from_n = usize::try_from(from.size).map_err(|_| Error::Bug("size".into()))?;
    let to_n = usize::try_from(to.size).map_err(|_| Error::Bug("size".into()))?;
    if to_n > leaves.len() || merkle::root(&leaves[..to_n]) != to.root {
        let why = "the log no longer holds what was exported";
        crate::latch::latch(node, crate::latch::Cause::RollbackDetected, why)?;
        return Err(Error::RollbackDetected(why.into()));
    }
    let fields = BundleFields {
        id: id.clone(),
        site: node.name.clone(),
        hq: hq.hq.clone(),
        hq_cluster: Fingerprint::of(&hq.cluster_cert),
        recipient,
        from,
        to,
        checkpoint_time: time,
        consistency: merkle::consistency_proof(from_n, &leaves[..to_n]),
        created_at: node.now(),
    };
    let total = (to_n - from_n) as u64;
    // Pass 2: the range's records, streamed into the bundle.
    let mut iter = RecordStream::new(node)?
        .skip(from_n)
        .take(to_n - from_n)
        .enumerate()
        .map(|(i, r)| {
            if let Some(p) = progress {
                if i.is_multiple_of(1024) || i as u64 + 1 == total {
                    p(i as u64 + 1, total);
                }
            }
            r.map_err(|e| std::io::Error::other(e.to_string()))
        });
    let bytes = write_bundle_file(node, out, &fields, &mut iter).map_err(|e| {
        Error::Verification(keyfab_formats::FormatError::Write(format!(
            "bundle {id} (audit records {}..{}) was not written to {}: {e}. Nothing is lost and the \
             export has not moved on: run the same command again (with an --out that can be \
             written); it writes the same records under the same bundle id, which HQ accepts",
            from.size + 1,
            to.size,
            out.display()
        )))
    })?;
    finish(node, &id)?;
    Ok(Exported {
        bundle: id,
        from,
        to,
        records: to.size - from.size,
        bytes,
        finished_earlier: unfinished && !again,
    })
}

/// Refuses, before anything is recorded, an `--out` that cannot be a new bundle file:
/// a directory, a file that exists (it may be the bundle of an export that was cut short
/// after it was written: overwriting it would lose those records for HQ), or a path whose
/// directory does not exist.
fn check_out(out: &Path) -> Result<()> {
    if !out.is_dir() && out.symlink_metadata().is_ok() {
        return Err(Error::InvalidInput(format!(
            "--out {} exists; nothing was exported. If it is the bundle of an earlier export \
             (one that was interrupted, say), take it to HQ; then export to a new file",
            out.display()
        )));
    }
    keyfab_node::out_file::check_new(out, "nothing was exported")
}

/// Marks export `id` finished: its file is on disk, the next export moves on.
fn finish(node: &Node, id: &str) -> Result<()> {
    let seen = node.store.get(Table::Meta, EXPORTS)?;
    let Some(mut e) = seen
        .as_ref()
        .map(|v| decode::<Exports>(&v.value))
        .transpose()?
    else {
        return Ok(());
    };
    if e.last_id != id || !e.unfinished {
        return Ok(());
    }
    e.unfinished = false;
    let mut txn = Txn::default();
    txn.require_unchanged(Table::Meta, EXPORTS, seen.as_ref())
        .put(Table::Meta, EXPORTS, &encode(&e)?);
    // Lost to a concurrent export: that one is the last now, and finishes itself.
    node.store.commit(txn)?;
    Ok(())
}

/// Writes `records` as a bundle of `fields` to the new file `out` (whole or not at all),
/// signed with `node`'s service key: how every bundle of a site reaches disk — its
/// exports, and the bundles `keyfab bench audit` makes.
pub fn write_bundle_file(
    node: &Node,
    out: &Path,
    fields: &keyfab_formats::audit_bundle::BundleFields,
    records: &mut dyn Iterator<Item = std::io::Result<Vec<u8>>>,
) -> keyfab_formats::Result<u64> {
    let signer = node
        .service_signer()
        .map_err(|e| keyfab_formats::FormatError::Write(e.to_string()))?;
    let chain = node
        .service_chain()
        .map_err(|e| keyfab_formats::FormatError::Write(e.to_string()))?;
    keyfab_node::out_file::write_new_with(out, |file| {
        let mut spool = keyfab_node::out_file::spool_beside(out)?;
        write_bundle(
            keyfab_formats::Output {
                file,
                spool: &mut spool,
            },
            fields,
            records,
            signer,
            chain,
            node.rng.as_ref(),
        )
    })
}
