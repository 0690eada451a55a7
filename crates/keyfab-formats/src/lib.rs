//! Every byte that crosses a trust boundary: versioned, strict, verified before parsed.
//!
//! Which API for which job:
//! - a site's identity file: [`identity::write_identity`] / [`identity::verify_identity`];
//! - an entitlement: [`entitlement::EntitlementWriter`] streams one out;
//!   [`entitlement::verify_entitlement`] checks it in the order of DESIGN.md invariant 1
//!   and returns a [`Verified`] envelope, which [`entitlement::open_entitlement`] decrypts
//!   into its content and a stream of pool chunks.
//!
//! - quorum approvals: [`approval::ApprovalRequest`] (what the site asks),
//!   [`approval::sign_approval`] (what an approver returns), [`approval::verify_approval`].
//!
//! `docs/FORMATS.md` describes each format byte by byte.
#![forbid(unsafe_code)]

pub mod approval;
pub mod audit_bundle;
pub mod checkpoint;
pub mod chip;
pub mod cose;
pub mod entitlement;
pub mod identity;
pub mod prefix;
pub mod revocation;
mod signed_file;

use std::ops::Deref;

/// A value that only a verifier of this crate can construct: the engine cannot be handed
/// an unverified file by mistake.
#[derive(Debug)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self(inner)
    }
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Why a file was refused. Each variant maps to one stable error code (SPEC.md §4).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Malformed(String),
    #[error("signature does not verify: {0}")]
    BadSignature(String),
    #[error("signer is not trusted: {0}")]
    UntrustedSigner(String),
    #[error("not addressed to this site: {0}")]
    WrongRecipient(String),
    #[error("signer certificate has expired")]
    Expired,
    #[error("signer certificate is not yet valid")]
    NotYetValid,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("could not write: {0}")]
    Write(String),
}

impl FormatError {
    /// The stable error code (SPEC.md §4).
    pub fn code(&self) -> &'static str {
        match self {
            FormatError::Malformed(_) => "malformed",
            FormatError::BadSignature(_) => "bad_signature",
            FormatError::UntrustedSigner(_) => "untrusted_signer",
            FormatError::WrongRecipient(_) => "wrong_recipient",
            FormatError::Expired => "expired",
            FormatError::NotYetValid => "not_yet_valid",
            FormatError::Io(_) | FormatError::Write(_) => "io",
        }
    }

    pub(crate) fn from_chain(e: keyfab_crypto::CryptoError) -> Self {
        use keyfab_crypto::CryptoError as C;
        match e {
            C::Expired => FormatError::Expired,
            C::NotYetValid => FormatError::NotYetValid,
            other => FormatError::UntrustedSigner(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, FormatError>;

/// Strict CBOR decoding of a complete buffer: unknown fields, duplicate fields and
/// trailing bytes are refused.
pub(crate) fn cbor_exact<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    let mut reader = bytes;
    let v: T = ciborium::from_reader(&mut reader)
        .map_err(|e| FormatError::Malformed(format!("{what}: {e}")))?;
    if !reader.is_empty() {
        return Err(FormatError::Malformed(format!("{what}: trailing bytes")));
    }
    Ok(v)
}

pub(crate) fn cbor_encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| FormatError::Write(e.to_string()))?;
    Ok(out)
}
