//! SHA-256 and fingerprints (a public-key or certificate hash, safe to print and log).

use std::fmt;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Incremental SHA-256 over a stream (large files are hashed without being held in memory).
pub struct Sha256Stream(aws_lc_rs::digest::Context);

impl Default for Sha256Stream {
    fn default() -> Self {
        Self(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }
}

impl Sha256Stream {
    /// Hashes `data` next.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// The digest of everything hashed.
    pub fn finish(self) -> [u8; 32] {
        let d = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// SHA-256 of public data (a certificate, a public key). Prints as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `public_bytes`.
    pub fn of(public_bytes: &[u8]) -> Self {
        Self(sha256(public_bytes))
    }
    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        prefixed_hex("", &self.0)
    }
    /// A fingerprint from 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s).ok()?;
        Some(Self(v.try_into().ok()?))
    }
}

/// `prefix` followed by `bytes` in lower-case hex, in one allocation.
pub fn prefixed_hex(prefix: &str, bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(prefix.len() + 2 * bytes.len());
    s.push_str(prefix);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixed_hex_is_lower_case_hex_after_the_prefix() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        assert_eq!(
            super::prefixed_hex("kcv:", &bytes),
            format!("kcv:{}", hex::encode(&bytes))
        );
        assert_eq!(super::prefixed_hex("", &[]), "");
    }

    #[test]
    fn sha256_known_answer() {
        // FIPS 180-2 "abc".
        assert_eq!(
            hex::encode(super::sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut s = super::Sha256Stream::default();
        s.update(b"a");
        s.update(b"bc");
        assert_eq!(s.finish(), super::sha256(b"abc"));
    }
}
