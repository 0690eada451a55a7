//! The site's side of audit freshness and rollback detection (tier B: see docs/THREAT-MODEL.md, "restore an old backup"): signed checkpoints of the log, HQ receipts, and the check that
//! the local log still contains, unchanged, every checkpoint HQ acknowledged.

use crate::audit_log::Appender;
use keyfab_audit::merkle::{self, Hash};
use keyfab_audit::Event;
use keyfab_formats::checkpoint::{verify_receipt, write_checkpoint, Checkpoint, Receipt, TreeHead};
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn};
use serde::{Deserialize, Serialize};

pub(crate) const HQ_ACK: &[u8] = b"hq_acknowledged";

/// What HQ last acknowledged of this site's log.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acknowledged {
    /// The head HQ acknowledged.
    pub head: TreeHead,
    /// When HQ acknowledged it (HQ's clock).
    pub acknowledged_at: i64,
}

/// The leaf hashes of the whole audit log, in order.
pub fn leaves(node: &Node) -> Result<Vec<Hash>> {
    Ok(crate::audit_log::record_bytes(node)?
        .iter()
        .map(|b| merkle::leaf_hash(b))
        .collect())
}

/// The head of this site's log now (size and Merkle root).
pub fn tree_head(node: &Node) -> Result<TreeHead> {
    let l = leaves(node)?;
    Ok(TreeHead {
        size: l.len() as u64,
        root: merkle::root(&l),
    })
}

/// Refuses a log that is shorter than, or differs from, an acknowledged head — and
/// stops the site (see `latch`): it must not release again what it released before.
pub fn check_consistent(node: &Node, acked: &TreeHead) -> Result<()> {
    let l = leaves(node)?;
    let size = usize::try_from(acked.size).unwrap_or(usize::MAX);
    let why = if l.len() < size {
        format!(
            "HQ acknowledged {} audit records, this site has {}: its state was restored from an older copy",
            acked.size,
            l.len()
        )
    } else if merkle::root(&l[..size]) != acked.root {
        format!(
            "the first {} audit records differ from what HQ acknowledged: the log was rewritten",
            acked.size
        )
    } else {
        return Ok(());
    };
    crate::latch::latch(node, crate::latch::Cause::RollbackDetected, &why)?;
    Err(Error::RollbackDetected(why))
}

/// What HQ last acknowledged, if it has acknowledged anything.
pub fn acknowledged(node: &Node) -> Result<Option<Acknowledged>> {
    node.store
        .get(Table::Meta, HQ_ACK)?
        .map(|v| decode(&v.value))
        .transpose()
}

/// A checkpoint of the log as it is now, signed by the site.
pub fn checkpoint(node: &Node) -> Result<(Checkpoint, Vec<u8>)> {
    let rollback_counter = crate::rollback_counter::advance(node)?;
    let c = Checkpoint {
        format: "keyfab-checkpoint".into(),
        version: 1,
        site: node.name.clone(),
        head: tree_head(node)?,
        time: node.now().0,
        rollback_counter,
    };
    let bytes = write_checkpoint(node.service_signer()?, node.service_chain()?, &c)?;
    Ok((c, bytes))
}

/// What importing a receipt did.
#[derive(Debug, Clone, Copy)]
pub struct ReceiptImport {
    /// What HQ acknowledged.
    pub acknowledged: Acknowledged,
    /// For a receipt that reset the trusted time: the trusted time before, and after.
    pub clock_reset: Option<(i64, i64)>,
}

/// Imports HQ's receipt: verified, then checked against the local log; it becomes the
/// acknowledgment that `audit_every_days` counts from. A receipt HQ issued to reset the
/// trusted time (`hq site reset-clock`) also sets it to HQ's time — recorded as
/// `clock_reset`, the one record whose time may go back — provided no device received
/// keys since the checkpoint it acknowledges: a reset kept aside and imported later,
/// after provisioning went on, could otherwise set a sound trusted time back.
pub fn import_receipt(node: &Node, bytes: &[u8]) -> Result<ReceiptImport> {
    let recipients = node.recipient_fingerprints()?;
    let r = verify_receipt(
        bytes,
        &node.root_cert()?,
        node.now(),
        &node.name,
        &recipients,
    )?
    .into_inner();
    let seen = node.store.get(Table::Meta, HQ_ACK)?;
    if let Some(v) = &seen {
        let last: Acknowledged = decode(&v.value)?;
        if r.head.size < last.head.size || r.acknowledged_at <= last.acknowledged_at {
            return Err(Error::Replayed(format!(
                "this receipt ({} records, {}) is not newer than the last one ({} records, {})",
                r.head.size, r.acknowledged_at, last.head.size, last.acknowledged_at
            )));
        }
    }
    check_consistent(node, &r.head)?;
    let ack = Acknowledged {
        head: r.head,
        acknowledged_at: r.acknowledged_at,
    };
    let ack_bytes = encode(&ack)?;
    let landed = crate::audit_log::until_landed(node, || {
        let mut txn = Txn::default();
        let clock_reset = match r.trusted_time {
            None => {
                let mut log = Appender::begin(node, &mut txn)?;
                log.append(
                    &mut txn,
                    node.now().0,
                    Event::ReceiptImported {
                        size: r.head.size,
                        root: hex::encode(r.head.root),
                        acknowledged_at: r.acknowledged_at,
                    },
                )?;
                log.finish(&mut txn);
                None
            }
            // The way out of a clock check must not need to pass one.
            Some(to) => Some(reset_clock(node, &mut txn, &r, to)?),
        };
        txn.require_unchanged(Table::Meta, HQ_ACK, seen.as_ref())
            .put(Table::Meta, HQ_ACK, &ack_bytes);
        Ok(node
            .store
            .commit(txn)?
            .is_committed()
            .then_some(clock_reset))
    })?;
    let Some(clock_reset) = landed else {
        return Err(Error::Conflict(
            "site state changed meanwhile; import again".into(),
        ));
    };
    Ok(ReceiptImport {
        acknowledged: ack,
        clock_reset,
    })
}

/// Records, in `txn`, the reset of the trusted time to `to` that receipt `r` carries, and
/// returns the trusted time before and after; refuses (`replayed`) when a device received
/// keys after the checkpoint `r` acknowledges.
fn reset_clock(node: &Node, txn: &mut Txn, r: &Receipt, to: i64) -> Result<(i64, i64)> {
    let size = usize::try_from(r.head.size).unwrap_or(usize::MAX);
    // Streamed a page at a time: the log may be long, and only its end is looked at.
    for bytes in crate::audit_log::RecordStream::new(node)?.skip(size) {
        let record = keyfab_audit::Record::from_bytes(&bytes?)
            .map_err(|e| Error::Corrupt(format!("audit record: {e}")))?;
        if let Event::ProvisionAllowed { device_id, .. } = record.event {
            return Err(Error::Replayed(format!(
                "this clock reset acknowledges {} audit records, and device '{device_id}' received keys after them (record {}): it no longer applies. Export the audit, import it at HQ, and ask HQ for a new reset",
                r.head.size, record.sequence
            )));
        }
    }
    let mark = node.store.get(Table::Meta, crate::provision::TIME_HWM)?;
    let mut log = Appender::begin_unbounded(node, txn)?;
    let from = crate::audit_log::trusted_time(mark.as_ref(), &log.head())?.unwrap_or(to);
    log.append_clock_reset(Event::ClockReset {
        from,
        to,
        size: r.head.size,
        root: hex::encode(r.head.root),
        acknowledged_at: r.acknowledged_at,
    })?;
    log.finish(txn);
    txn.require_unchanged(Table::Meta, crate::provision::TIME_HWM, mark.as_ref())
        .put(Table::Meta, crate::provision::TIME_HWM, &to.to_be_bytes());
    Ok((from, to))
}
