//! Custody of identity keys: sign, open HPKE and wrap data keys *by handle*. There is no
//! method that exports a private key.
//!
//! Which API for which job:
//! - the default custody, a file sealed under a passphrase: [`SoftwareKeystore::create`] /
//!   [`SoftwareKeystore::unlock`] (Argon2id → AES-256-GCM);
//! - engines use the [`Custody`] trait only, so a PKCS#11 token can stand in later.
//!
//! ```
//! use keyfab_custody::{Custody, SoftwareKeystore};
//! use keyfab_crypto::{rng::SystemRng, secret::SecretBytes};
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("keystore.kfs");
//! let pass = SecretBytes::new(b"correct horse".to_vec());
//! let mut ks = SoftwareKeystore::create(&path, &pass, &SystemRng).unwrap();
//! let public = ks.generate_signing_key("service-sign", &SystemRng).unwrap();
//! let sig = ks.signer("service-sign").unwrap().sign(b"hello").unwrap();
//! public.verify(b"hello", &sig).unwrap();
//! drop(ks);
//! let wrong = SecretBytes::new(b"wrong".to_vec());
//! assert!(matches!(SoftwareKeystore::unlock(&path, &wrong), Err(keyfab_custody::CustodyError::Locked)));
//! ```
#![forbid(unsafe_code)]

mod software;
pub mod unseal;

pub use software::SoftwareKeystore;

use keyfab_crypto::hpke::{HpkePublicKey, HpkeRecipient};
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::Secret32;
use keyfab_crypto::sign::{EcdsaSigner, VerifyingKey};

/// Why custody refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    /// Wrong passphrase, or the keystore was modified: indistinguishable on purpose.
    #[error("state is locked: wrong passphrase, or the keystore was modified")]
    Locked,
    /// No key under that handle.
    #[error("no key with handle '{0}' in custody")]
    NoSuchKey(String),
    /// A key under that handle exists already.
    #[error("a key with handle '{0}' already exists")]
    KeyExists(String),
    /// A keystore exists at that path already.
    #[error("keystore already exists at {0}")]
    AlreadyExists(String),
    /// A keystore or configuration that does not read back.
    #[error("keystore file is not a keyfab keystore: {0}")]
    Malformed(String),
    /// An unseal share that is malformed, not one of this keystore's, or given twice;
    /// or too few shares.
    #[error("unseal share refused: {0}")]
    ShareRefused(String),
    /// The PKCS#11 module or token failed, or is not configured as keyfab needs.
    #[error("token: {0}")]
    Token(String),
    /// No initialized token has the label asked for.
    #[error("no initialized PKCS#11 token labelled '{0}' in this module; create one first (SoftHSM2: `softhsm2-util --init-token --free --label {0} --so-pin SO-PIN --pin PIN`), or name the right label in token=")]
    NoToken(String),
    /// The token refused the user PIN.
    #[error("the token refused the login: wrong PIN (the PIN comes from KEYFAB_PASSPHRASE or --passphrase-file)")]
    PinRefused,
    /// A file that could not be read or written.
    #[error("keystore I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A key operation failed.
    #[error(transparent)]
    Crypto(#[from] keyfab_crypto::CryptoError),
}

/// A custody operation's result.
pub type Result<T> = std::result::Result<T, CustodyError>;

/// The key behind `handle` in a custody's keys, or [`CustodyError::NoSuchKey`].
pub fn key_by_handle<'a, T>(
    keys: &'a std::collections::BTreeMap<String, T>,
    handle: &str,
) -> Result<&'a T> {
    keys.get(handle)
        .ok_or_else(|| CustodyError::NoSuchKey(handle.to_owned()))
}

/// What engines may do with identity keys.
pub trait Custody: Send + Sync {
    /// The signer held under `handle`.
    fn signer(&self, handle: &str) -> Result<&dyn EcdsaSigner>;
    /// The HPKE recipient key held under `handle`.
    fn hpke(&self, handle: &str) -> Result<&dyn HpkeRecipient>;
    /// Makes a P-256 signing key under `handle`, kept here; returns its public key.
    fn generate_signing_key(&mut self, handle: &str, rng: &dyn SecureRng) -> Result<VerifyingKey>;
    /// Makes an HPKE key under `handle`, kept here; returns its public key.
    fn generate_hpke_key(&mut self, handle: &str, rng: &dyn SecureRng) -> Result<HpkePublicKey>;
    /// Encrypts a data key under the custody wrapping key, bound to `aad`.
    fn wrap_data_key(&self, dek: &Secret32, aad: &[u8], rng: &dyn SecureRng) -> Result<Vec<u8>>;
    /// Unwraps a data key wrapped by this custody's wrapping key (AES-GCM, `aad` bound).
    fn unwrap_data_key(&self, wrapped: &[u8], aad: &[u8]) -> Result<Secret32>;
}
