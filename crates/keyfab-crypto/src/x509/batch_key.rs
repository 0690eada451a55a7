//! The key of an entitlement's batch CA: ECDSA P-256 with SHA-256 (the default) or P-384
//! with SHA-384, as the policy's `batch_ca_key` says. Every other keyfab identity is
//! P-256; the batch CA alone may be P-384, for device fleets whose relying parties ask
//! for it (CNSA-style profiles). Its signatures go into certificates and CRLs only, so
//! they are made in the ASN.1 form X.509 wants.

use crate::secret::SecretBytes;
use crate::sign::SigningKey;
use crate::{CryptoError, Result};
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_ASN1_SIGNING};

/// The algorithm of a batch CA key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKeyType {
    /// ECDSA P-256, signatures ecdsa-with-SHA256.
    EcP256,
    /// ECDSA P-384, signatures ecdsa-with-SHA384.
    EcP384,
}

/// AlgorithmIdentifier ecdsa-with-SHA256 (1.2.840.10045.4.3.2), no parameters.
const ECDSA_SHA256: [u8; 12] = [
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
/// AlgorithmIdentifier ecdsa-with-SHA384 (1.2.840.10045.4.3.3), no parameters.
const ECDSA_SHA384: [u8; 12] = [
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];

/// A batch CA's private key.
pub enum BatchKey {
    /// P-256.
    P256(SigningKey),
    /// P-384: the key pair and its PKCS#8.
    P384(EcdsaKeyPair, SecretBytes),
}

impl BatchKey {
    /// A new key of `kind`.
    pub fn generate(kind: BatchKeyType) -> Result<Self> {
        match kind {
            BatchKeyType::EcP256 => Ok(Self::P256(SigningKey::generate(&crate::rng::SystemRng)?)),
            BatchKeyType::EcP384 => {
                let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING)
                    .map_err(|_| CryptoError::Internal)?;
                let doc = pair.to_pkcs8v1().map_err(|_| CryptoError::Internal)?;
                Self::from_pkcs8(doc.as_ref())
            }
        }
    }

    /// A key from its PKCS#8 (P-256 or P-384).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self> {
        if let Ok(key) = SigningKey::from_pkcs8(pkcs8) {
            return Ok(Self::P256(key));
        }
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8)
            .map_err(|_| CryptoError::InvalidKey("not a P-256 or P-384 PKCS#8 key"))?;
        Ok(Self::P384(pair, SecretBytes::new(pkcs8.to_vec())))
    }

    /// The private key as PKCS#8, zeroized when dropped.
    pub fn to_pkcs8(&self) -> SecretBytes {
        match self {
            Self::P256(key) => key.to_pkcs8(),
            Self::P384(_, pkcs8) => pkcs8.clone(),
        }
    }

    /// Its algorithm.
    pub fn key_type(&self) -> BatchKeyType {
        match self {
            Self::P256(_) => BatchKeyType::EcP256,
            Self::P384(..) => BatchKeyType::EcP384,
        }
    }

    /// The uncompressed public point.
    pub(crate) fn public_point(&self) -> Vec<u8> {
        match self {
            Self::P256(key) => key.verifying_key().sec1().to_vec(),
            Self::P384(pair, _) => pair.public_key().as_ref().to_vec(),
        }
    }

    /// Its SubjectPublicKeyInfo, DER.
    pub(crate) fn spki_der(&self) -> Vec<u8> {
        match self {
            Self::P256(key) => key.verifying_key().spki_der(),
            Self::P384(pair, _) => super::p384_spki(pair.public_key().as_ref()),
        }
    }

    /// The AlgorithmIdentifier of its signatures, DER.
    pub(crate) fn signature_algorithm(&self) -> &'static [u8] {
        match self {
            Self::P256(_) => &ECDSA_SHA256,
            Self::P384(..) => &ECDSA_SHA384,
        }
    }

    /// An ASN.1 ECDSA-Sig-Value over `message` (SHA-256 or SHA-384 by the key's curve).
    pub(crate) fn sign_asn1(&self, message: &[u8]) -> Result<Vec<u8>> {
        match self {
            Self::P256(key) => super::fixed_to_asn1(&key.sign(message)?),
            Self::P384(pair, _) => {
                let rng = aws_lc_rs::rand::SystemRandom::new();
                let sig = pair
                    .sign(&rng, message)
                    .map_err(|_| CryptoError::Internal)?;
                Ok(sig.as_ref().to_vec())
            }
        }
    }

    fn rcgen_algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::P256(_) => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::P384(..) => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

/// A batch CA key's public half, for rcgen to certify.
pub(crate) struct BatchPublic {
    point: Vec<u8>,
    algorithm: &'static rcgen::SignatureAlgorithm,
}

impl BatchPublic {
    pub(crate) fn of(key: &BatchKey) -> Self {
        Self {
            point: key.public_point(),
            algorithm: key.rcgen_algorithm(),
        }
    }
}

impl rcgen::PublicKeyData for BatchPublic {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

/// The key as rcgen's signer (for CRLs), with its public half alongside.
pub(crate) struct BatchSigner<'a> {
    key: &'a BatchKey,
    public: BatchPublic,
}

impl<'a> BatchSigner<'a> {
    pub(crate) fn new(key: &'a BatchKey) -> Self {
        Self {
            key,
            public: BatchPublic::of(key),
        }
    }
}

impl rcgen::PublicKeyData for BatchSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.public.algorithm
    }
}

impl rcgen::SigningKey for BatchSigner<'_> {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.key
            .sign_asn1(msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}
