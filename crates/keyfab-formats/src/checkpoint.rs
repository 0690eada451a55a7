//! Audit checkpoints (site → HQ) and receipts (HQ → site).
//!
//! ```text
//! checkpoint  "KEYFAB" 'C' 0x01 | COSE_Sign1 by the site's service signing key,
//!             x5chain = [site signing cert, site cluster cert],
//!             external_aad "keyfab-checkpoint-v1", payload = CBOR Checkpoint
//! receipt     "KEYFAB" 'K' 0x01 | COSE_Sign1 by HQ's service signing key,
//!             x5chain = [HQ signing cert, HQ cluster cert],
//!             external_aad "keyfab-receipt-v1", payload = CBOR Receipt
//! ```
//!
//! A checkpoint states the size and RFC 9162 root of the site's audit log at a time. A
//! receipt is HQ's acknowledgment that it accepted such a checkpoint; HQ's last accepted
//! checkpoint also travels inside every entitlement. A site whose log is behind it, or
//! disagrees with it, was rolled back.

use crate::prefix::{self, Kind};
use crate::verified::Trusted;
use crate::Malformed;
use crate::{cbor_encode, cbor_exact, cose, FormatError, Result, Verified};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::sign::EcdsaSigner;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{Role, ValidatedLeaf};
use serde::{Deserialize, Serialize};

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Largest file accepted; anything longer is `malformed` (too large).
pub const MAX_LEN: usize = 64 * 1024;
/// The COSE external AAD of a checkpoint.
pub const CHECKPOINT_CONTEXT: &[u8] = b"keyfab-checkpoint-v1";
/// The COSE external AAD of a receipt.
pub const RECEIPT_CONTEXT: &[u8] = b"keyfab-receipt-v1";
const CHECKPOINT_TYPE: &str = "application/keyfab-checkpoint+cbor";
const RECEIPT_TYPE: &str = "application/keyfab-receipt+cbor";

/// The state of a site's audit log: how many records, and their Merkle root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeHead {
    /// How many records.
    pub size: u64,
    /// The RFC 9162 Merkle root of those records.
    #[serde(with = "serde_bytes")]
    pub root: [u8; 32],
}

/// A site's signed statement of its log's head at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The format's name, checked on reading.
    pub format: String,
    /// The format's version (1).
    pub version: u32,
    /// The site's name.
    pub site: String,
    /// The log's head.
    pub head: TreeHead,
    /// The site's trusted time when it signed.
    pub time: i64,
    /// For a site bound to a TPM counter: the counter's value at this checkpoint (the
    /// checkpoint advanced it). Absent from the encoding otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_counter: Option<u64>,
}

/// HQ's signed acknowledgment of a site's checkpoint (`.kfk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// The format's name, checked on reading.
    pub format: String,
    /// The format's version (1).
    pub version: u32,
    /// HQ's cluster name.
    pub hq: String,
    /// Hex SHA-256 of HQ's cluster certificate.
    pub hq_cluster: String,
    /// The site's name.
    pub site: String,
    /// Hex SHA-256 of the SubjectPublicKeyInfo of the site's HPKE key.
    pub recipient: String,
    /// The checkpoint HQ accepted.
    pub head: TreeHead,
    /// When the site made the checkpoint (its trusted time).
    pub checkpoint_time: i64,
    /// When HQ acknowledged it (HQ's clock).
    pub acknowledged_at: i64,
    /// Set only in a receipt HQ issues to reset the site's trusted time (`hq site
    /// reset-clock`): HQ's time when it issued it, the site's trusted time from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_time: Option<i64>,
}

fn framed(kind: Kind, sign1: Vec<u8>) -> Vec<u8> {
    let mut out = prefix::encode(kind, VERSION).to_vec();
    out.extend(sign1);
    out
}

/// Signs a checkpoint.
pub fn write_checkpoint(
    signer: &dyn EcdsaSigner,
    chain: Vec<Vec<u8>>,
    c: &Checkpoint,
) -> Result<Vec<u8>> {
    let sign1 = cose::sign(
        signer,
        &chain,
        CHECKPOINT_TYPE,
        CHECKPOINT_CONTEXT,
        cbor_encode(c)?,
    )?;
    Ok(framed(Kind::Checkpoint, sign1))
}

/// Signs and seals a receipt for the site.
pub fn write_receipt(
    signer: &dyn EcdsaSigner,
    chain: Vec<Vec<u8>>,
    r: &Receipt,
) -> Result<Vec<u8>> {
    let sign1 = cose::sign(
        signer,
        &chain,
        RECEIPT_TYPE,
        RECEIPT_CONTEXT,
        cbor_encode(r)?,
    )?;
    Ok(framed(Kind::Receipt, sign1))
}

/// A small signed file whose signature and signer hold.
struct SignedBody {
    signer: ValidatedLeaf,
    chain: Vec<Vec<u8>>,
    payload: Vec<u8>,
    proof: Trusted,
}

fn verified_body(
    bytes: &[u8],
    kind: Kind,
    content_type: &str,
    context: &[u8],
    root: &[u8],
    role: Role,
    now: UnixTime,
) -> Result<SignedBody> {
    if bytes.len() > MAX_LEN {
        return Err(FormatError::malformed(
            Malformed::TooLarge,
            format!("file larger than {MAX_LEN} bytes"),
        ));
    }
    prefix::check(bytes, kind, VERSION)?;
    let signed = cose::verify(&bytes[prefix::LEN..], content_type, context)?;
    let (signer, proof) = crate::verified::signer(&signed, root, role, now)?;
    Ok(SignedBody {
        signer,
        chain: signed.chain,
        payload: signed.payload,
        proof,
    })
}

/// Verifies a site's checkpoint against `root` (role site) at `now`.
pub fn verify_checkpoint(bytes: &[u8], root: &[u8], now: UnixTime) -> Result<Verified<Checkpoint>> {
    let SignedBody {
        signer,
        payload,
        proof,
        ..
    } = verified_body(
        bytes,
        Kind::Checkpoint,
        CHECKPOINT_TYPE,
        CHECKPOINT_CONTEXT,
        root,
        Role::Site,
        now,
    )?;
    let c: Checkpoint = cbor_exact("checkpoint", &payload)?;
    if c.format != "keyfab-checkpoint" || c.version != u32::from(VERSION) {
        return Err(FormatError::malformed(
            Malformed::Field,
            "checkpoint format/version",
        ));
    }
    if c.site != signer.cluster_name {
        return Err(FormatError::UntrustedSigner(
            "checkpoint names another site than its signer".into(),
        ));
    }
    Ok(Verified::new(proof, c))
}

/// Verifies an HQ receipt addressed to `site` (current HPKE key `recipient`).
pub fn verify_receipt(
    bytes: &[u8],
    root: &[u8],
    now: UnixTime,
    site: &str,
    recipients: &[Fingerprint],
) -> Result<Verified<Receipt>> {
    let SignedBody {
        signer,
        chain,
        payload,
        proof,
    } = verified_body(
        bytes,
        Kind::Receipt,
        RECEIPT_TYPE,
        RECEIPT_CONTEXT,
        root,
        Role::Hq,
        now,
    )?;
    let r: Receipt = cbor_exact("receipt", &payload)?;
    if r.format != "keyfab-receipt" || r.version != u32::from(VERSION) {
        return Err(FormatError::malformed(
            Malformed::Field,
            "receipt format/version",
        ));
    }
    if r.hq != signer.cluster_name || r.hq_cluster != Fingerprint::of(&chain[1]).to_hex() {
        return Err(FormatError::UntrustedSigner(
            "receipt names another HQ than its signer".into(),
        ));
    }
    if r.site != site || !recipients.iter().any(|x| r.recipient == x.to_hex()) {
        return Err(FormatError::WrongRecipient(format!(
            "addressed to site '{}', this is '{site}'",
            r.site
        )));
    }
    Ok(Verified::new(proof, r))
}
