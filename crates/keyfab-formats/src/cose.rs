//! COSE_Sign1 (RFC 9052) with ES256 and the signer's chain in `x5chain` (label 33,
//! RFC 9360), in the protected header. The context string goes in `external_aad`, so a
//! signature made for one purpose never verifies for another.

use crate::Malformed;
use crate::{FormatError, Result};
use coset::{iana, CoseSign1, CoseSign1Builder, HeaderBuilder, Label, TaggedCborSerializable};
use keyfab_crypto::sign::{EcdsaSigner, VerifyingKey};

const X5CHAIN: i64 = 33;

/// Signs `payload` for `context`, carrying `chain` (leaf first).
pub fn sign(
    signer: &dyn EcdsaSigner,
    chain: &[Vec<u8>],
    content_type: &str,
    context: &[u8],
    payload: Vec<u8>,
) -> Result<Vec<u8>> {
    let certs = chain
        .iter()
        .map(|c| ciborium::Value::Bytes(c.clone()))
        .collect();
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .content_type(content_type.to_owned())
        .value(X5CHAIN, ciborium::Value::Array(certs))
        .build();
    CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .try_create_signature(context, |data| signer.sign(data))
        .map_err(|e| FormatError::Write(e.to_string()))?
        .build()
        .to_tagged_vec()
        .map_err(|e| FormatError::Write(e.to_string()))
}

/// A COSE_Sign1 whose signature verified under the leaf of its own `x5chain`. The chain
/// is not trusted yet: the caller validates it against its root next.
#[allow(
    clippy::manual_non_exhaustive,
    reason = "the private field keeps construction to `verify` inside this crate too, which #[non_exhaustive] does not"
)]
pub struct SignedByChain {
    /// The signer's certificate chain as carried (x5chain), leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The payload the signature covers.
    pub payload: Vec<u8>,
    /// Only [`verify`] makes one.
    _signature_verified: (),
}

/// A tagged COSE_Sign1 from exactly `bytes`, in its canonical encoding: re-encoding
/// gives the input back (no trailing bytes, no alternative forms).
pub(crate) fn decode_sign1(what: &str, bytes: &[u8]) -> Result<CoseSign1> {
    let sign1 = CoseSign1::from_tagged_slice(bytes).map_err(|e| {
        let kind = match e {
            coset::CoseError::ExtraneousData => Malformed::TrailingBytes,
            coset::CoseError::DecodeFailed(ciborium::de::Error::Io(_)) => Malformed::Truncated,
            _ => Malformed::Encoding,
        };
        FormatError::malformed(kind, format!("{what}: {e}"))
    })?;
    if sign1.clone().to_tagged_vec().ok().as_deref() != Some(bytes) {
        return Err(FormatError::malformed(
            Malformed::Encoding,
            format!("{what}: not canonically encoded"),
        ));
    }
    Ok(sign1)
}

/// Parses the COSE framing, checks the algorithm, content type and canonical encoding,
/// and verifies the signature over the exact bytes received.
pub fn verify(bytes: &[u8], content_type: &str, context: &[u8]) -> Result<SignedByChain> {
    let malformed = |m: &str| FormatError::malformed(Malformed::Field, format!("COSE_Sign1: {m}"));
    let sign1 = decode_sign1("COSE_Sign1", bytes)?;
    let h = &sign1.protected.header;
    if h.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            iana::Algorithm::ES256,
        ))
    {
        return Err(malformed("algorithm is not ES256"));
    }
    if !h.crit.is_empty() || !sign1.unprotected.is_empty() {
        return Err(malformed("unexpected header parameters"));
    }
    match &h.content_type {
        Some(coset::ContentType::Text(t)) if t == content_type => {}
        _ => return Err(malformed(&format!("content type is not {content_type}"))),
    }
    let mut chain = None;
    for (label, value) in &h.rest {
        match (label, value) {
            (Label::Int(X5CHAIN), ciborium::Value::Array(items)) if chain.is_none() => {
                let certs: Option<Vec<Vec<u8>>> =
                    items.iter().map(|v| v.as_bytes().cloned()).collect();
                chain = Some(certs.ok_or_else(|| malformed("x5chain holds a non-bytes item"))?);
            }
            _ => return Err(malformed("unexpected protected header parameter")),
        }
    }
    let chain = chain.ok_or_else(|| malformed("no x5chain"))?;
    if chain.is_empty() || chain.len() > 4 {
        return Err(malformed("x5chain must hold 1 to 4 certificates"));
    }
    let payload = sign1
        .payload
        .clone()
        .ok_or_else(|| malformed("no payload"))?;
    let leaf = keyfab_crypto::x509::cert_facts(&chain[0])
        .map_err(|e| FormatError::UntrustedSigner(e.to_string()))?;
    let point = leaf
        .public_point
        .ok_or_else(|| FormatError::UntrustedSigner("signer key is not P-256".into()))?;
    let key =
        VerifyingKey::from_sec1(&point).map_err(|e| FormatError::UntrustedSigner(e.to_string()))?;
    sign1
        .verify_signature(context, |sig, data| key.verify(data, sig))
        .map_err(|_| FormatError::BadSignature("COSE_Sign1 signature".into()))?;
    Ok(SignedByChain {
        chain,
        payload,
        _signature_verified: (),
    })
}
