//! Deciding a batch: the state it starts from (read, or carried from the last commit),
//! every decision in order against it, and the one transaction that records them.

use super::pool_keys::{
    make_pool_keys_ahead, plan_pool_slots, read_pool_key_from, read_pool_rows_ahead, PoolKeyReady,
    PoolRows,
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

/// The counters of `entitlement` as this batch has them, read once per batch; the
/// entitlement joins `touched` so they are written back with the batch. On the map
/// alone, so the rest of the state stays free to borrow.
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

/// The stored values a batch reads for one request: its refusal under the legacy key
/// and under the device's key range, and its device's record.
struct StoredFor {
    legacy_request: Option<Versioned>,
    request: Option<Versioned>,
    device: Option<Versioned>,
}

/// The keys a batch reads for one request: (legacy request key, refusal key, device
/// key).
type RequestKeys = (Vec<u8>, Vec<u8>, Vec<u8>);

/// What a batch decided: the transaction that records it, and each request's answer in
/// batch order.
pub(super) type Decided = (Txn, Vec<Result<Outcome>>);

/// Decides one batch: every decision in order, in one transaction (one fsync), in named
/// steps — read the snapshot, place the guards, stop if the site stopped itself, check
/// the clock, reserve, make pool keys ahead, decide and record each request, write back.
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
) -> Result<Option<Decided>> {
    let mut txn = Txn::default();
    let optimistic =
        optimistic && st.settings.is_some() && batch.iter().all(|j| j.confirm.is_none());
    let keys = request_keys(&batch);
    let mut stored = read_snapshot(node, st, &mut txn, &batch, &keys, optimistic)?;
    // Read-free batches guard each device's key range (in `read_snapshot`); batches that
    // read guard each device's record as read (on a shared store; the embedded one has
    // no other writer).
    let guard_reads = node.store.is_shared() && !optimistic;
    let settings = st
        .settings
        .clone()
        .ok_or_else(|| Error::InvalidState("settings".into()))?;
    if guard_reads {
        // As read: a receipt, a clock setting or the latch changed meanwhile makes the
        // batch decide again (nodes do not meet on the site chain's head, which records
        // such changes).
        settings.guard(&mut txn);
    }
    // A site that stopped itself releases nothing, not even a retry's answer. (On a
    // shared store the latch is guarded as read, above or in the read-free batch's
    // guards; the embedded store has no other writer.)
    if let Some(latch) = &settings.latch {
        let outcomes = batch.iter().map(|_| Err(latch.refusal())).collect();
        return Ok(Some((txn, outcomes)));
    }
    // A node chain's head is this engine's alone; the site chain's and the site-wide
    // trusted time are every writer's, so they are guarded on every commit.
    let head_key = crate::audit_log::head_key(st.chain.as_deref());
    txn.require_revision(Table::Meta, &head_key, st.head_revision);
    if st.chain.is_none() {
        txn.require_revision(Table::Meta, TIME_HWM, st.hwm_revision);
    }
    let mut log = Appender::resume(&node.name, st.chain.as_deref(), st.head);
    let now = match check_clock(node.now().0, st, &settings) {
        Ok(now) => now,
        Err(off) => {
            // Fail closed, and say so in the log at the trusted time, which stays where
            // it is.
            let outcomes = batch.iter().map(|_| Err(off.refusal())).collect();
            log.append(&mut txn, off.trusted(), off.event())?;
            st.head = log.head();
            st.hwm_written = None;
            st.touched.clear();
            log.finish(&mut txn);
            return Ok(Some((txn, outcomes)));
        }
    };
    raise_trusted_time(st, &mut txn, now);
    let (reserving, held_elsewhere) = reserve(node, st, &batch, now)?;
    let pool_plan = plan_pool_slots(st, &batch, now);
    let pool_ahead = read_pool_rows_ahead(node.store.as_ref(), &batch, &pool_plan)?;
    let pool_ready = make_pool_keys_ahead(node, &batch, &pool_plan, &pool_ahead, now);
    let mut deciding = Deciding {
        node,
        txn,
        log,
        now,
        acknowledged_at: settings.acknowledged_at,
        guard_reads,
        days: Vec::new(),
        touched: Vec::new(),
        used_from: Vec::new(),
        held_elsewhere,
        pool_ahead,
        pool_ready,
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    for (pos, (job, keys)) in batch.into_iter().zip(keys).enumerate() {
        let found = StoredFor {
            legacy_request: stored.next().flatten(),
            request: stored.next().flatten(),
            device: stored.next().flatten(),
        };
        match deciding.decide_job(st, pos, job, keys, found)? {
            Some(outcome) => outcomes.push(outcome),
            None => return Ok(None),
        }
    }
    Ok(Some((deciding.write_back(st, reserving)?, outcomes)))
}

/// Each request's keys, in batch order.
fn request_keys(batch: &[Job]) -> Vec<RequestKeys> {
    batch
        .iter()
        .map(|j| {
            let dev_key = ent_key(&j.req.entitlement, &j.req.device_id);
            (
                legacy_request_key(&j.req.entitlement, &j.req.device_id, &j.req.request_id),
                refusal_key(&dev_key, &j.req.request_id),
                dev_key,
            )
        })
        .collect()
}

/// The batch's entitlements, each once, in order of first appearance.
fn entitlements_of(batch: &[Job]) -> Vec<&str> {
    let mut entitlements: Vec<&str> = Vec::new();
    for j in batch {
        if !entitlements.contains(&j.req.entitlement.as_str()) {
            entitlements.push(&j.req.entitlement);
        }
    }
    entitlements
}

/// Step 1, the snapshot: one read for the batch — the settings others may change, the
/// log head, the trusted time, the counters (and this node's reservations) of the
/// batch's entitlements, then every request and device of the batch; on a replicated
/// store one round trip. Fills `st` and returns the per-request values, three per
/// request ([`StoredFor`]'s order). A read-free (optimistic) batch reads nothing: it
/// guards in `txn` that each device has nothing stored, and that the settings are as
/// last read, and takes every request as new.
fn read_snapshot(
    node: &Node,
    st: &mut Carried,
    txn: &mut Txn,
    batch: &[Job],
    keys: &[RequestKeys],
    optimistic: bool,
) -> Result<std::vec::IntoIter<Option<Versioned>>> {
    let entitlements = entitlements_of(batch);
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
    let per_request = keys.len() * 3;
    if let (Some(settings), true) = (&st.settings, optimistic) {
        settings.guard(txn);
        // One guard per decision: nothing at all kept for its device — no record, no
        // refusal. (Refusals in the legacy table are only in embedded stores, which
        // always read.)
        for (_, _, dev) in keys {
            txn.require_absent_range(Table::Devices, dev, &device_history_end(dev));
        }
        return Ok(vec![None; per_request].into_iter());
    }
    lookups.extend(keys.iter().flat_map(|(legacy, refusal, dev)| {
        [
            (Table::Requests, legacy.as_slice()),
            (Table::Devices, refusal.as_slice()),
            (Table::Devices, dev.as_slice()),
        ]
    }));
    let mut read = node.store.get_many(&lookups)?.into_iter();
    let mut next = || read.next().flatten();
    let (tolerance, max_jump, latch, acknowledged) = (next(), next(), next(), next());
    let (head, hwm) = (next(), next());
    st.head = crate::audit_log::head_from(head.as_ref())?;
    st.head_revision = head.map(|v| v.revision);
    st.hwm = hwm.as_ref().map(|v| i64_of(&v.value)).transpose()?;
    st.hwm_revision = hwm.map(|v| v.revision);
    for ent in &entitlements {
        let v = next();
        let c = match &v {
            Some(v) => decode(&v.value)?,
            None => Counters::default(),
        };
        st.counters
            .insert((*ent).to_owned(), (c, v.map(|v| v.revision)));
    }
    for ent in entitlements.iter().take(reservation_keys.len()) {
        let mine = reservations::reservation_of(next())?;
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
    Ok(read.collect::<Vec<_>>().into_iter())
}

/// What the clock check found when the batch may not be decided (the trusted time
/// stays where it is).
#[derive(Clone, Copy)]
enum ClockOff {
    /// Behind the trusted time by more than the tolerance.
    Behind { observed: i64, trusted: i64 },
    /// Ahead of the trusted time by more than the site adopts.
    Ahead {
        observed: i64,
        trusted: i64,
        max_jump: i64,
    },
}

impl ClockOff {
    /// The trusted time, which the refusal is recorded at.
    fn trusted(self) -> i64 {
        match self {
            ClockOff::Behind { trusted, .. } | ClockOff::Ahead { trusted, .. } => trusted,
        }
    }

    fn event(self) -> Event {
        match self {
            ClockOff::Behind { observed, trusted } => Event::ClockRollback {
                observed,
                high_water: trusted,
            },
            ClockOff::Ahead {
                observed, trusted, ..
            } => Event::ClockAhead {
                observed,
                high_water: trusted,
            },
        }
    }

    /// What each request of the batch is answered.
    fn refusal(self) -> Error {
        match self {
            ClockOff::Behind { observed, trusted } => Error::ClockRollback {
                observed,
                high_water: trusted,
            },
            ClockOff::Ahead {
                observed,
                trusted,
                max_jump,
            } => Error::ClockAhead {
                observed,
                trusted,
                max_jump,
            },
        }
    }
}

/// Step 3, the clock (pure): the time the batch is decided at — the clock, or the
/// trusted time if later — or why the batch is refused whole.
fn check_clock(
    observed: i64,
    st: &Carried,
    settings: &Settings,
) -> std::result::Result<i64, ClockOff> {
    // The trusted time: the site's mark, or this chain's last record if later.
    let trusted = st.hwm.unwrap_or(i64::MIN).max(st.head.time);
    if observed < trusted.saturating_sub(settings.tolerance) {
        return Err(ClockOff::Behind { observed, trusted });
    }
    if trusted != i64::MIN && observed > trusted.saturating_add(settings.max_jump) {
        return Err(ClockOff::Ahead {
            observed,
            trusted,
            max_jump: settings.max_jump,
        });
    }
    Ok(observed.max(trusted))
}

/// Raises the site's trusted-time mark to `now` in `txn`. A node chain keeps its own
/// time in its head; the site's mark, which a node that starts reads as its floor, is
/// raised at most once a second, so nodes seldom collide on it.
fn raise_trusted_time(st: &mut Carried, txn: &mut Txn, now: i64) {
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
}

/// Step 4, reserving (node chains only): makes this node's reservation of each
/// entitlement hold what the batch may take. Returns the entitlements reserved for, and
/// those whose quota another live node holds: a request refused there for the quota or
/// the day's limit is not refused but waited for (the batch is decided again shortly);
/// requests refused for other reasons need no quota and are decided now.
fn reserve(
    node: &Node,
    st: &mut Carried,
    batch: &[Job],
    now: i64,
) -> Result<(Vec<String>, Vec<String>)> {
    let Some(chain) = st.chain.clone() else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut wanted: Vec<(Arc<EntitlementContext>, u64)> = Vec::new();
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
    let reserving = wanted.iter().map(|(c, _)| c.record.id.clone()).collect();
    let mut held_elsewhere = Vec::new();
    let store = node.store.as_ref();
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
    Ok((reserving, held_elsewhere))
}

/// Step 6, the decision proper (pure): the built-in rules on the entitlement's state as
/// `c` has it (less what this node `held` in reservation and has not used), then the
/// policy module's word, which it says in this same step. Returns the decision and, when
/// a module refused, its reason.
#[allow(clippy::too_many_arguments)]
fn decide_policy(
    ctx: &EntitlementContext,
    req: &ProvisionRequest,
    c: &mut Counters,
    held: u64,
    already: bool,
    day: &str,
    now: i64,
    acknowledged_at: i64,
) -> (Decision, Option<String>) {
    let state = EntitlementState {
        revoked: c.revoked,
        activated: c.activated
            || !ctx
                .policy
                .policy
                .requires_approval(keyfab_policy::Action::Activate),
        last_acknowledged: ctx.record.created_at.max(acknowledged_at),
        total: c.total.saturating_sub(held),
        today: c.days.get(day).copied().unwrap_or(0).saturating_sub(held),
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
    match (built_in, &ctx.code) {
        (Decision::Allow, Some(module)) => {
            let counted = Counted {
                total: c.total,
                today: state.today,
            };
            // Run here, on the committer: the instance's memory is allocated and freed
            // on one thread, so the allocator reuses it warm. Instantiated on the crypto
            // workers and freed here, it cost 12-17% of throughput (pages purged and
            // faulted in again); here, none measurable (BENCHMARKS.md).
            let evaluation = c.code.evaluate(
                module,
                &ctx.policy,
                now,
                day,
                counted,
                &req.device_id,
                req.station.as_deref(),
            );
            code_decision(evaluation.verdict)
        }
        (other, _) => (other, None),
    }
}

/// The keys a release hands out: as audited, sealed for the device record, and what the
/// device receives.
struct Released {
    audited: Vec<AuditedKey>,
    sealed: Vec<serde_bytes::ByteBuf>,
    privates: Vec<Option<SecretBytes>>,
}

/// One batch while its requests are decided (step 6) and written back (step 7): what
/// every decision reads and adds to.
struct Deciding<'a> {
    node: &'a Node,
    txn: Txn,
    log: Appender,
    now: i64,
    acknowledged_at: i64,
    /// Guard each device's record as read (a shared store that read it).
    guard_reads: bool,
    /// Policy days worked out so far ([`day_in`]).
    days: Vec<(String, String)>,
    /// Entitlements whose counters decisions changed.
    touched: Vec<String>,
    /// Entitlements whose reservation this batch allowed devices from.
    used_from: Vec<String>,
    held_elsewhere: Vec<String>,
    pool_ahead: PoolRows,
    pool_ready: HashMap<(usize, usize), PoolKeyReady>,
}

impl Deciding<'_> {
    /// Decides and records the request at `pos`: its answer, or `None` if the batch must
    /// be decided again from a fresh read.
    fn decide_job(
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
            if held == 0 && self.held_elsewhere.contains(&req.entitlement) {
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
                    return Err(Error::InvalidState(
                        "a reservation without pool slots".into(),
                    ));
                }
                let Some(keys) = self.release_keys(&ctx, &req, pos, prepared, pool_index)? else {
                    return Ok(None);
                };
                let release = Release {
                    ctx: &ctx,
                    req: &req,
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

    /// The answer to a retry, from the record its request left (a refusal, or the device
    /// it provisioned) — to the station that made it, and refused to any other — or
    /// `None` for a request seen the first time.
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
            None => stored_request.map(|v| decode(&v.value)).transpose()?,
        };
        let answer = match earlier {
            Some(rr) => Some((rr.station.clone(), rr)),
            // A device record answers a retry of the request that created it; any
            // other request for that device is refused as already provisioned.
            None => match stored_device {
                Some(v) if !st.devices.contains(dev_key) => {
                    let d = DeviceRecord::from_stored(&v.value)?;
                    (d.request_id == req.request_id).then(|| {
                        let rr = RequestRecord {
                            device_id: req.device_id.clone(),
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
        Ok(Some(match station == req.station {
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
        let seq = self.log.append(&mut self.txn, self.now, event)?;
        let answer = Err(denied(code, &req.device_id, reason.as_deref()));
        let rr = RequestRecord {
            device_id: req.device_id.clone(),
            audit_sequence: seq,
            denied: Some(code),
            reason,
            station: req.station.clone(),
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
            // Only a device id the policy refuses is left unprepared.
            return Err(Error::InvalidState(
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
                    let index =
                        pool_index.ok_or_else(|| Error::InvalidState("pool index".into()))?;
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
            // Destroyed since the state was read (a revocation on another node's
            // watch): decide again from a fresh read.
            if self.node.store.is_shared() {
                return Ok(None);
            }
            return Err(Error::InvalidState(format!(
                "pool key {index} of '{}' is gone",
                ctx.record.id
            )));
        };
        let e = devicekey::expand(device_type(spec.key_type), &secret)?;
        let cert = certify(
            ctx,
            spec,
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
            reserving,
            pool_index,
            day,
        } = release;
        let seq = self.log.append(
            &mut self.txn,
            self.now,
            Event::ProvisionAllowed {
                entitlement: req.entitlement.clone(),
                request_id: req.request_id.clone(),
                device_id: req.device_id.clone(),
                station: req.station.clone(),
                pool_index,
                keys: keys.audited.clone(),
            },
        )?;
        if reserving {
            if let Some((r, _)) = st.reservations.get_mut(&req.entitlement) {
                r.used += 1;
                if pool_index.is_some() {
                    r.take_slot();
                }
            }
            if !self.used_from.contains(&req.entitlement) {
                self.used_from.push(req.entitlement.clone());
            }
        } else {
            let c = st
                .counters
                .get_mut(&req.entitlement)
                .map(|(c, _)| c)
                .ok_or_else(|| Error::InvalidState("counters".into()))?;
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
            request_id: req.request_id.clone(),
            audit_sequence: seq,
            audit_row: self.log.row_key().unwrap_or(seq),
            audit_chain: st.chain.clone(),
            time: self.now,
            station: req.station.clone(),
            pool_index,
            sealed: keys.sealed,
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
        self.txn.put(Table::Devices, &dev_key, &device.to_stored()?);
        st.devices.insert(dev_key);
        st.requests.insert(req_key, rr);
        Ok(Outcome::Allowed {
            audit_sequence: seq,
            keys: keys.audited,
            privates: keys.privates,
        })
    }

    /// Step 7, write back: the counters decisions changed, guarded as read; each
    /// reservation decided against, guarded where it was read (one taken back cannot be
    /// spent) and renewed, with the ledger guarded too (refusals for the limits hold
    /// only while no node has gained a grant since); the log's records and head. The
    /// batch's transaction.
    fn write_back(mut self, st: &mut Carried, reserving: Vec<String>) -> Result<Txn> {
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
struct Release<'a> {
    ctx: &'a EntitlementContext,
    req: &'a ProvisionRequest,
    /// Counted in this node's reservation (a node chain), not in the counters.
    reserving: bool,
    pool_index: Option<u64>,
    day: String,
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
