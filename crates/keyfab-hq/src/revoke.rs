//! Revoking an entitlement: a signed `.kfr` for its site, with the next sequence number.

use crate::entitlement::{issued_key, reserve_sequence, IssuedRecord};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::hpke::HpkePublicKey;
use keyfab_formats::revocation::{write_revocation, Revocation};
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn};
use std::path::Path;

/// What `hq entitlement revoke` did.
#[derive(Debug, Clone)]
pub struct RevokeSummary {
    /// The entitlement revoked.
    pub entitlement: String,
    /// Its site.
    pub site: String,
    /// The revocation's sequence number.
    pub sequence: u64,
}

/// Revokes entitlement `id` and writes the `.kfr` for its site to `out`.
pub fn revoke(node: &Node, id: &str, reason: &str, out: &Path) -> Result<RevokeSummary> {
    let key = issued_key(id);
    let v = node
        .store
        .get(Table::Issued, &key)?
        .ok_or_else(|| Error::NotFound(format!("HQ issued no entitlement '{id}'")))?;
    let mut issued: IssuedRecord = decode(&v.value)?;
    if issued.revoked_at.is_some() {
        return Err(Error::Precondition(format!("{id} is already revoked")));
    }
    let (site, sequence) = reserve_sequence(node, &issued.site)?;
    let cluster = node.cluster_cert()?;
    let r = Revocation {
        format: "keyfab-revocation".into(),
        version: 1,
        entitlement: id.to_owned(),
        sequence,
        hq: node.name.clone(),
        hq_cluster: Fingerprint::of(&cluster).to_hex(),
        site: site.name.clone(),
        recipient: HpkePublicKey::from_sec1(&site.hpke_key)?
            .fingerprint()
            .to_hex(),
        created_at: node.now().0,
        reason: reason.to_owned(),
    };
    let bytes = write_revocation(node.service_signer()?, node.service_chain()?, &r)?;
    let tmp = out.with_extension("kfr.tmp");
    std::fs::write(&tmp, &bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    issued.revoked_at = Some(r.created_at);
    let mut txn = Txn::default();
    txn.require_unchanged(Table::Issued, &key, Some(&v)).put(
        Table::Issued,
        &key,
        &encode(&issued)?,
    );
    node.store.commit(txn)?;
    Ok(RevokeSummary {
        entitlement: id.to_owned(),
        site: site.name,
        sequence,
    })
}
