//! The end of a batch CA key. The entitlement's window limits when the site may issue
//! device certificates; once it has ended, or HQ has revoked the entitlement, the site
//! deletes the batch CA key from its state, with a `batch_key_destroyed` audit record in
//! the same transaction, so nothing more can ever be issued under that CA — whatever the
//! clock later says. Certificates already issued keep verifying: the CA certificate stays.

use crate::audit_log::Appender;
use crate::entitlements::EntitlementRecord;
use keyfab_audit::Event;
use keyfab_node::{decode, encode, Node, Result};
use keyfab_store::{Table, Txn, Versioned};

/// Why a batch CA key was destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// HQ revoked the entitlement.
    Revoked,
    /// The entitlement's `valid_until` has passed.
    WindowEnded,
}

impl Cause {
    /// The name the audit record carries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::WindowEnded => "window_ended",
        }
    }
}

/// Whether the record still holds its batch CA key.
pub fn holds_key(record: &EntitlementRecord) -> bool {
    !record.sealed_batch_ca_key.is_empty()
}

/// Adds to `txn` the destruction of `record`'s batch CA key (read as `seen`) and its audit
/// record. Nothing if it is already gone.
pub(crate) fn destroy_in(
    txn: &mut Txn,
    log: &mut Appender,
    time: i64,
    seen: &Versioned,
    cause: Cause,
) -> Result<bool> {
    let mut record: EntitlementRecord = decode(&seen.value)?;
    if !holds_key(&record) {
        return Ok(false);
    }
    record.sealed_batch_ca_key = Vec::new();
    txn.require_unchanged(Table::Entitlements, record.id.as_bytes(), Some(seen))
        .put(Table::Entitlements, record.id.as_bytes(), &encode(&record)?);
    log.append(
        txn,
        time,
        Event::BatchKeyDestroyed {
            entitlement: record.id,
            cause: cause.as_str().into(),
        },
    )?;
    Ok(true)
}

/// Destroys the batch CA key of every entitlement whose window has ended by the site's
/// clock (or that was revoked before revocations destroyed it), then purges the store
/// (`Store::purge_deleted`) so the deleted key leaves its file too. Returns their ids. Run
/// when the site starts serving, then every minute, and before an audit export.
pub fn retire_ended(node: &Node) -> Result<Vec<String>> {
    let now = node.now().0;
    let mut retired = Vec::new();
    for (_, seen) in node.store.scan(Table::Entitlements, b"", usize::MAX)? {
        let record: EntitlementRecord = decode(&seen.value)?;
        if !holds_key(&record) {
            continue;
        }
        let revoked = crate::provision::counters_and_held(node, &record.id)?
            .0
            .revoked;
        let cause = if revoked {
            Cause::Revoked
        } else if now >= record.policy.valid_until {
            Cause::WindowEnded
        } else {
            continue;
        };
        // Changed meanwhile for good (another node's sweep): the next sweep sees it.
        let landed = crate::audit_log::until_landed(node, || {
            let mut txn = Txn::default();
            let mut log = Appender::begin(node, &mut txn)?;
            // Recorded at the clock's time: `begin` refused a clock too far past the
            // trusted time, so a clock set forward cannot end a window early by more than
            // the site allows any jump.
            if !destroy_in(&mut txn, &mut log, now, &seen, cause)? {
                return Ok(Some(false));
            }
            log.finish(&mut txn);
            Ok(node.store.commit(txn)?.is_committed().then_some(true))
        })?;
        if landed == Some(true) {
            retired.push(record.id);
        }
    }
    if !retired.is_empty() {
        node.store.purge_deleted()?;
    }
    Ok(retired)
}
