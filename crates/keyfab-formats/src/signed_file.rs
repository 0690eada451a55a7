//! The layout `.kfe` and `.kfa` share (FORMATS.md): prefix, u32 BE length, a COSE_Sign1
//! header, then a body of sealed chunks bound by the header's SHA-256 digest.
//!
//! Reading follows the verification order of docs/FORMATS.md: the size cap, then the prefix, then the
//! signature over the exact header bytes; the body is hashed against the signed digest
//! before anything in it is decrypted. Writing seals the body into a spool first (its
//! length and digest go into the header the signature covers), then writes the header
//! and the body to any `Write`; making the file durable is the caller's.

use crate::cose::{self, SignedByChain};
use crate::prefix::{self, Kind};
use crate::Malformed;
use crate::{FormatError, Result};
use keyfab_crypto::hash::Sha256Stream;
use keyfab_crypto::hpke;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::sign::EcdsaSigner;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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
    /// The first bytes of every body chunk's AEAD associated data ([`chunk_aad`]).
    pub chunk_label: &'static [u8],
}

/// Where a large file (`.kfe`, `.kfa`) is read from: a file, read twice in bounded
/// memory (verified, then decrypted chunk by chunk), or bytes already in memory (a
/// fuzzer's input, a file received over a socket).
#[derive(Debug, Clone)]
pub enum Source {
    /// A file on disk.
    File(PathBuf),
    /// The whole file's bytes.
    Bytes(std::sync::Arc<[u8]>),
}

/// What a [`Source`] is read through.
pub(crate) trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

impl Source {
    /// A reader from the start, and the source's length.
    pub(crate) fn open(&self) -> std::io::Result<(Box<dyn ReadSeek>, u64)> {
        match self {
            Source::File(path) => {
                let file = File::open(path)?;
                let len = file.metadata()?.len();
                Ok((Box::new(file), len))
            }
            Source::Bytes(bytes) => Ok((
                Box::new(std::io::Cursor::new(bytes.clone())),
                bytes.len() as u64,
            )),
        }
    }
}

impl From<&Path> for Source {
    fn from(path: &Path) -> Self {
        Source::File(path.to_owned())
    }
}

impl From<&PathBuf> for Source {
    fn from(path: &PathBuf) -> Self {
        Source::File(path.clone())
    }
}

impl From<&[u8]> for Source {
    fn from(bytes: &[u8]) -> Self {
        Source::Bytes(bytes.into())
    }
}

/// The body of a file whose signed header holds; not yet checked.
pub(crate) struct UncheckedBody {
    file: Box<dyn ReadSeek>,
    file_len: u64,
    pub offset: u64,
}

/// Size cap → prefix → COSE_Sign1 signature. The signer's chain is the caller's to
/// validate, since the role it must hold differs per kind.
pub(crate) fn read_signed_head(
    source: &Source,
    layout: &Layout,
) -> Result<(SignedByChain, UncheckedBody)> {
    let (mut file, file_len) = source.open()?;
    if file_len > layout.max_file_len {
        return Err(FormatError::malformed(
            Malformed::TooLarge,
            format!("file larger than the {} size cap", layout.what),
        ));
    }
    let mut head = [0u8; prefix::LEN + 4];
    read_exact_or_truncated(&mut file, &mut head)?;
    prefix::check(&head, layout.kind, layout.version)?;
    let sign1_len = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if sign1_len > layout.max_sign1_len {
        return Err(FormatError::malformed(
            Malformed::Field,
            format!("signed header length {sign1_len} out of range"),
        ));
    }
    if u64::from(sign1_len) > file_len - head.len() as u64 {
        return Err(FormatError::malformed(
            Malformed::Truncated,
            "truncated inside the signed header",
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
            return Err(FormatError::malformed(
                Malformed::Truncated,
                format!("truncated: body has {actual} of {body_len} bytes"),
            ));
        }
        if actual > body_len {
            return Err(FormatError::malformed(
                Malformed::TrailingBytes,
                "trailing bytes after the body",
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
fn chunk_aad(label: &[u8], index: u64, last: bool) -> Vec<u8> {
    let mut aad = label.to_vec();
    aad.extend_from_slice(&index.to_be_bytes());
    aad.push(u8::from(last));
    aad
}

pub(crate) fn read_exact_or_truncated(r: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            FormatError::malformed(Malformed::Truncated, "truncated")
        }
        _ => FormatError::Io(e),
    })
}

/// The framing of a written body, for the signed header.
pub(crate) struct BodyFraming {
    pub chunks: u64,
    pub len: u64,
    pub sha256: Vec<u8>,
}

/// Where a body is kept while it is written: its length and digest go into the signed
/// header, which the file starts with, so the body is sealed into the spool first and
/// copied after the header. A temporary file for large files, memory for small ones.
pub trait Spool: Read + Write + Seek {}
impl<T: Read + Write + Seek> Spool for T {}

/// Where a large file is written: the file itself, and the spool its body is sealed
/// into first.
pub struct Output<'a> {
    /// What receives the finished file, in order.
    pub file: &'a mut dyn Write,
    /// Empty; holds the body until the signed header is made.
    pub spool: &'a mut dyn Spool,
}

/// Writes a file of `layout`'s kind to `out`: `write_body` streams the body through the
/// [`BodyWriter`] it is given (into the spool, which must be empty), `header` turns the
/// body's framing into the signed header's CBOR; then the prefix, the signed header and
/// the body are written to `out`. Where `out` lives and how it becomes durable is the
/// caller's (keyfab-node's `out_file`). Returns the file's length and the body's framing.
pub(crate) fn write_file(
    out: Output<'_>,
    layout: &Layout,
    sealer: hpke::Sealer,
    signer: &dyn EcdsaSigner,
    chain: &[Vec<u8>],
    write_body: impl FnOnce(&mut BodyWriter<'_>) -> Result<()>,
    header: impl FnOnce(&BodyFraming) -> Result<Vec<u8>>,
) -> Result<(u64, BodyFraming)> {
    // The writer borrows the spool; it is gone at the end of this block.
    let framing = {
        let mut body = BodyWriter {
            file: BufWriter::with_capacity(1 << 20, &mut *out.spool),
            sealer,
            label: layout.chunk_label,
            hasher: Sha256Stream::default(),
            len: 0,
            chunks: 0,
        };
        write_body(&mut body)?;
        body.file.flush()?;
        BodyFraming {
            chunks: body.chunks,
            len: body.len,
            sha256: body.hasher.finish().to_vec(),
        }
    };
    let header = header(&framing)?;
    let sign1 = cose::sign(signer, chain, layout.content_type, layout.context, header)?;
    let sign1_len = u32::try_from(sign1.len())
        .ok()
        .filter(|l| *l <= layout.max_sign1_len)
        .ok_or_else(|| FormatError::Write("signed header too large".into()))?;
    let (spool, mut out) = (out.spool, BufWriter::with_capacity(1 << 20, out.file));
    out.write_all(&prefix::encode(layout.kind, layout.version))?;
    out.write_all(&sign1_len.to_be_bytes())?;
    out.write_all(&sign1)?;
    spool.seek(SeekFrom::Start(0))?;
    let copied = std::io::copy(&mut spool.take(framing.len), &mut out)?;
    if copied != framing.len {
        return Err(FormatError::Write(
            "the spooled body came back short".into(),
        ));
    }
    out.flush()?;
    Ok((
        (prefix::LEN + 4 + sign1.len()) as u64 + framing.len,
        framing,
    ))
}

/// The body of a file being written: chunks sealed in order, each written as u32 BE
/// length ‖ ciphertext and hashed as written.
pub(crate) struct BodyWriter<'a> {
    file: BufWriter<&'a mut dyn Spool>,
    sealer: hpke::Sealer,
    label: &'static [u8],
    hasher: Sha256Stream,
    len: u64,
    chunks: u64,
}

impl BodyWriter<'_> {
    /// Seals `plain` as the next chunk; `last` marks the final one.
    pub(crate) fn seal(&mut self, plain: &[u8], last: bool) -> Result<()> {
        let ct = self
            .sealer
            .seal(plain, &chunk_aad(self.label, self.chunks, last))
            .map_err(|e| FormatError::Write(e.to_string()))?;
        let len = u32::try_from(ct.len())
            .map_err(|_| FormatError::Write("chunk too large".into()))?
            .to_be_bytes();
        self.hasher.update(&len);
        self.hasher.update(&ct);
        self.file.write_all(&len)?;
        self.file.write_all(&ct)?;
        self.len += 4 + ct.len() as u64;
        self.chunks += 1;
        Ok(())
    }
}

/// The sealed chunks of a verified file's body, opened one at a time in order.
pub(crate) struct ChunkReader {
    file: BufReader<Box<dyn ReadSeek>>,
    opener: hpke::Opener,
    label: &'static [u8],
    chunks: u64,
    next: u64,
}

impl ChunkReader {
    /// Reads `chunks` chunks from `source` at `offset` (where the verified body starts).
    pub(crate) fn open(
        source: &Source,
        offset: u64,
        layout: &Layout,
        opener: hpke::Opener,
        chunks: u64,
    ) -> Result<Self> {
        let (mut file, _) = source.open()?;
        file.seek(SeekFrom::Start(offset))?;
        Ok(Self {
            file: BufReader::with_capacity(1 << 20, file),
            opener,
            label: layout.chunk_label,
            chunks,
            next: 0,
        })
    }

    /// The index the next chunk will have.
    pub(crate) fn next_index(&self) -> u64 {
        self.next
    }

    /// The next chunk's plaintext, decrypted and authenticated, at most `max_plain`
    /// bytes; `None` after the last.
    pub(crate) fn next_chunk(&mut self, max_plain: usize) -> Result<Option<SecretBytes>> {
        if self.next >= self.chunks {
            return Ok(None);
        }
        let index = self.next;
        let mut len = [0u8; 4];
        read_exact_or_truncated(&mut self.file, &mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len < hpke::TAG_LEN || len - hpke::TAG_LEN > max_plain {
            return Err(FormatError::malformed(
                Malformed::Field,
                format!("chunk {index} length out of range"),
            ));
        }
        let mut ct = vec![0u8; len];
        read_exact_or_truncated(&mut self.file, &mut ct)?;
        let plain = self
            .opener
            .open(&ct, &chunk_aad(self.label, index, index + 1 == self.chunks))
            .map_err(|_| {
                FormatError::malformed(
                    Malformed::Undecryptable,
                    format!("chunk {index} does not decrypt"),
                )
            })?;
        self.next += 1;
        Ok(Some(plain))
    }
}
