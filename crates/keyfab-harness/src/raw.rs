//! The raw rate of the cryptography keyfab's work is made of, on this machine: what the
//! benchmarks divide keyfab's own rate by, so every figure comes with its limit.

use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use keyfab_crypto::{CryptoError, Result};

/// The raw cryptographic work of provisioning one device, for benchmarks to compare
/// with: a P-256 key generation, one ECDSA signature over a certificate-sized message,
/// one HKDF and one AES-GCM seal.
pub fn raw_device_crypto(
    kind: keyfab_crypto::devicekey::DeviceKeyType,
    n: usize,
    signer: &keyfab_crypto::sign::SigningKey,
    aead: &keyfab_crypto::aead::AeadKey,
) -> Result<()> {
    use keyfab_crypto::devicekey::DeviceKeyType;
    let tbs = [0x5au8; 320];
    for i in 0..n {
        // The key pair alone, as aws-lc makes it: no encoding, no identity.
        match kind {
            DeviceKeyType::EcP384 => {
                let pair =
                    EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING)
                        .map_err(|_| CryptoError::Internal)?;
                std::hint::black_box(&pair);
            }
            DeviceKeyType::Ed25519 => {
                let pair = aws_lc_rs::signature::Ed25519KeyPair::generate()
                    .map_err(|_| CryptoError::Internal)?;
                std::hint::black_box(&pair);
            }
            DeviceKeyType::Rsa2048 | DeviceKeyType::Rsa3072 => {
                let size = if kind == DeviceKeyType::Rsa2048 {
                    aws_lc_rs::rsa::KeySize::Rsa2048
                } else {
                    aws_lc_rs::rsa::KeySize::Rsa3072
                };
                let pair =
                    aws_lc_rs::rsa::KeyPair::generate(size).map_err(|_| CryptoError::Internal)?;
                std::hint::black_box(&pair);
            }
            _ => {
                let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
                    .map_err(|_| CryptoError::Internal)?;
                std::hint::black_box(&pair);
            }
        }
        std::hint::black_box(signer.sign(&tbs)?);
        let k = keyfab_crypto::kdf::hkdf_sha256(&tbs[..32], b"salt", b"info")?;
        std::hint::black_box(k.expose());
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
        std::hint::black_box(aead.seal(nonce, b"aad", &tbs[..32])?);
    }
    Ok(())
}

/// Generates `n` P-256 key pairs and throws them away: the raw rate benchmarks compare
/// keyfab with.
pub fn raw_p256_keygen(n: usize) -> Result<()> {
    for _ in 0..n {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .map_err(|_| CryptoError::Internal)?;
        std::hint::black_box(&pair);
    }
    Ok(())
}
