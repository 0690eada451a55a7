//! `keyfab site`: entitlements and revocations imported, approvals, the audit log and its exports, receipts, settings.

use crate::context::{rfc3339, Context};
use crate::output::{io_fail, read_input, Failure, Outcome, Progress, Report};
use keyfab_node::Code;
use keyfab_node::NodeKind;
use std::path::Path;

pub(crate) fn entitlement_import(
    ctx: &Context,
    home: &Path,
    file: &Path,
) -> Result<EntitlementImport, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let mut head = [0u8; 8];
    let is_revocation = std::fs::File::open(file)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && keyfab_formats::prefix::kind_of(&head) == Some(keyfab_formats::prefix::Kind::Revocation);
    if is_revocation {
        let bytes = read_input(file, keyfab_formats::revocation::MAX_LEN)?;
        let r = keyfab_site::revocation::import_revocation(&node, &bytes)?;
        return Ok(EntitlementImport::Revoked {
            revoked: r.entitlement,
            sequence: r.sequence,
            destroyed_pool_keys: r.destroyed_pool_keys,
            batch_ca_key_destroyed: true,
            purge_failed: r.purge_failed,
        });
    }
    let progress = Progress::new("stored", "pool keys", !ctx.json);
    let imported = keyfab_site::entitlements::import(&node, file, progress.reporter())?;
    Ok(EntitlementImport::Imported {
        id: imported.id,
        hq: imported.hq,
        sequence: imported.sequence,
        pool_keys: imported.pool_keys,
        state: imported.state,
    })
}

/// `site entitlement import`: an entitlement stored, or a revocation applied.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub(crate) enum EntitlementImport {
    /// An entitlement, verified and stored.
    Imported {
        id: String,
        hq: String,
        sequence: u64,
        pool_keys: u64,
        state: keyfab_policy::EntitlementStatus,
    },
    /// HQ's revocation, applied.
    Revoked {
        revoked: String,
        sequence: u64,
        destroyed_pool_keys: u64,
        batch_ca_key_destroyed: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        purge_failed: Option<String>,
    },
}

impl EntitlementImport {
    /// The entitlement the file was about.
    pub(crate) fn entitlement(&self) -> &str {
        match self {
            EntitlementImport::Imported { id, .. } => id,
            EntitlementImport::Revoked { revoked, .. } => revoked,
        }
    }
}

impl Outcome for EntitlementImport {
    fn text(&self) -> String {
        match self {
            EntitlementImport::Imported {
                id,
                hq,
                sequence,
                pool_keys,
                state,
            } => format!(
                "imported entitlement {id} from '{hq}' (sequence {sequence}): {pool_keys} pool keys stored encrypted; state {state}"
            ),
            EntitlementImport::Revoked {
                revoked,
                sequence,
                destroyed_pool_keys,
                purge_failed,
                ..
            } => {
                let mut text = format!(
                    "entitlement {revoked} revoked (sequence {sequence}); {destroyed_pool_keys} unused pool keys and the batch CA key destroyed"
                );
                if let Some(why) = purge_failed {
                    text.push_str(&format!(
                        "\nwarning: deleted, but the store could not purge them from its file: {why}"
                    ));
                }
                text
            }
        }
    }
}

pub(crate) fn entitlement_list(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let mut entitlements = Vec::new();
    for e in keyfab_site::entitlements::list(&node)? {
        let standing = keyfab_site::entitlements::standing(&node, &e)?;
        let keys = e
            .policy
            .keys
            .iter()
            .map(|k| KeyRow {
                name: k.name.clone(),
                key_type: k.key_type.as_str(),
                source: k.source.as_str(),
                pool_keys: e
                    .pool
                    .iter()
                    .find(|s| s.key == k.name)
                    .map_or(0, |s| s.count),
                pool_keys_left: standing.pool_keys_left.get(&k.name).copied().unwrap_or(0),
            })
            .collect();
        let code = e.policy.code.as_ref().map(|c| CodeRow {
            name: c.name.clone(),
            bytes: c.module.len(),
            sha256: c.sha256.clone(),
        });
        let mut policy = serde_json::to_value(&e.policy).unwrap_or_default();
        if let Some(code) = &code {
            // The module by name, size and hash; its bytes are in the entitlement.
            policy["code"] = serde_json::to_value(code).unwrap_or_default();
        }
        entitlements.push(EntitlementRow {
            pool_keys: e.pool.iter().map(|s| s.count).sum(),
            pool_keys_left: standing.pool_keys_left.values().sum(),
            state: standing.state,
            product: e.policy.product.clone(),
            devices: e.policy.devices,
            daily_limit: standing.daily_limit,
            raises: standing.raises,
            timezone: e.policy.timezone.clone(),
            valid_from: rfc3339(e.policy.valid_from),
            valid_until: rfc3339(e.policy.valid_until),
            provisioned: standing.provisioned,
            left: standing.left,
            reserved_by_nodes: standing.reserved_by_nodes,
            today: standing.today,
            left_today: standing.left_today,
            audit_due_at: standing.audit_due_at.map(rfc3339),
            code,
            keys,
            policy,
            imported_at: rfc3339(e.imported_at),
            id: e.id,
            hq: e.hq,
            sequence: e.sequence,
        });
    }
    Report::of(&EntitlementList { entitlements })
}

/// `site entitlement list`: every imported entitlement, as it stands now.
#[derive(serde::Serialize)]
struct EntitlementList {
    entitlements: Vec<EntitlementRow>,
}

#[derive(serde::Serialize)]
struct EntitlementRow {
    id: String,
    hq: String,
    sequence: u64,
    state: keyfab_policy::EntitlementStatus,
    product: String,
    devices: u64,
    /// Today's: the policy's, or a quorum's raise in force today.
    daily_limit: Option<u64>,
    /// The raises of the daily limit a quorum approved.
    raises: Vec<keyfab_policy::Raise>,
    timezone: String,
    valid_from: String,
    valid_until: String,
    provisioned: u64,
    left: u64,
    reserved_by_nodes: u64,
    today: u64,
    left_today: Option<u64>,
    audit_due_at: Option<String>,
    pool_keys: u64,
    pool_keys_left: u64,
    keys: Vec<KeyRow>,
    #[serde(skip)]
    code: Option<CodeRow>,
    /// The policy as imported (its module summarised by name, size and hash).
    policy: serde_json::Value,
    imported_at: String,
}

#[derive(serde::Serialize)]
struct KeyRow {
    name: String,
    #[serde(rename = "type")]
    key_type: &'static str,
    source: &'static str,
    pool_keys: u64,
    pool_keys_left: u64,
}

#[derive(serde::Serialize)]
struct CodeRow {
    name: String,
    sha256: String,
    bytes: usize,
}

impl Outcome for EntitlementList {
    fn text(&self) -> String {
        let mut text = String::new();
        for e in &self.entitlements {
            text.push_str(&format!(
                "{}  {}  from {} (sequence {}), {}\n  window {} .. {}  ({})\n",
                e.id, e.product, e.hq, e.sequence, e.state, e.valid_from, e.valid_until, e.timezone
            ));
            text.push_str(&format!("  provisioned {} of {}", e.provisioned, e.devices));
            if e.reserved_by_nodes > 0 {
                text.push_str(&format!(
                    ", {} more reserved by cluster nodes",
                    e.reserved_by_nodes
                ));
            }
            if let (Some(limit), Some(left)) = (e.daily_limit, e.left_today) {
                text.push_str(&format!("; today {} of {limit} ({left} left)", e.today));
            }
            text.push('\n');
            for r in &e.raises {
                text.push_str(&format!(
                    "  daily limit raised to {} from {} to {} (approved by quorum)\n",
                    r.daily, r.from_day, r.to_day
                ));
            }
            if let Some(due) = &e.audit_due_at {
                text.push_str(&format!("  audit receipt due by {due}\n"));
            }
            for k in &e.keys {
                text.push_str(&format!(
                    "  key {:<12} {:<8} {:<8}",
                    k.name, k.key_type, k.source
                ));
                if k.pool_keys > 0 {
                    text.push_str(&format!(
                        " pool keys {} of {} left",
                        k.pool_keys_left, k.pool_keys
                    ));
                }
                text.push('\n');
            }
            if let Some(code) = &e.code {
                text.push_str(&format!(
                    "  policy module {} ({} bytes, sha256 {})\n",
                    code.name, code.bytes, code.sha256
                ));
            }
        }
        if self.entitlements.is_empty() {
            text.push_str("no entitlements imported yet\n");
        }
        text
    }
}

pub(crate) fn approval_request(
    ctx: &Context,
    home: &Path,
    entitlement: &str,
    ask: keyfab_site::approvals::Ask,
    out: &Path,
    hours: i64,
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let file =
        keyfab_site::approvals::request(&node, entitlement, &ask, hours.saturating_mul(3600))?;
    std::fs::write(out, &file).map_err(|e| io_fail(out, e))?;
    let (action, raise, reprovision) = match ask {
        keyfab_site::approvals::Ask::Activate => ("activate", None, None),
        keyfab_site::approvals::Ask::RaiseLimit(raise) => ("raise-limit", Some(raise), None),
        keyfab_site::approvals::Ask::Reprovision(r) => ("reprovision", None, Some(r)),
    };
    Report::of(&ApprovalRequested {
        entitlement: entitlement.to_owned(),
        action,
        raise,
        reprovision,
        out: out.to_owned(),
    })
}

/// `site approval request`: the request file for approvers, written.
#[derive(serde::Serialize)]
struct ApprovalRequested {
    entitlement: String,
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    raise: Option<keyfab_policy::Raise>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reprovision: Option<keyfab_formats::approval::Reprovision>,
    out: std::path::PathBuf,
}

impl Outcome for ApprovalRequested {
    fn text(&self) -> String {
        let what = match (&self.raise, &self.reprovision) {
            (Some(r), _) => format!(
                " (daily limit {} from {} to {})",
                r.daily, r.from_day, r.to_day
            ),
            (None, Some(r)) => format!(" of device {}", r.device_id),
            (None, None) => String::new(),
        };
        format!(
            "approval request for '{}'{what} on {} written to {}; approvers sign it with `keyfab approver sign`",
            self.action,
            self.entitlement,
            self.out.display()
        )
    }
}

pub(crate) fn approval_submit(
    ctx: &Context,
    home: &Path,
    files: &[std::path::PathBuf],
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let mut bytes = Vec::new();
    for f in files {
        bytes.push(read_input(f, keyfab_formats::approval::MAX_APPROVAL_LEN)?);
    }
    let results = keyfab_site::approvals::submit(&node, &bytes)?;
    Report::of(&ApprovalsSubmitted {
        results: results
            .into_iter()
            .map(|r| ApprovalCount {
                entitlement: r.entitlement,
                action: r.action,
                accepted: r.accepted,
                count: r.count,
                threshold: r.threshold,
                activated: r.activated,
                raised: r.raised,
                reprovisioned: r.reprovisioned,
            })
            .collect(),
    })
}

/// `site approval submit`: per entitlement and action, what the approvals counted.
#[derive(serde::Serialize)]
struct ApprovalsSubmitted {
    results: Vec<ApprovalCount>,
}

#[derive(serde::Serialize)]
struct ApprovalCount {
    entitlement: String,
    action: String,
    accepted: usize,
    count: usize,
    threshold: u32,
    activated: bool,
    /// The raise the quorum put in force with this submission.
    #[serde(skip_serializing_if = "Option::is_none")]
    raised: Option<keyfab_policy::Raise>,
    /// The device the quorum allowed new keys with this submission.
    #[serde(skip_serializing_if = "Option::is_none")]
    reprovisioned: Option<String>,
}

impl Outcome for ApprovalsSubmitted {
    fn text(&self) -> String {
        self.results
            .iter()
            .map(|r| {
                let done = match (&r.raised, &r.reprovisioned, r.activated) {
                    (Some(raise), ..) => format!(
                        " - daily limit raised to {} from {} to {}",
                        raise.daily, raise.from_day, raise.to_day
                    ),
                    (None, Some(device), _) => format!(
                        " - device {device} may be provisioned once more; its earlier keys are burned"
                    ),
                    (None, None, true) => " - activated".to_owned(),
                    (None, None, false) => String::new(),
                };
                format!(
                    "{} '{}': {} new approval(s), {} of {} distinct approvers{done}\n",
                    r.entitlement, r.action, r.accepted, r.count, r.threshold,
                )
            })
            .collect()
    }
}

pub(crate) fn audit_verify(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let records = keyfab_site::entitlements::audit_records(&node)?;
    // Chain by chain, as HQ verifies it: on a cluster each node appends to its own.
    let heads = match keyfab_audit::verify_merged(&records) {
        Ok(heads) => heads,
        Err(e) => {
            // A broken chain stops the site: it releases no key until HQ decides.
            let why = format!("the audit chain is broken: {e}");
            keyfab_site::latch::latch(&node, keyfab_site::latch::Cause::LogBroken, &why)?;
            return Err(Failure::new(
                Code::LogBroken,
                format!("{why}; the site has stopped releasing keys"),
            ));
        }
    };
    let tree = keyfab_site::checkpoints::tree_head(&node)?;
    let chains = match heads.len() {
        0 | 1 => "hash chain intact".to_owned(),
        n => format!("{n} hash chains (the site's and its nodes') intact"),
    };
    Report::of(&LogVerified {
        site: node.name.clone(),
        records: records.len(),
        chains: heads.len(),
        root: hex::encode(tree.root),
        chains_text: chains,
    })
}

/// `site audit verify`: the log's chains verified, its size and Merkle root.
#[derive(serde::Serialize)]
struct LogVerified {
    site: String,
    records: usize,
    chains: usize,
    root: String,
    #[serde(skip)]
    chains_text: String,
}

impl Outcome for LogVerified {
    fn text(&self) -> String {
        format!(
            "audit log of '{}': {} records, {}, Merkle root {}",
            self.site, self.records, self.chains_text, self.root
        )
    }
}

pub(crate) fn audit_checkpoint(ctx: &Context, home: &Path, out: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let (c, bytes) = keyfab_site::checkpoints::checkpoint(&node)?;
    std::fs::write(out, &bytes).map_err(|e| io_fail(out, e))?;
    Report::of(&CheckpointWritten {
        site: c.site,
        size: c.head.size,
        root: hex::encode(c.head.root),
        time: rfc3339(c.time),
        rollback_counter: c.rollback_counter,
        out: out.to_owned(),
    })
}

/// `site audit checkpoint`: a signed checkpoint of the log, written.
#[derive(serde::Serialize)]
struct CheckpointWritten {
    site: String,
    size: u64,
    root: String,
    time: String,
    /// The TPM counter's value it carries (a site bound to one).
    #[serde(skip_serializing_if = "Option::is_none")]
    rollback_counter: Option<u64>,
    out: std::path::PathBuf,
}

impl Outcome for CheckpointWritten {
    fn text(&self) -> String {
        format!(
            "checkpoint of '{}': {} records, root {}{}, signed -> {}",
            self.site,
            self.size,
            self.root,
            self.rollback_counter
                .map(|v| format!(", TPM counter {v}"))
                .unwrap_or_default(),
            self.out.display()
        )
    }
}

pub(crate) fn receipt_import(ctx: &Context, home: &Path, file: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let bytes = read_input(file, keyfab_formats::checkpoint::MAX_LEN)?;
    let imported = keyfab_site::checkpoints::import_receipt(&node, &bytes)?;
    let ack = imported.acknowledged;
    Report::of(&ReceiptImported {
        size: ack.head.size,
        root: hex::encode(ack.head.root),
        acknowledged_at: rfc3339(ack.acknowledged_at),
        clock_reset: imported.clock_reset.map(|(from, to)| ClockReset {
            from: rfc3339(from),
            to: rfc3339(to),
        }),
    })
}

/// `site receipt import`: what HQ acknowledged, and the trusted time it reset, if it did.
#[derive(serde::Serialize)]
struct ReceiptImported {
    size: u64,
    root: String,
    acknowledged_at: String,
    clock_reset: Option<ClockReset>,
}

#[derive(serde::Serialize)]
struct ClockReset {
    from: String,
    to: String,
}

impl Outcome for ReceiptImported {
    fn text(&self) -> String {
        let mut text = format!(
            "HQ acknowledged {} audit records (at {}); the audit freshness clock restarts",
            self.size, self.acknowledged_at
        );
        if let Some(reset) = &self.clock_reset {
            text.push_str(&format!(
                "\ntrusted time reset by HQ from {} to {}",
                reset.from, reset.to
            ));
        }
        text
    }
}

pub(crate) fn site_config(
    ctx: &Context,
    home: &Path,
    clock_tolerance: Option<i64>,
    clock_max_jump: Option<i64>,
) -> Result<Report, Failure> {
    use keyfab_site::settings::{CLOCK_MAX_JUMP, CLOCK_TOLERANCE};
    let node = ctx.open(home, NodeKind::Site)?;
    if let Some(secs) = clock_tolerance {
        CLOCK_TOLERANCE.set(&node, secs)?;
    }
    if let Some(secs) = clock_max_jump {
        CLOCK_MAX_JUMP.set(&node, secs)?;
    }
    let tolerance = CLOCK_TOLERANCE.get(&node)?;
    let max_jump = CLOCK_MAX_JUMP.get(&node)?;
    Report::of(&SiteSettings {
        site: node.name.clone(),
        clock_tolerance: tolerance,
        clock_max_jump: max_jump,
    })
}

/// `site config`: the settings that bear on security, as they are now.
#[derive(serde::Serialize)]
struct SiteSettings {
    site: String,
    clock_tolerance: i64,
    clock_max_jump: i64,
}

impl Outcome for SiteSettings {
    fn text(&self) -> String {
        format!(
            "site '{}': clock tolerance {} s, largest clock jump adopted {} s",
            self.site, self.clock_tolerance, self.clock_max_jump
        )
    }
}

pub(crate) fn audit_export(
    ctx: &Context,
    home: &Path,
    out: &Path,
    again: bool,
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let progress = Progress::new("exported", "audit records", !ctx.json);
    let e = keyfab_site::export::export(&node, out, again, progress.reporter())?;
    Report::of(&AuditExported {
        bundle: e.bundle,
        from: e.from.size,
        to: e.to.size,
        root: hex::encode(e.to.root),
        records: e.records,
        bytes: e.bytes,
        out: out.to_owned(),
        written_again: e.finished_earlier,
        site: node.name.clone(),
    })
}

/// `site audit export`: the bundle for HQ, written.
#[derive(serde::Serialize)]
struct AuditExported {
    bundle: String,
    from: u64,
    to: u64,
    root: String,
    records: u64,
    bytes: u64,
    out: std::path::PathBuf,
    written_again: bool,
    #[serde(skip)]
    site: String,
}

impl Outcome for AuditExported {
    fn text(&self) -> String {
        let range = match self.records {
            0 => "no new audit records".to_owned(),
            _ => format!("audit records {}..{}", self.from + 1, self.to),
        };
        let mut text = String::new();
        if self.written_again {
            text.push_str(&format!(
                "the last export (bundle {}) was not known to be written: its records are written again, under the same bundle id (if HQ already imported it, it answers `replayed`; export once more for the records since)\n",
                self.bundle
            ));
        }
        text.push_str(&format!(
            "{range} of '{}' exported for HQ ({} records, {} bytes, bundle {}) -> {}",
            self.site,
            self.records,
            self.bytes,
            self.bundle,
            self.out.display()
        ));
        text
    }
}
