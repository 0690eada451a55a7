//! Site settings an operator may change. Each change is audited, because each bears on
//! what the site will accept.

use crate::audit_log::Appender;
use crate::provision::{CLOCK_TOLERANCE, DEFAULT_CLOCK_TOLERANCE_SECS, MAX_CLOCK_TOLERANCE_SECS};
use keyfab_audit::Event;
use keyfab_node::{Error, Node, Result};
use keyfab_store::{Store, Table, Txn};

/// How far (seconds) the clock may fall behind the trusted time before provisioning
/// stops with `clock_rollback`.
pub fn clock_tolerance(node: &Node) -> Result<i64> {
    Ok(match node.store.get(Table::Meta, CLOCK_TOLERANCE)? {
        Some(v) => i64::from_be_bytes(
            v.value
                .as_slice()
                .try_into()
                .map_err(|_| Error::InvalidState("clock tolerance".into()))?,
        ),
        None => DEFAULT_CLOCK_TOLERANCE_SECS,
    })
}

pub fn set_clock_tolerance(node: &Node, secs: i64) -> Result<()> {
    if !(0..=MAX_CLOCK_TOLERANCE_SECS).contains(&secs) {
        return Err(Error::InvalidInput(format!(
            "--clock-tolerance must be between 0 and {MAX_CLOCK_TOLERANCE_SECS} seconds"
        )));
    }
    let seen = node.store.get(Table::Meta, CLOCK_TOLERANCE)?;
    let mut txn = Txn::default();
    let mut log = Appender::begin(node, &mut txn)?;
    log.append(
        &mut txn,
        node.now().0,
        Event::SettingChanged {
            name: "clock_tolerance".into(),
            value: secs.to_string(),
        },
    )?;
    log.finish(&mut txn);
    txn.require_unchanged(Table::Meta, CLOCK_TOLERANCE, seen.as_ref())
        .put(Table::Meta, CLOCK_TOLERANCE, &secs.to_be_bytes());
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::InvalidState(
            "site state changed meanwhile; try again".into(),
        ));
    }
    Ok(())
}
