//! Quorum approvals.
//!
//! ```text
//! approval request   "KEYFAB" 'Q' 0x02 | COSE_Sign1 ES256 by the site's service key,
//!                    x5chain [service cert, cluster cert], content type
//!                    "application/keyfab-approval-request", external_aad
//!                    "keyfab-approval-request-v2", payload = CBOR map (canonical)
//! approval           "KEYFAB" 'P' 0x01 | COSE_Sign1 ES256, kid = SHA-256 of the approver's
//!                    SubjectPublicKeyInfo, external_aad "keyfab-approval-v1",
//!                    payload = the request file, byte for byte
//! ```
//!
//! The site issues the request — what is to be approved, summarised for the approver
//! (site, entitlement, product, quota, window, stations, action, expiry) and signed by
//! the site — and keeps it; an approver checks the site's signature up to the root,
//! reads the summary and signs the request's exact bytes offline; the site accepts the
//! approval only for a request it issued, before it expires, from a key its signed
//! policy lists.

use crate::prefix::{self, Kind};
use crate::verified::Verified;
use crate::Malformed;
use crate::{cbor_encode, cbor_exact, FormatError, Result};
use coset::{iana, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::sign::{EcdsaSigner, VerifyingKey};
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::Role;
use serde::{Deserialize, Serialize};

/// The version of the approval file this code writes and reads.
pub const VERSION: u8 = 1;
/// The version of the request file this code writes and reads (2: signed by the site).
pub const REQUEST_VERSION: u8 = 2;
/// The COSE external AAD: a signature made for another format never verifies as this one.
pub const CONTEXT: &[u8] = b"keyfab-approval-v1";
/// The request's COSE external AAD.
pub const REQUEST_CONTEXT: &[u8] = b"keyfab-approval-request-v2";
/// The request's COSE content type.
pub const REQUEST_TYPE: &str = "application/keyfab-approval-request";
/// Largest file accepted; anything longer is `malformed` (too large).
pub const MAX_LEN: usize = 16 * 1024;
/// Largest approval file: the request it signs and the signature around it.
pub const MAX_APPROVAL_LEN: usize = MAX_LEN + 1024;

/// What an approver is asked to approve: the request itself, and what the approver needs
/// to see to judge it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    /// The format's name, checked on reading.
    pub format: String,
    /// The format's version (2).
    pub version: u32,
    /// The site's name (the signer's cluster).
    pub site: String,
    /// The entitlement id.
    pub entitlement: String,
    /// `activate`, `reprovision` or `raise-limit`.
    pub action: String,
    /// 16 random bytes, hex: makes every request unique.
    pub nonce: String,
    /// When it was made (Unix seconds, the site's clock).
    pub created_at: i64,
    /// After this time the request can no longer be approved.
    pub expires_at: i64,
    /// What the entitlement is for.
    pub product: String,
    /// The entitlement's quota.
    pub devices: u64,
    /// Its daily limit, if any.
    pub daily_limit: Option<u64>,
    /// Its window: the first second devices may be provisioned.
    pub valid_from: i64,
    /// The first second they no longer may.
    pub valid_until: i64,
    /// The stations it allows (none: every station the site enrolled).
    pub stations: Option<Vec<String>>,
    /// For `raise-limit`, and only then: the raise approved. Absent from the encoding
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raise: Option<keyfab_policy::Raise>,
    /// For `reprovision`, and only then: the device given keys once more. Absent from
    /// the encoding otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision: Option<Reprovision>,
}

/// A re-provisioning asked for: a device that has its keys gets new ones, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reprovision {
    /// The device id.
    pub device_id: String,
    /// Why, in the operator's words (a returned unit, a replaced chip), if given.
    pub reason: Option<String>,
}

/// The longest reason a re-provisioning request carries.
pub const MAX_REASON: usize = 256;

impl ApprovalRequest {
    /// The request file, signed by the site (`signer`, with its `chain`: service
    /// certificate, cluster certificate).
    pub fn to_file(&self, signer: &dyn EcdsaSigner, chain: &[Vec<u8>]) -> Result<Vec<u8>> {
        self.check_parameters()?;
        let sign1 = crate::cose::sign(
            signer,
            chain,
            REQUEST_TYPE,
            REQUEST_CONTEXT,
            cbor_encode(self)?,
        )?;
        let mut out = prefix::encode(Kind::ApprovalRequest, REQUEST_VERSION).to_vec();
        out.extend(sign1);
        if out.len() > MAX_LEN {
            return Err(FormatError::Write(format!(
                "approval request of {} bytes, more than {MAX_LEN}",
                out.len()
            )));
        }
        Ok(out)
    }

    /// The action's parameters are there exactly when the action takes them.
    fn check_parameters(&self) -> Result<()> {
        let malformed = |m: &str| FormatError::malformed(Malformed::Field, m.to_owned());
        if (self.action == "raise-limit") != self.raise.is_some() {
            return Err(malformed(
                "approval request: raise-limit and its raise go together",
            ));
        }
        if (self.action == "reprovision") != self.reprovision.is_some() {
            return Err(malformed(
                "approval request: reprovision and its device go together",
            ));
        }
        if let Some(r) = &self.reprovision {
            let reason_ok = r.reason.as_ref().is_none_or(|t| {
                !t.is_empty() && t.len() <= MAX_REASON && !t.chars().any(char::is_control)
            });
            if !keyfab_policy::id_shape_ok(&r.device_id) || !reason_ok {
                return Err(malformed("approval request: the device id or the reason"));
            }
        }
        Ok(())
    }

    /// Parses a request file strictly: its framing, its signature by the certificate it
    /// carries, and its payload (canonical: re-encoding gives it back). Whether that
    /// certificate is the site's, under a trusted root, is [`verify_request`]'s to say;
    /// the site itself compares the file with the one it issued.
    pub fn from_file(bytes: &[u8]) -> Result<Self> {
        Ok(Self::signed(bytes)?.1)
    }

    fn signed(bytes: &[u8]) -> Result<(crate::cose::SignedByChain, Self)> {
        if bytes.len() > MAX_LEN {
            return Err(FormatError::malformed(
                Malformed::TooLarge,
                "approval request too large",
            ));
        }
        prefix::check(bytes, Kind::ApprovalRequest, REQUEST_VERSION)?;
        let signed = crate::cose::verify(&bytes[prefix::LEN..], REQUEST_TYPE, REQUEST_CONTEXT)?;
        let r: ApprovalRequest = cbor_exact("approval request", &signed.payload)?;
        if r.format != "keyfab-approval-request" || r.version != u32::from(REQUEST_VERSION) {
            return Err(FormatError::malformed(
                Malformed::Field,
                "approval request format/version",
            ));
        }
        r.check_parameters()?;
        Ok((signed, r))
    }
}

/// Verifies a request file for an approver: signed by a site's service key under `root`
/// (role site, valid at `now`), and naming that site.
pub fn verify_request(
    bytes: &[u8],
    root: &[u8],
    now: UnixTime,
) -> Result<Verified<ApprovalRequest>> {
    let (signed, r) = ApprovalRequest::signed(bytes)?;
    let (signer, proof) = crate::verified::signer(&signed, root, Role::Site, now)?;
    if r.site != signer.cluster_name {
        return Err(FormatError::UntrustedSigner(format!(
            "the request names site '{}' but site '{}' signed it",
            r.site, signer.cluster_name
        )));
    }
    Ok(Verified::new(proof, r))
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
        .build();
    to_approval_file(sign1)
}

/// The approval file of `sign1`: the prefix, then the tagged COSE_Sign1.
fn to_approval_file(sign1: coset::CoseSign1) -> Result<Vec<u8>> {
    let mut out = prefix::encode(Kind::Approval, VERSION).to_vec();
    out.extend(
        sign1
            .to_tagged_vec()
            .map_err(|e| FormatError::Write(e.to_string()))?,
    );
    Ok(out)
}

/// An approval file with its payload — the request it signs — left out: what the audit
/// log keeps of each approval, beside one copy of the request they all signed.
/// [`attach`] gives the approval file back, byte for byte (the encoding is canonical).
pub fn detach(approval_file: &[u8]) -> Result<Vec<u8>> {
    let mut sign1 = approval_sign1(approval_file)?;
    sign1.payload = None;
    to_approval_file(sign1)
}

/// The approval file `detached` ([`detach`]) was made from, given the request file it
/// signs. What it proves is [`verify_approval`]'s to say.
pub fn attach(detached: &[u8], request_file: &[u8]) -> Result<Vec<u8>> {
    let mut sign1 = approval_sign1(detached)?;
    if sign1.payload.is_some() {
        return Err(FormatError::malformed(
            Malformed::Field,
            "approval: payload not detached",
        ));
    }
    sign1.payload = Some(request_file.to_vec());
    to_approval_file(sign1)
}

/// An approval file's framing and COSE structure, checked for size and canonical
/// encoding only.
fn approval_sign1(bytes: &[u8]) -> Result<coset::CoseSign1> {
    if bytes.len() > MAX_APPROVAL_LEN {
        return Err(FormatError::malformed(
            Malformed::TooLarge,
            "approval too large",
        ));
    }
    prefix::check(bytes, Kind::Approval, VERSION)?;
    crate::cose::decode_sign1("approval", &bytes[prefix::LEN..])
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
    let malformed = |m: &str| FormatError::malformed(Malformed::Field, format!("approval: {m}"));
    let sign1 = approval_sign1(bytes)?;
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
