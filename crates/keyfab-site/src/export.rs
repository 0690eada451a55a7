//! `site audit export`: the records since the last export, for HQ, in a `.kfa`.
//!
//! The export is recorded (audited, and the new head kept) before the file is written,
//! so the site never forgets a range it handed out; if writing the file fails, `--again`
//! writes the same range once more. HQ sees each range at most once either way.

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
}

fn empty() -> TreeHead {
    TreeHead {
        size: 0,
        root: merkle::root(&[]),
    }
}

#[derive(Debug, Clone)]
pub struct Exported {
    pub bundle: String,
    pub from: TreeHead,
    pub to: TreeHead,
    pub records: u64,
    pub bytes: u64,
}

pub fn export(
    node: &Node,
    out: &Path,
    again: bool,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<Exported> {
    let hq = hq_recipient(node)?.ok_or_else(|| {
        Error::InvalidState(
            "no entitlement imported yet: this site does not know HQ's encryption key".into(),
        )
    })?;
    let recipient_leaf = x509::cert_facts(&hq.hpke_cert)?;
    let recipient = HpkePublicKey::from_sec1(
        &recipient_leaf
            .public_point
            .ok_or_else(|| Error::InvalidState("HQ encryption key".into()))?,
    )?;
    let seen = node.store.get(Table::Meta, EXPORTS)?;
    let exports: Option<Exports> = seen.as_ref().map(|v| decode(&v.value)).transpose()?;
    // Pass 1: only the leaf hashes (32 bytes a record) stay in memory, for the tree
    // head and the consistency proof; the records are read again in pass 2.
    let leaves = RecordStream::new(node)?
        .map(|r| r.map(|bytes| merkle::leaf_hash(&bytes)))
        .collect::<Result<Vec<merkle::Hash>>>()?;

    let (from, to, id, time) = if again {
        let e = exports.ok_or_else(|| Error::InvalidState("nothing was exported yet".into()))?;
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
        // Record the export first (atomically with its audit record).
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
        let e = Exports {
            previous: from,
            last: to,
            last_id: id.clone(),
            last_time: time,
        };
        txn.require_unchanged(Table::Meta, EXPORTS, seen.as_ref())
            .put(Table::Meta, EXPORTS, &encode(&e)?);
        if !node.store.commit(txn)?.is_committed() {
            return Err(Error::InvalidState(
                "site state changed meanwhile; export again".into(),
            ));
        }
        (from, to, id, time)
    };
    let from_n = usize::try_from(from.size).map_err(|_| Error::InvalidState("size".into()))?;
    let to_n = usize::try_from(to.size).map_err(|_| Error::InvalidState("size".into()))?;
    if to_n > leaves.len() || merkle::root(&leaves[..to_n]) != to.root {
        return Err(Error::RollbackDetected(
            "the log no longer holds what was exported".into(),
        ));
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
    let bytes = write_bundle(
        out,
        &fields,
        &mut iter,
        node.service_signer()?,
        node.service_chain()?,
        node.rng.as_ref(),
    )?;
    Ok(Exported {
        bundle: id,
        from,
        to,
        records: to.size - from.size,
        bytes,
    })
}
