//! `keyfab pki`: the root CA and the certificates it issues.

use crate::context::{rfc3339, Context};
use crate::output::{io_fail, read_input_text, Failure, Report};
use serde_json::json;
use std::path::Path;

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
    role: crate::cli::CertRole,
    out: &Path,
    days: i64,
) -> Result<Report, Failure> {
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
