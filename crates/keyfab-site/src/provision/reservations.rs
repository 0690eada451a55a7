//! Reservations: how cluster nodes share an entitlement's quota without meeting on
//! every commit.
//!
//! On a shared store an entitlement's counters (`counters/<entitlement>`) are the
//! *ledger*: `total` and `days` count every device *granted* to a node, used or not, and
//! pool slots are handed out in ranges. Each node holds a [`Reservation`]
//! (`counters/<entitlement>/<chain>`): a block of the quota for one policy day, and the
//! pool slots that go with it. A node decides against its own block and writes only its
//! own reservation; it writes the ledger only to take a new block (a few times a second
//! at most), so two busy nodes seldom collide. What keeps this exact:
//!
//! - the ledger never grants beyond the quota or the day's limit, and a node allows a
//!   device only from its own block, so every limit holds whatever the nodes do;
//! - every decision is guarded on its node's reservation at the revision it read, so a
//!   reservation taken back (below) can never be spent: the commit fails and the node
//!   reads again;
//! - a node refuses a device for the quota or the day's limit only when the ledger is
//!   spent and no other node holds an unused grant, guarded on the ledger it read: at
//!   that commit the devices allowed are exactly the limit, so HQ's replay of the merged
//!   log refuses it too;
//! - a reservation its node has not allowed a device from for [`RESERVATION_LIFE_SECS`]
//!   (the node died, stalled, serves other entitlements, or only refuses) is taken back
//!   by a node that needs the quota, in one transaction guarded on it; a node that holds
//!   unused grants and uses them is waited for. No lease and no clock decides safety:
//!   only revisions do.

use super::{Counters, EntitlementContext};
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Outcome, Table, Txn, Versioned};
use serde::{Deserialize, Serialize};

/// How long a reservation its node does not use stays its node's alone. After that a
/// node that needs the quota takes it back.
pub const RESERVATION_LIFE_SECS: i64 = 5;

/// How long a block just taken counts as in use before any device is allowed from it.
const GRANT_GRACE_SECS: i64 = 1;

/// The first block a node asks for; each further block doubles, up to [`MAX_BLOCK`]: a
/// busy node soon takes a few thousand devices at a time, a quiet one little.
const FIRST_BLOCK: u64 = 64;
const MAX_BLOCK: u64 = 4096;

/// One node's share of an entitlement's quota.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// The policy day the grant counts against (`YYYY-MM-DD`).
    pub day: String,
    /// Devices granted (counted in the ledger's `total` and `days[day]`).
    pub granted: u64,
    /// Devices this node allowed against the grant.
    pub used: u64,
    /// Pool slots granted and not used yet, `[start, end)`, taken from the front.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool: Vec<(u64, u64)>,
    /// Trusted time of its node's last commit that allowed a device from it (a block
    /// just taken counts as used `GRANT_GRACE_SECS` short of the reservation's life).
    pub seen_at: i64,
    /// The size of the next block to ask for.
    pub block: u64,
}

impl Reservation {
    /// Slots granted and not used yet.
    pub fn unused(&self) -> u64 {
        self.granted.saturating_sub(self.used)
    }

    /// Devices it still allows on `day`.
    pub fn room_on(&self, day: &str) -> u64 {
        if self.day == day {
            self.unused()
        } else {
            0
        }
    }

    /// The `k`-th pool slot from now (0: the next one), if granted.
    pub fn nth_slot(&self, mut k: u64) -> Option<u64> {
        for &(start, end) in &self.pool {
            let len = end.saturating_sub(start);
            if k < len {
                return Some(start + k);
            }
            k -= len;
        }
        None
    }

    /// Takes the next pool slot.
    pub fn take_slot(&mut self) -> Option<u64> {
        let (start, end) = self.pool.first_mut()?;
        let slot = *start;
        *start += 1;
        if start >= end {
            self.pool.remove(0);
        }
        Some(slot)
    }
}

/// The key of `chain`'s reservation of `entitlement` (table `counters`).
pub(crate) fn reservation_key(entitlement: &str, chain: &str) -> Vec<u8> {
    format!("{entitlement}/{chain}").into_bytes()
}

/// The prefix of every reservation of `entitlement`.
pub(crate) fn reservations_prefix(entitlement: &str) -> Vec<u8> {
    format!("{entitlement}/").into_bytes()
}

/// Every node's reservation of `entitlement`, with its key and revision.
pub(crate) fn all_reservations(
    node: &Node,
    entitlement: &str,
) -> Result<Vec<(Vec<u8>, Reservation, u64)>> {
    node.store
        .scan(
            Table::Counters,
            &reservations_prefix(entitlement),
            usize::MAX,
        )?
        .into_iter()
        .map(|(k, v)| Ok((k, decode(&v.value)?, v.revision)))
        .collect()
}

/// Puts a reservation's unused grant back into the ledger: its devices leave `total`
/// and its day's count, its pool slots join the returned ranges.
pub(crate) fn give_back(ledger: &mut Counters, r: &Reservation) {
    let unused = r.unused();
    ledger.total = ledger.total.saturating_sub(unused);
    if let Some(n) = ledger.days.get_mut(&r.day) {
        *n = n.saturating_sub(unused);
    }
    ledger
        .returned_pool
        .extend(r.pool.iter().filter(|(s, e)| s < e).copied());
}

/// Puts back what `r` holds beyond `keep` devices (and their pool slots, the first
/// ones kept).
fn give_back_beyond(ledger: &mut Counters, r: &mut Reservation, keep: u64) {
    let excess = r.unused().saturating_sub(keep);
    ledger.total = ledger.total.saturating_sub(excess);
    if let Some(n) = ledger.days.get_mut(&r.day) {
        *n = n.saturating_sub(excess);
    }
    r.granted -= excess;
    let mut left = keep;
    let mut kept = Vec::new();
    for (start, end) in std::mem::take(&mut r.pool) {
        let take = left.min(end.saturating_sub(start));
        if take > 0 {
            kept.push((start, start + take));
        }
        if start + take < end {
            ledger.returned_pool.push((start + take, end));
        }
        left -= take;
    }
    r.pool = kept;
}

/// Devices the ledger can still grant on `day`.
fn ledger_room(ctx: &EntitlementContext, ledger: &Counters, day: &str) -> u64 {
    let room = ctx.policy.policy.devices.saturating_sub(ledger.total);
    match ctx.policy.daily_limit(ledger.raised_on(day)) {
        Some(daily) => room.min(daily.saturating_sub(ledger.days.get(day).copied().unwrap_or(0))),
        None => room,
    }
}

/// Grants `r` up to `want` more devices on its day from `ledger`, with as many pool
/// slots when the entitlement has a pool (returned ranges first). Returns how many.
fn grant(ctx: &EntitlementContext, ledger: &mut Counters, r: &mut Reservation, want: u64) -> u64 {
    let n = want.min(ledger_room(ctx, ledger, &r.day));
    if n == 0 {
        return 0;
    }
    ledger.total += n;
    *ledger.days.entry(r.day.clone()).or_insert(0) += n;
    r.granted += n;
    if ctx.record.pool.iter().any(|p| p.count > 0) {
        let mut left = n;
        while left > 0 {
            let (start, end) = match ledger.returned_pool.first_mut() {
                Some(range) => {
                    let start = range.0;
                    let end = range.1.min(start + left);
                    range.0 = end;
                    if range.0 >= range.1 {
                        ledger.returned_pool.remove(0);
                    }
                    (start, end)
                }
                None => {
                    let start = ledger.next_pool;
                    ledger.next_pool += left;
                    (start, start + left)
                }
            };
            left -= end - start;
            match r.pool.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => r.pool.push((start, end)),
            }
        }
    }
    n
}

/// What [`ensure_room`] found.
pub(super) enum Room {
    /// Decide: the reservation holds what the batch asks for, or the limits are truly
    /// reached (every other node's grant is used), so refusals for them are exact.
    Ready,
    /// Another live node holds unused grants the batch may need: requests it would
    /// refuse for the limits are decided again shortly, not refused.
    Wait,
}

/// The ledger and this node's reservation of one entitlement, as last read or written,
/// with their revisions.
pub(super) struct Held {
    pub ledger: (Counters, Option<u64>),
    pub mine: (Reservation, Option<u64>),
}

/// Makes this node's reservation of `ctx`'s entitlement hold `need` devices on `day`,
/// taking a block from the ledger, and when the ledger is spent, taking back
/// reservations other nodes left unused for [`RESERVATION_LIFE_SECS`]. Each step is
/// one transaction guarded on what it read; `held` follows what was committed.
pub(super) fn ensure_room(
    node: &Node,
    chain: &str,
    ctx: &EntitlementContext,
    held: &mut Held,
    need: u64,
    day: &str,
    now: i64,
) -> Result<Room> {
    let id = &ctx.record.id;
    let mine_key = reservation_key(id, chain);
    for _ in 0..16 {
        let (ledger, mine) = (&held.ledger.0, &held.mine.0);
        let active = !ledger.revoked
            && (ledger.activated
                || !ctx
                    .policy
                    .policy
                    .requires_approval(keyfab_policy::Action::Activate));
        // Nothing to reserve for: the policy refuses on its own.
        if !active || mine.room_on(day) >= need {
            return Ok(Room::Ready);
        }
        let mut ledger2 = ledger.clone();
        let mut mine2 = mine.clone();
        if mine2.day != day {
            // A new day: what is left of the old day's grant goes back.
            give_back(&mut ledger2, &mine2);
            mine2 = Reservation {
                day: day.to_owned(),
                block: mine.block,
                ..Reservation::default()
            };
        }
        let block = mine2.block.clamp(FIRST_BLOCK, MAX_BLOCK);
        let short = need - mine2.room_on(day);
        let got = grant(ctx, &mut ledger2, &mut mine2, short.max(block));
        if got > 0 || mine2.day != mine.day {
            mine2.block = (block * 2).min(MAX_BLOCK);
            // A block counts as in use for a moment after it is taken; a node that takes
            // one and allows nothing from it (it only refuses) loses it a second later.
            mine2.seen_at = now.saturating_sub(RESERVATION_LIFE_SECS - GRANT_GRACE_SECS);
            commit_both(node, id, &mine_key, held, ledger2, mine2)?;
            continue;
        }
        // The ledger is spent. Read it again, then every reservation: a grant changes
        // the ledger, so if the ledger is unchanged at commit, no node gained a grant
        // after this read.
        reread(node, id, &mine_key, held)?;
        if ledger_room(ctx, &held.ledger.0, day) > 0 {
            continue;
        }
        let others: Vec<_> = all_reservations(node, id)?
            .into_iter()
            .filter(|(k, r, _)| *k != mine_key && r.unused() > 0)
            .collect();
        if others.is_empty() {
            return Ok(Room::Ready);
        }
        let (stale, live): (Vec<_>, Vec<_>) = others
            .into_iter()
            .partition(|(_, r, _)| r.seen_at.saturating_add(RESERVATION_LIFE_SECS) < now);
        if stale.is_empty() {
            debug_assert!(!live.is_empty());
            // While waiting, hold nothing: a node that waits on this one while this one
            // waits on it would otherwise stall both until one of them went stale.
            if held.mine.0.unused() > 0 {
                let mut ledger2 = held.ledger.0.clone();
                let mut mine2 = held.mine.0.clone();
                give_back_beyond(&mut ledger2, &mut mine2, 0);
                commit_both(node, id, &mine_key, held, ledger2, mine2)?;
            }
            return Ok(Room::Wait);
        }
        let mut ledger2 = held.ledger.0.clone();
        let mut txn = Txn::default();
        txn.require_revision(Table::Counters, id.as_bytes(), held.ledger.1);
        for (key, r, rev) in &stale {
            give_back(&mut ledger2, r);
            txn.require_revision(Table::Counters, key, Some(*rev))
                .delete(Table::Counters, key);
        }
        txn.put(Table::Counters, id.as_bytes(), &encode(&ledger2)?);
        match node.store.commit(txn)? {
            Outcome::Committed(rev) => held.ledger = (ledger2, Some(rev)),
            Outcome::Conflict => reread(node, id, &mine_key, held)?,
        }
    }
    // The state kept changing: decide again in a moment.
    Ok(Room::Wait)
}

/// Writes `ledger` and this node's reservation `mine`, guarded on both as held; `held`
/// follows the commit, or what a conflict shows.
fn commit_both(
    node: &Node,
    id: &str,
    mine_key: &[u8],
    held: &mut Held,
    ledger: Counters,
    mine: Reservation,
) -> Result<()> {
    let mut txn = Txn::default();
    txn.require_revision(Table::Counters, id.as_bytes(), held.ledger.1)
        .require_revision(Table::Counters, mine_key, held.mine.1)
        .put(Table::Counters, id.as_bytes(), &encode(&ledger)?)
        .put(Table::Counters, mine_key, &encode(&mine)?);
    match node.store.commit(txn)? {
        Outcome::Committed(rev) => {
            held.ledger = (ledger, Some(rev));
            held.mine = (mine, Some(rev));
            Ok(())
        }
        Outcome::Conflict => reread(node, id, mine_key, held),
    }
}

/// Reads the ledger and this node's reservation afresh, in one snapshot.
fn reread(node: &Node, id: &str, mine_key: &[u8], held: &mut Held) -> Result<()> {
    let read = node.store.get_many(&[
        (Table::Counters, id.as_bytes()),
        (Table::Counters, mine_key),
    ])?;
    let mut read = read.into_iter();
    held.ledger = ledger_of(read.next().flatten())?;
    held.mine = reservation_of(read.next().flatten())?;
    Ok(())
}

/// A stored ledger and its revision (empty if absent).
pub(super) fn ledger_of(v: Option<Versioned>) -> Result<(Counters, Option<u64>)> {
    Ok(match v {
        Some(v) => (decode(&v.value)?, Some(v.revision)),
        None => (Counters::default(), None),
    })
}

/// A stored reservation and its revision (empty if absent).
pub(super) fn reservation_of(v: Option<Versioned>) -> Result<(Reservation, Option<u64>)> {
    Ok(match v {
        Some(v) => (decode(&v.value)?, Some(v.revision)),
        None => (Reservation::default(), None),
    })
}

/// Gives back every grant `chain` holds (its node is stopping): the quota it did not
/// use is at once the other nodes' again. Best effort — a reservation left behind is
/// taken back by the others after [`RESERVATION_LIFE_SECS`].
pub(super) fn give_back_all(node: &Node, chain: &str) -> Result<()> {
    let ids: Vec<Vec<u8>> = node
        .store
        .scan(Table::Entitlements, b"", usize::MAX)?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for id in ids {
        let id = String::from_utf8(id).map_err(|_| Error::Corrupt("entitlement id".into()))?;
        let key = reservation_key(&id, chain);
        for _ in 0..4 {
            let mut held = Held {
                ledger: (Counters::default(), None),
                mine: (Reservation::default(), None),
            };
            reread(node, &id, &key, &mut held)?;
            if held.mine.1.is_none() {
                break;
            }
            let mut ledger = held.ledger.0;
            give_back(&mut ledger, &held.mine.0);
            let mut txn = Txn::default();
            txn.require_revision(Table::Counters, id.as_bytes(), held.ledger.1)
                .require_revision(Table::Counters, &key, held.mine.1)
                .put(Table::Counters, id.as_bytes(), &encode(&ledger)?)
                .delete(Table::Counters, &key);
            if node.store.commit(txn)?.is_committed() {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reservation(granted: u64, used: u64, pool: &[(u64, u64)]) -> Reservation {
        Reservation {
            day: "2026-11-26".into(),
            granted,
            used,
            pool: pool.to_vec(),
            seen_at: 0,
            block: FIRST_BLOCK,
        }
    }

    #[test]
    fn slots_are_taken_in_order_across_ranges() {
        let mut r = reservation(5, 0, &[(10, 12), (40, 43)]);
        let ahead: Vec<_> = (0..6).map(|k| r.nth_slot(k)).collect();
        assert_eq!(
            ahead,
            [Some(10), Some(11), Some(40), Some(41), Some(42), None]
        );
        let taken: Vec<_> = (0..6).map(|_| r.take_slot()).collect();
        assert_eq!(taken, ahead);
        assert!(r.pool.is_empty());
    }

    #[test]
    fn what_is_given_back_leaves_the_ledger_and_keeps_the_first_slots() {
        let mut ledger = Counters {
            total: 100,
            ..Counters::default()
        };
        ledger.days.insert("2026-11-26".into(), 60);
        // 10 granted, 4 used: 6 unused, in slots 20..22 and 50..54.
        let mut r = reservation(10, 4, &[(20, 22), (50, 54)]);
        give_back_beyond(&mut ledger, &mut r, 3);
        assert_eq!((ledger.total, ledger.days["2026-11-26"]), (97, 57));
        assert_eq!((r.granted, r.unused()), (7, 3));
        assert_eq!(r.pool, [(20, 22), (50, 51)]);
        assert_eq!(ledger.returned_pool, [(51, 54)]);
        // All of it: nothing held, every slot returned.
        give_back_beyond(&mut ledger, &mut r, 0);
        assert_eq!((ledger.total, r.unused()), (94, 0));
        assert!(r.pool.is_empty());
        assert_eq!(ledger.returned_pool, [(51, 54), (20, 22), (50, 51)]);
        // `give_back` returns the unused grant the same way.
        let mut ledger2 = Counters {
            total: 10,
            ..Counters::default()
        };
        give_back(&mut ledger2, &reservation(10, 4, &[(4, 10)]));
        assert_eq!(
            (ledger2.total, ledger2.returned_pool.as_slice()),
            (4, &[(4, 10)][..])
        );
    }
}
