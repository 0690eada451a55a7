//! HPKE (RFC 9180), base mode, suite DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM.
//!
//! keyfab uses one HPKE context per file and seals the file as a sequence of chunks with
//! that context (RFC 9180 §5.2: each `Seal` advances the sequence number, so chunks cannot be
//! reordered or dropped without detection when the last chunk is marked in its `aad`).
//! The P-256 suite is chosen so that site keys can later live in a PKCS#11 token.

use crate::hpke_schedule::{kem_shared_secret, Aead, HostOpener, HostSealer};
use crate::rng::SecureRng;
use crate::secret::{Secret32, SecretBytes};
use crate::{CryptoError, Result};
use aws_lc_rs::agreement::{agree, ParsedPublicKey, PrivateKey, UnparsedPublicKey, ECDH_P256};
use zeroize::Zeroizing;

/// Length of the encapsulated key (`enc`): an uncompressed P-256 point.
pub const ENC_LEN: usize = 65;
/// Length of the AEAD tag each sealed chunk carries.
pub const TAG_LEN: usize = 16;

/// A P-256 private key from 32 bytes of `rng`, drawn again in the (2^-32) case where
/// they are not a scalar below the group order.
fn random_scalar(rng: &dyn SecureRng) -> (Secret32, PrivateKey) {
    loop {
        let bytes = Secret32::random(rng);
        if let Ok(key) = PrivateKey::from_private_key(&ECDH_P256, bytes.expose()) {
            return (bytes, key);
        }
    }
}

/// The raw ECDH value of `sk` with the uncompressed point `peer` (checked on the curve).
fn ecdh(sk: &PrivateKey, peer: &[u8], refused: CryptoError) -> Result<Zeroizing<Vec<u8>>> {
    if peer.len() != ENC_LEN || peer[0] != 0x04 {
        return Err(refused);
    }
    agree(
        sk,
        UnparsedPublicKey::new(&ECDH_P256, peer),
        refused,
        |dh| Ok(Zeroizing::new(dh.to_vec())),
    )
}

/// The recipient's private key: a P-256 scalar.
pub struct HpkeSecretKey(Secret32);

impl HpkeSecretKey {
    /// A new key pair from the injected generator.
    pub fn generate(rng: &dyn SecureRng) -> Self {
        Self(random_scalar(rng).0)
    }

    /// The key of a stored scalar (32 bytes, big-endian, below the group order).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        PrivateKey::from_private_key(&ECDH_P256, bytes)
            .map_err(|_| CryptoError::InvalidKey("not a P-256 HPKE private key"))?;
        Secret32::from_slice(bytes)
            .map(Self)
            .ok_or(CryptoError::InvalidKey("HPKE private key length"))
    }

    /// The scalar, for sealing into custody. Zeroized when dropped.
    pub fn to_bytes(&self) -> Secret32 {
        self.0.clone()
    }

    fn inner(&self) -> Result<PrivateKey> {
        PrivateKey::from_private_key(&ECDH_P256, self.0.expose())
            .map_err(|_| CryptoError::InvalidKey("not a P-256 HPKE private key"))
    }

    /// The public key (the recipient's `pkR`).
    pub fn public_key(&self) -> Result<HpkePublicKey> {
        let pk = self
            .inner()?
            .compute_public_key()
            .map_err(|_| CryptoError::Internal)?;
        HpkePublicKey::from_sec1(pk.as_ref())
    }
}

/// Whoever holds an HPKE private key: a software key, or a token that does the ECDH step
/// inside. Opening never hands the private key out.
pub trait HpkeRecipient: Send + Sync {
    /// The recipient's public key.
    fn public_key(&self) -> Result<HpkePublicKey>;
    /// The opening context for `enc`, bound to `info`.
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
    /// The key of an uncompressed P-256 point, checked to be on the curve.
    pub fn from_sec1(point: &[u8]) -> Result<Self> {
        let refused = || CryptoError::InvalidKey("not a P-256 point");
        let arr: [u8; ENC_LEN] = point.try_into().map_err(|_| refused())?;
        if arr[0] != 0x04 {
            return Err(refused());
        }
        ParsedPublicKey::try_from(UnparsedPublicKey::new(&ECDH_P256, &arr[..]))
            .map_err(|_| refused())?;
        Ok(Self(arr))
    }
    /// The point, uncompressed.
    pub fn sec1(&self) -> &[u8] {
        &self.0
    }
    /// The key as a SubjectPublicKeyInfo (DER).
    pub fn spki_der(&self) -> Vec<u8> {
        crate::x509::p256_spki(&self.0)
    }
    /// The SHA-256 of the SubjectPublicKeyInfo: how files name their recipient.
    pub fn fingerprint(&self) -> crate::hash::Fingerprint {
        crate::hash::Fingerprint::of(&self.spki_der())
    }
}

/// The sending half of an HPKE context (RFC 9180 `ContextS`).
pub struct Sealer(HostSealer);

/// Sets up a context to `recipient` bound to `info` (RFC 9180 `SetupBaseS`): returns
/// `enc` and the sealer.
pub fn seal_context(
    recipient: &HpkePublicKey,
    info: &[u8],
    rng: &dyn SecureRng,
) -> Result<(Vec<u8>, Sealer)> {
    let (_, ephemeral) = random_scalar(rng);
    let (enc, sealer) = seal_context_from(&ephemeral, recipient, info, Aead::Aes256Gcm)?;
    Ok((enc, Sealer(sealer)))
}

/// `SetupBaseS` with the ephemeral key given: DHKEM `Encap` (RFC 9180 §4.1), then the key
/// schedule.
fn seal_context_from(
    ephemeral: &PrivateKey,
    recipient: &HpkePublicKey,
    info: &[u8],
    aead: Aead,
) -> Result<(Vec<u8>, HostSealer)> {
    let enc = ephemeral
        .compute_public_key()
        .map_err(|_| CryptoError::Internal)?
        .as_ref()
        .to_vec();
    let dh = ecdh(
        ephemeral,
        recipient.sec1(),
        CryptoError::InvalidKey("recipient key"),
    )?;
    let shared = kem_shared_secret(&dh, &enc, recipient.sec1())?;
    Ok((enc, HostSealer::new(&shared, info, aead)?))
}

impl Sealer {
    /// Seals the next chunk; returns `ciphertext ‖ tag`.
    pub fn seal(&mut self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        self.0.seal(plaintext, aad)
    }
}

/// The receiving half of an HPKE context (RFC 9180 `ContextR`), whether the recipient's
/// ECDH ran here or in a token.
pub struct Opener(HostOpener);

/// The opening context for `enc` with a key held here (RFC 9180 `SetupBaseR`).
pub fn open_context(recipient: &HpkeSecretKey, enc: &[u8], info: &[u8]) -> Result<Opener> {
    let dh = ecdh(&recipient.inner()?, enc, CryptoError::DecryptFailed)?;
    open_context_with_dh(&dh, enc, &recipient.public_key()?, info)
}

/// DHKEM(P-256, HKDF-SHA256) `ExtractAndExpand`: the KEM shared secret from the raw
/// ECDH value `dh` of the recipient's key with `enc` (RFC 9180 §4.1). For checking a
/// token's ECDH against the RFC's vectors.
pub fn dhkem_shared_secret(dh: &[u8], enc: &[u8], recipient: &[u8]) -> Result<SecretBytes> {
    let shared = kem_shared_secret(dh, enc, recipient)?;
    Ok(SecretBytes::new(shared.to_vec()))
}

/// The opening context for `enc` when `dh`, the ECDH of the recipient's key with `enc`,
/// was computed elsewhere (a PKCS#11 token) or above; DHKEM's key derivation and the key
/// schedule run here (RFC 9180 §4.1, §5.1).
pub fn open_context_with_dh(
    dh: &[u8],
    enc: &[u8],
    recipient: &HpkePublicKey,
    info: &[u8],
) -> Result<Opener> {
    if enc.len() != ENC_LEN || dh.len() != 32 {
        return Err(CryptoError::DecryptFailed);
    }
    let shared = kem_shared_secret(dh, enc, recipient.sec1())?;
    Ok(Opener(HostOpener::new(&shared, info, Aead::Aes256Gcm)?))
}

impl Opener {
    /// Opens the next chunk. The plaintext is handed back in a zeroizing buffer.
    pub fn open(&mut self, ciphertext: &[u8], aad: &[u8]) -> Result<SecretBytes> {
        self.0.open(ciphertext, aad)
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

    /// RFC 9180 A.3.1 from the sender's side: with the RFC's ephemeral key, `Encap` gives
    /// the RFC's `enc` and the first message seals to the RFC's ciphertext.
    #[test]
    fn rfc9180_a3_sender() {
        let h = |s: &str| hex::decode(s).unwrap();
        let sk_em = h("4995788ef4b9d6132b249ce59a77281493eb39af373d236a1fe415cb0c2d7beb");
        let pk_rm = h("04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0");
        let info = h("4f6465206f6e2061204772656369616e2055726e");
        let ephemeral = PrivateKey::from_private_key(&ECDH_P256, &sk_em).unwrap();
        let recipient = HpkePublicKey::from_sec1(&pk_rm).unwrap();
        let (enc, mut sealer) =
            seal_context_from(&ephemeral, &recipient, &info, Aead::Aes128Gcm).unwrap();
        assert_eq!(hex::encode(&enc), "04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4");
        let ct = sealer
            .seal(
                &h("4265617574792069732074727574682c20747275746820626561757479"),
                &h("436f756e742d30"),
            )
            .unwrap();
        assert_eq!(hex::encode(ct), "5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434");
    }

    /// The ciphertext is sealed in the buffer the plaintext was copied into, never one
    /// that grew: growing leaves a copy of the plaintext in freed memory (the canary test
    /// of the e2e suite found one there). A buffer that grew has room to spare.
    #[test]
    fn sealing_never_leaves_a_copy_of_the_plaintext_behind() {
        let rng = SeededRng::new(5);
        let pk = HpkeSecretKey::generate(&rng).public_key().unwrap();
        let (_, mut sealer) = seal_context(&pk, b"info", &rng).unwrap();
        for len in [0, 1, 100, 4096] {
            let ct = sealer.seal(&vec![7u8; len], b"").unwrap();
            assert_eq!(ct.len(), len + TAG_LEN);
            assert_eq!(ct.capacity(), ct.len(), "the buffer grew while sealing");
        }
    }

    #[test]
    fn points_off_the_curve_or_not_uncompressed_are_refused() {
        let sk = HpkeSecretKey::generate(&SeededRng::new(1));
        let pk = sk.public_key().unwrap();
        let mut off = pk.sec1().to_vec();
        off[64] ^= 1;
        assert!(HpkePublicKey::from_sec1(&off).is_err());
        let mut hybrid = pk.sec1().to_vec();
        hybrid[0] = 0x06;
        assert!(HpkePublicKey::from_sec1(&hybrid).is_err());
        assert!(HpkePublicKey::from_sec1(&pk.sec1()[..33]).is_err());
        assert!(open_context(&sk, &off, b"info").is_err());
    }
}
