//! Which chip attestation goes with which release: a site records `chip_attested` just
//! before the release it is for, in the same commit and chain (FORMATS.md §9). One reading
//! of that rule for every view — the replay, the manifest, a device's provenance.

use keyfab_audit::{Event, Record};
use std::collections::HashMap;

/// A `chip_attested` record, until its release.
#[derive(Debug, Clone)]
pub(crate) struct Attestation {
    /// Its sequence in its chain.
    pub(crate) sequence: u64,
    pub(crate) entitlement: String,
    pub(crate) request_id: String,
    pub(crate) device_id: String,
    /// Hex SHA-256 of the chip certificate.
    pub(crate) certificate: String,
    /// The chip certificate's serial, hex.
    pub(crate) serial: String,
    /// `spki-sha256:` id of the transport key the keys were sealed to.
    pub(crate) transport_key: Option<String>,
    /// The chain, DER, leaf first.
    pub(crate) chain: Vec<Vec<u8>>,
}

/// The attestation each chain recorded last and no release has taken yet.
#[derive(Default)]
pub(crate) struct Attestations(HashMap<Option<String>, Attestation>);

/// What one record says of attestations.
pub(crate) struct Paired {
    /// For a release: the attestation recorded just before it, for its request.
    pub(crate) release: Option<Attestation>,
    /// An attestation no release of its request followed.
    pub(crate) unreleased: Option<Attestation>,
}

impl Attestations {
    /// Reads `r`, the next record of the log in order.
    pub(crate) fn next(&mut self, r: &Record) -> Paired {
        let before = self.0.remove(&r.chain);
        match &r.event {
            Event::ChipAttested {
                entitlement,
                request_id,
                device_id,
                certificate,
                serial,
                transport_key,
                chain,
            } => {
                self.0.insert(
                    r.chain.clone(),
                    Attestation {
                        sequence: r.sequence,
                        entitlement: entitlement.clone(),
                        request_id: request_id.clone(),
                        device_id: device_id.clone(),
                        certificate: certificate.clone(),
                        serial: serial.clone(),
                        transport_key: transport_key.clone(),
                        chain: chain.iter().map(|c| c.to_vec()).collect(),
                    },
                );
                Paired {
                    release: None,
                    unreleased: before,
                }
            }
            Event::ProvisionAllowed {
                entitlement,
                request_id,
                device_id,
                ..
            } => match before {
                Some(a)
                    if a.entitlement == *entitlement
                        && a.request_id == *request_id
                        && a.device_id == *device_id =>
                {
                    Paired {
                        release: Some(a),
                        unreleased: None,
                    }
                }
                other => Paired {
                    release: None,
                    unreleased: other,
                },
            },
            _ => Paired {
                release: None,
                unreleased: before,
            },
        }
    }
}
