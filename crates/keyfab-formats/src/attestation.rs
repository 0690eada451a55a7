//! A chip's certificate chain judged against a policy's `[chips]`: the one function the
//! site runs before it decides and HQ runs again over the audit log, so both read the
//! same facts from the same bytes (docs/THREAT-MODEL.md, "Chip attestation").

use keyfab_crypto::x509::chip::{verify_chip_chain, ChipLeaf, ChipRefusal};
use keyfab_policy::{rfc3339, ChipFacts, Chips, DenyCode};

/// A chain as the policy's rules see it.
#[derive(Debug, Clone)]
pub enum ChipSeen {
    /// No chain, or the policy does not look at chains.
    Absent,
    /// A chain that does not verify to the policy's roots, and why.
    Untrusted(String),
    /// A chain that verifies.
    Verified(Box<VerifiedChip>),
}

/// A chain that verified: what the rules decide on, and the leaf's own facts.
#[derive(Debug, Clone)]
pub struct VerifiedChip {
    /// What the policy's rules look at.
    pub facts: ChipFacts,
    /// The leaf's fingerprint and serial, for the audit record.
    pub leaf: ChipLeaf,
}

impl ChipSeen {
    /// What [`keyfab_policy::Request::chip`] carries.
    pub fn as_request(&self) -> keyfab_policy::Chip<'_> {
        match self {
            ChipSeen::Absent => keyfab_policy::Chip::Absent,
            ChipSeen::Untrusted(_) => keyfab_policy::Chip::Untrusted,
            ChipSeen::Verified(v) => keyfab_policy::Chip::Verified(&v.facts),
        }
    }

    /// What a chip refusal with `code` at `now` found, in a line for the station and
    /// the audit record: never the certificate's own text, only which check failed and
    /// the keys' ids. `None` for a code that is not a chip refusal.
    pub fn reason(&self, code: DenyCode, now: i64) -> Option<String> {
        let facts = match self {
            ChipSeen::Verified(v) => Some(&v.facts),
            _ => None,
        };
        Some(match code {
            DenyCode::ChipUntrusted => match (self, facts) {
                (ChipSeen::Untrusted(why), _) => bounded(why),
                (_, Some(f)) => format!(
                    "the chip certificate chain is valid from {} to {}, not at {}",
                    rfc3339(f.not_before),
                    rfc3339(f.not_after),
                    rfc3339(now)
                ),
                _ => "no chip certificate chain: the policy requires one".to_owned(),
            },
            DenyCode::ChipKeyMismatch => {
                let f = facts?;
                let named = |k: &Option<String>| k.clone().unwrap_or_else(|| "none".to_owned());
                format!(
                    "the chip certificate certifies {}; the request presents transport key {} and CSR key {} (keys with a private part need the chip's transport key)",
                    f.key_id,
                    named(&f.transport_key),
                    named(&f.csr_key)
                )
            }
            DenyCode::ChipBindingMismatch => {
                "the chip certificate does not name this device id where [chips] device_id_from says"
                    .to_owned()
            }
            _ => return None,
        })
    }
}

/// A verifier's message, cut to a line that fits any record.
fn bounded(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Judges `chain` (leaf first) against `chips`, with the keys the request presents as
/// the chip's (`spki-sha256:<hex>`): its transport key and its CSR's key.
pub fn judge(
    chips: Option<&Chips>,
    chain: Option<&[Vec<u8>]>,
    transport_key: Option<String>,
    csr_key: Option<String>,
) -> ChipSeen {
    let (Some(chips), Some(chain)) = (chips.filter(|c| c.checks()), chain) else {
        return ChipSeen::Absent;
    };
    let roots: Vec<&[u8]> = chips.roots.iter().map(|r| r.as_slice()).collect();
    match verify_chip_chain(chain, &roots) {
        Ok(leaf) => ChipSeen::Verified(Box::new(VerifiedChip {
            facts: ChipFacts {
                key_id: leaf.key_id.clone(),
                not_before: leaf.not_before.0,
                not_after: leaf.not_after.0,
                subject_cn: leaf.subject_cn.clone(),
                subject_serial: leaf.subject_serial.clone(),
                san_uris: leaf.san_uris.clone(),
                transport_key,
                csr_key,
            },
            leaf,
        })),
        Err(ChipRefusal::Malformed(m) | ChipRefusal::Untrusted(m)) => ChipSeen::Untrusted(m),
    }
}
