//! Each request of a batch decided and recorded: a confirmation, a retry answered from
//! its record (to its station only), a refusal, or a release with its keys — all into
//! the batch's one transaction — and the batch's counters and reservations written back.

use super::decide::{counters_in, day_in, Carried, RequestKeys, StoredFor};
use super::pool_keys::{read_pool_key_from, PoolKeyReady, PoolRows};
use super::rules::decide_policy;
use super::*;

/// The keys a release hands out: as audited, sealed for the device record, and what the
/// device receives.
pub(super) struct Released {
    pub(super) audited: Vec<AuditedKey>,
    pub(super) sealed: Vec<serde_bytes::ByteBuf>,
    pub(super) privates: Vec<Option<SecretBytes>>,
}

/// One batch while its requests are decided (step 6) and written back (step 7): what
/// every decision reads and adds to.
pub(super) struct Deciding<'a> {
    pub(super) node: &'a Node,
    pub(super) txn: Txn,
    pub(super) log: Appender,
    pub(super) now: i64,
    pub(super) acknowledged_at: i64,
    /// Guard each device's record as read (a shared store that read it).
    pub(super) guard_reads: bool,
    /// Policy days worked out so far ([`day_in`]).
    pub(super) days: Vec<(String, String)>,
    /// Entitlements whose counters decisions changed.
    pub(super) touched: Vec<String>,
    /// Entitlements whose reservation this batch allowed devices from.
    pub(super) used_from: Vec<String>,
    pub(super) held_elsewhere: Vec<String>,
    pub(super) pool_ahead: PoolRows,
    pub(super) pool_ready: HashMap<(usize, usize), PoolKeyReady>,
}

impl Deciding<'_> {
    /// Decides and records the request at `pos`: its answer, or `None` if the batch must
    /// be decided again from a fresh read.
    pub(super) fn decide_job(
        &mut self,
        st: &mut Carried,
        pos: usize,
        job: Job,
        (_, req_key, dev_key): RequestKeys,
        stored: StoredFor,
    ) -> Result<Option<Result<Outcome>>> {
        let Job {
            ctx,
            req,
            prepared,
            chip,
            confirm,
            ..
        } = job;
        if self.guard_reads {
            // Read, not assumed: on a shared store another node may decide for the same
            // device meanwhile, and nodes no longer meet on a common log head or
            // counters — the device's record itself is what the commit is guarded on.
            self.txn
                .require_unchanged(Table::Devices, &dev_key, stored.device.as_ref());
        }
        if let Some(result) = confirm {
            return self
                .confirmation(st, &ctx, &req, result, stored.device, &dev_key)
                .map(Some);
        }
        let stored_request = stored.request.or(stored.legacy_request);
        if let Some(answer) =
            self.retry(st, &req, &req_key, &dev_key, stored_request, &stored.device)?
        {
            return Ok(Some(answer));
        }
        let already = st.devices.contains(&dev_key) || stored.device.is_some();
        let day = day_in(&mut self.days, &ctx, self.now);
        // A node chain decides against its reservation: the ledger counts every grant,
        // so the ledger less this node's unused grant is at least what all nodes allowed,
        // and below each limit while the grant lasts (see `reservations`).
        let reserving = st.chain.is_some() && ctx.code.is_none();
        let (held, next_slot) = match st.reservations.get(req.entitlement.as_str()) {
            Some((r, _)) if reserving => (r.room_on(&day), r.nth_slot(0)),
            _ => (0, None),
        };
        let c = if reserving {
            st.counters
                .get_mut(req.entitlement.as_str())
                .map(|(c, _)| c)
                .ok_or_else(|| Error::Corrupt("counters".into()))?
        } else {
            counters_in(
                &mut st.counters,
                self.node.store.as_ref(),
                &req.entitlement,
                &mut self.touched,
            )?
        };
        let (decision, reason) = decide_policy(
            &ctx,
            &req,
            &chip,
            c,
            held,
            already,
            &day,
            self.now,
            self.acknowledged_at,
        );
        let has_pool = prepared.iter().any(|p| matches!(p, Prepared::Pool));
        let pool_index = match (has_pool, reserving) {
            (false, _) => None,
            (true, false) => Some(c.next_pool),
            (true, true) => next_slot,
        };
        if let Decision::Deny(DenyCode::QuotaExceeded | DenyCode::DailyLimitExceeded) = decision {
            if held == 0 && self.held_elsewhere.iter().any(|e| *e == req.entitlement) {
                return Ok(None);
            }
        }
        if reserving && held == 0 && decision == Decision::Allow {
            // The ledger has room, but this node holds no grant to allow the device from
            // (taking one kept colliding with other nodes' commits): allowed here, it
            // would be counted nowhere and have no pool slot. Decide the batch again in
            // a moment, from a fresh read — never an error for the station.
            return Ok(None);
        }
        match decision {
            Decision::Deny(code) => self
                .record_denial(st, &req, req_key, code, reason)
                .map(Some),
            Decision::Allow => {
                if has_pool && pool_index.is_none() {
                    return Err(Error::Bug("a reservation without pool slots".into()));
                }
                let Some(keys) = self.release_keys(&ctx, &req, pos, prepared, pool_index)? else {
                    return Ok(None);
                };
                let release = Release {
                    ctx: &ctx,
                    req: &req,
                    chip: &chip,
                    reserving,
                    pool_index,
                    day,
                };
                self.record_release(st, release, keys, req_key, dev_key)
                    .map(|o| Some(Ok(o)))
            }
        }
    }

    /// A confirmation, recorded (a first failure also counts for a policy module).
    fn confirmation(
        &mut self,
        st: &mut Carried,
        ctx: &EntitlementContext,
        req: &ProvisionRequest,
        result: Programming,
        stored: Option<Versioned>,
        dev_key: &[u8],
    ) -> Result<Result<Outcome>> {
        let outcome = confirm_device(
            &mut self.txn,
            &mut self.log,
            self.now,
            req,
            result,
            stored,
            &mut st.confirmed,
            dev_key,
        );
        // A policy module may count today's programming failures.
        let first_failure = matches!(
            outcome,
            Ok(Outcome::Confirmed {
                repeated: false,
                ..
            })
        ) && result == Programming::Failed;
        if first_failure && ctx.code.is_some() {
            let day = day_in(&mut self.days, ctx, self.now);
            counters_in(
                &mut st.counters,
                self.node.store.as_ref(),
                &req.entitlement,
                &mut self.touched,
            )?
            .code
            .record_failed(&day);
        }
        Ok(outcome)
    }

    /// The answer to a retry, from the record its request left (a final refusal, or the
    /// device it provisioned) — to the station that made it, and refused to any other —
    /// or `None` for a request to decide: seen the first time, or refused for a reason
    /// that may have passed ([`DenyCode::passes`]), which is decided again.
    fn retry(
        &mut self,
        st: &Carried,
        req: &ProvisionRequest,
        req_key: &[u8],
        dev_key: &[u8],
        stored_request: Option<Versioned>,
        stored_device: &Option<Versioned>,
    ) -> Result<Option<Result<Outcome>>> {
        let earlier = match st.requests.get(req_key) {
            Some(r) => Some(r.clone()),
            None => stored_request
                .map(|v| decode::<RequestRecord>(&v.value))
                .transpose()?,
        }
        .filter(|rr| !rr.denied.is_some_and(DenyCode::passes));
        let answer = match earlier {
            Some(rr) => Some((rr.station.clone(), rr)),
            // A device record answers a retry of the request that created it; any
            // other request for that device is refused as already provisioned.
            None => match stored_device {
                Some(v) if !st.devices.contains(dev_key) => {
                    let d = DeviceRecord::from_stored(&v.value)?;
                    (d.request_id == *req.request_id).then(|| {
                        let rr = RequestRecord {
                            device_id: req.device_id.to_string(),
                            audit_sequence: d.audit_sequence,
                            denied: None,
                            reason: None,
                            station: d.station.clone(),
                        };
                        (d.station, rr)
                    })
                }
                _ => None,
            },
        };
        let Some((station, rr)) = answer else {
            return Ok(None);
        };
        Ok(Some(match station.as_deref() == req.station.as_deref() {
            true => Ok(Outcome::Replay(rr)),
            false => station_mismatch(&mut self.txn, &mut self.log, self.now, req, Action::Retry)?,
        }))
    }

    /// A refusal, recorded: its audit record, and the request's record a retry is
    /// answered from.
    fn record_denial(
        &mut self,
        st: &mut Carried,
        req: &ProvisionRequest,
        req_key: Vec<u8>,
        code: DenyCode,
        reason: Option<String>,
    ) -> Result<Result<Outcome>> {
        let (entitlement, request_id, device_id, station) = (
            req.entitlement.to_string(),
            req.request_id.to_string(),
            req.device_id.to_string(),
            req.station_text(),
        );
        let event = match reason.clone() {
            Some(reason) => Event::ProvisionDeniedByCode {
                entitlement,
                request_id,
                device_id,
                station,
                code: code.code().as_str().to_owned(),
                reason,
            },
            None => Event::ProvisionDenied {
                entitlement,
                request_id,
                device_id,
                station,
                code: code.code().as_str().to_owned(),
            },
        };
        let seq = self.log.append(&mut self.txn, self.now, event)?;
        let answer = Err(denied(code, &req.device_id, reason.as_deref()));
        let rr = RequestRecord {
            device_id: req.device_id.to_string(),
            audit_sequence: seq,
            denied: Some(code),
            reason,
            station: req.station_text(),
        };
        self.txn.put(Table::Devices, &req_key, &encode(&rr)?);
        st.requests.insert(req_key, rr);
        Ok(answer)
    }

    /// The keys an allowed request gets: pool keys from the slot its decision took
    /// (made ahead if the slot was the one expected), the others as prepared. `None`
    /// if a pool slot's row is gone on a shared store (a revocation on another node's
    /// watch): the batch is decided again from a fresh read.
    fn release_keys(
        &mut self,
        ctx: &EntitlementContext,
        req: &ProvisionRequest,
        pos: usize,
        prepared: Vec<Prepared>,
        pool_index: Option<u64>,
    ) -> Result<Option<Released>> {
        if prepared.len() != ctx.policy.policy.keys.len() {
            // A node whose clock runs behind another's may still allow what the other
            // already ended: the key is gone all the same, nothing is released.
            if ctx.device_issuer.is_none() {
                return Err(super::keys::batch_key_gone(ctx));
            }
            // Otherwise only a device id the policy refuses is left unprepared.
            return Err(Error::Bug(
                "an allowed request without its prepared keys".into(),
            ));
        }
        let mut released = Released {
            audited: Vec::new(),
            sealed: Vec::new(),
            privates: Vec::new(),
        };
        for (i, (spec, p)) in ctx.policy.policy.keys.iter().zip(prepared).enumerate() {
            let (key_id, sealed, private, cert) = match p {
                Prepared::Pool => {
                    let index = pool_index.ok_or_else(|| Error::Bug("pool index".into()))?;
                    let Some((key_id, private, cert)) = self.pool_key(ctx, req, pos, i, index)?
                    else {
                        return Ok(None);
                    };
                    (key_id, Vec::new(), Some(private), cert)
                }
                Prepared::Ready {
                    key_id,
                    sealed,
                    private,
                    cert,
                } => (key_id, sealed, private, cert),
            };
            let (certificate, cert_serial) = match cert {
                Some((c, s)) => (Some(serde_bytes::ByteBuf::from(c)), Some(s)),
                None => (None, None),
            };
            released.audited.push(AuditedKey {
                name: spec.name.clone(),
                key_id: key_id.to_text(),
                cert_serial,
                certificate,
            });
            released.sealed.push(serde_bytes::ByteBuf::from(sealed));
            released.privates.push(private);
        }
        Ok(Some(released))
    }

    /// Pool key `i` of the request at `pos`, from slot `index`: made ahead if that was
    /// the slot expected, made now otherwise; `None` if the slot's row is gone on a
    /// shared store.
    #[allow(clippy::type_complexity)]
    fn pool_key(
        &mut self,
        ctx: &EntitlementContext,
        req: &ProvisionRequest,
        pos: usize,
        i: usize,
        index: u64,
    ) -> Result<Option<(KeyId, SecretBytes, Option<(Vec<u8>, String)>)>> {
        if let Some(ready) = self
            .pool_ready
            .remove(&(pos, i))
            .filter(|ready| ready.index == index)
        {
            return Ok(Some((ready.key_id, ready.private, ready.cert)));
        }
        let spec = &ctx.policy.policy.keys[i];
        let Some(secret) = read_pool_key_from(self.node, &self.pool_ahead, ctx, i, index)? else {
            // Destroyed since the state was read (a revocation another node or a
            // command committed meanwhile): decide again from a fresh read.
            if self.node.store.concurrent_writers() {
                return Ok(None);
            }
            return Err(Error::Corrupt(format!(
                "pool key {index} of '{}' is gone",
                ctx.record.id
            )));
        };
        let e = devicekey::expand(device_type(spec.key_type), &secret)?;
        let cert = certify(
            ctx,
            i,
            &req.device_id,
            e.public.as_ref(),
            UnixTime(self.now),
            self.node.rng.as_ref(),
        )?;
        Ok(Some((e.key_id, e.private, cert)))
    }

    /// A release, recorded before any key leaves: its audit record, the counters or the
    /// reservation it is counted in, and the device's record.
    fn record_release(
        &mut self,
        st: &mut Carried,
        release: Release<'_>,
        keys: Released,
        req_key: Vec<u8>,
        dev_key: Vec<u8>,
    ) -> Result<Outcome> {
        let Release {
            ctx,
            req,
            chip,
            reserving,
            pool_index,
            day,
        } = release;
        let attested = match (chip, &req.chip_chain) {
            (ChipSeen::Verified(verified), Some(chain)) => {
                let (leaf, facts) = (&verified.leaf, &verified.facts);
                let certificate = leaf.fingerprint.to_hex();
                self.log.append(
                    &mut self.txn,
                    self.now,
                    Event::ChipAttested {
                        entitlement: req.entitlement.to_string(),
                        request_id: req.request_id.to_string(),
                        device_id: req.device_id.to_string(),
                        certificate: certificate.clone(),
                        serial: leaf.serial_hex.clone(),
                        transport_key: facts.transport_key.clone(),
                        chain: chain
                            .iter()
                            .map(|c| serde_bytes::ByteBuf::from(c.clone()))
                            .collect(),
                    },
                )?;
                Some(certificate)
            }
            _ => None,
        };
        let seq = self.log.append(
            &mut self.txn,
            self.now,
            Event::ProvisionAllowed {
                entitlement: req.entitlement.to_string(),
                request_id: req.request_id.to_string(),
                device_id: req.device_id.to_string(),
                station: req.station_text(),
                pool_index,
                keys: keys.audited.clone(),
            },
        )?;
        if reserving {
            if let Some((r, _)) = st.reservations.get_mut(req.entitlement.as_str()) {
                r.used += 1;
                if pool_index.is_some() {
                    r.take_slot();
                }
            }
            if !self.used_from.iter().any(|e| *e == req.entitlement) {
                self.used_from.push(req.entitlement.to_string());
            }
        } else {
            let c = st
                .counters
                .get_mut(req.entitlement.as_str())
                .map(|(c, _)| c)
                .ok_or_else(|| Error::Corrupt("counters".into()))?;
            c.total += 1;
            if ctx.code.is_some() {
                c.code.record_allowed(&day, req.station.as_deref());
            }
            *c.days.entry(day).or_insert(0) += 1;
            if pool_index.is_some() {
                c.next_pool += 1;
            }
        }
        let device = DeviceRecord {
            request_id: req.request_id.to_string(),
            audit_sequence: seq,
            audit_row: self.log.row_key().unwrap_or(seq),
            audit_chain: st.chain.clone(),
            time: self.now,
            station: req.station_text(),
            pool_index,
            sealed: keys.sealed,
            confirmed: None,
            transport_key: req.transport_key.as_ref().map(|k| k.fingerprint().to_hex()),
            chip: attested,
        };
        let rr = RequestRecord {
            device_id: req.device_id.to_string(),
            audit_sequence: seq,
            denied: None,
            reason: None,
            station: req.station_text(),
        };
        self.txn.put(Table::Devices, &dev_key, &device.to_stored()?);
        st.devices.insert(dev_key);
        st.requests.insert(req_key, rr);
        Ok(Outcome::Allowed {
            audit_sequence: seq,
            audit_chain: st.chain.clone(),
            keys: keys.audited,
            privates: keys.privates,
        })
    }

    /// Step 7, write back: the counters decisions changed, guarded as read; each
    /// reservation decided against, guarded where it was read (one taken back cannot be
    /// spent) and renewed, with the ledger guarded too (refusals for the limits hold
    /// only while no node has gained a grant since); the log's records and head. The
    /// batch's transaction.
    pub(super) fn write_back(mut self, st: &mut Carried, reserving: Vec<String>) -> Result<Txn> {
        for ent in &self.touched {
            if let Some((c, rev)) = st.counters.get(ent) {
                self.txn
                    .require_revision(Table::Counters, ent.as_bytes(), *rev);
                self.txn.put(Table::Counters, ent.as_bytes(), &encode(c)?);
            }
        }
        st.touched = self.touched;
        for ent in reserving {
            if let (Some((r, rev)), Some((_, ledger_rev))) =
                (st.reservations.get_mut(&ent), st.counters.get(&ent))
            {
                let key = reservations::reservation_key(&ent, st.chain.as_deref().unwrap_or(""));
                self.txn
                    .require_revision(Table::Counters, ent.as_bytes(), *ledger_rev)
                    .require_revision(Table::Counters, &key, *rev);
                // Written (and marked as in use) only when this batch allowed devices
                // from it: a node that only refuses holds its grant as a node that died
                // would, and after `RESERVATION_LIFE_SECS` a node that needs the quota
                // takes it.
                if self.used_from.contains(&ent) {
                    r.seen_at = self.now;
                    self.txn.put(Table::Counters, &key, &encode(r)?);
                    st.reserved.push(ent);
                }
            }
        }
        st.head = self.log.head();
        self.log.finish(&mut self.txn);
        Ok(self.txn)
    }
}

/// What a release is recorded under.
pub(super) struct Release<'a> {
    pub(super) ctx: &'a EntitlementContext,
    pub(super) req: &'a ProvisionRequest,
    /// The chip the release is for, when its chain verified.
    pub(super) chip: &'a ChipSeen,
    /// Counted in this node's reservation (a node chain), not in the counters.
    pub(super) reserving: bool,
    pub(super) pool_index: Option<u64>,
    pub(super) day: String,
}

/// Records one confirmation in the batch's transaction.
#[allow(clippy::too_many_arguments)]
pub(super) fn confirm_device(
    txn: &mut Txn,
    log: &mut Appender,
    now: i64,
    req: &ProvisionRequest,
    result: Programming,
    stored: Option<Versioned>,
    confirmed: &mut HashMap<Vec<u8>, DeviceRecord>,
    dev_key: &[u8],
) -> Result<Outcome> {
    let mut record = match confirmed.get(dev_key) {
        Some(r) => r.clone(),
        None => match stored {
            Some(v) => DeviceRecord::from_stored(&v.value)?,
            None => {
                return Err(Error::NotFound(format!(
                    "device '{}' has no keys under {} to confirm",
                    req.device_id, req.entitlement
                )))
            }
        },
    };
    if record.station.as_deref() != req.station.as_deref() {
        return station_mismatch(txn, log, now, req, Action::Confirm)?;
    }
    if let Some(c) = record.confirmed {
        return if c.result == result {
            Ok(Outcome::Confirmed {
                audit_sequence: c.audit_sequence,
                repeated: true,
            })
        } else {
            Err(Error::Precondition(format!(
                "device '{}' was already confirmed {} (audit record {})",
                req.device_id,
                c.result.as_str(),
                c.audit_sequence
            )))
        };
    }
    let seq = log.append(
        txn,
        now,
        Event::DeviceConfirmed {
            entitlement: req.entitlement.to_string(),
            device_id: req.device_id.to_string(),
            station: req.station_text(),
            result: result.as_str().to_owned(),
        },
    )?;
    record.confirmed = Some(Confirmation {
        result,
        audit_sequence: seq,
    });
    txn.put(Table::Devices, dev_key, &record.to_stored()?);
    confirmed.insert(dev_key.to_vec(), record);
    Ok(Outcome::Confirmed {
        audit_sequence: seq,
        repeated: false,
    })
}

/// What a station asked for that belongs to another station.
#[derive(Clone, Copy)]
pub(super) enum Action {
    /// A retry of a request id another station made.
    Retry,
    /// A confirmation of a device another station received.
    Confirm,
}

/// Refuses `req`, which asks for what another station's request was answered, as
/// `station_not_allowed` (docs/FORMATS.md §9, `station_mismatch`): audited, nothing
/// released, and nothing stored for the request — the station that made it still finds
/// its answer when it retries.
pub(super) fn station_mismatch(
    txn: &mut Txn,
    log: &mut Appender,
    now: i64,
    req: &ProvisionRequest,
    action: Action,
) -> Result<Result<Outcome>> {
    let (name, request_id, message) = match action {
        Action::Retry => (
            "provision",
            Some(req.request_id.to_string()),
            format!(
                "request id '{}' for device '{}' was made by another station: only that station is answered a retry; nothing was released",
                req.request_id, req.device_id
            ),
        ),
        Action::Confirm => (
            "confirm",
            None,
            format!(
                "device '{}' received its keys at another station: only that station may confirm it",
                req.device_id
            ),
        ),
    };
    log.append(
        txn,
        now,
        Event::StationMismatch {
            entitlement: req.entitlement.to_string(),
            action: name.to_owned(),
            request_id,
            device_id: req.device_id.to_string(),
            station: req.station_text(),
        },
    )?;
    Ok(Err(Error::Denied {
        code: DenyCode::StationNotAllowed.code(),
        message,
    }))
}
