//! RFC 9180's key derivation on aws-lc primitives: DHKEM's `ExtractAndExpand`, the
//! key schedule (base mode) and the sealing and opening contexts. The Diffie-Hellman step
//! runs in aws-lc for keys held here, and in a PKCS#11 token for keys it never releases;
//! either way the rest is this one implementation.
//!
//! Checked against RFC 9180 Appendix A.3 (DHKEM(P-256, HKDF-SHA256), HKDF-SHA256,
//! AES-128-GCM) from both sides, and by the committed test vectors: files sealed by
//! another implementation (the `hpke` crate, which keyfab used before) open here.

use crate::secret::SecretBytes;
use crate::{CryptoError, Result};
use aws_lc_rs::aead::{LessSafeKey, UnboundKey, AES_128_GCM, AES_256_GCM};
use aws_lc_rs::hkdf::{KeyType, Prk, HKDF_SHA256};
use aws_lc_rs::hmac;
use zeroize::Zeroizing;

const KEM_P256_SHA256: u16 = 0x0010;
const KDF_HKDF_SHA256: u16 = 0x0001;
/// `Nsecret` of DHKEM(P-256, HKDF-SHA256).
const N_SECRET: usize = 32;
const N_NONCE: usize = 12;

/// The AEADs this schedule serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aead {
    /// Only for checking against RFC 9180 A.3.
    #[cfg_attr(not(test), allow(dead_code))]
    Aes128Gcm,
    Aes256Gcm,
}

impl Aead {
    fn id(self) -> u16 {
        match self {
            Aead::Aes128Gcm => 0x0001,
            Aead::Aes256Gcm => 0x0002,
        }
    }
    fn key_len(self) -> usize {
        match self {
            Aead::Aes128Gcm => 16,
            Aead::Aes256Gcm => 32,
        }
    }
}

/// HKDF-Extract as HMAC-SHA256, so that its output can be used as bytes (`info_hash`).
fn extract(salt: &[u8], ikm: &[&[u8]]) -> Zeroizing<Vec<u8>> {
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, salt));
    for part in ikm {
        ctx.update(part);
    }
    Zeroizing::new(ctx.sign().as_ref().to_vec())
}

struct Len(usize);
impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &[u8], info: &[&[u8]], len: usize) -> Result<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(vec![0u8; len]);
    Prk::new_less_safe(HKDF_SHA256, prk)
        .expand(info, Len(len))
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| CryptoError::Internal)?;
    Ok(out)
}

/// `LabeledExtract(salt, label, ikm)` for `suite_id`.
fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Zeroizing<Vec<u8>> {
    extract(salt, &[b"HPKE-v1", suite, label, ikm])
}

/// `LabeledExpand(prk, label, info, len)` for `suite_id`.
fn labeled_expand(
    suite: &[u8],
    prk: &[u8],
    label: &[u8],
    info: &[u8],
    len: usize,
) -> Result<Zeroizing<Vec<u8>>> {
    let len_be = u16::try_from(len)
        .map_err(|_| CryptoError::Internal)?
        .to_be_bytes();
    expand(prk, &[&len_be, b"HPKE-v1", suite, label, info], len)
}

/// DHKEM(P-256, HKDF-SHA256) `ExtractAndExpand(dh, enc ‖ pkRm)`: the shared secret.
pub(crate) fn kem_shared_secret(
    dh: &[u8],
    enc: &[u8],
    recipient: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let mut suite = b"KEM".to_vec();
    suite.extend_from_slice(&KEM_P256_SHA256.to_be_bytes());
    let prk = labeled_extract(&suite, b"", b"eae_prk", dh);
    let mut context = enc.to_vec();
    context.extend_from_slice(recipient);
    labeled_expand(&suite, &prk, b"shared_secret", &context, N_SECRET)
}

/// The base-mode key schedule: the AEAD key and base nonce.
pub(crate) fn key_schedule(
    shared_secret: &[u8],
    info: &[u8],
    aead: Aead,
) -> Result<(Zeroizing<Vec<u8>>, [u8; N_NONCE])> {
    let mut suite = b"HPKE".to_vec();
    for id in [KEM_P256_SHA256, KDF_HKDF_SHA256, aead.id()] {
        suite.extend_from_slice(&id.to_be_bytes());
    }
    let psk_id_hash = labeled_extract(&suite, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(&suite, b"", b"info_hash", info);
    let mut context = vec![0u8]; // mode_base
    context.extend_from_slice(&psk_id_hash);
    context.extend_from_slice(&info_hash);
    let secret = labeled_extract(&suite, shared_secret, b"secret", b"");
    let key = labeled_expand(&suite, &secret, b"key", &context, aead.key_len())?;
    let nonce = labeled_expand(&suite, &secret, b"base_nonce", &context, N_NONCE)?;
    let mut base_nonce = [0u8; N_NONCE];
    base_nonce.copy_from_slice(&nonce);
    Ok((key, base_nonce))
}

/// The AEAD key, base nonce and sequence number a context runs on (RFC 9180 §5.2).
struct Context {
    key: LessSafeKey,
    base_nonce: [u8; N_NONCE],
    seq: u64,
}

impl Context {
    fn new(shared_secret: &[u8], info: &[u8], aead: Aead) -> Result<Self> {
        let (key, base_nonce) = key_schedule(shared_secret, info, aead)?;
        let alg = match aead {
            Aead::Aes128Gcm => &AES_128_GCM,
            Aead::Aes256Gcm => &AES_256_GCM,
        };
        let key = UnboundKey::new(alg, &key).map_err(|_| CryptoError::Internal)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            base_nonce,
            seq: 0,
        })
    }

    /// `ComputeNonce(seq)`: the base nonce XOR the sequence number.
    fn nonce(&self) -> [u8; N_NONCE] {
        let mut nonce = self.base_nonce;
        for (n, s) in nonce[N_NONCE - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    /// `IncrementSeq`: a context never reuses a nonce.
    fn advance(&mut self) -> Result<()> {
        self.seq = self.seq.checked_add(1).ok_or(CryptoError::Internal)?;
        Ok(())
    }
}

/// A sealing context: RFC 9180 `ContextS` for one AEAD.
pub(crate) struct HostSealer(Context);

impl HostSealer {
    pub(crate) fn new(shared_secret: &[u8], info: &[u8], aead: Aead) -> Result<Self> {
        Context::new(shared_secret, info, aead).map(Self)
    }

    /// Seals the next message: `ciphertext ‖ tag`.
    pub(crate) fn seal(&mut self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let nonce = self.0.nonce();
        self.0.advance()?;
        // Room for the tag from the start: aws-lc appends it before it encrypts, and a
        // buffer that grew then would leave a copy of the plaintext in the memory it
        // freed. Zeroized if sealing fails.
        let mut buf = Zeroizing::new(Vec::with_capacity(plaintext.len() + crate::hpke::TAG_LEN));
        buf.extend_from_slice(plaintext);
        self.0
            .key
            .seal_in_place_append_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(aad),
                &mut *buf,
            )
            .map_err(|_| CryptoError::Internal)?;
        Ok(std::mem::take(&mut *buf))
    }
}

/// An opening context: RFC 9180 `ContextR` for one AEAD.
pub(crate) struct HostOpener(Context);

impl HostOpener {
    pub(crate) fn new(shared_secret: &[u8], info: &[u8], aead: Aead) -> Result<Self> {
        Context::new(shared_secret, info, aead).map(Self)
    }

    /// Opens the next message; the sequence number advances only when it opens.
    pub(crate) fn open(&mut self, ciphertext: &[u8], aad: &[u8]) -> Result<SecretBytes> {
        let buf = crate::aead::open_with(&self.0.key, self.0.nonce(), aad, ciphertext)?;
        self.0.advance().map_err(|_| CryptoError::DecryptFailed)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::agreement::{agree, PrivateKey, UnparsedPublicKey, ECDH_P256};

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    fn ecdh(sk: &[u8], peer: &[u8]) -> Vec<u8> {
        let sk = PrivateKey::from_private_key(&ECDH_P256, sk).unwrap();
        agree(&sk, UnparsedPublicKey::new(&ECDH_P256, peer), (), |dh| {
            Ok(dh.to_vec())
        })
        .unwrap()
    }

    /// RFC 9180 A.3.1: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode.
    #[test]
    fn rfc9180_a3_base_mode() {
        let sk_rm = h("f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2");
        let pk_rm = h("04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0");
        let enc = h("04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4");
        let info = h("4f6465206f6e2061204772656369616e2055726e");
        let shared = kem_shared_secret(&ecdh(&sk_rm, &enc), &enc, &pk_rm).unwrap();
        assert_eq!(
            hex::encode(&*shared),
            "c0d26aeab536609a572b07695d933b589dcf363ff9d93c93adea537aeabb8cb8"
        );
        let (key, _) = key_schedule(&shared, &info, Aead::Aes128Gcm).unwrap();
        assert_eq!(hex::encode(&*key), "868c066ef58aae6dc589b6cfdd18f97e");
        let mut opener = HostOpener::new(&shared, &info, Aead::Aes128Gcm).unwrap();
        let ct = h("5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434");
        let pt = opener.open(&ct, &h("436f756e742d30")).unwrap();
        assert_eq!(
            hex::encode(pt.expose()),
            "4265617574792069732074727574682c20747275746820626561757479"
        );
        // The sequence number moved on: the same message does not open twice.
        assert!(opener.open(&ct, &h("436f756e742d30")).is_err());
    }

    /// keyfab's suite (AES-256-GCM): what the `hpke` crate seals, this opens.
    #[test]
    fn opens_what_the_hpke_crate_seals() {
        let rng = crate::rng::SeededRng::new(11);
        let sk = crate::hpke::HpkeSecretKey::generate(&rng);
        let pk = sk.public_key().unwrap();
        let (enc, mut sealer) = crate::hpke::seal_context(&pk, b"keyfab info", &rng).unwrap();
        let c0 = sealer.seal(b"first", b"a0").unwrap();
        let c1 = sealer.seal(b"second", b"a1").unwrap();
        let dh = ecdh(sk.to_bytes().expose(), &enc);
        let shared = kem_shared_secret(&dh, &enc, pk.sec1()).unwrap();
        let mut opener = HostOpener::new(&shared, b"keyfab info", Aead::Aes256Gcm).unwrap();
        assert_eq!(opener.open(&c0, b"a0").unwrap().expose(), b"first");
        assert!(opener.open(&c1, b"wrong aad").is_err());
        assert_eq!(opener.open(&c1, b"a1").unwrap().expose(), b"second");
    }
}
