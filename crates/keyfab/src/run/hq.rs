//! `keyfab hq`: sites, entitlements and revocations, audit imports, the report and the manifest.

use crate::cli::{ManifestFormat, ReportFormat};
use crate::context::{rfc3339, Context};
use crate::output::{io_fail, read_input, Failure, Outcome, Progress, Report};
use keyfab_hq::entitlement::CreateRequest;
use keyfab_node::Code;
use keyfab_node::NodeKind;
use serde_json::json;
use std::path::Path;

pub(crate) fn site_add(ctx: &Context, home: &Path, file: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let bytes = read_input(file, keyfab_formats::identity::MAX_LEN)?;
    let rec = keyfab_hq::sites::add_site(&node, &bytes)?;
    Report::of(&SiteAdded {
        site: rec.name,
        cluster_cert_sha256: keyfab_crypto::hash::Fingerprint::of(&rec.cluster_cert).to_hex(),
        last_sequence: rec.last_sequence,
    })
}

/// `hq site add`: a site registered from its identity file.
#[derive(serde::Serialize)]
struct SiteAdded {
    site: String,
    cluster_cert_sha256: String,
    last_sequence: u64,
}

impl Outcome for SiteAdded {
    fn text(&self) -> String {
        format!(
            "site '{}' registered (cluster certificate {})",
            self.site, self.cluster_cert_sha256
        )
    }
}

pub(crate) fn site_list(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let sites = keyfab_hq::sites::list_sites(&node)?;
    let issued = keyfab_hq::entitlement::list_issued(&node)?;
    // Counted from the entitlements themselves: the site's sequence also numbers its
    // revocations and clock resets.
    let count = |site: &str, revoked: bool| {
        issued
            .iter()
            .filter(|e| e.site == site && (!revoked || e.revoked_at.is_some()))
            .count() as u64
    };
    Report::of(&SiteList {
        sites: sites
            .into_iter()
            .map(|s| SiteRow {
                entitlements_issued: count(&s.name, false),
                entitlements_revoked: count(&s.name, true),
                site: s.name,
                audit_records_acknowledged: s.acknowledged.map(|h| h.size),
                clock_resets: s
                    .clock_resets
                    .iter()
                    .map(|r| ResetRow {
                        issued_at: rfc3339(r.acknowledged_at),
                        trusted_time: rfc3339(r.trusted_time),
                        size: r.size,
                    })
                    .collect(),
            })
            .collect(),
    })
}

/// `hq site list`: every registered site, with what HQ holds of it.
#[derive(serde::Serialize)]
struct SiteList {
    sites: Vec<SiteRow>,
}

#[derive(serde::Serialize)]
struct SiteRow {
    site: String,
    entitlements_issued: u64,
    entitlements_revoked: u64,
    audit_records_acknowledged: Option<u64>,
    clock_resets: Vec<ResetRow>,
}

#[derive(serde::Serialize)]
struct ResetRow {
    issued_at: String,
    trusted_time: String,
    size: u64,
}

impl Outcome for SiteList {
    fn text(&self) -> String {
        let mut text = format!(
            "{:<24} {:>14} {:>8} {:>16}  LAST CLOCK RESET\n",
            "SITE", "ENTITLEMENTS", "REVOKED", "AUDIT RECORDS"
        );
        for s in &self.sites {
            let records = s
                .audit_records_acknowledged
                .map_or("-".into(), |n| n.to_string());
            let reset = s.clock_resets.last().map_or("-", |r| r.issued_at.as_str());
            text.push_str(&format!(
                "{:<24} {:>14} {:>8} {:>16}  {reset}\n",
                s.site, s.entitlements_issued, s.entitlements_revoked, records
            ));
        }
        text
    }
}

pub(crate) fn site_reset_clock(
    ctx: &Context,
    home: &Path,
    site: &str,
    out: &Path,
) -> Result<Report, Failure> {
    keyfab_node::out_file::check_new(out, "no reset was issued")?;
    let node = ctx.open(home, NodeKind::Hq)?;
    let reset = keyfab_hq::receipts::reset_clock(&node, site)?;
    keyfab_node::out_file::write_new(out, &reset.bytes).map_err(|e| io_fail(out, e))?;
    let r = reset.receipt;
    Report::of(&ClockResetIssued {
        site: r.site,
        trusted_time: rfc3339(r.acknowledged_at),
        size: r.head.size,
        root: hex::encode(r.head.root),
        out: out.to_owned(),
    })
}

/// `hq site reset-clock`: the receipt that resets a site's trusted time, written.
#[derive(serde::Serialize)]
struct ClockResetIssued {
    site: String,
    trusted_time: String,
    size: u64,
    root: String,
    out: std::path::PathBuf,
}

impl Outcome for ClockResetIssued {
    fn text(&self) -> String {
        format!(
            "clock reset for site '{}': trusted time {} once it imports {} (it acknowledges the {} audit records HQ accepted; refused there if a device received keys since)",
            self.site,
            self.trusted_time,
            self.out.display(),
            self.size
        )
    }
}

pub(crate) fn entitlement_create(
    ctx: &Context,
    home: &Path,
    site: &str,
    policy: &Path,
    out: &Path,
) -> Result<EntitlementCreated, Failure> {
    // The policy is checked before anything else is touched: an invalid one writes nothing.
    let policy = keyfab_hq::entitlement::load_policy(policy)?;
    let node = ctx.open(home, NodeKind::Hq)?;
    let progress = Progress::new("generated", "pool keys", !ctx.json);
    let mut req = CreateRequest::new(site, policy, out);
    req.progress = progress.reporter();
    let created = keyfab_hq::entitlement::create(&node, req)?;
    Ok(EntitlementCreated {
        id: created.id,
        site: created.site,
        sequence: created.sequence,
        devices: created.devices,
        pool_keys: created.pool_keys,
        bytes: created.bytes,
        out: out.to_owned(),
    })
}

/// `hq entitlement create`: the `.kfe` written for a site.
#[derive(serde::Serialize)]
pub(crate) struct EntitlementCreated {
    pub id: String,
    pub site: String,
    pub sequence: u64,
    pub devices: u64,
    pub pool_keys: u64,
    pub bytes: u64,
    pub out: std::path::PathBuf,
}

impl Outcome for EntitlementCreated {
    fn text(&self) -> String {
        format!(
            "entitlement {} for site '{}' (sequence {}): {} devices, {} pool keys, {} bytes -> {}",
            self.id,
            self.site,
            self.sequence,
            self.devices,
            self.pool_keys,
            self.bytes,
            self.out.display()
        )
    }
}

pub(crate) fn issued_list(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let report = keyfab_hq::report::report(&node, node.now())?;
    Report::of(&IssuedList {
        entitlements: report
            .entitlements
            .into_iter()
            .map(|e| IssuedRow {
                id: e.entitlement,
                site: e.site,
                sequence: e.sequence,
                state: e.state,
                product: e.product,
                devices: e.quota,
                released: e.released,
                valid_from: rfc3339(e.valid_from),
                valid_until: rfc3339(e.valid_until),
            })
            .collect(),
    })
}

/// `hq entitlement list`: every entitlement HQ issued, where each stands as far as HQ
/// knows (its revocations, and the sites' logs imported so far).
#[derive(serde::Serialize)]
struct IssuedList {
    entitlements: Vec<IssuedRow>,
}

#[derive(serde::Serialize)]
struct IssuedRow {
    id: String,
    site: String,
    sequence: u64,
    state: keyfab_policy::EntitlementStatus,
    product: String,
    devices: u64,
    released: u64,
    valid_from: String,
    valid_until: String,
}

impl Outcome for IssuedList {
    fn text(&self) -> String {
        let mut text = format!(
            "{:<34} {:<16} {:>4} {:<18} {:<19} {:>10} {:>10}  WINDOW\n",
            "ID", "SITE", "SEQ", "PRODUCT", "STATE", "RELEASED", "DEVICES"
        );
        for e in &self.entitlements {
            text.push_str(&format!(
                "{:<34} {:<16} {:>4} {:<18} {:<19} {:>10} {:>10}  {} .. {}\n",
                e.id,
                e.site,
                e.sequence,
                e.product,
                e.state.as_str(),
                e.released,
                e.devices,
                e.valid_from,
                e.valid_until
            ));
        }
        if self.entitlements.is_empty() {
            text.push_str("no entitlements issued yet\n");
        }
        text
    }
}

pub(crate) fn revoke(
    ctx: &Context,
    home: &Path,
    id: &str,
    reason: &str,
    out: &Path,
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let r = keyfab_hq::revoke::revoke(&node, id, reason, out)?;
    Report::of(&RevocationWritten {
        entitlement: r.entitlement,
        site: r.site,
        sequence: r.sequence,
        out: out.to_owned(),
    })
}

/// `hq entitlement revoke`: the revocation for the site, written.
#[derive(serde::Serialize)]
struct RevocationWritten {
    entitlement: String,
    site: String,
    sequence: u64,
    out: std::path::PathBuf,
}

impl Outcome for RevocationWritten {
    fn text(&self) -> String {
        format!(
            "revocation of {} for site '{}' (sequence {}) written to {}",
            self.entitlement,
            self.site,
            self.sequence,
            self.out.display()
        )
    }
}

pub(crate) fn audit_import(
    ctx: &Context,
    home: &Path,
    file: &Path,
    receipt_out: Option<&Path>,
) -> Result<Report, Failure> {
    if let Some(out) = receipt_out {
        keyfab_node::out_file::check_new(out, "nothing was imported")?;
    }
    let node = ctx.open(home, NodeKind::Hq)?;
    let progress = Progress::new("verified", "audit records", !ctx.json);
    let i = keyfab_hq::audit::import(&node, file, progress.reporter())?;
    let head = i
        .head
        .ok_or_else(|| Failure::new(Code::Internal, "no checkpoint"))?;
    // Accepted, whether or not the site gets a receipt now: later entitlements carry
    // this checkpoint, and a clock reset acknowledges it.
    let receipt = keyfab_hq::receipts::acknowledge(&node, &i.site, head, i.checkpoint_time)?;
    if let Some(out) = receipt_out {
        keyfab_node::out_file::write_new(out, &receipt).map_err(|e| io_fail(out, e))?;
    }
    Report::of(&AuditImported {
        entitlements: i
            .per_entitlement
            .iter()
            .map(|(id, r)| ReconciledEntitlement {
                id: id.clone(),
                released: r.total,
                refusals: r.refusals.clone(),
                violations: r.violations,
            })
            .collect(),
        site: i.site,
        bundle: i.bundle,
        records: i.records,
        size: head.size,
        violations: i.violations,
        receipt: receipt_out.map(Path::to_owned),
    })
}

/// `hq audit import`: a site's bundle verified and reconciled.
#[derive(serde::Serialize)]
struct AuditImported {
    site: String,
    bundle: String,
    records: u64,
    size: u64,
    violations: Vec<keyfab_hq::audit::Violation>,
    entitlements: Vec<ReconciledEntitlement>,
    receipt: Option<std::path::PathBuf>,
}

#[derive(serde::Serialize)]
struct ReconciledEntitlement {
    id: String,
    released: u64,
    refusals: std::collections::BTreeMap<String, u64>,
    violations: u64,
}

impl Outcome for AuditImported {
    fn text(&self) -> String {
        let mut text = format!(
            "site '{}': {} audit records verified and reconciled (log now {} records); {} violation(s)\n",
            self.site,
            self.records,
            self.size,
            self.violations.len()
        );
        for v in &self.violations {
            text.push_str(&format!(
                "  VIOLATION #{} {}: {} ({})\n",
                v.sequence,
                v.kind,
                v.device_id.clone().unwrap_or_default(),
                v.detail
            ));
        }
        if let Some(out) = &self.receipt {
            text.push_str(&format!("receipt for the site -> {}\n", out.display()));
        }
        text
    }
}

pub(crate) fn hq_report(
    ctx: &Context,
    home: &Path,
    format: ReportFormat,
    out: Option<&Path>,
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let r = ReportTable(keyfab_hq::report::report(&node, node.now())?);
    // --format decides what is printed, or written to --out; with --out, standard output
    // gets one line saying where (one JSON summary under --json).
    match (format, out) {
        (ReportFormat::Html, None) => Err(Failure::new(
            Code::InvalidInput,
            "--format html needs --out FILE",
        )),
        (ReportFormat::Text, None) => Report::of(&r),
        (ReportFormat::Json, None) => {
            let mut report = Report::of(&r)?;
            report.text = format!("{:#}", report.json);
            Ok(report)
        }
        (_, Some(out)) => {
            let (body, what) = match format {
                ReportFormat::Json => (format!("{:#}\n", Report::of(&r)?.json), "JSON report"),
                ReportFormat::Html => (
                    keyfab_hq::html::render(&r.0, &node.name, &rfc3339(r.0.generated_at)),
                    "HTML report (self-contained, works offline)",
                ),
                ReportFormat::Text => (r.text(), "report"),
            };
            std::fs::write(out, body).map_err(|e| io_fail(out, e))?;
            Report::of(&ReportWritten {
                what,
                format: format.as_str(),
                out: out.to_owned(),
                entitlements: r.0.entitlements.len(),
                violations: r.0.violations.len(),
            })
        }
    }
}

/// HQ's report: its JSON is the report's own serde form, its text the table.
#[derive(serde::Serialize)]
#[serde(transparent)]
struct ReportTable(keyfab_hq::report::Report);

impl Outcome for ReportTable {
    fn text(&self) -> String {
        let mut text = format!(
            "{:<16} {:<34} {:<20} {:>13} {:>17} {:>16} {:>10}  {}\n",
            "SITE",
            "ENTITLEMENT",
            "PRODUCT",
            "TODAY/LIMIT",
            "TOTAL/QUOTA",
            "PROGRAMMED/FAIL",
            "VIOLATIONS",
            "REFUSALS"
        );
        for e in &self.0.entitlements {
            let limit = e.daily_limit.map_or("-".into(), |d| d.to_string());
            let refusals: Vec<String> =
                e.refusals.iter().map(|(c, n)| format!("{c} {n}")).collect();
            text.push_str(&format!(
                "{:<16} {:<34} {:<20} {:>13} {:>17} {:>16} {:>10}  {}{}\n",
                e.site,
                e.entitlement,
                e.product,
                format!("{}/{}", e.today, limit),
                format!("{}/{}", e.released, e.quota),
                format!("{}/{}", e.confirmed, e.burned),
                e.violations,
                if refusals.is_empty() {
                    "-".into()
                } else {
                    refusals.join(", ")
                },
                if e.revoked { "  (revoked)" } else { "" }
            ));
            if e.revoked_certificates > 0 {
                text.push_str(&format!(
                    "{:<16} {} device certificate(s) revoked by HQ (on the next `hq crl`)\n",
                    "", e.revoked_certificates
                ));
            }
        }
        if !self.0.violations.is_empty() {
            text.push_str("\nVIOLATIONS\n");
            for v in &self.0.violations {
                text.push_str(&format!(
                    "  {} #{} {} {} {}\n",
                    v.site,
                    v.sequence,
                    v.kind,
                    v.device_id.clone().unwrap_or_default(),
                    v.detail
                ));
            }
        }
        text
    }
}

/// `hq report --out`: where the report went.
#[derive(serde::Serialize)]
struct ReportWritten {
    #[serde(skip)]
    what: &'static str,
    format: &'static str,
    out: std::path::PathBuf,
    entitlements: usize,
    violations: usize,
}

impl Outcome for ReportWritten {
    fn text(&self) -> String {
        format!(
            "{} of {} entitlement(s), {} violation(s): {}",
            self.what,
            self.entitlements,
            self.violations,
            self.out.display()
        )
    }
}

/// What `hq manifest` is asked for.
pub(crate) struct ManifestArgs<'a> {
    pub(crate) entitlement: &'a str,
    pub(crate) format: ManifestFormat,
    pub(crate) out: &'a Path,
    pub(crate) include_failed: bool,
    pub(crate) key: Option<&'a str>,
    pub(crate) ca_out: Option<&'a Path>,
}

/// RFC 4180: a field with a comma, quote or line break is quoted, its quotes doubled.
fn csv_field(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\"")).into()
    } else {
        text.into()
    }
}

/// The manifest's CSV: a header, then one line per device certificate.
fn manifest_csv(rows: &[keyfab_hq::report::ManifestRow]) -> String {
    use base64::Engine;
    let mut b = String::from("device_id,entitlement,key,status,station,time,audit_sequence,audit_chain,key_id,cert_serial,certificate_sha256,chip_certificate_sha256,certificate_der_base64\n");
    for r in rows {
        let der = base64::engine::general_purpose::STANDARD.encode(&r.certificate_der);
        let fields = [
            csv_field(&r.device_id),
            csv_field(&r.entitlement),
            csv_field(&r.key),
            r.status.as_str().into(),
            csv_field(r.station.as_deref().unwrap_or("")),
            r.time.as_str().into(),
            r.audit_sequence.to_string().into(),
            csv_field(r.audit_chain.as_deref().unwrap_or("")),
            r.key_id.as_str().into(),
            r.cert_serial.as_str().into(),
            r.certificate_sha256.as_str().into(),
            r.chip_certificate_sha256.as_deref().unwrap_or("").into(),
            der.into(),
        ];
        b.push_str(&fields.join(","));
        b.push('\n');
    }
    b
}

pub(crate) fn hq_manifest(
    ctx: &Context,
    home: &Path,
    args: &ManifestArgs<'_>,
) -> Result<Report, Failure> {
    // A file of the same name is not overwritten: a manifest already handed to a cloud
    // stays what it was; the new one is written whole (temporary file, fsync, rename).
    keyfab_node::out_file::check_new(args.out, "no manifest was written")?;
    if let Some(ca_out) = args.ca_out {
        if ca_out == args.out {
            return Err(keyfab_node::Error::InvalidInput(
                "--ca-out and --out name the same file: give each its own".into(),
            )
            .into());
        }
        keyfab_node::out_file::check_new(ca_out, "no manifest was written")?;
    }
    let node = ctx.open(home, NodeKind::Hq)?;
    let (issued, mut rows) =
        keyfab_hq::report::manifest(&node, args.entitlement, args.include_failed)?;
    let certified: Vec<&str> = issued
        .policy
        .keys
        .iter()
        .filter(|k| k.certificate.is_some())
        .map(|k| k.name.as_str())
        .collect();
    match args.key {
        Some(key) if !certified.contains(&key) => {
            return Err(keyfab_node::Error::InvalidInput(format!(
                "--key {key}: the policy certifies {}",
                if certified.is_empty() {
                    "no key".to_owned()
                } else {
                    certified.join(", ")
                }
            ))
            .into())
        }
        Some(key) => rows.retain(|r| r.key == key),
        None if args.format == ManifestFormat::AwsIot && certified.len() > 1 => {
            return Err(keyfab_node::Error::InvalidInput(format!(
                "aws-iot registers one certificate per thing, and the policy certifies {}: choose one with --key",
                certified.join(", ")
            ))
            .into())
        }
        None => {}
    }
    let chain = keyfab_hq::report::ca_chain(&node, &issued)?;
    let batch_ca_pem = keyfab_crypto::x509::to_pem(&chain[0], "CERTIFICATE");
    let body = match args.format {
        ManifestFormat::Csv => manifest_csv(&rows),
        ManifestFormat::Json => format!(
            "{:#}\n",
            json!({"entitlement": args.entitlement, "site": issued.site, "batch_ca_pem": batch_ca_pem, "devices": rows})
        ),
        // A registration list: what is revoked is not registered.
        ManifestFormat::AwsIot => rows
            .iter()
            .filter(|r| {
                !matches!(
                    r.status,
                    keyfab_hq::report::DeviceStatus::Revoked
                        | keyfab_hq::report::DeviceStatus::Superseded
                )
            })
            .map(|r| {
                format!(
                    "{}\n",
                    json!({"ThingName": r.device_id, "SerialNumber": r.cert_serial, "CertificatePem": r.certificate_pem, "CACertificatePem": batch_ca_pem})
                )
            })
            .collect(),
    };
    if let Some(ca_out) = args.ca_out {
        let pem: String = chain
            .iter()
            .map(|c| keyfab_crypto::x509::to_pem(c, "CERTIFICATE"))
            .collect();
        keyfab_node::out_file::write_new(ca_out, pem.as_bytes()).map_err(|e| io_fail(ca_out, e))?;
    }
    keyfab_node::out_file::write_new(args.out, body.as_bytes())
        .map_err(|e| io_fail(args.out, e))?;
    let count = |status| rows.iter().filter(|r| r.status == status).count();
    Report::of(&ManifestWritten {
        entitlement: args.entitlement.to_owned(),
        site: issued.site,
        rows: rows.len(),
        programmed: count(keyfab_hq::report::DeviceStatus::Programmed),
        unconfirmed: count(keyfab_hq::report::DeviceStatus::Unconfirmed),
        failed: count(keyfab_hq::report::DeviceStatus::Failed),
        superseded: count(keyfab_hq::report::DeviceStatus::Superseded),
        format: args.format.as_str(),
        out: args.out.to_owned(),
        ca_out: args.ca_out.map(Path::to_owned),
    })
}

/// `hq manifest`: the device manifest of an entitlement, written.
#[derive(serde::Serialize)]
struct ManifestWritten {
    entitlement: String,
    site: String,
    rows: usize,
    programmed: usize,
    unconfirmed: usize,
    failed: usize,
    superseded: usize,
    format: &'static str,
    out: std::path::PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_out: Option<std::path::PathBuf>,
}

impl Outcome for ManifestWritten {
    fn text(&self) -> String {
        let mut text = format!(
            "{} device certificates of {} (site '{}'): {} programmed, {} unconfirmed{} -> {} ({})",
            self.rows,
            self.entitlement,
            self.site,
            self.programmed,
            self.unconfirmed,
            match (self.failed, self.superseded) {
                (0, 0) => String::new(),
                (f, 0) => format!(", {f} failed"),
                (f, s) => format!(", {f} failed, {s} superseded"),
            },
            self.out.display(),
            self.format
        );
        if let Some(ca) = &self.ca_out {
            text.push_str(&format!(
                "\nbatch CA and its chain to the root -> {}",
                ca.display()
            ));
        }
        text
    }
}

pub(crate) fn device_revoke(
    ctx: &Context,
    home: &Path,
    (entitlement, device_id): (&str, &str),
    reason: keyfab_crypto::x509::CrlReason,
    superseded_only: bool,
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let done = keyfab_hq::devices::revoke_device(
        &node,
        (entitlement, device_id),
        reason,
        superseded_only,
    )?;
    Report::of(&DeviceRevokedOut {
        device_id: device_id.to_owned(),
        entitlement: entitlement.to_owned(),
        done,
    })
}

/// `hq device revoke`: what was revoked.
#[derive(serde::Serialize)]
struct DeviceRevokedOut {
    device_id: String,
    entitlement: String,
    #[serde(flatten)]
    done: keyfab_hq::devices::DeviceRevoked,
}

impl Outcome for DeviceRevokedOut {
    fn text(&self) -> String {
        let mut lines = vec![format!(
            "device {} of {}: {} certificate(s) revoked{}",
            self.device_id,
            self.entitlement,
            self.done.revoked.len(),
            if self.done.already.is_empty() {
                String::new()
            } else {
                format!(", {} revoked before", self.done.already.len())
            }
        )];
        for r in self.done.revoked.iter().chain(&self.done.already) {
            lines.push(format!(
                "  {} serial {} ({}, {})",
                r.key,
                r.serial,
                r.reason,
                rfc3339(r.revoked_at)
            ));
        }
        lines.push(format!(
            "publish a new CRL: keyfab hq crl --entitlement {} --out FILE",
            self.entitlement
        ));
        lines.join("\n")
    }
}

pub(crate) fn device_show(ctx: &Context, home: &Path, device_id: &str) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let releases = keyfab_hq::devices::show_device(&node, device_id)?;
    Report::of(&DeviceShown { releases })
}

/// `hq device show`: a device's provenance.
#[derive(serde::Serialize)]
struct DeviceShown {
    releases: Vec<keyfab_hq::devices::Provenance>,
}

impl Outcome for DeviceShown {
    fn text(&self) -> String {
        let mut lines = Vec::new();
        for p in &self.releases {
            lines.push(format!("device {}: {}", p.device_id, p.status.as_str()));
            lines.push(format!(
                "  site {}, entitlement {} ({})",
                p.site, p.entitlement, p.product
            ));
            lines.push(format!(
                "  released {} to station {}, audit record {}{}",
                p.time,
                p.station.as_deref().unwrap_or("(unknown)"),
                p.audit_sequence,
                p.audit_chain
                    .as_deref()
                    .map(|c| format!(" of chain {c}"))
                    .unwrap_or_default()
            ));
            lines.push(format!(
                "  covered by the checkpoint HQ accepted: {} records, root {}",
                p.checkpoint_size, p.checkpoint_root
            ));
            if let Some(chip) = &p.chip {
                lines.push(format!(
                    "  attested chip: certificate SHA-256 {}, serial {}",
                    chip.certificate_sha256, chip.serial
                ));
            }
            for k in &p.keys {
                let mut line = format!("  key {}: {}", k.name, k.key_id);
                if let (Some(serial), Some(sha), Some(until)) =
                    (&k.cert_serial, &k.cert_sha256, &k.cert_not_after)
                {
                    line.push_str(&format!(
                        "\n    certificate serial {serial}, SHA-256 {sha}, valid until {until}"
                    ));
                }
                if let Some(r) = &k.revoked {
                    line.push_str(&format!(
                        "\n    revoked {} ({})",
                        rfc3339(r.revoked_at),
                        r.reason
                    ));
                }
                lines.push(line);
            }
        }
        lines.join("\n")
    }
}

pub(crate) fn hq_crl(
    ctx: &Context,
    home: &Path,
    entitlement: &str,
    out: &Path,
    days: u32,
) -> Result<Report, Failure> {
    keyfab_node::out_file::check_new(out, "no CRL was written")?;
    let node = ctx.open(home, NodeKind::Hq)?;
    let crl = keyfab_hq::devices::crl(&node, entitlement, days)?;
    let pem = keyfab_crypto::x509::to_pem(&crl.der, "X509 CRL");
    keyfab_node::out_file::write_new(out, pem.as_bytes()).map_err(|e| io_fail(out, e))?;
    Report::of(&CrlWritten {
        entitlement: entitlement.to_owned(),
        number: crl.number,
        entries: crl.entries,
        next_update: rfc3339(crl.next_update),
        out: out.to_owned(),
    })
}

/// `hq crl`: the CRL written.
#[derive(serde::Serialize)]
struct CrlWritten {
    entitlement: String,
    number: u64,
    entries: usize,
    next_update: String,
    out: std::path::PathBuf,
}

impl Outcome for CrlWritten {
    fn text(&self) -> String {
        format!(
            "CRL {} of {}'s batch CA: {} revoked certificate(s), next update by {} -> {}",
            self.number,
            self.entitlement,
            self.entries,
            self.next_update,
            self.out.display()
        )
    }
}

/// `hq status`: HQ at a glance.
pub(crate) fn hq_status(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let status = keyfab_hq::status::hq_status(&node, node.now())?;
    let json =
        serde_json::to_value(&status).map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    Ok(Report::new(hq_status_text(&status), json))
}

/// The HQ status screen.
fn hq_status_text(s: &keyfab_hq::status::HqStatus) -> String {
    let mut out = format!("HQ {}: clock {}\n", s.hq, rfc3339(s.clock));
    if s.warnings.is_empty() {
        out.push_str("  nothing needs a person soon\n");
    } else {
        out.push_str("warnings:\n");
        for w in &s.warnings {
            out.push_str(&format!("  ! {w}\n"));
        }
    }
    out.push_str("sites:\n");
    if s.sites.is_empty() {
        out.push_str("  none registered\n");
    }
    for site in &s.sites {
        let last = site.last_record_at.map_or_else(
            || "no audit yet".to_owned(),
            |t| format!("last record {}", rfc3339(t)),
        );
        let acked = site
            .acknowledged_at
            .map(|t| format!(", receipt of {} imported", rfc3339(t)))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {}: {} records in {} exports, {last}{acked}\n",
            site.site, site.records, site.exports
        ));
    }
    out.push_str("entitlements:\n");
    if s.entitlements.is_empty() {
        out.push_str("  none issued\n");
    }
    for e in &s.entitlements {
        let audit = e
            .audit_due_at
            .map(|d| format!(", audit due {}", rfc3339(d)))
            .unwrap_or_default();
        let violations = if e.violations > 0 {
            format!(", {} VIOLATIONS", e.violations)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  {} at {} {} ({}): {}/{} released, window ends {}{audit}{violations}\n",
            e.id,
            e.site,
            e.state,
            e.product,
            e.released,
            e.quota,
            rfc3339(e.valid_until)
        ));
    }
    out.push_str(&format!("violations: {}", s.violations));
    out
}
