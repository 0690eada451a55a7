//! `keyfab approver`: an approver's key pair and signatures.

use crate::context::{rfc3339, Context};
use crate::output::{io_fail, read_input, Failure, Outcome, Report};
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::x509::{self};
use keyfab_node::Code;
use std::path::{Path, PathBuf};

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
    Report::of(&ApproverKeyMade {
        key: key_path,
        public: pub_path,
        fingerprint: public.fingerprint().to_hex(),
    })
}

/// `approver keygen`: an approver's key pair, written.
#[derive(serde::Serialize)]
struct ApproverKeyMade {
    key: PathBuf,
    #[serde(rename = "pub")]
    public: PathBuf,
    fingerprint: String,
}

impl Outcome for ApproverKeyMade {
    fn text(&self) -> String {
        format!(
            "approver key written: {} (keep it private) and {} (fingerprint {})",
            self.key.display(),
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
    Report::of(&Approved {
        site: req.site,
        entitlement: req.entitlement,
        action: req.action,
        approver: signer.verifying_key().fingerprint().to_hex(),
        out: out.to_owned(),
        product: req.product,
        devices: req.devices,
        expires_at: rfc3339(req.expires_at),
    })
}

/// `approver sign`: an approval of a request, written.
#[derive(serde::Serialize)]
struct Approved {
    site: String,
    entitlement: String,
    action: String,
    approver: String,
    out: PathBuf,
    #[serde(skip)]
    product: String,
    #[serde(skip)]
    devices: u64,
    #[serde(skip)]
    expires_at: String,
}

impl Outcome for Approved {
    fn text(&self) -> String {
        format!(
            "approved '{}' of entitlement {} ({}, {} devices) at site '{}', valid until {}; approval written to {}",
            self.action,
            self.entitlement,
            self.product,
            self.devices,
            self.site,
            self.expires_at,
            self.out.display()
        )
    }
}
