//! `keyfab holder`: the key pair an unseal share is sealed to, and opening a share with it.

use crate::context::Context;
use crate::output::{io_fail, read_input, Failure, Outcome, Report};
use keyfab_crypto::sign::VerifyingKey;
use keyfab_custody::{Custody, SoftwareKeystore};
use keyfab_node::Code;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The handle of the one key a holder's key file holds.
const HOLDER_HANDLE: &str = "holder";

/// `holder keygen`: an HPKE key pair, the private key sealed under the passphrase (a
/// keystore of one key, the format a node's keystore has).
pub(crate) fn holder_keygen(ctx: &Context, out: &Path) -> Result<Report, Failure> {
    let (key_path, pub_path) = super::approver::key_pair_paths(out)?;
    let passphrase = ctx.passphrase()?;
    let mut sealed = SoftwareKeystore::create(&key_path, &passphrase, ctx.rng().as_ref())
        .map_err(keyfab_node::Error::from)?;
    let public = sealed
        .generate_hpke_key(HOLDER_HANDLE, ctx.rng().as_ref())
        .map_err(keyfab_node::Error::from)?;
    // The same SubjectPublicKeyInfo (id-ecPublicKey, P-256) an approver's .pub has.
    let pem = VerifyingKey::from_sec1(public.sec1())
        .map_err(|e| Failure::new(Code::Internal, e.to_string()))?
        .to_pem();
    std::fs::write(&pub_path, pem).map_err(|e| io_fail(&pub_path, e))?;
    Report::of(&HolderKeyMade {
        key: key_path,
        public: pub_path,
        fingerprint: public.fingerprint().to_hex(),
    })
}

/// `holder keygen`: a holder's key pair, written.
#[derive(serde::Serialize)]
struct HolderKeyMade {
    key: PathBuf,
    #[serde(rename = "pub")]
    public: PathBuf,
    fingerprint: String,
}

impl Outcome for HolderKeyMade {
    fn text(&self) -> String {
        format!(
            "holder key written: {} (sealed under your passphrase; keep it private) and {} (fingerprint {}); give the .pub to whoever runs `init --share-recipients`",
            self.key.display(),
            self.public.display(),
            self.fingerprint
        )
    }
}

/// A holder's public key from its `.pub` file.
pub(crate) fn read_holder_pub(path: &Path) -> Result<keyfab_crypto::hpke::HpkePublicKey, Failure> {
    let text = crate::output::read_input_text(path, keyfab_formats::MAX_SMALL_INPUT)?;
    VerifyingKey::from_pem(&text)
        .and_then(|k| keyfab_crypto::hpke::HpkePublicKey::from_sec1(k.sec1()))
        .map_err(|e| {
            Failure::new(
                Code::InvalidInput,
                format!(
                    "{}: not a holder's public key (P-256 PUBLIC KEY PEM): {e}",
                    path.display()
                ),
            )
        })
}

/// The text of the sealed share `bytes`, opened with the holder's key in `key` (unlocked
/// by the passphrase). A share sealed to another key is `wrong_recipient`; an altered
/// one `malformed`.
pub(crate) fn open_sealed_share(
    ctx: &Context,
    key: &Path,
    bytes: &[u8],
) -> Result<Zeroizing<String>, Failure> {
    let share = keyfab_formats::sealed_share::SealedShare::parse(bytes)
        .map_err(keyfab_node::Error::from)?;
    let holder =
        SoftwareKeystore::unlock(key, &ctx.passphrase()?).map_err(keyfab_node::Error::from)?;
    let recipient = holder.hpke(HOLDER_HANDLE).map_err(|_| {
        Failure::new(
            Code::InvalidInput,
            format!(
                "{}: not a holder's key (keyfab holder keygen)",
                key.display()
            ),
        )
    })?;
    let text = share.open(recipient).map_err(keyfab_node::Error::from)?;
    let text = std::str::from_utf8(text.expose())
        .map_err(|_| Failure::new(Code::Malformed, "the sealed share is not text"))?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// `holder open-share`: the share's text to standard output, which must not be a
/// terminal.
pub(crate) fn holder_open_share(ctx: &Context, key: &Path, file: &Path) -> Result<Report, Failure> {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        return Err(Failure::usage(
            "this would show the share on the screen: send it to a pipe or a file (e.g. --unseal-share-file <(keyfab holder open-share ...))",
        ));
    }
    let bytes = read_input(file, keyfab_formats::sealed_share::MAX_LEN)?;
    let share = open_sealed_share(ctx, key, &bytes)?;
    Report::of(&OpenedShare {
        share: share.as_str(),
    })
}

/// `holder open-share`: the share (its text alone, or `{"share": ...}` with --json).
#[derive(serde::Serialize)]
struct OpenedShare<'a> {
    share: &'a str,
}

impl Outcome for OpenedShare<'_> {
    fn text(&self) -> String {
        self.share.to_owned()
    }
}

/// For `init --unseal-shares`: each share of `split` sealed to its holder's key (the
/// `--share-recipients`, N of them) and written to `--shares-out`/NAME.kfs, none
/// overwritten; or, with `--print-shares`, none (the shares are shown in clear). Returns
/// each file written and its holder's fingerprint. Nothing is written unless every key
/// reads and every file is new.
pub(crate) fn seal_shares(
    a: &crate::cli::InitArgs,
    node: &str,
    split: &keyfab_custody::unseal::Split,
    rng: &dyn keyfab_crypto::rng::SecureRng,
) -> Result<Vec<(PathBuf, String)>, Failure> {
    if a.share_recipients.is_empty() {
        if a.print_shares {
            return Ok(Vec::new());
        }
        return Err(Failure::usage(
            "unseal shares go to their holders: --share-recipients A.pub,B.pub,... (keyfab holder keygen), or --print-shares to show them in clear this once",
        ));
    }
    if a.share_recipients.len() != split.shares.len() {
        return Err(Failure::usage(format!(
            "--unseal-shares {} but {} --share-recipients: one holder per share",
            split.shares.len(),
            a.share_recipients.len()
        )));
    }
    let dir = a.shares_out.clone().unwrap_or_else(|| PathBuf::from("."));
    let mut planned: Vec<(PathBuf, keyfab_crypto::hpke::HpkePublicKey)> = Vec::new();
    for pub_path in &a.share_recipients {
        let key = read_holder_pub(pub_path)?;
        let stem = pub_path
            .file_stem()
            .ok_or_else(|| Failure::usage(format!("{}: no file name", pub_path.display())))?;
        let file = dir.join(stem).with_extension("kfs");
        if planned.iter().any(|(_, k)| *k == key) {
            return Err(Failure::usage(format!(
                "{}: the same holder key twice; one share per holder",
                pub_path.display()
            )));
        }
        if file.exists() || planned.iter().any(|(f, _)| *f == file) {
            return Err(Failure::new(
                Code::InvalidState,
                format!(
                    "{} exists or is named twice; refusing to overwrite",
                    file.display()
                ),
            ));
        }
        planned.push((file, key));
    }
    let mut sealed = Vec::new();
    for ((file, key), share) in planned.iter().zip(&split.shares) {
        sealed.push((
            file,
            key.fingerprint().to_hex(),
            keyfab_formats::sealed_share::seal(node, key, share.as_bytes(), rng)
                .map_err(keyfab_node::Error::from)?,
        ));
    }
    let mut written = Vec::new();
    for (file, holder, bytes) in sealed {
        if let Err(e) = super::approver::write_private(file, &bytes) {
            for (done, _) in &written {
                let _ = std::fs::remove_file(done);
            }
            return Err(io_fail(file, e));
        }
        written.push((file.clone(), holder));
    }
    Ok(written)
}
