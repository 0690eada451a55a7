//! The sealed software keystore: one file, `keystore.kfs`.
//!
//! ```text
//! "KFKS" | version u8 = 1 | argon2 memory_kib u32 | iterations u32 | lanes u32 | salt [16]
//!        | nonce [12] | AES-256-GCM(KEK, CBOR contents) with the header as AAD
//! ```
//! KEK = Argon2id(passphrase, salt). Every change rewrites the file atomically (write a
//! temporary file, fsync, rename, fsync the directory).

use crate::{Custody, CustodyError, Result};
use keyfab_crypto::aead;
use keyfab_crypto::hpke::{HpkePublicKey, HpkeRecipient, HpkeSecretKey};
use keyfab_crypto::kdf::{argon2id, Argon2Params};
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::{Secret32, SecretBytes};
use keyfab_crypto::sign::{EcdsaSigner, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, ZeroizeOnDrop};

const MAGIC: &[u8; 4] = b"KFKS";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 12 + 16;

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct Entry {
    handle: String,
    kind: String,
    #[serde(with = "serde_bytes")]
    secret: Vec<u8>,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct Contents {
    #[serde(with = "serde_bytes")]
    wrap_key: Vec<u8>,
    entries: Vec<Entry>,
}

const KIND_SIGN: &str = "p256-sign";
const KIND_HPKE: &str = "hpke-p256";

/// Keys in a file of the node's home, sealed under a key derived from the passphrase
/// (Argon2id) with AES-256-GCM; held in memory only while the node runs.
pub struct SoftwareKeystore {
    path: PathBuf,
    header: Vec<u8>,
    kek: Secret32,
    wrap_key: Secret32,
    signing: BTreeMap<String, SigningKey>,
    hpke: BTreeMap<String, HpkeSecretKey>,
    rng_nonce: Box<dyn SecureRng>,
}

fn header(params: Argon2Params, salt: &[u8; 16]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.push(VERSION);
    h.extend_from_slice(&params.memory_kib.to_be_bytes());
    h.extend_from_slice(&params.iterations.to_be_bytes());
    h.extend_from_slice(&params.lanes.to_be_bytes());
    h.extend_from_slice(salt);
    h
}

/// The header's parameters and salt. A file cut short, with another magic, or with
/// Argon2 parameters outside what keyfab writes is a modified keystore: `locked`, as a
/// wrong passphrase is (FORMATS.md §9). Only another version says so, as age does.
fn parse_header(bytes: &[u8]) -> Result<(Argon2Params, [u8; 16])> {
    if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
        return Err(CustodyError::Locked);
    }
    if bytes[4] != VERSION {
        return Err(CustodyError::Malformed(format!(
            "unsupported version v{}",
            bytes[4]
        )));
    }
    let u = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let params = Argon2Params {
        memory_kib: u(5),
        iterations: u(9),
        lanes: u(13),
    };
    // Refuse parameters an attacker could lower to make guessing cheap, or raise to
    // exhaust memory.
    if params.memory_kib < 8 * 1024
        || params.memory_kib > 4 * 1024 * 1024
        || params.iterations == 0
        || params.iterations > 64
        || params.lanes == 0
        || params.lanes > 16
    {
        return Err(CustodyError::Locked);
    }
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&bytes[17..33]);
    Ok((params, salt))
}

/// Writes `bytes` to `path` atomically and durably.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // A bare file name's parent is "": the current directory.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = path.with_extension("tmp");
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // The user's alone, whatever the umask: `mode` applies only under it.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl SoftwareKeystore {
    /// Creates a new keystore sealed under `passphrase`. Refuses to overwrite one.
    pub fn create(path: &Path, passphrase: &SecretBytes, rng: &dyn SecureRng) -> Result<Self> {
        Self::create_with(path, passphrase, rng, Argon2Params::DEFAULT)
    }

    /// [`SoftwareKeystore::create`] with the Argon2id cost given (tests use a small one).
    pub fn create_with(
        path: &Path,
        passphrase: &SecretBytes,
        rng: &dyn SecureRng,
        params: Argon2Params,
    ) -> Result<Self> {
        if path.exists() {
            return Err(CustodyError::AlreadyExists(path.display().to_string()));
        }
        if passphrase.is_empty() {
            return Err(CustodyError::Malformed("the passphrase is empty".into()));
        }
        let salt: [u8; 16] = {
            let mut s = [0u8; 16];
            rng.fill(&mut s);
            s
        };
        let ks = Self {
            path: path.to_owned(),
            header: header(params, &salt),
            kek: argon2id(passphrase, &salt, params)?,
            wrap_key: Secret32::random(rng),
            signing: BTreeMap::new(),
            hpke: BTreeMap::new(),
            rng_nonce: Box::new(keyfab_crypto::rng::SystemRng),
        };
        ks.persist()?;
        Ok(ks)
    }

    /// Opens the keystore. A wrong passphrase and a modified file both give
    /// [`CustodyError::Locked`].
    pub fn unlock(path: &Path, passphrase: &SecretBytes) -> Result<Self> {
        let bytes = std::fs::read(path)?;
        let (params, salt) = parse_header(&bytes)?;
        let kek = argon2id(passphrase, &salt, params)?;
        let plain = aead::open_random_nonce(&kek, &bytes[..HEADER_LEN], &bytes[HEADER_LEN..])
            .map_err(|_| CustodyError::Locked)?;
        let contents: Contents = ciborium::from_reader(plain.expose())
            .map_err(|_| CustodyError::Malformed("contents".into()))?;
        let wrap_key = Secret32::from_slice(&contents.wrap_key)
            .ok_or_else(|| CustodyError::Malformed("wrap key".into()))?;
        let mut signing = BTreeMap::new();
        let mut hpke = BTreeMap::new();
        for e in &contents.entries {
            match e.kind.as_str() {
                KIND_SIGN => {
                    signing.insert(e.handle.clone(), SigningKey::from_pkcs8(&e.secret)?);
                }
                KIND_HPKE => {
                    hpke.insert(e.handle.clone(), HpkeSecretKey::from_bytes(&e.secret)?);
                }
                other => return Err(CustodyError::Malformed(format!("key kind {other}"))),
            }
        }
        Ok(Self {
            path: path.to_owned(),
            header: bytes[..HEADER_LEN].to_vec(),
            kek,
            wrap_key,
            signing,
            hpke,
            rng_nonce: Box::new(keyfab_crypto::rng::SystemRng),
        })
    }

    fn persist(&self) -> Result<()> {
        let mut entries = Vec::new();
        for (h, k) in &self.signing {
            entries.push(Entry {
                handle: h.clone(),
                kind: KIND_SIGN.into(),
                secret: k.to_pkcs8().expose().to_vec(),
            });
        }
        for (h, k) in &self.hpke {
            entries.push(Entry {
                handle: h.clone(),
                kind: KIND_HPKE.into(),
                secret: k.to_bytes().expose().to_vec(),
            });
        }
        let contents = Contents {
            wrap_key: self.wrap_key.expose().to_vec(),
            entries,
        };
        let mut plain = SecretBytes::default();
        ciborium::into_writer(&contents, plain.expose_mut())
            .map_err(|e| CustodyError::Malformed(e.to_string()))?;
        let sealed = aead::seal_random_nonce(
            &self.kek,
            self.rng_nonce.as_ref(),
            &self.header,
            plain.expose(),
        )?;
        let mut file = self.header.clone();
        file.extend(sealed);
        write_atomic(&self.path, &file)?;
        Ok(())
    }

    fn check_new(&self, handle: &str) -> Result<()> {
        if self.signing.contains_key(handle) || self.hpke.contains_key(handle) {
            return Err(CustodyError::KeyExists(handle.to_owned()));
        }
        Ok(())
    }

    /// Adopts an existing signing key (the root key at `pki init-root`, generated in this
    /// process). Never used to import foreign keys.
    pub fn insert_signing_key(&mut self, handle: &str, key: SigningKey) -> Result<()> {
        self.check_new(handle)?;
        self.signing.insert(handle.to_owned(), key);
        self.persist()
    }

    /// Removes a key (rotation retires old keys this way).
    pub fn destroy(&mut self, handle: &str) -> Result<()> {
        let removed = self.signing.remove(handle).is_some() | self.hpke.remove(handle).is_some();
        if !removed {
            return Err(CustodyError::NoSuchKey(handle.to_owned()));
        }
        self.persist()
    }
}

impl Custody for SoftwareKeystore {
    fn signer(&self, handle: &str) -> Result<&dyn EcdsaSigner> {
        crate::key_by_handle(&self.signing, handle).map(|k| k as &dyn EcdsaSigner)
    }

    fn hpke(&self, handle: &str) -> Result<&dyn HpkeRecipient> {
        crate::key_by_handle(&self.hpke, handle).map(|k| k as &dyn HpkeRecipient)
    }

    fn generate_signing_key(&mut self, handle: &str, rng: &dyn SecureRng) -> Result<VerifyingKey> {
        self.check_new(handle)?;
        let key = SigningKey::generate(rng)?;
        let public = key.verifying_key();
        self.signing.insert(handle.to_owned(), key);
        self.persist()?;
        Ok(public)
    }

    fn generate_hpke_key(&mut self, handle: &str, rng: &dyn SecureRng) -> Result<HpkePublicKey> {
        self.check_new(handle)?;
        let key = HpkeSecretKey::generate(rng);
        let public = key.public_key()?;
        self.hpke.insert(handle.to_owned(), key);
        self.persist()?;
        Ok(public)
    }

    fn wrap_data_key(&self, dek: &Secret32, aad: &[u8], rng: &dyn SecureRng) -> Result<Vec<u8>> {
        Ok(aead::seal_random_nonce(
            &self.wrap_key,
            rng,
            aad,
            dek.expose(),
        )?)
    }

    fn unwrap_data_key(&self, wrapped: &[u8], aad: &[u8]) -> Result<Secret32> {
        let plain = aead::open_random_nonce(&self.wrap_key, aad, wrapped)
            .map_err(|_| CustodyError::Locked)?;
        Secret32::from_slice(plain.expose()).ok_or(CustodyError::Locked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfab_crypto::rng::SeededRng;

    #[test]
    fn keys_survive_unlock_and_modified_file_is_locked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.kfs");
        let pass = SecretBytes::new(b"pw".to_vec());
        let rng = SeededRng::new(1);
        let (sign_pub, hpke_pub, wrapped) = {
            let mut ks = SoftwareKeystore::create(&p, &pass, &rng).unwrap();
            let s = ks.generate_signing_key("s", &rng).unwrap();
            let h = ks.generate_hpke_key("h", &rng).unwrap();
            let w = ks
                .wrap_data_key(&Secret32::new([7; 32]), b"aad", &rng)
                .unwrap();
            (s, h, w)
        };
        let ks = SoftwareKeystore::unlock(&p, &pass).unwrap();
        assert_eq!(ks.signer("s").unwrap().verifying_key(), sign_pub);
        assert_eq!(ks.hpke("h").unwrap().public_key().unwrap(), hpke_pub);
        assert_eq!(
            ks.unwrap_data_key(&wrapped, b"aad").unwrap().expose(),
            &[7; 32]
        );
        assert!(ks.unwrap_data_key(&wrapped, b"other").is_err());
        assert!(matches!(ks.signer("nope"), Err(CustodyError::NoSuchKey(_))));

        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            SoftwareKeystore::unlock(&p, &pass),
            Err(CustodyError::Locked)
        ));
    }

    #[test]
    fn a_keystore_whose_argon2_parameters_were_changed_is_locked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.kfs");
        let pass = SecretBytes::new(b"pw".to_vec());
        SoftwareKeystore::create(&p, &pass, &SeededRng::new(1)).unwrap();
        let original = std::fs::read(&p).unwrap();
        // Memory lowered to 1 KiB (out of range), iterations raised within range (the
        // header is authenticated), magic changed, and the file cut inside its header.
        for edit in 0..4 {
            let mut bytes = original.clone();
            match edit {
                0 => bytes[5..9].copy_from_slice(&1u32.to_be_bytes()),
                1 => bytes[12] ^= 1,
                2 => bytes[0] ^= 1,
                _ => bytes.truncate(20),
            }
            std::fs::write(&p, &bytes).unwrap();
            assert!(matches!(
                SoftwareKeystore::unlock(&p, &pass),
                Err(CustodyError::Locked)
            ));
        }
    }

    #[test]
    fn create_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ks.kfs");
        let pass = SecretBytes::new(b"pw".to_vec());
        SoftwareKeystore::create(&p, &pass, &SeededRng::new(1)).unwrap();
        assert!(matches!(
            SoftwareKeystore::create(&p, &pass, &SeededRng::new(1)),
            Err(CustodyError::AlreadyExists(_))
        ));
    }
}
