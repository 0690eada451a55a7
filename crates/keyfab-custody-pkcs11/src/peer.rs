//! The way an HSM-centred provisioning system works today, as a baseline for
//! `keyfab bench provision --custody pkcs11`: for every device, generate its key pair in
//! the token, wrap the private key out under an AES key of the token, and sign its
//! certificate in the token with a CA key that lives there.

use crate::{token_err, P256_PARAMS};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use keyfab_custody::{CustodyError, Result};
use std::time::Instant;

/// The keys the baseline works with, made once (session objects).
pub struct PeerKeys {
    ca: ObjectHandle,
    wrap: ObjectHandle,
}

/// Makes the baseline's CA signing key and wrapping key in the token.
pub fn peer_keys(session: &Session) -> Result<PeerKeys> {
    let (_, ca) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
            ],
        )
        .map_err(|e| token_err("baseline CA key", e))?;
    let wrap = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Wrap(true),
            ],
        )
        .map_err(|e| token_err("baseline wrapping key", e))?;
    Ok(PeerKeys { ca, wrap })
}

/// One device the HSM-centred way; returns the wrapped private key and the signature.
pub fn peer_device(
    session: &Session,
    keys: &PeerKeys,
    tbs_digest: &[u8],
) -> Result<(Vec<u8>, Vec<u8>)> {
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
            ],
            &[
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Sign(true),
            ],
        )
        .map_err(|e| token_err("device key pair", e))?;
    let wrapped = session
        .wrap_key(&Mechanism::AesKeyWrapPad, keys.wrap, private)
        .map_err(|e| token_err("wrap the device key", e))?;
    let signature = sign_in_token(session, keys, tbs_digest)?;
    let _ = session.destroy_object(private);
    let _ = session.destroy_object(public);
    Ok((wrapped, signature))
}

/// One ECDSA signature of `digest` by the baseline's CA key, in the token.
pub fn sign_in_token(session: &Session, keys: &PeerKeys, digest: &[u8]) -> Result<Vec<u8>> {
    session
        .sign(&Mechanism::Ecdsa, keys.ca, digest)
        .map_err(|e| token_err("sign the device certificate", e))
}

/// Runs `per_item` for `items` items spread over one thread per core, each thread with
/// its own logged-in session and baseline keys on token `label`; items per second.
pub fn on_all_cores(
    module: &std::path::Path,
    label: &str,
    pin: &str,
    items: usize,
    per_item: impl Fn(&Session, &PeerKeys, usize) -> Result<()> + Sync,
) -> Result<f64> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = items.div_ceil(threads);
    let start = Instant::now();
    let ok = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let session = crate::user_session(module, label, pin)?;
                    let keys = peer_keys(&session)?;
                    (0..per).try_for_each(|i| per_item(&session, &keys, i))
                })
            })
            .collect();
        hs.into_iter().all(|h| matches!(h.join(), Ok(Ok(()))))
    });
    if !ok {
        return Err(CustodyError::Token("a measuring thread failed".into()));
    }
    Ok((per * threads) as f64 / start.elapsed().as_secs_f64())
}
