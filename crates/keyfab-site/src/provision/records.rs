//! What the site stores per device, per request and per entitlement, and the keys it
//! stores them under (docs/FORMATS.md §9): the records a decision reads and writes, kept
//! apart from the engine that makes them so their layouts can be read — and tested — on
//! their own.

use super::Programming;
use keyfab_node::{decode, encode, Error, Result};
use keyfab_policy::DenyCode;
use keyfab_policy_code::CodeCounters;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the site keeps per provisioned device beside its audit record, which holds the
/// key ids and certificates: where that record is, and what a retry needs that the
/// audit must never hold. Stored as an array ([`DeviceRecord::to_stored`]); the derived
/// (map) form is how stores written before kept it, read still (and written by tests).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct DeviceRecord {
    pub(super) request_id: String,
    pub(super) audit_sequence: u64,
    /// Key of the audit row holding that record.
    pub(super) audit_row: u64,
    /// The node chain of that record; `None` for the site chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) audit_chain: Option<String>,
    pub(super) time: i64,
    pub(super) station: Option<String>,
    pub(super) pool_index: Option<u64>,
    /// Per key spec: a `site` key's secret sealed under the entitlement's data key (so a
    /// retry gets the same key); empty for other sources.
    pub(super) sealed: Vec<serde_bytes::ByteBuf>,
    /// What the station reported after programming, and the audit record of it. Once
    /// set, the keys are never handed out again.
    #[serde(default)]
    pub(super) confirmed: Option<Confirmation>,
    /// Hex SHA-256 of the transport key the keys were sealed to, if any: a retry must
    /// carry the same key, or anyone retrying a request id could have the keys re-sealed
    /// to a key of their own.
    #[serde(default)]
    pub(super) transport_key: Option<String>,
    /// Hex SHA-256 of the chip certificate the release was attested with, if any: a
    /// retry must carry the same chain. (Absent from records written before, which
    /// have ten fields.)
    #[serde(default)]
    pub(super) chip: Option<String>,
}

/// The fields of a [`DeviceRecord`] in its stored order.
type DeviceRow = (
    String,
    u64,
    u64,
    Option<String>,
    i64,
    Option<String>,
    Option<u64>,
    Vec<serde_bytes::ByteBuf>,
    Option<Confirmation>,
    Option<String>,
    Option<String>,
);

/// The first byte of a CBOR array of ten items, and of eleven: a record without the
/// chip field (every record before attestation, and every release without it), and one
/// with it.
const ROW_OF_TEN: u8 = 0x8a;
const ROW_OF_ELEVEN: u8 = 0x8b;
/// CBOR `null`.
const NULL: u8 = 0xf6;

impl DeviceRecord {
    /// The stored form: a CBOR array of the fields in declaration order, the chip field
    /// left out (ten items, the bytes of records before it) when there is none. A
    /// device's record is written with every decision and its bytes are most of what a
    /// commit writes per device: the array is half the bytes of the map stores kept
    /// before (at concurrency 64 the committer spends ~1.3 µs less per device;
    /// BENCHMARKS.md).
    pub(super) fn to_stored(&self) -> Result<Vec<u8>> {
        let mut bytes = encode(&(
            &self.request_id,
            self.audit_sequence,
            self.audit_row,
            &self.audit_chain,
            self.time,
            &self.station,
            self.pool_index,
            &self.sealed,
            &self.confirmed,
            &self.transport_key,
            &self.chip,
        ))?;
        if self.chip.is_none() && bytes.first() == Some(&ROW_OF_ELEVEN) {
            // The last item is that null: an array of ten without it.
            bytes.pop();
            bytes[0] = ROW_OF_TEN;
        }
        Ok(bytes)
    }

    /// A stored record: the array form (ten items or eleven), or the map form of
    /// stores written before.
    pub(super) fn from_stored(bytes: &[u8]) -> Result<Self> {
        // The CBOR major type, in the first byte's top three bits: 4 an array, 5 a map.
        if bytes.first().map(|b| b >> 5) != Some(4) {
            return decode(bytes);
        }
        let row: DeviceRow = match bytes.split_first() {
            // Ten items: the eleventh, the chip, is null.
            Some((&ROW_OF_TEN, items)) => {
                let mut eleven = Vec::with_capacity(bytes.len() + 1);
                eleven.push(ROW_OF_ELEVEN);
                eleven.extend_from_slice(items);
                eleven.push(NULL);
                decode(&eleven)?
            }
            _ => decode(bytes)?,
        };
        Ok(Self {
            request_id: row.0,
            audit_sequence: row.1,
            audit_row: row.2,
            audit_chain: row.3,
            time: row.4,
            station: row.5,
            pool_index: row.6,
            sealed: row.7,
            confirmed: row.8,
            transport_key: row.9,
            chip: row.10,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Confirmation {
    pub(super) result: Programming,
    pub(super) audit_sequence: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RequestRecord {
    pub(super) device_id: String,
    pub(super) audit_sequence: u64,
    /// `None` when allowed, else the refusal code.
    pub(super) denied: Option<DenyCode>,
    /// The policy module's reason, when it refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<String>,
    /// The station that made the request: only it is answered a retry. (Absent in
    /// records of stores written before, and for requests from the CLI with no
    /// `--station`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) station: Option<String>,
}

/// Per-entitlement runtime state (counters, activation, revocation), one record so a
/// decision reads and guards one key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    /// A quorum approved `activate`.
    #[serde(default)]
    pub activated: bool,
    /// HQ revoked the entitlement.
    #[serde(default)]
    pub revoked: bool,
    /// Devices released.
    pub total: u64,
    /// The next pool slot to take.
    pub next_pool: u64,
    /// Devices allowed per calendar day (policy time zone), `YYYY-MM-DD` → count.
    pub days: BTreeMap<String, u64>,
    /// Kept only when the policy has a module: its inputs and state.
    #[serde(default, skip_serializing_if = "is_default")]
    pub code: CodeCounters,
    /// Pool slots granted to a cluster node and given back unused, `[start, end)`: the
    /// next grants take these before slots from `next_pool` on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub returned_pool: Vec<(u64, u64)>,
    /// Raises of the daily limit a quorum approved (`raise-limit`), in the order they
    /// were approved: read with the counters, so a decision sees the raise in force.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raises: Vec<keyfab_policy::Raise>,
}

impl Counters {
    /// The daily limit a quorum raised `day` to, if any.
    pub fn raised_on(&self, day: &str) -> Option<u64> {
        keyfab_policy::raised_on(&self.raises, day)
    }
}

fn is_default(c: &CodeCounters) -> bool {
    *c == CodeCounters::default()
}

pub(super) fn ent_key(entitlement: &str, sub: &str) -> Vec<u8> {
    let mut k = entitlement.as_bytes().to_vec();
    k.push(b'/');
    k.extend_from_slice(sub.as_bytes());
    k
}

/// Key of a refused request in the `devices` table: the device's key ‖ 0x00 ‖ request id.
/// Request ids are scoped to their device (a retry names the same device), and a
/// device's record and its refusals share one key range, so one guard covers them all
/// ([`device_history_end`]). Allowed requests need no row of their own: the device
/// record holds the request id. Device ids that may be provisioned have no control
/// characters and request ids are printable, so no two keys collide.
pub(super) fn refusal_key(dev_key: &[u8], request_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(dev_key.len() + 1 + request_id.len());
    k.extend_from_slice(dev_key);
    k.push(0);
    k.extend_from_slice(request_id.as_bytes());
    k
}

/// The end of a device's key range: its record and every refusal, `[dev_key, end)`.
pub(super) fn device_history_end(dev_key: &[u8]) -> Vec<u8> {
    let mut end = dev_key.to_vec();
    end.push(1);
    end
}

/// Key of a refused request in the `requests` table, where stores written before
/// refusals moved next to their device keep them: entitlement ‖ '/' ‖ device id length
/// (u16 BE) ‖ device id ‖ request id. Read, never written.
pub(super) fn legacy_request_key(entitlement: &str, device_id: &str, request_id: &str) -> Vec<u8> {
    let mut k = entitlement.as_bytes().to_vec();
    k.push(b'/');
    k.extend_from_slice(
        &u16::try_from(device_id.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    k.extend_from_slice(device_id.as_bytes());
    k.extend_from_slice(request_id.as_bytes());
    k
}

pub(super) fn i64_of(bytes: &[u8]) -> Result<i64> {
    Ok(i64::from_be_bytes(
        bytes
            .try_into()
            .map_err(|_| Error::Corrupt("stored time".into()))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceRecord {
        DeviceRecord {
            request_id: "r-1".into(),
            audit_sequence: 7,
            audit_row: 5,
            audit_chain: None,
            time: 1_767_225_600,
            station: Some("line-1".into()),
            pool_index: None,
            sealed: vec![serde_bytes::ByteBuf::from(vec![0xAB; 4])],
            confirmed: None,
            transport_key: None,
            chip: None,
        }
    }

    /// The stored bytes of [`sample`], as docs/FORMATS.md gives them.
    /// An array of ten: "r-1", 7, 5, null, 1767225600, "line-1", null, [h'abababab'],
    /// null, null.
    const SAMPLE_STORED: &str = "8a63722d310705f61a6955b900666c696e652d31f68144ababababf6f6";

    #[test]
    fn a_device_record_is_stored_as_the_documented_array() {
        let stored = sample().to_stored().expect("encodes");
        assert_eq!(hex::encode(&stored), SAMPLE_STORED);
        let back = DeviceRecord::from_stored(&stored).expect("decodes");
        assert_eq!(format!("{back:?}"), format!("{:?}", sample()));
        // Attested: an eleventh field, the chip certificate's fingerprint.
        let attested = DeviceRecord {
            chip: Some("ab".repeat(32)),
            ..sample()
        };
        let stored = attested.to_stored().expect("encodes");
        assert_eq!(stored[0], 0x8b);
        let back = DeviceRecord::from_stored(&stored).expect("decodes");
        assert_eq!(format!("{back:?}"), format!("{attested:?}"));
    }

    #[test]
    fn a_device_record_in_the_map_form_of_older_stores_still_reads() {
        let mut old = sample();
        old.audit_chain = Some("n0011".into());
        old.confirmed = Some(Confirmation {
            result: Programming::Programmed,
            audit_sequence: 9,
        });
        let map = encode(&old).expect("encodes");
        assert_eq!(map.first().map(|b| b >> 5), Some(5), "not a CBOR map");
        let back = DeviceRecord::from_stored(&map).expect("decodes");
        assert_eq!(format!("{back:?}"), format!("{old:?}"));
        let array = old.to_stored().expect("encodes");
        assert!(
            array.len() * 10 < map.len() * 6,
            "{} bytes against {}",
            array.len(),
            map.len()
        );
        let back = DeviceRecord::from_stored(&array).expect("decodes");
        assert_eq!(format!("{back:?}"), format!("{old:?}"));
    }

    #[test]
    fn a_damaged_device_record_is_an_error_not_a_panic() {
        let stored = sample().to_stored().expect("encodes");
        for cut in 0..stored.len() {
            assert!(
                DeviceRecord::from_stored(&stored[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}
