//! Secret byte containers: zeroized on drop, and their `Debug` never shows the bytes.
//!
//! Zeroizing is not redacting: both properties are needed, so neither type derives `Debug`.

use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// A variable-length secret (a PKCS#8 document, a decrypted payload).
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes` (zeroized when dropped).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
    /// The secret bytes: for the one call that needs them, never for printing.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    /// The secret bytes, to fill in place.
    pub fn expose_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {}])", self.0.len())
    }
}

/// A fixed 32-byte secret: symmetric keys, EC scalars, Ed25519 seeds, master secrets.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret32([u8; 32]);

impl Secret32 {
    /// Takes `bytes` (zeroized when dropped).
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    /// Copies `bytes` if they are exactly 32.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(arr))
    }
    /// 32 bytes from `rng`.
    pub fn random(rng: &dyn crate::rng::SecureRng) -> Self {
        let mut b = [0u8; 32];
        rng.fill(&mut b);
        let s = Self(b);
        b.zeroize();
        s
    }
    /// The secret bytes: for the one call that needs them, never for printing.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32([redacted])")
    }
}

/// Bytes of stack [`scrub_stack`] overwrites below its caller.
const STACK_SCRUB_BYTES: usize = 32 * 1024;

/// Overwrites the stack just below the caller's frame with zeroes. A key moved by value
/// (a `[u8; 32]`, a [`Secret32`]) leaves copies in the frames it passed through, and
/// those frames stay as they were until something else runs there; a thread that has
/// just handled key material calls this at the top of its loop so that no copy
/// outlives the request.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [0u8; STACK_SCRUB_BYTES];
    // A plain fill (memset speed, unlike byte-wise volatile writes); `black_box` makes
    // the compiler assume the zeroes are read, so the fill is not optimized away.
    area.fill(0);
    std::hint::black_box(&mut area);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No digit of the secret in any base a formatter writes: a derived `Debug` (which
    /// prints each byte in decimal: `171`) or one printing hex (`ab`) fails it, and so
    /// does `{:#?}`. The exact redacted forms are pinned too.
    #[test]
    fn debug_never_shows_secret_bytes() {
        let (s, b) = (Secret32::new([0xAB; 32]), SecretBytes::new(vec![0xCD; 5]));
        let shown = [
            format!("{s:?}"),
            format!("{s:#?}"),
            format!("{b:?}"),
            format!("{b:#?}"),
        ];
        for d in &shown {
            let d = d.to_lowercase();
            for leak in ["171", "ab", "0b10101011", "205", "cd", "0b11001101"] {
                assert!(!d.contains(leak), "{d} shows {leak}");
            }
        }
        assert_eq!(shown[0], "Secret32([redacted])");
        assert_eq!(shown[2], "SecretBytes([redacted; 5])");
    }
}
