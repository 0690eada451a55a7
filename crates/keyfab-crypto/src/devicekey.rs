//! Device key material: the keys a device receives. Every supported type is stored as a
//! 32-byte secret (P-256 scalar, Ed25519 seed, AES-256 key), so pool files and the store
//! use fixed-size records.
//!
//! Each key also has a [`KeyId`] that is safe to print and to audit: the SHA-256
//! fingerprint of the public key for asymmetric keys, a key check value for AES.

use crate::hash::Fingerprint;
use crate::secret::{Secret32, SecretBytes};
use crate::{CryptoError, Result};
use aws_lc_rs::encoding::{AsBigEndian, Curve25519SeedBin, EcPrivateKeyBin};
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

/// Size of every stored device key secret.
pub const SECRET_LEN: usize = 32;

/// The type of a device key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKeyType {
    /// ECDSA on P-256.
    EcP256,
    /// Ed25519.
    Ed25519,
    /// A 256-bit AES key.
    Aes256,
}

impl DeviceKeyType {
    /// The name policies and records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::Ed25519 => "ed25519",
            Self::Aes256 => "aes-256",
        }
    }
    /// The type named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ec-p256" => Some(Self::EcP256),
            "ed25519" => Some(Self::Ed25519),
            "aes-256" => Some(Self::Aes256),
            _ => None,
        }
    }
}

/// The public identity of a device key: what the audit log and HQ keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyId {
    /// SHA-256 of the SubjectPublicKeyInfo.
    Public(Fingerprint),
    /// Key check value: the first 3 bytes of AES-256-ECB(key, 0¹²⁸).
    Kcv([u8; 3]),
}

impl KeyId {
    /// `spki-sha256:<hex>` or `kcv:<hex>`, as records carry it.
    pub fn to_text(&self) -> String {
        // Written in one allocation: the committer does this for every key it releases.
        match self {
            Self::Public(f) => crate::hash::prefixed_hex("spki-sha256:", &f.0),
            Self::Kcv(k) => crate::hash::prefixed_hex("kcv:", k),
        }
    }
}

const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A new P-256 key pair and its 32-byte private scalar (what a pool keeps).
fn generate_p256() -> Result<(EcdsaKeyPair, Secret32)> {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
        .map_err(|_| CryptoError::Internal)?;
    let bin: EcPrivateKeyBin = pair
        .private_key()
        .as_be_bytes()
        .map_err(|_| CryptoError::Internal)?;
    let secret = Secret32::from_slice(bin.as_ref()).ok_or(CryptoError::Internal)?;
    Ok((pair, secret))
}

/// Generates one device key: the secret and its public identity.
pub fn generate(kind: DeviceKeyType, rng: &dyn crate::rng::SecureRng) -> Result<(Secret32, KeyId)> {
    match kind {
        // The pool path: no PKCS#8 needed, so skip building it.
        DeviceKeyType::EcP256 => {
            let (pair, secret) = generate_p256()?;
            let id = KeyId::Public(Fingerprint::of(&crate::x509::p256_spki(
                pair.public_key().as_ref(),
            )));
            Ok((secret, id))
        }
        _ => {
            let (secret, e) = generate_expanded(kind, rng)?;
            Ok((secret, e.key_id))
        }
    }
}

/// Everything a device key is needed for, computed from one key object: its identity,
/// its public key (for a certificate), and its private form for the device (PKCS#8, or
/// the raw 32 bytes for AES).
pub struct Expanded {
    /// What the audit log and HQ keep of the key.
    pub key_id: KeyId,
    /// The public key, for a device certificate (asymmetric keys only).
    pub public: Option<crate::x509::DevicePublicKey>,
    /// The private form the device receives.
    pub private: SecretBytes,
}

/// Generates one device key and expands it.
pub fn generate_expanded(
    kind: DeviceKeyType,
    rng: &dyn crate::rng::SecureRng,
) -> Result<(Secret32, Expanded)> {
    match kind {
        DeviceKeyType::EcP256 => {
            let (pair, secret) = generate_p256()?;
            Ok((secret, expand_p256(&pair)?))
        }
        DeviceKeyType::Ed25519 => {
            let pair = Ed25519KeyPair::generate().map_err(|_| CryptoError::Internal)?;
            let seed: Curve25519SeedBin = pair
                .seed()
                .and_then(|s| s.as_be_bytes())
                .map_err(|_| CryptoError::Internal)?;
            let secret = Secret32::from_slice(seed.as_ref()).ok_or(CryptoError::Internal)?;
            Ok((secret, expand_ed25519(&pair)?))
        }
        DeviceKeyType::Aes256 => {
            let secret = Secret32::random(rng);
            let e = expand(kind, &secret)?;
            Ok((secret, e))
        }
    }
}

fn expand_p256(pair: &EcdsaKeyPair) -> Result<Expanded> {
    let point = pair.public_key().as_ref().to_vec();
    let scalar: EcPrivateKeyBin = pair
        .private_key()
        .as_be_bytes()
        .map_err(|_| CryptoError::Internal)?;
    Ok(Expanded {
        key_id: KeyId::Public(Fingerprint::of(&crate::x509::p256_spki(&point))),
        private: p256_pkcs8(scalar.as_ref(), &point)?,
        public: Some(crate::x509::DevicePublicKey::P256(point)),
    })
}

/// PKCS#8 v1 of a P-256 key, always with its public key (RFC 5915 `publicKey`), so a key
/// reads the same whether it was just generated or rebuilt from its stored scalar (aws-lc
/// leaves the public key out of a key it parsed without one).
fn p256_pkcs8(scalar: &[u8], point: &[u8]) -> Result<SecretBytes> {
    if scalar.len() != 32 || point.len() != 65 {
        return Err(CryptoError::Internal);
    }
    let mut der = Vec::with_capacity(138);
    // SEQUENCE { INTEGER 0, SEQUENCE { id-ecPublicKey, prime256v1 }, OCTET STRING {
    //   ECPrivateKey SEQUENCE { INTEGER 1, OCTET STRING scalar, [1] BIT STRING point } } }
    der.extend_from_slice(&[
        0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
        0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30,
        0x6b, 0x02, 0x01, 0x01, 0x04, 0x20,
    ]);
    der.extend_from_slice(scalar);
    der.extend_from_slice(&[0xa1, 0x44, 0x03, 0x42, 0x00]);
    der.extend_from_slice(point);
    Ok(SecretBytes::new(der))
}

fn expand_ed25519(pair: &Ed25519KeyPair) -> Result<Expanded> {
    let public = pair.public_key().as_ref().to_vec();
    let doc = pair.to_pkcs8v1().map_err(|_| CryptoError::Internal)?;
    Ok(Expanded {
        key_id: ed25519_id(&public),
        public: Some(crate::x509::DevicePublicKey::Ed25519(public)),
        private: SecretBytes::new(doc.as_ref().to_vec()),
    })
}

/// Expands a stored secret (one scalar multiplication for P-256, whatever is asked of it).
pub fn expand(kind: DeviceKeyType, secret: &Secret32) -> Result<Expanded> {
    match kind {
        DeviceKeyType::EcP256 => expand_p256(&p256_pair(secret)?),
        DeviceKeyType::Ed25519 => expand_ed25519(
            &Ed25519KeyPair::from_seed_unchecked(secret.expose())
                .map_err(|_| CryptoError::InvalidKey("ed25519 seed"))?,
        ),
        DeviceKeyType::Aes256 => Ok(Expanded {
            key_id: key_id(kind, secret)?,
            public: None,
            private: SecretBytes::new(secret.expose().to_vec()),
        }),
    }
}

fn ed25519_id(public: &[u8]) -> KeyId {
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(public);
    KeyId::Public(Fingerprint::of(&spki))
}

/// Recomputes the public identity of a stored secret.
pub fn key_id(kind: DeviceKeyType, secret: &Secret32) -> Result<KeyId> {
    match kind {
        DeviceKeyType::EcP256 => {
            let pair = p256_pair(secret)?;
            Ok(KeyId::Public(Fingerprint::of(&crate::x509::p256_spki(
                pair.public_key().as_ref(),
            ))))
        }
        DeviceKeyType::Ed25519 => {
            let pair = Ed25519KeyPair::from_seed_unchecked(secret.expose())
                .map_err(|_| CryptoError::InvalidKey("ed25519 seed"))?;
            Ok(ed25519_id(pair.public_key().as_ref()))
        }
        DeviceKeyType::Aes256 => {
            use aws_lc_rs::cipher::{EncryptingKey, UnboundCipherKey, AES_256};
            let key = UnboundCipherKey::new(&AES_256, secret.expose())
                .map_err(|_| CryptoError::Internal)?;
            let enc = EncryptingKey::ecb(key).map_err(|_| CryptoError::Internal)?;
            let mut block = [0u8; 16];
            enc.encrypt(&mut block).map_err(|_| CryptoError::Internal)?;
            Ok(KeyId::Kcv([block[0], block[1], block[2]]))
        }
    }
}

fn p256_pair(secret: &Secret32) -> Result<EcdsaKeyPair> {
    // RFC 5915 ECPrivateKey { version 1, privateKey, parameters prime256v1 }, no public key:
    // aws-lc recomputes the point.
    let mut der = Vec::with_capacity(51);
    der.extend_from_slice(&[0x30, 0x31, 0x02, 0x01, 0x01, 0x04, 0x20]);
    der.extend_from_slice(secret.expose());
    der.extend_from_slice(&[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ]);
    let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, &der)
        .map_err(|_| CryptoError::InvalidKey("P-256 scalar"));
    zeroize::Zeroize::zeroize(&mut der);
    pair
}

/// The public key of a stored asymmetric secret, for its certificate.
pub fn public_key(kind: DeviceKeyType, secret: &Secret32) -> Result<crate::x509::DevicePublicKey> {
    match kind {
        DeviceKeyType::EcP256 => Ok(crate::x509::DevicePublicKey::P256(
            p256_pair(secret)?.public_key().as_ref().to_vec(),
        )),
        DeviceKeyType::Ed25519 => {
            let pair = Ed25519KeyPair::from_seed_unchecked(secret.expose())
                .map_err(|_| CryptoError::InvalidKey("ed25519 seed"))?;
            Ok(crate::x509::DevicePublicKey::Ed25519(
                pair.public_key().as_ref().to_vec(),
            ))
        }
        DeviceKeyType::Aes256 => Err(CryptoError::InvalidKey("aes-256 has no public key")),
    }
}

/// The identity of a device's own public key (from its CSR).
pub fn public_key_id(key: &crate::x509::DevicePublicKey) -> KeyId {
    KeyId::Public(Fingerprint::of(&key.spki_der()))
}

/// A `derived` key: HKDF-SHA256 of the entitlement's master secret, salted with the
/// entitlement id and bound to the key name and device id.
pub fn derive(
    master: &Secret32,
    entitlement: &str,
    key_name: &str,
    device_id: &str,
) -> Result<Secret32> {
    let info = format!("keyfab-derived-v1\0{key_name}\0{device_id}");
    crate::kdf::hkdf_sha256(master.expose(), entitlement.as_bytes(), info.as_bytes())
}

/// The private key as PKCS#8 DER, as a device or programmer expects it. AES keys are
/// returned raw.
pub fn to_pkcs8(kind: DeviceKeyType, secret: &Secret32) -> Result<SecretBytes> {
    match kind {
        DeviceKeyType::EcP256 => {
            let pair = p256_pair(secret)?;
            p256_pkcs8(secret.expose(), pair.public_key().as_ref())
        }
        DeviceKeyType::Ed25519 => {
            let doc = Ed25519KeyPair::from_seed_unchecked(secret.expose())
                .map_err(|_| CryptoError::InvalidKey("ed25519 seed"))?
                .to_pkcs8v1()
                .map_err(|_| CryptoError::Internal)?;
            Ok(SecretBytes::new(doc.as_ref().to_vec()))
        }
        DeviceKeyType::Aes256 => Ok(SecretBytes::new(secret.expose().to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    #[test]
    fn stored_secret_reproduces_its_identity() {
        let rng = SeededRng::new(9);
        for kind in [
            DeviceKeyType::EcP256,
            DeviceKeyType::Ed25519,
            DeviceKeyType::Aes256,
        ] {
            let (secret, id) = generate(kind, &rng).unwrap();
            assert_eq!(key_id(kind, &secret).unwrap(), id, "{kind:?}");
            assert!(!to_pkcs8(kind, &secret).unwrap().is_empty());
        }
    }

    /// A retried request gets the key rebuilt from its stored secret: it must be the very
    /// bytes the first answer carried.
    #[test]
    fn a_rebuilt_key_encodes_as_the_generated_one() {
        let rng = SeededRng::new(3);
        for kind in [DeviceKeyType::EcP256, DeviceKeyType::Ed25519] {
            let (secret, first) = generate_expanded(kind, &rng).unwrap();
            let again = to_pkcs8(kind, &secret).unwrap();
            assert_eq!(again.expose(), first.private.expose(), "{kind:?}");
            assert_eq!(
                expand(kind, &secret).unwrap().private.expose(),
                first.private.expose()
            );
        }
        // And the hand-built P-256 document is one aws-lc reads back as the same key.
        let (secret, first) = generate_expanded(DeviceKeyType::EcP256, &rng).unwrap();
        let parsed =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, first.private.expose())
                .unwrap();
        assert_eq!(
            parsed.private_key().as_be_bytes().unwrap().as_ref(),
            secret.expose()
        );
    }

    #[test]
    fn aes_kcv_known_answer() {
        // AES-256 with the all-zero key encrypts the zero block to dc95c078a240....
        let id = key_id(DeviceKeyType::Aes256, &Secret32::new([0u8; 32])).unwrap();
        assert_eq!(id, KeyId::Kcv([0xdc, 0x95, 0xc0]));
    }
}
