//! The site registry: sites HQ may issue entitlements to, learned from verified `.kfi`
//! files, each with the sequence number its next entitlement gets.

use keyfab_formats::identity::verify_identity;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn};
use serde::{Deserialize, Serialize};

/// What HQ keeps of a registered site.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRecord {
    /// The site's name.
    pub name: String,
    /// Its cluster certificate (DER).
    #[serde(with = "serde_bytes")]
    pub cluster_cert: Vec<u8>,
    /// Its service signing certificate (DER).
    #[serde(with = "serde_bytes")]
    pub signing_cert: Vec<u8>,
    /// Its HPKE certificate (DER).
    #[serde(with = "serde_bytes")]
    pub hpke_cert: Vec<u8>,
    /// Uncompressed P-256 point of the site's HPKE key.
    #[serde(with = "serde_bytes")]
    pub hpke_key: Vec<u8>,
    /// Sequence number of the last entitlement issued to this site (0: none yet).
    pub last_sequence: u64,
    /// The last checkpoint of this site's audit log HQ accepted.
    #[serde(default)]
    pub acknowledged: Option<keyfab_formats::checkpoint::TreeHead>,
    /// When that checkpoint was made (the site's time).
    #[serde(default)]
    pub acknowledged_checkpoint_time: Option<i64>,
    /// The clock resets HQ issued to this site: its log may carry these, and only these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clock_resets: Vec<ClockResetIssued>,
}

/// A reset of a site's trusted time, as HQ issued it (`hq site reset-clock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockResetIssued {
    /// When HQ issued it: the receipt's `acknowledged_at`.
    pub acknowledged_at: i64,
    /// The trusted time it sets.
    pub trusted_time: i64,
    /// The records of the site's log HQ had accepted then.
    pub size: u64,
}

/// Registers (or refreshes, after a key rotation) a site from its identity file. Only an
/// identity that chains to HQ's own root with role site is accepted.
pub fn add_site(node: &Node, kfi: &[u8]) -> Result<SiteRecord> {
    let root = node.root_cert()?;
    let id = verify_identity(kfi, &root, node.now())?.into_inner();
    let key = id.site.as_bytes();
    let existing = node.store.get(Table::Sites, key)?;
    // A refresh keeps what HQ knows of the site's history; only its keys change.
    let history = match &existing {
        Some(v) => decode::<SiteRecord>(&v.value)?,
        None => SiteRecord {
            name: String::new(),
            cluster_cert: Vec::new(),
            signing_cert: Vec::new(),
            hpke_cert: Vec::new(),
            hpke_key: Vec::new(),
            last_sequence: 0,
            acknowledged: None,
            acknowledged_checkpoint_time: None,
            clock_resets: Vec::new(),
        },
    };
    let record = SiteRecord {
        name: id.site.clone(),
        cluster_cert: id.cluster_cert,
        signing_cert: id.signing_cert,
        hpke_cert: id.hpke_cert,
        hpke_key: id.hpke_key.sec1().to_vec(),
        ..history
    };
    let mut txn = Txn::default();
    txn.require_unchanged(Table::Sites, key, existing.as_ref())
        .put(Table::Sites, key, &encode(&record)?);
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::Conflict(
            "site registry changed meanwhile; retry".into(),
        ));
    }
    Ok(record)
}

/// The site `name`, with its stored version (for guarded updates).
pub fn get_site(node: &Node, name: &str) -> Result<(SiteRecord, keyfab_store::Versioned)> {
    let v = node
        .store
        .get(Table::Sites, name.as_bytes())?
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no site '{name}' is registered (run `keyfab hq site add`)"
            ))
        })?;
    Ok((decode(&v.value)?, v))
}

/// Every registered site, by name.
pub fn list_sites(node: &Node) -> Result<Vec<SiteRecord>> {
    node.store
        .scan(Table::Sites, b"", usize::MAX)?
        .into_iter()
        .map(|(_, v)| decode(&v.value))
        .collect()
}
