//! What HQ's replay of a site's log can find wrong: one kind per disagreement.

use keyfab_node::Code;

/// A violation's kind. Written in reports, JSON and HQ's store as its name
/// (`pool_key_reused`, or the policy code a release broke: `daily_limit_exceeded`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub enum ViolationKind {
    /// Keys released although the policy, replayed, refuses with this code.
    Broke(Code),
    /// A record names an entitlement HQ never issued to this site.
    UnknownEntitlement,
    /// A record's time is before its predecessor's (other than at a clock reset HQ issued).
    TimestampBackwards,
    /// An approval by a key the policy does not list.
    ApproverNotListed,
    /// An activation without the policy's quorum of approvals.
    ActivatedWithoutQuorum,
    /// An action carried out on a quorum (`raise-limit`) that the approvals the log keeps
    /// do not prove: too few distinct listed approvers, a bad signature, a request for
    /// something else, or an action the policy does not put to a quorum.
    QuorumNotProven,
    /// The site recorded a revocation HQ did not issue.
    RevokedWithoutRevocation,
    /// The site refused what the policy allows.
    DeniedButAllowed,
    /// A confirmation of a device that received no keys.
    ConfirmedWithoutRelease,
    /// A confirmation whose result is neither `programmed` nor `failed`.
    MalformedConfirmation,
    /// A clock reset HQ did not issue.
    ClockResetNotIssued,
    /// The policy module, replayed, refuses differently from what the site recorded.
    CodeReplayDiffers,
    /// A pool key HQ did not put in the entitlement (or a slot beyond it).
    PoolKeyNotIssued,
    /// One pool key handed out twice.
    PoolKeyReused,
    /// A chip attestation that no release of its request follows.
    ChipAttestation,
    /// The site's TPM rollback counter went back (or did not go up) from one record to a
    /// later one, in one export or across exports: a state put back.
    RollbackCounterRegressed,
}

impl ViolationKind {
    const NAMED: [ViolationKind; 15] = [
        ViolationKind::RollbackCounterRegressed,
        ViolationKind::UnknownEntitlement,
        ViolationKind::TimestampBackwards,
        ViolationKind::ApproverNotListed,
        ViolationKind::ActivatedWithoutQuorum,
        ViolationKind::QuorumNotProven,
        ViolationKind::RevokedWithoutRevocation,
        ViolationKind::DeniedButAllowed,
        ViolationKind::ConfirmedWithoutRelease,
        ViolationKind::MalformedConfirmation,
        ViolationKind::ClockResetNotIssued,
        ViolationKind::CodeReplayDiffers,
        ViolationKind::PoolKeyNotIssued,
        ViolationKind::PoolKeyReused,
        ViolationKind::ChipAttestation,
    ];

    /// The kind's name, as reports and the JSON give it.
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::Broke(code) => code.as_str(),
            ViolationKind::UnknownEntitlement => "unknown_entitlement",
            ViolationKind::TimestampBackwards => "timestamp_backwards",
            ViolationKind::ApproverNotListed => "approver_not_listed",
            ViolationKind::ActivatedWithoutQuorum => "activated_without_quorum",
            ViolationKind::QuorumNotProven => "quorum_not_proven",
            ViolationKind::RevokedWithoutRevocation => "revoked_without_revocation",
            ViolationKind::DeniedButAllowed => "denied_but_allowed",
            ViolationKind::ConfirmedWithoutRelease => "confirmed_without_release",
            ViolationKind::MalformedConfirmation => "malformed_confirmation",
            ViolationKind::ClockResetNotIssued => "clock_reset_not_issued",
            ViolationKind::CodeReplayDiffers => "code_replay_differs",
            ViolationKind::PoolKeyNotIssued => "pool_key_not_issued",
            ViolationKind::PoolKeyReused => "pool_key_reused",
            ViolationKind::ChipAttestation => "chip_attestation_unreleased",
            ViolationKind::RollbackCounterRegressed => "rollback_counter_regressed",
        }
    }

    /// The kind named `name`: a named kind first, then a policy code.
    pub fn parse(name: &str) -> Option<ViolationKind> {
        Self::NAMED
            .into_iter()
            .find(|k| k.as_str() == name)
            .or_else(|| Code::parse(name).map(ViolationKind::Broke))
    }
}

impl std::fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<ViolationKind> for String {
    fn from(k: ViolationKind) -> String {
        k.as_str().to_owned()
    }
}

impl TryFrom<String> for ViolationKind {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        ViolationKind::parse(&name).ok_or_else(|| format!("unknown violation kind '{name}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_name() {
        let broke = Code::ALL
            .into_iter()
            .filter(|c| c.exit_code() == 3)
            .map(ViolationKind::Broke);
        for kind in ViolationKind::NAMED.into_iter().chain(broke) {
            let back = ViolationKind::parse(kind.as_str()).expect("parses");
            assert_eq!(back.as_str(), kind.as_str());
        }
        assert_eq!(ViolationKind::parse("no_such_kind"), None);
    }
}
