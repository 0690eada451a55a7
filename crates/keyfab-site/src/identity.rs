//! `site identity export`: the site's chain and service public keys, signed.

use keyfab_formats::identity::write_identity;
use keyfab_node::{Node, Result};

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
