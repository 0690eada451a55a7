//! The audit log: every security-relevant act of a site, as records chained by hash.
//!
//! Which API for which job:
//! - make the next record: [`Head::next`] (sequence and previous hash filled in);
//! - its bytes and hash: [`Record::to_bytes`], [`Record::hash`] (RFC 9162 leaf hash,
//!   SHA-256(0x00 ‖ bytes), so the same hashes can feed a Merkle tree);
//! - check a run of records continues a head: [`verify_chain`] (pure: HQ runs it too);
//! - the Merkle tree over the records' hashes, with inclusion and consistency proofs:
//!   [`merkle`] (RFC 9162).
//!
//! A record never holds a secret: key fingerprints and check values, certificate serials,
//! ids and codes only.
//!
//! ```
//! use keyfab_audit::{verify_chain, Event, Head};
//! let head = Head::genesis();
//! let r1 = head.next(1_700_000_000, "shenzhen-1", Event::EntitlementImported { entitlement: "e1".into(), sequence: 1, pool_keys: 10 });
//! let head2 = Head::after(&r1).unwrap();
//! let r2 = head2.next(1_700_000_001, "shenzhen-1", Event::EntitlementImported { entitlement: "e2".into(), sequence: 2, pool_keys: 10 });
//! assert_eq!(verify_chain(&Head::genesis(), &[r1, r2]).unwrap().sequence, 2);
//! ```
#![forbid(unsafe_code)]

mod decode;
pub mod merkle;

use serde::{Deserialize, Serialize};

/// What happened. New events are added as variants; a verifier refuses unknown ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Externally tagged (`{"provision_allowed": {...}}`): decoded without buffering, which
// matters when HQ reads millions of records.
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// An entitlement was verified and imported.
    EntitlementImported {
        /// The entitlement id.
        entitlement: String,
        /// HQ's sequence number of the entitlement.
        sequence: u64,
        /// How many HQ-pool keys it carried.
        pool_keys: u64,
    },
    /// A device received keys. Recorded before any key leaves.
    ProvisionAllowed {
        /// The entitlement id.
        entitlement: String,
        /// The request id the station sent (a retry sends the same one).
        request_id: String,
        /// The device id the station sent.
        device_id: String,
        /// The station that asked, when it is known.
        station: Option<String>,
        /// The pool slot taken, if the policy has `hq-pool` keys.
        pool_index: Option<u64>,
        /// The keys the device received, by their public identity.
        keys: Vec<AuditedKey>,
    },
    /// The chip a release is for proved itself: its certificate chain verified to a
    /// vendor root of the policy and certifies the key the request presented. Recorded
    /// just before that release's `provision_allowed`, in the same commit; the chain is
    /// kept whole so that HQ verifies it again.
    ChipAttested {
        /// The entitlement id.
        entitlement: String,
        /// The request id of the release.
        request_id: String,
        /// The device id the station sent.
        device_id: String,
        /// SHA-256 of the chip's certificate (DER), hex.
        certificate: String,
        /// The chip certificate's serial number, hex.
        serial: String,
        /// `spki-sha256:<hex>` of the transport key the keys were sealed to, if any.
        transport_key: Option<String>,
        /// The chain as the chip gave it (DER), leaf first.
        chain: Vec<serde_bytes::ByteBuf>,
    },
    /// The station reported programming the device: `programmed`, or `failed` (its keys
    /// are burned). Either way they are never handed out again.
    DeviceConfirmed {
        /// The entitlement id.
        entitlement: String,
        /// The device id the station sent.
        device_id: String,
        /// The station that asked, when it is known.
        station: Option<String>,
        /// `programmed` or `failed`.
        result: String,
    },
    /// A request was refused, with its code.
    ProvisionDenied {
        /// The entitlement id.
        entitlement: String,
        /// The request id the station sent (a retry sends the same one).
        request_id: String,
        /// The device id the station sent.
        device_id: String,
        /// The station that asked, when it is known.
        station: Option<String>,
        /// The refusal's stable code.
        code: String,
    },
    /// A request the built-in rules allowed was refused by the entitlement's policy
    /// module: `policy_denied` with the module's reason, or `policy_error` with what made
    /// the module fail.
    ProvisionDeniedByCode {
        /// The entitlement id.
        entitlement: String,
        /// The request id the station sent (a retry sends the same one).
        request_id: String,
        /// The device id the station sent.
        device_id: String,
        /// The station that asked, when it is known.
        station: Option<String>,
        /// The refusal's stable code.
        code: String,
        /// Why, in words.
        reason: String,
    },
    /// A station asked for what belongs to another station, and was refused
    /// (`station_not_allowed`), nothing released: a retry of a request id another
    /// station made (`action` "provision", with that `request_id`), or a confirmation of
    /// a device another station received (`action` "confirm", no request id).
    StationMismatch {
        /// The entitlement id.
        entitlement: String,
        /// `provision` or `confirm`.
        action: String,
        /// The request id the station sent (a retry sends the same one).
        request_id: Option<String>,
        /// The device id the station sent.
        device_id: String,
        /// The station that asked, when it is known.
        station: Option<String>,
    },
    /// The clock was behind the trusted-time high-water mark by more than the tolerance.
    ClockRollback {
        /// What the clock said (Unix seconds).
        observed: i64,
        /// The site's trusted time (Unix seconds).
        high_water: i64,
    },
    /// The clock was ahead of the trusted time by more than the site allows: not adopted,
    /// and what asked for it refused. Recorded at the trusted time.
    ClockAhead {
        /// What the clock said (Unix seconds).
        observed: i64,
        /// The site's trusted time (Unix seconds).
        high_water: i64,
    },
    /// An approver's signed approval was accepted (one record per distinct approver).
    ApprovalAccepted {
        /// The entitlement id.
        entitlement: String,
        /// The approved action (`activate`, `reprovision`, `raise-limit`).
        action: String,
        /// SHA-256 of the approver's public key.
        approver: String,
        /// The approval's nonce (hex): each approval counts once.
        nonce: String,
    },
    /// Enough distinct listed approvers approved one request (`raise-limit`), and the
    /// site carried it out in this same commit: the raise is in force from this record
    /// on. The request and each approval are kept whole (the approvals with their
    /// payload, the request, detached), so that HQ verifies the quorum itself.
    QuorumApproved {
        /// The entitlement id.
        entitlement: String,
        /// The approved action.
        action: String,
        /// The request's nonce (hex).
        nonce: String,
        /// The request file the approvers signed.
        request: serde_bytes::ByteBuf,
        /// The approval files, each with its payload detached.
        approvals: Vec<serde_bytes::ByteBuf>,
    },
    /// Enough distinct approvers approved `activate`: the entitlement may be used.
    EntitlementActivated {
        /// The entitlement id.
        entitlement: String,
    },
    /// HQ revoked an entitlement; its unused pool keys were destroyed.
    EntitlementRevoked {
        /// The entitlement id.
        entitlement: String,
        /// HQ's sequence number of the revocation.
        sequence: u64,
        /// The reason HQ gave.
        reason: String,
        /// How many unused pool keys were destroyed.
        destroyed_pool_keys: u64,
    },
    /// The site destroyed an entitlement's batch CA key: nothing more can be issued
    /// under that batch CA. Certificates already issued stay valid.
    BatchKeyDestroyed {
        /// The entitlement id.
        entitlement: String,
        /// `revoked` (HQ revoked the entitlement) or `window_ended` (its `valid_until`
        /// passed).
        cause: String,
    },
    /// An operator changed a site setting that bears on security.
    SettingChanged {
        /// The setting (`clock_tolerance`, …).
        name: String,
        /// Its new value.
        value: String,
    },
    /// The site exported its log up to `to_size` for HQ (bundle `bundle`).
    AuditExported {
        /// The bundle id.
        bundle: String,
        /// The first record of the bundle is record `from_size + 1`.
        from_size: u64,
        /// The log's size at the end of the bundle.
        to_size: u64,
        /// Hex Merkle root at `to_size`.
        root: String,
    },
    /// The site found its state behind what HQ acknowledged (`rollback_detected`) or its
    /// audit chain broken (`log_broken`), and stopped releasing keys.
    SiteLatched {
        /// `rollback_detected` or `log_broken`.
        code: String,
        /// What was found.
        reason: String,
    },
    /// HQ reset the site's trusted time (a receipt HQ issued for that purpose, after it
    /// had seen this log up to `size` records, whose root is `root`): the one record whose
    /// time may be earlier than the record before it — it is recorded at `to`, and the
    /// chain goes on from there. Records since `size` released no key.
    ClockReset {
        /// The trusted time before the reset.
        from: i64,
        /// HQ's time, the site's trusted time from this record on.
        to: i64,
        /// How many records HQ had seen when it issued the reset.
        size: u64,
        /// Hex Merkle root of the first `size` records.
        root: String,
        /// When HQ issued the reset (the receipt's `acknowledged_at`).
        acknowledged_at: i64,
    },
    /// The site advanced its TPM rollback counter (`site init --rollback-counter`) to
    /// `value`: the state from this record on corresponds to that value, which only goes
    /// up. Recorded in the commit that records the value in the state, before the TPM
    /// steps.
    RollbackCounterAdvanced {
        /// The counter's new value.
        value: u64,
    },
    /// HQ acknowledged a checkpoint of this log.
    ReceiptImported {
        /// The size of the log HQ acknowledged.
        size: u64,
        /// Hex Merkle root HQ acknowledged.
        root: String,
        /// When HQ acknowledged it (HQ's clock, Unix seconds).
        acknowledged_at: i64,
    },
}

/// The public identity of a key given to a device: never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditedKey {
    /// The key's name in the policy.
    pub name: String,
    /// `spki-sha256:<hex>` or `kcv:<hex>`.
    pub key_id: String,
    /// Hex serial of the device certificate, if one was issued.
    pub cert_serial: Option<String>,
    /// The device certificate (DER), public: HQ's manifests come from the audit alone.
    pub certificate: Option<serde_bytes::ByteBuf>,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// 1 for the first record, then +1 each.
    pub sequence: u64,
    /// Unix seconds, from the site's trusted time.
    pub time: i64,
    /// The site's name.
    pub site: String,
    /// What happened.
    pub event: Event,
    /// Leaf hash of the previous record of the same chain (zeros before the first).
    #[serde(with = "serde_bytes")]
    pub prev_hash: Vec<u8>,
    /// The node chain this record belongs to; absent for the site chain. In a cluster each
    /// running node appends its decisions to a chain of its own, so nodes never wait on
    /// one another's log head; a site's log is all its chains merged in commit order
    /// (FORMATS.md §9, "Chains"). `sequence` and `prev_hash` count within the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
}

/// Why a record or a run of records is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    /// The record at this sequence does not decode as keyfab wrote it.
    #[error("record {0} is malformed")]
    Malformed(u64),
    /// Records out of order.
    #[error("record {got} follows {expected_after}: a sequence gap or repeat")]
    Sequence {
        /// The sequence the record has.
        got: u64,
        /// The sequence of the record before it.
        expected_after: u64,
    },
    /// The record at this sequence does not carry its predecessor's hash.
    #[error("record {0} does not chain to the record before it")]
    Chain(u64),
    /// The record at this sequence is dated before its predecessor.
    #[error("record {0} goes back in time")]
    TimeBackwards(u64),
}

impl Record {
    /// Canonical bytes (CBOR), what the hash covers.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Serializing a plain struct into a Vec cannot fail.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    /// Decodes canonical bytes strictly: exactly the shape [`Record::to_bytes`] writes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AuditError> {
        decode::record(bytes)
    }

    /// Whether this record is a clock reset recorded at the time it resets to: the only
    /// record a chain's time may go back at. (Who issued the reset is HQ's to check: it
    /// imports only the resets it signed.)
    pub fn resets_time(&self) -> bool {
        matches!(self.event, Event::ClockReset { to, .. } if to == self.time)
    }

    /// RFC 9162 leaf hash: SHA-256(0x00 ‖ bytes).
    pub fn hash(&self) -> [u8; 32] {
        let mut s = keyfab_crypto::hash::Sha256Stream::default();
        s.update(&[0x00]);
        s.update(&self.to_bytes());
        s.finish()
    }
}

/// Appends one record's bytes to a storage row: a u32 BE length, then the bytes. Rows
/// group the records of one commit (site) or one batch (HQ) under one key.
pub fn frame_into(row: &mut Vec<u8>, record: &[u8]) {
    row.extend_from_slice(&(record.len() as u32).to_be_bytes());
    row.extend_from_slice(record);
}

/// The records of a row written with [`frame_into`].
pub fn split_row(value: &[u8]) -> Result<Vec<&[u8]>, AuditError> {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (len, tail) = rest.split_at_checked(4).ok_or(AuditError::Malformed(0))?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (record, tail) = tail.split_at_checked(len).ok_or(AuditError::Malformed(0))?;
        out.push(record);
        rest = tail;
    }
    Ok(out)
}

/// First byte of a row packed by [`pack_row`]. A row of framed records starts with its
/// first record's length (u32 BE), whose first byte is zero for any record under 16 MiB,
/// so a packed row and a plain one never look alike.
const PACKED_ROW: u8 = 0x4c;

/// The most bytes a packed row may unpack to (a row holds one commit's records: at most
/// a few MiB), so a damaged length cannot make a reader allocate without bound.
pub const MAX_ROW_BYTES: usize = 64 << 20;

/// A row of framed records ([`frame_into`]) compressed for storage: `PACKED_ROW` ‖
/// unpacked length (u32 LE) ‖ one LZ4 block. The records of a batch share most of their
/// bytes (field names, the entitlement, the certificates' issuer, extensions and
/// validity), so a row packs to less than half; on etcd every byte is replicated and
/// written by each member. The records' canonical bytes — what is hashed and exported —
/// do not change.
pub fn pack_row(framed: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 5 + lz4_flex::block::get_maximum_output_size(framed.len())];
    out[0] = PACKED_ROW;
    out[1..5].copy_from_slice(&(framed.len() as u32).to_le_bytes());
    match lz4_flex::block::compress_into(framed, &mut out[5..]) {
        Ok(n) => {
            out.truncate(5 + n);
            out
        }
        // Cannot happen (the output is sized for the worst case); the plain row is as
        // good, only larger.
        Err(_) => framed.to_vec(),
    }
}

/// The framed records of a stored row: a packed row unpacked, a plain one as it is.
pub fn unpack_row(value: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, AuditError> {
    let Some((&PACKED_ROW, rest)) = value.split_first() else {
        return Ok(std::borrow::Cow::Borrowed(value));
    };
    let (len, block) = rest.split_at_checked(4).ok_or(AuditError::Malformed(0))?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_ROW_BYTES {
        return Err(AuditError::Malformed(0));
    }
    let mut out = vec![0u8; len];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(n) if n == len => Ok(std::borrow::Cow::Owned(out)),
        _ => Err(AuditError::Malformed(0)),
    }
}

/// The end of the log: the last record's sequence, hash and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The last record's sequence (0 for an empty log).
    pub sequence: u64,
    /// The last record's leaf hash (zeros for an empty log).
    pub hash: [u8; 32],
    /// The last record's time.
    pub time: i64,
}

impl Head {
    /// The head of an empty log.
    pub fn genesis() -> Self {
        Head {
            sequence: 0,
            hash: [0u8; 32],
            time: i64::MIN,
        }
    }

    /// The head once `record` is the last record.
    pub fn after(record: &Record) -> Result<Self, AuditError> {
        if record.prev_hash.len() != 32 {
            return Err(AuditError::Malformed(record.sequence));
        }
        Ok(Head {
            sequence: record.sequence,
            hash: record.hash(),
            time: record.time,
        })
    }

    /// The record that comes next after this head (of the site chain).
    pub fn next(&self, time: i64, site: &str, event: Event) -> Record {
        Record {
            sequence: self.sequence + 1,
            time,
            site: site.to_owned(),
            event,
            prev_hash: self.hash.to_vec(),
            chain: None,
        }
    }

    /// Compact form for storage: sequence (8) ‖ hash (32) ‖ time (8).
    pub fn to_bytes(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[..8].copy_from_slice(&self.sequence.to_be_bytes());
        b[8..40].copy_from_slice(&self.hash);
        b[40..].copy_from_slice(&self.time.to_be_bytes());
        b
    }

    /// The compact form read back ([`Head::to_bytes`]).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 48] = b.try_into().ok()?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[8..40]);
        Some(Head {
            sequence: u64::from_be_bytes(b[..8].try_into().ok()?),
            hash,
            time: i64::from_be_bytes(b[40..].try_into().ok()?),
        })
    }
}

/// Checks that `records` continue `from` without gap, edit, or time going backwards, and
/// returns the new head. Pure: no I/O, no clock.
pub fn verify_chain(from: &Head, records: &[Record]) -> Result<Head, AuditError> {
    let mut head = *from;
    for r in records {
        if r.sequence != head.sequence + 1 {
            return Err(AuditError::Sequence {
                got: r.sequence,
                expected_after: head.sequence,
            });
        }
        if r.prev_hash.as_slice() != head.hash.as_slice() {
            return Err(AuditError::Chain(r.sequence));
        }
        if r.time < head.time && !r.resets_time() {
            return Err(AuditError::TimeBackwards(r.sequence));
        }
        head = Head::after(r)?;
    }
    Ok(head)
}

/// Checks a site's merged log — its site chain and every node chain, interleaved in
/// commit order (FORMATS.md §9, "Chains") — each chain on its own from its first record,
/// as [`verify_chain`] checks one, the way HQ verifies what it imports. Returns each
/// chain's head (`None`: the site chain). Pure: no I/O, no clock.
pub fn verify_merged(
    records: &[Record],
) -> Result<std::collections::BTreeMap<Option<String>, Head>, AuditError> {
    let mut heads: std::collections::BTreeMap<Option<String>, Head> = Default::default();
    for r in records {
        let head = heads.entry(r.chain.clone()).or_insert_with(Head::genesis);
        *head = verify_chain(head, std::slice::from_ref(r))?;
    }
    Ok(heads)
}

#[cfg(test)]
mod tests {

    #[test]
    fn packed_rows_unpack_to_their_records_and_plain_rows_read_as_before() {
        let mut framed = Vec::new();
        for i in 0..40u8 {
            frame_into(
                &mut framed,
                &[b"record with shared bytes ".as_slice(), &[i; 9]].concat(),
            );
        }
        let packed = pack_row(&framed);
        assert!(
            packed.len() < framed.len() / 2,
            "{} of {}",
            packed.len(),
            framed.len()
        );
        assert_eq!(unpack_row(&packed).unwrap().as_ref(), framed.as_slice());
        assert_eq!(split_row(&unpack_row(&packed).unwrap()).unwrap().len(), 40);
        // Rows stored before packing: read as they are.
        assert!(matches!(
            unpack_row(&framed).unwrap(),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(pack_row(&[]).len(), 6);
        assert!(unpack_row(&pack_row(&[])).unwrap().is_empty());
    }

    /// The byte layout of FORMATS.md, pinned: marker, length (LE), one LZ4 block — here a
    /// block of 13 literals (token 0xd0) holding a frame of two records.
    #[test]
    fn a_packed_row_vector_unpacks_as_formats_md_says() {
        let packed =
            hex::decode("4c0d000000d0000000036162630000000264 65".replace(' ', "")).unwrap();
        let framed = unpack_row(&packed).unwrap();
        assert_eq!(split_row(&framed).unwrap(), vec![&b"abc"[..], &b"de"[..]]);
    }

    #[test]
    fn damaged_packed_rows_are_refused_without_panic_or_huge_allocation() {
        let mut framed = Vec::new();
        frame_into(&mut framed, b"one record");
        let packed = pack_row(&framed);
        for cut in 0..packed.len() {
            assert!(
                unpack_row(&packed[..cut]).is_err() || cut == 0,
                "cut at {cut}"
            );
        }
        let mut longer = packed.clone();
        longer[1] ^= 0x01;
        assert!(unpack_row(&longer).is_err());
        let mut huge = packed.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack_row(&huge).is_err());
    }

    use super::*;

    fn chain(n: u64) -> Vec<Record> {
        let mut head = Head::genesis();
        (0..n)
            .map(|i| {
                let r = head.next(
                    100 + i as i64,
                    "s",
                    Event::EntitlementImported {
                        entitlement: format!("e{i}"),
                        sequence: i + 1,
                        pool_keys: 1,
                    },
                );
                head = Head::after(&r).unwrap();
                r
            })
            .collect()
    }

    #[test]
    fn edits_gaps_and_time_travel_are_caught() {
        let good = chain(4);
        assert_eq!(verify_chain(&Head::genesis(), &good).unwrap().sequence, 4);

        let mut edited = good.clone();
        edited[1].time += 1;
        assert_eq!(
            verify_chain(&Head::genesis(), &edited),
            Err(AuditError::Chain(3))
        );

        let mut gap = good.clone();
        gap.remove(2);
        assert!(matches!(
            verify_chain(&Head::genesis(), &gap),
            Err(AuditError::Sequence { .. })
        ));

        let mut back = chain(2);
        back[1].time = 0;
        // Re-chain so only the time is wrong.
        let h = Head::after(&back[0]).unwrap();
        back[1].prev_hash = h.hash.to_vec();
        assert_eq!(
            verify_chain(&Head::genesis(), &back),
            Err(AuditError::TimeBackwards(2))
        );

        // A clock reset goes back to its own time, and only there.
        let reset = |time: i64, to: i64| {
            let mut r = chain(2);
            r[1].time = time;
            r[1].event = Event::ClockReset {
                from: 100,
                to,
                size: 1,
                root: "00".into(),
                acknowledged_at: 5,
            };
            r[1].prev_hash = Head::after(&r[0]).unwrap().hash.to_vec();
            r
        };
        assert_eq!(
            verify_chain(&Head::genesis(), &reset(50, 50)).unwrap().time,
            50
        );
        assert_eq!(
            verify_chain(&Head::genesis(), &reset(50, 60)),
            Err(AuditError::TimeBackwards(2))
        );
    }

    #[test]
    fn bytes_round_trip_strictly() {
        let r = &chain(1)[0];
        assert_eq!(&Record::from_bytes(&r.to_bytes()).unwrap(), r);
        let mut trailing = r.to_bytes();
        trailing.push(0);
        assert!(Record::from_bytes(&trailing).is_err());
        let h = Head::after(r).unwrap();
        assert_eq!(Head::from_bytes(&h.to_bytes()), Some(h));
    }

    #[test]
    fn a_merged_log_verifies_chain_by_chain_and_an_edit_in_any_chain_is_found() {
        let event = |n: u64| Event::SettingChanged {
            name: format!("n{n}"),
            value: String::new(),
        };
        // The site chain and two node chains, interleaved as commits land.
        let mut heads: std::collections::BTreeMap<Option<String>, Head> = Default::default();
        let mut merged = Vec::new();
        for (i, chain) in [None, Some("n1"), Some("n2"), Some("n1"), None, Some("n2")]
            .into_iter()
            .enumerate()
        {
            let chain = chain.map(str::to_owned);
            let head = heads.entry(chain.clone()).or_insert_with(Head::genesis);
            let mut r = head.next(100 + i as i64, "s", event(i as u64));
            r.chain.clone_from(&chain);
            *head = Head::after(&r).unwrap();
            merged.push(r);
        }
        let verified = verify_merged(&merged).unwrap();
        assert_eq!(verified.len(), 3);
        assert_eq!(verified[&Some("n1".to_owned())].sequence, 2);
        // As one chain it is not one: the check HQ does not make either.
        assert!(verify_chain(&Head::genesis(), &merged).is_err());
        // An edit breaks the chain it is in at the next record of that chain.
        for at in 0..merged.len() {
            if !merged[at + 1..].iter().any(|r| r.chain == merged[at].chain) {
                continue;
            }
            let mut edited = merged.clone();
            edited[at].time += 1;
            assert!(verify_merged(&edited).is_err(), "edit at {at}");
        }
    }
}
