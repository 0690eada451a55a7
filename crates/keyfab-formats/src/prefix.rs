//! The 8 bytes at the front of every keyfab file: `"KEYFAB"`, a kind letter, a version.
//! An unknown version is reported as such, never as corruption.

use crate::Malformed;
use crate::{FormatError, Result};

/// The first six bytes of every keyfab file.
pub const MAGIC: &[u8; 6] = b"KEYFAB";
/// The prefix's length: magic, kind, version.
pub const LEN: usize = 8;

/// Which file a prefix announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A site identity (`.kfi`).
    Identity,
    /// An entitlement (`.kfe`).
    Entitlement,
    /// An approval request.
    ApprovalRequest,
    /// An approval.
    Approval,
    /// A revocation (`.kfr`).
    Revocation,
    /// A checkpoint.
    Checkpoint,
    /// A receipt (`.kfk`).
    Receipt,
    /// An audit bundle (`.kfa`).
    AuditBundle,
    /// An unseal share sealed to its holder (`.kfs`).
    SealedShare,
}

impl Kind {
    fn letter(self) -> u8 {
        match self {
            Kind::Identity => b'I',
            Kind::Entitlement => b'E',
            Kind::ApprovalRequest => b'Q',
            Kind::Approval => b'P',
            Kind::Revocation => b'R',
            Kind::Checkpoint => b'C',
            Kind::Receipt => b'K',
            Kind::AuditBundle => b'A',
            Kind::SealedShare => b'S',
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Identity => "site identity (.kfi)",
            Kind::Entitlement => "entitlement (.kfe)",
            Kind::ApprovalRequest => "approval request",
            Kind::Approval => "approval",
            Kind::Revocation => "revocation (.kfr)",
            Kind::Checkpoint => "audit checkpoint",
            Kind::Receipt => "receipt (.kfk)",
            Kind::AuditBundle => "audit bundle (.kfa)",
            Kind::SealedShare => "sealed unseal share (.kfs)",
        }
    }
}

/// The prefix of a file of `kind`, `version`.
pub fn encode(kind: Kind, version: u8) -> [u8; LEN] {
    let mut p = [0u8; LEN];
    p[..6].copy_from_slice(MAGIC);
    p[6] = kind.letter();
    p[7] = version;
    p
}

/// The kind of a keyfab file from its prefix, if it is one.
pub fn kind_of(bytes: &[u8]) -> Option<Kind> {
    if bytes.len() < LEN || &bytes[..6] != MAGIC {
        return None;
    }
    [
        Kind::Identity,
        Kind::Entitlement,
        Kind::ApprovalRequest,
        Kind::Approval,
        Kind::Revocation,
        Kind::Checkpoint,
        Kind::Receipt,
        Kind::AuditBundle,
        Kind::SealedShare,
    ]
    .into_iter()
    .find(|k| k.letter() == bytes[6])
}

/// Checks the prefix of `bytes` for `kind` at `version`.
pub fn check(bytes: &[u8], kind: Kind, version: u8) -> Result<()> {
    if bytes.len() < LEN || &bytes[..6] != MAGIC {
        return Err(FormatError::malformed(
            Malformed::NotKeyfab,
            format!("not a keyfab {}", kind.name()),
        ));
    }
    if bytes[6] != kind.letter() {
        return Err(FormatError::malformed(
            Malformed::NotKeyfab,
            format!(
                "not a keyfab {} (kind byte '{}')",
                kind.name(),
                bytes[6].escape_ascii()
            ),
        ));
    }
    if bytes[7] != version {
        return Err(FormatError::malformed(
            Malformed::UnsupportedVersion,
            format!(
                "unsupported version v{} of {} (this keyfab reads v{version})",
                bytes[7],
                kind.name()
            ),
        ));
    }
    Ok(())
}
