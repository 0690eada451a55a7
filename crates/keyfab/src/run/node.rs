//! What HQ and a site share: a node's home, its cluster certificate, its service keys, a site's identity file.

use crate::context::Context;
use crate::output::{io_fail, Failure, Report};
use keyfab_node::{Node, NodeKind};
use serde_json::json;
use std::path::Path;

pub(crate) fn init_node(
    ctx: &Context,
    a: &crate::cli::InitArgs,
    kind: NodeKind,
) -> Result<Report, Failure> {
    let (home, name) = (&a.home.home, a.name.as_str());
    let rng = ctx.rng();
    // Sealed by shares: the keystore's secret is an unseal key nobody sees whole.
    let split = match (a.unseal_shares, a.unseal_threshold) {
        (Some(n), Some(m)) => Some(
            keyfab_custody::unseal::split(m, n, rng.as_ref()).map_err(keyfab_node::Error::from)?,
        ),
        _ => None,
    };
    let custody = keyfab_node::CustodyChoice::parse(&a.custody)?;
    let tls = a.etcd_ca.clone().map(|ca| keyfab_node::EtcdTlsFiles {
        ca,
        cert: a.etcd_cert.clone(),
        key: a.etcd_key.clone(),
    });
    if tls.is_none() && (a.etcd_cert.is_some() || a.etcd_key.is_some()) {
        return Err(Failure::usage("--etcd-cert and --etcd-key need --etcd-ca"));
    }
    let store = keyfab_node::StoreChoice::parse_with(&a.store, name, tls)?;
    let node = Node::init_with(
        home,
        kind,
        name,
        &custody,
        &store,
        &keyfab_backends::Linked,
        &match &split {
            Some(s) => s.passphrase.clone(),
            None => ctx.passphrase()?,
        },
        rng,
        ctx.clock()?,
    )?;
    if let Some(s) = &split {
        s.config.save(home).map_err(keyfab_node::Error::from)?;
    }
    let csr = node.dir.join(keyfab_node::CSR_FILE);
    let what = if kind == NodeKind::Hq { "hq" } else { "site" };
    let mut text = format!(
        "{what} '{name}' created in {}; have the root CA sign {}:\n  keyfab pki issue --home ROOT --csr {} --role {what} --out {name}.crt",
        home.display(), csr.display(), csr.display()
    );
    let mut json = json!({"name": name, "kind": what, "csr": csr});
    if let Some(s) = &split {
        text.push_str(&format!(
            "\n\nThe keystore is sealed by {} shares; any {} unseal it. They are shown this once: give one to each holder, keep none together.\n",
            s.config.shares, s.config.threshold
        ));
        for share in &s.shares {
            text.push_str(&format!("  {}\n", share.as_str()));
        }
        text.push_str("Unseal a running `site serve` with `keyfab site unseal`; one-shot commands take --unseal-share-file FILE once per share.");
        json["unseal"] = json!({
            "shares": s.shares.iter().map(|x| x.as_str()).collect::<Vec<_>>(),
            "threshold": s.config.threshold,
        });
    }
    Ok(Report::new(text, json))
}

pub(crate) fn install_cert(
    ctx: &Context,
    home: &Path,
    kind: NodeKind,
    cert: &Path,
    root: &Path,
) -> Result<Report, Failure> {
    let mut node = ctx.open(home, kind)?;
    let cert_der = keyfab_hq::pki::read_pem_file(cert, "CERTIFICATE")?;
    let root_der = keyfab_hq::pki::read_pem_file(root, "CERTIFICATE")?;
    let service = node.install_cert(&cert_der, &root_der)?;
    let fp = keyfab_crypto::hash::Fingerprint::of(&cert_der);
    Ok(Report::new(
        format!(
            "cluster certificate installed for '{}' ({fp}); service keys generation {} issued",
            node.name, service.generation
        ),
        json!({"name": node.name, "cluster_cert_sha256": fp.to_hex(), "service_generation": service.generation}),
    ))
}

/// `site|hq rotate-keys`: the next generation of service keys.
pub(crate) fn rotate_keys(ctx: &Context, home: &Path, kind: NodeKind) -> Result<Report, Failure> {
    let mut node = ctx.open(home, kind)?;
    let next = match kind {
        NodeKind::Site => keyfab_site::identity::rotate_keys(&mut node)?,
        NodeKind::Hq => node.rotate_service_keys()?,
    };
    let fp = |c: &[u8]| keyfab_crypto::hash::Fingerprint::of(c).to_hex();
    let next_step = match kind {
        NodeKind::Site => format!(
            "send HQ the new identity: keyfab site identity export --home {} --out {}.kfi, then keyfab hq site add",
            home.display(),
            node.name
        ),
        NodeKind::Hq => "sites learn HQ's new encryption key from the next entitlement".into(),
    };
    Ok(Report::new(
        format!(
            "'{}' now uses service keys of generation {} (signing certificate {}, encryption certificate {}); the previous keys still open and verify what they sealed and signed.\nNext: {next_step}",
            node.name,
            next.generation,
            fp(&next.signing_cert),
            fp(&next.hpke_cert)
        ),
        json!({"name": node.name, "generation": next.generation, "signing_cert_sha256": fp(&next.signing_cert), "hpke_cert_sha256": fp(&next.hpke_cert)}),
    ))
}

pub(crate) fn identity_export(ctx: &Context, home: &Path, out: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let bytes = keyfab_site::identity::export_identity(&node)?;
    std::fs::write(out, &bytes).map_err(|e| io_fail(out, e))?;
    Ok(Report::new(
        format!("site identity of '{}' written to {} ({} bytes); register it at HQ with `keyfab hq site add`", node.name, out.display(), bytes.len()),
        json!({"site": node.name, "out": out, "bytes": bytes.len()}),
    ))
}
