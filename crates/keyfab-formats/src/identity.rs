//! The site identity file `.kfi`: the site's cluster certificate and its two service
//! certificates (signing, HPKE), signed by the site's service signing key.
//!
//! ```text
//! "KEYFAB" 'I' 0x01 | COSE_Sign1 (x5chain = [signing cert, cluster cert]) — nothing after
//! payload (CBOR map): format, version, site, signing_cert, hpke_cert, cluster_cert, created_at
//! ```

use crate::prefix::{self, Kind};
use crate::Malformed;
use crate::{cbor_encode, cbor_exact, cose, FormatError, Result, Verified};
use keyfab_crypto::hpke::HpkePublicKey;
use keyfab_crypto::sign::{EcdsaSigner, VerifyingKey};
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Purpose, Role};
use serde::{Deserialize, Serialize};

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Largest file accepted; anything longer is `malformed` (too large).
pub const MAX_LEN: usize = 64 * 1024;
/// The COSE external AAD: a signature made for another format never verifies as this one.
pub const CONTEXT: &[u8] = b"keyfab-identity-v1";
/// The COSE content type of the signed payload.
pub const CONTENT_TYPE: &str = "application/keyfab-identity+cbor";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityPayload {
    format: String,
    version: u32,
    site: String,
    #[serde(with = "serde_bytes")]
    signing_cert: Vec<u8>,
    #[serde(with = "serde_bytes")]
    hpke_cert: Vec<u8>,
    #[serde(with = "serde_bytes")]
    cluster_cert: Vec<u8>,
    created_at: i64,
}

/// What HQ learns from a verified identity file.
#[derive(Debug, Clone)]
pub struct SiteIdentity {
    /// The site's name.
    pub site: String,
    /// The site's cluster certificate (DER).
    pub cluster_cert: Vec<u8>,
    /// The site's service signing certificate (DER).
    pub signing_cert: Vec<u8>,
    /// The site's HPKE certificate (DER): what HQ seals entitlements to.
    pub hpke_cert: Vec<u8>,
    /// The key of `signing_cert`.
    pub signing_key: VerifyingKey,
    /// The key of `hpke_cert`.
    pub hpke_key: HpkePublicKey,
}

/// Signs the site's identity file (`.kfi`).
pub fn write_identity(
    signer: &dyn EcdsaSigner,
    site: &str,
    cluster_cert: &[u8],
    signing_cert: &[u8],
    hpke_cert: &[u8],
    now: UnixTime,
) -> Result<Vec<u8>> {
    let payload = IdentityPayload {
        format: "keyfab-identity".into(),
        version: u32::from(VERSION),
        site: site.into(),
        signing_cert: signing_cert.to_vec(),
        hpke_cert: hpke_cert.to_vec(),
        cluster_cert: cluster_cert.to_vec(),
        created_at: now.0,
    };
    let chain = vec![signing_cert.to_vec(), cluster_cert.to_vec()];
    let sign1 = cose::sign(
        signer,
        &chain,
        CONTENT_TYPE,
        CONTEXT,
        cbor_encode(&payload)?,
    )?;
    let mut out = prefix::encode(Kind::Identity, VERSION).to_vec();
    out.extend(sign1);
    Ok(out)
}

/// Verifies an identity file against `root` at `now`: size, prefix, signature, chain to
/// root with role site (both service certificates under the same cluster certificate),
/// then the payload.
pub fn verify_identity(bytes: &[u8], root: &[u8], now: UnixTime) -> Result<Verified<SiteIdentity>> {
    if bytes.len() > MAX_LEN {
        return Err(FormatError::malformed(
            Malformed::TooLarge,
            format!("identity file larger than {MAX_LEN} bytes"),
        ));
    }
    prefix::check(bytes, Kind::Identity, VERSION)?;
    let signed = cose::verify(&bytes[prefix::LEN..], CONTENT_TYPE, CONTEXT)?;
    let (signer, proof) = crate::verified::signer(&signed, root, Role::Site, now)?;
    let p: IdentityPayload = cbor_exact("identity payload", &signed.payload)?;
    if p.format != "keyfab-identity" || p.version != u32::from(VERSION) {
        return Err(FormatError::malformed(
            Malformed::Field,
            "identity payload format/version",
        ));
    }
    if p.signing_cert != signed.chain[0] || p.cluster_cert != signed.chain[1] {
        return Err(FormatError::BadSignature(
            "payload certificates differ from the signer's chain".into(),
        ));
    }
    let hpke_leaf = x509::validate_chain(
        root,
        &[p.hpke_cert.clone(), p.cluster_cert.clone()],
        Role::Site,
        Purpose::KeyAgreement,
        now,
    )
    .map_err(FormatError::from_chain)?;
    if p.site != signer.cluster_name {
        return Err(FormatError::UntrustedSigner(format!(
            "identity names site '{}' but its certificate is for '{}'",
            p.site, signer.cluster_name
        )));
    }
    let signing_key = VerifyingKey::from_sec1(&signer.public_point)
        .map_err(|e| FormatError::malformed(Malformed::Field, e.to_string()))?;
    let hpke_key = HpkePublicKey::from_sec1(&hpke_leaf.public_point)
        .map_err(|e| FormatError::malformed(Malformed::Field, e.to_string()))?;
    Ok(Verified::new(
        proof,
        SiteIdentity {
            site: p.site,
            cluster_cert: p.cluster_cert,
            signing_cert: p.signing_cert,
            hpke_cert: p.hpke_cert,
            signing_key,
            hpke_key,
        },
    ))
}
