//! Deciding a batch: the state it starts from (read, or carried from the last commit),
//! every decision in order against it, and the one transaction that records them.

use super::pool_keys::{make_pool_keys_ahead, plan_pool_slots, read_pool_rows_ahead};
use super::record::Deciding;
use super::rules::check_clock;
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
        .ok_or_else(|| Error::Corrupt("counters".into()))
}

/// The stored values a batch reads for one request: its refusal under the legacy key
/// and under the device's key range, and its device's record.
pub(super) struct StoredFor {
    pub(super) legacy_request: Option<Versioned>,
    pub(super) request: Option<Versioned>,
    pub(super) device: Option<Versioned>,
}

/// The keys a batch reads for one request: (legacy request key, refusal key, device
/// key).
pub(super) type RequestKeys = (Vec<u8>, Vec<u8>, Vec<u8>);

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
        .ok_or_else(|| Error::Corrupt("settings".into()))?;
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
    // The trusted time: the site's mark, or this chain's last record if later.
    let trusted = st.hwm.unwrap_or(i64::MIN).max(st.head.time);
    let now = match check_clock(node.now().0, trusted, settings.tolerance, settings.max_jump) {
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
    // What is left of the read: the three values of each request, in order.
    Ok(read)
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
