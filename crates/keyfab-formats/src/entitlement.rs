//! The entitlement file `.kfe`: HQ → site, signed outer, encrypted inner, streamed.
//!
//! ```text
//! "KEYFAB" 'E' 0x01
//! u32 BE  n            length of the COSE_Sign1, at most 64 KiB
//! [n]     COSE_Sign1   ES256 by HQ's service signing key, x5chain = [HQ signing cert,
//!                      HQ cluster cert], external_aad "keyfab-entitlement-v1",
//!                      payload = the signed header (CBOR): ids, sequence, recipient,
//!                      HPKE enc, chunk count, body length and SHA-256 of the body
//! body    chunks × (u32 BE length ‖ HPKE ciphertext)
//!           chunk 0: CBOR content (policy, batch CA, secrets, pool layout)
//!           chunk 1..: pool key secrets, 32 bytes each, at most keys_per_chunk per chunk,
//!                      one key spec after another, never mixing two specs in a chunk
//! ```
//!
//! Every chunk is sealed with one HPKE context (info binds format, version, HQ and site)
//! and `aad = "keyfab-entitlement-chunk" ‖ index (u64 BE) ‖ last (u8)`, so chunks cannot be
//! reordered, dropped or cut short. The body digest in the signed header lets the site
//! authenticate every byte before decrypting anything; the signature covers `enc`, so
//! only the signer can have made chunks that decrypt.

use crate::prefix::{self, Kind};
use crate::signed_file;
use crate::{cbor_encode, cbor_exact, cose, FormatError, Result, Verified};
use keyfab_crypto::hash::{Fingerprint, Sha256Stream};
use keyfab_crypto::hpke::{self, HpkePublicKey, HpkeRecipient};
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::sign::EcdsaSigner;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Purpose, Role, ValidatedLeaf};
use keyfab_policy::{KeySource, KeyType, Policy};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, ZeroizeOnDrop};

pub const VERSION: u8 = 1;
pub const CONTEXT: &[u8] = b"keyfab-entitlement-v1";
pub const CONTENT_TYPE: &str = "application/keyfab-entitlement+cbor";
pub const MAX_SIGN1_LEN: u32 = 64 * 1024;
pub const MAX_CONTENT_CHUNK: u32 = 1024 * 1024;
/// Upper bound on a whole file (100 M devices × a few pool keys fits well below).
pub const MAX_FILE_LEN: u64 = 64 * 1024 * 1024 * 1024;
pub const KEY_LEN: usize = keyfab_crypto::devicekey::SECRET_LEN;
pub const DEFAULT_KEYS_PER_CHUNK: u32 = 2048;
const MAX_KEYS_PER_CHUNK: u32 = 65_536;

/// The signed header: everything security-relevant about the file, in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitlementHeader {
    pub format: String,
    pub version: u32,
    /// 16 random bytes, hex.
    pub id: String,
    /// Per-site sequence number; a site accepts only increasing ones.
    pub sequence: u64,
    /// HQ cluster name and SHA-256 of its cluster certificate.
    pub hq: String,
    pub hq_cluster: String,
    pub site: String,
    /// SHA-256 of the SubjectPublicKeyInfo of the site's HPKE key.
    pub recipient: String,
    pub created_at: i64,
    #[serde(with = "serde_bytes")]
    pub enc: Vec<u8>,
    pub chunks: u64,
    pub body_len: u64,
    #[serde(with = "serde_bytes")]
    pub body_sha256: Vec<u8>,
}

/// How many pool keys of one key spec the file carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub key: String,
    pub key_type: KeyType,
    pub count: u64,
}

/// Secrets of the content, wiped on drop and never printed.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
pub struct ContentSecrets {
    /// PKCS#8 of the batch CA key.
    #[serde(with = "serde_bytes")]
    pub batch_ca_key: Vec<u8>,
    /// 32-byte master secret for `derived` keys.
    #[serde(with = "serde_bytes")]
    pub master_secret: Vec<u8>,
}

/// Chunk 0: what the site needs besides the pool keys. Identity fields repeat the
/// header's, so stripping the signature and re-signing is detected.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitlementContent {
    pub id: String,
    pub sequence: u64,
    pub hq: String,
    pub hq_cluster: String,
    pub site: String,
    pub created_at: i64,
    pub policy: Policy,
    #[serde(with = "serde_bytes")]
    pub batch_ca_cert: Vec<u8>,
    pub secrets: ContentSecrets,
    pub pool: Vec<PoolSpec>,
    pub keys_per_chunk: u32,
    /// HQ's last accepted checkpoint of this site's audit log, if any: a site whose log
    /// is behind or inconsistent with it was rolled back (DESIGN.md, tier B).
    pub acknowledged: Option<crate::checkpoint::TreeHead>,
    /// HQ's HPKE service certificate: what the site encrypts its audit exports to. The
    /// site checks it against its root (role hq, key agreement) before keeping it.
    #[serde(with = "serde_bytes")]
    pub hq_hpke_cert: Vec<u8>,
}

/// One pool chunk: keys `first .. first + count` of pool spec `spec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub index: u64,
    pub spec: usize,
    pub first: u64,
    pub count: u64,
}

/// The pool chunks of a layout, in file order (chunk 0, the content, is not included).
pub fn chunk_plan(pool: &[PoolSpec], keys_per_chunk: u32) -> impl Iterator<Item = ChunkRef> + '_ {
    let kpc = u64::from(keys_per_chunk.max(1));
    let mut index = 0u64;
    pool.iter()
        .enumerate()
        .flat_map(move |(spec, p)| {
            (0..p.count.div_ceil(kpc)).map(move |i| (spec, i * kpc, kpc.min(p.count - i * kpc)))
        })
        .map(move |(spec, first, count)| {
            index += 1;
            ChunkRef {
                index,
                spec,
                first,
                count,
            }
        })
}

fn chunk_aad(index: u64, last: bool) -> Vec<u8> {
    signed_file::chunk_aad(b"keyfab-entitlement-chunk", index, last)
}
const LAYOUT: signed_file::Layout = signed_file::Layout {
    kind: Kind::Entitlement,
    version: VERSION,
    what: "entitlement",
    max_file_len: MAX_FILE_LEN,
    max_sign1_len: MAX_SIGN1_LEN,
    content_type: CONTENT_TYPE,
    context: CONTEXT,
};

/// HPKE `info`: format, version, HQ identity and site identity.
pub fn hpke_info(hq_cluster: &str, site: &str, recipient: &str, id: &str) -> Result<Vec<u8>> {
    cbor_encode(&(
        "keyfab-entitlement",
        u32::from(VERSION),
        hq_cluster,
        site,
        recipient,
        id,
    ))
}

/// Who sends the entitlement, and to whom.
pub struct Addressing<'a> {
    pub id: String,
    pub sequence: u64,
    pub hq: String,
    pub hq_cluster: Fingerprint,
    pub site: String,
    pub recipient: &'a HpkePublicKey,
    pub created_at: UnixTime,
}

/// Result of writing a file.
#[derive(Debug, Clone, Copy)]
pub struct WriteSummary {
    pub bytes: u64,
    pub chunks: u64,
}

/// Streams an entitlement to `out`. `fill` is called once per pool chunk, in order, and
/// must append `count × 32` secret bytes for that chunk; only one chunk is in memory at
/// a time. The file appears at `out` complete or not at all.
pub fn write_entitlement(
    out: &Path,
    addressing: &Addressing<'_>,
    content: &EntitlementContent,
    fill: &mut dyn FnMut(ChunkRef, &mut SecretBytes) -> Result<()>,
    signer: &dyn EcdsaSigner,
    chain: Vec<Vec<u8>>,
    rng: &dyn SecureRng,
) -> Result<WriteSummary> {
    let recipient_fp = addressing.recipient.fingerprint().to_hex();
    let hq_cluster = addressing.hq_cluster.to_hex();
    let info = hpke_info(&hq_cluster, &addressing.site, &recipient_fp, &addressing.id)?;
    let (enc, mut sealer) = hpke::seal_context(addressing.recipient, &info, rng)
        .map_err(|e| FormatError::Write(e.to_string()))?;

    let plan: Vec<ChunkRef> = chunk_plan(&content.pool, content.keys_per_chunk).collect();
    let chunks = plan.len() as u64 + 1;
    let body_path = temp_path(out, "body");
    let mut hasher = Sha256Stream::default();
    let mut body_len = 0u64;
    {
        let mut body = BufWriter::with_capacity(1 << 20, File::create(&body_path)?);
        let mut emit = |ct: &[u8]| -> Result<()> {
            let len = u32::try_from(ct.len())
                .map_err(|_| FormatError::Write("chunk too large".into()))?;
            let len = len.to_be_bytes();
            hasher.update(&len);
            hasher.update(ct);
            body.write_all(&len)?;
            body.write_all(ct)?;
            body_len += 4 + ct.len() as u64;
            Ok(())
        };
        let mut first = SecretBytes::new(cbor_encode(content)?);
        let ct = sealer
            .seal(first.expose(), &chunk_aad(0, chunks == 1))
            .map_err(|e| FormatError::Write(e.to_string()))?;
        first.expose_mut().zeroize();
        emit(&ct)?;
        let mut buf = SecretBytes::default();
        for c in &plan {
            buf.expose_mut().clear();
            fill(*c, &mut buf)?;
            if buf.len() as u64 != c.count * KEY_LEN as u64 {
                return Err(FormatError::Write("pool chunk has the wrong size".into()));
            }
            let ct = sealer
                .seal(buf.expose(), &chunk_aad(c.index, c.index + 1 == chunks))
                .map_err(|e| FormatError::Write(e.to_string()))?;
            emit(&ct)?;
        }
        body.flush()?;
    }
    let header = EntitlementHeader {
        format: "keyfab-entitlement".into(),
        version: u32::from(VERSION),
        id: addressing.id.clone(),
        sequence: addressing.sequence,
        hq: addressing.hq.clone(),
        hq_cluster,
        site: addressing.site.clone(),
        recipient: recipient_fp,
        created_at: addressing.created_at.0,
        enc,
        chunks,
        body_len,
        body_sha256: hasher.finish().to_vec(),
    };
    let sign1 = cose::sign(signer, &chain, CONTENT_TYPE, CONTEXT, cbor_encode(&header)?)?;
    let sign1_len = u32::try_from(sign1.len())
        .ok()
        .filter(|l| *l <= MAX_SIGN1_LEN)
        .ok_or_else(|| FormatError::Write("signed header too large".into()))?;
    let final_tmp = temp_path(out, "part");
    let result = (|| -> Result<u64> {
        let mut f = BufWriter::with_capacity(1 << 20, File::create(&final_tmp)?);
        f.write_all(&prefix::encode(Kind::Entitlement, VERSION))?;
        f.write_all(&sign1_len.to_be_bytes())?;
        f.write_all(&sign1)?;
        std::io::copy(&mut File::open(&body_path)?, &mut f)?;
        let file = f
            .into_inner()
            .map_err(|e| FormatError::Io(e.into_error()))?;
        file.sync_all()?;
        std::fs::rename(&final_tmp, out)?;
        Ok((prefix::LEN + 4 + sign1.len()) as u64 + body_len)
    })();
    let _ = std::fs::remove_file(&body_path);
    if result.is_err() {
        let _ = std::fs::remove_file(&final_tmp);
    }
    Ok(WriteSummary {
        bytes: result?,
        chunks,
    })
}

pub(crate) fn temp_path(out: &Path, what: &str) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{what}.tmp"));
    out.with_file_name(name)
}

/// A verified (signed, trusted, addressed to us, body intact) but still encrypted file.
#[derive(Debug)]
pub struct EntitlementEnvelope {
    pub header: EntitlementHeader,
    pub signer: ValidatedLeaf,
    /// The signer's chain as carried in x5chain: [HQ signing cert, HQ cluster cert].
    pub chain: Vec<Vec<u8>>,
    path: PathBuf,
    body_offset: u64,
}

/// Verifies `path` in the order of DESIGN.md invariant 1: size cap → prefix → signature
/// over the exact bytes → chain to `root` with role hq → recipient → body digest. Nothing
/// beyond the COSE framing is parsed before the signature holds, and nothing is
/// decrypted before every byte is authenticated.
pub fn verify_entitlement(
    path: &Path,
    root: &[u8],
    now: UnixTime,
    site: &str,
    recipients: &[Fingerprint],
) -> Result<Verified<EntitlementEnvelope>> {
    let (signed, body) = signed_file::read_signed_head(path, &LAYOUT)?;
    let signer = x509::validate_chain(root, &signed.chain, Role::Hq, Purpose::Signing, now)
        .map_err(FormatError::from_chain)?;
    let header: EntitlementHeader = cbor_exact("entitlement header", &signed.payload)?;
    if header.format != "keyfab-entitlement" || header.version != u32::from(VERSION) {
        return Err(FormatError::Malformed("header format/version".into()));
    }
    if header.hq != signer.cluster_name
        || header.hq_cluster != Fingerprint::of(&signed.chain[1]).to_hex()
    {
        return Err(FormatError::UntrustedSigner(
            "header names another HQ than the one that signed it".into(),
        ));
    }
    if header.site != site || !recipients.iter().any(|r| header.recipient == r.to_hex()) {
        return Err(FormatError::WrongRecipient(format!(
            "addressed to site '{}' (key {}), this is '{site}' (keys {})",
            header.site,
            short(&header.recipient),
            recipients
                .iter()
                .map(|r| short(&r.to_hex()).to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let body_offset = body.offset;
    body.check(header.body_len, &header.body_sha256)?;
    Ok(Verified::new(EntitlementEnvelope {
        header,
        signer,
        chain: signed.chain,
        path: path.to_owned(),
        body_offset,
    }))
}

fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

pub(crate) fn read_exact_or_truncated(r: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FormatError::Malformed("truncated".into()),
        _ => FormatError::Io(e),
    })
}

/// Decrypts the content of a verified entitlement and checks it against the signed
/// header and itself; returns it with a reader for the pool chunks.
pub fn open_entitlement(
    envelope: &Verified<EntitlementEnvelope>,
    recipient: &dyn HpkeRecipient,
) -> Result<(EntitlementContent, PoolReader)> {
    let h = &envelope.header;
    let info = hpke_info(&h.hq_cluster, &h.site, &h.recipient, &h.id)?;
    let opener = recipient
        .open_context(&h.enc, &info)
        .map_err(|_| FormatError::Malformed("cannot set up decryption".into()))?;
    let mut file = File::open(&envelope.path)?;
    file.seek(SeekFrom::Start(envelope.body_offset))?;
    let mut reader = PoolReader {
        file: BufReader::with_capacity(1 << 20, file),
        opener,
        plan: Vec::new().into_iter(),
        chunks: h.chunks,
    };
    let first = reader.next_sealed(0, MAX_CONTENT_CHUNK)?;
    let content: EntitlementContent = cbor_exact("entitlement content", first.expose())?;
    if content.id != h.id
        || content.sequence != h.sequence
        || content.hq != h.hq
        || content.hq_cluster != h.hq_cluster
        || content.site != h.site
        || content.created_at != h.created_at
    {
        return Err(FormatError::BadSignature(
            "encrypted identity differs from the signed header".into(),
        ));
    }
    content
        .policy
        .validate()
        .map_err(|e| FormatError::Malformed(e.to_string()))?;
    let expected: Vec<PoolSpec> = content
        .policy
        .keys_from(KeySource::HqPool)
        .map(|k| PoolSpec {
            key: k.name.clone(),
            key_type: k.key_type,
            count: content.policy.devices,
        })
        .collect();
    if content.pool != expected {
        return Err(FormatError::Malformed(
            "pool layout does not match the policy".into(),
        ));
    }
    if content.keys_per_chunk == 0 || content.keys_per_chunk > MAX_KEYS_PER_CHUNK {
        return Err(FormatError::Malformed("keys_per_chunk out of range".into()));
    }
    if content.secrets.master_secret.len() != 32 {
        return Err(FormatError::Malformed("master secret length".into()));
    }
    let plan: Vec<ChunkRef> = chunk_plan(&content.pool, content.keys_per_chunk).collect();
    if plan.len() as u64 + 1 != h.chunks {
        return Err(FormatError::Malformed(
            "chunk count does not match the pool layout".into(),
        ));
    }
    reader.plan = plan.into_iter();
    Ok((content, reader))
}

/// Yields the pool chunks of an opened entitlement, one at a time.
pub struct PoolReader {
    file: BufReader<File>,
    opener: hpke::Opener,
    plan: std::vec::IntoIter<ChunkRef>,
    chunks: u64,
}

impl PoolReader {
    fn next_sealed(&mut self, index: u64, max_plain: u32) -> Result<SecretBytes> {
        let mut len = [0u8; 4];
        read_exact_or_truncated(&mut self.file, &mut len)?;
        let len = u32::from_be_bytes(len);
        if len < hpke::TAG_LEN as u32 || len - hpke::TAG_LEN as u32 > max_plain {
            return Err(FormatError::Malformed(format!(
                "chunk {index} length out of range"
            )));
        }
        let mut ct = vec![0u8; len as usize];
        read_exact_or_truncated(&mut self.file, &mut ct)?;
        self.opener
            .open(&ct, &chunk_aad(index, index + 1 == self.chunks))
            .map_err(|_| FormatError::Malformed(format!("chunk {index} does not decrypt")))
    }

    /// The next chunk and its secrets (`count × 32` bytes), or `None` after the last.
    pub fn next_chunk(&mut self) -> Result<Option<(ChunkRef, SecretBytes)>> {
        let Some(c) = self.plan.next() else {
            return Ok(None);
        };
        let want = c.count * KEY_LEN as u64;
        let plain = self.next_sealed(c.index, want as u32)?;
        if plain.len() as u64 != want {
            return Err(FormatError::Malformed(format!(
                "chunk {} has the wrong size",
                c.index
            )));
        }
        Ok(Some((c, plain)))
    }
}
