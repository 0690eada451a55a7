//! The one place keyfab calls cryptographic primitives.
//!
//! Which API for which job:
//! - sign and verify service messages: [`sign::SigningKey`], [`sign::VerifyingKey`] (ECDSA P-256);
//! - encrypt to a recipient: [`hpke::seal_context`] / [`hpke::open_context`] (RFC 9180,
//!   DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM), used as a chunked stream; one
//!   implementation on aws-lc for keys held here and for keys in a PKCS#11 token
//!   ([`hpke::open_context_with_dh`]);
//! - encrypt at rest: [`aead::seal_random_nonce`] / [`aead::open_random_nonce`], or
//!   [`aead::AeadKey`] with a nonce of the caller's (AES-256-GCM);
//! - derive a key from a passphrase: [`kdf::argon2id`];
//! - certificates: [`x509`] builds and validates the keyfab PKI;
//! - device key material: [`devicekey`] generates pool keys as 32-byte secrets;
//! - randomness and time come in through [`rng::SecureRng`] and [`time::Clock`] so tests are
//!   deterministic.
//!
//! Secret bytes live in [`secret::SecretBytes`] / [`secret::Secret32`]: wiped on drop and
//! never printed.
//!
//! ```
//! use keyfab_crypto::{rng::SystemRng, sign::SigningKey};
//! let key = SigningKey::generate(&SystemRng).unwrap();
//! let sig = key.sign(b"keyfab-example-v1 hello").unwrap();
//! key.verifying_key().verify(b"keyfab-example-v1 hello", &sig).unwrap();
//! ```
#![forbid(unsafe_code)]

#[cfg(feature = "full")]
pub mod aead;
#[cfg(feature = "full")]
pub mod devicekey;
pub mod hash;
#[cfg(feature = "full")]
pub mod hpke;
#[cfg(feature = "full")]
mod hpke_schedule;
#[cfg(feature = "full")]
pub mod kdf;
pub mod rng;
pub mod secret;
#[cfg(feature = "full")]
pub mod sign;
pub mod time;
#[cfg(feature = "full")]
pub mod x509;

/// Everything that can go wrong inside a primitive. Deliberately coarse: a caller learns
/// *that* a check failed, never secret-dependent detail.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A signature that does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// Decryption failed: a wrong key, or modified data.
    #[error("decryption failed (wrong key, or the data was modified)")]
    DecryptFailed,
    /// Key bytes that are not a key of the expected kind.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// A certificate could not be made from these inputs.
    #[error("certificate could not be built: {0}")]
    CertificateBuild(String),
    /// Certificate bytes that do not parse.
    #[error("certificate is malformed: {0}")]
    CertificateMalformed(String),
    /// A chain that does not lead to the trusted root, or not for this role.
    #[error("certificate chain is not trusted: {0}")]
    Untrusted(String),
    /// A certificate past its notAfter.
    #[error("certificate has expired")]
    Expired,
    /// A certificate before its notBefore.
    #[error("certificate is not yet valid")]
    NotYetValid,
    /// The library failed in a way the caller cannot act on.
    #[error("internal cryptographic failure")]
    Internal,
}

/// A result whose error is a [`CryptoError`].
pub type Result<T> = std::result::Result<T, CryptoError>;
