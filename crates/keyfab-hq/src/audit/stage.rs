//! Staging an import: the bundle's records decrypted and checked on one thread (each
//! follows the one before it in its chain, and joins the Merkle frontier), reconciled
//! and staged in the store on the other, beyond the accepted head until the import
//! commits; and what a failed or interrupted import left staged, removed.

use super::reconcile::Reconciler;
use super::*;
use crate::device_index::DeviceIndex;

/// Chunks of records in flight between the two threads (a chunk is at most 1 MiB):
/// enough to keep both busy, few enough that memory stays flat.
pub(super) const CHUNKS_IN_FLIGHT: usize = 4;

/// A chunk of the bundle, checked: its records decoded, and its bytes, which are stored
/// as they are (a chunk has the layout of an audit row).
pub(super) struct CheckedChunk {
    pub(super) records: Vec<Record>,
    pub(super) bytes: Vec<u8>,
}

/// What the checking thread proved: the records continue HQ's heads without a gap or a
/// broken link, and these are the new heads and Merkle frontier.
pub(super) struct Checked {
    pub(super) heads: Heads,
    pub(super) frontier: Frontier,
    pub(super) count: u64,
}

/// Decrypts and checks the records on one thread while this one reconciles and stages
/// them. Returns the proof of the chain, the reconciler's findings, and the final
/// transaction's writes so far (the last row and devices); the caller commits.
pub(super) fn stage_records<'a>(
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
            .unwrap_or_else(|_| Err(Error::Bug("record checker failed".into())));
        (checked, staged)
    });
    // The checker's verdict first: a bad bundle is the news, not what it caused later.
    // (`None`: the checker stopped because the reconciler did, whose error follows.)
    let checked = checked?;
    let batch = staged?;
    let checked = checked.ok_or_else(|| Error::Bug("record checker stopped".into()))?;
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
pub(super) fn check_records(
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
pub(super) fn reconcile_batches(
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
pub(super) fn discard_staged(node: &Node, site: &str, accepted: u64) -> Result<()> {
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
            let records =
                keyfab_audit::split_row(&row.value).map_err(|e| Error::Corrupt(e.to_string()))?;
            for bytes in records {
                let r = Record::from_bytes(bytes).map_err(|e| Error::Corrupt(e.to_string()))?;
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
