//! Site settings an operator may change. Each change is audited, because each bears on
//! what the site will accept.

use crate::provision::{CLOCK_TOLERANCE, DEFAULT_CLOCK_TOLERANCE_SECS, MAX_CLOCK_TOLERANCE_SECS};
use keyfab_node::{Error, Node, Result};
use keyfab_store::Table;

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
    crate::audit_log::commit_setting(node, "clock_tolerance", secs.to_string(), |txn| {
        txn.require_unchanged(Table::Meta, CLOCK_TOLERANCE, seen.as_ref())
            .put(Table::Meta, CLOCK_TOLERANCE, &secs.to_be_bytes());
        Ok(())
    })
}
