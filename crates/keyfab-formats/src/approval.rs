//! Quorum approvals.
//!
//! ```text
//! approval request   "KEYFAB" 'Q' 0x01 | CBOR map (canonical), nothing after it
//! approval           "KEYFAB" 'P' 0x01 | COSE_Sign1 ES256, kid = SHA-256 of the approver's
//!                    SubjectPublicKeyInfo, external_aad "keyfab-approval-v1",
//!                    payload = the request file, byte for byte
//! ```
//!
//! The site issues the request (bound to site, entitlement, action, nonce and expiry) and
//! keeps it; an approver signs its exact bytes offline; the site accepts the approval only
//! for a request it issued, before it expires, from a key its signed policy lists.

use crate::prefix::{self, Kind};
use crate::Malformed;
use crate::{cbor_encode, cbor_exact, FormatError, Result};
use coset::{iana, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::sign::{EcdsaSigner, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// The COSE external AAD: a signature made for another format never verifies as this one.
pub const CONTEXT: &[u8] = b"keyfab-approval-v1";
/// Largest file accepted; anything longer is `malformed` (too large).
pub const MAX_LEN: usize = 16 * 1024;
/// Largest approval file: the request it signs and the signature around it.
pub const MAX_APPROVAL_LEN: usize = MAX_LEN + 1024;

/// What an approver is asked to approve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    /// The format's name, checked on reading.
    pub format: String,
    /// The format's version (1).
    pub version: u32,
    /// The site's name.
    pub site: String,
    /// The entitlement id.
    pub entitlement: String,
    /// `activate`, `reprovision` or `raise-limit`.
    pub action: String,
    /// 16 random bytes, hex: makes every request unique.
    pub nonce: String,
    /// When it was made (Unix seconds, its maker's clock).
    pub created_at: i64,
    /// After this time the request can no longer be approved.
    pub expires_at: i64,
    /// For the approver's eyes: what the entitlement is.
    pub product: String,
    /// For the approver's eyes: the entitlement's quota.
    pub devices: u64,
}

impl ApprovalRequest {
    /// The request file.
    pub fn to_file(&self) -> Result<Vec<u8>> {
        let mut out = prefix::encode(Kind::ApprovalRequest, VERSION).to_vec();
        out.extend(cbor_encode(self)?);
        Ok(out)
    }

    /// Parses a request file strictly (canonical: re-encoding gives the input back).
    pub fn from_file(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_LEN {
            return Err(FormatError::malformed(
                Malformed::TooLarge,
                "approval request too large",
            ));
        }
        prefix::check(bytes, Kind::ApprovalRequest, VERSION)?;
        let r: ApprovalRequest = cbor_exact("approval request", &bytes[prefix::LEN..])?;
        if r.format != "keyfab-approval-request" || r.version != u32::from(VERSION) {
            return Err(FormatError::malformed(
                Malformed::Field,
                "approval request format/version",
            ));
        }
        if r.to_file()? != bytes {
            return Err(FormatError::malformed(
                Malformed::Encoding,
                "approval request is not canonically encoded",
            ));
        }
        Ok(r)
    }
}

/// An approver signs a request file; returns the approval file.
pub fn sign_approval(approver: &dyn EcdsaSigner, request_file: &[u8]) -> Result<Vec<u8>> {
    ApprovalRequest::from_file(request_file)?;
    let kid = approver.verifying_key().fingerprint().0.to_vec();
    let sign1 = CoseSign1Builder::new()
        .protected(
            HeaderBuilder::new()
                .algorithm(iana::Algorithm::ES256)
                .key_id(kid)
                .build(),
        )
        .payload(request_file.to_vec())
        .try_create_signature(CONTEXT, |data| approver.sign(data))
        .map_err(|e| FormatError::Write(e.to_string()))?
        .build()
        .to_tagged_vec()
        .map_err(|e| FormatError::Write(e.to_string()))?;
    let mut out = prefix::encode(Kind::Approval, VERSION).to_vec();
    out.extend(sign1);
    Ok(out)
}

/// A verified approval: who approved which request.
#[derive(Debug, Clone)]
pub struct Approval {
    /// SHA-256 of the approver's public key.
    pub approver: Fingerprint,
    /// The request approved.
    pub request: ApprovalRequest,
    /// The request file as signed.
    pub request_file: Vec<u8>,
}

/// Verifies an approval against the approver keys a policy lists (PEM). A key that is
/// not listed, a bad signature, or a malformed file is refused.
pub fn verify_approval(bytes: &[u8], approvers: &[VerifyingKey]) -> Result<Approval> {
    if bytes.len() > MAX_APPROVAL_LEN {
        return Err(FormatError::malformed(
            Malformed::TooLarge,
            "approval too large",
        ));
    }
    prefix::check(bytes, Kind::Approval, VERSION)?;
    let body = &bytes[prefix::LEN..];
    let malformed = |m: &str| FormatError::malformed(Malformed::Field, format!("approval: {m}"));
    let sign1 = crate::cose::decode_sign1("approval", body)?;
    let h = &sign1.protected.header;
    if h.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            iana::Algorithm::ES256,
        ))
        || !h.crit.is_empty()
        || !h.rest.is_empty()
        || h.content_type.is_some()
        || !sign1.unprotected.is_empty()
    {
        return Err(malformed("unexpected header"));
    }
    let kid: [u8; 32] = h
        .key_id
        .as_slice()
        .try_into()
        .map_err(|_| malformed("kid"))?;
    let approver = Fingerprint(kid);
    let key = approvers
        .iter()
        .find(|k| k.fingerprint() == approver)
        .ok_or_else(|| {
            FormatError::UntrustedSigner(format!(
                "approver key {approver} is not listed in the policy"
            ))
        })?;
    sign1
        .verify_signature(CONTEXT, |sig, data| key.verify(data, sig))
        .map_err(|_| FormatError::BadSignature("approval signature".into()))?;
    let request_file = sign1
        .payload
        .clone()
        .ok_or_else(|| malformed("no payload"))?;
    let request = ApprovalRequest::from_file(&request_file)?;
    Ok(Approval {
        approver,
        request,
        request_file,
    })
}
