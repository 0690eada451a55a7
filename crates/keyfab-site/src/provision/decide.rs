//! Deciding a batch: the state it starts from (read, or carried from the last commit),
//! every decision in order against it, and the one transaction that records them.

use super::pool_keys::{
    make_pool_keys_ahead, plan_pool_slots, read_pool_key_from, read_pool_rows_ahead,
};
use super::*;

/// What one batch's decisions start from: the audit head, the trusted time and the
/// counters, with the revisions that guard them; and, as the batch goes, the requests and
/// devices it has decided (so a second request in the same batch sees the first).
pub(super) struct Carried {
    /// The node chain this engine appends to (a shared store), or `None`: the site chain.
    pub(super) chain: Option<String>,
    pub(super) head: Head,
    pub(super) head_revision: Option<u64>,
    pub(super) hwm: Option<i64>,
    pub(super) hwm_revision: Option<u64>,
    pub(super) counters: HashMap<String, (Counters, Option<u64>)>,
    pub(super) requests: HashMap<Vec<u8>, RequestRecord>,
    pub(super) devices: std::collections::HashSet<Vec<u8>>,
    /// Device records confirmed in this batch, as they will be stored.
    pub(super) confirmed: HashMap<Vec<u8>, DeviceRecord>,
    /// The trusted time this batch wrote, if it did.
    pub(super) hwm_written: Option<i64>,
    /// Entitlements whose counters this batch wrote.
    pub(super) touched: Vec<String>,
    /// The settings as last read, with their revisions.
    pub(super) settings: Option<Settings>,
    /// This node's reservation of each entitlement, with its revision (node chains
    /// only; see `reservations`).
    pub(super) reservations: HashMap<String, (reservations::Reservation, Option<u64>)>,
    /// Entitlements whose reservation this batch wrote.
    pub(super) reserved: Vec<String>,
}

/// Settings others may change, as a batch read them.
#[derive(Clone)]
pub(super) struct Settings {
    tolerance: i64,
    tolerance_revision: Option<u64>,
    max_jump: i64,
    max_jump_revision: Option<u64>,
    /// Set when the site stopped itself (see `latch`): every request is refused.
    latch: Option<crate::latch::Latch>,
    latch_revision: Option<u64>,
    acknowledged_at: i64,
    acknowledged_revision: Option<u64>,
}

impl Settings {
    /// Guards the settings at the revisions read: a receipt or a clock setting changed
    /// meanwhile makes the commit fail, and the batch is decided again.
    fn guard(&self, txn: &mut Txn) {
        txn.require_revision(Table::Meta, CLOCK_TOLERANCE.key, self.tolerance_revision)
            .require_revision(Table::Meta, CLOCK_MAX_JUMP.key, self.max_jump_revision)
            .require_revision(Table::Meta, crate::latch::LATCHED, self.latch_revision)
            .require_revision(
                Table::Meta,
                crate::checkpoints::HQ_ACK,
                self.acknowledged_revision,
            );
    }
}

impl Carried {
    /// A batch's state not read yet: [`decide_batch`] reads it, with everything else the
    /// batch needs, in one snapshot — on etcd one round trip, which keeps the window in
    /// which another node's commit can invalidate it short.
    pub(super) fn unread(chain: Option<String>) -> Self {
        Self {
            chain,
            head: Head::genesis(),
            head_revision: None,
            hwm: None,
            hwm_revision: None,
            counters: HashMap::new(),
            requests: HashMap::new(),
            devices: Default::default(),
            confirmed: HashMap::new(),
            hwm_written: None,
            touched: Vec::new(),
            settings: None,
            reservations: HashMap::new(),
            reserved: Vec::new(),
        }
    }

    /// The state after this batch committed at `revision`: what the next batch starts
    /// from without reading it again. Its guards still hold it to account — if another
    /// node committed meanwhile, the next commit fails and the state is read afresh.
    pub(super) fn committed(mut self, revision: u64) -> Self {
        self.head_revision = Some(revision);
        if let Some(now) = self.hwm_written.take() {
            self.hwm = Some(now);
            self.hwm_revision = Some(revision);
        }
        for ent in std::mem::take(&mut self.touched) {
            if let Some((_, rev)) = self.counters.get_mut(&ent) {
                *rev = Some(revision);
            }
        }
        for ent in std::mem::take(&mut self.reserved) {
            if let Some((_, rev)) = self.reservations.get_mut(&ent) {
                *rev = Some(revision);
            }
        }
        self.requests.clear();
        self.devices.clear();
        self.confirmed.clear();
        self
    }
}

impl Carried {
    /// The counters of `entitlement` as this batch has them, read once per batch; the
    /// entitlement joins `touched` so they are written back with the batch.
    pub(super) fn counters_of(
        &mut self,
        store: &dyn keyfab_store::Store,
        entitlement: &str,
        touched: &mut Vec<String>,
    ) -> Result<&mut Counters> {
        counters_in(&mut self.counters, store, entitlement, touched)
    }
}

/// [`Carried::counters_of`], on the map alone (so the rest of the state stays free to
/// borrow).
pub(super) fn counters_in<'m>(
    counters: &'m mut HashMap<String, (Counters, Option<u64>)>,
    store: &dyn keyfab_store::Store,
    entitlement: &str,
    touched: &mut Vec<String>,
) -> Result<&'m mut Counters> {
    if !counters.contains_key(entitlement) {
        let v = store.get(Table::Counters, entitlement.as_bytes())?;
        let c = match &v {
            Some(v) => decode(&v.value)?,
            None => Counters::default(),
        };
        counters.insert(entitlement.to_owned(), (c, v.map(|v| v.revision)));
    }
    if !touched.iter().any(|t| t == entitlement) {
        touched.push(entitlement.to_owned());
    }
    counters
        .get_mut(entitlement)
        .map(|(c, _)| c)
        .ok_or_else(|| Error::InvalidState("counters".into()))
}

/// The decision a policy module's verdict makes, and its reason when it refused.
pub(super) fn code_decision(verdict: Verdict) -> (Decision, Option<String>) {
    match verdict {
        Verdict::Allow => (Decision::Allow, None),
        Verdict::Deny { reason } => (Decision::Deny(DenyCode::PolicyDenied), Some(reason)),
        Verdict::Error { reason } => (Decision::Deny(DenyCode::PolicyError), Some(reason)),
    }
}

/// Decides one batch: every decision in order, in one transaction (one fsync).
///
/// `optimistic` (a shared store, the state carried from the last commit, no
/// confirmation in the batch): nothing is read — every request and device is taken as
/// new, and the commit is guarded on exactly that (their keys absent, the settings at the
/// revisions last read). If one was not new, the commit fails and the batch is decided
/// again the reading way. On etcd this saves one round trip in the common case.
/// `None`: another live node holds the quota the batch needs (see `reservations`), or
/// the state changed under the batch (a pool slot it took was destroyed by a
/// revocation); nothing was decided, and the batch is decided again shortly from a
/// fresh read.
pub(super) fn decide_batch(
    node: &Node,
    st: &mut Carried,
    batch: Vec<Job>,
    optimistic: bool,
) -> Result<Option<(Txn, Vec<Result<Outcome>>)>> {
    let store = node.store.as_ref();
    let mut txn = Txn::default();
    let optimistic =
        optimistic && st.settings.is_some() && batch.iter().all(|j| j.confirm.is_none());

    // One snapshot read for the batch: the settings others may change, the log head, the
    // trusted time and the counters of the batch's entitlements, then every request and
    // device of the batch. On a replicated store this is one round trip.
    let keys: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = batch
        .iter()
        .map(|j| {
            let dev_key = ent_key(&j.req.entitlement, &j.req.device_id);
            (
                legacy_request_key(&j.req.entitlement, &j.req.device_id, &j.req.request_id),
                refusal_key(&dev_key, &j.req.request_id),
                dev_key,
            )
        })
        .collect();
    let mut entitlements: Vec<&str> = Vec::new();
    for j in &batch {
        if !entitlements.contains(&j.req.entitlement.as_str()) {
            entitlements.push(&j.req.entitlement);
        }
    }
    let head_key = crate::audit_log::head_key(st.chain.as_deref());
    let mut lookups: Vec<(Table, &[u8])> = vec![
        (Table::Meta, CLOCK_TOLERANCE.key),
        (Table::Meta, CLOCK_MAX_JUMP.key),
        (Table::Meta, crate::latch::LATCHED),
        (Table::Meta, crate::checkpoints::HQ_ACK),
        (Table::Meta, &head_key),
        (Table::Meta, TIME_HWM),
    ];
    lookups.extend(entitlements.iter().map(|e| (Table::Counters, e.as_bytes())));
    let reservation_keys: Vec<Vec<u8>> = match &st.chain {
        Some(chain) => entitlements
            .iter()
            .map(|e| reservations::reservation_key(e, chain))
            .collect(),
        None => Vec::new(),
    };
    lookups.extend(
        reservation_keys
            .iter()
            .map(|k| (Table::Counters, k.as_slice())),
    );
    let shared_state = lookups.len();
    lookups.extend(keys.iter().flat_map(|(legacy, refusal, dev)| {
        [
            (Table::Requests, legacy.as_slice()),
            (Table::Devices, refusal.as_slice()),
            (Table::Devices, dev.as_slice()),
        ]
    }));
    // Read-free batches guard each device's key range below; batches that read guard
    // each device's record as read (on a shared store; the embedded one has no other
    // writer).
    let guard_reads = store.is_shared() && !(st.settings.is_some() && optimistic);
    let mut stored = match (&st.settings, optimistic) {
        (Some(settings), true) => {
            settings.guard(&mut txn);
            // One guard per decision: nothing at all kept for its device — no record,
            // no refusal. (Refusals in the legacy table are only in embedded stores,
            // which always read.)
            for (_, _, dev) in &keys {
                txn.require_absent_range(Table::Devices, dev, &device_history_end(dev));
            }
            vec![None; lookups.len() - shared_state].into_iter()
        }
        _ => {
            let mut read = store.get_many(&lookups)?.into_iter();
            let (tolerance, max_jump) = (read.next().flatten(), read.next().flatten());
            let (latch, acknowledged) = (read.next().flatten(), read.next().flatten());
            let (head, hwm) = (read.next().flatten(), read.next().flatten());
            st.head = crate::audit_log::head_from(head.as_ref())?;
            st.head_revision = head.map(|v| v.revision);
            st.hwm = hwm.as_ref().map(|v| i64_of(&v.value)).transpose()?;
            st.hwm_revision = hwm.map(|v| v.revision);
            for ent in &entitlements {
                let v = read.next().flatten();
                let c = match &v {
                    Some(v) => decode(&v.value)?,
                    None => Counters::default(),
                };
                st.counters
                    .insert((*ent).to_owned(), (c, v.map(|v| v.revision)));
            }
            for ent in entitlements.iter().take(reservation_keys.len()) {
                let mine = reservations::reservation_of(read.next().flatten())?;
                st.reservations.insert((*ent).to_owned(), mine);
            }
            st.settings = Some(Settings {
                tolerance: CLOCK_TOLERANCE.from_stored(tolerance.as_ref())?,
                tolerance_revision: tolerance.map(|v| v.revision),
                max_jump: CLOCK_MAX_JUMP.from_stored(max_jump.as_ref())?,
                max_jump_revision: max_jump.map(|v| v.revision),
                latch: crate::latch::Latch::from_stored(latch.as_ref())?,
                latch_revision: latch.map(|v| v.revision),
                acknowledged_at: acknowledged
                    .as_ref()
                    .map(|v| decode::<crate::checkpoints::Acknowledged>(&v.value))
                    .transpose()?
                    .map_or(i64::MIN, |a| a.acknowledged_at),
                acknowledged_revision: acknowledged.map(|v| v.revision),
            });
            read
        }
    };
    let (tolerance, max_jump, acknowledged_at) = st
        .settings
        .as_ref()
        .map(|s| (s.tolerance, s.max_jump, s.acknowledged_at))
        .ok_or_else(|| Error::InvalidState("settings".into()))?;
    if let (true, Some(settings)) = (guard_reads, &st.settings) {
        // As read: a receipt, a clock setting or the latch changed meanwhile makes the
        // batch decide again (nodes do not meet on the site chain's head, which records
        // such changes).
        settings.guard(&mut txn);
    }
    // A site that stopped itself releases nothing, not even a retry's answer. (On a
    // shared store the latch is guarded as read, above or in the read-free batch's
    // guards; the embedded store has no other writer.)
    if let Some(latch) = st.settings.as_ref().and_then(|s| s.latch.clone()) {
        let outcomes = batch.iter().map(|_| Err(latch.refusal())).collect();
        return Ok(Some((txn, outcomes)));
    }
    // A node chain's head is this engine's alone; the site chain's and the site-wide
    // trusted time are every writer's, so they are guarded on every commit.
    txn.require_revision(Table::Meta, &head_key, st.head_revision);
    if st.chain.is_none() {
        txn.require_revision(Table::Meta, TIME_HWM, st.hwm_revision);
    }
    let mut log = Appender::resume(&node.name, st.chain.as_deref(), st.head);

    let observed = node.now().0;
    // The trusted time: the site's mark, or this chain's last record if later.
    let hwm = st.hwm.unwrap_or(i64::MIN).max(st.head.time);
    // The clock against the trusted time: behind it by more than the tolerance, or ahead
    // of it by more than the site adopts, the whole batch is refused — fail closed, and
    // say so in the log at the trusted time, which stays where it is.
    let off = if observed < hwm.saturating_sub(tolerance) {
        Some(Event::ClockRollback {
            observed,
            high_water: hwm,
        })
    } else if hwm != i64::MIN && observed > hwm.saturating_add(max_jump) {
        Some(Event::ClockAhead {
            observed,
            high_water: hwm,
        })
    } else {
        None
    };
    if let Some(event) = off {
        let refusal = || match &event {
            Event::ClockAhead { .. } => Error::ClockAhead {
                observed,
                trusted: hwm,
                max_jump,
            },
            _ => Error::ClockRollback {
                observed,
                high_water: hwm,
            },
        };
        let outcomes = batch.iter().map(|_| Err(refusal())).collect();
        log.append(&mut txn, hwm, event)?;
        st.head = log.head();
        st.hwm_written = None;
        st.touched.clear();
        log.finish(&mut txn);
        return Ok(Some((txn, outcomes)));
    }
    let now = observed.max(hwm);
    // A node chain keeps its own time in its head; the site's mark, which a node that
    // starts reads as its floor, is raised at most once a second, so nodes seldom
    // collide on it.
    let raise = st.chain.is_none()
        || now
            >= st
                .hwm
                .unwrap_or(i64::MIN)
                .saturating_add(SITE_TIME_RAISE_SECS);
    if raise {
        if st.chain.is_some() {
            txn.require_revision(Table::Meta, TIME_HWM, st.hwm_revision);
        }
        txn.put(Table::Meta, TIME_HWM, &now.to_be_bytes());
        st.hwm_written = Some(now);
    }

    // Node chains decide against their own reservations: per entitlement, how many
    // requests of the batch may take a device from one.
    let mut wanted: Vec<(Arc<EntitlementContext>, u64)> = Vec::new();
    if st.chain.is_some() {
        for job in batch
            .iter()
            .filter(|j| j.confirm.is_none() && j.ctx.code.is_none())
        {
            match wanted
                .iter_mut()
                .find(|(c, _)| c.record.id == job.ctx.record.id)
            {
                Some((_, n)) => *n += 1,
                None => wanted.push((job.ctx.clone(), 1)),
            }
        }
    }
    let reserving_ents: Vec<String> = wanted.iter().map(|(c, _)| c.record.id.clone()).collect();
    // Entitlements whose reservation this batch allowed devices from.
    let mut used_from: Vec<String> = Vec::new();
    // Entitlements whose quota another live node holds: a request refused for the quota
    // or the day's limit there is not refused but waited for (the batch is decided again
    // shortly); requests refused for other reasons need no quota and are decided now.
    let mut held_elsewhere: Vec<String> = Vec::new();
    if let Some(chain) = st.chain.clone() {
        // Make each reservation hold what the batch may take.
        for (ctx, need) in wanted {
            let id = &ctx.record.id;
            let day = day_in(&mut Vec::new(), &ctx, now);
            let mut held = reservations::Held {
                ledger: match st.counters.remove(id) {
                    Some(l) => l,
                    None => reservations::ledger_of(store.get(Table::Counters, id.as_bytes())?)?,
                },
                mine: match st.reservations.remove(id) {
                    Some(m) => m,
                    None => reservations::reservation_of(
                        store.get(Table::Counters, &reservations::reservation_key(id, &chain))?,
                    )?,
                },
            };
            let room = reservations::ensure_room(node, &chain, &ctx, &mut held, need, &day, now);
            st.counters.insert(id.clone(), held.ledger);
            st.reservations.insert(id.clone(), held.mine);
            if let reservations::Room::Wait = room? {
                held_elsewhere.push(id.clone());
            }
        }
    }
    let pool_plan = plan_pool_slots(st, &batch, now);
    let pool_ahead = read_pool_rows_ahead(store, &batch, &pool_plan)?;
    let mut pool_ready = make_pool_keys_ahead(node, &batch, &pool_plan, &pool_ahead, now);
    let mut days: Vec<(String, String)> = Vec::new();
    let mut touched: Vec<String> = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    for (pos, (job, (_, req_key, dev_key))) in batch.into_iter().zip(keys).enumerate() {
        let Job {
            ctx,
            req,
            prepared,
            confirm,
            ..
        } = job;
        let (legacy_request, stored_request, stored_device) = (
            stored.next().flatten(),
            stored.next().flatten(),
            stored.next().flatten(),
        );
        let stored_request = stored_request.or(legacy_request);
        if guard_reads {
            // Read, not assumed: on a shared store another node may decide for the same
            // device meanwhile, and nodes no longer meet on a common log head or
            // counters — the device's record itself is what the commit is guarded on.
            txn.require_unchanged(Table::Devices, &dev_key, stored_device.as_ref());
        }
        if let Some(result) = confirm {
            let outcome = confirm_device(
                &mut txn,
                &mut log,
                now,
                &req,
                result,
                stored_device,
                &mut st.confirmed,
                &dev_key,
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
                let day = day_in(&mut days, &ctx, now);
                st.counters_of(store, &req.entitlement, &mut touched)?
                    .code
                    .record_failed(&day);
            }
            outcomes.push(outcome);
            continue;
        }
        let earlier = match st.requests.get(&req_key) {
            Some(r) => Some(r.clone()),
            None => stored_request.map(|v| decode(&v.value)).transpose()?,
        };
        if let Some(rr) = earlier {
            outcomes.push(match rr.station == req.station {
                true => Ok(Outcome::Replay(rr)),
                false => station_mismatch(&mut txn, &mut log, now, &req, Action::Retry)?,
            });
            continue;
        }
        // A device record answers a retry of the request that created it, from the
        // station that made it; any other request for that device is refused as already
        // provisioned.
        let already = match (st.devices.contains(&dev_key), stored_device) {
            (true, _) => true,
            (false, Some(v)) => {
                let d = DeviceRecord::from_stored(&v.value)?;
                if d.request_id == req.request_id {
                    outcomes.push(match d.station == req.station {
                        true => Ok(Outcome::Replay(RequestRecord {
                            device_id: req.device_id.clone(),
                            audit_sequence: d.audit_sequence,
                            denied: None,
                            reason: None,
                            station: d.station,
                        })),
                        false => station_mismatch(&mut txn, &mut log, now, &req, Action::Retry)?,
                    });
                    continue;
                }
                true
            }
            (false, None) => false,
        };
        let day = day_in(&mut days, &ctx, now);
        // A node chain decides against its reservation: the ledger counts every grant,
        // so the ledger less this node's unused grant is at least what all nodes allowed,
        // and below each limit while the grant lasts (see `reservations`).
        let reserving = st.chain.is_some() && ctx.code.is_none();
        let (held, next_slot) = match st.reservations.get(&req.entitlement) {
            Some((r, _)) if reserving => (r.room_on(&day), r.nth_slot(0)),
            _ => (0, None),
        };
        let c = if reserving {
            st.counters
                .get_mut(&req.entitlement)
                .map(|(c, _)| c)
                .ok_or_else(|| Error::InvalidState("counters".into()))?
        } else {
            counters_in(&mut st.counters, store, &req.entitlement, &mut touched)?
        };
        let state = EntitlementState {
            revoked: c.revoked,
            activated: c.activated
                || !ctx
                    .policy
                    .policy
                    .requires_approval(keyfab_policy::Action::Activate),
            last_acknowledged: ctx.record.created_at.max(acknowledged_at),
            total: c.total.saturating_sub(held),
            today: c.days.get(&day).copied().unwrap_or(0).saturating_sub(held),
        };
        let built_in = ctx.policy.decide(
            &state,
            &keyfab_policy::Request {
                device_id: &req.device_id,
                station: req.station.as_deref(),
                already_provisioned: already,
            },
            now,
        );
        // The policy module has the last word, in this same transaction.
        let (decision, reason) = match (built_in, &ctx.code) {
            (Decision::Allow, Some(module)) => {
                let counted = Counted {
                    total: c.total,
                    today: state.today,
                };
                // Run here, on the committer: the instance's memory is allocated and freed
                // on one thread, so the allocator reuses it warm. Instantiated on the
                // crypto workers and freed here, it cost 12-17% of throughput (pages
                // purged and faulted in again); here, none measurable (BENCHMARKS.md).
                let evaluation = c.code.evaluate(
                    module,
                    &ctx.policy,
                    now,
                    &day,
                    counted,
                    &req.device_id,
                    req.station.as_deref(),
                );
                code_decision(evaluation.verdict)
            }
            (other, _) => (other, None),
        };
        if let Decision::Deny(DenyCode::QuotaExceeded | DenyCode::DailyLimitExceeded) = decision {
            if held == 0 && held_elsewhere.contains(&req.entitlement) {
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
            Decision::Deny(code) => {
                let (entitlement, request_id, device_id, station) = (
                    req.entitlement.clone(),
                    req.request_id.clone(),
                    req.device_id.clone(),
                    req.station.clone(),
                );
                let event = match reason.clone() {
                    Some(reason) => Event::ProvisionDeniedByCode {
                        entitlement,
                        request_id,
                        device_id,
                        station,
                        code: code.code().to_owned(),
                        reason,
                    },
                    None => Event::ProvisionDenied {
                        entitlement,
                        request_id,
                        device_id,
                        station,
                        code: code.code().to_owned(),
                    },
                };
                let seq = log.append(&mut txn, now, event)?;
                outcomes.push(Err(denied(code, &req.device_id, reason.as_deref())));
                let rr = RequestRecord {
                    device_id: req.device_id.clone(),
                    audit_sequence: seq,
                    denied: Some(code),
                    reason,
                    station: req.station.clone(),
                };
                txn.put(Table::Devices, &req_key, &encode(&rr)?);
                st.requests.insert(req_key, rr);
            }
            Decision::Allow => {
                if prepared.len() != ctx.policy.policy.keys.len() {
                    // Only a device id the policy refuses is left unprepared.
                    return Err(Error::InvalidState(
                        "an allowed request without its prepared keys".into(),
                    ));
                }
                let has_pool = prepared.iter().any(|p| matches!(p, Prepared::Pool));
                let pool_index = match (has_pool, reserving) {
                    (false, _) => None,
                    (true, false) => Some(c.next_pool),
                    (true, true) => Some(next_slot.ok_or_else(|| {
                        Error::InvalidState("a reservation without pool slots".into())
                    })?),
                };
                let mut keys = Vec::new();
                let mut sealed_keys = Vec::new();
                let mut privates = Vec::new();
                for (i, (spec, p)) in ctx.policy.policy.keys.iter().zip(prepared).enumerate() {
                    let (key_id, sealed, private, cert) = match p {
                        Prepared::Pool => {
                            let index = pool_index
                                .ok_or_else(|| Error::InvalidState("pool index".into()))?;
                            if let Some(ready) = pool_ready
                                .remove(&(pos, i))
                                .filter(|ready| ready.index == index)
                            {
                                (ready.key_id, Vec::new(), Some(ready.private), ready.cert)
                            } else {
                                let kind = device_type(spec.key_type);
                                let Some(secret) =
                                    read_pool_key_from(node, &pool_ahead, &ctx, i, index)?
                                else {
                                    // Destroyed since the state was read (a revocation on
                                    // another node's watch): decide again from a fresh read.
                                    if store.is_shared() {
                                        return Ok(None);
                                    }
                                    return Err(Error::InvalidState(format!(
                                        "pool key {index} of '{}' is gone",
                                        ctx.record.id
                                    )));
                                };
                                let e = devicekey::expand(kind, &secret)?;
                                let cert = certify(
                                    &ctx,
                                    spec,
                                    &req.device_id,
                                    e.public.as_ref(),
                                    UnixTime(now),
                                    node.rng.as_ref(),
                                )?;
                                (e.key_id, Vec::new(), Some(e.private), cert)
                            }
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
                    keys.push(AuditedKey {
                        name: spec.name.clone(),
                        key_id: key_id.to_text(),
                        cert_serial,
                        certificate,
                    });
                    sealed_keys.push(serde_bytes::ByteBuf::from(sealed));
                    privates.push(private);
                }
                let seq = log.append(
                    &mut txn,
                    now,
                    Event::ProvisionAllowed {
                        entitlement: req.entitlement.clone(),
                        request_id: req.request_id.clone(),
                        device_id: req.device_id.clone(),
                        station: req.station.clone(),
                        pool_index,
                        keys: keys.clone(),
                    },
                )?;
                if reserving {
                    if let Some((r, _)) = st.reservations.get_mut(&req.entitlement) {
                        r.used += 1;
                        if has_pool {
                            r.take_slot();
                        }
                    }
                    if !used_from.contains(&req.entitlement) {
                        used_from.push(req.entitlement.clone());
                    }
                } else {
                    c.total += 1;
                    if ctx.code.is_some() {
                        c.code.record_allowed(&day, req.station.as_deref());
                    }
                    *c.days.entry(day).or_insert(0) += 1;
                    if has_pool {
                        c.next_pool += 1;
                    }
                }
                let device = DeviceRecord {
                    request_id: req.request_id.clone(),
                    audit_sequence: seq,
                    audit_row: log.row_key().unwrap_or(seq),
                    audit_chain: st.chain.clone(),
                    time: now,
                    station: req.station.clone(),
                    pool_index,
                    sealed: sealed_keys,
                    confirmed: None,
                    transport_key: req.transport_key.as_ref().map(|k| k.fingerprint().to_hex()),
                };
                let rr = RequestRecord {
                    device_id: req.device_id.clone(),
                    audit_sequence: seq,
                    denied: None,
                    reason: None,
                    station: req.station.clone(),
                };
                txn.put(Table::Devices, &dev_key, &device.to_stored()?);
                st.devices.insert(dev_key);
                st.requests.insert(req_key, rr);
                outcomes.push(Ok(Outcome::Allowed {
                    audit_sequence: seq,
                    keys,
                    privates,
                }));
            }
        }
    }
    for ent in &touched {
        if let Some((c, rev)) = st.counters.get(ent) {
            txn.require_revision(Table::Counters, ent.as_bytes(), *rev);
            txn.put(Table::Counters, ent.as_bytes(), &encode(c)?);
        }
    }
    st.touched = touched;
    // Each reservation decided against: guarded where it was read (one taken back
    // cannot be spent), renewed, and the ledger guarded too (refusals for the limits
    // hold only while no node has gained a grant since).
    for ent in reserving_ents {
        if let (Some((r, rev)), Some((_, ledger_rev))) =
            (st.reservations.get_mut(&ent), st.counters.get(&ent))
        {
            let key = reservations::reservation_key(&ent, st.chain.as_deref().unwrap_or(""));
            txn.require_revision(Table::Counters, ent.as_bytes(), *ledger_rev)
                .require_revision(Table::Counters, &key, *rev);
            // Written (and marked as in use) only when this batch allowed devices from
            // it: a node that only refuses holds its grant as a node that died would,
            // and after `RESERVATION_LIFE_SECS` a node that needs the quota takes it.
            if used_from.contains(&ent) {
                r.seen_at = now;
                txn.put(Table::Counters, &key, &encode(r)?);
                st.reserved.push(ent);
            }
        }
    }
    st.head = log.head();
    log.finish(&mut txn);
    Ok(Some((txn, outcomes)))
}

/// The policy day of `now` for `ctx`'s entitlement, worked out once per batch: every
/// decision of a batch has the same time, and the time-zone conversion is the dearest
/// part of deciding.
pub(super) fn day_in(
    days: &mut Vec<(String, String)>,
    ctx: &EntitlementContext,
    now: i64,
) -> String {
    if let Some((_, day)) = days.iter().find(|(id, _)| *id == ctx.record.id) {
        return day.clone();
    }
    let day = ctx.policy.day_of(now);
    days.push((ctx.record.id.clone(), day.clone()));
    day
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
    if record.station != req.station {
        return station_mismatch(txn, log, now, req, Action::Confirm)?;
    }
    if let Some(c) = record.confirmed {
        return if c.result == result {
            Ok(Outcome::Confirmed {
                audit_sequence: c.audit_sequence,
                repeated: true,
            })
        } else {
            Err(Error::InvalidState(format!(
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
            entitlement: req.entitlement.clone(),
            device_id: req.device_id.clone(),
            station: req.station.clone(),
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
            Some(req.request_id.clone()),
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
            entitlement: req.entitlement.clone(),
            action: name.to_owned(),
            request_id,
            device_id: req.device_id.clone(),
            station: req.station.clone(),
        },
    )?;
    Ok(Err(Error::Denied {
        code: DenyCode::StationNotAllowed.code(),
        message,
    }))
}
