//! A chip vendor for drills: the root a policy's `[chips]` trusts, and the certificates
//! it gives simulated chips, as a secure element's vendor certifies each chip's key at
//! its factory.
//!
//! A vendor directory holds `vendor-root.crt` (what `[chips] roots` lists), `vendor.key`
//! (the vendor's signing key, in clear: a drill's, never a real vendor's) and `chips/`,
//! one certificate per chip key, written the first time a chip is certified and read
//! after — a chip keeps its certificate, so a rerun of a line sends the same chain.

use crate::{Result, StationError};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, chip, Validity};
use std::path::{Path, PathBuf};

/// The vendor's root certificate in its directory (PEM).
pub const ROOT_FILE: &str = "vendor-root.crt";
/// The vendor's signing key in its directory (PKCS#8 PEM, mode 0600).
pub const KEY_FILE: &str = "vendor.key";
/// The chips' certificates, one file per chip key.
pub const CHIPS_DIR: &str = "chips";

/// How long a simulated chip's certificate is valid: 25 years, as secure elements'
/// certificates often are.
const CHIP_DAYS: i64 = 25 * 365;

fn failed(what: impl std::fmt::Display) -> StationError {
    StationError::ChipVendor(what.to_string())
}

/// A vendor that certifies chips.
pub struct ChipVendor {
    dir: PathBuf,
    key: SigningKey,
    root: Vec<u8>,
}

impl ChipVendor {
    /// Creates a vendor in `dir` (created; refused if it holds a vendor already): a new
    /// P-256 key and a self-signed root named `subject`, valid from a day before `now`
    /// for ever. Returns the root certificate's path.
    pub fn create(
        dir: &Path,
        subject: &str,
        rng: &dyn SecureRng,
        now: UnixTime,
    ) -> Result<PathBuf> {
        let key = SigningKey::generate(rng).map_err(failed)?;
        let validity = Validity {
            not_before: now.plus_days(-1),
            not_after: x509::NO_EXPIRY,
        };
        let root = chip::chip_vendor_root(&key, subject, validity, rng).map_err(failed)?;
        std::fs::create_dir_all(dir.join(CHIPS_DIR))
            .map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        let pem = x509::to_pem_secret(key.to_pkcs8().expose(), "PRIVATE KEY");
        write_new(&dir.join(KEY_FILE), pem.as_bytes())?;
        let root_path = dir.join(ROOT_FILE);
        write_new(&root_path, x509::to_pem(&root, "CERTIFICATE").as_bytes())?;
        Ok(root_path)
    }

    /// The vendor of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let read = |name: &str, tag: &str| -> Result<Vec<u8>> {
            let path = dir.join(name);
            let text = keyfab_formats::read_capped_text(&path, keyfab_formats::MAX_SMALL_INPUT)
                .map_err(|e| failed(format!("{}: {e}", path.display())))?;
            x509::from_pem(&text, tag).map_err(|e| failed(format!("{}: {e}", path.display())))
        };
        let pkcs8 = keyfab_crypto::secret::SecretBytes::new(read(KEY_FILE, "PRIVATE KEY")?);
        Ok(Self {
            dir: dir.to_owned(),
            key: SigningKey::from_pkcs8(pkcs8.expose()).map_err(failed)?,
            root: read(ROOT_FILE, "CERTIFICATE")?,
        })
    }

    /// The vendor's root certificate (DER).
    pub fn root(&self) -> &[u8] {
        &self.root
    }

    /// The certificate chain of the chip `serial` whose key is the P-256 point
    /// `chip_point`: the one it was given before, or a new one — an end entity naming
    /// `serial` as its commonName, serialNumber and `urn:chip:<serial>`, valid from a day
    /// before `now` for 25 years.
    pub fn chain_of(
        &self,
        serial: &str,
        chip_point: &[u8],
        rng: &dyn SecureRng,
        now: UnixTime,
    ) -> Result<Vec<Vec<u8>>> {
        let mut name = serial.as_bytes().to_vec();
        name.push(0);
        name.extend_from_slice(chip_point);
        let path = self
            .dir
            .join(CHIPS_DIR)
            .join(format!("{}.crt", &Fingerprint::of(&name).to_hex()[..32]));
        if let Ok(text) = keyfab_formats::read_capped_text(&path, chip::MAX_CHIP_CHAIN_BYTES) {
            return chip::read_chip_chain(text.as_bytes())
                .map_err(|e| failed(format!("{}: {e}", path.display())));
        }
        let validity = Validity {
            not_before: now.plus_days(-1),
            not_after: now.plus_days(CHIP_DAYS),
        };
        let cert =
            chip::issue_chip_certificate(&self.key, &self.root, chip_point, serial, validity, rng)
                .map_err(failed)?;
        // Another programmer certifying the same chip at the same moment: the first
        // certificate written is the chip's.
        match write_new(&path, x509::to_pem(&cert, "CERTIFICATE").as_bytes()) {
            Ok(()) => Ok(vec![cert]),
            Err(_) if path.exists() => self.chain_of(serial, chip_point, rng, now),
            Err(e) => Err(e),
        }
    }
}

/// Writes a new file, mode 0600, whole: written beside and renamed into place without
/// replacing one that exists.
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| failed(format!("{}: {e}", path.display()));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(fail)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfab_crypto::rng::SystemRng;

    #[test]
    fn a_chip_keeps_its_certificate_and_it_verifies_to_the_vendor_root() {
        let dir = tempfile::tempdir().unwrap();
        let now = UnixTime(1_800_000_000);
        ChipVendor::create(dir.path(), "CN=Drill Chips Root", &SystemRng, now).unwrap();
        assert!(ChipVendor::create(dir.path(), "CN=Again", &SystemRng, now).is_err());
        let vendor = ChipVendor::open(dir.path()).unwrap();
        let chip = SigningKey::generate(&SystemRng).unwrap();
        let point = chip.verifying_key().sec1().to_vec();
        let chain = vendor.chain_of("TSV2-1", &point, &SystemRng, now).unwrap();
        assert_eq!(
            vendor.chain_of("TSV2-1", &point, &SystemRng, now).unwrap(),
            chain
        );
        let leaf = chip::verify_chip_chain(&chain, &[vendor.root()]).unwrap();
        assert_eq!(leaf.subject_serial.as_deref(), Some("TSV2-1"));
        let other = SigningKey::generate(&SystemRng).unwrap();
        let again = vendor
            .chain_of("TSV2-1", other.verifying_key().sec1(), &SystemRng, now)
            .unwrap();
        assert_ne!(again, chain, "another key is another chip");
    }
}
