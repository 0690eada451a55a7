//! keyfab's stable error codes, in one place.
//!
//! A [`Code`] is what a user, a script or a station sees when keyfab refuses or fails:
//! its name (`quota_exceeded`), the process exit code of the CLI (0 ok, 1 error, 2
//! usage, 3 refused by policy, 4 verification failed) and the HTTP status of the
//! station API. Every crate that reports an error names its code here, so the three
//! never disagree and a new code is added once.
//!
//! ```
//! use keyfab_code::Code;
//! assert_eq!(Code::QuotaExceeded.as_str(), "quota_exceeded");
//! assert_eq!(Code::QuotaExceeded.exit_code(), 3);
//! assert_eq!(Code::QuotaExceeded.http_status(), 403);
//! assert_eq!(Code::parse("quota_exceeded"), Some(Code::QuotaExceeded));
//! ```
#![forbid(unsafe_code)]

/// A stable error code (README.md, "Exit codes and error codes").
///
/// `expired` and `not_yet_valid` each name two codes: a file's signer certificate
/// outside its validity (verification, exit 4) and a provisioning request outside the
/// entitlement's window (refused by policy, exit 3). They are different variants so that
/// each keeps its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Code {
    // Exit 4: a file (or a request's signed part) refused by verification.
    /// Not a well-formed keyfab file: truncated, trailing bytes, unknown version, a
    /// field out of range, larger than its size cap.
    Malformed,
    /// A signature that does not verify over the bytes received.
    BadSignature,
    /// A signer whose chain does not lead to the root, or of the wrong role.
    UntrustedSigner,
    /// A file addressed to another node or key.
    WrongRecipient,
    /// A file that verified but was seen before, or an older one.
    Replayed,
    /// A file's signer certificate has expired.
    SignerExpired,
    /// A file's signer certificate is not valid yet.
    SignerNotYetValid,
    /// An approval that cannot count: unlisted key, bad signature, unknown or expired request.
    ApprovalInvalid,
    /// The site's log is behind, or disagrees with, what HQ acknowledged.
    RollbackDetected,
    /// The site's audit chain does not verify: it stopped releasing keys.
    LogBroken,
    /// An audit export skips records after the last one HQ accepted.
    LogGap,
    /// An audit export continues another history than the one HQ accepted.
    LogFork,

    // Exit 3: a provisioning request refused by the policy.
    /// The entitlement was revoked.
    Revoked,
    /// The entitlement needs its approvers' quorum first.
    ApprovalRequired,
    /// HQ has not acknowledged an audit export recently enough.
    AuditOverdue,
    /// The entitlement's window has not begun.
    NotYetValid,
    /// The entitlement's window has ended.
    Expired,
    /// A station the policy does not list, or not the one that made the request.
    StationNotAllowed,
    /// A device id that does not match the policy's pattern.
    DeviceIdRejected,
    /// The device has received its keys already.
    DeviceAlreadyProvisioned,
    /// The chip's certificate chain is missing where the policy requires one, or does
    /// not lead to a vendor root the policy names, or is outside its validity.
    ChipUntrusted,
    /// The chip's certified key is not the key the request presents (its transport key
    /// or its CSR's key), or keys would leave unsealed.
    ChipKeyMismatch,
    /// The device id is not the one the chip's certificate names.
    ChipBindingMismatch,
    /// The entitlement's devices are used up.
    QuotaExceeded,
    /// Today's devices are used up.
    DailyLimitExceeded,
    /// The entitlement's policy module refused.
    PolicyDenied,
    /// The policy module failed (trapped, out of fuel or memory): fail closed.
    PolicyError,
    /// An entitlement this site does not hold.
    UnknownEntitlement,
    /// The clock is behind the site's trusted time.
    ClockRollback,
    /// The clock is further ahead of the site's trusted time than allowed.
    ClockAhead,

    // Exit 2.
    /// The command line does not parse.
    Usage,

    // Exit 1.
    /// The state is not unsealed, or the passphrase is wrong.
    Locked,
    /// A policy file that does not validate.
    InvalidPolicy,
    /// An argument or a request field this command does not accept.
    InvalidInput,
    /// The state does not allow this now: a step missing before it (no certificate
    /// installed, nothing imported yet), or done already (enrolled, activated, a
    /// contradicting confirmation).
    InvalidState,
    /// The state changed under this command while it ran: nothing was changed, run it
    /// again.
    Conflict,
    /// The stored state does not read as keyfab wrote it: damaged or altered.
    Corrupt,
    /// A home other users can enter.
    InsecureHome,
    /// A case of `keyfab policy test` did not hold.
    PolicyTestFailed,
    /// The state store cannot be reached or did not confirm a commit: retry with the same
    /// request id.
    Unavailable,
    /// The home is open in another keyfab process.
    InUse,
    /// Nothing of that name.
    NotFound,
    /// A file that could not be read or written.
    Io,
    /// A bug in keyfab: it should never be seen.
    Internal,
    /// A station's requests in flight are at their bound (HTTP 429).
    Busy,
    /// A request took too long (HTTP 408).
    Timeout,
    /// No site answered a station.
    Unreachable,
    /// The TPM a site's rollback counter lives in is missing, does not answer, or does
    /// not hold the site's counter: nothing is released until it does.
    TpmUnavailable,
}

impl Code {
    /// Every code, in the order of the README's table.
    pub const ALL: [Code; 48] = [
        Code::Malformed,
        Code::BadSignature,
        Code::UntrustedSigner,
        Code::WrongRecipient,
        Code::Replayed,
        Code::SignerExpired,
        Code::SignerNotYetValid,
        Code::ApprovalInvalid,
        Code::RollbackDetected,
        Code::LogBroken,
        Code::LogGap,
        Code::LogFork,
        Code::Revoked,
        Code::ApprovalRequired,
        Code::AuditOverdue,
        Code::NotYetValid,
        Code::Expired,
        Code::StationNotAllowed,
        Code::DeviceIdRejected,
        Code::DeviceAlreadyProvisioned,
        Code::ChipUntrusted,
        Code::ChipKeyMismatch,
        Code::ChipBindingMismatch,
        Code::QuotaExceeded,
        Code::DailyLimitExceeded,
        Code::PolicyDenied,
        Code::PolicyError,
        Code::UnknownEntitlement,
        Code::ClockRollback,
        Code::ClockAhead,
        Code::Usage,
        Code::Locked,
        Code::InvalidPolicy,
        Code::InvalidInput,
        Code::InvalidState,
        Code::Conflict,
        Code::Corrupt,
        Code::InsecureHome,
        Code::PolicyTestFailed,
        Code::Unavailable,
        Code::InUse,
        Code::NotFound,
        Code::Io,
        Code::Internal,
        Code::Busy,
        Code::Timeout,
        Code::Unreachable,
        Code::TpmUnavailable,
    ];

    /// The code's name, as JSON `error.code` and the audit log carry it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Code::Malformed => "malformed",
            Code::BadSignature => "bad_signature",
            Code::UntrustedSigner => "untrusted_signer",
            Code::WrongRecipient => "wrong_recipient",
            Code::Replayed => "replayed",
            Code::SignerExpired | Code::Expired => "expired",
            Code::SignerNotYetValid | Code::NotYetValid => "not_yet_valid",
            Code::ApprovalInvalid => "approval_invalid",
            Code::RollbackDetected => "rollback_detected",
            Code::LogBroken => "log_broken",
            Code::LogGap => "log_gap",
            Code::LogFork => "log_fork",
            Code::Revoked => "revoked",
            Code::ApprovalRequired => "approval_required",
            Code::AuditOverdue => "audit_overdue",
            Code::StationNotAllowed => "station_not_allowed",
            Code::DeviceIdRejected => "device_id_rejected",
            Code::DeviceAlreadyProvisioned => "device_already_provisioned",
            Code::ChipUntrusted => "chip_untrusted",
            Code::ChipKeyMismatch => "chip_key_mismatch",
            Code::ChipBindingMismatch => "chip_binding_mismatch",
            Code::QuotaExceeded => "quota_exceeded",
            Code::DailyLimitExceeded => "daily_limit_exceeded",
            Code::PolicyDenied => "policy_denied",
            Code::PolicyError => "policy_error",
            Code::UnknownEntitlement => "unknown_entitlement",
            Code::ClockRollback => "clock_rollback",
            Code::ClockAhead => "clock_ahead",
            Code::Usage => "usage",
            Code::Locked => "locked",
            Code::InvalidPolicy => "invalid_policy",
            Code::InvalidInput => "invalid_input",
            Code::InvalidState => "invalid_state",
            Code::Conflict => "conflict",
            Code::Corrupt => "corrupt",
            Code::InsecureHome => "insecure_home",
            Code::PolicyTestFailed => "policy_test_failed",
            Code::Unavailable => "unavailable",
            Code::InUse => "in_use",
            Code::NotFound => "not_found",
            Code::Io => "io",
            Code::Internal => "internal",
            Code::Busy => "busy",
            Code::Timeout => "timeout",
            Code::Unreachable => "unreachable",
            Code::TpmUnavailable => "tpm_unavailable",
        }
    }

    /// The CLI's exit code: 4 verification failed, 3 refused by policy, 2 usage, 1
    /// any other error.
    pub const fn exit_code(self) -> u8 {
        match self {
            Code::Malformed
            | Code::BadSignature
            | Code::UntrustedSigner
            | Code::WrongRecipient
            | Code::Replayed
            | Code::SignerExpired
            | Code::SignerNotYetValid
            | Code::ApprovalInvalid
            | Code::RollbackDetected
            | Code::LogBroken
            | Code::LogGap
            | Code::LogFork => 4,
            Code::Revoked
            | Code::ApprovalRequired
            | Code::AuditOverdue
            | Code::NotYetValid
            | Code::Expired
            | Code::StationNotAllowed
            | Code::DeviceIdRejected
            | Code::DeviceAlreadyProvisioned
            | Code::ChipUntrusted
            | Code::ChipKeyMismatch
            | Code::ChipBindingMismatch
            | Code::QuotaExceeded
            | Code::DailyLimitExceeded
            | Code::PolicyDenied
            | Code::PolicyError
            | Code::UnknownEntitlement
            | Code::ClockRollback
            | Code::ClockAhead => 3,
            Code::Usage => 2,
            Code::Locked
            | Code::InvalidPolicy
            | Code::InvalidInput
            | Code::InvalidState
            | Code::Conflict
            | Code::Corrupt
            | Code::InsecureHome
            | Code::PolicyTestFailed
            | Code::Unavailable
            | Code::InUse
            | Code::NotFound
            | Code::Io
            | Code::Internal
            | Code::Busy
            | Code::Timeout
            | Code::Unreachable
            | Code::TpmUnavailable => 1,
        }
    }

    /// The station API's HTTP status for an answer with this code (docs/openapi.json).
    pub const fn http_status(self) -> u16 {
        match self {
            Code::UnknownEntitlement | Code::NotFound => 404,
            Code::Usage | Code::InvalidInput | Code::InvalidPolicy => 400,
            Code::InvalidState | Code::Conflict => 409,
            Code::Locked
            | Code::Unavailable
            | Code::InUse
            | Code::Unreachable
            | Code::TpmUnavailable => 503,
            Code::Busy => 429,
            Code::Timeout => 408,
            Code::Corrupt
            | Code::Internal
            | Code::Io
            | Code::InsecureHome
            | Code::PolicyTestFailed => 500,
            // A request refused by the policy, or by the site's clock.
            code if code.exit_code() == 3 => 403,
            // A signed part of the request refused by verification.
            _ => 400,
        }
    }

    /// Whether a station may send the same request again and hope for another answer
    /// (with the same request id, so that nothing is handed out twice).
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Code::Unavailable | Code::Conflict | Code::Busy | Code::Timeout | Code::Unreachable
        )
    }

    /// Whether an answer with this code keeps its detail in the site's log and tells a
    /// station only the code and a fixed message: the detail of a damaged store or of a
    /// bug is for the site's operators, not for a station.
    pub const fn is_private(self) -> bool {
        matches!(self, Code::Corrupt | Code::Internal | Code::Io)
    }

    /// The code named `name`. Where two codes share a name (`expired`,
    /// `not_yet_valid`), the provisioning refusal: the one a site sends a station.
    pub fn parse(name: &str) -> Option<Code> {
        Code::ALL.into_iter().rev().find(|c| c.as_str() == name)
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_a_code_with_that_name() {
        for code in Code::ALL {
            let parsed = Code::parse(code.as_str()).expect("parses");
            assert_eq!(parsed.as_str(), code.as_str());
        }
        assert_eq!(Code::parse("expired"), Some(Code::Expired));
        assert_eq!(Code::parse("not_yet_valid"), Some(Code::NotYetValid));
        assert_eq!(Code::parse("no_such_code"), None);
    }

    #[test]
    fn names_are_distinct_except_the_two_shared_ones() {
        let mut names: Vec<_> = Code::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        // expired and not_yet_valid.
        assert_eq!(before - names.len(), 2);
    }

    #[test]
    fn a_signer_outside_its_validity_is_verification_a_window_is_policy() {
        assert_eq!(Code::SignerExpired.exit_code(), 4);
        assert_eq!(Code::Expired.exit_code(), 3);
        assert_eq!(Code::Expired.http_status(), 403);
        assert_eq!(Code::SignerExpired.http_status(), 400);
    }

    #[test]
    fn the_status_follows_the_kind_not_the_exit_code() {
        assert_eq!(Code::UnknownEntitlement.http_status(), 404);
        assert_eq!(Code::Unavailable.http_status(), 503);
        assert_eq!(Code::Conflict.http_status(), 409);
        assert_eq!(Code::Corrupt.http_status(), 500);
        assert_eq!(Code::Malformed.http_status(), 400);
        assert!(Code::Corrupt.is_private() && Code::Internal.is_private());
        assert!(!Code::QuotaExceeded.is_private());
    }
}
