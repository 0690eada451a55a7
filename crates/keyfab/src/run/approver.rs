//! `keyfab approver`: an approver's key pair and signatures.

use crate::context::{rfc3339, Context};
use crate::output::{io_fail, read_input, Failure, Outcome, Report};
use keyfab_crypto::sign::{EcdsaSigner, SigningKey};
use keyfab_crypto::x509::{self};
use keyfab_custody::{Custody, SoftwareKeystore};
use keyfab_node::Code;
use std::path::{Path, PathBuf};

/// The handle of the one key an approver's sealed key file holds.
const APPROVER_HANDLE: &str = "approver";

/// `approver keygen`: a key pair; the private key sealed under the passphrase (a
/// keystore of one key, the format a node's keystore has), or in clear for drills.
pub(crate) fn approver_keygen(
    ctx: &Context,
    out: &Path,
    no_passphrase: bool,
) -> Result<Report, Failure> {
    let (key_path, pub_path) = key_pair_paths(out)?;
    let public = if no_passphrase {
        let key = SigningKey::generate(ctx.rng().as_ref())
            .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
        let pem = x509::to_pem_secret(key.to_pkcs8().expose(), "PRIVATE KEY");
        write_private(&key_path, pem.as_bytes()).map_err(|e| io_fail(&key_path, e))?;
        key.verifying_key()
    } else {
        let passphrase = ctx.passphrase()?;
        let mut sealed = SoftwareKeystore::create(&key_path, &passphrase, ctx.rng().as_ref())
            .map_err(keyfab_node::Error::from)?;
        sealed
            .generate_signing_key(APPROVER_HANDLE, ctx.rng().as_ref())
            .map_err(keyfab_node::Error::from)?
    };
    std::fs::write(&pub_path, public.to_pem()).map_err(|e| io_fail(&pub_path, e))?;
    Report::of(&ApproverKeyMade {
        key: key_path,
        public: pub_path,
        fingerprint: public.fingerprint().to_hex(),
        sealed: !no_passphrase,
    })
}

/// `NAME.key` and `NAME.pub` of a personal key pair `out` (an approver's, a holder's),
/// neither of which may exist yet: a key is never overwritten.
pub(crate) fn key_pair_paths(out: &Path) -> Result<(PathBuf, PathBuf), Failure> {
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
    Ok((key_path, pub_path))
}

/// `approver keygen`: an approver's key pair, written.
#[derive(serde::Serialize)]
struct ApproverKeyMade {
    key: PathBuf,
    #[serde(rename = "pub")]
    public: PathBuf,
    fingerprint: String,
    /// Sealed under the passphrase (false: in clear, `--no-passphrase`).
    sealed: bool,
}

impl Outcome for ApproverKeyMade {
    fn text(&self) -> String {
        format!(
            "approver key written: {} ({}) and {} (fingerprint {})",
            self.key.display(),
            if self.sealed {
                "sealed under your passphrase; keep it private"
            } else {
                "IN CLEAR, for drills only; keep it private"
            },
            self.public.display(),
            self.fingerprint
        )
    }
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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

/// `approver sign`: the request checked (the site's signature up to `root`, its expiry),
/// its summary shown and confirmed (on a terminal, or by `yes`), then signed.
pub(crate) fn approver_sign(
    ctx: &Context,
    key: &Path,
    (root, request): (&Path, &Path),
    out: &Path,
    yes: bool,
) -> Result<Report, Failure> {
    let root_der = keyfab_hq::pki::read_pem_file(root, "CERTIFICATE")?;
    let file = read_input(request, keyfab_formats::approval::MAX_LEN)?;
    let now = ctx.now()?;
    let req = keyfab_formats::approval::verify_request(&file, &root_der, now)
        .map_err(keyfab_node::Error::from)?
        .into_inner();
    if now.0 >= req.expires_at {
        return Err(Failure::new(
            Code::ApprovalInvalid,
            format!(
                "this request expired at {}: ask the site for a new one (keyfab site approval request); nothing was signed",
                rfc3339(req.expires_at)
            ),
        ));
    }
    let summary = summary_of(&req);
    if !yes {
        confirm(&summary)?;
    }
    let sealed;
    let clear;
    let signer: &dyn EcdsaSigner = if std::fs::read(key)
        .map_err(|e| io_fail(key, e))?
        .starts_with(b"KFKS")
    {
        sealed =
            SoftwareKeystore::unlock(key, &ctx.passphrase()?).map_err(keyfab_node::Error::from)?;
        sealed
            .signer(APPROVER_HANDLE)
            .map_err(keyfab_node::Error::from)?
    } else {
        let key_der = keyfab_hq::pki::read_pem_file(key, "PRIVATE KEY")?;
        clear = SigningKey::from_pkcs8(&key_der)
            .map_err(|e| Failure::new(Code::InvalidInput, format!("{}: {e}", key.display())))?;
        &clear
    };
    let approval =
        keyfab_formats::approval::sign_approval(signer, &file).map_err(keyfab_node::Error::from)?;
    std::fs::write(out, &approval).map_err(|e| io_fail(out, e))?;
    Report::of(&Approved {
        approver: signer.verifying_key().fingerprint().to_hex(),
        out: out.to_owned(),
        summary,
    })
}

/// What the approver is asked to approve, in words and fields.
#[derive(serde::Serialize)]
struct Summary {
    site: String,
    entitlement: String,
    action: String,
    product: String,
    devices: u64,
    daily_limit: Option<u64>,
    valid_from: String,
    valid_until: String,
    stations: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raise: Option<keyfab_policy::Raise>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reprovision: Option<keyfab_formats::approval::Reprovision>,
    expires_at: String,
}

fn summary_of(req: &keyfab_formats::approval::ApprovalRequest) -> Summary {
    Summary {
        site: req.site.clone(),
        entitlement: req.entitlement.clone(),
        action: req.action.clone(),
        product: req.product.clone(),
        devices: req.devices,
        daily_limit: req.daily_limit,
        valid_from: rfc3339(req.valid_from),
        valid_until: rfc3339(req.valid_until),
        stations: req.stations.clone(),
        raise: req.raise.clone(),
        reprovision: req.reprovision.clone(),
        expires_at: rfc3339(req.expires_at),
    }
}

impl Summary {
    fn text(&self) -> String {
        let mut raise = self.raise.as_ref().map_or_else(String::new, |r| {
            format!(
                "\n  it raises the daily limit to {} devices a day from {} to {} (policy days; the quota stays {})",
                r.daily, r.from_day, r.to_day, self.devices
            )
        });
        if let Some(r) = &self.reprovision {
            raise.push_str(&format!(
                "\n  device {} gets new keys and a new certificate, once; its earlier keys are burned ({})",
                r.device_id,
                r.reason.as_deref().unwrap_or("no reason given")
            ));
        }
        format!(
            "site '{}' asks you to approve '{}' of entitlement {}:\n  product {}, {} devices{}, from {} to {}, stations: {}{raise}\n  this request expires {}",
            self.site,
            self.action,
            self.entitlement,
            self.product,
            self.devices,
            self.daily_limit
                .map(|d| format!(" ({d} a day at most)"))
                .unwrap_or_default(),
            self.valid_from,
            self.valid_until,
            self.stations
                .as_ref()
                .map_or_else(|| "any the site enrolled".to_owned(), |s| s.join(", ")),
            self.expires_at
        )
    }
}

/// Shows `summary` on the terminal and asks to type `yes`; without a terminal, refuses:
/// an approval nobody confirmed is not one.
fn confirm(summary: &Summary) -> Result<(), Failure> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let mut stderr = std::io::stderr();
    if !stdin.is_terminal() || !stderr.is_terminal() {
        return Err(Failure::usage(
            "no terminal to confirm on: read what the request approves (it was signed by the site) and pass --yes; nothing was signed",
        ));
    }
    let _ = write!(stderr, "{}\nSign this approval? Type yes: ", summary.text());
    let _ = stderr.flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::new(Code::Io, format!("standard input: {e}")))?;
    if answer.trim() != "yes" {
        return Err(Failure::new(
            Code::InvalidInput,
            "not confirmed: nothing was signed",
        ));
    }
    Ok(())
}

/// `approver sign`: an approval of a request, written.
#[derive(serde::Serialize)]
struct Approved {
    approver: String,
    out: PathBuf,
    #[serde(flatten)]
    summary: Summary,
}

impl Outcome for Approved {
    fn text(&self) -> String {
        format!(
            "{}\napproved by {}; approval written to {}",
            self.summary.text(),
            self.approver,
            self.out.display()
        )
    }
}
