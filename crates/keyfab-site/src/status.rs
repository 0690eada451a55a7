//! `keyfab site status`: the site on one screen, for an operator at a glance — each
//! entitlement's state and how far it is (today against its limit, in all against its
//! quota, its window's end, when its audit is due), the audit's freshness, the stations
//! and their certificates, the trusted time against the clock — and, first, whatever will
//! stop the line soon. The same for a stopped site (the home opened) and a serving one
//! (through `HOME/serve.sock`).

use crate::stations::StationRecord;
use keyfab_node::{rfc3339, Node, Result};
use keyfab_policy::glance::days_until;
use keyfab_policy::EntitlementStatus;
use keyfab_store::Table;
use serde::{Deserialize, Serialize};

/// A station certificate ending within this many days is a warning.
const STATION_WARN_DAYS: i64 = 14;
/// The site's own certificate ending within this many days is a warning.
const SITE_CERT_WARN_DAYS: i64 = 60;

/// Where the site stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteStatus {
    /// The site's name.
    pub site: String,
    /// The clock (Unix seconds) when the status was taken.
    pub clock: i64,
    /// The site's trusted time: the latest time a decision was taken at.
    pub trusted_time: Option<i64>,
    /// Set when the site stopped itself (`rollback_detected`, `log_broken`): why.
    pub stopped: Option<String>,
    /// When the site's own cluster certificate ends.
    pub certificate_not_after: Option<i64>,
    /// Each entitlement.
    pub entitlements: Vec<EntitlementLine>,
    /// The audit's freshness.
    pub audit: AuditLine,
    /// Each station enrolled (revoked ones too).
    pub stations: Vec<StationRecord>,
    /// What will stop the line soon, or needs a person.
    pub warnings: Vec<String>,
    /// What the running server saw; none from a stopped site's home.
    pub serving: Option<Serving>,
}

/// What only a running `site serve` knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Serving {
    /// When it started (Unix seconds).
    pub since: i64,
    /// Each station it has seen since, or that has a connection open.
    pub stations: Vec<StationActivity>,
}

/// A station as the running server saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StationActivity {
    /// The station's name.
    pub name: String,
    /// Its connections open now.
    pub connections: usize,
    /// Its last request (Unix seconds), if any since the server started.
    pub last_seen: Option<i64>,
    /// Devices given keys through this server since it started.
    pub provisioned: u64,
    /// Devices given keys per second over the last minute.
    pub devices_per_second: f64,
}

/// One entitlement on the status screen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntitlementLine {
    /// Its id.
    pub id: String,
    /// The product.
    pub product: String,
    /// What the next decision does for an acceptable device.
    pub state: EntitlementStatus,
    /// Devices released today.
    pub today: u64,
    /// Today's daily limit: the policy's, or a quorum's raise in force today (none: no
    /// limit).
    pub daily_limit: Option<u64>,
    /// Devices released in all.
    pub provisioned: u64,
    /// The quota.
    pub quota: u64,
    /// The window's end (Unix seconds).
    pub valid_until: i64,
    /// When it pauses for want of HQ's receipt (none: no audit asked for).
    pub audit_due_at: Option<i64>,
    /// The `[chips]` attestation it asks for (`off` when none).
    pub attestation: String,
}

/// The audit's freshness.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditLine {
    /// Records in the log.
    pub records: u64,
    /// Of those, not exported yet.
    pub unexported: u64,
    /// Records HQ acknowledged, and when (HQ's clock).
    pub acknowledged: Option<(u64, i64)>,
    /// The last export: the records it carried up to, and when it was made.
    pub last_export: Option<(u64, i64)>,
}

/// The status of `node` now.
pub fn site_status(node: &Node) -> Result<SiteStatus> {
    let now = node.now().0;
    let trusted_time = node
        .store
        .get(Table::Meta, crate::provision::TIME_HWM)?
        .and_then(|v| <[u8; 8]>::try_from(v.value.as_slice()).ok())
        .map(i64::from_be_bytes);
    let stopped = crate::latch::latched(node)?.map(|l| l.refusal().to_string());
    let certificate_not_after = node
        .cluster_cert()
        .ok()
        .and_then(|c| keyfab_crypto::x509::cert_facts(&c).ok())
        .map(|f| f.not_after.0);
    let mut entitlements = Vec::new();
    for e in crate::entitlements::list(node)? {
        let standing = crate::entitlements::standing(node, &e)?;
        entitlements.push(EntitlementLine {
            id: e.id.clone(),
            product: e.policy.product.clone(),
            state: standing.state,
            today: standing.today,
            daily_limit: standing.daily_limit,
            provisioned: standing.provisioned,
            quota: e.policy.devices,
            valid_until: e.policy.valid_until,
            audit_due_at: standing.audit_due_at,
            attestation: e
                .policy
                .chips
                .as_ref()
                .map_or("off", |c| c.attestation.as_str())
                .to_owned(),
        });
    }
    let records = crate::audit_log::log_size(node)?;
    let audit = AuditLine {
        records,
        unexported: crate::export::records_unexported(node)?,
        last_export: crate::export::last_export(node)?,
        acknowledged: crate::checkpoints::acknowledged(node)?
            .map(|a| (a.head.size, a.acknowledged_at)),
    };
    let stations = crate::stations::list(node)?;
    let mut status = SiteStatus {
        site: node.name.clone(),
        clock: now,
        trusted_time,
        stopped,
        certificate_not_after,
        entitlements,
        audit,
        stations,
        warnings: Vec::new(),
        serving: None,
    };
    status.warnings = warnings(&status, crate::settings::CLOCK_TOLERANCE.get(node)?);
    Ok(status)
}

/// What will stop the line soon, most urgent first.
fn warnings(s: &SiteStatus, clock_tolerance: i64) -> Vec<String> {
    let now = s.clock;
    let mut out = Vec::new();
    if let Some(why) = &s.stopped {
        out.push(why.clone());
    }
    if let Some(trusted) = s.trusted_time {
        if now < trusted.saturating_sub(clock_tolerance) {
            out.push(format!(
                "the clock ({}) is behind the site's trusted time ({}): provisioning is refused (clock_rollback)",
                rfc3339(now),
                rfc3339(trusted)
            ));
        }
    }
    for e in &s.entitlements {
        let glance = keyfab_policy::glance::Glance {
            state: e.state,
            released: e.provisioned,
            quota: e.quota,
            daily_limit: e.daily_limit,
            valid_until: e.valid_until,
            audit_due_at: e.audit_due_at,
            audit_remedy: "HQ's receipt is imported (site audit export, then site receipt import)",
        };
        for w in glance.warnings(now) {
            out.push(format!("entitlement {}: {w}", e.id));
        }
    }
    for st in s.stations.iter().filter(|st| st.revoked_at.is_none()) {
        let days = days_until(now, st.not_after);
        if days < STATION_WARN_DAYS {
            out.push(format!(
                "station {}: its certificate ends {} (site station renew)",
                st.name,
                rfc3339(st.not_after)
            ));
        }
    }
    if let Some(end) = s.certificate_not_after {
        if days_until(now, end) < SITE_CERT_WARN_DAYS {
            out.push(format!(
                "the site's cluster certificate ends {}: ask the root for a new one",
                rfc3339(end)
            ));
        }
    }
    out
}
