//! The strict decoder of a record's bytes (FORMATS.md §9, "Audit records").
//!
//! A record has one fixed shape: the CBOR that [`Record::to_bytes`] writes, a map whose
//! keys come in declaration order, every head in its shortest form, every length
//! definite. This decoder accepts exactly that shape and nothing else, so a record that
//! decodes is canonical without being encoded again to compare — HQ reads millions of
//! records per import, and the generic serde path (decode, re-encode, compare) was most
//! of the time it spent. The fuzz target `audit_record` holds it to that: whatever
//! decodes encodes back to the same bytes, and agrees with the generic decoder.

use crate::{AuditError, AuditedKey, Event, Record};

/// CBOR major types (RFC 8949 §3.1).
const UINT: u8 = 0;
const NINT: u8 = 1;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const MAP: u8 = 5;
const NULL: u8 = 0xf6;

/// A cursor over one record's bytes. Every method returns `None` on anything but the
/// shortest, definite form of what it expects.
struct Cbor<'a> {
    rest: &'a [u8],
}

impl<'a> Cbor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    /// A data item's head: its major type and argument, in shortest form (§4.2.1).
    fn head(&mut self) -> Option<(u8, u64)> {
        let first = *self.take(1)?.first()?;
        let (major, info) = (first >> 5, first & 0x1f);
        let (value, shortest_from) = match info {
            0..=23 => return Some((major, u64::from(info))),
            24 => (u64::from(self.take(1)?[0]), 24),
            25 => (
                u64::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)),
                0x100,
            ),
            26 => (
                u64::from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)),
                0x1_0000,
            ),
            27 => (
                u64::from_be_bytes(self.take(8)?.try_into().ok()?),
                0x1_0000_0000,
            ),
            // Reserved values and indefinite lengths are never written.
            _ => return None,
        };
        (value >= shortest_from).then_some((major, value))
    }

    fn expect(&mut self, major: u8) -> Option<u64> {
        let (m, v) = self.head()?;
        (m == major).then_some(v)
    }

    fn uint(&mut self) -> Option<u64> {
        self.expect(UINT)
    }

    fn int(&mut self) -> Option<i64> {
        match self.head()? {
            (UINT, v) => i64::try_from(v).ok(),
            (NINT, v) => i64::try_from(v).ok().map(|v| -1 - v),
            _ => None,
        }
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.expect(BYTES)?).ok()?;
        self.take(len)
    }

    fn text(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.expect(TEXT)?).ok()?;
        std::str::from_utf8(self.take(len)?).ok()
    }

    fn string(&mut self) -> Option<String> {
        self.text().map(str::to_owned)
    }

    /// A map of exactly `fields` entries.
    fn map(&mut self, fields: u64) -> Option<()> {
        (self.expect(MAP)? == fields).then_some(())
    }

    /// The next map key, which must be `name`.
    fn key(&mut self, name: &str) -> Option<()> {
        (self.text()? == name).then_some(())
    }

    /// `null`, or the item `read` reads.
    fn optional<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.rest.first() == Some(&NULL) {
            self.rest = &self.rest[1..];
            return Some(None);
        }
        read(self).map(Some)
    }

    fn field<T>(&mut self, name: &str, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        self.key(name)?;
        read(self)
    }
}

/// Decodes a record's canonical bytes; anything else is [`AuditError::Malformed`].
pub(crate) fn record(bytes: &[u8]) -> Result<Record, AuditError> {
    let mut c = Cbor { rest: bytes };
    let record = decode_record(&mut c).ok_or(AuditError::Malformed(0))?;
    if !c.rest.is_empty() {
        return Err(AuditError::Malformed(record.sequence));
    }
    Ok(record)
}

fn decode_record(c: &mut Cbor<'_>) -> Option<Record> {
    // Five fields, or six with the node chain last (absent, not null, for the site's).
    let fields = c.expect(MAP)?;
    if !(5..=6).contains(&fields) {
        return None;
    }
    let sequence = c.field("sequence", Cbor::uint)?;
    let time = c.field("time", Cbor::int)?;
    let site = c.field("site", Cbor::string)?;
    let event = c.field("event", decode_event)?;
    let prev_hash = c.field("prev_hash", Cbor::bytes)?;
    let chain = match fields {
        6 => Some(c.field("chain", Cbor::string)?),
        _ => None,
    };
    (prev_hash.len() == 32).then(|| Record {
        sequence,
        time,
        site,
        event,
        prev_hash: prev_hash.to_vec(),
        chain,
    })
}

fn decode_event(c: &mut Cbor<'_>) -> Option<Event> {
    c.map(1)?;
    let name = c.text()?;
    Some(match name {
        "entitlement_imported" => {
            c.map(3)?;
            Event::EntitlementImported {
                entitlement: c.field("entitlement", Cbor::string)?,
                sequence: c.field("sequence", Cbor::uint)?,
                pool_keys: c.field("pool_keys", Cbor::uint)?,
            }
        }
        "provision_allowed" => {
            c.map(6)?;
            Event::ProvisionAllowed {
                entitlement: c.field("entitlement", Cbor::string)?,
                request_id: c.field("request_id", Cbor::string)?,
                device_id: c.field("device_id", Cbor::string)?,
                station: c.field("station", |c| c.optional(Cbor::string))?,
                pool_index: c.field("pool_index", |c| c.optional(Cbor::uint))?,
                keys: c.field("keys", decode_keys)?,
            }
        }
        "chip_attested" => {
            c.map(7)?;
            Event::ChipAttested {
                entitlement: c.field("entitlement", Cbor::string)?,
                request_id: c.field("request_id", Cbor::string)?,
                device_id: c.field("device_id", Cbor::string)?,
                certificate: c.field("certificate", Cbor::string)?,
                serial: c.field("serial", Cbor::string)?,
                transport_key: c.field("transport_key", |c| c.optional(Cbor::string))?,
                chain: c.field("chain", decode_byte_strings)?,
            }
        }
        "device_confirmed" => {
            c.map(4)?;
            Event::DeviceConfirmed {
                entitlement: c.field("entitlement", Cbor::string)?,
                device_id: c.field("device_id", Cbor::string)?,
                station: c.field("station", |c| c.optional(Cbor::string))?,
                result: c.field("result", Cbor::string)?,
            }
        }
        "provision_denied" => {
            c.map(5)?;
            Event::ProvisionDenied {
                entitlement: c.field("entitlement", Cbor::string)?,
                request_id: c.field("request_id", Cbor::string)?,
                device_id: c.field("device_id", Cbor::string)?,
                station: c.field("station", |c| c.optional(Cbor::string))?,
                code: c.field("code", Cbor::string)?,
            }
        }
        "provision_denied_by_code" => {
            c.map(6)?;
            Event::ProvisionDeniedByCode {
                entitlement: c.field("entitlement", Cbor::string)?,
                request_id: c.field("request_id", Cbor::string)?,
                device_id: c.field("device_id", Cbor::string)?,
                station: c.field("station", |c| c.optional(Cbor::string))?,
                code: c.field("code", Cbor::string)?,
                reason: c.field("reason", Cbor::string)?,
            }
        }
        "station_mismatch" => {
            c.map(5)?;
            Event::StationMismatch {
                entitlement: c.field("entitlement", Cbor::string)?,
                action: c.field("action", Cbor::string)?,
                request_id: c.field("request_id", |c| c.optional(Cbor::string))?,
                device_id: c.field("device_id", Cbor::string)?,
                station: c.field("station", |c| c.optional(Cbor::string))?,
            }
        }
        "clock_rollback" => {
            c.map(2)?;
            Event::ClockRollback {
                observed: c.field("observed", Cbor::int)?,
                high_water: c.field("high_water", Cbor::int)?,
            }
        }
        "clock_ahead" => {
            c.map(2)?;
            Event::ClockAhead {
                observed: c.field("observed", Cbor::int)?,
                high_water: c.field("high_water", Cbor::int)?,
            }
        }
        "approval_accepted" => {
            c.map(4)?;
            Event::ApprovalAccepted {
                entitlement: c.field("entitlement", Cbor::string)?,
                action: c.field("action", Cbor::string)?,
                approver: c.field("approver", Cbor::string)?,
                nonce: c.field("nonce", Cbor::string)?,
            }
        }
        "quorum_approved" => {
            c.map(5)?;
            Event::QuorumApproved {
                entitlement: c.field("entitlement", Cbor::string)?,
                action: c.field("action", Cbor::string)?,
                nonce: c.field("nonce", Cbor::string)?,
                request: c.field("request", |c| {
                    c.bytes().map(|b| serde_bytes::ByteBuf::from(b.to_vec()))
                })?,
                approvals: c.field("approvals", decode_byte_strings)?,
            }
        }
        "entitlement_activated" => {
            c.map(1)?;
            Event::EntitlementActivated {
                entitlement: c.field("entitlement", Cbor::string)?,
            }
        }
        "entitlement_revoked" => {
            c.map(4)?;
            Event::EntitlementRevoked {
                entitlement: c.field("entitlement", Cbor::string)?,
                sequence: c.field("sequence", Cbor::uint)?,
                reason: c.field("reason", Cbor::string)?,
                destroyed_pool_keys: c.field("destroyed_pool_keys", Cbor::uint)?,
            }
        }
        "batch_key_destroyed" => {
            c.map(2)?;
            Event::BatchKeyDestroyed {
                entitlement: c.field("entitlement", Cbor::string)?,
                cause: c.field("cause", Cbor::string)?,
            }
        }
        "setting_changed" => {
            c.map(2)?;
            Event::SettingChanged {
                name: c.field("name", Cbor::string)?,
                value: c.field("value", Cbor::string)?,
            }
        }
        "audit_exported" => {
            c.map(4)?;
            Event::AuditExported {
                bundle: c.field("bundle", Cbor::string)?,
                from_size: c.field("from_size", Cbor::uint)?,
                to_size: c.field("to_size", Cbor::uint)?,
                root: c.field("root", Cbor::string)?,
            }
        }
        "site_latched" => {
            c.map(2)?;
            Event::SiteLatched {
                code: c.field("code", Cbor::string)?,
                reason: c.field("reason", Cbor::string)?,
            }
        }
        "clock_reset" => {
            c.map(5)?;
            Event::ClockReset {
                from: c.field("from", Cbor::int)?,
                to: c.field("to", Cbor::int)?,
                size: c.field("size", Cbor::uint)?,
                root: c.field("root", Cbor::string)?,
                acknowledged_at: c.field("acknowledged_at", Cbor::int)?,
            }
        }
        "rollback_counter_advanced" => {
            c.map(1)?;
            Event::RollbackCounterAdvanced {
                value: c.field("value", Cbor::uint)?,
            }
        }
        "receipt_imported" => {
            c.map(3)?;
            Event::ReceiptImported {
                size: c.field("size", Cbor::uint)?,
                root: c.field("root", Cbor::string)?,
                acknowledged_at: c.field("acknowledged_at", Cbor::int)?,
            }
        }
        _ => return None,
    })
}

fn decode_byte_strings(c: &mut Cbor<'_>) -> Option<Vec<serde_bytes::ByteBuf>> {
    let n = c.expect(ARRAY)?;
    // Each takes at least one byte: a count beyond what is left is a lie.
    if n > c.rest.len() as u64 {
        return None;
    }
    (0..n)
        .map(|_| c.bytes().map(|b| serde_bytes::ByteBuf::from(b.to_vec())))
        .collect()
}

fn decode_keys(c: &mut Cbor<'_>) -> Option<Vec<AuditedKey>> {
    let n = c.expect(ARRAY)?;
    // Each key takes at least a few bytes: a count beyond what is left is a lie, and
    // must not size an allocation.
    if n > c.rest.len() as u64 {
        return None;
    }
    (0..n)
        .map(|_| {
            c.map(4)?;
            Some(AuditedKey {
                name: c.field("name", Cbor::string)?,
                key_id: c.field("key_id", Cbor::string)?,
                cert_serial: c.field("cert_serial", |c| c.optional(Cbor::string))?,
                certificate: c.field("certificate", |c| {
                    c.optional(|c| c.bytes().map(|b| serde_bytes::ByteBuf::from(b.to_vec())))
                })?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One record of every event, with values at each width boundary of CBOR's heads.
    fn samples() -> Vec<Record> {
        let events = vec![
            Event::EntitlementImported {
                entitlement: "e".into(),
                sequence: 23,
                pool_keys: 24,
            },
            Event::ProvisionAllowed {
                entitlement: "e".repeat(24),
                request_id: "r".repeat(255),
                device_id: "d".repeat(256),
                station: Some("line-1".into()),
                pool_index: Some(65_535),
                keys: vec![
                    AuditedKey {
                        name: "k".into(),
                        key_id: "spki-sha256:00".into(),
                        cert_serial: Some("01".into()),
                        certificate: Some(serde_bytes::ByteBuf::from(vec![7u8; 70_000])),
                    },
                    AuditedKey {
                        name: "s".into(),
                        key_id: "kcv:abcdef".into(),
                        cert_serial: None,
                        certificate: None,
                    },
                ],
            },
            Event::ProvisionAllowed {
                entitlement: "e".into(),
                request_id: "r".into(),
                device_id: "d".into(),
                station: None,
                pool_index: None,
                keys: vec![],
            },
            Event::ChipAttested {
                entitlement: "e".into(),
                request_id: "r".into(),
                device_id: "d".into(),
                certificate: "ab".repeat(32),
                serial: "01".into(),
                transport_key: Some("spki-sha256:00".into()),
                chain: vec![
                    serde_bytes::ByteBuf::from(vec![0x30u8; 300]),
                    serde_bytes::ByteBuf::from(vec![]),
                ],
            },
            Event::ChipAttested {
                entitlement: "e".into(),
                request_id: "r".into(),
                device_id: "d".into(),
                certificate: "ab".into(),
                serial: "02".into(),
                transport_key: None,
                chain: vec![],
            },
            Event::DeviceConfirmed {
                entitlement: "e".into(),
                device_id: "d".into(),
                station: Some("line-1".into()),
                result: "failed".into(),
            },
            Event::ProvisionDenied {
                entitlement: "e".into(),
                request_id: "r".into(),
                device_id: "é".into(),
                station: None,
                code: "quota_exceeded".into(),
            },
            Event::ProvisionDeniedByCode {
                entitlement: "e".into(),
                request_id: "r".into(),
                device_id: "d".into(),
                station: Some("line-1".into()),
                code: "policy_denied".into(),
                reason: "more than 500 this shift".into(),
            },
            Event::StationMismatch {
                entitlement: "e".into(),
                action: "provision".into(),
                request_id: Some("r".into()),
                device_id: "d".into(),
                station: Some("line-2".into()),
            },
            Event::StationMismatch {
                entitlement: "e".into(),
                action: "confirm".into(),
                request_id: None,
                device_id: "d".into(),
                station: None,
            },
            Event::ClockRollback {
                observed: -1,
                high_water: i64::MIN,
            },
            Event::ClockAhead {
                observed: 4_102_444_800,
                high_water: 1_767_225_600,
            },
            Event::ApprovalAccepted {
                entitlement: "e".into(),
                action: "activate".into(),
                approver: "ab".into(),
                nonce: "n".into(),
            },
            Event::QuorumApproved {
                entitlement: "e".into(),
                action: "raise-limit".into(),
                nonce: "n".into(),
                request: serde_bytes::ByteBuf::from(vec![0x4b; 40]),
                approvals: vec![
                    serde_bytes::ByteBuf::from(vec![1, 2]),
                    serde_bytes::ByteBuf::new(),
                ],
            },
            Event::EntitlementActivated {
                entitlement: "e".into(),
            },
            Event::RollbackCounterAdvanced { value: u64::MAX },
            Event::EntitlementRevoked {
                entitlement: "e".into(),
                sequence: u64::from(u32::MAX) + 1,
                reason: String::new(),
                destroyed_pool_keys: u64::MAX,
            },
            Event::BatchKeyDestroyed {
                entitlement: "e".into(),
                cause: "window_ended".into(),
            },
            Event::SettingChanged {
                name: "n".into(),
                value: "v".into(),
            },
            Event::AuditExported {
                bundle: "b".into(),
                from_size: 0,
                to_size: 65_536,
                root: "00".into(),
            },
            Event::SiteLatched {
                code: "rollback_detected".into(),
                reason: "r".into(),
            },
            Event::ReceiptImported {
                size: 1,
                root: "00".into(),
                acknowledged_at: i64::MAX,
            },
            Event::ClockReset {
                from: i64::MAX,
                to: -1,
                size: u64::MAX,
                root: "ab".into(),
                acknowledged_at: 1_767_225_600,
            },
        ];
        events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Record {
                sequence: [0, 1, 23, 24, 255, 256, 65_535, 65_536, u64::MAX][i % 9],
                time: [-25, -24, 0, 1_700_000_000, i64::MIN, i64::MAX][i % 6],
                site: "shenzhen-1".into(),
                event,
                prev_hash: vec![i as u8; 32],
                chain: (i % 2 == 1).then(|| format!("n{i:016x}")),
            })
            .collect()
    }

    /// A node chain's record: the five fields of a site-chain record, then `chain`
    /// (FORMATS.md §9, "Chains"). Pinned, and a seed of the `audit_record` fuzz target.
    #[test]
    fn a_node_chain_record_carries_its_chain_last() {
        let r = Record {
            sequence: 1,
            time: 0,
            site: "s".into(),
            event: Event::SettingChanged {
                name: "n".into(),
                value: "v".into(),
            },
            prev_hash: vec![0; 32],
            chain: Some("n0011223344556677".into()),
        };
        let pinned = "a66873657175656e6365016474696d650064736974656173656576656e74a16f73657474696e675f6368616e676564a2646e616d65616e6576616c7565617669707265765f686173685820000000000000000000000000000000000000000000000000000000000000000065636861696e716e30303131323233333434353536363737";
        assert_eq!(hex::encode(r.to_bytes()), pinned);
        assert_eq!(record(&hex::decode(pinned).unwrap()).unwrap(), r);
        // An empty chain is written as absent, never as null.
        let mut null = hex::decode(pinned).unwrap();
        let at = null.len() - 18;
        null.truncate(at);
        null.push(0xf6);
        assert!(record(&null).is_err());
    }

    /// The `chip_attested` seed of the `audit_record` fuzz target decodes: the fuzzer
    /// starts from a record with a real chip chain.
    #[test]
    fn the_chip_attested_seed_decodes() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/seeds/audit_record/chip_attested.cbor"
        );
        let bytes = std::fs::read(path).unwrap();
        let r = record(&bytes).unwrap();
        assert!(matches!(r.event, Event::ChipAttested { ref chain, .. } if chain.len() == 1));
        assert_eq!(r.to_bytes(), bytes);
    }

    #[test]
    fn every_event_round_trips_and_agrees_with_serde() {
        for r in samples() {
            let bytes = r.to_bytes();
            assert_eq!(record(&bytes).unwrap(), r);
            let generic: Record = ciborium::from_reader(bytes.as_slice()).unwrap();
            assert_eq!(generic, r);
        }
    }

    #[test]
    fn anything_but_the_canonical_shape_is_refused() {
        let r = &samples()[2];
        let bytes = r.to_bytes();
        // Every strict prefix and every extension.
        for cut in 0..bytes.len() {
            assert!(record(&bytes[..cut]).is_err(), "prefix of {cut} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(record(&longer).is_err());
        // A non-shortest head: the map's 5 written as 0xb8 0x05 instead of 0xa5.
        let mut wide = vec![0xb8, 0x05];
        wide.extend_from_slice(&bytes[1..]);
        assert!(record(&wide).is_err());
        // An indefinite-length map.
        let mut indefinite = vec![0xbf];
        indefinite.extend_from_slice(&bytes[1..]);
        indefinite.push(0xff);
        assert!(record(&indefinite).is_err());
        // Fields out of order: the generic decoder takes them, the strict one does not.
        let swapped = {
            let mut m = ciborium::Value::serialized(r).unwrap();
            if let ciborium::Value::Map(entries) = &mut m {
                entries.swap(0, 1);
            }
            let mut out = Vec::new();
            ciborium::into_writer(&m, &mut out).unwrap();
            out
        };
        assert!(ciborium::from_reader::<Record, _>(swapped.as_slice()).is_ok());
        assert!(record(&swapped).is_err());
    }
}
