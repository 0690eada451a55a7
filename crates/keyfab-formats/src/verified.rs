//! The one way to a [`Verified`] value: a file's COSE signature verified over the exact
//! bytes received ([`crate::cose::verify`], the only maker of a [`SignedByChain`]) and its
//! signer's chain validated to the root with the role its kind requires ([`signer`], the
//! only maker of a [`Trusted`] proof). [`Verified::new`] takes that proof, and the proof's
//! constructor is private to this module, so no code of this crate can hand out an
//! unverified value as verified — the pattern of rust-tuf's `Verified`.

use crate::cose::SignedByChain;
use crate::{FormatError, Result};
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Purpose, Role, ValidatedLeaf};
use std::ops::Deref;

/// A value that only a verifier of this crate can construct: the engine cannot be handed
/// an unverified file by mistake.
#[derive(Debug)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    /// Wraps what a verification produced; the proof is consumed, one value per proof.
    pub(crate) fn new(_proof: Trusted, inner: T) -> Self {
        Self(inner)
    }

    /// The verified value, for code that keeps it beyond the check.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Proof that a file's signature verified and its signer's chain validated.
pub(crate) struct Trusted {
    _only_here: (),
}

/// Validates the chain of a verified signature to `root`, for `role`, at `now`: the
/// signer's leaf, and the proof [`Verified::new`] asks for.
pub(crate) fn signer(
    signed: &SignedByChain,
    root: &[u8],
    role: Role,
    now: UnixTime,
) -> Result<(ValidatedLeaf, Trusted)> {
    let leaf = x509::validate_chain(root, &signed.chain, role, Purpose::Signing, now)
        .map_err(FormatError::from_chain)?;
    Ok((leaf, Trusted { _only_here: () }))
}
