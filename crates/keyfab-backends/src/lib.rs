//! The backends the `keyfab` program offers beyond the built-in ones: a site's state in
//! an etcd cluster (`--store etcd://…`) and identity keys in a PKCS#11 token
//! (`--custody pkcs11:…`). The program hands [`Linked`] to the node's home, which asks it
//! for a store or a custody only when the home's `store.json` or `custody.json` names
//! one; the engines see the `Store` and `Custody` contracts only.
#![forbid(unsafe_code)]

use keyfab_crypto::secret::SecretBytes;
use keyfab_custody::Custody;
use keyfab_custody_pkcs11::{Pkcs11Custody, TokenConfig};
use keyfab_node::backends::{TokenTarget, TokenUse};
use keyfab_node::{Backends, Error, EtcdTlsFiles, Result};
use keyfab_store::Store;
use keyfab_store_etcd::{EtcdStore, EtcdTls};
use std::path::Path;

/// etcd and PKCS#11, as linked into the `keyfab` program.
#[derive(Debug, Clone, Copy, Default)]
pub struct Linked;

impl Backends for Linked {
    fn connect_etcd(
        &self,
        endpoints: &[String],
        namespace: &str,
        tls: Option<&EtcdTlsFiles>,
    ) -> Result<Box<dyn Store>> {
        let tls = tls.map(read_tls).transpose()?;
        Ok(Box::new(EtcdStore::connect_with(
            endpoints,
            namespace,
            tls.as_ref(),
        )?))
    }

    fn token_custody(
        &self,
        token: TokenTarget<'_>,
        pin: &SecretBytes,
        token_use: TokenUse,
    ) -> Result<Box<dyn Custody>> {
        let config = TokenConfig {
            module: token.module.to_owned(),
            token_label: token.token.to_owned(),
            pin: pin.clone(),
            max_sessions: token.max_sessions,
        };
        Ok(Box::new(match token_use {
            TokenUse::Create => Pkcs11Custody::create(&config)?,
            TokenUse::Open => Pkcs11Custody::open(&config)?,
        }))
    }
}

/// The CA, and the client certificate and key when there are any, from the files
/// `store.json` names.
fn read_tls(files: &EtcdTlsFiles) -> Result<EtcdTls> {
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| Error::NotFound(format!("{}: {e}", p.display())));
    let client = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => Some((read(cert)?, zeroize::Zeroizing::new(read(key)?))),
        _ => None,
    };
    Ok(EtcdTls {
        ca_pem: read(&files.ca)?,
        client,
    })
}
