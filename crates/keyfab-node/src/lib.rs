//! A keyfab node's home directory, shared by the HQ and site engines.
//!
//! ```text
//! HOME/keystore.kfs   identity keys, sealed under the passphrase (keyfab-custody)
//! HOME/state.redb     everything else (keyfab-store); key material in it is encrypted
//! HOME/cluster.csr    written by init, for the root CA to sign
//! ```
//!
//! Which API for which job: [`Node::init`] creates a home and its CSR, [`Node::open`]
//! unlocks one, [`Node::install_cert`] installs the cluster certificate and issues the
//! node's own service certificates, [`Node::service_chain`] is what the node signs with.
//! The embedded store and the software keystore are built in; an etcd cluster or a
//! PKCS#11 token is reached through the [`Backends`] the program passes in.
#![forbid(unsafe_code)]

pub mod backends;
mod custody_choice;
mod error;
pub mod home;
mod node;
pub mod out_file;
mod store_choice;

pub use backends::{Backends, BuiltInOnly};
pub use custody_choice::{CustodyChoice, CUSTODY_FILE};
pub use error::{Code, Error, Result};
pub use node::{
    check_name, decode, decode_err, encode, Node, NodeKind, ServiceIdentity, CSR_FILE,
    KEYSTORE_FILE, STATE_FILE,
};
pub use store_choice::{EtcdTlsFiles, StoreChoice, STORE_FILE};

/// A Unix time as RFC 3339 (UTC), as every message and report gives times; the bare
/// number if it is outside what RFC 3339 can write.
pub fn rfc3339(t: i64) -> String {
    // RFC 5280's "no well-defined expiration" is past the last instant jiff represents
    // (it keeps a day's margin for offsets), so it is written out here.
    if t == keyfab_policy::certificate::NO_EXPIRY {
        return "9999-12-31T23:59:59Z".into();
    }
    jiff::Timestamp::from_second(t).map_or_else(|_| t.to_string(), |t| t.to_string())
}
