//! `keyfab pki`: the root CA and the certificates it issues.

use crate::context::{rfc3339, Context};
use crate::output::{io_fail, read_input_text, Failure, Outcome, Report};
use keyfab_policy::Lifetime;
use serde::Serialize;
use std::path::{Path, PathBuf};

pub(crate) fn init_root(
    ctx: &Context,
    home: &Path,
    subject: &str,
    days: Lifetime,
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
    Report::of(&RootCreated {
        root_cert: path,
        subject: subject.to_owned(),
        home: home.to_owned(),
    })
}

/// `pki init-root`: the root CA made.
#[derive(Serialize)]
struct RootCreated {
    root_cert: PathBuf,
    subject: String,
    #[serde(skip)]
    home: PathBuf,
}

impl Outcome for RootCreated {
    fn text(&self) -> String {
        format!(
            "root CA created; its certificate is {} (the key stays sealed in {})",
            self.root_cert.display(),
            self.home.display()
        )
    }
}

pub(crate) fn issue(
    ctx: &Context,
    home: &Path,
    csr: &Path,
    role: crate::cli::CertRole,
    out: &Path,
    days: Option<Lifetime>,
) -> Result<Report, Failure> {
    let days = days.unwrap_or(role.default_days());
    let role = role.role();
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
    Report::of(&CertIssued {
        cert: out.to_owned(),
        subject: issued.subject,
        role: role.as_str(),
        serial: issued.serial_hex,
        not_after: rfc3339(issued.not_after.0),
    })
}

/// `pki issue`: a cluster certificate, written.
#[derive(Serialize)]
struct CertIssued {
    cert: PathBuf,
    subject: String,
    role: &'static str,
    serial: String,
    not_after: String,
}

impl Outcome for CertIssued {
    fn text(&self) -> String {
        format!(
            "issued a {} cluster certificate for '{}' (serial {}, valid until {}) -> {}",
            self.role,
            self.subject,
            self.serial,
            self.not_after,
            self.cert.display()
        )
    }
}

pub(crate) fn init_chip_vendor(
    ctx: &Context,
    dir: &Path,
    subject: &str,
) -> Result<Report, Failure> {
    let rng = ctx.rng();
    let root_cert =
        keyfab_station::chip_vendor::ChipVendor::create(dir, subject, rng.as_ref(), ctx.now()?)
            .map_err(|e| Failure::new(keyfab_node::Code::InvalidInput, e.to_string()))?;
    Report::of(&ChipVendorCreated {
        root_cert,
        subject: subject.to_owned(),
    })
}

/// `pki init-chip-vendor`: a drill's chip vendor made.
#[derive(Serialize)]
struct ChipVendorCreated {
    root_cert: PathBuf,
    subject: String,
}

impl Outcome for ChipVendorCreated {
    fn text(&self) -> String {
        format!(
            "chip vendor '{}' created; list {} in a policy's [chips] roots, and give its directory to `keyfab station run --chip-vendor`",
            self.subject,
            self.root_cert.display()
        )
    }
}
