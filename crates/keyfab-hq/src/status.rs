//! `keyfab hq status`: HQ on one screen — each site and how fresh its audit is, each
//! entitlement (its state as HQ knows it, released against the quota, its window, when
//! it pauses for want of an audit), the violations found — and, first, what needs a
//! person soon: an audit that has not come, an entitlement about to stop a line, a
//! violation, HQ's own certificate ending.

use crate::audit::site_log;
use crate::entitlement::list_issued;
use crate::report::report;
use crate::sites::list_sites;
use keyfab_crypto::time::UnixTime;
use keyfab_node::{rfc3339, Node, Result};
use keyfab_policy::glance::days_until;
use keyfab_policy::EntitlementStatus;
use serde::Serialize;

/// HQ's cluster certificate ending within this many days is a warning.
const CERT_WARN_DAYS: i64 = 60;

/// Where HQ stands.
#[derive(Debug, Clone, Serialize)]
pub struct HqStatus {
    /// HQ's name.
    pub hq: String,
    /// The clock (Unix seconds) when the status was taken.
    pub clock: i64,
    /// When HQ's own cluster certificate ends.
    pub certificate_not_after: Option<i64>,
    /// Each site registered.
    pub sites: Vec<SiteLine>,
    /// Each entitlement issued.
    pub entitlements: Vec<EntitlementLine>,
    /// Violations found in the sites' logs so far.
    pub violations: u64,
    /// What needs a person soon.
    pub warnings: Vec<String>,
}

/// One site on the status screen.
#[derive(Debug, Clone, Serialize)]
pub struct SiteLine {
    /// Its name.
    pub site: String,
    /// Audit records HQ has accepted from it.
    pub records: u64,
    /// Exports imported.
    pub exports: u64,
    /// Its last record HQ accepted (the site's time), if any.
    pub last_record_at: Option<i64>,
    /// The latest receipt of HQ's its log shows imported (HQ's time).
    pub acknowledged_at: Option<i64>,
}

/// One entitlement on the status screen.
#[derive(Debug, Clone, Serialize)]
pub struct EntitlementLine {
    /// The site it is for.
    pub site: String,
    /// Its id.
    pub id: String,
    /// The product.
    pub product: String,
    /// What the site's next decision does, as far as HQ's copy of its log tells.
    pub state: EntitlementStatus,
    /// Devices released, as the site's logs show.
    pub released: u64,
    /// The quota.
    pub quota: u64,
    /// The daily limit, if any.
    pub daily_limit: Option<u64>,
    /// The window's end.
    pub valid_until: i64,
    /// When the site pauses it unless it imports a newer receipt (none: no audit asked).
    pub audit_due_at: Option<i64>,
    /// Violations found under it.
    pub violations: u64,
}

/// The status of HQ `node` at `now`.
pub fn hq_status(node: &Node, now: UnixTime) -> Result<HqStatus> {
    let now = now.0;
    let r = report(node, UnixTime(now))?;
    let issued = list_issued(node)?;
    let mut sites = Vec::new();
    for site in list_sites(node)? {
        let log = site_log(node, &site.name)?;
        let records = log.tree.as_ref().map_or(0, |t| t.size);
        sites.push(SiteLine {
            records,
            exports: log.bundles.len() as u64,
            last_record_at: (records > 0).then_some(log.time),
            acknowledged_at: (log.acknowledged_at > 0).then_some(log.acknowledged_at),
            site: site.name,
        });
    }
    let mut entitlements = Vec::new();
    for e in &r.entitlements {
        let Some(issued) = issued.iter().find(|i| i.id == e.entitlement) else {
            continue;
        };
        let acknowledged = sites
            .iter()
            .find(|s| s.site == e.site)
            .and_then(|s| s.acknowledged_at)
            .unwrap_or(0)
            .max(issued.created_at);
        let audit_due_at = issued.policy.audit_due_at(acknowledged);
        entitlements.push(EntitlementLine {
            site: e.site.clone(),
            id: e.entitlement.clone(),
            product: e.product.clone(),
            state: e.state,
            released: e.released,
            quota: e.quota,
            daily_limit: e.daily_limit,
            valid_until: e.valid_until,
            audit_due_at,
            violations: e.violations,
        });
    }
    let certificate_not_after = node
        .cluster_cert()
        .ok()
        .and_then(|c| keyfab_crypto::x509::cert_facts(&c).ok())
        .map(|f| f.not_after.0);
    let mut status = HqStatus {
        hq: node.name.clone(),
        clock: now,
        certificate_not_after,
        sites,
        entitlements,
        violations: r.violations.len() as u64,
        warnings: Vec::new(),
    };
    status.warnings = warnings(&status);
    Ok(status)
}

/// What needs a person soon, most urgent first.
fn warnings(s: &HqStatus) -> Vec<String> {
    let now = s.clock;
    let mut out = Vec::new();
    if s.violations > 0 {
        out.push(format!(
            "{} violations found in the sites' logs (hq report)",
            s.violations
        ));
    }
    for e in &s.entitlements {
        let glance = keyfab_policy::glance::Glance {
            state: e.state,
            released: e.released,
            quota: e.quota,
            daily_limit: e.daily_limit,
            valid_until: e.valid_until,
            audit_due_at: e.audit_due_at,
            audit_remedy: "the site sends its audit and imports HQ's receipt",
        };
        for w in glance.warnings(now) {
            out.push(format!("site {}, entitlement {}: {w}", e.site, e.id));
        }
    }
    for site in s.sites.iter().filter(|site| site.records == 0) {
        if s.entitlements.iter().any(|e| e.site == site.site) {
            out.push(format!(
                "site {}: no audit imported yet (site audit export, then hq audit import)",
                site.site
            ));
        }
    }
    if let Some(end) = s.certificate_not_after {
        if days_until(now, end) < CERT_WARN_DAYS {
            out.push(format!(
                "HQ's cluster certificate ends {}: ask the root for a new one",
                rfc3339(end)
            ));
        }
    }
    out
}
