//! Revocation at the site: verified like an entitlement; afterwards the entitlement
//! refuses with `revoked`, and its pool keys that no device took are destroyed. Keys
//! already given out stay, so retries of those requests are still answered. One
//! transaction: the state, the destruction, the sequence mark and the audit record.

use crate::audit_log::Appender;
use crate::entitlements::{pool_row_key, read_hq_sequence, EntitlementRecord, HQ_SEQUENCE};
use crate::provision::Counters;
use keyfab_audit::Event;
use keyfab_formats::revocation::verify_revocation;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn};

#[derive(Debug, Clone)]
pub struct Revoked {
    pub entitlement: String,
    pub sequence: u64,
    pub destroyed_pool_keys: u64,
}

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
    let rec_v = node
        .store
        .get(Table::Entitlements, r.entitlement.as_bytes())?
        .ok_or_else(|| Error::UnknownEntitlement(r.entitlement.clone()))?;
    let record: EntitlementRecord = decode(&rec_v.value)?;
    let counters_seen = node.store.get(Table::Counters, r.entitlement.as_bytes())?;
    let mut counters: Counters = match &counters_seen {
        Some(v) => decode(&v.value)?,
        None => Counters::default(),
    };
    let mut txn = Txn::default();
    let mut destroyed = 0;
    for (spec, pool) in record.pool.iter().enumerate() {
        let spec = u8::try_from(spec).map_err(|_| Error::InvalidState("pool spec".into()))?;
        let unused = pool.count.saturating_sub(counters.next_pool);
        destroyed += unused;
        txn.delete_range(
            Table::Pool,
            &pool_row_key(&record.id, spec, counters.next_pool),
            &pool_row_key(&record.id, spec, u64::MAX),
        );
        // u64::MAX itself is never an index: the quota is far below it.
    }
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
    log.finish(&mut txn);
    txn.require_unchanged(Table::Meta, HQ_SEQUENCE, seq_seen.as_ref())
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
        return Err(Error::InvalidState(
            "site state changed meanwhile; import again".into(),
        ));
    }
    Ok(Revoked {
        entitlement: r.entitlement,
        sequence: r.sequence,
        destroyed_pool_keys: destroyed,
    })
}
