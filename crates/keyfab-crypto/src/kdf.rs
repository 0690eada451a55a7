//! Key derivation: Argon2id for passphrases, HKDF-SHA256 for everything else.

use crate::secret::{Secret32, SecretBytes};
use crate::{CryptoError, Result};

/// Argon2id cost parameters, stored beside the salt so they can be raised later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory, in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Parallel lanes.
    pub lanes: u32,
}

impl Argon2Params {
    /// OWASP's first recommended Argon2id setting (46 MiB, 1 pass, 1 lane): about a tenth
    /// of a second here, which every command that unlocks state pays once.
    pub const DEFAULT: Self = Self {
        memory_kib: 47_104,
        iterations: 1,
        lanes: 1,
    };
}

/// The 32-byte key Argon2id derives from `passphrase` and `salt`.
pub fn argon2id(passphrase: &SecretBytes, salt: &[u8], params: Argon2Params) -> Result<Secret32> {
    use argon2::{Algorithm, Argon2, Params, Version};
    let p = Params::new(params.memory_kib, params.iterations, params.lanes, Some(32))
        .map_err(|_| CryptoError::InvalidKey("argon2 parameters"))?;
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
        .hash_password_into(passphrase.expose(), salt, &mut out)
        .map_err(|_| CryptoError::InvalidKey("argon2 input"))?;
    let s = Secret32::new(out);
    zeroize::Zeroize::zeroize(&mut out);
    Ok(s)
}

/// HKDF-SHA256 expanding `ikm` to 32 bytes, bound to `salt` and `info`.
pub fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8]) -> Result<Secret32> {
    let mut out = [0u8; 32];
    hkdf_sha256_into(ikm, salt, info, &mut out)?;
    let s = Secret32::new(out);
    zeroize::Zeroize::zeroize(&mut out);
    Ok(s)
}

/// HKDF-SHA256 expanding `ikm` to fill `out` (at most 8160 bytes), bound to `salt` and
/// `info`.
pub fn hkdf_sha256_into(ikm: &[u8], salt: &[u8], info: &[u8], out: &mut [u8]) -> Result<()> {
    use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
    struct Len(usize);
    impl aws_lc_rs::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = Salt::new(HKDF_SHA256, salt).extract(ikm);
    let info_parts = [info];
    let okm = prk
        .expand(&info_parts, Len(out.len()))
        .map_err(|_| CryptoError::Internal)?;
    okm.fill(out).map_err(|_| CryptoError::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_rfc5869_case_1() {
        let ikm = [0x0b; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let okm = hkdf_sha256(&ikm, &salt, &info).unwrap();
        assert_eq!(
            hex::encode(okm.expose()),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
    }

    #[test]
    fn argon2id_depends_on_passphrase_and_salt() {
        let p = Argon2Params {
            memory_kib: 64,
            iterations: 1,
            lanes: 1,
        };
        let a = argon2id(&SecretBytes::new(b"pw".to_vec()), b"saltsalt", p).unwrap();
        let b = argon2id(&SecretBytes::new(b"pw".to_vec()), b"saltsalt", p).unwrap();
        let c = argon2id(&SecretBytes::new(b"pW".to_vec()), b"saltsalt", p).unwrap();
        let d = argon2id(&SecretBytes::new(b"pw".to_vec()), b"saltsalT", p).unwrap();
        assert_eq!(a.expose(), b.expose());
        assert_ne!(a.expose(), c.expose());
        assert_ne!(a.expose(), d.expose());
    }
}
