//! Command implementations. Each returns a [`Report`] (text and JSON), or a typed
//! result ([`crate::output::Outcome`]) that [`dispatch`] renders to one; `demo` and
//! `bench` call the same functions and read typed results as fields.
//!
//! One module per command group; [`dispatch`] maps the parsed command line to them.

mod approver;
mod holder;
mod hq;
mod node;
mod pki;
mod policy;
mod provision;
mod site;

pub(crate) use approver::*;
pub(crate) use holder::*;
pub(crate) use hq::*;
pub(crate) use node::*;
pub(crate) use pki::*;
use policy::policy_test;
pub(crate) use provision::*;
pub(crate) use site::*;

use crate::cli::*;
use crate::context::{peak_rss_bytes, Context};
use crate::output::{Failure, Report};
use keyfab_node::NodeKind;
use serde_json::json;

/// Runs `cli`'s command; `secrets` are its home's unlocking flags (passphrase file,
/// unseal share files), when it has a home.
pub(crate) fn dispatch(
    cli: Cli,
    (passphrase_file, unseal_share_files): (Option<std::path::PathBuf>, Vec<std::path::PathBuf>),
) -> Result<Report, Failure> {
    let ctx = Context {
        passphrase_file,
        unseal_share_files,
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
        }) => issue(&ctx, &home.home, &csr, role, &out, days),
        Command::Pki(PkiCommand::InitChipVendor { dir, subject }) => {
            init_chip_vendor(&ctx, &dir, &subject)
        }
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
        })) => Report::of(&entitlement_create(&ctx, &home.home, &site, &policy, &out)?),
        Command::Hq(HqCommand::Entitlement(HqEntitlementCommand::Revoke {
            home,
            id,
            reason,
            out,
        })) => revoke(&ctx, &home.home, &id, &reason, &out),
        Command::Hq(HqCommand::Entitlement(HqEntitlementCommand::List { home })) => {
            issued_list(&ctx, &home.home)
        }
        Command::Hq(HqCommand::Device(HqDeviceCommand::Revoke {
            home,
            entitlement,
            device_id,
            reason,
            superseded_only,
        })) => device_revoke(
            &ctx,
            &home.home,
            (&entitlement, &device_id),
            reason,
            superseded_only,
        ),
        Command::Hq(HqCommand::Device(HqDeviceCommand::Show { home, device_id })) => {
            device_show(&ctx, &home.home, &device_id)
        }
        Command::Hq(HqCommand::Crl {
            home,
            entitlement,
            out,
            days,
        }) => hq_crl(&ctx, &home.home, &entitlement, &out, days),
        Command::Site(SiteCommand::Init(a)) => init_node(&ctx, &a, NodeKind::Site),
        Command::Site(SiteCommand::InstallCert(a)) => {
            install_cert(&ctx, &a.home.home, NodeKind::Site, &a.cert, &a.root_cert)
        }
        Command::Site(SiteCommand::Identity(SiteIdentityCommand::Export { home, out })) => {
            identity_export(&ctx, &home.home, &out)
        }
        Command::Site(SiteCommand::Entitlement(SiteEntitlementCommand::Import { home, file })) => {
            Report::of(&entitlement_import(&ctx, &home.home, &file)?)
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
        })) => crate::line::station_issue(&ctx, &home.home, (&name, &out, days), false),
        Command::Site(SiteCommand::Station(SiteStationCommand::Renew {
            home,
            name,
            out,
            days,
        })) => crate::line::station_issue(&ctx, &home.home, (&name, &out, days), true),
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
            holder_key,
            status,
        }) => crate::line::unseal(
            &ctx,
            &home.home,
            (share_file.as_deref(), holder_key.as_deref()),
            status,
        ),
        Command::Holder(HolderCommand::Keygen { out, .. }) => holder_keygen(&ctx, &out),
        Command::Holder(HolderCommand::OpenShare { key, file, .. }) => {
            holder_open_share(&ctx, &key, &file)
        }
        Command::Site(SiteCommand::Status { home }) => crate::line::site_status(&ctx, &home.home),
        Command::Site(SiteCommand::Serve(a)) => {
            let a = crate::serve_config::apply(a)?;
            if a.check_config {
                crate::serve_config::checked(&a)
            } else {
                crate::line::serve(&ctx, &a, ctx.json)
            }
        }
        Command::Station(StationCommand::Run {
            station,
            root_cert,
            entitlement,
            devices,
            concurrency,
            device_prefix,
            first,
            device_log,
            chip_vendor,
        }) => crate::line::station_run(
            &ctx,
            &crate::line::LineArgs {
                station: &station,
                device_log: device_log.as_deref(),
                root_cert: &root_cert,
                entitlement: &entitlement,
                devices,
                concurrency,
                prefix: &device_prefix,
                first,
                chip_vendor: chip_vendor.as_deref(),
            },
        ),
        Command::Station(StationCommand::Confirm {
            station,
            entitlement,
            device_id,
            result,
        }) => crate::line::station_confirm(&ctx, &station, &entitlement, &device_id, result),
        Command::Station(StationCommand::Provision {
            station,
            entitlement,
            device_id,
            request_id,
            csr,
            chip,
            out,
        }) => crate::line::station_provision(
            &ctx,
            &station,
            crate::line::StationAsk {
                entitlement: &entitlement,
                device_id: &device_id,
                request_id: request_id.as_deref(),
                csr: csr.as_deref(),
                chip: &chip,
            },
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
        Command::Hq(HqCommand::Status { home }) => hq::hq_status(&ctx, &home.home),
        Command::Hq(HqCommand::Report { home, format, out }) => {
            hq_report(&ctx, &home.home, format, out.as_deref())
        }
        Command::Hq(HqCommand::Manifest {
            home,
            entitlement,
            format,
            out,
            include_failed,
            key,
            ca_out,
        }) => hq_manifest(
            &ctx,
            &home.home,
            &ManifestArgs {
                entitlement: &entitlement,
                format,
                out: &out,
                include_failed,
                key: key.as_deref(),
                ca_out: ca_out.as_deref(),
            },
        ),
        Command::Site(SiteCommand::Audit(SiteAuditCommand::Checkpoint { home, out })) => {
            audit_checkpoint(&ctx, &home.home, &out)
        }
        Command::Site(SiteCommand::Receipt(SiteReceiptCommand::Import { home, file })) => {
            receipt_import(&ctx, &home.home, &file)
        }
        Command::Approver(ApproverCommand::Keygen {
            out, no_passphrase, ..
        }) => approver_keygen(&ctx, &out, no_passphrase),
        Command::Approver(ApproverCommand::Sign {
            key,
            root_cert,
            request,
            out,
            yes,
            ..
        }) => approver_sign(&ctx, &key, (&root_cert, &request), &out, yes),
        Command::Site(SiteCommand::Approval(SiteApprovalCommand::Request {
            home,
            entitlement,
            action,
            daily,
            from_day,
            to_day,
            device_id,
            reason,
            out,
            expires_in_hours,
        })) => approval_request(
            &ctx,
            &home.home,
            &entitlement,
            ask(action, (daily, from_day, to_day), (device_id, reason))?,
            &out,
            expires_in_hours,
        ),
        Command::Site(SiteCommand::Approval(SiteApprovalCommand::Submit { home, approvals })) => {
            approval_submit(&ctx, &home.home, &approvals)
        }
        Command::Policy(PolicyCommand::Test { module, cases }) => policy_test(&module, &cases),
        Command::Demo { dir, devices } => crate::demo::run(&ctx, dir.as_deref(), devices),
        Command::Completions { shell } => crate::manual::completions(shell),
        Command::Man { out } => crate::manual::man_pages(&out),
        #[cfg(feature = "bench")]
        Command::Bench(command) => crate::bench::dispatch(&ctx, command),
    }?;
    if std::env::var_os("KEYFAB_REPORT_PEAK_RSS").is_some() {
        if let (Some(obj), Some(rss)) = (report.json.as_object_mut(), peak_rss_bytes()) {
            obj.insert("peak_rss_bytes".into(), json!(rss));
        }
    }
    Ok(report)
}

/// What `site approval request` asks for: the action, with the parameters it takes and
/// none it does not.
type RaiseArgs = (Option<u64>, Option<String>, Option<String>);
type ReprovisionArgs = (Option<String>, Option<String>);

fn ask(
    action: crate::cli::ApprovalAction,
    (daily, from_day, to_day): RaiseArgs,
    (device_id, reason): ReprovisionArgs,
) -> Result<keyfab_site::approvals::Ask, Failure> {
    use crate::cli::ApprovalAction;
    use keyfab_site::approvals::Ask;
    let raising = daily.is_some() || from_day.is_some() || to_day.is_some();
    let reprovisioning = device_id.is_some() || reason.is_some();
    match action {
        ApprovalAction::Activate if !raising && !reprovisioning => Ok(Ask::Activate),
        ApprovalAction::RaiseLimit if !reprovisioning => match (daily, from_day, to_day) {
            (Some(daily), Some(from_day), Some(to_day)) => {
                Ok(Ask::RaiseLimit(keyfab_policy::Raise {
                    daily,
                    from_day,
                    to_day,
                }))
            }
            _ => Err(Failure::usage(
                "--action raise-limit needs --daily, --from-day and --to-day",
            )),
        },
        ApprovalAction::Reprovision if !raising => match device_id {
            Some(device_id) => Ok(Ask::Reprovision(
                keyfab_formats::approval::Reprovision { device_id, reason },
            )),
            None => Err(Failure::usage("--action reprovision needs --device-id")),
        },
        _ => Err(Failure::usage(
            "--daily, --from-day and --to-day are for --action raise-limit; --device-id and --reason for --action reprovision",
        )),
    }
}
