//! What HQ and a site share: a node's home, its cluster certificate, its service keys, a site's identity file.

use crate::context::Context;
use crate::output::{io_fail, Failure, Outcome, Report};
use keyfab_node::{Node, NodeKind};
use serde::Serialize;
use std::path::{Path, PathBuf};

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
    // Each share sealed to its holder, and written, before the home exists: a home
    // whose shares did not reach their files would never open.
    let sealed_shares = match &split {
        Some(s) => super::holder::seal_shares(a, name, s, rng.as_ref())?,
        None => Vec::new(),
    };
    let counter = match (&a.rollback_counter, kind) {
        (None, _) => None,
        (Some(_), NodeKind::Hq) => {
            return Err(Failure::usage(
                "--rollback-counter is for sites: HQ keeps no state a factory could put back",
            ))
        }
        (Some(spec), NodeKind::Site) => Some(
            spec.parse::<keyfab_tpm::CounterSpec>()
                .map_err(|e| Failure::usage(e.to_string()))?,
        ),
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
    let made = Node::init_with(
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
    );
    let mut node = match made {
        Ok(node) => node,
        Err(e) => {
            for (path, _) in &sealed_shares {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
    };
    if let Some(s) = &split {
        s.config.save(home).map_err(keyfab_node::Error::from)?;
    }
    let counter_value = match &counter {
        Some(spec) => match keyfab_site::rollback_counter::init(&mut node, spec) {
            Ok(value) => Some(value),
            Err(e) => {
                // The home was made by this command a moment ago: nothing else is in it.
                drop(node);
                let _ = std::fs::remove_dir_all(home);
                for (path, _) in &sealed_shares {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e.into());
            }
        },
        None => None,
    };
    Report::of(&NodeCreated {
        name: name.to_owned(),
        kind: if kind == NodeKind::Hq { "hq" } else { "site" },
        csr: node.dir.join(keyfab_node::CSR_FILE),
        unseal: split.as_ref().map(|s| UnsealShares {
            // In clear only when asked for (--print-shares); otherwise, where each
            // holder's sealed share went.
            shares: if sealed_shares.is_empty() {
                s.shares.iter().map(|x| x.as_str().to_owned()).collect()
            } else {
                Vec::new()
            },
            sealed: sealed_shares
                .iter()
                .map(|(file, holder)| SealedShareFile {
                    file: file.clone(),
                    holder: holder.clone(),
                })
                .collect(),
            threshold: s.config.threshold,
            of: s.config.shares,
        }),
        rollback_counter: counter.map(|spec| RollbackCounter {
            spec: spec.to_string(),
            value: counter_value.unwrap_or_default(),
        }),
        home: home.to_owned(),
    })
}

/// The TPM counter a site's state was bound to at init.
#[derive(Serialize)]
struct RollbackCounter {
    spec: String,
    value: u64,
}

/// `hq|site init`: the home made, its CSR for the root, and — for a home sealed by
/// shares — the shares, shown this once.
#[derive(Serialize)]
struct NodeCreated {
    name: String,
    kind: &'static str,
    csr: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    unseal: Option<UnsealShares>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollback_counter: Option<RollbackCounter>,
    #[serde(skip)]
    home: PathBuf,
}

#[derive(Serialize)]
struct UnsealShares {
    /// The shares in clear (`--print-shares`), else none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    shares: Vec<String>,
    /// The shares sealed to their holders (`--share-recipients`), else none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sealed: Vec<SealedShareFile>,
    threshold: u8,
    of: u8,
}

#[derive(Serialize)]
struct SealedShareFile {
    file: PathBuf,
    /// The holder's key fingerprint.
    holder: String,
}

impl Outcome for NodeCreated {
    fn text(&self) -> String {
        let (what, name, csr) = (self.kind, &self.name, self.csr.display());
        let mut text = format!(
            "{what} '{name}' created in {}; have the root CA sign {csr}:\n  keyfab pki issue --home ROOT --csr {csr} --role {what} --out {name}.crt",
            self.home.display()
        );
        if let Some(c) = &self.rollback_counter {
            text.push_str(&format!(
                "\nIts state is bound to the TPM counter {} (now {}): a copy of this home put back is refused.",
                c.spec, c.value
            ));
        }
        if let Some(u) = &self.unseal {
            if u.sealed.is_empty() {
                text.push_str(&format!(
                    "\n\nThe keystore is sealed by {} shares; any {} unseal it. They are shown this once: give one to each holder, keep none together.\n",
                    u.of, u.threshold
                ));
                for share in &u.shares {
                    text.push_str(&format!("  {share}\n"));
                }
                text.push_str("Unseal a running `site serve` with `keyfab site unseal`; one-shot commands take --unseal-share-file FILE once per share.");
            } else {
                text.push_str(&format!(
                    "\n\nThe keystore is sealed by {} shares; any {} unseal it. Each is sealed to its holder's key; hand each file to its holder:\n",
                    u.of, u.threshold
                ));
                for s in &u.sealed {
                    text.push_str(&format!("  {}  (holder {})\n", s.file.display(), s.holder));
                }
                text.push_str("Unseal a running `site serve` with `keyfab site unseal --share-file FILE --holder-key KEY`; one-shot commands take --unseal-share-file <(keyfab holder open-share --key KEY FILE).");
            }
        }
        text
    }
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
    Report::of(&CertInstalled {
        name: node.name.clone(),
        cluster_cert_sha256: keyfab_crypto::hash::Fingerprint::of(&cert_der).to_hex(),
        service_generation: service.generation,
    })
}

/// `hq|site install-cert`: the cluster certificate installed, service keys issued.
#[derive(Serialize)]
struct CertInstalled {
    name: String,
    cluster_cert_sha256: String,
    service_generation: u32,
}

impl Outcome for CertInstalled {
    fn text(&self) -> String {
        format!(
            "cluster certificate installed for '{}' ({}); service keys generation {} issued",
            self.name, self.cluster_cert_sha256, self.service_generation
        )
    }
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
    Report::of(&KeysRotated {
        name: node.name.clone(),
        generation: next.generation,
        signing_cert_sha256: fp(&next.signing_cert),
        hpke_cert_sha256: fp(&next.hpke_cert),
        next_step,
    })
}

/// `hq|site rotate-keys`: the new generation of service keys.
#[derive(Serialize)]
struct KeysRotated {
    name: String,
    generation: u32,
    signing_cert_sha256: String,
    hpke_cert_sha256: String,
    #[serde(skip)]
    next_step: String,
}

impl Outcome for KeysRotated {
    fn text(&self) -> String {
        format!(
            "'{}' now uses service keys of generation {} (signing certificate {}, encryption certificate {}); the previous keys still open and verify what they sealed and signed.\nNext: {}",
            self.name, self.generation, self.signing_cert_sha256, self.hpke_cert_sha256, self.next_step
        )
    }
}

pub(crate) fn identity_export(ctx: &Context, home: &Path, out: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let bytes = keyfab_site::identity::export_identity(&node)?;
    std::fs::write(out, &bytes).map_err(|e| io_fail(out, e))?;
    Report::of(&IdentityExported {
        site: node.name.clone(),
        out: out.to_owned(),
        bytes: bytes.len(),
    })
}

/// `site identity export`: the signed identity file, written.
#[derive(Serialize)]
struct IdentityExported {
    site: String,
    out: PathBuf,
    bytes: usize,
}

impl Outcome for IdentityExported {
    fn text(&self) -> String {
        format!(
            "site identity of '{}' written to {} ({} bytes); register it at HQ with `keyfab hq site add`",
            self.site,
            self.out.display(),
            self.bytes
        )
    }
}
