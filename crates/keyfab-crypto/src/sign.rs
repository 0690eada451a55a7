//! ECDSA P-256 with SHA-256: the signature of every keyfab identity (root, clusters, service
//! keys, approvers). Signatures are fixed-size `r ‖ s` (64 bytes), as COSE ES256 wants;
//! certificates get the ASN.1 form through [`crate::x509`].

use crate::hash::Fingerprint;
use crate::secret::SecretBytes;
use crate::{CryptoError, Result};
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};

/// Length of an uncompressed SEC1 P-256 point.
pub const P256_POINT_LEN: usize = 65;
/// Length of a fixed `r ‖ s` P-256 signature.
pub const SIGNATURE_LEN: usize = 64;

/// A P-256 signing key. Its private half leaves only as PKCS#8 in a zeroizing buffer,
/// for custody to seal.
pub struct SigningKey {
    fixed: EcdsaKeyPair,
    pkcs8: SecretBytes,
}

impl SigningKey {
    /// Generates a key. aws-lc draws from its own DRBG here: key generation is the one
    /// place the injected generator is not used, because aws-lc offers no seeded path that
    /// would not also slow the hot path down.
    pub fn generate(_rng: &dyn crate::rng::SecureRng) -> Result<Self> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| CryptoError::Internal)?;
        let doc = pair.to_pkcs8v1().map_err(|_| CryptoError::Internal)?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// A key from its PKCS#8 document.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self> {
        let fixed = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|_| CryptoError::InvalidKey("not a P-256 PKCS#8 key"))?;
        Ok(Self {
            fixed,
            pkcs8: SecretBytes::new(pkcs8.to_vec()),
        })
    }

    /// The private key as PKCS#8, for sealing into custody. Zeroized when dropped.
    pub fn to_pkcs8(&self) -> SecretBytes {
        self.pkcs8.clone()
    }

    /// Its public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            point: self.fixed.public_key().as_ref().to_vec(),
        }
    }

    /// Fixed-size `r ‖ s` signature over SHA-256(message).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = self
            .fixed
            .sign(&rng, message)
            .map_err(|_| CryptoError::Internal)?;
        Ok(sig.as_ref().to_vec())
    }
}

/// Anything that signs with a P-256 key it holds: a software key, or (later) a key
/// in a token. Signatures are fixed `r ‖ s`.
pub trait EcdsaSigner: Send + Sync {
    /// The public key of the key it signs with.
    fn verifying_key(&self) -> VerifyingKey;
    /// Signs `message` (ECDSA P-256, SHA-256), fixed `r ‖ s`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>>;
}

impl EcdsaSigner for SigningKey {
    fn verifying_key(&self) -> VerifyingKey {
        SigningKey::verifying_key(self)
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        SigningKey::sign(self, message)
    }
}

/// A P-256 public key (uncompressed SEC1 point).
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    point: Vec<u8>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", self.fingerprint())
    }
}

impl VerifyingKey {
    /// A public key from its uncompressed SEC1 point.
    pub fn from_sec1(point: &[u8]) -> Result<Self> {
        if point.len() != P256_POINT_LEN || point[0] != 0x04 {
            return Err(CryptoError::InvalidKey("not an uncompressed P-256 point"));
        }
        Ok(Self {
            point: point.to_vec(),
        })
    }

    /// Parses a DER SubjectPublicKeyInfo holding a P-256 key.
    pub fn from_spki_der(spki: &[u8]) -> Result<Self> {
        let point = crate::x509::p256_point_from_spki(spki)?;
        Self::from_sec1(&point)
    }

    /// The uncompressed SEC1 point.
    pub fn sec1(&self) -> &[u8] {
        &self.point
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        crate::x509::p256_spki(&self.point)
    }

    /// SHA-256 of the SubjectPublicKeyInfo: the key id used everywhere (approvers, audit).
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.spki_der())
    }

    /// Checks a fixed `r ‖ s` signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<()> {
        if signature.len() != SIGNATURE_LEN {
            return Err(CryptoError::BadSignature);
        }
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.point)
            .verify(message, signature)
            .map_err(|_| CryptoError::BadSignature)
    }

    /// PEM `PUBLIC KEY`.
    pub fn to_pem(&self) -> String {
        crate::x509::to_pem(&self.spki_der(), "PUBLIC KEY")
    }

    /// A key from PEM `PUBLIC KEY`.
    pub fn from_pem(text: &str) -> Result<Self> {
        let p = pem::parse(text).map_err(|_| CryptoError::InvalidKey("not PEM"))?;
        if p.tag() != "PUBLIC KEY" {
            return Err(CryptoError::InvalidKey("PEM is not a PUBLIC KEY"));
        }
        Self::from_spki_der(p.contents())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SystemRng;

    #[test]
    fn sign_verify_and_reject_tamper() {
        let k = SigningKey::generate(&SystemRng).unwrap();
        let v = k.verifying_key();
        let sig = k.sign(b"msg").unwrap();
        v.verify(b"msg", &sig).unwrap();
        assert!(v.verify(b"msh", &sig).is_err());
        let back = SigningKey::from_pkcs8(k.to_pkcs8().expose()).unwrap();
        assert_eq!(back.verifying_key(), v);
        let pem = v.to_pem();
        assert_eq!(VerifyingKey::from_pem(&pem).unwrap(), v);
    }
}
