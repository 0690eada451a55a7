//! Device key material: the keys a device receives. Every type but RSA is stored as a
//! 32-byte secret (P-256 scalar, Ed25519 seed, AES-256 key, and for P-384 a seed the
//! scalar is derived from), so pool files and the store use fixed-size records. An RSA
//! key is stored as its PKCS#8: it is only ever made at the site, for one device.
//!
//! Each key also has a [`KeyId`] that is safe to print and to audit: the SHA-256
//! fingerprint of the public key for asymmetric keys, a key check value for AES.

use crate::hash::Fingerprint;
use crate::secret::{Secret32, SecretBytes};
use crate::{CryptoError, Result};
use aws_lc_rs::encoding::{AsBigEndian, Curve25519SeedBin, EcPrivateKeyBin};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING,
};

/// Size of every stored device key secret.
pub const SECRET_LEN: usize = 32;

/// The type of a device key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKeyType {
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384 (pooled as a 32-byte seed; a site key is stored as its PKCS#8).
    EcP384,
    /// Ed25519.
    Ed25519,
    /// RSA, 2048-bit modulus (stored as its PKCS#8).
    Rsa2048,
    /// RSA, 3072-bit modulus (stored as its PKCS#8).
    Rsa3072,
    /// A 256-bit AES key.
    Aes256,
}

impl DeviceKeyType {
    /// Every type.
    pub const ALL: [DeviceKeyType; 6] = [
        Self::EcP256,
        Self::EcP384,
        Self::Ed25519,
        Self::Rsa2048,
        Self::Rsa3072,
        Self::Aes256,
    ];

    /// The name policies and records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Ed25519 => "ed25519",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Aes256 => "aes-256",
        }
    }
    /// The type named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
    /// Whether its stored secret is the RSA key's PKCS#8 rather than 32 bytes.
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa2048 | Self::Rsa3072)
    }
    fn rsa_size(self) -> Option<aws_lc_rs::rsa::KeySize> {
        match self {
            Self::Rsa2048 => Some(aws_lc_rs::rsa::KeySize::Rsa2048),
            Self::Rsa3072 => Some(aws_lc_rs::rsa::KeySize::Rsa3072),
            _ => None,
        }
    }
}

/// What a 32-byte secret cannot hold: an RSA key.
fn not_32_bytes(kind: DeviceKeyType) -> CryptoError {
    CryptoError::InvalidKey(if kind.is_rsa() {
        "an RSA key is stored as its PKCS#8, not as 32 bytes"
    } else {
        "key type"
    })
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

use crate::x509::ED25519_SPKI_PREFIX;

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
        DeviceKeyType::EcP384 => {
            let seed = Secret32::random(rng);
            let id = key_id(kind, &seed)?;
            Ok((seed, id))
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
        DeviceKeyType::Aes256 | DeviceKeyType::EcP384 => {
            let secret = Secret32::random(rng);
            let e = expand(kind, &secret)?;
            Ok((secret, e))
        }
        DeviceKeyType::Rsa2048 | DeviceKeyType::Rsa3072 => Err(not_32_bytes(kind)),
    }
}

/// Generates a key the site makes for one device: what it stores (sealed) so a retry
/// gets the same key, and its expansion. 32 bytes for the types a pool holds; the PKCS#8
/// for RSA and P-384 (a P-384 key made directly by aws-lc costs one scalar
/// multiplication; one derived from a seed costs an import with its key checks too,
/// twice as much: that is for HQ's pool, where records have a fixed size).
pub fn generate_for_site(
    kind: DeviceKeyType,
    rng: &dyn crate::rng::SecureRng,
) -> Result<(SecretBytes, Expanded)> {
    match kind {
        DeviceKeyType::Rsa2048 | DeviceKeyType::Rsa3072 => generate_rsa(kind),
        DeviceKeyType::EcP384 => {
            let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING)
                .map_err(|_| CryptoError::Internal)?;
            let e = expand_p384_pair(&pair)?;
            Ok((SecretBytes::new(e.private.expose().to_vec()), e))
        }
        _ => {
            let (secret, e) = generate_expanded(kind, rng)?;
            Ok((SecretBytes::new(secret.expose().to_vec()), e))
        }
    }
}

/// Generates an RSA key of `kind`: its PKCS#8 (what is stored) and its expansion.
pub fn generate_rsa(kind: DeviceKeyType) -> Result<(SecretBytes, Expanded)> {
    let size = kind
        .rsa_size()
        .ok_or(CryptoError::InvalidKey("not an RSA key type"))?;
    let pair = aws_lc_rs::rsa::KeyPair::generate(size).map_err(|_| CryptoError::Internal)?;
    let e = expand_rsa(&pair)?;
    Ok((SecretBytes::new(e.private.expose().to_vec()), e))
}

fn expand_rsa(pair: &aws_lc_rs::rsa::KeyPair) -> Result<Expanded> {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
    let pkcs8: Pkcs8V1Der<'_> = pair.as_der().map_err(|_| CryptoError::Internal)?;
    let spki: PublicKeyX509Der<'_> = pair
        .public_key()
        .as_der()
        .map_err(|_| CryptoError::Internal)?;
    let spki = spki.as_ref().to_vec();
    Ok(Expanded {
        key_id: KeyId::Public(Fingerprint::of(&spki)),
        public: Some(crate::x509::DevicePublicKey::Rsa(spki)),
        private: SecretBytes::new(pkcs8.as_ref().to_vec()),
    })
}

/// Expands a stored secret of any type: the 32 bytes of [`expand`], or the PKCS#8 of
/// an RSA key (checked to be of `kind`'s size) or of a P-384 key the site made.
pub fn expand_stored(kind: DeviceKeyType, stored: &[u8]) -> Result<Expanded> {
    if let Some(secret) = Secret32::from_slice(stored).filter(|_| !kind.is_rsa()) {
        return expand(kind, &secret);
    }
    if kind == DeviceKeyType::EcP384 {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, stored)
            .map_err(|_| CryptoError::InvalidKey("P-384 PKCS#8"))?;
        return expand_p384_pair(&pair);
    }
    if !kind.is_rsa() {
        return Err(CryptoError::InvalidKey("stored key"));
    }
    let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(stored)
        .map_err(|_| CryptoError::InvalidKey("RSA PKCS#8"))?;
    let bits = pair.public_modulus_len() * 8;
    if Some(bits) != kind.rsa_size().map(|s| s.len() * 8) {
        return Err(CryptoError::InvalidKey("RSA key of another size"));
    }
    expand_rsa(&pair)
}

fn expand_p256(pair: &EcdsaKeyPair) -> Result<Expanded> {
    expand_ec(Curve::P256, pair)
}

/// Everything of an EC key pair on `curve`: its identity, its PKCS#8 (with the public
/// key), its public key for a certificate.
fn expand_ec(curve: Curve, pair: &EcdsaKeyPair) -> Result<Expanded> {
    let point = pair.public_key().as_ref().to_vec();
    let scalar: EcPrivateKeyBin = pair
        .private_key()
        .as_be_bytes()
        .map_err(|_| CryptoError::Internal)?;
    let (spki, public) = match curve {
        Curve::P256 => (
            crate::x509::p256_spki(&point),
            crate::x509::DevicePublicKey::P256(point.clone()),
        ),
        Curve::P384 => (
            crate::x509::p384_spki(&point),
            crate::x509::DevicePublicKey::P384(point.clone()),
        ),
    };
    Ok(Expanded {
        key_id: KeyId::Public(Fingerprint::of(&spki)),
        private: ec_pkcs8(curve, scalar.as_ref(), &point)?,
        public: Some(public),
    })
}

/// An elliptic curve a device key may be on.
#[derive(Clone, Copy)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    /// The named curve's OID, DER (prime256v1, secp384r1).
    fn oid(self) -> &'static [u8] {
        match self {
            Self::P256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            Self::P384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
        }
    }
    /// Scalar and uncompressed point lengths.
    fn lengths(self) -> (usize, usize) {
        match self {
            Self::P256 => (32, 65),
            Self::P384 => (48, 97),
        }
    }
}

/// id-ecPublicKey (1.2.840.10045.2.1), DER.
const ID_EC_PUBLIC_KEY: [u8; 9] = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// PKCS#8 v1 of an EC key, always with its public key (RFC 5915 `publicKey`), so a key
/// reads the same whether it was just generated or rebuilt from its stored scalar (aws-lc
/// leaves the public key out of a key it parsed without one). Written in place into a
/// buffer of the exact size, so no copy of the scalar is left behind.
fn ec_pkcs8(curve: Curve, scalar: &[u8], point: &[u8]) -> Result<SecretBytes> {
    use crate::x509::{push_tlv, push_wrapped};
    if (scalar.len(), point.len()) != curve.lengths() {
        return Err(CryptoError::Internal);
    }
    // SEQUENCE { INTEGER 0, SEQUENCE { id-ecPublicKey, curve }, OCTET STRING {
    //   ECPrivateKey SEQUENCE { INTEGER 1, OCTET STRING scalar, [1] BIT STRING point } } }
    let mut der = SecretBytes::new(Vec::with_capacity(200));
    push_wrapped(der.expose_mut(), 0x30, |outer| {
        outer.extend_from_slice(&[0x02, 0x01, 0x00]);
        push_wrapped(outer, 0x30, |alg| {
            alg.extend_from_slice(&ID_EC_PUBLIC_KEY);
            alg.extend_from_slice(curve.oid());
        });
        push_wrapped(outer, 0x04, |octets| {
            push_wrapped(octets, 0x30, |ec| {
                ec.extend_from_slice(&[0x02, 0x01, 0x01]);
                push_tlv(ec, 0x04, scalar);
                push_wrapped(ec, 0xa1, |public| {
                    push_wrapped(public, 0x03, |bits| {
                        bits.push(0);
                        bits.extend_from_slice(point);
                    });
                });
            });
        });
    });
    Ok(der)
}

/// The group order of P-384 (FIPS 186-5), big-endian.
const P384_ORDER: [u8; 48] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xc7, 0x63, 0x4d, 0x81, 0xf4, 0x37, 0x2d, 0xdf,
    0x58, 0x1a, 0x0d, 0xb2, 0x48, 0xb0, 0xa7, 0x7a, 0xec, 0xec, 0x19, 0x6a, 0xcc, 0xc5, 0x29, 0x73,
];

/// The P-384 key a 32-byte seed stands for: the first HKDF-SHA256 output (48 bytes,
/// info `keyfab-p384-scalar-v1 ‖ counter`) in [1, n−1], FIPS 186-5 A.4.2's "testing
/// candidates" with HKDF as the bit source. A candidate is refused with probability
/// about 2^-190, so the first one is the key in practice. 256 bits of seed exceed
/// P-384's 192-bit security level.
fn p384_pair(seed: &Secret32) -> Result<EcdsaKeyPair> {
    let mut candidate = SecretBytes::new(vec![0u8; 48]);
    for counter in 0u8..=255 {
        let info = [b"keyfab-p384-scalar-v1".as_slice(), &[counter]].concat();
        crate::kdf::hkdf_sha256_into(seed.expose(), b"", &info, candidate.expose_mut())?;
        let scalar = candidate.expose();
        if scalar.iter().all(|b| *b == 0) || scalar >= P384_ORDER.as_slice() {
            continue;
        }
        // RFC 5915 ECPrivateKey { version 1, privateKey, parameters secp384r1 }.
        let mut der = SecretBytes::new(Vec::with_capacity(64));
        crate::x509::push_wrapped(der.expose_mut(), 0x30, |ec| {
            ec.extend_from_slice(&[0x02, 0x01, 0x01]);
            crate::x509::push_tlv(ec, 0x04, scalar);
            crate::x509::push_wrapped(ec, 0xa0, |p| p.extend_from_slice(Curve::P384.oid()));
        });
        let pair =
            EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_ASN1_SIGNING, der.expose())
                .map_err(|_| CryptoError::InvalidKey("P-384 scalar"))?;
        return Ok(pair);
    }
    Err(CryptoError::Internal)
}

fn expand_p384(seed: &Secret32) -> Result<Expanded> {
    expand_p384_pair(&p384_pair(seed)?)
}

fn expand_p384_pair(pair: &EcdsaKeyPair) -> Result<Expanded> {
    expand_ec(Curve::P384, pair)
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

/// Expands a stored 32-byte secret (one scalar multiplication for P-256, whatever is
/// asked of it). RSA keys: [`expand_stored`].
pub fn expand(kind: DeviceKeyType, secret: &Secret32) -> Result<Expanded> {
    match kind {
        DeviceKeyType::EcP256 => expand_p256(&p256_pair(secret)?),
        DeviceKeyType::EcP384 => expand_p384(secret),
        DeviceKeyType::Rsa2048 | DeviceKeyType::Rsa3072 => Err(not_32_bytes(kind)),
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
        DeviceKeyType::EcP384 => Ok(expand_p384(secret)?.key_id),
        DeviceKeyType::Rsa2048 | DeviceKeyType::Rsa3072 => Err(not_32_bytes(kind)),
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
        DeviceKeyType::EcP384 => expand_p384(secret)?.public.ok_or(CryptoError::Internal),
        DeviceKeyType::Rsa2048 | DeviceKeyType::Rsa3072 => Err(not_32_bytes(kind)),
        DeviceKeyType::Aes256 => Err(CryptoError::InvalidKey("aes-256 has no public key")),
    }
}

/// The SubjectPublicKeyInfo of a private key given as PKCS#8 (P-256, P-384, Ed25519 or
/// RSA): what a certificate for that key must carry.
pub fn spki_of_pkcs8(pkcs8: &[u8]) -> Result<Vec<u8>> {
    use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
    if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8) {
        return Ok(crate::x509::p256_spki(pair.public_key().as_ref()));
    }
    if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8) {
        return Ok(crate::x509::p384_spki(pair.public_key().as_ref()));
    }
    if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8) {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        return Ok(spki);
    }
    if let Ok(pair) = aws_lc_rs::rsa::KeyPair::from_pkcs8(pkcs8) {
        let der: PublicKeyX509Der<'_> = pair
            .public_key()
            .as_der()
            .map_err(|_| CryptoError::Internal)?;
        return Ok(der.as_ref().to_vec());
    }
    Err(CryptoError::InvalidKey(
        "not a PKCS#8 key of a supported type",
    ))
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
            ec_pkcs8(Curve::P256, secret.expose(), pair.public_key().as_ref())
        }
        DeviceKeyType::Ed25519 => {
            let doc = Ed25519KeyPair::from_seed_unchecked(secret.expose())
                .map_err(|_| CryptoError::InvalidKey("ed25519 seed"))?
                .to_pkcs8v1()
                .map_err(|_| CryptoError::Internal)?;
            Ok(SecretBytes::new(doc.as_ref().to_vec()))
        }
        DeviceKeyType::EcP384 => Ok(expand_p384(secret)?.private),
        DeviceKeyType::Rsa2048 | DeviceKeyType::Rsa3072 => Err(not_32_bytes(kind)),
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
            DeviceKeyType::EcP384,
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
        for kind in [
            DeviceKeyType::EcP256,
            DeviceKeyType::EcP384,
            DeviceKeyType::Ed25519,
        ] {
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

    /// A P-384 key is what its seed derives, every time; its PKCS#8 is one aws-lc reads
    /// back as the same key, with the public key the certificate carries.
    #[test]
    fn a_p384_key_is_its_seed() {
        let seed = Secret32::new([0x5a; 32]);
        let a = expand(DeviceKeyType::EcP384, &seed).unwrap();
        let b = expand(DeviceKeyType::EcP384, &seed).unwrap();
        assert_eq!(a.private.expose(), b.private.expose());
        let parsed =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, a.private.expose()).unwrap();
        let Some(crate::x509::DevicePublicKey::P384(point)) = &a.public else {
            panic!("not a P-384 key")
        };
        assert_eq!(parsed.public_key().as_ref(), point.as_slice());
        assert_eq!(
            a.key_id,
            KeyId::Public(Fingerprint::of(&crate::x509::p384_spki(point)))
        );
        let other = expand(DeviceKeyType::EcP384, &Secret32::new([0x5b; 32])).unwrap();
        assert_ne!(other.key_id, a.key_id);
    }

    #[test]
    fn an_rsa_key_is_stored_as_its_pkcs8_and_checked_for_its_size() {
        let (stored, first) = generate_rsa(DeviceKeyType::Rsa2048).unwrap();
        let again = expand_stored(DeviceKeyType::Rsa2048, stored.expose()).unwrap();
        assert_eq!(again.key_id, first.key_id);
        assert_eq!(again.private.expose(), first.private.expose());
        assert!(expand_stored(DeviceKeyType::Rsa3072, stored.expose()).is_err());
        assert!(generate(DeviceKeyType::Rsa2048, &SeededRng::new(1)).is_err());
        let Some(crate::x509::DevicePublicKey::Rsa(spki)) = &first.public else {
            panic!("not an RSA key")
        };
        assert_eq!(first.key_id, KeyId::Public(Fingerprint::of(spki)));
    }

    #[test]
    fn aes_kcv_known_answer() {
        // AES-256 with the all-zero key encrypts the zero block to dc95c078a240....
        let id = key_id(DeviceKeyType::Aes256, &Secret32::new([0u8; 32])).unwrap();
        assert_eq!(id, KeyId::Kcv([0xdc, 0x95, 0xc0]));
    }
}
