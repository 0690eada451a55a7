//! The revocation file `.kfr`: HQ tells one site that an entitlement is revoked.
//!
//! ```text
//! "KEYFAB" 'R' 0x01 | COSE_Sign1 — nothing after it; at most 64 KiB
//!   ES256 by HQ's service signing key, x5chain = [HQ signing cert, HQ cluster cert],
//!   external_aad "keyfab-revocation-v1", payload = CBOR map (below)
//! ```
//!
//! It carries no secret, so it is not encrypted; it is verified exactly like an
//! entitlement (signature, chain to the root with role hq, addressed to this site) and
//! uses the same per-site sequence, so it cannot be replayed or reordered.

use crate::prefix::{self, Kind};
use crate::Malformed;
use crate::{cbor_encode, cbor_exact, cose, FormatError, Result, Verified};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::sign::EcdsaSigner;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::Role;
use serde::{Deserialize, Serialize};

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Largest file accepted; anything longer is `malformed` (too large).
pub const MAX_LEN: usize = 64 * 1024;
/// The COSE external AAD: a signature made for another format never verifies as this one.
pub const CONTEXT: &[u8] = b"keyfab-revocation-v1";
/// The COSE content type of the signed payload.
pub const CONTENT_TYPE: &str = "application/keyfab-revocation+cbor";

/// HQ's signed revocation of an entitlement (`.kfr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// The format's name, checked on reading.
    pub format: String,
    /// The format's version (1).
    pub version: u32,
    /// The entitlement revoked.
    pub entitlement: String,
    /// Per-site sequence number, shared with entitlements.
    pub sequence: u64,
    /// HQ's cluster name.
    pub hq: String,
    /// Hex SHA-256 of HQ's cluster certificate.
    pub hq_cluster: String,
    /// The site's name.
    pub site: String,
    /// Hex SHA-256 of the SubjectPublicKeyInfo of the site's HPKE key.
    pub recipient: String,
    /// When it was made (Unix seconds, its maker's clock).
    pub created_at: i64,
    /// Why, in HQ's words.
    pub reason: String,
}

/// Signs and seals a revocation for the site.
pub fn write_revocation(
    signer: &dyn EcdsaSigner,
    chain: Vec<Vec<u8>>,
    r: &Revocation,
) -> Result<Vec<u8>> {
    let sign1 = cose::sign(signer, &chain, CONTENT_TYPE, CONTEXT, cbor_encode(r)?)?;
    let mut out = prefix::encode(Kind::Revocation, VERSION).to_vec();
    out.extend(sign1);
    Ok(out)
}

/// Verifies a revocation for `site` (whose current HPKE key is `recipient`) against
/// `root` at `now`, in the verification order of docs/FORMATS.md.
pub fn verify_revocation(
    bytes: &[u8],
    root: &[u8],
    now: UnixTime,
    site: &str,
    recipients: &[Fingerprint],
) -> Result<Verified<Revocation>> {
    if bytes.len() > MAX_LEN {
        return Err(FormatError::malformed(
            Malformed::TooLarge,
            format!("revocation larger than {MAX_LEN} bytes"),
        ));
    }
    prefix::check(bytes, Kind::Revocation, VERSION)?;
    let signed = cose::verify(&bytes[prefix::LEN..], CONTENT_TYPE, CONTEXT)?;
    let (signer, proof) = crate::verified::signer(&signed, root, Role::Hq, now)?;
    let r: Revocation = cbor_exact("revocation", &signed.payload)?;
    if r.format != "keyfab-revocation" || r.version != u32::from(VERSION) {
        return Err(FormatError::malformed(
            Malformed::Field,
            "revocation format/version",
        ));
    }
    if r.hq != signer.cluster_name || r.hq_cluster != Fingerprint::of(&signed.chain[1]).to_hex() {
        return Err(FormatError::UntrustedSigner(
            "revocation names another HQ than the one that signed it".into(),
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
