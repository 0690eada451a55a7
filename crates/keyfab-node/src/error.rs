//! The engines' error: each variant carries its stable code (README.md, "Exit codes and error codes") and exit code.

use keyfab_custody::CustodyError;
use keyfab_formats::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file was refused by verification (exit 4).
    #[error(transparent)]
    Verification(#[from] FormatError),
    /// A file that verified but was seen before, or an older one (exit 4).
    #[error("replayed: {0}")]
    Replayed(String),
    #[error("state is locked: wrong passphrase, or the keystore was modified")]
    Locked,
    /// The keystore is sealed by shares and is not unsealed: too few shares, or one was
    /// refused.
    #[error("state is sealed: {0}")]
    Sealed(String),
    /// A provisioning request refused by the policy (exit 3).
    #[error("{message}")]
    Denied { code: &'static str, message: String },
    /// The clock is behind the trusted-time high-water mark (exit 3; audited).
    #[error("clock rollback: the clock says {}, earlier than the site's trusted time {} by more than the tolerance (`keyfab site config --clock-tolerance`); set the clock right", crate::rfc3339(*observed), crate::rfc3339(*high_water))]
    ClockRollback { observed: i64, high_water: i64 },
    /// The clock is ahead of the trusted time by more than the site allows: not adopted
    /// (exit 3; audited).
    #[error("clock ahead: the clock says {}, more than {max_jump} s past the site's trusted time {}; it is not adopted, or one clock set ahead by mistake would stop this site until that time. Set the clock right; if it is right, allow the jump with `keyfab site config --clock-max-jump SECONDS`", crate::rfc3339(*observed), crate::rfc3339(*trusted))]
    ClockAhead {
        observed: i64,
        trusted: i64,
        max_jump: i64,
    },
    #[error("unknown entitlement '{0}'")]
    UnknownEntitlement(String),
    /// An approval that cannot count: unlisted key, bad signature, unknown or expired
    /// request (exit 4).
    #[error("approval refused: {0}")]
    ApprovalInvalid(String),
    /// The site's log is behind, or disagrees with, what HQ acknowledged (exit 4).
    #[error("rollback detected: {0}")]
    RollbackDetected(String),
    /// The site's audit chain does not verify: it stopped itself (exit 4).
    #[error("log broken: {0}")]
    LogBroken(String),
    /// An audit bundle does not continue the site's last accepted export (exit 4).
    #[error("log gap: {0}")]
    LogGap(String),
    /// An audit bundle conflicts with a checkpoint HQ has accepted (exit 4).
    #[error("log fork: {0}")]
    LogFork(String),
    #[error("{0}")]
    InvalidPolicy(#[from] keyfab_policy::PolicyError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    InvalidInput(String),
    /// A home other users can enter: its secrets are not private (see `home`).
    #[error("{0}")]
    InsecureHome(String),
    #[error("{0}")]
    Custody(CustodyError),
    #[error(transparent)]
    Store(keyfab_store::StoreError),
    /// The state store cannot be reached or kept changing under this node (an etcd
    /// cluster without a quorum, a member failing over, other nodes' commits). Nothing
    /// was released; the same request again is safe.
    #[error("the site's state store is unavailable, nothing was released; retry: {0}")]
    Unavailable(String),
    /// A commit was sent to the store and not confirmed: it may have been recorded. Code
    /// `unavailable` as well (retry), but never "nothing was released".
    #[error("the site's state store did not confirm whether it recorded this request ({0}); the outcome is unknown: retry with the same request id — if it was recorded, the retry gets the same answer, never a second one")]
    OutcomeUnknown(String),
    /// The home's embedded store is open in another process: at a site, most often a
    /// running `keyfab site serve`.
    #[error("this home is in use by another keyfab process (a running `keyfab site serve`?); while it serves, `keyfab site station enroll|revoke|list` and `keyfab site unseal` reach it through HOME/serve.sock, other commands need it stopped")]
    InUse,
    #[error(transparent)]
    Crypto(#[from] keyfab_crypto::CryptoError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<keyfab_store::StoreError> for Error {
    fn from(e: keyfab_store::StoreError) -> Self {
        match e {
            keyfab_store::StoreError::Io(why) => Error::Unavailable(why),
            keyfab_store::StoreError::Indeterminate(why) => Error::OutcomeUnknown(why),
            keyfab_store::StoreError::Busy => Error::InUse,
            other => Error::Store(other),
        }
    }
}

impl From<CustodyError> for Error {
    fn from(e: CustodyError) -> Self {
        match e {
            CustodyError::Locked => Error::Locked,
            CustodyError::ShareRefused(why) => Error::Sealed(why),
            other => Error::Custody(other),
        }
    }
}

impl Error {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Verification(f) => f.code(),
            Error::Replayed(_) => "replayed",
            Error::Locked | Error::Sealed(_) => "locked",
            Error::Denied { code, .. } => code,
            Error::ClockRollback { .. } => "clock_rollback",
            Error::ClockAhead { .. } => "clock_ahead",
            Error::UnknownEntitlement(_) => "unknown_entitlement",
            Error::ApprovalInvalid(_) => "approval_invalid",
            Error::RollbackDetected(_) => "rollback_detected",
            Error::LogGap(_) => "log_gap",
            Error::LogBroken(_) => "log_broken",
            Error::LogFork(_) => "log_fork",
            Error::InvalidPolicy(_) => "invalid_policy",
            Error::NotFound(_) => "not_found",
            Error::InvalidState(_) => "invalid_state",
            Error::InvalidInput(_) => "invalid_input",
            Error::InsecureHome(_) => "insecure_home",
            Error::Unavailable(_) | Error::OutcomeUnknown(_) => "unavailable",
            Error::InUse => "in_use",
            Error::Custody(_) | Error::Store(_) | Error::Crypto(_) | Error::Io(_) => "internal",
        }
    }

    /// The process exit code (README.md, "Exit codes and error codes"): 4 for refused files, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Verification(FormatError::Io(_) | FormatError::Write(_)) => 1,
            Error::Verification(_)
            | Error::Replayed(_)
            | Error::ApprovalInvalid(_)
            | Error::RollbackDetected(_)
            | Error::LogBroken(_)
            | Error::LogGap(_)
            | Error::LogFork(_) => 4,
            Error::Denied { .. }
            | Error::ClockRollback { .. }
            | Error::ClockAhead { .. }
            | Error::UnknownEntitlement(_) => 3,
            _ => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_the_store_did_not_confirm_is_retried_but_never_called_unreleased() {
        let unknown = Error::from(keyfab_store::StoreError::Indeterminate("timeout".into()));
        assert_eq!(unknown.code(), "unavailable");
        let says = unknown.to_string();
        assert!(says.contains("outcome is unknown"), "{says}");
        assert!(!says.contains("nothing was released"), "{says}");
        let down = Error::from(keyfab_store::StoreError::Io("no leader".into()));
        assert!(down.to_string().contains("nothing was released"));
    }
}
