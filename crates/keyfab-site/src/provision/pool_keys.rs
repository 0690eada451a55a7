//! Keys from HQ's pool: which slots a batch will take, their rows read ahead in one
//! snapshot, and their keys expanded and certified on every core before the batch is
//! decided.

use super::*;

/// The pool spec number (its position in the entitlement's pool) of key spec
/// `spec_index` of the policy.
pub(super) fn pool_spec_of(ctx: &EntitlementContext, spec_index: usize) -> Result<u8> {
    let pool_spec = ctx
        .record
        .pool
        .iter()
        .position(|p| p.key == ctx.policy.policy.keys[spec_index].name)
        .ok_or_else(|| Error::Corrupt("key spec not in the pool".into()))?;
    u8::try_from(pool_spec).map_err(|_| Error::Corrupt("pool spec".into()))
}

/// Pool rows a batch will likely take, read ahead in one snapshot (on etcd one round
/// trip for the batch instead of one per device), keyed by row key.
pub(super) type PoolRows = HashMap<Vec<u8>, Versioned>;

/// The pool slots a batch is expected to take, as (request's position in the batch, key
/// spec, slot): each request of an entitlement the next slot after the one before it, in
/// batch order, as long as the entitlement's counters still allow devices
/// ([`room_left`]). Requests beyond that would be refused, so nothing is planned for
/// them: a flood of requests past the quota or the day's limit costs no crypto.
pub(super) fn plan_pool_slots(st: &Carried, batch: &[Job], now: i64) -> Vec<(usize, usize, u64)> {
    // Per entitlement: how many planned so far, and how many there is room for.
    let mut next_slot: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut plan = Vec::new();
    for (pos, job) in batch.iter().enumerate() {
        let pool_specs = || {
            job.prepared
                .iter()
                .enumerate()
                .filter(|(_, p)| matches!(p, Prepared::Pool))
        };
        if job.confirm.is_some() || pool_specs().next().is_none() {
            continue;
        }
        let ent = job.req.entitlement.as_str();
        let Some((counters, _)) = st.counters.get(ent) else {
            continue;
        };
        // A node chain takes the slots of its reservation, in order; otherwise the
        // entitlement's next slots.
        let reservation = match st.reservations.get(ent) {
            Some((r, _)) if st.chain.is_some() && job.ctx.code.is_none() => Some(r),
            _ => None,
        };
        let (planned, room) = next_slot.entry(ent).or_insert_with(|| {
            let room = match reservation {
                Some(r) => r.room_on(&job.ctx.policy.day_of(now)),
                None => room_left(&job.ctx, counters, now),
            };
            (0, room)
        });
        if *room == 0 {
            continue;
        }
        let slot = match reservation {
            Some(r) => r.nth_slot(*planned),
            None => Some(counters.next_pool + *planned),
        };
        let Some(slot) = slot else { continue };
        plan.extend(pool_specs().map(|(i, _)| (pos, i, slot)));
        *planned += 1;
        *room -= 1;
    }
    plan
}

/// The rows of the planned slots, read in one snapshot (on etcd one round trip for the
/// batch instead of one per device), keyed by row key. A slot not read ahead is read
/// when taken ([`read_pool_key`]).
pub(super) fn read_pool_rows_ahead(
    store: &dyn keyfab_store::Store,
    batch: &[Job],
    plan: &[(usize, usize, u64)],
) -> Result<PoolRows> {
    if plan.is_empty() {
        return Ok(PoolRows::new());
    }
    let wanted = plan
        .iter()
        .map(|&(pos, i, index)| {
            let ctx = &batch[pos].ctx;
            Ok(pool_row_key(&ctx.record.id, pool_spec_of(ctx, i)?, index))
        })
        .collect::<Result<Vec<_>>>()?;
    let lookups: Vec<(Table, &[u8])> = wanted.iter().map(|k| (Table::Pool, k.as_slice())).collect();
    let found = store.get_many(&lookups)?;
    Ok(wanted
        .into_iter()
        .zip(found)
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect())
}

/// A pool key a batch is expected to take, expanded and certified ahead.
pub(super) struct PoolKeyReady {
    /// The pool slot it was made for: used only if the decision takes that slot.
    pub(super) index: u64,
    pub(super) key_id: KeyId,
    pub(super) private: SecretBytes,
    pub(super) cert: Option<(Vec<u8>, String)>,
}

/// The pool keys of `batch` made ready on every core, keyed by (request's position in
/// the batch, key spec). A pool key's slot is known only as the batch is decided, and
/// expanding and certifying it (a scalar multiplication and a signature) on the one
/// committer thread would make the serial step as slow as the crypto; so each request
/// is assumed to take the next slot of its entitlement, in batch order, and its keys are
/// made in parallel before deciding. A request that does not take the slot assumed (a
/// refusal or a retry before it) has its keys made when it is decided instead.
pub(super) fn make_pool_keys_ahead(
    node: &Node,
    batch: &[Job],
    plan: &[(usize, usize, u64)],
    ahead: &PoolRows,
    now: i64,
) -> HashMap<(usize, usize), PoolKeyReady> {
    let make = |part: &[(usize, usize, u64)]| -> Vec<((usize, usize), PoolKeyReady)> {
        let made = part
            .iter()
            .filter_map(|&(pos, i, index)| {
                let job = &batch[pos];
                let spec = &job.ctx.policy.policy.keys[i];
                let secret = read_pool_key_from(node, ahead, &job.ctx, i, index).ok()??;
                let e = devicekey::expand(device_type(spec.key_type), &secret).ok()?;
                let cert = certify(
                    &job.ctx,
                    i,
                    &job.req.device_id,
                    e.public.as_ref(),
                    UnixTime(now),
                    node.rng.as_ref(),
                )
                .ok()?;
                Some((
                    (pos, i),
                    PoolKeyReady {
                        index,
                        key_id: e.key_id,
                        private: e.private,
                        cert,
                    },
                ))
            })
            .collect();
        keyfab_crypto::secret::scrub_stack();
        made
    };
    // Asked once: the standard library reads the process's cgroup files for it.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if plan.len() < 2 || cores < 2 {
        return make(plan).into_iter().collect();
    }
    let chunk = plan.len().div_ceil(cores);
    std::thread::scope(|s| {
        let mut parts = plan.chunks(chunk);
        let here = parts.next().unwrap_or(&[]);
        let others: Vec<_> = parts.map(|part| s.spawn(move || make(part))).collect();
        let mut made: HashMap<_, _> = make(here).into_iter().collect();
        for h in others {
            made.extend(h.join().unwrap_or_default());
        }
        made
    })
}

/// How many more devices `counters` allow under the quota and today's limit (none once
/// revoked). An upper bound only: the policy decides each request.
pub(super) fn room_left(ctx: &EntitlementContext, counters: &Counters, now: i64) -> u64 {
    if counters.revoked {
        return 0;
    }
    let room = ctx.policy.policy.devices.saturating_sub(counters.total);
    let day = ctx.policy.day_of(now);
    match ctx.policy.daily_limit(counters.raised_on(&day)) {
        Some(daily) => {
            let today = counters.days.get(&day).copied().unwrap_or(0);
            room.min(daily.saturating_sub(today))
        }
        None => room,
    }
}

pub(super) fn read_pool_key(
    node: &Node,
    ctx: &EntitlementContext,
    spec_index: usize,
    index: u64,
) -> Result<Secret32> {
    read_pool_key_from(node, &PoolRows::new(), ctx, spec_index, index)?
        .ok_or_else(|| Error::Corrupt(format!("pool key {index} of '{}' is gone", ctx.record.id)))
}

/// [`read_pool_key`], from the rows read ahead when they hold it; `None` if the slot's
/// row is gone (destroyed by a revocation).
pub(super) fn read_pool_key_from(
    node: &Node,
    ahead: &PoolRows,
    ctx: &EntitlementContext,
    spec_index: usize,
    index: u64,
) -> Result<Option<Secret32>> {
    let spec = pool_spec_of(ctx, spec_index)?;
    let key = pool_row_key(&ctx.record.id, spec, index);
    let stored = match ahead.get(&key) {
        Some(v) => Some(v.clone()),
        None => node.store.get(Table::Pool, &key)?,
    };
    let Some(v) = stored else {
        return Ok(None);
    };
    let plain = ctx.aead.open(pool_nonce(spec, index), &key, &v.value)?;
    Secret32::from_slice(plain.expose())
        .map(Some)
        .ok_or_else(|| Error::Corrupt("pool key length".into()))
}
