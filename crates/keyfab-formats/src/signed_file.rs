//! The layout `.kfe` and `.kfa` share (FORMATS.md): prefix, u32 BE length, a COSE_Sign1
//! header, then a body of sealed chunks bound by the header's SHA-256 digest.
//!
//! Reading follows DESIGN.md invariant 1: the size cap, then the prefix, then the
//! signature over the exact header bytes; the body is hashed against the signed digest
//! before anything in it is decrypted.

use crate::cose::{self, SignedByChain};
use crate::entitlement::read_exact_or_truncated;
use crate::prefix::{self, Kind};
use crate::{FormatError, Result};
use keyfab_crypto::hash::Sha256Stream;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// The caps and labels of one file kind.
pub(crate) struct Layout {
    pub kind: Kind,
    pub version: u8,
    /// Name used in messages ("entitlement", "bundle").
    pub what: &'static str,
    pub max_file_len: u64,
    pub max_sign1_len: u32,
    pub content_type: &'static str,
    pub context: &'static [u8],
}

/// The body of a file whose signed header holds; not yet checked.
pub(crate) struct UncheckedBody {
    file: File,
    file_len: u64,
    pub offset: u64,
}

/// Size cap → prefix → COSE_Sign1 signature. The signer's chain is the caller's to
/// validate, since the role it must hold differs per kind.
pub(crate) fn read_signed_head(
    path: &Path,
    layout: &Layout,
) -> Result<(SignedByChain, UncheckedBody)> {
    let mut file = File::open(path)?;
    let file_len = file.metadata()?.len();
    if file_len > layout.max_file_len {
        return Err(FormatError::Malformed(format!(
            "file larger than the {} size cap",
            layout.what
        )));
    }
    let mut head = [0u8; prefix::LEN + 4];
    read_exact_or_truncated(&mut file, &mut head)?;
    prefix::check(&head, layout.kind, layout.version)?;
    let sign1_len = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if sign1_len > layout.max_sign1_len || u64::from(sign1_len) > file_len - head.len() as u64 {
        return Err(FormatError::Malformed(
            "truncated, or signed header length out of range".into(),
        ));
    }
    let mut sign1 = vec![0u8; sign1_len as usize];
    read_exact_or_truncated(&mut file, &mut sign1)?;
    let signed = cose::verify(&sign1, layout.content_type, layout.context)?;
    let body = UncheckedBody {
        file,
        file_len,
        offset: head.len() as u64 + u64::from(sign1_len),
    };
    Ok((signed, body))
}

impl UncheckedBody {
    /// The body is exactly `body_len` bytes and hashes to the signed `digest`.
    pub(crate) fn check(mut self, body_len: u64, digest: &[u8]) -> Result<()> {
        let actual = self.file_len - self.offset;
        if actual < body_len {
            return Err(FormatError::Malformed(format!(
                "truncated: body has {actual} of {body_len} bytes"
            )));
        }
        if actual > body_len {
            return Err(FormatError::Malformed(
                "trailing bytes after the body".into(),
            ));
        }
        let mut hasher = Sha256Stream::default();
        let mut reader = BufReader::with_capacity(1 << 20, &mut self.file);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if hasher.finish().as_slice() != digest {
            return Err(FormatError::BadSignature(
                "body does not match its signed digest".into(),
            ));
        }
        Ok(())
    }
}

/// The AEAD associated data of body chunk `index`: the kind's label, the index and
/// whether it is the last, so chunks cannot be reordered, dropped or cut short.
pub(crate) fn chunk_aad(label: &[u8], index: u64, last: bool) -> Vec<u8> {
    let mut aad = label.to_vec();
    aad.extend_from_slice(&index.to_be_bytes());
    aad.push(u8::from(last));
    aad
}
