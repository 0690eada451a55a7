//! HPKE (RFC 9180), base mode, suite DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM.
//!
//! keyfab uses one HPKE context per file and seals the file as a sequence of chunks with
//! that context (RFC 9180 §5.2: each `Seal` advances the sequence number, so chunks cannot be
//! reordered or dropped without detection when the last chunk is marked in its `aad`).
//! The P-256 suite is chosen so that site keys can later live in a PKCS#11 token.

use crate::rng::{RandCoreAdapter, SecureRng};
use crate::secret::{Secret32, SecretBytes};
use crate::{CryptoError, Result};
use hpke::aead::{AeadCtxR, AeadCtxS, AesGcm256};
use hpke::kdf::HkdfSha256;
use hpke::kem::DhP256HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};

type Kem = DhP256HkdfSha256;

/// Length of the encapsulated key (`enc`): an uncompressed P-256 point.
pub const ENC_LEN: usize = 65;
pub const TAG_LEN: usize = 16;

/// The recipient's private key: a P-256 scalar.
pub struct HpkeSecretKey(Secret32);

impl HpkeSecretKey {
    /// A new key pair from 32 bytes of the injected generator (RFC 9180 `DeriveKeyPair`).
    pub fn generate(rng: &dyn SecureRng) -> Self {
        let ikm = Secret32::random(rng);
        let (sk, _) = Kem::derive_keypair(ikm.expose());
        let mut bytes = [0u8; 32];
        sk.write_exact(&mut bytes);
        let s = Self(Secret32::new(bytes));
        zeroize::Zeroize::zeroize(&mut bytes);
        s
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes)
            .map_err(|_| CryptoError::InvalidKey("not a P-256 HPKE private key"))?;
        Secret32::from_slice(bytes)
            .map(Self)
            .ok_or(CryptoError::InvalidKey("HPKE private key length"))
    }

    /// The scalar, for sealing into custody. Zeroized when dropped.
    pub fn to_bytes(&self) -> Secret32 {
        self.0.clone()
    }

    fn inner(&self) -> Result<<Kem as hpke::Kem>::PrivateKey> {
        <Kem as hpke::Kem>::PrivateKey::from_bytes(self.0.expose())
            .map_err(|_| CryptoError::InvalidKey("not a P-256 HPKE private key"))
    }

    pub fn public_key(&self) -> Result<HpkePublicKey> {
        let pk = Kem::sk_to_pk(&self.inner()?);
        let mut point = [0u8; ENC_LEN];
        pk.write_exact(&mut point);
        Ok(HpkePublicKey(point))
    }
}

/// Whoever holds an HPKE private key: a software key, or (later) a token that does the
/// ECDH step inside. Opening never hands the private key out.
pub trait HpkeRecipient: Send + Sync {
    fn public_key(&self) -> Result<HpkePublicKey>;
    fn open_context(&self, enc: &[u8], info: &[u8]) -> Result<Opener>;
}

impl HpkeRecipient for HpkeSecretKey {
    fn public_key(&self) -> Result<HpkePublicKey> {
        HpkeSecretKey::public_key(self)
    }
    fn open_context(&self, enc: &[u8], info: &[u8]) -> Result<Opener> {
        open_context(self, enc, info)
    }
}

/// The recipient's public key: an uncompressed P-256 point.
#[derive(Clone, PartialEq, Eq)]
pub struct HpkePublicKey([u8; ENC_LEN]);

impl std::fmt::Debug for HpkePublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HpkePublicKey({})", self.fingerprint())
    }
}

impl HpkePublicKey {
    pub fn from_sec1(point: &[u8]) -> Result<Self> {
        <Kem as hpke::Kem>::PublicKey::from_bytes(point)
            .map_err(|_| CryptoError::InvalidKey("not a P-256 point"))?;
        let arr: [u8; ENC_LEN] = point
            .try_into()
            .map_err(|_| CryptoError::InvalidKey("P-256 point length"))?;
        Ok(Self(arr))
    }
    pub fn sec1(&self) -> &[u8] {
        &self.0
    }
    pub fn spki_der(&self) -> Vec<u8> {
        crate::x509::p256_spki(&self.0)
    }
    pub fn fingerprint(&self) -> crate::hash::Fingerprint {
        crate::hash::Fingerprint::of(&self.spki_der())
    }
}

/// The sending half of an HPKE context.
pub struct Sealer(AeadCtxS<AesGcm256, HkdfSha256, Kem>);

/// Sets up a context to `recipient` bound to `info`; returns `enc` and the sealer.
pub fn seal_context(
    recipient: &HpkePublicKey,
    info: &[u8],
    rng: &dyn SecureRng,
) -> Result<(Vec<u8>, Sealer)> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&recipient.0)
        .map_err(|_| CryptoError::InvalidKey("recipient key"))?;
    let (enc, ctx) = hpke::setup_sender_with_rng::<AesGcm256, HkdfSha256, Kem>(
        &OpModeS::Base,
        &pk,
        info,
        &mut RandCoreAdapter(rng),
    )
    .map_err(|_| CryptoError::Internal)?;
    Ok((enc.to_bytes().to_vec(), Sealer(ctx)))
}

impl Sealer {
    /// Seals the next chunk; returns `ciphertext ‖ tag`.
    pub fn seal(&mut self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        self.0
            .seal(plaintext, aad)
            .map_err(|_| CryptoError::Internal)
    }
}

/// The receiving half of an HPKE context.
/// An opening context: the `hpke` crate's for a key held here, or one built by
/// [`open_context_with_dh`] when the recipient's ECDH ran in a token.
pub struct Opener(OpenerKind);

enum OpenerKind {
    Local(Box<AeadCtxR<AesGcm256, HkdfSha256, Kem>>),
    External(crate::hpke_schedule::HostOpener),
}

pub fn open_context(recipient: &HpkeSecretKey, enc: &[u8], info: &[u8]) -> Result<Opener> {
    let enc =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| CryptoError::DecryptFailed)?;
    let ctx = hpke::setup_receiver::<AesGcm256, HkdfSha256, Kem>(
        &OpModeR::Base,
        &recipient.inner()?,
        &enc,
        info,
    )
    .map_err(|_| CryptoError::DecryptFailed)?;
    Ok(Opener(OpenerKind::Local(Box::new(ctx))))
}

/// DHKEM(P-256, HKDF-SHA256) `ExtractAndExpand`: the KEM shared secret from the raw
/// ECDH value `dh` of the recipient's key with `enc` (RFC 9180 §4.1). For checking a
/// token's ECDH against the RFC's vectors.
pub fn dhkem_shared_secret(dh: &[u8], enc: &[u8], recipient: &[u8]) -> Result<SecretBytes> {
    let shared = crate::hpke_schedule::kem_shared_secret(dh, enc, recipient)?;
    Ok(SecretBytes::new(shared.to_vec()))
}

/// The opening context for `enc` when the recipient's private key lives elsewhere (a
/// PKCS#11 token): `dh` is the ECDH of that key with `enc`, computed there; DHKEM's
/// key derivation and the key schedule run here (RFC 9180 §4.1, §5.1).
pub fn open_context_with_dh(
    dh: &[u8],
    enc: &[u8],
    recipient: &HpkePublicKey,
    info: &[u8],
) -> Result<Opener> {
    if enc.len() != ENC_LEN || dh.len() != 32 {
        return Err(CryptoError::DecryptFailed);
    }
    let shared = crate::hpke_schedule::kem_shared_secret(dh, enc, recipient.sec1())?;
    let opener = crate::hpke_schedule::HostOpener::new(
        &shared,
        info,
        crate::hpke_schedule::Aead::Aes256Gcm,
    )?;
    Ok(Opener(OpenerKind::External(opener)))
}

impl Opener {
    /// Opens the next chunk. The plaintext is handed back in a zeroizing buffer.
    pub fn open(&mut self, ciphertext: &[u8], aad: &[u8]) -> Result<SecretBytes> {
        match &mut self.0 {
            OpenerKind::Local(ctx) => ctx
                .open(ciphertext, aad)
                .map(SecretBytes::new)
                .map_err(|_| CryptoError::DecryptFailed),
            OpenerKind::External(ctx) => ctx.open(ciphertext, aad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    #[test]
    fn chunked_round_trip_binds_info_order_and_aad() {
        let rng = SeededRng::new(3);
        let sk = HpkeSecretKey::generate(&rng);
        let pk = sk.public_key().unwrap();
        let (enc, mut s) = seal_context(&pk, b"info", &rng).unwrap();
        let c0 = s.seal(b"zero", b"0").unwrap();
        let c1 = s.seal(b"one", b"1").unwrap();

        let mut o = open_context(&sk, &enc, b"info").unwrap();
        assert_eq!(o.open(&c0, b"0").unwrap().expose(), b"zero");
        assert_eq!(o.open(&c1, b"1").unwrap().expose(), b"one");

        // Out of order: the second chunk cannot be opened first.
        let mut o = open_context(&sk, &enc, b"info").unwrap();
        assert!(o.open(&c1, b"1").is_err());
        // Another info: nothing opens.
        let mut o = open_context(&sk, &enc, b"other").unwrap();
        assert!(o.open(&c0, b"0").is_err());
        // Another recipient: nothing opens.
        let other = HpkeSecretKey::generate(&rng);
        let mut o = open_context(&other, &enc, b"info").unwrap();
        assert!(o.open(&c0, b"0").is_err());
    }
}
