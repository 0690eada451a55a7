//! The store and custody backends a program links. A node's home and the engines know
//! the [`Store`] and [`Custody`] contracts and the two backends built in — the embedded
//! store and the software keystore. A program that offers an etcd cluster or a PKCS#11
//! token passes a [`Backends`] that reaches them, so the libraries link neither gRPC nor a
//! PKCS#11 loader, and a program that does not offer them links neither (as ripgrep's
//! binary, not its search library, chooses the regex engine).

use crate::store_choice::EtcdTlsFiles;
use crate::{Error, Result};
use keyfab_crypto::secret::SecretBytes;
use keyfab_custody::Custody;
use keyfab_store::Store;
use std::path::Path;

/// A PKCS#11 token, as a home's `custody.json` names it.
#[derive(Debug, Clone, Copy)]
pub struct TokenTarget<'a> {
    /// The PKCS#11 module (a shared library).
    pub module: &'a Path,
    /// The token's label.
    pub token: &'a str,
    /// At most this many sessions open at once.
    pub max_sessions: usize,
}

/// Whether custody in a token is being set up for a new home or opened for an existing
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// `init`: the token must not hold keyfab keys yet.
    Create,
    /// Any later command: the token holds the home's keys.
    Open,
}

/// The backends beyond the built-in ones, provided by the program.
pub trait Backends: Sync {
    /// Connects to the etcd cluster at `endpoints`, this node's keys under `namespace`.
    fn connect_etcd(
        &self,
        endpoints: &[String],
        namespace: &str,
        tls: Option<&EtcdTlsFiles>,
    ) -> Result<Box<dyn Store>>;

    /// Custody in a PKCS#11 token, logged in with `pin`.
    fn token_custody(
        &self,
        token: TokenTarget<'_>,
        pin: &SecretBytes,
        token_use: TokenUse,
    ) -> Result<Box<dyn Custody>>;
}

/// Only the built-in backends: a home in etcd or with keys in a token is refused with a
/// precondition error that says so.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuiltInOnly;

fn not_linked(what: &str) -> Error {
    Error::Precondition(format!(
        "this program was built without the {what} backend: use the keyfab command"
    ))
}

impl Backends for BuiltInOnly {
    fn connect_etcd(
        &self,
        _endpoints: &[String],
        _namespace: &str,
        _tls: Option<&EtcdTlsFiles>,
    ) -> Result<Box<dyn Store>> {
        Err(not_linked("etcd"))
    }

    fn token_custody(
        &self,
        _token: TokenTarget<'_>,
        _pin: &SecretBytes,
        _token_use: TokenUse,
    ) -> Result<Box<dyn Custody>> {
        Err(not_linked("PKCS#11"))
    }
}
