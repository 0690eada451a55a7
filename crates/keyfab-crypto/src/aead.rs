//! AES-256-GCM for data at rest. The caller supplies a nonce that is unique per key (a
//! counter or a position), plus associated data that binds the ciphertext to where it lives.

use crate::secret::{Secret32, SecretBytes};
use crate::{CryptoError, Result};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;

/// An AES-256-GCM key expanded once, for sealing many records with the same key.
pub struct AeadKey(LessSafeKey);

impl AeadKey {
    /// Expands `key` for sealing and opening.
    pub fn new(key: &Secret32) -> Result<Self> {
        let k = UnboundKey::new(&AES_256_GCM, key.expose()).map_err(|_| CryptoError::Internal)?;
        Ok(Self(LessSafeKey::new(k)))
    }

    /// Returns `ciphertext ‖ tag`.
    pub fn seal(&self, nonce: [u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
        buf.extend_from_slice(plaintext);
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| CryptoError::Internal)?;
        Ok(buf)
    }

    /// Opens what [`AeadKey::seal`] sealed with this nonce and `aad`.
    pub fn open(&self, nonce: [u8; NONCE_LEN], aad: &[u8], sealed: &[u8]) -> Result<SecretBytes> {
        open_with(&self.0, nonce, aad, sealed)
    }
}

/// Opens `sealed` (ciphertext ‖ tag) under `key` into a zeroizing buffer: one place for
/// every AES-GCM opening of the crate.
pub(crate) fn open_with(
    key: &LessSafeKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<SecretBytes> {
    let mut buf = SecretBytes::new(sealed.to_vec());
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            buf.expose_mut(),
        )
        .map_err(|_| CryptoError::DecryptFailed)?
        .len();
    buf.expose_mut().truncate(len);
    Ok(buf)
}

/// Seals with a fresh random nonce and returns `nonce ‖ ciphertext ‖ tag`: for rare writes
/// (key wrapping, the keystore) where no counter is at hand.
pub fn seal_random_nonce(
    key: &Secret32,
    rng: &dyn crate::rng::SecureRng,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce);
    let mut out = nonce.to_vec();
    out.extend(AeadKey::new(key)?.seal(nonce, aad, plaintext)?);
    Ok(out)
}

/// Opens what [`seal_random_nonce`] sealed (nonce ‖ ciphertext ‖ tag).
pub fn open_random_nonce(key: &Secret32, aad: &[u8], sealed: &[u8]) -> Result<SecretBytes> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::DecryptFailed);
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(nonce);
    AeadKey::new(key)?.open(n, aad, rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    #[test]
    fn round_trip_and_aad_binding() {
        let rng = SeededRng::new(1);
        let key = Secret32::random(&rng);
        let sealed = seal_random_nonce(&key, &rng, b"slot-1", b"secret").unwrap();
        assert_eq!(
            open_random_nonce(&key, b"slot-1", &sealed)
                .unwrap()
                .expose(),
            b"secret"
        );
        assert!(open_random_nonce(&key, b"slot-2", &sealed).is_err());
        let mut bad = sealed.clone();
        bad[14] ^= 1;
        assert!(open_random_nonce(&key, b"slot-1", &bad).is_err());
    }
}
