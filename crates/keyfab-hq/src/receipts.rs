//! HQ's acknowledgment of a site's audit: remember the accepted checkpoint for that site
//! (later entitlements carry it) and sign a receipt the site imports.
//!
//! The audit import of the return path calls this after it has verified the records and
//! their consistency with every checkpoint HQ has seen; nothing else should.

use crate::sites::{get_site, ClockResetIssued, SiteRecord};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::hpke::HpkePublicKey;
use keyfab_formats::checkpoint::{verify_checkpoint, write_receipt, Receipt, TreeHead};
use keyfab_node::{encode, Error, Node, Result};
use keyfab_store::{Table, Txn};

/// Verifies a site's signed checkpoint, records it as the site's acknowledged head, and
/// returns the receipt file for the site. (Tests and drills; the audit import
/// acknowledges through [`acknowledge`].)
pub fn acknowledge_checkpoint(node: &Node, checkpoint: &[u8]) -> Result<Vec<u8>> {
    let c = verify_checkpoint(checkpoint, &node.root_cert()?, node.now())?.into_inner();
    acknowledge(node, &c.site, c.head, c.time)
}

/// Records `head` as the site's acknowledged head and signs the receipt for it.
pub fn acknowledge(
    node: &Node,
    site_name: &str,
    head: TreeHead,
    checkpoint_time: i64,
) -> Result<Vec<u8>> {
    let (site, version): (SiteRecord, _) = get_site(node, site_name)?;
    if let Some(previous) = &site.acknowledged {
        if head.size < previous.size {
            return Err(Error::InvalidInput(format!(
                "site '{site_name}' checkpoint has {} records, HQ already acknowledged {}",
                head.size, previous.size
            )));
        }
    }
    let (receipt, bytes) = sign_receipt(node, &site, head, checkpoint_time, node.now().0, None)?;
    let mut updated = site;
    updated.acknowledged = Some(head);
    updated.acknowledged_checkpoint_time = Some(receipt.checkpoint_time);
    commit_site(node, &version, &updated)?;
    Ok(bytes)
}

/// A reset of a site's trusted time, as HQ issued it: the receipt file for the site, and
/// what it says.
#[derive(Debug, Clone)]
pub struct ClockReset {
    /// What the receipt says.
    pub receipt: Receipt,
    /// The receipt file.
    pub bytes: Vec<u8>,
}

/// Issues a receipt that resets `site_name`'s trusted time to HQ's time, for a site whose
/// clock ran ahead and whose trusted time followed it (its provisioning then answers
/// `clock_rollback`). It acknowledges the checkpoint HQ last accepted — the site imports
/// it only if no device received keys since then (so it cannot be kept and used later to
/// set a site's time back) — and is recorded in the site's registry: HQ accepts in the
/// site's log the resets it issued, and flags any other.
pub fn reset_clock(node: &Node, site_name: &str) -> Result<ClockReset> {
    let (site, version) = get_site(node, site_name)?;
    let (Some(head), Some(checkpoint_time)) =
        (site.acknowledged, site.acknowledged_checkpoint_time)
    else {
        return Err(Error::Precondition(format!(
            "HQ has accepted no audit export of site '{site_name}' yet: import its latest export (`keyfab hq audit import`), then reset its clock"
        )));
    };
    let now = node.now().0;
    let (receipt, bytes) = sign_receipt(node, &site, head, checkpoint_time, now, Some(now))?;
    let mut updated = site;
    updated.clock_resets.push(ClockResetIssued {
        acknowledged_at: receipt.acknowledged_at,
        trusted_time: now,
        size: head.size,
    });
    commit_site(node, &version, &updated)?;
    Ok(ClockReset { receipt, bytes })
}

/// A receipt for `site` acknowledging `head` at `acknowledged_at`, signed.
fn sign_receipt(
    node: &Node,
    site: &SiteRecord,
    head: TreeHead,
    checkpoint_time: i64,
    acknowledged_at: i64,
    trusted_time: Option<i64>,
) -> Result<(Receipt, Vec<u8>)> {
    let receipt = Receipt {
        format: "keyfab-receipt".into(),
        version: 1,
        hq: node.name.clone(),
        hq_cluster: Fingerprint::of(&node.cluster_cert()?).to_hex(),
        site: site.name.clone(),
        recipient: HpkePublicKey::from_sec1(&site.hpke_key)?
            .fingerprint()
            .to_hex(),
        head,
        checkpoint_time,
        acknowledged_at,
        trusted_time,
    };
    let bytes = write_receipt(node.service_signer()?, node.service_chain()?, &receipt)?;
    Ok((receipt, bytes))
}

/// Writes `site`'s registry entry, guarded on the version read.
fn commit_site(node: &Node, read: &keyfab_store::Versioned, site: &SiteRecord) -> Result<()> {
    let mut txn = Txn::default();
    txn.require_unchanged(Table::Sites, site.name.as_bytes(), Some(read))
        .put(Table::Sites, site.name.as_bytes(), &encode(site)?);
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::Conflict(
            "site registry changed meanwhile; retry".into(),
        ));
    }
    Ok(())
}
