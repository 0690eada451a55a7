//! The audit bundle `.kfa`: a site's audit records since its last export, for HQ.
//!
//! ```text
//! "KEYFAB" 'A' 0x01
//! u32 BE  n            length of the COSE_Sign1, at most 64 KiB
//! [n]     COSE_Sign1   ES256 by the site's service signing key, x5chain = [site signing
//!                      cert, site cluster cert], external_aad "keyfab-audit-v1",
//!                      payload = the signed header (CBOR, below)
//! body    chunks × (u32 BE length ‖ HPKE ciphertext); each chunk's plaintext is records,
//!         each behind a u32 BE length, at most 1 MiB per chunk
//! ```
//!
//! The signed header is the site's checkpoint (`to`), the head of its previous export
//! (`from`), the RFC 9162 consistency proof between them, and the body's length and
//! digest; so HQ authenticates every byte before it decrypts anything. HPKE is to HQ's
//! service key with `info` = ["keyfab-audit-bundle", 1, site, hq_cluster, recipient, id];
//! chunk `aad` = "keyfab-audit-chunk" ‖ index (u64 BE) ‖ last (u8).

use crate::checkpoint::TreeHead;
use crate::prefix::Kind;
use crate::signed_file;
use crate::Malformed;
use crate::{cbor_encode, cbor_exact, FormatError, Result, Verified};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::hpke::{self, HpkePublicKey, HpkeRecipient};
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::sign::EcdsaSigner;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{Role, ValidatedLeaf};
use serde::{Deserialize, Serialize};

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// The COSE external AAD: a signature made for another format never verifies as this one.
pub const CONTEXT: &[u8] = b"keyfab-audit-v1";
/// The COSE content type of the signed payload.
pub const CONTENT_TYPE: &str = "application/keyfab-audit-bundle+cbor";
const MAX_SIGN1_LEN: u32 = 64 * 1024;
const MAX_CHUNK: usize = 1024 * 1024;
/// A record larger than this is refused (records are a few hundred bytes).
pub const MAX_RECORD: usize = 64 * 1024;
/// Largest file accepted; anything longer is `malformed` (too large).
pub const MAX_FILE_LEN: u64 = 64 * 1024 * 1024 * 1024;

/// The signed header of a `.kfa`: everything security-relevant, in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleHeader {
    /// The format's name, checked on reading.
    pub format: String,
    /// The format's version (1).
    pub version: u32,
    /// 16 random bytes, hex.
    pub id: String,
    /// The site's name.
    pub site: String,
    /// HQ's cluster name.
    pub hq: String,
    /// Hex SHA-256 of HQ's cluster certificate.
    pub hq_cluster: String,
    /// Hex SHA-256 of the SubjectPublicKeyInfo of HQ's HPKE key.
    pub recipient: String,
    /// The head of the site's previous export (size 0: none).
    pub from: TreeHead,
    /// The site's checkpoint: its log after these records.
    pub to: TreeHead,
    /// When the site made the checkpoint (its trusted time).
    pub checkpoint_time: i64,
    /// RFC 9162 consistency proof from `from` to `to`.
    pub consistency: Vec<serde_bytes::ByteBuf>,
    /// When it was made (Unix seconds, its maker's clock).
    pub created_at: i64,
    /// The HPKE encapsulated key the body is sealed under.
    #[serde(with = "serde_bytes")]
    pub enc: Vec<u8>,
    /// How many sealed chunks the body has.
    pub chunks: u64,
    /// The body's length in bytes.
    pub body_len: u64,
    /// SHA-256 of the body as written: checked before any chunk is opened.
    #[serde(with = "serde_bytes")]
    pub body_sha256: Vec<u8>,
}

const LAYOUT: signed_file::Layout = signed_file::Layout {
    kind: Kind::AuditBundle,
    version: VERSION,
    what: "bundle",
    max_file_len: MAX_FILE_LEN,
    max_sign1_len: MAX_SIGN1_LEN,
    content_type: CONTENT_TYPE,
    context: CONTEXT,
    chunk_label: b"keyfab-audit-chunk",
};

fn hpke_info(site: &str, hq_cluster: &str, recipient: &str, id: &str) -> Result<Vec<u8>> {
    cbor_encode(&(
        "keyfab-audit-bundle",
        u32::from(VERSION),
        site,
        hq_cluster,
        recipient,
        id,
    ))
}

/// Everything of the header but the body's framing, which the writer fills in.
pub struct BundleFields {
    /// The file's id: 16 random bytes, hex.
    pub id: String,
    /// The site's name.
    pub site: String,
    /// HQ's cluster name.
    pub hq: String,
    /// SHA-256 of HQ's cluster certificate.
    pub hq_cluster: Fingerprint,
    /// Hex SHA-256 of the SubjectPublicKeyInfo of the recipient's HPKE key.
    pub recipient: HpkePublicKey,
    /// The head of the site's previous export (size 0: none).
    pub from: TreeHead,
    /// The site's checkpoint: its log after these records.
    pub to: TreeHead,
    /// When the site made the checkpoint (its trusted time).
    pub checkpoint_time: i64,
    /// RFC 9162 consistency proof from `from` to `to`.
    pub consistency: Vec<[u8; 32]>,
    /// When it is made (its maker's clock).
    pub created_at: UnixTime,
}

/// Streams a bundle to `out`: the records are read from `records` one at a time, and a
/// record that cannot be read stops the export. The body is sealed into `spool` (empty),
/// then header and body are written to `out`.
pub fn write_bundle(
    out: signed_file::Output<'_>,
    fields: &BundleFields,
    records: &mut dyn Iterator<Item = std::io::Result<Vec<u8>>>,
    signer: &dyn EcdsaSigner,
    chain: Vec<Vec<u8>>,
    rng: &dyn SecureRng,
) -> Result<u64> {
    let recipient = fields.recipient.fingerprint().to_hex();
    let hq_cluster = fields.hq_cluster.to_hex();
    let info = hpke_info(&fields.site, &hq_cluster, &recipient, &fields.id)?;
    let (enc, sealer) = hpke::seal_context(&fields.recipient, &info, rng)
        .map_err(|e| FormatError::Write(e.to_string()))?;
    let write_body = |body: &mut signed_file::BodyWriter<'_>| -> Result<()> {
        // A chunk is sealed only when the next one starts (or at the end), so the last
        // one can be marked as such.
        let mut pending: Option<Vec<u8>> = None;
        let mut current = Vec::with_capacity(MAX_CHUNK);
        for r in records {
            let r = r?;
            if r.len() > MAX_RECORD {
                return Err(FormatError::Write("audit record too large".into()));
            }
            if current.len() + 4 + r.len() > MAX_CHUNK {
                if let Some(p) = pending.take() {
                    body.seal(&p, false)?;
                }
                pending = Some(std::mem::take(&mut current));
            }
            current.extend_from_slice(&(r.len() as u32).to_be_bytes());
            current.extend_from_slice(&r);
        }
        if let Some(p) = pending.take() {
            body.seal(&p, false)?;
        }
        body.seal(&current, true)
    };
    let header = |framing: &signed_file::BodyFraming| {
        cbor_encode(&BundleHeader {
            format: "keyfab-audit-bundle".into(),
            version: u32::from(VERSION),
            id: fields.id.clone(),
            site: fields.site.clone(),
            hq: fields.hq.clone(),
            hq_cluster: hq_cluster.clone(),
            recipient: recipient.clone(),
            from: fields.from,
            to: fields.to,
            checkpoint_time: fields.checkpoint_time,
            consistency: fields
                .consistency
                .iter()
                .map(|h| serde_bytes::ByteBuf::from(h.to_vec()))
                .collect(),
            created_at: fields.created_at.0,
            enc: enc.clone(),
            chunks: framing.chunks,
            body_len: framing.len,
            body_sha256: framing.sha256.clone(),
        })
    };
    let (len, _) =
        signed_file::write_file(out, &LAYOUT, sealer, signer, &chain, write_body, header)?;
    Ok(len)
}

/// A bundle whose signature, signer chain (role site), addressing and body digest hold.
#[derive(Debug)]
pub struct BundleEnvelope {
    /// The signed header.
    pub header: BundleHeader,
    /// The signer's certificate, validated to the root for its role.
    pub signer: ValidatedLeaf,
    /// The signer's chain: [site signing cert, site cluster cert].
    pub chain: Vec<Vec<u8>>,
    source: signed_file::Source,
    body_offset: u64,
}

/// Verifies a bundle in the verification order of docs/FORMATS.md: size cap → prefix →
/// signature → chain to `root` with role site → addressed to this HQ → body digest.
pub fn verify_bundle(
    source: impl Into<signed_file::Source>,
    root: &[u8],
    now: UnixTime,
    hq: &str,
    recipients: &[Fingerprint],
) -> Result<Verified<BundleEnvelope>> {
    let source = source.into();
    let (signed, body) = signed_file::read_signed_head(&source, &LAYOUT)?;
    let (signer, proof) = crate::verified::signer(&signed, root, Role::Site, now)?;
    let header: BundleHeader = cbor_exact("audit bundle header", &signed.payload)?;
    if header.format != "keyfab-audit-bundle" || header.version != u32::from(VERSION) {
        return Err(FormatError::malformed(
            Malformed::Field,
            "header format/version",
        ));
    }
    if header.site != signer.cluster_name {
        return Err(FormatError::UntrustedSigner(
            "bundle names another site than its signer".into(),
        ));
    }
    if header.hq != hq || !recipients.iter().any(|r| header.recipient == r.to_hex()) {
        return Err(FormatError::WrongRecipient(format!(
            "addressed to HQ '{}', this is '{hq}'",
            header.hq
        )));
    }
    if header.consistency.iter().any(|h| h.len() != 32) || header.to.size < header.from.size {
        return Err(FormatError::malformed(
            Malformed::Field,
            "checkpoint or consistency proof malformed",
        ));
    }
    let body_offset = body.offset;
    body.check(header.body_len, &header.body_sha256)?;
    Ok(Verified::new(
        proof,
        BundleEnvelope {
            header,
            signer,
            chain: signed.chain,
            source,
            body_offset,
        },
    ))
}

/// Reads the records of a verified bundle, decrypting one chunk at a time.
pub struct RecordReader {
    chunks: signed_file::ChunkReader,
    plain: Vec<u8>,
    at: usize,
}

/// Opens the verified bundle's body with HQ's HPKE key: its records, chunk by chunk.
pub fn open_bundle(
    envelope: &Verified<BundleEnvelope>,
    recipient: &dyn HpkeRecipient,
) -> Result<RecordReader> {
    let h = &envelope.header;
    let info = hpke_info(&h.site, &h.hq_cluster, &h.recipient, &h.id)?;
    let opener = recipient.open_context(&h.enc, &info).map_err(|_| {
        FormatError::malformed(Malformed::Undecryptable, "cannot set up decryption")
    })?;
    let chunks = signed_file::ChunkReader::open(
        &envelope.source,
        envelope.body_offset,
        &LAYOUT,
        opener,
        h.chunks,
    )?;
    Ok(RecordReader {
        chunks,
        plain: Vec::new(),
        at: 0,
    })
}

impl RecordReader {
    /// The next chunk's plaintext, decrypted and authenticated; `None` after the last.
    fn read_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(self
            .chunks
            .next_chunk(MAX_CHUNK)?
            .map(|plain| plain.expose().to_vec()))
    }

    /// The next chunk of records, whole; `None` after the last.
    pub fn next_chunk(&mut self) -> Result<Option<RecordChunk>> {
        Ok(self.read_chunk()?.map(|plain| RecordChunk { plain }))
    }

    /// The next record's bytes, or `None` after the last (and the body is exhausted).
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>> {
        while self.at >= self.plain.len() {
            match self.read_chunk()? {
                Some(plain) => {
                    self.plain = plain;
                    self.at = 0;
                }
                None => return Ok(None),
            }
        }
        let mut records = ChunkRecords {
            rest: &self.plain[self.at..],
        };
        let record = records.split_next()?;
        self.at += 4 + record.len();
        Ok(Some(record.to_vec()))
    }
}

/// One decrypted chunk: its records, each behind a u32 BE length. That is also the
/// layout of HQ's stored audit rows, so a chunk can be kept as it is.
pub struct RecordChunk {
    plain: Vec<u8>,
}

impl RecordChunk {
    /// The records, in order; an error for a length that is cut or too large.
    pub fn records(&self) -> ChunkRecords<'_> {
        ChunkRecords { rest: &self.plain }
    }

    /// The opened body's bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.plain
    }
}

/// The records of a [`RecordChunk`].
pub struct ChunkRecords<'a> {
    rest: &'a [u8],
}

impl<'a> ChunkRecords<'a> {
    fn split_next(&mut self) -> Result<&'a [u8]> {
        let (len, tail) = self
            .rest
            .split_at_checked(4)
            .ok_or_else(|| FormatError::malformed(Malformed::Truncated, "record length cut"))?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > MAX_RECORD {
            return Err(FormatError::malformed(
                Malformed::TooLarge,
                "record too large",
            ));
        }
        let (record, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| FormatError::malformed(Malformed::Truncated, "record cut"))?;
        self.rest = tail;
        Ok(record)
    }
}

impl<'a> Iterator for ChunkRecords<'a> {
    type Item = Result<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let next = self.split_next();
        if next.is_err() {
            // One error ends the iteration.
            self.rest = &[];
        }
        Some(next)
    }
}
