//! Revocation at the site: verified like an entitlement; afterwards the entitlement
//! refuses with `revoked`, and its pool keys that no device took and its batch CA key are
//! destroyed. Keys
//! already given out stay, so retries of those requests are still answered. One
//! transaction: the state, the destruction, the sequence mark and the audit record.

use crate::audit_log::Appender;
use crate::entitlements::{pool_row_key, read_hq_sequence, EntitlementRecord, HQ_SEQUENCE};
use crate::provision::Counters;
use keyfab_audit::Event;
use keyfab_formats::revocation::verify_revocation;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn};

/// What applying a revocation did.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The entitlement revoked.
    pub entitlement: String,
    /// The revocation's sequence number.
    pub sequence: u64,
    /// Pool keys destroyed.
    pub destroyed_pool_keys: u64,
    /// Why the store could not purge what was deleted from its medium, if it could not
    /// (the keys are deleted all the same; the next revocation or window end purges).
    pub purge_failed: Option<String>,
}

/// Verifies HQ's `.kfr` and applies it: no more releases, unused pool keys destroyed.
pub fn import_revocation(node: &Node, bytes: &[u8]) -> Result<Revoked> {
    let recipients = node.recipient_fingerprints()?;
    let r = verify_revocation(
        bytes,
        &node.root_cert()?,
        node.now(),
        &node.name,
        &recipients,
    )?
    .into_inner();
    let (last, seq_seen) = read_hq_sequence(node)?;
    if r.sequence <= last {
        return Err(Error::Replayed(format!(
            "sequence {} is not after the last accepted sequence {last}",
            r.sequence
        )));
    }
    if node
        .store
        .get(Table::Entitlements, r.entitlement.as_bytes())?
        .is_none()
    {
        return Err(Error::UnknownEntitlement(r.entitlement.clone()));
    }
    // Busy writers — a cluster's nodes writing their reservations, a serving site's
    // batches moving the log head and the counters — change what the revocation is
    // guarded on all the time, so it reads and tries again until it lands between two
    // of their commits.
    let Some(mut revoked) =
        crate::audit_log::until_landed(node, || try_revoke(node, &r, seq_seen.as_ref()))?
    else {
        return Err(Error::Conflict(
            "site state changed meanwhile; import again".into(),
        ));
    };
    // The keys are deleted; now out of the store's file too. The revocation stands
    // whatever happens here, so a failure is reported, not returned.
    revoked.purge_failed = node.store.purge_deleted().err().map(|e| e.to_string());
    Ok(revoked)
}

/// One attempt: `None` if the state changed under it (nothing written).
fn try_revoke(
    node: &Node,
    r: &keyfab_formats::revocation::Revocation,
    seq_seen: Option<&keyfab_store::Versioned>,
) -> Result<Option<Revoked>> {
    let record_seen = node
        .store
        .get(Table::Entitlements, r.entitlement.as_bytes())?
        .ok_or_else(|| Error::UnknownEntitlement(r.entitlement.clone()))?;
    let record: EntitlementRecord = decode(&record_seen.value)?;
    let counters_seen = node.store.get(Table::Counters, r.entitlement.as_bytes())?;
    let mut counters: Counters = match &counters_seen {
        Some(v) => decode(&v.value)?,
        None => Counters::default(),
    };
    let mut txn = Txn::default();
    // Cluster nodes' reservations end here: each is removed, guarded where it was read,
    // so a node still deciding against one fails its commit and reads the revocation.
    // Their unused pool slots, and slots given back earlier, are destroyed with the rest.
    let mut unused_slots = counters.returned_pool.clone();
    for (key, reservation, revision) in
        crate::provision::reservations::all_reservations(node, &r.entitlement)?
    {
        txn.require_revision(Table::Counters, &key, Some(revision))
            .delete(Table::Counters, &key);
        unused_slots.extend(reservation.pool);
    }
    let mut destroyed = 0;
    for (spec, pool) in record.pool.iter().enumerate() {
        let spec = u8::try_from(spec).map_err(|_| Error::Corrupt("pool spec".into()))?;
        let unused = pool.count.saturating_sub(counters.next_pool);
        destroyed += unused;
        txn.delete_range(
            Table::Pool,
            &pool_row_key(&record.id, spec, counters.next_pool),
            &pool_row_key(&record.id, spec, u64::MAX),
        );
        // u64::MAX itself is never an index: the quota is far below it.
        for &(start, end) in &unused_slots {
            let end = end.min(pool.count);
            if start < end {
                destroyed += end - start;
                txn.delete_range(
                    Table::Pool,
                    &pool_row_key(&record.id, spec, start),
                    &pool_row_key(&record.id, spec, end),
                );
            }
        }
    }
    counters.returned_pool.clear();
    counters.revoked = true;
    let mut log = Appender::begin(node, &mut txn)?;
    log.append(
        &mut txn,
        node.now().0,
        Event::EntitlementRevoked {
            entitlement: r.entitlement.clone(),
            sequence: r.sequence,
            reason: r.reason.clone(),
            destroyed_pool_keys: destroyed,
        },
    )?;
    crate::batch_key::destroy_in(
        &mut txn,
        &mut log,
        node.now().0,
        &record_seen,
        crate::batch_key::Cause::Revoked,
    )?;
    log.finish(&mut txn);
    txn.require_unchanged(Table::Meta, HQ_SEQUENCE, seq_seen)
        .require_unchanged(
            Table::Counters,
            r.entitlement.as_bytes(),
            counters_seen.as_ref(),
        )
        .put(
            Table::Counters,
            r.entitlement.as_bytes(),
            &encode(&counters)?,
        )
        .put(Table::Meta, HQ_SEQUENCE, &r.sequence.to_be_bytes());
    if !node.store.commit(txn)?.is_committed() {
        return Ok(None);
    }
    Ok(Some(Revoked {
        entitlement: r.entitlement.clone(),
        sequence: r.sequence,
        destroyed_pool_keys: destroyed,
        purge_failed: None,
    }))
}
