//! Custody of identity keys in a PKCS#11 token (an HSM; SoftHSM2 in tests).
//!
//! Keys are generated inside the token, `CKA_SENSITIVE` and not `CKA_EXTRACTABLE`: no
//! call of this crate, or of the token, hands a private key out. Signing hashes on the
//! host and signs the digest in the token (`CKM_ECDSA`); HPKE opening does the P-256 ECDH
//! in the token (`CKM_ECDH1_DERIVE`) and DHKEM's key derivation and the key schedule on
//! the host ([`keyfab_crypto::hpke::open_context_with_dh`]); data keys are wrapped with
//! AES-256-GCM by an AES key that never leaves the token.
//!
//! Which API for which job:
//! - a token keyfab has not used yet: [`Pkcs11Custody::create`] (makes the wrapping key);
//! - later runs: [`Pkcs11Custody::open`] (finds keyfab's keys by label);
//! - what engines call: the [`Custody`] trait.
//!
//! Tokens allow few sessions: requests share a pool of at most
//! [`TokenConfig::max_sessions`], and wait for a free one beyond it.

#![forbid(unsafe_code)]

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use keyfab_crypto::hpke::{HpkePublicKey, HpkeRecipient, Opener};
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::{Secret32, SecretBytes};
use keyfab_crypto::sign::{EcdsaSigner, VerifyingKey};
use keyfab_custody::{Custody, CustodyError, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

/// Every keyfab object's label starts with this; the rest is the custody handle.
const LABEL_PREFIX: &str = "keyfab:";
/// The handle of the AES key that wraps data keys.
const WRAP_HANDLE: &str = "data-key-wrap";
/// DER of the named curve P-256 (OID 1.2.840.10045.3.1.7), for `CKA_EC_PARAMS`.
pub(crate) const P256_PARAMS: [u8; 10] =
    [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const GCM_IV_LEN: usize = 12;

/// Where the token is and how to log in to it.
pub struct TokenConfig {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label (slot numbers change when tokens are added; labels do not).
    pub token_label: String,
    /// The user PIN.
    pub pin: SecretBytes,
    /// At most this many sessions open at once.
    pub max_sessions: usize,
}

pub(crate) fn token_err(what: &str, e: impl std::fmt::Display) -> CustodyError {
    CustodyError::Token(format!("{what}: {e}"))
}

/// Open sessions, logged in, shared by every key of the custody.
struct SessionPool {
    pkcs11: Pkcs11,
    slot: Slot,
    idle: Mutex<Pool>,
    freed: Condvar,
    max: usize,
}

struct Pool {
    sessions: Vec<Session>,
    open: usize,
}

impl SessionPool {
    /// Runs `f` with a session of the pool: an idle one, a new one while fewer than the
    /// maximum are open, otherwise the next one freed.
    fn with<T>(&self, f: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        let session = {
            let mut pool = self
                .idle
                .lock()
                .map_err(|_| token_err("session pool", "poisoned"))?;
            loop {
                if let Some(s) = pool.sessions.pop() {
                    break s;
                }
                if pool.open < self.max {
                    pool.open += 1;
                    drop(pool);
                    match self.pkcs11.open_rw_session(self.slot) {
                        Ok(s) => break s,
                        Err(e) => {
                            if let Ok(mut p) = self.idle.lock() {
                                p.open -= 1;
                            }
                            return Err(token_err("open session", e));
                        }
                    }
                }
                pool = self
                    .freed
                    .wait(pool)
                    .map_err(|_| token_err("session pool", "poisoned"))?;
            }
        };
        let result = f(&session);
        if let Ok(mut pool) = self.idle.lock() {
            pool.sessions.push(session);
        }
        self.freed.notify_one();
        result
    }
}

/// A signing key in the token.
struct TokenSigner {
    pool: Arc<SessionPool>,
    key: ObjectHandle,
    public: VerifyingKey,
}

impl EcdsaSigner for TokenSigner {
    fn verifying_key(&self) -> VerifyingKey {
        self.public.clone()
    }

    /// ECDSA P-256 with SHA-256: the digest is computed here, signed in the token;
    /// the signature is r ‖ s, 64 bytes.
    fn sign(&self, message: &[u8]) -> keyfab_crypto::Result<Vec<u8>> {
        let digest = keyfab_crypto::hash::sha256(message);
        self.pool
            .with(|s| {
                s.sign(&Mechanism::Ecdsa, self.key, &digest)
                    .map_err(|e| token_err("sign", e))
            })
            .map_err(|_| keyfab_crypto::CryptoError::Internal)
    }
}

/// An HPKE recipient key in the token.
struct TokenHpke {
    pool: Arc<SessionPool>,
    key: ObjectHandle,
    public: HpkePublicKey,
}

impl HpkeRecipient for TokenHpke {
    fn public_key(&self) -> keyfab_crypto::Result<HpkePublicKey> {
        Ok(self.public.clone())
    }

    fn open_context(&self, enc: &[u8], info: &[u8]) -> keyfab_crypto::Result<Opener> {
        let dh = self
            .pool
            .with(|s| ecdh(s, self.key, enc))
            .map_err(|_| keyfab_crypto::CryptoError::DecryptFailed)?;
        keyfab_crypto::hpke::open_context_with_dh(&dh, enc, &self.public, info)
    }
}

/// The raw P-256 ECDH of `key` with `peer`, done in the token. The derived value comes
/// out as a short-lived session object that is read and destroyed at once.
fn ecdh(session: &Session, key: ObjectHandle, peer: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let params = Ecdh1DeriveParams::new(EcKdf::null(), peer);
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    let derived = session
        .derive_key(&Mechanism::Ecdh1Derive(params), key, &template)
        .map_err(|e| token_err("ECDH", e))?;
    let value = session.get_attributes(derived, &[AttributeType::Value]);
    let _ = session.destroy_object(derived);
    match value.map_err(|e| token_err("ECDH value", e))?.pop() {
        Some(Attribute::Value(v)) if v.len() == 32 => Ok(zeroize::Zeroizing::new(v)),
        _ => Err(CustodyError::Token("ECDH gave no 32-byte value".into())),
    }
}

/// Identity keys in a PKCS#11 token.
pub struct Pkcs11Custody {
    pool: Arc<SessionPool>,
    signers: BTreeMap<String, TokenSigner>,
    hpke: BTreeMap<String, TokenHpke>,
    /// Set by `open` and `create`: every custody in use has one.
    wrap_key: Option<ObjectHandle>,
}

impl Pkcs11Custody {
    /// Opens a token keyfab already uses.
    pub fn open(config: &TokenConfig) -> Result<Self> {
        let pool = Arc::new(connect(config)?);
        let mut custody = Self::load(pool)?;
        custody.wrap_key =
            Some(custody.find_wrap_key()?.ok_or_else(|| {
                CustodyError::Token("the token has no keyfab wrapping key".into())
            })?);
        Ok(custody)
    }

    /// Starts using a token: makes the data-key wrapping key inside it. Refuses a token
    /// that has keyfab keys already.
    pub fn create(config: &TokenConfig) -> Result<Self> {
        let pool = Arc::new(connect(config)?);
        let mut custody = Self::load(pool)?;
        if custody.find_wrap_key()?.is_some()
            || !custody.signers.is_empty()
            || !custody.hpke.is_empty()
        {
            return Err(CustodyError::AlreadyExists(format!(
                "token '{}' already holds keyfab keys",
                config.token_label
            )));
        }
        let wrap_key = custody.pool.with(|s| {
            s.generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(label(WRAP_HANDLE)),
                ],
            )
            .map_err(|e| token_err("generate the wrapping key", e))
        })?;
        custody.wrap_key = Some(wrap_key);
        Ok(custody)
    }

    /// The token's keyfab keys, by label.
    fn load(pool: Arc<SessionPool>) -> Result<Self> {
        let found = pool.with(|s| {
            let keys = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::EC),
                ])
                .map_err(|e| token_err("find keys", e))?;
            let mut out = Vec::new();
            for key in keys {
                let attrs = s
                    .get_attributes(key, &[AttributeType::Label, AttributeType::Sign])
                    .map_err(|e| token_err("key attributes", e))?;
                let (mut name, mut sign) = (None, false);
                for a in attrs {
                    match a {
                        Attribute::Label(l) => {
                            name = String::from_utf8(l)
                                .ok()
                                .and_then(|l| l.strip_prefix(LABEL_PREFIX).map(str::to_owned));
                        }
                        Attribute::Sign(b) => sign = b,
                        _ => {}
                    }
                }
                if let Some(name) = name {
                    let point = public_point(s, &name)?;
                    out.push((name, key, sign, point));
                }
            }
            Ok(out)
        })?;
        let mut custody = Self {
            pool,
            signers: BTreeMap::new(),
            hpke: BTreeMap::new(),
            wrap_key: None,
        };
        for (name, key, sign, point) in found {
            custody.insert(name, key, sign, &point)?;
        }
        Ok(custody)
    }

    fn insert(
        &mut self,
        handle: String,
        key: ObjectHandle,
        sign: bool,
        point: &[u8],
    ) -> Result<()> {
        let pool = self.pool.clone();
        if sign {
            let public = VerifyingKey::from_sec1(point)?;
            self.signers
                .insert(handle, TokenSigner { pool, key, public });
        } else {
            let public = HpkePublicKey::from_sec1(point)?;
            self.hpke.insert(handle, TokenHpke { pool, key, public });
        }
        Ok(())
    }

    fn find_wrap_key(&self) -> Result<Option<ObjectHandle>> {
        self.pool.with(|s| {
            let found = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(label(WRAP_HANDLE)),
                ])
                .map_err(|e| token_err("find the wrapping key", e))?;
            Ok(found.first().copied())
        })
    }

    fn wrapping_key(&self) -> Result<ObjectHandle> {
        self.wrap_key
            .ok_or_else(|| CustodyError::Token("the token has no keyfab wrapping key".into()))
    }

    fn check_new(&self, handle: &str) -> Result<()> {
        if self.signers.contains_key(handle)
            || self.hpke.contains_key(handle)
            || handle == WRAP_HANDLE
        {
            return Err(CustodyError::KeyExists(handle.to_owned()));
        }
        Ok(())
    }

    /// A P-256 key pair made inside the token: the private half sensitive, not
    /// extractable, usable only to sign (`sign`) or only to derive (ECDH).
    fn generate_p256(&mut self, handle: &str, sign: bool) -> Result<Vec<u8>> {
        self.check_new(handle)?;
        let name = label(handle);
        let (key, point) = self.pool.with(|s| {
            let public = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(sign),
                Attribute::Label(name.clone()),
            ];
            let private = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(sign),
                Attribute::Derive(!sign),
                Attribute::Label(name.clone()),
            ];
            let (_, key) = s
                .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
                .map_err(|e| token_err("generate a key pair", e))?;
            Ok((key, public_point(s, handle)?))
        })?;
        self.insert(handle.to_owned(), key, sign, &point)?;
        Ok(point)
    }

    /// Attributes of the private key behind `handle`, as the token reports them (for
    /// operators' checks and the tests: sensitive, extractable, ever extractable).
    pub fn private_key_flags(&self, handle: &str) -> Result<KeyFlags> {
        let key = self
            .signers
            .get(handle)
            .map(|k| k.key)
            .or_else(|| self.hpke.get(handle).map(|k| k.key))
            .or(if handle == WRAP_HANDLE {
                self.wrap_key
            } else {
                None
            })
            .ok_or_else(|| CustodyError::NoSuchKey(handle.to_owned()))?;
        let attrs = self.pool.with(|s| {
            s.get_attributes(
                key,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::AlwaysSensitive,
                ],
            )
            .map_err(|e| token_err("key attributes", e))
        })?;
        let mut flags = KeyFlags::default();
        for a in attrs {
            match a {
                Attribute::Sensitive(b) => flags.sensitive = b,
                Attribute::Extractable(b) => flags.extractable = b,
                Attribute::NeverExtractable(b) => flags.never_extractable = b,
                Attribute::AlwaysSensitive(b) => flags.always_sensitive = b,
                _ => {}
            }
        }
        Ok(flags)
    }

    /// Asks the token for the private value of `handle` (`CKA_VALUE`), as an attacker
    /// with the PIN would: the token must refuse. `Ok(())` means it refused.
    pub fn export_is_refused(&self, handle: &str) -> Result<()> {
        let key = self
            .signers
            .get(handle)
            .map(|k| k.key)
            .or_else(|| self.hpke.get(handle).map(|k| k.key))
            .ok_or_else(|| CustodyError::NoSuchKey(handle.to_owned()))?;
        let read = self
            .pool
            .with(|s| Ok(s.get_attributes(key, &[AttributeType::Value])));
        match read? {
            Err(_) => Ok(()),
            Ok(attrs) if !attrs.iter().any(|a| matches!(a, Attribute::Value(_))) => Ok(()),
            Ok(_) => Err(CustodyError::Token(format!(
                "the token handed out the private value of '{handle}'"
            ))),
        }
    }
}

/// What the token says about a private key.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeyFlags {
    /// `CKA_SENSITIVE`: the token never reveals the value.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`: the key may be wrapped out (must be false).
    pub extractable: bool,
    /// `CKA_NEVER_EXTRACTABLE`: the key was never extractable.
    pub never_extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`: the key was sensitive since it was made.
    pub always_sensitive: bool,
}

fn label(handle: &str) -> Vec<u8> {
    format!("{LABEL_PREFIX}{handle}").into_bytes()
}

/// The uncompressed point of the public key labelled for `handle` (`CKA_EC_POINT` is a
/// DER OCTET STRING around it).
fn public_point(s: &Session, handle: &str) -> Result<Vec<u8>> {
    let found = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(label(handle)),
        ])
        .map_err(|e| token_err("find a public key", e))?;
    let key = found
        .first()
        .ok_or_else(|| CustodyError::Token(format!("no public key for '{handle}'")))?;
    let attrs = s
        .get_attributes(*key, &[AttributeType::EcPoint])
        .map_err(|e| token_err("public key", e))?;
    let Some(Attribute::EcPoint(der)) = attrs.into_iter().next() else {
        return Err(CustodyError::Token(format!("no EC point for '{handle}'")));
    };
    match der.as_slice() {
        [0x04, 65, point @ ..] if point.len() == 65 => Ok(point.to_vec()),
        point if point.len() == 65 && point[0] == 0x04 => Ok(point.to_vec()),
        _ => Err(CustodyError::Token(format!(
            "'{handle}' is not a P-256 point"
        ))),
    }
}

/// The module loaded and initialized once for the whole process, and kept: PKCS#11 is
/// initialized once per process, and unloading a module that registered exit handlers
/// (SoftHSM does) would leave them pointing into nothing.
fn module_context(module: &std::path::Path) -> Result<Pkcs11> {
    static LOADED: Mutex<Vec<(PathBuf, Pkcs11)>> = Mutex::new(Vec::new());
    let mut loaded = LOADED
        .lock()
        .map_err(|_| token_err("PKCS#11 modules", "poisoned"))?;
    if let Some((_, p)) = loaded.iter().find(|(m, _)| m == module) {
        return Ok(p.clone());
    }
    let pkcs11 = Pkcs11::new(module)
        .map_err(|e| token_err(&format!("load PKCS#11 module {}", module.display()), e))?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(token_err("initialize", e)),
    }
    loaded.push((module.to_owned(), pkcs11.clone()));
    Ok(pkcs11)
}

/// Held while this process lists slots or initializes a token. SoftHSM 2.6 adds a slot
/// for a fresh uninitialized token inside `C_GetSlotList` without a lock of its own, so
/// two threads listing at once after a token was initialized both add one under the
/// same slot id and the module aborts the process (`SlotManager::insertToken`
/// assertion) — seen when the PKCS#11 baseline opened a session on each core.
static SLOT_LISTING: Mutex<()> = Mutex::new(());

fn slot_listing() -> Result<std::sync::MutexGuard<'static, ()>> {
    SLOT_LISTING
        .lock()
        .map_err(|_| token_err("PKCS#11 slots", "poisoned"))
}

/// Loads the module, finds the token by label, logs in.
fn connect(config: &TokenConfig) -> Result<SessionPool> {
    let pkcs11 = module_context(&config.module)?;
    let slot = find_token(&pkcs11, &config.token_label)?;
    let session = pkcs11
        .open_rw_session(slot)
        .map_err(|e| token_err("open session", e))?;
    let pin = std::str::from_utf8(config.pin.expose())
        .map_err(|_| CustodyError::Token("the PIN is not UTF-8".into()))?;
    match session.login(UserType::User, Some(&AuthPin::from(pin))) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(P11Error::Pkcs11(RvError::PinIncorrect, _)) => return Err(CustodyError::PinRefused),
        Err(e) => return Err(token_err("log in", e)),
    }
    Ok(SessionPool {
        pkcs11,
        slot,
        idle: Mutex::new(Pool {
            sessions: vec![session],
            open: 1,
        }),
        freed: Condvar::new(),
        max: config.max_sessions.max(1),
    })
}

/// How many times [`find_token`] scans the slots, and the longest pause between scans:
/// ~5 s in all. Many processes opening and initializing tokens of one file-backed
/// SoftHSM2 store at once (a test suite does, some of them killed mid-way) left a slot
/// unreadable for longer than 0.2 s, and under full load for longer than 1.4 s; a token
/// that is really missing is reported after the last scan.
const TOKEN_SCANS: u32 = 12;
const TOKEN_SCAN_PAUSE_MAX_MS: u64 = 800;

/// The slot holding the token `token_label`. A slot that cannot describe itself is
/// skipped (another process may be initializing a token in it right now), and the scan
/// is tried again, with growing pauses, before the token is reported missing.
fn find_token(pkcs11: &Pkcs11, token_label: &str) -> Result<Slot> {
    let mut last_error = None;
    for attempt in 0..TOKEN_SCANS {
        if attempt > 0 {
            let pause = (10u64 << attempt).min(TOKEN_SCAN_PAUSE_MAX_MS);
            std::thread::sleep(std::time::Duration::from_millis(pause));
        }
        let listed = {
            let _listing = slot_listing()?;
            pkcs11.get_slots_with_token().and_then(|slots| {
                slots
                    .into_iter()
                    .map(|slot| Ok((slot, pkcs11.get_token_info(slot))))
                    .collect::<std::result::Result<Vec<_>, P11Error>>()
            })
        };
        let slots = match listed {
            Ok(s) => s,
            Err(e) => {
                last_error = Some(token_err("list slots", e));
                continue;
            }
        };
        let mut unreadable = false;
        for (slot, info) in slots {
            match info {
                Ok(info) if info.token_initialized() && info.label().trim_end() == token_label => {
                    return Ok(slot)
                }
                Ok(_) => {}
                Err(e) => {
                    unreadable = true;
                    last_error = Some(token_err("token info", e));
                }
            }
        }
        if !unreadable {
            break;
        }
    }
    Err(last_error.unwrap_or_else(|| CustodyError::NoToken(token_label.to_owned())))
}

impl Custody for Pkcs11Custody {
    fn signer(&self, handle: &str) -> Result<&dyn EcdsaSigner> {
        keyfab_custody::key_by_handle(&self.signers, handle).map(|k| k as &dyn EcdsaSigner)
    }

    fn hpke(&self, handle: &str) -> Result<&dyn HpkeRecipient> {
        keyfab_custody::key_by_handle(&self.hpke, handle).map(|k| k as &dyn HpkeRecipient)
    }

    fn generate_signing_key(&mut self, handle: &str, _rng: &dyn SecureRng) -> Result<VerifyingKey> {
        let point = self.generate_p256(handle, true)?;
        Ok(VerifyingKey::from_sec1(&point)?)
    }

    fn generate_hpke_key(&mut self, handle: &str, _rng: &dyn SecureRng) -> Result<HpkePublicKey> {
        let point = self.generate_p256(handle, false)?;
        Ok(HpkePublicKey::from_sec1(&point)?)
    }

    /// AES-256-GCM in the token: IV (12) ‖ ciphertext ‖ tag (16).
    fn wrap_data_key(&self, dek: &Secret32, aad: &[u8], rng: &dyn SecureRng) -> Result<Vec<u8>> {
        let wrap_key = self.wrapping_key()?;
        let mut iv = [0u8; GCM_IV_LEN];
        rng.fill(&mut iv);
        let mut params_iv = iv;
        let sealed = self.pool.with(|s| {
            let params = GcmParams::new(&mut params_iv, aad, 128.into())
                .map_err(|e| token_err("GCM parameters", e))?;
            s.encrypt(&Mechanism::AesGcm(params), wrap_key, dek.expose())
                .map_err(|e| token_err("wrap a data key", e))
        })?;
        let mut out = iv.to_vec();
        out.extend(sealed);
        Ok(out)
    }

    fn unwrap_data_key(&self, wrapped: &[u8], aad: &[u8]) -> Result<Secret32> {
        let wrap_key = self.wrapping_key()?;
        if wrapped.len() < GCM_IV_LEN + 16 {
            return Err(CustodyError::Locked);
        }
        let mut iv = [0u8; GCM_IV_LEN];
        iv.copy_from_slice(&wrapped[..GCM_IV_LEN]);
        let plain = self.pool.with(|s| {
            let params = GcmParams::new(&mut iv, aad, 128.into())
                .map_err(|e| token_err("GCM parameters", e))?;
            // A wrong tag (another key, another binding, a modified value) is `locked`,
            // as with the software keystore.
            s.decrypt(&Mechanism::AesGcm(params), wrap_key, &wrapped[GCM_IV_LEN..])
                .map_err(|_| CustodyError::Locked)
        })?;
        let plain = zeroize::Zeroizing::new(plain);
        Secret32::from_slice(&plain)
            .ok_or_else(|| CustodyError::Malformed("data key length".into()))
    }
}

/// The HSM-centred baseline the benchmarks compare with (feature `harness`).
#[cfg(any(test, feature = "harness"))]
pub mod peer;

#[cfg(any(test, feature = "harness"))]
/// Initializes the token in the first free slot of `module` with `label`, a security
/// officer PIN and a user PIN: what an HSM administrator does once (benchmarks and tests
/// do it with SoftHSM2).
pub fn init_token(
    module: &std::path::Path,
    label: &str,
    so_pin: &str,
    user_pin: &str,
) -> Result<()> {
    let pkcs11 = module_context(module)?;
    let _listing = slot_listing()?;
    let slots = pkcs11
        .get_all_slots()
        .map_err(|e| token_err("list slots", e))?;
    let free = slots
        .into_iter()
        .find(|s| {
            pkcs11
                .get_token_info(*s)
                .map(|t| !t.token_initialized())
                .unwrap_or(false)
        })
        .ok_or_else(|| CustodyError::Token("no free slot for a new token".into()))?;
    pkcs11
        .init_token(free, &AuthPin::from(so_pin), label)
        .map_err(|e| token_err("initialize the token", e))?;
    let session = pkcs11
        .open_rw_session(free)
        .map_err(|e| token_err("open session", e))?;
    session
        .login(UserType::So, Some(&AuthPin::from(so_pin)))
        .map_err(|e| token_err("log in as security officer", e))?;
    session
        .init_pin(&AuthPin::from(user_pin))
        .map_err(|e| token_err("set the user PIN", e))?;
    session.logout().map_err(|e| token_err("log out", e))?;
    Ok(())
}

#[cfg(any(test, feature = "harness"))]
/// A logged-in session on the token `label` of `module`, for the baseline ([`peer`]).
pub fn user_session(module: &std::path::Path, label: &str, pin: &str) -> Result<Session> {
    let pool = connect(&TokenConfig {
        module: module.to_owned(),
        token_label: label.to_owned(),
        pin: SecretBytes::new(pin.as_bytes().to_vec()),
        max_sessions: 1,
    })?;
    pool.pkcs11
        .open_rw_session(pool.slot)
        .map_err(|e| token_err("open session", e))
}

#[cfg(test)]
mod tests;
