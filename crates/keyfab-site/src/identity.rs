//! `site identity export`: the site's chain and service public keys, signed; and
//! `site rotate-keys`.

use keyfab_crypto::hash::Fingerprint;
use keyfab_formats::identity::write_identity;
use keyfab_node::{Node, Result, ServiceIdentity};

/// The site's signed identity file (`.kfi`), for `hq site add`.
pub fn export_identity(node: &Node) -> Result<Vec<u8>> {
    let service = node.service()?;
    Ok(write_identity(
        node.service_signer()?,
        &node.name,
        &node.cluster_cert()?,
        &service.signing_cert,
        &service.hpke_cert,
        node.now(),
    )?)
}

/// New service keys and certificates for the site, recorded in its audit log in the same
/// commit. Entitlements sealed to the previous key still import; HQ seals to the new
/// one once it has the site's new identity file (`site identity export`, `hq site add`).
pub fn rotate_keys(node: &mut Node) -> Result<ServiceIdentity> {
    let next = node.next_service_identity()?;
    let value = format!(
        "generation {}: signing certificate {}, encryption certificate {}",
        next.generation,
        Fingerprint::of(&next.signing_cert).to_hex(),
        Fingerprint::of(&next.hpke_cert).to_hex()
    );
    crate::audit_log::commit_setting(node, "service_keys", value, |txn| {
        node.activate_service_identity(txn, &next)
    })?;
    Ok(next)
}
