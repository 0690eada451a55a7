//! The offline root CA: a home holding only the sealed root key and `root.crt`.

use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Role, Validity};
use keyfab_custody::{Custody, SoftwareKeystore};
use keyfab_node::{Error, Result, KEYSTORE_FILE};
use keyfab_policy::Lifetime;
use std::path::{Path, PathBuf};

/// The root certificate in the root's home.
pub const ROOT_CERT_FILE: &str = "root.crt";
const ROOT_KEY: &str = "root";

/// Creates the root CA in `home`: the key, sealed; and `root.crt` (PEM).
pub fn init_root(
    home: &Path,
    subject: &str,
    days: Lifetime,
    passphrase: &SecretBytes,
    rng: &dyn SecureRng,
    now: UnixTime,
) -> Result<PathBuf> {
    if home.join(ROOT_CERT_FILE).exists() || home.join(KEYSTORE_FILE).exists() {
        return Err(Error::Precondition(format!(
            "{} already holds a root CA",
            home.display()
        )));
    }
    let not_after = end_of(days, now)?;
    x509::parse_dn(subject).map_err(|e| Error::InvalidInput(format!("--subject: {e}")))?;
    keyfab_node::home::create_private_dir(home)?;
    let key = SigningKey::generate(rng)?;
    let cert = x509::root_certificate(
        &key,
        subject,
        Validity {
            not_before: now,
            not_after,
        },
        rng,
    )?;
    let mut ks = SoftwareKeystore::create(&home.join(KEYSTORE_FILE), passphrase, rng)?;
    ks.insert_signing_key(ROOT_KEY, key)?;
    let path = home.join(ROOT_CERT_FILE);
    keyfab_node::home::write_private_file(&path, x509::to_pem(&cert, "CERTIFICATE").as_bytes())?;
    Ok(path)
}

/// What `pki issue` produced.
pub struct Issued {
    /// The certificate, PEM.
    pub pem: String,
    /// Its subject.
    pub subject: String,
    /// Its serial, hex.
    pub serial_hex: String,
    /// When it ends.
    pub not_after: UnixTime,
}

/// Signs a cluster CSR for `role`.
pub fn issue(
    home: &Path,
    csr_pem: &str,
    role: Role,
    days: Lifetime,
    passphrase: &SecretBytes,
    rng: &dyn SecureRng,
    now: UnixTime,
) -> Result<Issued> {
    let not_after = end_of(days, now)?;
    keyfab_node::home::check_private(home)?;
    let ks = SoftwareKeystore::unlock(&home.join(KEYSTORE_FILE), passphrase)?;
    let root = read_pem_file(&home.join(ROOT_CERT_FILE), "CERTIFICATE")?;
    let csr_der = x509::from_pem(csr_pem, "CERTIFICATE REQUEST")
        .map_err(|e| Error::InvalidInput(format!("--csr: {e}")))?;
    let csr = x509::read_csr(&csr_der).map_err(|e| Error::InvalidInput(format!("--csr: {e}")))?;
    keyfab_node::check_name(&csr.common_name)?;
    let root_facts = x509::cert_facts(&root)?;
    let validity = Validity {
        not_before: now,
        not_after: not_after.min(root_facts.not_after),
    };
    let cert =
        x509::issue_cluster_certificate(ks.signer(ROOT_KEY)?, &root, &csr, role, validity, rng)?;
    let facts = x509::cert_facts(&cert)?;
    Ok(Issued {
        pem: x509::to_pem(&cert, "CERTIFICATE"),
        subject: csr.common_name,
        serial_hex: facts.serial_hex,
        not_after: facts.not_after,
    })
}

/// The last second of a certificate made `now` that lasts `days`.
fn end_of(days: Lifetime, now: UnixTime) -> Result<UnixTime> {
    match days {
        Lifetime::Days(0) => Err(Error::InvalidInput("--days must be at least 1".into())),
        Lifetime::Days(d) => Ok(now.plus_days(i64::from(d)).min(x509::NO_EXPIRY)),
        Lifetime::Forever => Ok(x509::NO_EXPIRY),
    }
}

/// Reads a PEM file holding one block with `tag`.
pub fn read_pem_file(path: &Path, tag: &str) -> Result<Vec<u8>> {
    let bytes = keyfab_formats::read_capped(path, keyfab_formats::MAX_SMALL_INPUT).map_err(
        |e| match e {
            keyfab_formats::FormatError::Io(e) => {
                Error::NotFound(format!("{}: {e}", path.display()))
            }
            other => Error::InvalidInput(format!("{}: {other}", path.display())),
        },
    )?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::InvalidInput(format!("{}: not a PEM file", path.display())))?;
    x509::from_pem(&text, tag).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
}
