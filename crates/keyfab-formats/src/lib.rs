//! Every byte that crosses a trust boundary: versioned, strict, verified before parsed.
//!
//! Which API for which job:
//! - a site's identity file: [`identity::write_identity`] / [`identity::verify_identity`];
//! - an entitlement: [`entitlement::write_entitlement`] streams one out;
//!   [`entitlement::verify_entitlement`] checks it in the verification order of docs/FORMATS.md
//!   and returns a [`Verified`] envelope, which [`entitlement::open_entitlement`] decrypts
//!   into its content and a stream of pool chunks.
//!
//! - quorum approvals: [`approval::ApprovalRequest`] (what the site asks),
//!   [`approval::sign_approval`] (what an approver returns), [`approval::verify_approval`].
//!
//! `docs/FORMATS.md` describes each format byte by byte.
#![forbid(unsafe_code)]

pub mod approval;
pub mod attestation;
pub mod audit_bundle;
pub mod checkpoint;
pub mod chip;
pub mod cose;
pub mod device_profile;
pub mod entitlement;
pub mod identity;
pub mod prefix;
pub mod revocation;
pub mod sealed_share;
mod signed_file;
mod verified;

pub use signed_file::{Output, Source, Spool};
pub use verified::Verified;

pub use keyfab_code::Code;

/// The size cap of inputs without a format of their own that a command reads whole: a
/// CSR, a PEM key or certificate, a passphrase or share file.
pub const MAX_SMALL_INPUT: usize = 64 * 1024;

/// Why a file was refused. Each variant maps to one stable error code (README.md, "Exit codes and error codes").
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not a well-formed file of its kind; `kind` says which defect.
    #[error("{detail}")]
    Malformed {
        /// Which defect.
        kind: Malformed,
        /// Where and what, for the operator.
        detail: String,
    },
    /// The signature does not verify over the exact bytes.
    #[error("signature does not verify: {0}")]
    BadSignature(String),
    /// The signer's chain does not lead to the root, or not for this role.
    #[error("signer is not trusted: {0}")]
    UntrustedSigner(String),
    /// Addressed to another site or key.
    #[error("not addressed to this site: {0}")]
    WrongRecipient(String),
    /// The signer's certificate has expired.
    #[error("signer certificate has expired")]
    Expired,
    /// The signer's certificate is not yet valid.
    #[error("signer certificate is not yet valid")]
    NotYetValid,
    /// The file could not be read or written.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The output could not be written.
    #[error("could not write: {0}")]
    Write(String),
}

/// Which defect made a file malformed: one kind per defect, so a caller (or a test
/// vector) can tell a truncated file from one written by a newer keyfab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Larger than its kind's size cap.
    TooLarge,
    /// Ends before its stated length, or mid-item.
    Truncated,
    /// Bytes after the end of what the file states.
    TrailingBytes,
    /// Not a keyfab file of the expected kind (magic or kind byte).
    NotKeyfab,
    /// A version of the format this keyfab does not read.
    UnsupportedVersion,
    /// Not the strict encoding: bad CBOR or COSE, a non-canonical form, text not UTF-8.
    Encoding,
    /// Well-encoded, but a field is out of range or contradicts another.
    Field,
    /// An authenticated part that does not decrypt for this recipient.
    Undecryptable,
}

impl Malformed {
    /// The kind's name, as the test vector list writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Malformed::TooLarge => "too_large",
            Malformed::Truncated => "truncated",
            Malformed::TrailingBytes => "trailing_bytes",
            Malformed::NotKeyfab => "not_keyfab",
            Malformed::UnsupportedVersion => "unsupported_version",
            Malformed::Encoding => "encoding",
            Malformed::Field => "field",
            Malformed::Undecryptable => "undecryptable",
        }
    }
}

/// The contents of `path` if it holds at most `cap` bytes; larger is `malformed`. Reads at
/// most `cap + 1` bytes whatever the file claims to be, so a huge file, a device such as
/// `/dev/zero` or an endless pipe costs bounded memory and time (the size cap comes first in
/// the verification order of docs/FORMATS.md).
pub fn read_capped(path: &std::path::Path, cap: usize) -> Result<Vec<u8>> {
    read_capped_from(std::fs::File::open(path)?, cap)
}

/// [`read_capped`] of a text file: bytes that are not UTF-8 are `malformed` too.
pub fn read_capped_text(path: &std::path::Path, cap: usize) -> Result<String> {
    String::from_utf8(read_capped(path, cap)?).map_err(|e| {
        FormatError::malformed(
            Malformed::Encoding,
            format!(
                "not UTF-8 text (byte {} is not)",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// [`read_capped`] from any reader (standard input, a socket).
pub fn read_capped_from(reader: impl std::io::Read, cap: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    reader.take(cap as u64 + 1).read_to_end(&mut out)?;
    if out.len() > cap {
        return Err(FormatError::malformed(
            Malformed::TooLarge,
            format!("larger than the size cap of {cap} bytes"),
        ));
    }
    Ok(out)
}

impl FormatError {
    /// A malformed file: the defect's kind and what, in words.
    pub fn malformed(kind: Malformed, detail: impl Into<String>) -> Self {
        FormatError::Malformed {
            kind,
            detail: detail.into(),
        }
    }

    /// The stable error code (README.md, "Exit codes and error codes").
    pub fn code(&self) -> Code {
        match self {
            FormatError::Malformed { .. } => Code::Malformed,
            FormatError::BadSignature(_) => Code::BadSignature,
            FormatError::UntrustedSigner(_) => Code::UntrustedSigner,
            FormatError::WrongRecipient(_) => Code::WrongRecipient,
            FormatError::Expired => Code::SignerExpired,
            FormatError::NotYetValid => Code::SignerNotYetValid,
            FormatError::Io(_) | FormatError::Write(_) => Code::Io,
        }
    }

    /// The defect's kind, if the file is malformed.
    pub fn malformed_kind(&self) -> Option<Malformed> {
        match self {
            FormatError::Malformed { kind, .. } => Some(*kind),
            _ => None,
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

/// A result whose error is a [`FormatError`].
pub type Result<T> = std::result::Result<T, FormatError>;

/// Strict CBOR decoding of a complete buffer: unknown fields, duplicate fields and
/// trailing bytes are refused.
pub(crate) fn cbor_exact<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    let mut reader = bytes;
    let v: T = ciborium::from_reader(&mut reader).map_err(|e| {
        let kind = match e {
            ciborium::de::Error::Io(_) => Malformed::Truncated,
            _ => Malformed::Encoding,
        };
        FormatError::malformed(kind, format!("{what}: {e}"))
    })?;
    if !reader.is_empty() {
        return Err(FormatError::malformed(
            Malformed::TrailingBytes,
            format!("{what}: trailing bytes"),
        ));
    }
    Ok(v)
}

pub(crate) fn cbor_encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| FormatError::Write(e.to_string()))?;
    Ok(out)
}
