//! An unseal share sealed to its holder (`.kfs`, FORMATS.md §12): written by `init
//! --share-recipients`, opened only with the holder's key, so a share never passes
//! through a screen, a terminal's scrollback or a shell history.
//!
//! ```text
//! "KEYFAB" 'S' 0x01 | u16 BE n | node name (n bytes, UTF-8) | recipient (32 bytes:
//! SHA-256 of the holder's SubjectPublicKeyInfo) | enc (65 bytes) | u16 BE m |
//! ciphertext (m bytes: the share's text, then the 16-byte tag)
//! ```
//!
//! HPKE (RFC 9180, base mode, DHKEM(P-256)/HKDF-SHA256/AES-256-GCM) to the holder's key;
//! `info` binds the format, the node and the recipient, and the `aad` is every byte
//! before `m`, so nothing in the file can change without the share failing to open.
//!
//! ```
//! use keyfab_crypto::{hpke::HpkeSecretKey, rng::SystemRng};
//! use keyfab_formats::sealed_share::{seal, SealedShare};
//! let holder = HpkeSecretKey::generate(&SystemRng);
//! let file = seal("shenzhen-1", &holder.public_key().unwrap(), b"kfs1-01ab", &SystemRng).unwrap();
//! let parsed = SealedShare::parse(&file).unwrap();
//! assert_eq!(parsed.node, "shenzhen-1");
//! assert_eq!(parsed.open(&holder).unwrap().expose(), b"kfs1-01ab");
//! ```

use crate::prefix::{self, Kind};
use crate::{FormatError, Malformed, Result};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::hpke::{self, HpkePublicKey, HpkeRecipient, ENC_LEN, TAG_LEN};
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::SecretBytes;

/// The version of the file this code writes and reads.
pub const VERSION: u8 = 1;
const INFO_LABEL: &[u8] = b"keyfab-sealed-share-v1";
/// The longest node name a file carries (as node names are bounded).
const MAX_NODE: usize = 128;
/// The longest share text sealed (a share is 71 characters today).
const MAX_SHARE: usize = 256;
/// Largest file accepted.
pub const MAX_LEN: usize = prefix::LEN + 2 + MAX_NODE + 32 + ENC_LEN + 2 + MAX_SHARE + TAG_LEN;

/// A sealed share as read: whose node it unseals, whom it is sealed to.
#[derive(Debug, Clone)]
pub struct SealedShare {
    /// The name of the node (site or HQ) whose keystore the share unseals.
    pub node: String,
    /// SHA-256 of the holder's SubjectPublicKeyInfo.
    pub recipient: Fingerprint,
    header: Vec<u8>,
    enc: Vec<u8>,
    ciphertext: Vec<u8>,
}

fn info(node: &str, recipient: &Fingerprint) -> Vec<u8> {
    let mut out = INFO_LABEL.to_vec();
    // Bounded by MAX_NODE when sealing and parsing.
    out.extend_from_slice(&(node.len() as u16).to_be_bytes());
    out.extend_from_slice(node.as_bytes());
    out.extend_from_slice(&recipient.0);
    out
}

/// Seals `share` (its text) of `node`'s keystore to the holder's key `to`.
pub fn seal(node: &str, to: &HpkePublicKey, share: &[u8], rng: &dyn SecureRng) -> Result<Vec<u8>> {
    if node.is_empty() || node.len() > MAX_NODE || share.is_empty() || share.len() > MAX_SHARE {
        return Err(FormatError::Write(
            "sealed share: node name or share out of bounds".into(),
        ));
    }
    let recipient = to.fingerprint();
    let (enc, mut sealer) = hpke::seal_context(to, &info(node, &recipient), rng)
        .map_err(|e| FormatError::Write(e.to_string()))?;
    let mut out = prefix::encode(Kind::SealedShare, VERSION).to_vec();
    out.extend_from_slice(&(node.len() as u16).to_be_bytes());
    out.extend_from_slice(node.as_bytes());
    out.extend_from_slice(&recipient.0);
    out.extend_from_slice(&enc);
    let ciphertext = sealer
        .seal(share, &out)
        .map_err(|e| FormatError::Write(e.to_string()))?;
    out.extend_from_slice(&(ciphertext.len() as u16).to_be_bytes());
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

impl SealedShare {
    /// Parses a file strictly: its framing, every length within bounds, nothing after
    /// the ciphertext. Whether it opens is [`SealedShare::open`]'s to say.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let malformed = |kind, m: &str| FormatError::malformed(kind, format!("sealed share: {m}"));
        if bytes.len() > MAX_LEN {
            return Err(malformed(Malformed::TooLarge, "too large"));
        }
        prefix::check(bytes, Kind::SealedShare, VERSION)?;
        let mut at = prefix::LEN;
        let mut take = |n: usize| -> Result<&[u8]> {
            let field = bytes
                .get(at..at + n)
                .ok_or_else(|| malformed(Malformed::Truncated, "truncated"))?;
            at += n;
            Ok(field)
        };
        let len = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
        let n = len(take(2)?);
        if n == 0 || n > MAX_NODE {
            return Err(malformed(Malformed::Field, "node name length"));
        }
        let node = std::str::from_utf8(take(n)?)
            .map_err(|_| malformed(Malformed::Field, "node name is not UTF-8"))?
            .to_owned();
        let recipient = Fingerprint(
            take(32)?
                .try_into()
                .map_err(|_| malformed(Malformed::Truncated, "recipient"))?,
        );
        let enc = take(ENC_LEN)?.to_vec();
        let header = bytes[..prefix::LEN + 2 + n + 32 + ENC_LEN].to_vec();
        let m = len(take(2)?);
        if m <= TAG_LEN || m > MAX_SHARE + TAG_LEN {
            return Err(malformed(Malformed::Field, "ciphertext length"));
        }
        let ciphertext = take(m)?.to_vec();
        if header.len() + 2 + m != bytes.len() {
            return Err(malformed(
                Malformed::TrailingBytes,
                "bytes after the ciphertext",
            ));
        }
        Ok(Self {
            node,
            recipient,
            header,
            enc,
            ciphertext,
        })
    }

    /// The share's text, opened with the holder's key: refused, before any decryption,
    /// if the file is sealed to another key, and if anything in it was changed.
    pub fn open(&self, holder: &dyn HpkeRecipient) -> Result<SecretBytes> {
        let public = holder
            .public_key()
            .map_err(|e| FormatError::Write(e.to_string()))?;
        if public.fingerprint() != self.recipient {
            return Err(FormatError::WrongRecipient(format!(
                "this share is sealed to key {}, not to {}",
                self.recipient,
                public.fingerprint()
            )));
        }
        let undecryptable = || {
            FormatError::malformed(
                Malformed::Undecryptable,
                "sealed share: does not open (altered, or not sealed by keyfab)",
            )
        };
        let mut opener = holder
            .open_context(&self.enc, &info(&self.node, &self.recipient))
            .map_err(|_| undecryptable())?;
        opener
            .open(&self.ciphertext, &self.header)
            .map_err(|_| undecryptable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfab_crypto::hpke::HpkeSecretKey;
    use keyfab_crypto::rng::SeededRng;

    #[test]
    fn a_share_opens_only_for_its_holder_and_as_sealed() {
        let rng = SeededRng::new(9);
        let alice = HpkeSecretKey::generate(&rng);
        let bob = HpkeSecretKey::generate(&rng);
        let file = seal("site-1", &alice.public_key().unwrap(), b"kfs1-01", &rng).unwrap();
        let parsed = SealedShare::parse(&file).unwrap();
        assert_eq!(parsed.open(&alice).unwrap().expose(), b"kfs1-01");
        assert!(matches!(
            parsed.open(&bob),
            Err(FormatError::WrongRecipient(_))
        ));
        // Every byte matters: a change anywhere is refused when parsed or opened.
        for i in 0..file.len() {
            let mut altered = file.clone();
            altered[i] ^= 0x01;
            let opened = SealedShare::parse(&altered).and_then(|s| s.open(&alice));
            assert!(
                opened.is_err(),
                "byte {i} changed and the share still opened"
            );
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(SealedShare::parse(&longer).is_err());
        assert!(SealedShare::parse(&file[..file.len() - 1]).is_err());
    }

    /// The committed vectors (`tests/vectors/sealed-share/`, FORMATS.md §12): the holder's
    /// key, a share sealed to it (what this code writes with the seeded generator, byte
    /// for byte), the same share sealed to another key, and two altered copies; each
    /// opens or is refused as `expected.txt` says. `KEYFAB_BLESS=1` writes them anew.
    #[test]
    fn the_committed_vectors_open_or_are_refused_as_expected() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/vectors/sealed-share");
        let rng = SeededRng::new(12);
        let holder = HpkeSecretKey::generate(&rng);
        let other = HpkeSecretKey::generate(&rng);
        let share = b"kfs1-01000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        let valid = seal("shenzhen-1", &holder.public_key().unwrap(), share, &rng).unwrap();
        let foreign = seal("shenzhen-1", &other.public_key().unwrap(), share, &rng).unwrap();
        let mut flipped = valid.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        let truncated = valid[..valid.len() - 1].to_vec();
        let vectors: [(&str, Vec<u8>); 5] = [
            ("holder.key", holder.to_bytes().expose().to_vec()),
            ("valid.kfs", valid),
            ("wrong_recipient.kfs", foreign),
            ("tag_flipped.kfs", flipped),
            ("truncated.kfs", truncated),
        ];
        let expected = "valid.kfs opens\nwrong_recipient.kfs wrong_recipient\ntag_flipped.kfs undecryptable\ntruncated.kfs truncated\n";
        if std::env::var_os("KEYFAB_BLESS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &vectors {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
            std::fs::write(dir.join("expected.txt"), expected).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("expected.txt")).unwrap(),
            expected
        );
        for (name, bytes) in &vectors {
            assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
        }
        let key =
            HpkeSecretKey::from_bytes(&std::fs::read(dir.join("holder.key")).unwrap()).unwrap();
        for line in expected.lines() {
            let (name, outcome) = line.split_once(' ').unwrap();
            let file = std::fs::read(dir.join(name)).unwrap();
            let got = match SealedShare::parse(&file).and_then(|s| s.open(&key)) {
                Ok(text) => {
                    assert_eq!(text.expose(), share);
                    "opens"
                }
                Err(FormatError::WrongRecipient(_)) => "wrong_recipient",
                Err(FormatError::Malformed {
                    kind: Malformed::Undecryptable,
                    ..
                }) => "undecryptable",
                Err(FormatError::Malformed {
                    kind: Malformed::Truncated,
                    ..
                }) => "truncated",
                Err(e) => panic!("{name}: {e}"),
            };
            assert_eq!(got, outcome, "{name}");
        }
    }
}
