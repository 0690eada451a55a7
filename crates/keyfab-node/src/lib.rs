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
pub mod socket_store;
mod store_choice;

pub use backends::{Backends, BuiltInOnly};
pub use custody_choice::{CustodyChoice, CUSTODY_FILE};
pub use error::{Code, Error, Result};
pub use node::{
    check_name, decode, decode_err, encode, Node, NodeKind, ServiceIdentity, CSR_FILE,
    KEYSTORE_FILE, STATE_FILE,
};
pub use store_choice::{EtcdTlsFiles, StoreChoice, STORE_FILE};

pub use keyfab_policy::rfc3339;
