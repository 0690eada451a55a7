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

use crate::prefix::Kind;
use crate::signed_file;
use crate::Malformed;
use crate::{cbor_encode, cbor_exact, FormatError, Result, Verified};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::hpke::{self, HpkePublicKey, HpkeRecipient};
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::sign::EcdsaSigner;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{Role, ValidatedLeaf};
use keyfab_policy::{KeySource, KeyType, Policy};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// The COSE external AAD: a signature made for another format never verifies as this one.
pub const CONTEXT: &[u8] = b"keyfab-entitlement-v1";
/// The COSE content type of the signed payload.
pub const CONTENT_TYPE: &str = "application/keyfab-entitlement+cbor";
/// Largest signed header accepted.
pub const MAX_SIGN1_LEN: u32 = 64 * 1024;
/// Largest content chunk accepted.
pub const MAX_CONTENT_CHUNK: u32 = 1024 * 1024;
/// Upper bound on a whole file (100 M devices × a few pool keys fits well below).
pub const MAX_FILE_LEN: u64 = 64 * 1024 * 1024 * 1024;
/// Length of each pool key's secret.
pub const KEY_LEN: usize = keyfab_crypto::devicekey::SECRET_LEN;
/// The device key type a policy's key type names: one mapping for HQ's pool and the
/// site's keys alike.
pub fn device_key_type(t: KeyType) -> keyfab_crypto::devicekey::DeviceKeyType {
    use keyfab_crypto::devicekey::DeviceKeyType;
    match t {
        KeyType::EcP256 => DeviceKeyType::EcP256,
        KeyType::EcP384 => DeviceKeyType::EcP384,
        KeyType::Ed25519 => DeviceKeyType::Ed25519,
        KeyType::Rsa2048 => DeviceKeyType::Rsa2048,
        KeyType::Rsa3072 => DeviceKeyType::Rsa3072,
        KeyType::Aes256 => DeviceKeyType::Aes256,
    }
}

/// Pool keys per chunk unless the writer says otherwise.
pub const DEFAULT_KEYS_PER_CHUNK: u32 = 2048;
const MAX_KEYS_PER_CHUNK: u32 = 65_536;

/// The signed header: everything security-relevant about the file, in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitlementHeader {
    /// The format's name, checked on reading.
    pub format: String,
    /// The format's version (1).
    pub version: u32,
    /// 16 random bytes, hex.
    pub id: String,
    /// Per-site sequence number; a site accepts only increasing ones.
    pub sequence: u64,
    /// HQ cluster name and SHA-256 of its cluster certificate.
    pub hq: String,
    /// Hex SHA-256 of HQ's cluster certificate.
    pub hq_cluster: String,
    /// The site's name.
    pub site: String,
    /// SHA-256 of the SubjectPublicKeyInfo of the site's HPKE key.
    pub recipient: String,
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

/// How many pool keys of one key spec the file carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// The key spec's name.
    pub key: String,
    /// Its type.
    pub key_type: KeyType,
    /// How many keys.
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
    /// The file's id: 16 random bytes, hex.
    pub id: String,
    /// Per-site sequence number; a site accepts only increasing ones.
    pub sequence: u64,
    /// HQ's cluster name.
    pub hq: String,
    /// Hex SHA-256 of HQ's cluster certificate.
    pub hq_cluster: String,
    /// The site's name.
    pub site: String,
    /// When it was made (Unix seconds, its maker's clock).
    pub created_at: i64,
    /// The policy the site enforces.
    pub policy: Policy,
    /// The batch CA's certificate (DER): it issues the device certificates.
    #[serde(with = "serde_bytes")]
    pub batch_ca_cert: Vec<u8>,
    /// The batch CA key and the master secret.
    pub secrets: ContentSecrets,
    /// The pool keys the file carries, per key spec.
    pub pool: Vec<PoolSpec>,
    /// Pool keys per chunk.
    pub keys_per_chunk: u32,
    /// HQ's last accepted checkpoint of this site's audit log, if any: a site whose log
    /// is behind or inconsistent with it was rolled back (tier B of docs/THREAT-MODEL.md's rollback row).
    pub acknowledged: Option<crate::checkpoint::TreeHead>,
    /// HQ's HPKE service certificate: what the site encrypts its audit exports to. The
    /// site checks it against its root (role hq, key agreement) before keeping it.
    #[serde(with = "serde_bytes")]
    pub hq_hpke_cert: Vec<u8>,
}

/// One pool chunk: keys `first .. first + count` of pool spec `spec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// The chunk's index in the file (1 is the first pool chunk).
    pub index: u64,
    /// Which pool spec.
    pub spec: usize,
    /// The first key's index within the spec.
    pub first: u64,
    /// How many keys.
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

const LAYOUT: signed_file::Layout = signed_file::Layout {
    kind: Kind::Entitlement,
    version: VERSION,
    what: "entitlement",
    max_file_len: MAX_FILE_LEN,
    max_sign1_len: MAX_SIGN1_LEN,
    content_type: CONTENT_TYPE,
    context: CONTEXT,
    chunk_label: b"keyfab-entitlement-chunk",
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
    /// The file's id: 16 random bytes, hex.
    pub id: String,
    /// Per-site sequence number; a site accepts only increasing ones.
    pub sequence: u64,
    /// HQ's cluster name.
    pub hq: String,
    /// SHA-256 of HQ's cluster certificate.
    pub hq_cluster: Fingerprint,
    /// The site's name.
    pub site: String,
    /// Hex SHA-256 of the SubjectPublicKeyInfo of the recipient's HPKE key.
    pub recipient: &'a HpkePublicKey,
    /// When it is made (its maker's clock).
    pub created_at: UnixTime,
}

/// Result of writing a file.
#[derive(Debug, Clone, Copy)]
pub struct WriteSummary {
    /// Bytes written.
    pub bytes: u64,
    /// How many sealed chunks the body has.
    pub chunks: u64,
}

/// Streams an entitlement to `out`. `fill` is called once per pool chunk, in order, and
/// must append `count × 32` secret bytes for that chunk; only one chunk is in memory at
/// a time. The body is sealed into `spool` (empty; a temporary file for a large
/// entitlement), then header and body are written to `out`.
pub fn write_entitlement(
    out: signed_file::Output<'_>,
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
    let (enc, sealer) = hpke::seal_context(addressing.recipient, &info, rng)
        .map_err(|e| FormatError::Write(e.to_string()))?;

    let plan: Vec<ChunkRef> = chunk_plan(&content.pool, content.keys_per_chunk).collect();
    let chunks = plan.len() as u64 + 1;
    let write_body = |body: &mut signed_file::BodyWriter<'_>| -> Result<()> {
        let first = SecretBytes::new(cbor_encode(content)?);
        body.seal(first.expose(), chunks == 1)?;
        let mut buf = SecretBytes::default();
        for c in &plan {
            buf.expose_mut().clear();
            fill(*c, &mut buf)?;
            if buf.len() as u64 != c.count * KEY_LEN as u64 {
                return Err(FormatError::Write("pool chunk has the wrong size".into()));
            }
            body.seal(buf.expose(), c.index + 1 == chunks)?;
        }
        Ok(())
    };
    let header = |framing: &signed_file::BodyFraming| {
        cbor_encode(&EntitlementHeader {
            format: "keyfab-entitlement".into(),
            version: u32::from(VERSION),
            id: addressing.id.clone(),
            sequence: addressing.sequence,
            hq: addressing.hq.clone(),
            hq_cluster: hq_cluster.clone(),
            site: addressing.site.clone(),
            recipient: recipient_fp.clone(),
            created_at: addressing.created_at.0,
            enc: enc.clone(),
            chunks: framing.chunks,
            body_len: framing.len,
            body_sha256: framing.sha256.clone(),
        })
    };
    let (bytes, framing) =
        signed_file::write_file(out, &LAYOUT, sealer, signer, &chain, write_body, header)?;
    Ok(WriteSummary {
        bytes,
        chunks: framing.chunks,
    })
}

/// A verified (signed, trusted, addressed to us, body intact) but still encrypted file.
#[derive(Debug)]
pub struct EntitlementEnvelope {
    /// The signed header.
    pub header: EntitlementHeader,
    /// The signer's certificate, validated to the root for its role.
    pub signer: ValidatedLeaf,
    /// The signer's chain as carried in x5chain: [HQ signing cert, HQ cluster cert].
    pub chain: Vec<Vec<u8>>,
    source: signed_file::Source,
    body_offset: u64,
}

/// Verifies `path` in the verification order of docs/FORMATS.md: size cap → prefix → signature
/// over the exact bytes → chain to `root` with role hq → recipient → body digest. Nothing
/// beyond the COSE framing is parsed before the signature holds, and nothing is
/// decrypted before every byte is authenticated.
pub fn verify_entitlement(
    source: impl Into<signed_file::Source>,
    root: &[u8],
    now: UnixTime,
    site: &str,
    recipients: &[Fingerprint],
) -> Result<Verified<EntitlementEnvelope>> {
    let source = source.into();
    let (signed, body) = signed_file::read_signed_head(&source, &LAYOUT)?;
    let (signer, proof) = crate::verified::signer(&signed, root, Role::Hq, now)?;
    let header: EntitlementHeader = cbor_exact("entitlement header", &signed.payload)?;
    if header.format != "keyfab-entitlement" || header.version != u32::from(VERSION) {
        return Err(FormatError::malformed(
            Malformed::Field,
            "header format/version",
        ));
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
    Ok(Verified::new(
        proof,
        EntitlementEnvelope {
            header,
            signer,
            chain: signed.chain,
            source,
            body_offset,
        },
    ))
}

fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

/// Decrypts the content of a verified entitlement and checks it against the signed
/// header and itself; returns it with a reader for the pool chunks.
pub fn open_entitlement(
    envelope: &Verified<EntitlementEnvelope>,
    recipient: &dyn HpkeRecipient,
) -> Result<(EntitlementContent, PoolReader)> {
    let h = &envelope.header;
    let info = hpke_info(&h.hq_cluster, &h.site, &h.recipient, &h.id)?;
    let opener = recipient.open_context(&h.enc, &info).map_err(|_| {
        FormatError::malformed(Malformed::Undecryptable, "cannot set up decryption")
    })?;
    let mut reader = PoolReader {
        chunks: signed_file::ChunkReader::open(
            &envelope.source,
            envelope.body_offset,
            &LAYOUT,
            opener,
            h.chunks,
        )?,
        plan: Vec::new().into_iter(),
    };
    let first = reader.next_sealed(MAX_CONTENT_CHUNK as usize)?;
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
        .map_err(|e| FormatError::malformed(Malformed::Field, e.to_string()))?;
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
        return Err(FormatError::malformed(
            Malformed::Field,
            "pool layout does not match the policy",
        ));
    }
    if content.keys_per_chunk == 0 || content.keys_per_chunk > MAX_KEYS_PER_CHUNK {
        return Err(FormatError::malformed(
            Malformed::Field,
            "keys_per_chunk out of range",
        ));
    }
    if content.secrets.master_secret.len() != 32 {
        return Err(FormatError::malformed(
            Malformed::Field,
            "master secret length",
        ));
    }
    let plan: Vec<ChunkRef> = chunk_plan(&content.pool, content.keys_per_chunk).collect();
    if plan.len() as u64 + 1 != h.chunks {
        return Err(FormatError::malformed(
            Malformed::Field,
            "chunk count does not match the pool layout",
        ));
    }
    reader.plan = plan.into_iter();
    Ok((content, reader))
}

/// Yields the pool chunks of an opened entitlement, one at a time.
pub struct PoolReader {
    chunks: signed_file::ChunkReader,
    plan: std::vec::IntoIter<ChunkRef>,
}

impl PoolReader {
    /// The next sealed chunk, which must be there.
    fn next_sealed(&mut self, max_plain: usize) -> Result<SecretBytes> {
        let index = self.chunks.next_index();
        self.chunks.next_chunk(max_plain)?.ok_or_else(|| {
            FormatError::malformed(Malformed::Truncated, format!("chunk {index} missing"))
        })
    }

    /// The next chunk and its secrets (`count × 32` bytes), or `None` after the last.
    pub fn next_chunk(&mut self) -> Result<Option<(ChunkRef, SecretBytes)>> {
        let Some(c) = self.plan.next() else {
            return Ok(None);
        };
        let want = c.count * KEY_LEN as u64;
        if self.chunks.next_index() != c.index {
            return Err(FormatError::malformed(
                Malformed::Field,
                format!("chunk {} out of order", c.index),
            ));
        }
        let plain = self.next_sealed(usize::try_from(want).unwrap_or(usize::MAX))?;
        if plain.len() as u64 != want {
            return Err(FormatError::malformed(
                Malformed::Field,
                format!("chunk {} has the wrong size", c.index),
            ));
        }
        Ok(Some((c, plain)))
    }
}
