//! The decision: may this device be provisioned now? Pure — no I/O, no clock of its own:
//! the site runs it inside decide-and-record, and HQ re-runs it over the audit log.

use crate::model::Policy;
use crate::PolicyError;
use keyfab_code::Code;

/// Why a request is refused. Each has a stable code (README.md, "Exit codes and error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyCode {
    /// HQ revoked the entitlement.
    Revoked,
    /// The entitlement needs its approval quorum first.
    ApprovalRequired,
    /// HQ has not acknowledged this site's audit for longer than the policy allows.
    AuditOverdue,
    /// Before `valid_from`.
    NotYetValid,
    /// From `valid_until` on.
    Expired,
    /// The station is not among `allowed_stations`.
    StationNotAllowed,
    /// The device id does not match `device_id_pattern`.
    DeviceIdRejected,
    /// The device already has its keys under this entitlement.
    DeviceAlreadyProvisioned,
    /// No chip certificate chain where the policy requires one, or one that does not
    /// verify to the policy's vendor roots or is outside its validity.
    ChipUntrusted,
    /// The chip's certified key is not every key the request presents as the chip's, or
    /// the request would have keys leave unsealed.
    ChipKeyMismatch,
    /// The device id is not where `device_id_from` says the chip certificate names it.
    ChipBindingMismatch,
    /// The quota (`devices`) is used up.
    QuotaExceeded,
    /// Today's share (`daily_limit`) is used up.
    DailyLimitExceeded,
    /// The entitlement's policy module refused.
    PolicyDenied,
    /// The policy module failed (trapped, ran out of fuel or memory): fail closed.
    PolicyError,
}

impl DenyCode {
    /// Whether the refusal can pass with time or state — the next day, an approval, a
    /// receipt, a quota given back —, so a retry of its request is decided again
    /// rather than answered from the record. The others are final for their request:
    /// the device id, the station, the device's keys and the policy module's verdict
    /// do not change for it.
    pub const fn passes(self) -> bool {
        matches!(
            self,
            DenyCode::QuotaExceeded
                | DenyCode::DailyLimitExceeded
                | DenyCode::NotYetValid
                | DenyCode::Expired
                | DenyCode::ApprovalRequired
                | DenyCode::AuditOverdue
        )
    }

    /// The stable code of this refusal.
    pub const fn code(self) -> Code {
        match self {
            DenyCode::Revoked => Code::Revoked,
            DenyCode::ApprovalRequired => Code::ApprovalRequired,
            DenyCode::AuditOverdue => Code::AuditOverdue,
            DenyCode::NotYetValid => Code::NotYetValid,
            DenyCode::Expired => Code::Expired,
            DenyCode::StationNotAllowed => Code::StationNotAllowed,
            DenyCode::DeviceIdRejected => Code::DeviceIdRejected,
            DenyCode::DeviceAlreadyProvisioned => Code::DeviceAlreadyProvisioned,
            DenyCode::ChipUntrusted => Code::ChipUntrusted,
            DenyCode::ChipKeyMismatch => Code::ChipKeyMismatch,
            DenyCode::ChipBindingMismatch => Code::ChipBindingMismatch,
            DenyCode::QuotaExceeded => Code::QuotaExceeded,
            DenyCode::DailyLimitExceeded => Code::DailyLimitExceeded,
            DenyCode::PolicyDenied => Code::PolicyDenied,
            DenyCode::PolicyError => Code::PolicyError,
        }
    }
}

impl From<DenyCode> for Code {
    fn from(d: DenyCode) -> Code {
        d.code()
    }
}

/// The built-in rules' answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The device may have its keys.
    Allow,
    /// Refused, for this reason.
    Deny(DenyCode),
}

/// What the site knows about an entitlement at decision time (read in the same
/// transaction that records the decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntitlementState {
    /// HQ revoked the entitlement.
    pub revoked: bool,
    /// The approval quorum for `activate` has been met (irrelevant if none is required).
    pub activated: bool,
    /// Unix seconds of the freshest HQ acknowledgment of this site's audit (an entitlement
    /// issued by HQ counts as one).
    pub last_acknowledged: i64,
    /// Devices allowed so far under this entitlement.
    pub total: u64,
    /// Devices allowed so far on the calendar day of `now` in the policy's time zone.
    pub today: u64,
    /// The daily limit a quorum approved for that day (`raise-limit`,
    /// [`crate::raised_on`]), if any: in force where it is above the policy's.
    pub raised_daily: Option<u64>,
}

/// One calendar day of a policy's time zone: its name and the Unix seconds it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaySpan {
    /// `YYYY-MM-DD`, the key of the daily counter.
    pub day: String,
    /// The first second of the day.
    pub start: i64,
    /// The first second of the next day.
    pub end: i64,
}

impl DaySpan {
    /// Whether `time` falls on this day.
    pub fn contains(&self, time: i64) -> bool {
        (self.start..self.end).contains(&time)
    }
}

/// What the built-in rules look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The device id the station sent.
    pub device_id: &'a str,
    /// The station that asks, when known.
    pub station: Option<&'a str>,
    /// The device already received keys under this entitlement.
    pub already_provisioned: bool,
    /// What the request proves of its chip.
    pub chip: Chip<'a>,
}

impl<'a> Request<'a> {
    /// A request that sends no chip certificate chain.
    pub fn new(device_id: &'a str, station: Option<&'a str>, already_provisioned: bool) -> Self {
        Self {
            device_id,
            station,
            already_provisioned,
            chip: Chip::Absent,
        }
    }
}

/// A request's chip certificate chain, as the cryptography found it.
#[derive(Debug, Clone, Copy)]
pub enum Chip<'a> {
    /// No chain sent.
    Absent,
    /// A chain that does not lead to one of the policy's vendor roots: malformed, a bad
    /// signature, a CA as the leaf, another vendor.
    Untrusted,
    /// A chain that leads to a vendor root: what its leaf certifies.
    Verified(&'a ChipFacts),
    /// The chip rules are taken as passed: HQ replaying a refusal the site gave for
    /// another reason, whose chain the log does not keep (a refusal releases nothing).
    Assumed,
}

/// What a verified chip certificate says, and the keys its request presents as the
/// chip's: all the rules need to decide, so that the site and HQ's replay decide alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChipFacts {
    /// `spki-sha256:<hex>` of the key the leaf certifies.
    pub key_id: String,
    /// The latest start of validity of the chain's certificates (Unix seconds).
    pub not_before: i64,
    /// The earliest end of validity of the chain's certificates (Unix seconds).
    pub not_after: i64,
    /// The leaf subject's commonName.
    pub subject_cn: Option<String>,
    /// The leaf subject's serialNumber attribute.
    pub subject_serial: Option<String>,
    /// The leaf's subjectAltName URIs.
    pub san_uris: Vec<String>,
    /// `spki-sha256:<hex>` of the transport key the request sent, if any.
    pub transport_key: Option<String>,
    /// `spki-sha256:<hex>` of the key of the CSR the request sent, if any.
    pub csr_key: Option<String>,
}

/// A policy prepared for deciding many requests: the device id pattern compiled once and
/// the time zone resolved once.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// The policy as signed.
    pub policy: Policy,
    pattern: Option<regex::Regex>,
    tz: jiff::tz::TimeZone,
    /// What the certificate profiles need of a device id that goes into a name.
    names: crate::certificate::IdInNames,
}

impl CompiledPolicy {
    /// Validates `policy` and compiles its pattern and time zone.
    pub fn new(policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        let pattern = policy
            .device_id_pattern
            .as_deref()
            .map(crate::model::compile_pattern)
            .transpose()?;
        let tz = jiff::tz::TimeZone::get(&policy.timezone)
            .map_err(|e| PolicyError::new("limits.timezone", e.to_string()))?;
        let names = crate::certificate::IdInNames::of(&policy);
        Ok(Self {
            policy,
            pattern,
            tz,
            names,
        })
    }

    /// The calendar day of `now` in the policy's time zone, as `YYYY-MM-DD`: the key of
    /// the daily counter. Days follow the zone's civil calendar, so DST changes make a
    /// day 23 or 25 hours long, never shift its boundary.
    pub fn day_of(&self, now: i64) -> String {
        match jiff::Timestamp::from_second(now) {
            Ok(t) => t.to_zoned(self.tz.clone()).date().to_string(),
            // Outside jiff's range (years beyond ±9999): one bucket per extreme.
            Err(_) if now < 0 => "-9999-01-01".to_owned(),
            Err(_) => "9999-12-31".to_owned(),
        }
    }

    /// The calendar day of `now` (as [`CompiledPolicy::day_of`] names it) and the Unix
    /// seconds `[start, end)` it covers, so that a caller deciding many requests can reuse
    /// the day's name for every time inside it instead of converting each one.
    pub fn day_span(&self, now: i64) -> DaySpan {
        let span = jiff::Timestamp::from_second(now).ok().and_then(|t| {
            let zoned = t.to_zoned(self.tz.clone());
            let start = zoned.start_of_day().ok()?.timestamp().as_second();
            let end = zoned
                .tomorrow()
                .ok()?
                .start_of_day()
                .ok()?
                .timestamp()
                .as_second();
            Some(DaySpan {
                day: zoned.date().to_string(),
                start,
                end,
            })
        });
        // At the ends of jiff's range: a span of one second, named as day_of names it.
        span.unwrap_or_else(|| DaySpan {
            day: self.day_of(now),
            start: now,
            end: now.saturating_add(1),
        })
    }

    /// The civil clock of `now` in the policy's time zone, as a policy module reads it:
    /// days since 1970-01-01 of the local date, and wall-clock seconds since local
    /// midnight.
    pub fn local_clock(&self, now: i64) -> (i64, i64) {
        let Ok(t) = jiff::Timestamp::from_second(now) else {
            return (now.div_euclid(86_400), now.rem_euclid(86_400));
        };
        let zoned = t.to_zoned(self.tz.clone());
        let date = zoned.date();
        let day = date
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map_or(now.div_euclid(86_400), |z| {
                z.timestamp().as_second().div_euclid(86_400)
            });
        let time = zoned.time();
        let second = i64::from(time.hour()) * 3600
            + i64::from(time.minute()) * 60
            + i64::from(time.second());
        (day, second)
    }

    /// Whether `device_id` is acceptable by the policy's pattern and keyfab's own limits
    /// (1–128 printable ASCII characters, so ids are safe in file names and subjects),
    /// and makes well-formed names where the certificate profiles put it
    /// ([`crate::certificate::IdInNames`]: no wildcard DNS name from a station's id).
    pub fn device_id_ok(&self, device_id: &str) -> bool {
        if !self.names.accepts(device_id) {
            return false;
        }
        let shape = crate::ids::id_shape_ok(device_id)
            && device_id.bytes().all(|b| {
                !matches!(
                    b,
                    b',' | b'=' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';' | b'/'
                )
            });
        shape && self.pattern.as_ref().is_none_or(|p| p.is_match(device_id))
    }

    /// The decision for one request at `now` (Unix seconds). The order of the checks is
    /// part of the contract: the first rule that fails gives the code.
    pub fn decide(&self, state: &EntitlementState, req: &Request<'_>, now: i64) -> Decision {
        if let Some(code) = self.entitlement_gate(state, now) {
            return Decision::Deny(code);
        }
        if let Some(code) = self.request_gate(req, now) {
            return Decision::Deny(code);
        }
        match self.capacity_gate(state) {
            Some(code) => Decision::Deny(code),
            None => Decision::Allow,
        }
    }

    /// Where the entitlement stands at `now` for any device: the rules of
    /// [`decide`](Self::decide) that do not look at the request, in the same order, so
    /// every view (the station API, metrics, `entitlement list`) says what the next
    /// decision will do.
    pub fn status(&self, state: &EntitlementState, now: i64) -> EntitlementStatus {
        self.entitlement_gate(state, now)
            .or_else(|| self.capacity_gate(state))
            .map_or(EntitlementStatus::Active, EntitlementStatus::from_refusal)
    }

    /// The rules on the entitlement itself: revocation, quorum, audit, window.
    fn entitlement_gate(&self, state: &EntitlementState, now: i64) -> Option<DenyCode> {
        let p = &self.policy;
        if state.revoked {
            return Some(DenyCode::Revoked);
        }
        if p.requires_approval(crate::Action::Activate) && !state.activated {
            return Some(DenyCode::ApprovalRequired);
        }
        if let Some(days) = p.audit_every_days {
            if now.saturating_sub(state.last_acknowledged) > i64::from(days) * 86_400 {
                return Some(DenyCode::AuditOverdue);
            }
        }
        if now < p.valid_from {
            return Some(DenyCode::NotYetValid);
        }
        if now >= p.valid_until {
            return Some(DenyCode::Expired);
        }
        None
    }

    /// The rules on the request: station, device id, chip, the device's earlier keys.
    fn request_gate(&self, req: &Request<'_>, now: i64) -> Option<DenyCode> {
        if let Some(allowed) = &self.policy.allowed_stations {
            match req.station {
                Some(s) if allowed.iter().any(|a| a == s) => {}
                _ => return Some(DenyCode::StationNotAllowed),
            }
        }
        if !self.device_id_ok(req.device_id) {
            return Some(DenyCode::DeviceIdRejected);
        }
        if let Some(code) = self.chip_gate(req, now) {
            return Some(code);
        }
        if req.already_provisioned {
            return Some(DenyCode::DeviceAlreadyProvisioned);
        }
        None
    }

    /// The `[chips]` rules: a chain where required; a chain sent that leads to a vendor
    /// root, within its validity unless `accept_expired`; its key the only key the
    /// request presents as the chip's — the transport key, which the policy's secret
    /// keys are sealed to, or the CSR's key; the device id where `device_id_from` says.
    fn chip_gate(&self, req: &Request<'_>, now: i64) -> Option<DenyCode> {
        let chips = self.policy.chips.as_ref().filter(|c| c.checks())?;
        let facts = match req.chip {
            Chip::Assumed => return None,
            Chip::Absent if chips.attestation == crate::Attestation::Optional => return None,
            Chip::Absent | Chip::Untrusted => return Some(DenyCode::ChipUntrusted),
            Chip::Verified(facts) => facts,
        };
        let in_validity = facts.not_before <= now && now <= facts.not_after;
        if !in_validity && !chips.accept_expired {
            return Some(DenyCode::ChipUntrusted);
        }
        let presented = [&facts.transport_key, &facts.csr_key];
        let any_presented = presented.iter().any(|k| k.is_some());
        let all_certified = presented
            .iter()
            .all(|k| k.as_ref().is_none_or(|k| *k == facts.key_id));
        // Keys with a private part travel sealed to the transport key: without one they
        // would leave in clear, whatever the chip proved.
        let secrets_sealed = facts.transport_key.is_some()
            || self
                .policy
                .keys
                .iter()
                .all(|k| k.source == crate::KeySource::Device);
        if !any_presented || !all_certified || !secrets_sealed {
            return Some(DenyCode::ChipKeyMismatch);
        }
        if !chip_names(chips.device_id_from, facts, req.device_id) {
            return Some(DenyCode::ChipBindingMismatch);
        }
        None
    }

    /// The counted rules: the quota, then today's share.
    fn capacity_gate(&self, state: &EntitlementState) -> Option<DenyCode> {
        let p = &self.policy;
        if state.total >= p.devices {
            return Some(DenyCode::QuotaExceeded);
        }
        if self
            .daily_limit(state.raised_daily)
            .is_some_and(|d| state.today >= d)
        {
            return Some(DenyCode::DailyLimitExceeded);
        }
        None
    }

    /// The daily limit on a day whose approved raise is `raised` (none: no limit): the
    /// policy's, or the raise where it is higher. A raise never lowers the limit, and
    /// gives none to a policy without one.
    pub fn daily_limit(&self, raised: Option<u64>) -> Option<u64> {
        crate::raise::lifted(self.policy.daily_limit, raised)
    }
}

/// Whether the chip certificate names `device_id` where `from` says.
fn chip_names(from: crate::ChipIdFrom, facts: &ChipFacts, device_id: &str) -> bool {
    use crate::ChipIdFrom;
    match from {
        ChipIdFrom::None => true,
        ChipIdFrom::SubjectSerial => facts.subject_serial.as_deref() == Some(device_id),
        ChipIdFrom::SubjectCn => facts.subject_cn.as_deref() == Some(device_id),
        ChipIdFrom::SanUri => facts.san_uris.iter().any(|uri| {
            uri == device_id
                || uri
                    .strip_suffix(device_id)
                    .is_some_and(|head| head.ends_with(':'))
        }),
    }
}

/// Where an entitlement stands: what the next decision does for any device the policy
/// accepts. One definition, shared by the site's views and HQ's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntitlementStatus {
    /// Devices may be provisioned.
    Active,
    /// The quorum for `activate` has not approved it yet.
    PendingApproval,
    /// Paused: HQ has not acknowledged the site's audit within `audit_every_days`; a
    /// receipt from HQ resumes it.
    Paused,
    /// Its window has not begun.
    NotYetValid,
    /// Its window has ended.
    Expired,
    /// Its quota is used up.
    Exhausted,
    /// Today's share is used up; the next policy day resumes it.
    DailyLimitReached,
    /// HQ revoked it.
    Revoked,
}

impl EntitlementStatus {
    /// Every status, in the order of [`CompiledPolicy::status`]'s checks.
    pub const ALL: [EntitlementStatus; 8] = [
        EntitlementStatus::Revoked,
        EntitlementStatus::PendingApproval,
        EntitlementStatus::Paused,
        EntitlementStatus::NotYetValid,
        EntitlementStatus::Expired,
        EntitlementStatus::Exhausted,
        EntitlementStatus::DailyLimitReached,
        EntitlementStatus::Active,
    ];

    /// The status a refusal on the entitlement's own rules means.
    const fn from_refusal(code: DenyCode) -> EntitlementStatus {
        match code {
            DenyCode::Revoked => EntitlementStatus::Revoked,
            DenyCode::ApprovalRequired => EntitlementStatus::PendingApproval,
            DenyCode::AuditOverdue => EntitlementStatus::Paused,
            DenyCode::NotYetValid => EntitlementStatus::NotYetValid,
            DenyCode::Expired => EntitlementStatus::Expired,
            DenyCode::QuotaExceeded => EntitlementStatus::Exhausted,
            DenyCode::DailyLimitExceeded => EntitlementStatus::DailyLimitReached,
            // Request rules and modules never reach here (see `status`).
            DenyCode::StationNotAllowed
            | DenyCode::DeviceIdRejected
            | DenyCode::DeviceAlreadyProvisioned
            | DenyCode::ChipUntrusted
            | DenyCode::ChipKeyMismatch
            | DenyCode::ChipBindingMismatch
            | DenyCode::PolicyDenied
            | DenyCode::PolicyError => EntitlementStatus::Active,
        }
    }

    /// Its name in the station API, metrics and JSON output.
    pub const fn as_str(self) -> &'static str {
        match self {
            EntitlementStatus::Active => "active",
            EntitlementStatus::PendingApproval => "pending_approval",
            EntitlementStatus::Paused => "paused",
            EntitlementStatus::NotYetValid => "not_yet_valid",
            EntitlementStatus::Expired => "expired",
            EntitlementStatus::Exhausted => "exhausted",
            EntitlementStatus::DailyLimitReached => "daily_limit_reached",
            EntitlementStatus::Revoked => "revoked",
        }
    }
}

impl std::fmt::Display for EntitlementStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
