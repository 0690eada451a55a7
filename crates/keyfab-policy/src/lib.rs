//! The entitlement policy: its model, and the validation that refuses every impossible or
//! unknown field with a message that names it.
//!
//! Which API for which job:
//! - an author's `policy.toml` → [`PolicyDraft::parse`], then [`PolicyDraft::finish`] with
//!   the approver public keys the caller read from the listed files;
//! - the policy as it travels inside an entitlement → [`Policy`] (plain data, serialized
//!   by `keyfab-formats`), re-checked with [`Policy::validate`] after import.
//!
//! - a decision → [`CompiledPolicy::decide`] (and [`CompiledPolicy::day_of`] for the daily
//!   counter's key).
//!
//! This crate is pure: no I/O, no clock. HQ re-runs exactly this code.
//!
//! ```
//! let draft = keyfab_policy::PolicyDraft::parse(r#"
//! product = "thermostat-v2"
//! devices = 1000
//! valid_from = "2026-11-25T00:00:00Z"
//! valid_until = "2027-02-01T00:00:00Z"
//! [limits]
//! daily = 200
//! timezone = "Asia/Shanghai"
//! [[keys]]
//! name = "identity"
//! type = "ec-p256"
//! source = "hq-pool"
//! "#).unwrap();
//! let policy = draft.finish(vec![]).unwrap();
//! assert_eq!(policy.daily_limit, Some(200));
//! // No [approval] section: nobody can approve anything (fail closed).
//! assert_eq!(policy.approval_threshold(), u32::MAX);
//! ```
#![forbid(unsafe_code)]

pub mod certificate;
mod decide;
pub mod glance;
pub mod ids;
mod model;
mod raise;
mod toml_form;

pub use certificate::{CertificateTemplate, Lifetime, MAX_CERT_DAYS};
pub use decide::{
    Chip, ChipFacts, CompiledPolicy, DaySpan, Decision, DenyCode, EntitlementState,
    EntitlementStatus, Request,
};
pub use ids::{
    id_shape_ok, DeviceId, EntitlementId, IdError, RequestId, SiteName, StationName, MAX_ID_BYTES,
};
pub use keyfab_code::Code;
pub use model::*;
pub use raise::{lifted, raised_on, Raise, MAX_RAISE_DAYS};
pub use toml_form::PolicyDraft;

/// A Unix time as RFC 3339 (UTC), as every message and report gives times; the bare
/// number if it is outside what RFC 3339 can write.
pub fn rfc3339(t: i64) -> String {
    // RFC 5280's "no well-defined expiration" is past the last instant jiff represents
    // (it keeps a day's margin for offsets), so it is written out here.
    if t == certificate::NO_EXPIRY {
        return "9999-12-31T23:59:59Z".into();
    }
    jiff::Timestamp::from_second(t).map_or_else(|_| t.to_string(), |t| t.to_string())
}

/// A refused policy: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy field `{field}`: {message}")]
pub struct PolicyError {
    /// The field, as the policy file names it (`keys[0].type`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl PolicyError {
    /// A refusal of `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}
