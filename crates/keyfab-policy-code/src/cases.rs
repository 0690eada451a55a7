//! Recorded cases for a policy module: what `keyfab policy test` runs so an author can
//! check rules before HQ signs them (docs/POLICY-CODE.md, "Testing a module").
//!
//! The cases run in order against one simulated entitlement: allowed devices count toward
//! the totals, the per-station and per-day counters and the module's state, exactly as
//! at a site, and the built-in quota and daily limit apply first, as they do there.

use crate::{CodeCounters, Counted, PolicyModule, Verdict};
use keyfab_policy::{
    CompiledPolicy, Decision, DenyCode, EntitlementState, KeySource, KeySpec, KeyType, Policy,
};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// A cases file (JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// IANA time zone of the simulated policy (default UTC).
    #[serde(default = "utc")]
    pub timezone: String,
    /// Total quota (default 1,000,000).
    #[serde(default = "many")]
    pub devices: u64,
    /// Daily limit, if any.
    #[serde(default)]
    pub daily: Option<u64>,
    /// Key sources each device receives (default `["site"]`).
    #[serde(default = "site_only")]
    pub key_sources: Vec<KeySource>,
    /// The steps, in order.
    pub cases: Vec<Case>,
}

/// One step: a request (repeated `repeat` times), or a station reporting devices failed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// A name for reports (default: its position).
    #[serde(default)]
    pub name: Option<String>,
    /// When, RFC 3339 (`2026-11-25T08:00:00+08:00`).
    pub at: String,
    /// The device id; `{n}` becomes a running number so repeats are distinct devices.
    #[serde(default = "numbered")]
    pub device_id: String,
    /// The station that asks, if any.
    #[serde(default)]
    pub station: Option<String>,
    /// How many times (distinct devices with `{n}`).
    #[serde(default = "one")]
    pub repeat: u32,
    /// `allow`, `policy_denied`, `policy_error`, or a built-in code (`quota_exceeded`,
    /// `daily_limit_exceeded`, `device_already_provisioned`). Required for requests.
    #[serde(default)]
    pub expect: Option<String>,
    /// Text the module's reason must contain.
    #[serde(default)]
    pub reason: Option<String>,
    /// `failed`: instead of a request, a station reports `repeat` devices failed.
    #[serde(default)]
    pub confirm: Option<String>,
}

fn utc() -> String {
    "UTC".into()
}
fn many() -> u64 {
    1_000_000
}
fn site_only() -> Vec<KeySource> {
    vec![KeySource::Site]
}
fn numbered() -> String {
    "device-{n}".into()
}
fn one() -> u32 {
    1
}

/// What one case did.
#[derive(Debug, Clone)]
pub struct CaseOutcome {
    /// 1-based position in the file.
    pub case: usize,
    /// Its name, or its position.
    pub name: String,
    /// How many requests it made.
    pub runs: u32,
    /// The first run that did not give what the case expects, with what it gave.
    pub mismatch: Option<(u32, String)>,
    /// The most fuel one evaluation used.
    pub fuel_max: u64,
}

/// All cases' outcomes.
#[derive(Debug, Clone, Default)]
pub struct CasesReport {
    /// Each case's outcome, in file order.
    pub outcomes: Vec<CaseOutcome>,
    /// Module evaluations in all.
    pub evaluations: u64,
    /// The most fuel one evaluation used.
    pub fuel_max: u64,
}

impl CasesReport {
    /// The cases that did not give what they expect.
    pub fn failed(&self) -> impl Iterator<Item = &CaseOutcome> {
        self.outcomes.iter().filter(|o| o.mismatch.is_some())
    }
}

/// The simulated policy the cases run under.
fn policy_of(file: &CaseFile) -> Result<CompiledPolicy, String> {
    let keys = file
        .key_sources
        .iter()
        .enumerate()
        .map(|(i, source)| KeySpec {
            name: format!("key-{i}"),
            key_type: match source {
                KeySource::Derived => KeyType::Aes256,
                _ => KeyType::EcP256,
            },
            source: *source,
            certificate: (*source == KeySource::Device).then(|| {
                keyfab_policy::CertificateTemplate::new(
                    "CN={device_id}",
                    keyfab_policy::Lifetime::Days(1),
                )
            }),
        })
        .collect();
    let policy = Policy {
        product: "policy test".into(),
        devices: file.devices,
        valid_from: i64::MIN,
        valid_until: i64::MAX,
        audit_every_days: None,
        daily_limit: file.daily,
        timezone: file.timezone.clone(),
        device_id_pattern: None,
        allowed_stations: None,
        keys,
        batch_ca_key: Default::default(),
        approval: None,
        code: None,
        chips: None,
    };
    CompiledPolicy::new(policy).map_err(|e| e.to_string())
}

fn describe(decision: Decision, verdict: Option<&Verdict>) -> (String, String) {
    match (decision, verdict) {
        (Decision::Allow, _) => ("allow".into(), String::new()),
        (Decision::Deny(code), Some(Verdict::Deny { reason } | Verdict::Error { reason })) => {
            (code.code().as_str().into(), reason.clone())
        }
        (Decision::Deny(code), _) => (code.code().as_str().into(), String::new()),
    }
}

/// Runs every case of `file` against `module`, in order.
pub fn run_cases(module: &PolicyModule, file: &CaseFile) -> Result<CasesReport, String> {
    let policy = policy_of(file)?;
    let mut total = 0u64;
    let mut days: BTreeMap<String, u64> = BTreeMap::new();
    let mut code = CodeCounters::default();
    let mut seen = BTreeSet::new();
    let mut n = 0u64;
    let mut report = CasesReport::default();
    for (i, case) in file.cases.iter().enumerate() {
        let label = case
            .name
            .clone()
            .unwrap_or_else(|| format!("case {}", i + 1));
        let at: jiff::Timestamp = case
            .at
            .parse()
            .map_err(|e| format!("{label}: `at` is not an RFC 3339 time ({e})"))?;
        let now = at.as_second();
        let day = policy.day_of(now);
        let mut outcome = CaseOutcome {
            case: i + 1,
            name: label.clone(),
            runs: case.repeat,
            mismatch: None,
            fuel_max: 0,
        };
        match (case.confirm.as_deref(), case.expect.as_deref()) {
            (Some("failed"), _) => {
                for _ in 0..case.repeat {
                    code.record_failed(&day);
                }
                report.outcomes.push(outcome);
                continue;
            }
            (Some(other), _) => {
                return Err(format!(
                    "{label}: `confirm` is `{other}`; only `failed` counts"
                ))
            }
            (None, None) => return Err(format!("{label}: a request case needs `expect`")),
            (None, Some(_)) => {}
        }
        let expect = case.expect.as_deref().unwrap_or_default();
        for run in 1..=case.repeat {
            n += 1;
            let device_id = case.device_id.replace("{n}", &n.to_string());
            let today = days.get(&day).copied().unwrap_or(0);
            let state = EntitlementState {
                activated: true,
                last_acknowledged: now,
                total,
                today,
                ..EntitlementState::default()
            };
            let request = keyfab_policy::Request {
                device_id: &device_id,
                station: case.station.as_deref(),
                already_provisioned: seen.contains(&device_id),
                chip: keyfab_policy::Chip::Absent,
            };
            let mut decision = policy.decide(&state, &request, now);
            let mut verdict = None;
            if decision == Decision::Allow {
                let e = code.evaluate(
                    module,
                    &policy,
                    now,
                    &day,
                    Counted { total, today },
                    &device_id,
                    case.station.as_deref(),
                );
                report.evaluations += 1;
                outcome.fuel_max = outcome.fuel_max.max(e.fuel_used);
                decision = match &e.verdict {
                    Verdict::Allow => Decision::Allow,
                    Verdict::Deny { .. } => Decision::Deny(DenyCode::PolicyDenied),
                    Verdict::Error { .. } => Decision::Deny(DenyCode::PolicyError),
                };
                verdict = Some(e.verdict);
            }
            if decision == Decision::Allow {
                total += 1;
                *days.entry(day.clone()).or_insert(0) += 1;
                code.record_allowed(&day, case.station.as_deref());
                seen.insert(device_id);
            }
            let (got, reason) = describe(decision, verdict.as_ref());
            let reason_ok = case
                .reason
                .as_deref()
                .is_none_or(|want| reason.contains(want));
            if outcome.mismatch.is_none() && (got != expect || !reason_ok) {
                let because = if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({reason})")
                };
                outcome.mismatch = Some((run, format!("{got}{because}")));
            }
        }
        report.fuel_max = report.fuel_max.max(outcome.fuel_max);
        report.outcomes.push(outcome);
    }
    Ok(report)
}
