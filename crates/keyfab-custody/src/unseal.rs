//! M-of-N unsealing, as operators know it from Vault: the keystore is sealed under a random
//! 32-byte *unseal key* that nobody sees whole; it is split into N shares of which any M
//! recover it (Shamir's scheme over GF(256), `blahaj`). Each holder brings their share in
//! turn; below the threshold the keystore stays sealed.
//!
//! The home keeps `unseal.json` (docs/FORMATS.md): the threshold, the number of shares,
//! and a SHA-256 check value per share, so that a mistyped or foreign share is refused the
//! moment it is submitted instead of spoiling the recovery. A share is a uniformly random
//! point of a random polynomial: its hash says nothing about the unseal key.
//!
//! The unseal key becomes the keystore's passphrase (`kfu1-` ‖ hex): the sealed keystore
//! file is the same whichever way it is unlocked.

use crate::{CustodyError, Result};
use keyfab_crypto::hash::sha256;
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::SecretBytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use zeroize::Zeroizing;

/// The file in a node's home that says the keystore is sealed by shares.
pub const CONFIG_FILE: &str = "unseal.json";
/// Every share starts with this (format version 1).
const SHARE_PREFIX: &str = "kfs1-";
const PASSPHRASE_PREFIX: &str = "kfu1-";
const CHECK_DOMAIN: &[u8] = b"keyfab-unseal-share-v1\0";
const KEY_LEN: usize = 32;
/// At most this many shares (each holder's share is one byte of x coordinate).
pub const MAX_SHARES: u8 = 32;

/// What `unseal.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsealConfig {
    /// The file's version (1).
    pub version: u8,
    /// Shares needed to unseal.
    pub threshold: u8,
    /// Shares made.
    pub shares: u8,
    /// Share number (its x coordinate, 1..=shares) → hex SHA-256 check value.
    pub checks: BTreeMap<u8, String>,
}

impl UnsealConfig {
    /// The configuration in `home`, if the keystore there is sealed by shares.
    pub fn load(home: &Path) -> Result<Option<Self>> {
        let path = home.join(CONFIG_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let config: Self = serde_json::from_slice(&bytes)
            .map_err(|e| CustodyError::Malformed(format!("{CONFIG_FILE}: {e}")))?;
        if config.version != 1
            || config.threshold < 2
            || config.threshold > config.shares
            || config.shares > MAX_SHARES
            || config.checks.len() != usize::from(config.shares)
        {
            return Err(CustodyError::Malformed(format!(
                "{CONFIG_FILE}: inconsistent threshold, share count or check values"
            )));
        }
        Ok(Some(config))
    }

    /// Writes `unseal.json` into `home`.
    pub fn save(&self, home: &Path) -> Result<()> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| CustodyError::Malformed(e.to_string()))?;
        crate::software::write_atomic(&home.join(CONFIG_FILE), &json)?;
        Ok(())
    }
}

/// A new unseal key split into `shares` shares, any `threshold` of which recover it: the
/// configuration to keep, the keystore passphrase, and the shares to hand out (once).
pub struct Split {
    /// What `unseal.json` keeps.
    pub config: UnsealConfig,
    /// The keystore's passphrase the shares recover.
    pub passphrase: SecretBytes,
    /// The shares, to hand out once.
    pub shares: Vec<Zeroizing<String>>,
}

/// Splits a fresh unseal key.
pub fn split(threshold: u8, shares: u8, rng: &dyn SecureRng) -> Result<Split> {
    if threshold < 2 || threshold > shares || shares > MAX_SHARES {
        return Err(CustodyError::Malformed(format!(
            "unseal shares: need 2 <= threshold <= shares <= {MAX_SHARES} (got {threshold} of {shares})"
        )));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    rng.fill(key.as_mut());
    let mut adapter = RngAdapter(rng);
    let dealt: Vec<blahaj::Share> = blahaj::Sharks(threshold)
        .dealer_rng(key.as_ref(), &mut adapter)
        .take(usize::from(shares))
        .collect();
    let mut checks = BTreeMap::new();
    let mut texts = Vec::new();
    for share in &dealt {
        let bytes = Zeroizing::new(Vec::from(share));
        checks.insert(bytes[0], hex::encode(check_value(&bytes)));
        texts.push(Zeroizing::new(format!(
            "{SHARE_PREFIX}{}",
            hex::encode(bytes.as_slice())
        )));
    }
    Ok(Split {
        config: UnsealConfig {
            version: 1,
            threshold,
            shares,
            checks,
        },
        passphrase: passphrase_of(key.as_ref()),
        shares: texts,
    })
}

fn check_value(share: &[u8]) -> [u8; 32] {
    let mut input = Zeroizing::new(CHECK_DOMAIN.to_vec());
    input.extend_from_slice(share);
    sha256(&input)
}

fn passphrase_of(key: &[u8]) -> SecretBytes {
    let mut text = PASSPHRASE_PREFIX.as_bytes().to_vec();
    text.extend_from_slice(hex::encode(key).as_bytes());
    SecretBytes::new(text)
}

/// Where an unsealing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsealProgress {
    /// Distinct shares accepted so far.
    pub accepted: u8,
    /// Shares needed.
    pub threshold: u8,
    /// Whether the keystore is unsealed.
    pub unsealed: bool,
}

/// Shares submitted so far, checked one by one.
pub struct Unsealer {
    config: UnsealConfig,
    accepted: BTreeMap<u8, Zeroizing<Vec<u8>>>,
}

impl Unsealer {
    /// An unsealer for `config`, with no share yet.
    pub fn new(config: UnsealConfig) -> Self {
        Self {
            config,
            accepted: BTreeMap::new(),
        }
    }

    /// How far unsealing has come.
    pub fn progress(&self) -> UnsealProgress {
        let accepted = u8::try_from(self.accepted.len()).unwrap_or(u8::MAX);
        UnsealProgress {
            accepted,
            threshold: self.config.threshold,
            unsealed: accepted >= self.config.threshold,
        }
    }

    /// Adds one share. A share that is malformed, not one of this keystore's, or already
    /// given is refused and changes nothing.
    pub fn submit(&mut self, share: &str) -> Result<UnsealProgress> {
        let refused = |why: &str| CustodyError::ShareRefused(why.to_owned());
        let hex_part = share
            .trim()
            .strip_prefix(SHARE_PREFIX)
            .ok_or_else(|| refused("not an unseal share (they start with kfs1-)"))?;
        let bytes = Zeroizing::new(
            hex::decode(hex_part).map_err(|_| refused("the share is not valid hex"))?,
        );
        if bytes.len() != 1 + KEY_LEN {
            return Err(refused("the share has the wrong length"));
        }
        let number = bytes[0];
        let expected = self
            .config
            .checks
            .get(&number)
            .ok_or_else(|| refused("the share is not one of this keystore's"))?;
        if hex::encode(check_value(&bytes)) != *expected {
            return Err(refused(
                "the share is not one of this keystore's (check value)",
            ));
        }
        if self.accepted.contains_key(&number) {
            return Err(CustodyError::ShareRefused(format!(
                "share {number} was already given"
            )));
        }
        self.accepted.insert(number, bytes);
        Ok(self.progress())
    }

    /// The keystore passphrase, once enough shares are in.
    pub fn passphrase(&self) -> Result<SecretBytes> {
        let p = self.progress();
        if !p.unsealed {
            return Err(CustodyError::ShareRefused(format!(
                "sealed: {} of {} shares given",
                p.accepted, p.threshold
            )));
        }
        let shares: Vec<blahaj::Share> = self
            .accepted
            .values()
            .map(|b| blahaj::Share::try_from(b.as_slice()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| CustodyError::Malformed(e.to_owned()))?;
        let key = Zeroizing::new(
            blahaj::Sharks(self.config.threshold)
                .recover(&shares)
                .map_err(|e| CustodyError::Malformed(e.to_owned()))?,
        );
        Ok(passphrase_of(&key))
    }
}

/// Our injected randomness as the generator `blahaj` draws polynomial coefficients from.
struct RngAdapter<'a>(&'a dyn SecureRng);

impl rand_core::TryRng for RngAdapter<'_> {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> std::result::Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> std::result::Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> std::result::Result<(), Self::Error> {
        self.0.fill(dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for RngAdapter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfab_crypto::rng::SystemRng;

    #[test]
    fn threshold_shares_unseal_and_fewer_do_not() {
        let s = split(3, 5, &SystemRng).unwrap();
        let mut u = Unsealer::new(s.config.clone());
        assert!(!u.submit(&s.shares[4]).unwrap().unsealed);
        assert!(!u.submit(&s.shares[1]).unwrap().unsealed);
        assert!(u.passphrase().is_err(), "two of three must stay sealed");
        assert!(u.submit(&s.shares[3]).unwrap().unsealed);
        assert_eq!(u.passphrase().unwrap().expose(), s.passphrase.expose());
        // Any other three recover the same key.
        let mut v = Unsealer::new(s.config);
        for i in [0, 2, 1] {
            v.submit(&s.shares[i]).unwrap();
        }
        assert_eq!(v.passphrase().unwrap().expose(), s.passphrase.expose());
    }

    #[test]
    fn a_wrong_duplicate_or_foreign_share_is_refused_and_changes_nothing() {
        let s = split(2, 3, &SystemRng).unwrap();
        let other = split(2, 3, &SystemRng).unwrap();
        let mut u = Unsealer::new(s.config.clone());
        let mut altered = s.shares[0].to_string();
        let last = if altered.ends_with('0') { "1" } else { "0" };
        altered.replace_range(altered.len() - 1.., last);
        for bad in [
            altered.as_str(),
            other.shares[0].as_str(),
            "kfs1-zz",
            "hello",
        ] {
            assert!(
                matches!(u.submit(bad), Err(CustodyError::ShareRefused(_))),
                "{bad}"
            );
            assert_eq!(u.progress().accepted, 0);
        }
        u.submit(&s.shares[0]).unwrap();
        assert!(matches!(
            u.submit(&s.shares[0]),
            Err(CustodyError::ShareRefused(_))
        ));
        assert_eq!(u.progress().accepted, 1);
    }

    #[test]
    fn the_configuration_survives_a_round_trip_and_bad_ones_are_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(UnsealConfig::load(d.path()).unwrap().is_none());
        let s = split(2, 4, &SystemRng).unwrap();
        s.config.save(d.path()).unwrap();
        assert_eq!(UnsealConfig::load(d.path()).unwrap().unwrap(), s.config);
        let mut bad = s.config.clone();
        bad.threshold = 9;
        bad.save(d.path()).unwrap();
        assert!(UnsealConfig::load(d.path()).is_err());
        assert!(split(1, 3, &SystemRng).is_err());
        assert!(split(4, 3, &SystemRng).is_err());
    }
}
