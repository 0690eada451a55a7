//! Key material sealed to a device's chip (FORMATS.md §10): the station carries it, only
//! the chip opens it.
//!
//! HPKE (RFC 9180, base mode, DHKEM(P-256)/HKDF-SHA256/AES-256-GCM) to the chip's
//! transport key. The `info` binds the format, the site, the entitlement and the device
//! id, so a package for one device never opens as another's. One context seals the
//! device's keys in the policy's order; each key's `aad` names it, so keys can be neither
//! swapped nor renamed.
//!
//! ```
//! use keyfab_crypto::{hpke::HpkeSecretKey, rng::SystemRng};
//! use keyfab_formats::chip::{open_keys, seal_keys, Binding};
//! let chip = HpkeSecretKey::generate(&SystemRng);
//! let b = Binding { site: "shenzhen-1", entitlement: "e1", device_id: "TSV2-00000001" };
//! let (enc, sealed) = seal_keys(&chip.public_key().unwrap(), &b, &[("identity", b"secret")], &SystemRng).unwrap();
//! let opened = open_keys(&chip, &b, &enc, &[("identity", sealed[0].as_slice())]).unwrap();
//! assert_eq!(opened[0].expose(), b"secret");
//! ```

use crate::Malformed;
use crate::{FormatError, Result};
use keyfab_crypto::hpke::{self, HpkePublicKey, HpkeSecretKey};
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::SecretBytes;

const INFO_LABEL: &[u8] = b"keyfab-chip-v1";
const AAD_LABEL: &[u8] = b"keyfab-chip-key-v1";

/// What a package is for.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// The site's name.
    pub site: &'a str,
    /// The entitlement id.
    pub entitlement: &'a str,
    /// The device id.
    pub device_id: &'a str,
}

fn push_field(out: &mut Vec<u8>, field: &[u8]) -> Result<()> {
    let len = u16::try_from(field.len())
        .map_err(|_| FormatError::Write("chip binding field too long".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field);
    Ok(())
}

/// `info` = label, then site, entitlement and device id, each behind a u16 BE length.
fn info(b: &Binding<'_>) -> Result<Vec<u8>> {
    let mut out = INFO_LABEL.to_vec();
    for f in [b.site, b.entitlement, b.device_id] {
        push_field(&mut out, f.as_bytes())?;
    }
    Ok(out)
}

/// `aad` of one key = label, then its name behind a u16 BE length.
fn aad(name: &str) -> Result<Vec<u8>> {
    let mut out = AAD_LABEL.to_vec();
    push_field(&mut out, name.as_bytes())?;
    Ok(out)
}

/// Seals `keys` (name, secret) to `chip`: the encapsulated key, and one ciphertext per
/// key in order.
pub fn seal_keys(
    chip: &HpkePublicKey,
    binding: &Binding<'_>,
    keys: &[(&str, &[u8])],
    rng: &dyn SecureRng,
) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let (enc, mut sealer) = hpke::seal_context(chip, &info(binding)?, rng)
        .map_err(|e| FormatError::Write(e.to_string()))?;
    let sealed = keys
        .iter()
        .map(|(name, secret)| {
            sealer
                .seal(secret, &aad(name)?)
                .map_err(|e| FormatError::Write(e.to_string()))
        })
        .collect::<Result<_>>()?;
    Ok((enc, sealed))
}

/// Opens a package on the chip: every key, in the order sealed, or an error if anything
/// is off (another device, another site, a key swapped, renamed or altered).
pub fn open_keys(
    chip: &HpkeSecretKey,
    binding: &Binding<'_>,
    enc: &[u8],
    sealed: &[(&str, &[u8])],
) -> Result<Vec<SecretBytes>> {
    let refused = || {
        FormatError::malformed(
            Malformed::Undecryptable,
            "the package does not open on this chip",
        )
    };
    let mut opener = hpke::open_context(chip, enc, &info(binding)?).map_err(|_| refused())?;
    sealed
        .iter()
        .map(|(name, ct)| opener.open(ct, &aad(name)?).map_err(|_| refused()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfab_crypto::rng::SeededRng;

    #[test]
    fn a_package_opens_only_where_and_as_it_was_sealed() {
        let rng = SeededRng::new(5);
        let chip = HpkeSecretKey::generate(&rng);
        let b = Binding {
            site: "shenzhen-1",
            entitlement: "e1",
            device_id: "D-1",
        };
        let keys: [(&str, &[u8]); 2] = [("identity", b"first"), ("firmware", b"second")];
        let (enc, sealed) = seal_keys(&chip.public_key().unwrap(), &b, &keys, &rng).unwrap();
        let pairs = |names: [&'static str; 2], order: [usize; 2]| -> Vec<(&'static str, Vec<u8>)> {
            names
                .iter()
                .zip(order)
                .map(|(n, i)| (*n, sealed[i].clone()))
                .collect()
        };
        let open = |b: &Binding<'_>, chip: &HpkeSecretKey, p: &[(&str, Vec<u8>)]| {
            let refs: Vec<(&str, &[u8])> = p.iter().map(|(n, c)| (*n, c.as_slice())).collect();
            open_keys(chip, b, &enc, &refs)
        };
        let good = pairs(["identity", "firmware"], [0, 1]);
        let opened = open(&b, &chip, &good).unwrap();
        assert_eq!(opened[1].expose(), b"second");
        // Another device, site or entitlement; another chip; keys swapped or renamed.
        for other in [
            Binding {
                device_id: "D-2",
                ..b
            },
            Binding {
                site: "penang-2",
                ..b
            },
            Binding {
                entitlement: "e2",
                ..b
            },
        ] {
            assert!(open(&other, &chip, &good).is_err());
        }
        assert!(open(&b, &HpkeSecretKey::generate(&rng), &good).is_err());
        assert!(open(&b, &chip, &pairs(["identity", "firmware"], [1, 0])).is_err());
        assert!(open(&b, &chip, &pairs(["firmware", "identity"], [0, 1])).is_err());
        let mut altered = good.clone();
        altered[0].1[0] ^= 1;
        assert!(open(&b, &chip, &altered).is_err());
    }
}
