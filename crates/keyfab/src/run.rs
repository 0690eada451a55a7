//! Command implementations. Each returns a [`Report`]; `demo` and `bench` call the same
//! functions.

use crate::cli::*;
use crate::context::{peak_rss_bytes, rfc3339, Context};
use crate::output::{io_fail, read_input, read_input_text, Failure, Progress, Report};
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::x509::{self, Role};
use keyfab_hq::entitlement::CreateRequest;
use keyfab_node::Code;
use keyfab_node::{Node, NodeKind};
use serde_json::json;
use std::path::Path;

/// The size cap of a device list or a policy module's cases: a million ids of the
/// longest kind, with their line ends.
const MAX_LIST_BYTES: usize = 1_000_000 * (keyfab_policy::MAX_ID_BYTES + 1);

pub(crate) fn dispatch(cli: Cli) -> Result<Report, Failure> {
    let ctx = Context {
        passphrase_file: cli.passphrase_file,
        unseal_share_files: cli.unseal_share_file,
        json: cli.json,
    };
    let mut report = match cli.command {
        Command::Pki(PkiCommand::InitRoot {
            home,
            subject,
            days,
        }) => init_root(&ctx, &home.home, &subject, days),
        Command::Pki(PkiCommand::Issue {
            home,
            csr,
            role,
            out,
            days,
        }) => issue(&ctx, &home.home, &csr, &role, &out, days),
        Command::Hq(HqCommand::Init(a)) => init_node(&ctx, &a, NodeKind::Hq),
        Command::Hq(HqCommand::InstallCert(a)) => {
            install_cert(&ctx, &a.home.home, NodeKind::Hq, &a.cert, &a.root_cert)
        }
        Command::Hq(HqCommand::Site(HqSiteCommand::Add { home, file })) => {
            site_add(&ctx, &home.home, &file)
        }
        Command::Hq(HqCommand::Site(HqSiteCommand::List { home })) => site_list(&ctx, &home.home),
        Command::Hq(HqCommand::Site(HqSiteCommand::ResetClock { home, site, out })) => {
            site_reset_clock(&ctx, &home.home, &site, &out)
        }
        Command::Hq(HqCommand::Entitlement(HqEntitlementCommand::Create {
            home,
            site,
            policy,
            out,
        })) => entitlement_create(&ctx, &home.home, &site, &policy, &out),
        Command::Hq(HqCommand::Entitlement(HqEntitlementCommand::Revoke {
            home,
            id,
            reason,
            out,
        })) => revoke(&ctx, &home.home, &id, &reason, &out),
        Command::Hq(HqCommand::Entitlement(HqEntitlementCommand::List { home })) => {
            issued_list(&ctx, &home.home)
        }
        Command::Site(SiteCommand::Init(a)) => init_node(&ctx, &a, NodeKind::Site),
        Command::Site(SiteCommand::InstallCert(a)) => {
            install_cert(&ctx, &a.home.home, NodeKind::Site, &a.cert, &a.root_cert)
        }
        Command::Site(SiteCommand::Identity(SiteIdentityCommand::Export { home, out })) => {
            identity_export(&ctx, &home.home, &out)
        }
        Command::Site(SiteCommand::Entitlement(SiteEntitlementCommand::Import { home, file })) => {
            entitlement_import(&ctx, &home.home, &file)
        }
        Command::Site(SiteCommand::Entitlement(SiteEntitlementCommand::List { home })) => {
            entitlement_list(&ctx, &home.home)
        }
        Command::Site(SiteCommand::Provision(a)) => provision(&ctx, &a),
        Command::Site(SiteCommand::Station(SiteStationCommand::Enroll {
            home,
            name,
            out,
            days,
        })) => crate::line::station_enroll(&ctx, &home.home, &name, &out, days),
        Command::Site(SiteCommand::Station(SiteStationCommand::Revoke { home, name })) => {
            crate::line::station_revoke(&ctx, &home.home, &name)
        }
        Command::Site(SiteCommand::Station(SiteStationCommand::List { home })) => {
            crate::line::station_list(&ctx, &home.home)
        }
        Command::Site(SiteCommand::RotateKeys { home }) => {
            rotate_keys(&ctx, &home.home, NodeKind::Site)
        }
        Command::Hq(HqCommand::RotateKeys { home }) => rotate_keys(&ctx, &home.home, NodeKind::Hq),
        Command::Site(SiteCommand::Unseal {
            home,
            share_file,
            status,
        }) => crate::line::unseal(&home.home, share_file.as_deref(), status),
        Command::Site(SiteCommand::Serve(a)) => crate::line::serve(&ctx, &a, ctx.json),
        Command::Station(StationCommand::Run {
            station: StationArgs { url, station_dir },
            root_cert,
            entitlement,
            devices,
            concurrency,
            device_prefix,
            first,
        }) => crate::line::station_run(
            &ctx,
            &crate::line::LineArgs {
                urls: &url,
                station_dir: &station_dir,
                root_cert: &root_cert,
                entitlement: &entitlement,
                devices,
                concurrency,
                prefix: &device_prefix,
                first,
            },
        ),
        Command::Station(StationCommand::Confirm {
            station: StationArgs { url, station_dir },
            entitlement,
            device_id,
            result,
        }) => crate::line::station_confirm(&url, &station_dir, &entitlement, &device_id, &result),
        Command::Station(StationCommand::Provision {
            station: StationArgs { url, station_dir },
            entitlement,
            device_id,
            request_id,
            csr,
            out,
        }) => crate::line::station_provision(
            &ctx,
            &url,
            &station_dir,
            &entitlement,
            &device_id,
            request_id.as_deref(),
            csr.as_deref(),
            out.as_deref(),
        ),
        Command::Site(SiteCommand::Config {
            home,
            clock_tolerance,
            clock_max_jump,
        }) => site_config(&ctx, &home.home, clock_tolerance, clock_max_jump),
        Command::Site(SiteCommand::Audit(SiteAuditCommand::Verify { home })) => {
            audit_verify(&ctx, &home.home)
        }
        Command::Site(SiteCommand::Audit(SiteAuditCommand::Export { home, out, again })) => {
            audit_export(&ctx, &home.home, &out, again)
        }
        Command::Hq(HqCommand::Audit(HqAuditCommand::Import {
            home,
            file,
            receipt_out,
        })) => audit_import(&ctx, &home.home, &file, receipt_out.as_deref()),
        Command::Hq(HqCommand::Report { home, format, out }) => {
            hq_report(&ctx, &home.home, &format, out.as_deref())
        }
        Command::Hq(HqCommand::Manifest {
            home,
            entitlement,
            format,
            out,
        }) => hq_manifest(&ctx, &home.home, &entitlement, &format, &out),
        Command::Site(SiteCommand::Audit(SiteAuditCommand::Checkpoint { home, out })) => {
            audit_checkpoint(&ctx, &home.home, &out)
        }
        Command::Site(SiteCommand::Receipt(SiteReceiptCommand::Import { home, file })) => {
            receipt_import(&ctx, &home.home, &file)
        }
        Command::Approver(ApproverCommand::Keygen { out }) => approver_keygen(&ctx, &out),
        Command::Approver(ApproverCommand::Sign { key, request, out }) => {
            approver_sign(&key, &request, &out)
        }
        Command::Site(SiteCommand::Approval(SiteApprovalCommand::Request {
            home,
            entitlement,
            action,
            out,
            expires_in_hours,
        })) => approval_request(
            &ctx,
            &home.home,
            &entitlement,
            &action,
            &out,
            expires_in_hours,
        ),
        Command::Site(SiteCommand::Approval(SiteApprovalCommand::Submit { home, approvals })) => {
            approval_submit(&ctx, &home.home, &approvals)
        }
        Command::Policy(PolicyCommand::Test { module, cases }) => policy_test(&module, &cases),
        Command::Demo { dir, devices } => crate::demo::run(&ctx, dir.as_deref(), devices),
        Command::Bench(BenchCommand::Serve {
            flood_station: Some(flooders),
            paced_stations,
            paced_rate,
            seconds,
            dir,
            ..
        }) => {
            if !(seconds.is_finite() && (0.5..=600.0).contains(&seconds)) {
                return Err(Failure::usage("--seconds must be between 0.5 and 600"));
            }
            let flood = crate::bench_flood::Flood {
                flooders,
                paced_stations,
                paced_rate,
                seconds,
            };
            crate::bench_flood::flood(&flood, dir.as_deref())
        }
        Command::Bench(BenchCommand::Serve {
            stations,
            devices,
            chip,
            dir,
            ..
        }) => crate::bench_serve::serve(stations, devices, chip, dir.as_deref()),
        Command::Bench(BenchCommand::Provision {
            concurrency,
            devices,
            seconds,
            dir,
            custody,
            pkcs11_module,
            policy_module,
            store,
            nodes,
            key_source,
        }) => {
            let token = (custody == "pkcs11").then_some(pkcs11_module.as_path());
            crate::bench::provision(
                &ctx,
                concurrency,
                devices.map_or(
                    crate::bench::LevelLength::Seconds(seconds),
                    crate::bench::LevelLength::Devices,
                ),
                dir.as_deref(),
                token,
                policy_module.as_deref(),
                &crate::bench::SiteOption {
                    spec: store,
                    nodes,
                    key_source,
                },
            )
        }
        Command::Bench(BenchCommand::Audit {
            records,
            random_ids,
            dir,
        }) => crate::bench::audit(records, random_ids, dir.as_deref()),
        Command::Bench(BenchCommand::Entitlement { devices, dir }) => {
            crate::bench::entitlement(&ctx, devices, dir.as_deref())
        }
    }?;
    if std::env::var_os("KEYFAB_REPORT_PEAK_RSS").is_some() {
        if let (Some(obj), Some(rss)) = (report.json.as_object_mut(), peak_rss_bytes()) {
            obj.insert("peak_rss_bytes".into(), json!(rss));
        }
    }
    Ok(report)
}

pub(crate) fn init_root(
    ctx: &Context,
    home: &Path,
    subject: &str,
    days: i64,
) -> Result<Report, Failure> {
    let rng = ctx.rng();
    let path = keyfab_hq::pki::init_root(
        home,
        subject,
        days,
        &ctx.passphrase()?,
        rng.as_ref(),
        ctx.now()?,
    )?;
    Ok(Report::new(
        format!(
            "root CA created; its certificate is {} (the key stays sealed in {})",
            path.display(),
            home.display()
        ),
        json!({"root_cert": path, "subject": subject}),
    ))
}

pub(crate) fn issue(
    ctx: &Context,
    home: &Path,
    csr: &Path,
    role: &str,
    out: &Path,
    days: i64,
) -> Result<Report, Failure> {
    let role = Role::parse(role)
        .ok_or_else(|| Failure::new(Code::InvalidInput, "--role must be hq or site"))?;
    let csr_pem = read_input_text(csr, keyfab_formats::MAX_SMALL_INPUT)?;
    let rng = ctx.rng();
    let issued = keyfab_hq::pki::issue(
        home,
        &csr_pem,
        role,
        days,
        &ctx.unlock_secret(home)?,
        rng.as_ref(),
        ctx.now()?,
    )?;
    std::fs::write(out, &issued.pem).map_err(|e| io_fail(out, e))?;
    Ok(Report::new(
        format!(
            "issued a {} cluster certificate for '{}' (serial {}, valid until {}) -> {}",
            role.as_str(),
            issued.subject,
            issued.serial_hex,
            rfc3339(issued.not_after.0),
            out.display()
        ),
        json!({"cert": out, "subject": issued.subject, "role": role.as_str(), "serial": issued.serial_hex, "not_after": rfc3339(issued.not_after.0)}),
    ))
}

pub(crate) fn init_node(
    ctx: &Context,
    a: &crate::cli::InitArgs,
    kind: NodeKind,
) -> Result<Report, Failure> {
    let (home, name) = (&a.home.home, a.name.as_str());
    let rng = ctx.rng();
    // Sealed by shares: the keystore's secret is an unseal key nobody sees whole.
    let split = match (a.unseal_shares, a.unseal_threshold) {
        (Some(n), Some(m)) => Some(
            keyfab_custody::unseal::split(m, n, rng.as_ref()).map_err(keyfab_node::Error::from)?,
        ),
        _ => None,
    };
    let custody = keyfab_node::CustodyChoice::parse(&a.custody)?;
    let tls = a.etcd_ca.clone().map(|ca| keyfab_node::EtcdTlsFiles {
        ca,
        cert: a.etcd_cert.clone(),
        key: a.etcd_key.clone(),
    });
    if tls.is_none() && (a.etcd_cert.is_some() || a.etcd_key.is_some()) {
        return Err(Failure::usage("--etcd-cert and --etcd-key need --etcd-ca"));
    }
    let store = keyfab_node::StoreChoice::parse_with(&a.store, name, tls)?;
    let node = Node::init_with(
        home,
        kind,
        name,
        &custody,
        &store,
        &match &split {
            Some(s) => s.passphrase.clone(),
            None => ctx.passphrase()?,
        },
        rng,
        ctx.clock()?,
    )?;
    if let Some(s) = &split {
        s.config.save(home).map_err(keyfab_node::Error::from)?;
    }
    let csr = node.dir.join(keyfab_node::CSR_FILE);
    let what = if kind == NodeKind::Hq { "hq" } else { "site" };
    let mut text = format!(
        "{what} '{name}' created in {}; have the root CA sign {}:\n  keyfab pki issue --home ROOT --csr {} --role {what} --out {name}.crt",
        home.display(), csr.display(), csr.display()
    );
    let mut json = json!({"name": name, "kind": what, "csr": csr});
    if let Some(s) = &split {
        text.push_str(&format!(
            "\n\nThe keystore is sealed by {} shares; any {} unseal it. They are shown this once: give one to each holder, keep none together.\n",
            s.config.shares, s.config.threshold
        ));
        for share in &s.shares {
            text.push_str(&format!("  {}\n", share.as_str()));
        }
        text.push_str("Unseal a running `site serve` with `keyfab site unseal`; one-shot commands take --unseal-share-file FILE once per share.");
        json["unseal"] = json!({
            "shares": s.shares.iter().map(|x| x.as_str()).collect::<Vec<_>>(),
            "threshold": s.config.threshold,
        });
    }
    Ok(Report::new(text, json))
}

pub(crate) fn install_cert(
    ctx: &Context,
    home: &Path,
    kind: NodeKind,
    cert: &Path,
    root: &Path,
) -> Result<Report, Failure> {
    let mut node = ctx.open(home, kind)?;
    let cert_der = keyfab_hq::pki::read_pem_file(cert, "CERTIFICATE")?;
    let root_der = keyfab_hq::pki::read_pem_file(root, "CERTIFICATE")?;
    let service = node.install_cert(&cert_der, &root_der)?;
    let fp = keyfab_crypto::hash::Fingerprint::of(&cert_der);
    Ok(Report::new(
        format!(
            "cluster certificate installed for '{}' ({fp}); service keys generation {} issued",
            node.name, service.generation
        ),
        json!({"name": node.name, "cluster_cert_sha256": fp.to_hex(), "service_generation": service.generation}),
    ))
}

/// `site|hq rotate-keys`: the next generation of service keys.
pub(crate) fn rotate_keys(ctx: &Context, home: &Path, kind: NodeKind) -> Result<Report, Failure> {
    let mut node = ctx.open(home, kind)?;
    let next = match kind {
        NodeKind::Site => keyfab_site::identity::rotate_keys(&mut node)?,
        NodeKind::Hq => node.rotate_service_keys()?,
    };
    let fp = |c: &[u8]| keyfab_crypto::hash::Fingerprint::of(c).to_hex();
    let next_step = match kind {
        NodeKind::Site => format!(
            "send HQ the new identity: keyfab site identity export --home {} --out {}.kfi, then keyfab hq site add",
            home.display(),
            node.name
        ),
        NodeKind::Hq => "sites learn HQ's new encryption key from the next entitlement".into(),
    };
    Ok(Report::new(
        format!(
            "'{}' now uses service keys of generation {} (signing certificate {}, encryption certificate {}); the previous keys still open and verify what they sealed and signed.\nNext: {next_step}",
            node.name,
            next.generation,
            fp(&next.signing_cert),
            fp(&next.hpke_cert)
        ),
        json!({"name": node.name, "generation": next.generation, "signing_cert_sha256": fp(&next.signing_cert), "hpke_cert_sha256": fp(&next.hpke_cert)}),
    ))
}

pub(crate) fn identity_export(ctx: &Context, home: &Path, out: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let bytes = keyfab_site::identity::export_identity(&node)?;
    std::fs::write(out, &bytes).map_err(|e| io_fail(out, e))?;
    Ok(Report::new(
        format!("site identity of '{}' written to {} ({} bytes); register it at HQ with `keyfab hq site add`", node.name, out.display(), bytes.len()),
        json!({"site": node.name, "out": out, "bytes": bytes.len()}),
    ))
}

pub(crate) fn site_add(ctx: &Context, home: &Path, file: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let bytes = read_input(file, keyfab_formats::identity::MAX_LEN)?;
    let rec = keyfab_hq::sites::add_site(&node, &bytes)?;
    let fp = keyfab_crypto::hash::Fingerprint::of(&rec.cluster_cert);
    Ok(Report::new(
        format!("site '{}' registered (cluster certificate {fp})", rec.name),
        json!({"site": rec.name, "cluster_cert_sha256": fp.to_hex(), "last_sequence": rec.last_sequence}),
    ))
}

pub(crate) fn site_list(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let sites = keyfab_hq::sites::list_sites(&node)?;
    let mut text = format!(
        "{:<24} {:>14} {:>16}  LAST CLOCK RESET\n",
        "SITE", "ENTITLEMENTS", "AUDIT RECORDS"
    );
    for s in &sites {
        let records = s.acknowledged.map_or("-".into(), |h| h.size.to_string());
        let reset = s
            .clock_resets
            .last()
            .map_or("-".into(), |r| rfc3339(r.acknowledged_at));
        text.push_str(&format!(
            "{:<24} {:>14} {:>16}  {reset}\n",
            s.name, s.last_sequence, records
        ));
    }
    let json_of = |s: &keyfab_hq::sites::SiteRecord| {
        json!({
            "site": s.name,
            "entitlements_issued": s.last_sequence,
            "audit_records_acknowledged": s.acknowledged.map(|h| h.size),
            "clock_resets": s.clock_resets.iter().map(|r| json!({"issued_at": rfc3339(r.acknowledged_at), "trusted_time": rfc3339(r.trusted_time), "size": r.size})).collect::<Vec<_>>(),
        })
    };
    Ok(Report::new(
        text,
        json!({"sites": sites.iter().map(json_of).collect::<Vec<_>>()}),
    ))
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
    let (r, to) = (&reset.receipt, reset.receipt.acknowledged_at);
    Ok(Report::new(
        format!(
            "clock reset for site '{}': trusted time {} once it imports {} (it acknowledges the {} audit records HQ accepted; refused there if a device received keys since)",
            r.site,
            rfc3339(to),
            out.display(),
            r.head.size
        ),
        json!({"site": r.site, "trusted_time": rfc3339(to), "size": r.head.size, "root": hex::encode(r.head.root), "out": out}),
    ))
}

pub(crate) fn entitlement_create(
    ctx: &Context,
    home: &Path,
    site: &str,
    policy: &Path,
    out: &Path,
) -> Result<Report, Failure> {
    // The policy is checked before anything else is touched: an invalid one writes nothing.
    let policy = keyfab_hq::entitlement::load_policy(policy)?;
    let node = ctx.open(home, NodeKind::Hq)?;
    let progress = Progress::new("generated", "pool keys", !ctx.json);
    let mut req = CreateRequest::new(site, policy, out);
    req.progress = progress.reporter();
    let created = keyfab_hq::entitlement::create(&node, req)?;
    Ok(Report::new(
        format!(
            "entitlement {} for site '{}' (sequence {}): {} devices, {} pool keys, {} bytes -> {}",
            created.id,
            created.site,
            created.sequence,
            created.devices,
            created.pool_keys,
            created.bytes,
            out.display()
        ),
        json!({"id": created.id, "site": created.site, "sequence": created.sequence, "devices": created.devices, "pool_keys": created.pool_keys, "bytes": created.bytes, "out": out}),
    ))
}

pub(crate) fn issued_list(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let issued = keyfab_hq::entitlement::list_issued(&node)?;
    let mut text = format!(
        "{:<34} {:<16} {:>4} {:<18} {:>10}\n",
        "ID", "SITE", "SEQ", "PRODUCT", "DEVICES"
    );
    for e in &issued {
        text.push_str(&format!(
            "{:<34} {:<16} {:>4} {:<18} {:>10}\n",
            e.id, e.site, e.sequence, e.policy.product, e.policy.devices
        ));
    }
    Ok(Report::new(
        text,
        json!({"entitlements": issued.iter().map(|e| json!({"id": e.id, "site": e.site, "sequence": e.sequence, "product": e.policy.product, "devices": e.policy.devices})).collect::<Vec<_>>()}),
    ))
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
    Ok(Report::new(
        format!(
            "revocation of {} for site '{}' (sequence {}) written to {}",
            r.entitlement,
            r.site,
            r.sequence,
            out.display()
        ),
        json!({"entitlement": r.entitlement, "site": r.site, "sequence": r.sequence, "out": out}),
    ))
}

pub(crate) fn entitlement_import(
    ctx: &Context,
    home: &Path,
    file: &Path,
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let mut head = [0u8; 8];
    let is_revocation = std::fs::File::open(file)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && keyfab_formats::prefix::kind_of(&head) == Some(keyfab_formats::prefix::Kind::Revocation);
    if is_revocation {
        let bytes = read_input(file, keyfab_formats::revocation::MAX_LEN)?;
        let r = keyfab_site::revocation::import_revocation(&node, &bytes)?;
        return Ok(Report::new(
            format!(
                "entitlement {} revoked (sequence {}); {} unused pool keys destroyed",
                r.entitlement, r.sequence, r.destroyed_pool_keys
            ),
            json!({"revoked": r.entitlement, "sequence": r.sequence, "destroyed_pool_keys": r.destroyed_pool_keys}),
        ));
    }
    let progress = Progress::new("stored", "pool keys", !ctx.json);
    let imported = keyfab_site::entitlements::import(&node, file, progress.reporter())?;
    Ok(Report::new(
        format!(
            "imported entitlement {} from '{}' (sequence {}): {} pool keys stored encrypted; state {}",
            imported.id, imported.hq, imported.sequence, imported.pool_keys, imported.state
        ),
        json!({"id": imported.id, "hq": imported.hq, "sequence": imported.sequence, "pool_keys": imported.pool_keys, "state": imported.state}),
    ))
}

pub(crate) fn entitlement_list(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let list = keyfab_site::entitlements::list(&node)?;
    let mut text = String::new();
    let mut items = Vec::new();
    for e in &list {
        let p = &e.policy;
        let state = keyfab_site::entitlements::status(&node, e)?;
        text.push_str(&format!(
            "{}  {}  from {} (sequence {}), {}\n  devices {}  daily {}  ({})  window {} .. {}\n",
            e.id,
            p.product,
            e.hq,
            e.sequence,
            state,
            p.devices,
            p.daily_limit.map_or("none".into(), |d| d.to_string()),
            p.timezone,
            rfc3339(p.valid_from),
            rfc3339(p.valid_until)
        ));
        // Devices allowed so far; on a cluster, also the quota nodes hold in reserve.
        let provisioned = keyfab_site::provision::counters(&node, &e.id)?.total;
        let held: u64 = keyfab_site::provision::reservations(&node, &e.id)?
            .iter()
            .map(|r| r.granted.saturating_sub(r.used))
            .sum();
        text.push_str(&format!("  provisioned {provisioned} of {}", p.devices));
        if held > 0 {
            text.push_str(&format!(", {held} more reserved by cluster nodes"));
        }
        text.push('\n');
        let mut keys = Vec::new();
        for k in &p.keys {
            let pool = e
                .pool
                .iter()
                .find(|s| s.key == k.name)
                .map_or(0, |s| s.count);
            text.push_str(&format!(
                "  key {:<12} {:<8} {:<8} pool keys {}\n",
                k.name,
                k.key_type.as_str(),
                k.source.as_str(),
                pool
            ));
            keys.push(json!({"name": k.name, "type": k.key_type.as_str(), "source": k.source.as_str(), "pool_keys": pool}));
        }
        let mut policy = serde_json::to_value(p).unwrap_or_default();
        if let Some(code) = &p.code {
            text.push_str(&format!(
                "  policy module {} ({} bytes, sha256 {})\n",
                code.name,
                code.module.len(),
                code.sha256
            ));
            // The module by name, size and hash; its bytes are in the entitlement.
            policy["code"] =
                json!({"name": code.name, "sha256": code.sha256, "bytes": code.module.len()});
        }
        items.push(json!({
            "id": e.id, "hq": e.hq, "sequence": e.sequence, "state": state,
            "policy": policy,
            "keys": keys,
            "pool_keys": e.pool.iter().map(|s| s.count).sum::<u64>(),
            "provisioned": provisioned,
            "reserved_by_nodes": held,
            "imported_at": rfc3339(e.imported_at),
        }));
    }
    if list.is_empty() {
        text.push_str("no entitlements imported yet\n");
    }
    Ok(Report::new(text, json!({"entitlements": items})))
}

pub(crate) fn approver_keygen(ctx: &Context, out: &Path) -> Result<Report, Failure> {
    let key = SigningKey::generate(ctx.rng().as_ref())
        .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    let key_path = out.with_extension("key");
    let pub_path = out.with_extension("pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(Failure::new(
                Code::InvalidState,
                format!("{} exists; refusing to overwrite", p.display()),
            ));
        }
    }
    let pem = x509::to_pem(key.to_pkcs8().expose(), "PRIVATE KEY");
    write_private(&key_path, pem.as_bytes()).map_err(|e| io_fail(&key_path, e))?;
    let public = key.verifying_key();
    std::fs::write(&pub_path, public.to_pem()).map_err(|e| io_fail(&pub_path, e))?;
    Ok(Report::new(
        format!(
            "approver key written: {} (keep it private) and {} (fingerprint {})",
            key_path.display(),
            pub_path.display(),
            public.fingerprint()
        ),
        json!({"key": key_path, "pub": pub_path, "fingerprint": public.fingerprint().to_hex()}),
    ))
}

/// `keyfab policy test`: the module checked as HQ checks it, then every case in order.
fn policy_test(module_path: &Path, cases_path: &Path) -> Result<Report, Failure> {
    let bytes = read_input(module_path, 4 * keyfab_policy_code::MAX_MODULE_BYTES)?;
    let wasm = keyfab_policy_code::module_bytes(module_path, bytes)
        .map_err(|e| Failure::new(Code::Malformed, e.to_string()))?;
    let module = keyfab_policy_code::PolicyModule::load(&wasm)
        .map_err(|e| Failure::new(Code::Malformed, format!("{}: {e}", module_path.display())))?;
    let text = read_input_text(cases_path, MAX_LIST_BYTES)?;
    let file: keyfab_policy_code::cases::CaseFile = serde_json::from_str(&text)
        .map_err(|e| Failure::new(Code::Malformed, format!("{}: {e}", cases_path.display())))?;
    let report = keyfab_policy_code::cases::run_cases(&module, &file)
        .map_err(|e| Failure::new(Code::Malformed, format!("{}: {e}", cases_path.display())))?;
    let mut lines = Vec::new();
    let mut results = Vec::new();
    for o in &report.outcomes {
        let expected = file.cases[o.case - 1]
            .expect
            .clone()
            .unwrap_or_else(|| "confirm failed".into());
        let times = if o.runs == 1 {
            String::new()
        } else {
            format!(" ×{}", o.runs)
        };
        match &o.mismatch {
            None => lines.push(format!("  ok    {}{times}: {expected}", o.name)),
            Some((run, got)) => lines.push(format!(
                "  FAIL  {}{times}: expected {expected}, run {run} gave {got}",
                o.name
            )),
        }
        results.push(json!({
            "case": o.case,
            "name": o.name,
            "runs": o.runs,
            "expected": expected,
            "passed": o.mismatch.is_none(),
            "failed_run": o.mismatch.as_ref().map(|(run, _)| run),
            "got": o.mismatch.as_ref().map(|(_, got)| got),
            "fuel_max": o.fuel_max,
        }));
    }
    let failed = report.failed().count();
    let sha256 = keyfab_crypto::hash::sha256(&wasm);
    let summary = format!(
        "{}: {} of {} cases hold ({} evaluations, at most {} fuel of {})",
        module_path.display(),
        report.outcomes.len() - failed,
        report.outcomes.len(),
        report.evaluations,
        report.fuel_max,
        keyfab_policy_code::FUEL_PER_DECISION
    );
    if failed > 0 {
        return Err(Failure::new(
            Code::PolicyTestFailed,
            format!("{summary}\n{}", lines.join("\n")),
        ));
    }
    Ok(Report::new(
        format!("{summary}\n{}", lines.join("\n")),
        json!({
            "module": module_path,
            "sha256": hex::encode(sha256),
            "cases": results,
            "evaluations": report.evaluations,
            "fuel_max": report.fuel_max,
            "failed": failed,
        }),
    ))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

pub(crate) fn provision(ctx: &Context, a: &ProvisionArgs) -> Result<Report, Failure> {
    let node = std::sync::Arc::new(ctx.open(&a.home.home, NodeKind::Site)?);
    let csr = match &a.csr {
        Some(path) => {
            let bytes = read_input(path, keyfab_formats::MAX_SMALL_INPUT)?;
            Some(match std::str::from_utf8(&bytes) {
                Ok(text) if text.contains("-----BEGIN") => {
                    x509::from_pem(text, "CERTIFICATE REQUEST")
                        .map_err(|e| Failure::new(Code::InvalidInput, format!("--csr: {e}")))?
                }
                _ => bytes,
            })
        }
        None => None,
    };
    // A site that stopped itself, or whose log's end or size no longer fits, decides
    // nothing (the latter latches it).
    keyfab_site::latch::check_cheaply(&node)?;
    let provisioner = keyfab_site::provision::Provisioner::start(node);
    let request =
        |device_id: String, request_id: String| keyfab_site::provision::ProvisionRequest {
            entitlement: a.entitlement.clone(),
            device_id,
            station: a.station.clone(),
            request_id,
            csr: csr.clone(),
            transport_key: None,
        };
    if let (Some(list), Some(out)) = (&a.device_ids, &a.out) {
        return provision_many(&provisioner, list, out, request);
    }
    let device_id = a
        .device_id
        .clone()
        .ok_or_else(|| Failure::new(Code::InvalidInput, "--device-id or --device-ids is needed"))?;
    let request_id = match &a.request_id {
        Some(r) => r.clone(),
        None => {
            let mut b = [0u8; 16];
            ctx.rng().fill(&mut b);
            hex::encode(b)
        }
    };
    let p = provisioner.provision(request(device_id, request_id))?;
    let bundle = keyfab_site::bundle::device_bundle(&p);
    if let Some(out) = &a.out {
        write_private(out, format!("{bundle:#}\n").as_bytes()).map_err(|e| io_fail(out, e))?;
    }
    let mut text = format!(
        "device {} provisioned under {} (audit record {}{})\n",
        p.device_id,
        p.entitlement,
        p.audit_sequence,
        if p.replayed {
            ", a retry of an earlier request"
        } else {
            ""
        }
    );
    for k in &p.keys {
        text.push_str(&format!(
            "  {:<12} {:<8} {:<8} {}\n",
            k.name,
            k.key_type.as_str(),
            k.source.as_str(),
            k.key_id
        ));
    }
    text.push_str(&match &a.out {
        Some(out) => format!("key material written to {} (mode 0600)\n", out.display()),
        None => "key material not shown: use --out FILE or --json\n".into(),
    });
    Ok(Report::new(text, bundle))
}

/// Batch mode: every id of `list`, in order; one JSON line per device appended to `out`
/// (mode 0600) and flushed as soon as its keys are released.
fn provision_many(
    provisioner: &keyfab_site::provision::Provisioner,
    list: &Path,
    out: &Path,
    request: impl Fn(String, String) -> keyfab_site::provision::ProvisionRequest,
) -> Result<Report, Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let ids = read_input_text(list, MAX_LIST_BYTES)?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| io_fail(out, e))?;
    let (mut released, mut resumed) = (0u64, 0u64);
    let mut refused: std::collections::BTreeMap<&'static str, u64> = Default::default();
    for id in ids
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match provisioner.provision(request(
            id.to_owned(),
            keyfab_site::provision::lot_request_id(id),
        )) {
            Ok(p) => {
                let line = format!("{}\n", keyfab_site::bundle::device_bundle(&p));
                file.write_all(line.as_bytes())
                    .map_err(|e| io_fail(out, e))?;
                file.flush().map_err(|e| io_fail(out, e))?;
                if p.replayed {
                    resumed += 1;
                } else {
                    released += 1;
                }
            }
            Err(e) if e.exit_code() == 3 => *refused.entry(e.code().as_str()).or_insert(0) += 1,
            Err(e) => return Err(e.into()),
        }
    }
    file.sync_all().map_err(|e| io_fail(out, e))?;
    let mut text = format!("{released} devices provisioned, {resumed} already done earlier (same keys written again) -> {}\n", out.display());
    for (code, n) in &refused {
        text.push_str(&format!("  refused {code}: {n}\n"));
    }
    Ok(Report::new(
        text,
        json!({"provisioned": released, "resumed": resumed, "refused": refused, "out": out}),
    ))
}

pub(crate) fn approval_request(
    ctx: &Context,
    home: &Path,
    entitlement: &str,
    action: &str,
    out: &Path,
    hours: i64,
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let file =
        keyfab_site::approvals::request(&node, entitlement, action, hours.saturating_mul(3600))?;
    std::fs::write(out, &file).map_err(|e| io_fail(out, e))?;
    Ok(Report::new(
        format!("approval request for '{action}' on {entitlement} written to {}; approvers sign it with `keyfab approver sign`", out.display()),
        json!({"entitlement": entitlement, "action": action, "out": out}),
    ))
}

pub(crate) fn approver_sign(key: &Path, request: &Path, out: &Path) -> Result<Report, Failure> {
    let key_der = keyfab_hq::pki::read_pem_file(key, "PRIVATE KEY")?;
    let signer = SigningKey::from_pkcs8(&key_der)
        .map_err(|e| Failure::new(Code::InvalidInput, format!("{}: {e}", key.display())))?;
    let file = read_input(request, keyfab_formats::approval::MAX_LEN)?;
    let req = keyfab_formats::approval::ApprovalRequest::from_file(&file)
        .map_err(keyfab_node::Error::from)?;
    let approval = keyfab_formats::approval::sign_approval(&signer, &file)
        .map_err(keyfab_node::Error::from)?;
    std::fs::write(out, &approval).map_err(|e| io_fail(out, e))?;
    Ok(Report::new(
        format!(
            "approved '{}' of entitlement {} ({}, {} devices) at site '{}', valid until {}; approval written to {}",
            req.action, req.entitlement, req.product, req.devices, req.site, rfc3339(req.expires_at), out.display()
        ),
        json!({"site": req.site, "entitlement": req.entitlement, "action": req.action, "approver": signer.verifying_key().fingerprint().to_hex(), "out": out}),
    ))
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
    let mut text = String::new();
    for r in &results {
        text.push_str(&format!(
            "{} '{}': {} new approval(s), {} of {} distinct approvers{}\n",
            r.entitlement,
            r.action,
            r.accepted,
            r.count,
            r.threshold,
            if r.activated { " - activated" } else { "" }
        ));
    }
    Ok(Report::new(
        text,
        json!({"results": results.iter().map(|r| json!({"entitlement": r.entitlement, "action": r.action, "accepted": r.accepted, "count": r.count, "threshold": r.threshold, "activated": r.activated})).collect::<Vec<_>>()}),
    ))
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
    Ok(Report::new(
        format!(
            "audit log of '{}': {} records, {chains}, Merkle root {}",
            node.name,
            records.len(),
            hex::encode(tree.root)
        ),
        json!({"site": node.name, "records": records.len(), "chains": heads.len(), "root": hex::encode(tree.root)}),
    ))
}

pub(crate) fn audit_checkpoint(ctx: &Context, home: &Path, out: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let (c, bytes) = keyfab_site::checkpoints::checkpoint(&node)?;
    std::fs::write(out, &bytes).map_err(|e| io_fail(out, e))?;
    Ok(Report::new(
        format!(
            "checkpoint of '{}': {} records, root {}, signed -> {}",
            c.site,
            c.head.size,
            hex::encode(c.head.root),
            out.display()
        ),
        json!({"site": c.site, "size": c.head.size, "root": hex::encode(c.head.root), "time": rfc3339(c.time), "out": out}),
    ))
}

pub(crate) fn receipt_import(ctx: &Context, home: &Path, file: &Path) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Site)?;
    let bytes = read_input(file, keyfab_formats::checkpoint::MAX_LEN)?;
    let imported = keyfab_site::checkpoints::import_receipt(&node, &bytes)?;
    let ack = imported.acknowledged;
    let mut text = format!(
        "HQ acknowledged {} audit records (at {}); the audit freshness clock restarts",
        ack.head.size,
        rfc3339(ack.acknowledged_at)
    );
    if let Some((from, to)) = imported.clock_reset {
        text.push_str(&format!(
            "\ntrusted time reset by HQ from {} to {}",
            rfc3339(from),
            rfc3339(to)
        ));
    }
    let reset = imported
        .clock_reset
        .map(|(from, to)| json!({"from": rfc3339(from), "to": rfc3339(to)}));
    Ok(Report::new(
        text,
        json!({"size": ack.head.size, "root": hex::encode(ack.head.root), "acknowledged_at": rfc3339(ack.acknowledged_at), "clock_reset": reset}),
    ))
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
    Ok(Report::new(
        format!(
            "site '{}': clock tolerance {tolerance} s, largest clock jump adopted {max_jump} s",
            node.name
        ),
        json!({"site": node.name, "clock_tolerance": tolerance, "clock_max_jump": max_jump}),
    ))
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
    let range = match e.records {
        0 => "no new audit records".to_owned(),
        _ => format!("audit records {}..{}", e.from.size + 1, e.to.size),
    };
    let mut text = String::new();
    if e.finished_earlier {
        text.push_str(&format!(
            "the last export (bundle {}) was not known to be written: its records are written again, under the same bundle id (if HQ already imported it, it answers `replayed`; export once more for the records since)\n",
            e.bundle
        ));
    }
    text.push_str(&format!(
        "{range} of '{}' exported for HQ ({} records, {} bytes, bundle {}) -> {}",
        node.name,
        e.records,
        e.bytes,
        e.bundle,
        out.display()
    ));
    Ok(Report::new(
        text,
        json!({"bundle": e.bundle, "from": e.from.size, "to": e.to.size, "root": hex::encode(e.to.root), "records": e.records, "bytes": e.bytes, "out": out, "written_again": e.finished_earlier}),
    ))
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
    let mut text = format!(
        "site '{}': {} audit records verified and reconciled (log now {} records); {} violation(s)\n",
        i.site, i.records, head.size, i.violations.len()
    );
    for v in &i.violations {
        text.push_str(&format!(
            "  VIOLATION #{} {}: {} ({})\n",
            v.sequence,
            v.kind,
            v.device_id.clone().unwrap_or_default(),
            v.detail
        ));
    }
    if let Some(out) = receipt_out {
        text.push_str(&format!("receipt for the site -> {}\n", out.display()));
    }
    Ok(Report::new(
        text,
        json!({
            "site": i.site, "bundle": i.bundle, "records": i.records, "size": head.size,
            "violations": i.violations,
            "entitlements": i.per_entitlement.iter().map(|(id, r)| json!({"id": id, "released": r.total, "refusals": r.refusals, "violations": r.violations})).collect::<Vec<_>>(),
            "receipt": receipt_out,
        }),
    ))
}

pub(crate) fn hq_report(
    ctx: &Context,
    home: &Path,
    format: &str,
    out: Option<&Path>,
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let r = keyfab_hq::report::report(&node, node.now())?;
    let value =
        serde_json::to_value(&r).map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
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
    for e in &r.entitlements {
        let limit = e.daily_limit.map_or("-".into(), |d| d.to_string());
        let refusals: Vec<String> = e.refusals.iter().map(|(c, n)| format!("{c} {n}")).collect();
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
    }
    if !r.violations.is_empty() {
        text.push_str("\nVIOLATIONS\n");
        for v in &r.violations {
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
    match (format, out) {
        ("html", None) => {
            return Err(Failure::new(
                Code::InvalidInput,
                "--format html needs --out FILE",
            ))
        }
        (_, Some(out)) => {
            let body = match format {
                "json" => format!("{value:#}\n"),
                "html" => keyfab_hq::html::render(&r, &node.name, &rfc3339(r.generated_at)),
                _ => text.clone(),
            };
            std::fs::write(out, body).map_err(|e| io_fail(out, e))?;
            if format == "html" {
                text.push_str(&format!(
                    "\nHTML report (self-contained, works offline): {}\n",
                    out.display()
                ));
            }
        }
        _ => {}
    }
    Ok(Report::new(text, value))
}

pub(crate) fn hq_manifest(
    ctx: &Context,
    home: &Path,
    entitlement: &str,
    format: &str,
    out: &Path,
) -> Result<Report, Failure> {
    let node = ctx.open(home, NodeKind::Hq)?;
    let (issued, rows) = keyfab_hq::report::manifest(&node, entitlement)?;
    let body = match format {
        "csv" => {
            let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
            let mut b = String::from("device_id,entitlement,key,key_id,cert_serial,public_key_pem,certificate_pem,certificate_sha256\n");
            for r in &rows {
                b.push_str(&[q(&r.device_id), q(&r.entitlement), q(&r.key), q(&r.key_id), q(&r.cert_serial), q(&r.public_key_pem), q(&r.certificate_pem), q(&r.certificate_sha256)].join(","));
                b.push('\n');
            }
            b
        }
        "json" => format!("{:#}\n", json!({"entitlement": entitlement, "site": issued.site, "devices": rows})),
        _ => rows
            .iter()
            .map(|r| format!("{}\n", json!({"ThingName": r.device_id, "SerialNumber": r.cert_serial, "CertificatePem": r.certificate_pem})))
            .collect(),
    };
    std::fs::write(out, body).map_err(|e| io_fail(out, e))?;
    Ok(Report::new(
        format!(
            "{} device keys of {entitlement} (site '{}') -> {} ({format})",
            rows.len(),
            issued.site,
            out.display()
        ),
        json!({"entitlement": entitlement, "site": issued.site, "rows": rows.len(), "format": format, "out": out}),
    ))
}
