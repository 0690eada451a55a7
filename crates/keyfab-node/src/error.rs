//! The engines' error. Each variant is one kind of failure and has its stable [`Code`]
//! (README.md, "Exit codes and error codes"), from which the CLI takes its exit code and
//! the station API its HTTP status. The kinds that are nobody's input — a stored state
//! that does not read back ([`Error::Corrupt`]) and a broken invariant ([`Error::Bug`])
//! — are told apart from what a user can fix, so a station gets a fixed message for them
//! and the site's log gets the detail.

pub use keyfab_code::Code;
use keyfab_custody::CustodyError;
use keyfab_formats::FormatError;

/// Everything an engine can answer instead of a result. Each variant has one stable
/// [`Code`] ([`Error::code`]); its message is for the operator and never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file was refused by verification (exit 4).
    #[error(transparent)]
    Verification(#[from] FormatError),
    /// A file that verified but was seen before, or an older one (exit 4).
    #[error("replayed: {0}")]
    Replayed(String),
    /// The keystore does not open: a wrong passphrase or PIN, or a modified keystore.
    #[error("state is locked: wrong passphrase, or the keystore was modified")]
    Locked,
    /// The keystore is sealed by shares and is not unsealed: too few shares, or one was
    /// refused.
    #[error("state is sealed: {0}")]
    Sealed(String),
    /// A provisioning request refused by the policy (exit 3).
    #[error("{message}")]
    Denied {
        /// Which refusal (`quota_exceeded`, `expired`, …).
        code: Code,
        /// What the policy said, for the operator.
        message: String,
    },
    /// The clock is behind the trusted-time high-water mark (exit 3; audited).
    #[error("clock rollback: the clock says {}, earlier than the site's trusted time {} by more than the tolerance (`keyfab site config --clock-tolerance`); set the clock right", crate::rfc3339(*observed), crate::rfc3339(*high_water))]
    ClockRollback {
        /// What the clock said (Unix seconds).
        observed: i64,
        /// The site's trusted time (Unix seconds).
        high_water: i64,
    },
    /// The clock is ahead of the trusted time by more than the site allows: not adopted
    /// (exit 3; audited).
    #[error("clock ahead: the clock says {}, more than {max_jump} s past the site's trusted time {}; it is not adopted, or one clock set ahead by mistake would stop this site until that time. Set the clock right; if it is right, allow the jump with `keyfab site config --clock-max-jump SECONDS`", crate::rfc3339(*observed), crate::rfc3339(*trusted))]
    ClockAhead {
        /// What the clock said (Unix seconds).
        observed: i64,
        /// The site's trusted time (Unix seconds).
        trusted: i64,
        /// How far ahead of it the clock may be, in seconds.
        max_jump: i64,
    },
    /// No entitlement of that id at this site (or HQ).
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
    /// A policy that does not validate.
    #[error("{0}")]
    InvalidPolicy(#[from] keyfab_policy::PolicyError),
    /// A file, home, site, station or record that is not there.
    #[error("{0}")]
    NotFound(String),
    /// The state does not allow this now: a step missing before it (no certificate
    /// installed, nothing imported yet) or done already (enrolled, activated, confirmed
    /// otherwise). Code `invalid_state`.
    #[error("{0}")]
    Precondition(String),
    /// The state changed under this command while it ran (another command, another
    /// node): nothing was changed; the same command again is safe.
    #[error("{0}")]
    Conflict(String),
    /// The stored state does not read back as keyfab wrote it: damaged or altered.
    #[error("the stored state is damaged: {0}")]
    Corrupt(String),
    /// An invariant of keyfab's own code does not hold: a bug, never a user's doing.
    #[error("internal error: {0}")]
    Bug(String),
    /// An error made elsewhere — another thread of a batch, the `site serve` answering
    /// over its admin socket — carried here with its code and message.
    #[error("{message}")]
    Relayed {
        /// The original error's code.
        code: Code,
        /// The original error's message.
        message: String,
    },
    /// Input from outside that is not what it must be (an id, a name, an argument).
    #[error("{0}")]
    InvalidInput(String),
    /// A home other users can enter: its secrets are not private (see `home`).
    #[error("{0}")]
    InsecureHome(String),
    /// Custody failed in a way that is not the operator's (code `internal`).
    #[error("{0}")]
    Custody(CustodyError),
    /// The store failed in a way that is not the operator's (code `internal`).
    #[error(transparent)]
    Store(keyfab_store::StoreError),
    /// The state store cannot be reached or kept changing under this node (an etcd
    /// cluster without a quorum, a member failing over, other nodes' commits). Nothing
    /// was released; the same request again is safe.
    #[error("the site's state store is unavailable, nothing was released; retry: {0}")]
    Unavailable(String),
    /// The site's rollback counter cannot be reached or does not answer as the site's
    /// (code `tpm_unavailable`): nothing is released until it does.
    #[error("the site's TPM rollback counter is unavailable, nothing was released: {0}")]
    TpmUnavailable(String),
    /// A commit was sent to the store and not confirmed: it may have been recorded. Code
    /// `unavailable` as well (retry), but never "nothing was released".
    #[error("the site's state store did not confirm whether it recorded this request ({0}); the outcome is unknown: retry with the same request id — if it was recorded, the retry gets the same answer, never a second one")]
    OutcomeUnknown(String),
    /// The home's embedded store is open in another process that does not lend it (a
    /// command still running; a running `site serve` lends it through `HOME/serve.sock`).
    #[error("this home's store is held by another keyfab process: a `keyfab site serve` (one serves a home at a time), or a command still running (try again when it ends)")]
    InUse,
    /// A primitive failed (code `internal`).
    #[error(transparent)]
    Crypto(#[from] keyfab_crypto::CryptoError),
    /// A file or directory could not be read or written (code `io`).
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
            // The operator names the token: a wrong name is their input to fix.
            e @ CustodyError::NoToken(_) => Error::InvalidInput(e.to_string()),
            // Locked, as a wrong passphrase is, but saying which secret was refused.
            e @ CustodyError::PinRefused => Error::Sealed(e.to_string()),
            other => Error::Custody(other),
        }
    }
}

impl Error {
    /// The stable error code.
    pub fn code(&self) -> Code {
        match self {
            Error::Verification(f) => f.code(),
            Error::Replayed(_) => Code::Replayed,
            Error::Locked | Error::Sealed(_) => Code::Locked,
            Error::Denied { code, .. } | Error::Relayed { code, .. } => *code,
            Error::ClockRollback { .. } => Code::ClockRollback,
            Error::ClockAhead { .. } => Code::ClockAhead,
            Error::UnknownEntitlement(_) => Code::UnknownEntitlement,
            Error::ApprovalInvalid(_) => Code::ApprovalInvalid,
            Error::RollbackDetected(_) => Code::RollbackDetected,
            Error::LogGap(_) => Code::LogGap,
            Error::LogBroken(_) => Code::LogBroken,
            Error::LogFork(_) => Code::LogFork,
            Error::InvalidPolicy(_) => Code::InvalidPolicy,
            Error::NotFound(_) => Code::NotFound,
            Error::Precondition(_) => Code::InvalidState,
            Error::Conflict(_) => Code::Conflict,
            Error::Corrupt(_) => Code::Corrupt,
            Error::InvalidInput(_) => Code::InvalidInput,
            Error::InsecureHome(_) => Code::InsecureHome,
            Error::Unavailable(_) | Error::OutcomeUnknown(_) => Code::Unavailable,
            Error::InUse => Code::InUse,
            Error::TpmUnavailable(_) => Code::TpmUnavailable,
            Error::Io(_) => Code::Io,
            Error::Bug(_) | Error::Custody(_) | Error::Store(_) | Error::Crypto(_) => {
                Code::Internal
            }
        }
    }

    /// The process exit code (README.md, "Exit codes and error codes"): the code's.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.code().exit_code())
    }

    /// The same error again, for a second receiver: its code and message (a batch
    /// that failed as a whole answers each request in it).
    pub fn relay(&self) -> Error {
        match self {
            Error::ClockRollback {
                observed,
                high_water,
            } => Error::ClockRollback {
                observed: *observed,
                high_water: *high_water,
            },
            Error::ClockAhead {
                observed,
                trusted,
                max_jump,
            } => Error::ClockAhead {
                observed: *observed,
                trusted: *trusted,
                max_jump: *max_jump,
            },
            Error::Unavailable(why) => Error::Unavailable(why.clone()),
            Error::OutcomeUnknown(why) => Error::OutcomeUnknown(why.clone()),
            e => Error::Relayed {
                code: e.code(),
                message: e.to_string(),
            },
        }
    }
}

/// A result whose error is an engine's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_the_store_did_not_confirm_is_retried_but_never_called_unreleased() {
        let unknown = Error::from(keyfab_store::StoreError::Indeterminate("timeout".into()));
        assert_eq!(unknown.code(), Code::Unavailable);
        assert_eq!(unknown.relay().code(), Code::Unavailable);
        assert!(unknown.relay().to_string().contains("outcome is unknown"));
        let says = unknown.to_string();
        assert!(says.contains("outcome is unknown"), "{says}");
        assert!(!says.contains("nothing was released"), "{says}");
        let down = Error::from(keyfab_store::StoreError::Io("no leader".into()));
        assert!(down.to_string().contains("nothing was released"));
    }
}
