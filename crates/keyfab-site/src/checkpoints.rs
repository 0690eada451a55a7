//! The site's side of audit freshness and rollback detection (tier B: see docs/THREAT-MODEL.md, "restore an old backup"): signed checkpoints of the log, HQ receipts, and the check that
//! the local log still contains, unchanged, every checkpoint HQ acknowledged.

use crate::audit_log::Appender;
use keyfab_audit::merkle::{self, Hash};
use keyfab_audit::Event;
use keyfab_formats::checkpoint::{verify_receipt, write_checkpoint, Checkpoint, TreeHead};
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn};
use serde::{Deserialize, Serialize};

pub(crate) const HQ_ACK: &[u8] = b"hq_acknowledged";

/// What HQ last acknowledged of this site's log.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acknowledged {
    pub head: TreeHead,
    pub acknowledged_at: i64,
}

/// The leaf hashes of the whole audit log, in order.
pub fn leaves(node: &Node) -> Result<Vec<Hash>> {
    Ok(crate::audit_log::record_bytes(node)?
        .iter()
        .map(|b| merkle::leaf_hash(b))
        .collect())
}

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

pub fn acknowledged(node: &Node) -> Result<Option<Acknowledged>> {
    node.store
        .get(Table::Meta, HQ_ACK)?
        .map(|v| decode(&v.value))
        .transpose()
}

/// A checkpoint of the log as it is now, signed by the site.
pub fn checkpoint(node: &Node) -> Result<(Checkpoint, Vec<u8>)> {
    let c = Checkpoint {
        format: "keyfab-checkpoint".into(),
        version: 1,
        site: node.name.clone(),
        head: tree_head(node)?,
        time: node.now().0,
    };
    let bytes = write_checkpoint(node.service_signer()?, node.service_chain()?, &c)?;
    Ok((c, bytes))
}

/// Imports HQ's receipt: verified, then checked against the local log; it becomes the
/// acknowledgment that `audit_every_days` counts from.
pub fn import_receipt(node: &Node, bytes: &[u8]) -> Result<Acknowledged> {
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
    let mut txn = Txn::default();
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
    txn.require_unchanged(Table::Meta, HQ_ACK, seen.as_ref())
        .put(Table::Meta, HQ_ACK, &encode(&ack)?);
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::InvalidState(
            "site state changed meanwhile; import again".into(),
        ));
    }
    Ok(ack)
}
