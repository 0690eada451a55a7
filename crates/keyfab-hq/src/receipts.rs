//! HQ's acknowledgment of a site's audit: remember the accepted checkpoint for that site
//! (later entitlements carry it) and sign a receipt the site imports.
//!
//! The audit import of the return path calls this after it has verified the records and
//! their consistency with every checkpoint HQ has seen; nothing else should.

use crate::sites::{get_site, SiteRecord};
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
        acknowledged_at: node.now().0,
    };
    let bytes = write_receipt(node.service_signer()?, node.service_chain()?, &receipt)?;
    let mut updated = site.clone();
    updated.acknowledged = Some(head);
    let mut txn = Txn::default();
    txn.require_unchanged(Table::Sites, site.name.as_bytes(), Some(&version))
        .put(Table::Sites, site.name.as_bytes(), &encode(&updated)?);
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::InvalidState(
            "site registry changed meanwhile; retry".into(),
        ));
    }
    Ok(bytes)
}
