//! The keys a device gets: prepared per key spec before the decision (site keys made or
//! taken ready, derived keys, a device's own key from its CSR, each certified), and made
//! again for a retry from what the site stored — the pool slot, the sealed site key, the
//! derivation.

use super::key_reserve::KeyReserve;
use super::pool_keys::read_pool_key;
use super::records::DeviceRecord;
use super::{EntitlementContext, Prepared, ProvisionRequest};
use keyfab_crypto::devicekey;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Validity};
use keyfab_formats::attestation::ChipSeen;
use keyfab_node::{Error, Node, Result};
use keyfab_policy::{KeySource, KeyType, Lifetime};

pub(super) use keyfab_formats::entitlement::device_key_type as device_type;

/// Per key spec, the work that needs no shared state; and the request's chip chain,
/// judged against the policy's `[chips]` (the signatures checked here, off the
/// committer; the rules in the decision).
pub(super) fn prepare(
    node: &Node,
    ctx: &EntitlementContext,
    req: &ProvisionRequest,
    reserve: &KeyReserve,
) -> Result<(Vec<Prepared>, ChipSeen)> {
    // A device id the policy refuses is always refused (`decide` checks it whatever
    // else holds): nothing to prepare, and no certificate subject to build from it
    // (a comma in the id would make the DN fail, an internal error instead of
    // `device_id_rejected`).
    if !ctx.policy.device_id_ok(&req.device_id) {
        return Ok((Vec::new(), ChipSeen::Absent));
    }
    // Once the batch CA key is destroyed (window ended, revoked), the policy refuses
    // every new release and a retry is answered from its record: nothing to prepare,
    // and no certificate could be made.
    if ctx.device_issuer.is_none()
        && ctx
            .policy
            .policy
            .keys
            .iter()
            .any(|k| k.certificate.is_some())
    {
        return Ok((Vec::new(), ChipSeen::Absent));
    }
    let rng = node.rng.as_ref();
    let now = node.now();
    let device_key = match &req.csr {
        Some(der) => Some(
            x509::read_device_csr(der).map_err(|e| Error::InvalidInput(format!("--csr: {e}")))?,
        ),
        None => None,
    };
    if device_key.is_none()
        && ctx
            .policy
            .policy
            .keys_from(KeySource::Device)
            .next()
            .is_some()
    {
        return Err(Error::InvalidInput(
            "this entitlement has keys with source 'device': the request needs the device's CSR"
                .into(),
        ));
    }
    let chips = ctx.policy.policy.chips.as_ref();
    let chip = keyfab_formats::attestation::judge(
        chips,
        req.chip_chain.as_deref(),
        req.transport_key
            .as_ref()
            .map(|k| devicekey::KeyId::Public(k.fingerprint()).to_text()),
        device_key
            .as_ref()
            .map(|k| devicekey::public_key_id(k).to_text()),
    );
    // A chain that did not verify, or none where one is required, is refused whatever
    // else holds: no key is made for it.
    let required = chips.is_some_and(|c| c.attestation == keyfab_policy::Attestation::Required);
    match chip {
        ChipSeen::Untrusted(_) => return Ok((Vec::new(), chip)),
        ChipSeen::Absent if required => return Ok((Vec::new(), chip)),
        _ => {}
    }
    let mut out = Vec::with_capacity(ctx.policy.policy.keys.len());
    for (spec_index, spec) in ctx.policy.policy.keys.iter().enumerate() {
        let kind = device_type(spec.key_type);
        out.push(match spec.source {
            KeySource::HqPool => Prepared::Pool,
            KeySource::Site => {
                // Sealed and stored, so a retry gets the same key
                // (devicekey::generate_for_site says what is stored of each type).
                let (stored, e) = match reserve.take(kind) {
                    Some(key) => key,
                    None => devicekey::generate_for_site(kind, rng)?,
                };
                let sealed = ctx.seal_site_key(&req.device_id, &spec.name, stored.expose(), rng)?;
                let cert = certify(ctx, spec_index, &req.device_id, e.public.as_ref(), now, rng)?;
                Prepared::Ready {
                    key_id: e.key_id,
                    sealed,
                    private: Some(e.private),
                    cert,
                }
            }
            KeySource::Derived => {
                let secret =
                    devicekey::derive(&ctx.master, &ctx.record.id, &spec.name, &req.device_id)?;
                let e = devicekey::expand(kind, &secret)?;
                Prepared::Ready {
                    key_id: e.key_id,
                    sealed: Vec::new(),
                    private: Some(e.private),
                    cert: None,
                }
            }
            KeySource::Device => {
                let public = device_key
                    .clone()
                    .ok_or_else(|| Error::InvalidInput("missing CSR".into()))?;
                let matches = match (&public, spec.key_type) {
                    (x509::DevicePublicKey::P256(_), KeyType::EcP256)
                    | (x509::DevicePublicKey::P384(_), KeyType::EcP384)
                    | (x509::DevicePublicKey::Ed25519(_), KeyType::Ed25519) => true,
                    (x509::DevicePublicKey::Rsa(spki), KeyType::Rsa2048) => {
                        x509::rsa_bits(spki) == Some(2048)
                    }
                    (x509::DevicePublicKey::Rsa(spki), KeyType::Rsa3072) => {
                        x509::rsa_bits(spki) == Some(3072)
                    }
                    _ => false,
                };
                if !matches {
                    return Err(Error::InvalidInput(format!(
                        "the CSR's key is not of type {} as key '{}' requires",
                        spec.key_type.as_str(),
                        spec.name
                    )));
                }
                Prepared::Ready {
                    key_id: devicekey::public_key_id(&public),
                    sealed: Vec::new(),
                    private: None,
                    cert: certify(ctx, spec_index, &req.device_id, Some(&public), now, rng)?,
                }
            }
        });
    }
    Ok((out, chip))
}

/// The private parts a retry of `record`'s request gets again, per key spec: from the
/// pool slot it took, its sealed site key, or the derivation; none for a device's own
/// key.
pub(super) fn replayed_privates(
    node: &Node,
    ctx: &EntitlementContext,
    device_id: &str,
    record: &DeviceRecord,
) -> Result<Vec<Option<SecretBytes>>> {
    let mut privates = Vec::new();
    for (i, spec) in ctx.policy.policy.keys.iter().enumerate() {
        let kind = device_type(spec.key_type);
        let expanded = match (spec.source, record.pool_index) {
            (KeySource::HqPool, Some(index)) => Some(devicekey::expand(
                kind,
                &read_pool_key(node, ctx, i, index)?,
            )?),
            (KeySource::Site, _) => {
                let sealed = record
                    .sealed
                    .get(i)
                    .ok_or_else(|| Error::Corrupt("sealed site key".into()))?;
                let stored = unseal_site_key(ctx, device_id, &spec.name, sealed)?;
                Some(devicekey::expand_stored(kind, stored.expose())?)
            }
            (KeySource::Derived, _) => Some(devicekey::expand(
                kind,
                &devicekey::derive(&ctx.master, &ctx.record.id, &spec.name, device_id)?,
            )?),
            _ => None,
        };
        privates.push(expanded.map(|e| e.private));
    }
    Ok(privates)
}

/// The device certificate for `public` under the key spec's profile, if it has one. Its
/// validity starts now and runs for the profile's lifetime (to `99991231235959Z` for
/// `"forever"`), never beyond the batch CA's.
pub(super) fn certify(
    ctx: &EntitlementContext,
    spec_index: usize,
    device_id: &str,
    public: Option<&x509::DevicePublicKey>,
    now: UnixTime,
    rng: &dyn keyfab_crypto::rng::SecureRng,
) -> Result<Option<(Vec<u8>, String)>> {
    let spec = ctx
        .policy
        .policy
        .keys
        .get(spec_index)
        .ok_or_else(|| Error::Bug("key spec index".into()))?;
    let (Some(template), Some(public)) = (&spec.certificate, public) else {
        return Ok(None);
    };
    let profile = ctx
        .profiles
        .get(spec_index)
        .and_then(Option::as_ref)
        .ok_or_else(|| Error::Bug(format!("no certificate profile for '{}'", spec.name)))?;
    let not_after = match template.days {
        Lifetime::Days(d) => now.plus_days(i64::from(d)),
        Lifetime::Forever => x509::NO_EXPIRY,
    };
    let issuer = ctx
        .device_issuer
        .as_ref()
        .ok_or_else(|| batch_key_gone(ctx))?;
    let serial = x509::random_serial(rng);
    let cert = issuer.issue(
        profile,
        device_id,
        public,
        serial,
        Validity {
            not_before: now,
            not_after,
        },
    )?;
    Ok(Some((cert, hex::encode(serial))))
}

/// What a request meets that needs a certificate after the batch CA key was destroyed.
pub(super) fn batch_key_gone(ctx: &EntitlementContext) -> Error {
    Error::Precondition(format!(
        "the batch CA key of entitlement {} was destroyed (its window ended or HQ revoked it): nothing more can be issued under it",
        ctx.record.id
    ))
}

impl EntitlementContext {
    pub(super) fn seal_site_key(
        &self,
        device_id: &str,
        name: &str,
        stored: &[u8],
        rng: &dyn keyfab_crypto::rng::SecureRng,
    ) -> Result<Vec<u8>> {
        Ok(keyfab_crypto::aead::seal_random_nonce(
            &self.dek,
            rng,
            &site_key_aad(self, device_id, name),
            stored,
        )?)
    }
}

pub(super) fn site_key_aad(ctx: &EntitlementContext, device_id: &str, name: &str) -> Vec<u8> {
    format!("keyfab-site-key-v1\0{}\0{device_id}\0{name}", ctx.record.id).into_bytes()
}

pub(super) fn unseal_site_key(
    ctx: &EntitlementContext,
    device_id: &str,
    name: &str,
    sealed: &[u8],
) -> Result<SecretBytes> {
    Ok(keyfab_crypto::aead::open_random_nonce(
        &ctx.dek,
        &site_key_aad(ctx, device_id, name),
        sealed,
    )?)
}
