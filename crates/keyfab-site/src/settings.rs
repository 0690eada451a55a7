//! Site settings an operator may change. Each change is audited, because each bears on
//! what the site will accept.

use keyfab_node::{Error, Node, Result};
use keyfab_store::{Table, Versioned};

/// A setting of the site's clock checks: seconds, stored big-endian in `meta`.
pub struct ClockSetting {
    /// Its `meta` key, and the name its audit record gives.
    pub key: &'static [u8],
    /// Its name in the audit record and messages.
    pub name: &'static str,
    /// The command-line flag that sets it, for messages.
    pub flag: &'static str,
    /// The value when never set.
    pub default: i64,
    /// The least it may be set to.
    pub min: i64,
    /// The most it may be set to.
    pub max: i64,
}

/// How far (seconds) the clock may fall behind the trusted time before provisioning
/// stops with `clock_rollback`.
pub const CLOCK_TOLERANCE: ClockSetting = ClockSetting {
    key: b"clock_tolerance",
    name: "clock_tolerance",
    flag: "--clock-tolerance",
    default: 300,
    min: 0,
    max: 86_400,
};

/// How far (seconds) the clock may run ahead of the trusted time and be adopted. Beyond
/// it, what would record something at that time is refused with `clock_ahead` and the
/// trusted time stays where it is: a clock set years ahead by mistake (or `KEYFAB_NOW`
/// on a real home) would otherwise move the trusted time there, and every later request
/// would be refused `clock_rollback` until that date.
pub const CLOCK_MAX_JUMP: ClockSetting = ClockSetting {
    key: b"clock_max_jump",
    name: "clock_max_jump",
    flag: "--clock-max-jump",
    // A week: a site stopped over a long weekend starts again without help, while a
    // clock set years (or weeks) ahead is not adopted.
    default: 7 * 86_400,
    min: 60,
    // Ten years: drills that move the clock to the end of an entitlement's window raise
    // it for the drill, audited.
    max: 3650 * 86_400,
};

impl ClockSetting {
    /// The value as stored, or the default.
    pub fn from_stored(&self, stored: Option<&Versioned>) -> Result<i64> {
        Ok(match stored {
            Some(v) => i64::from_be_bytes(
                v.value
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt(format!("stored {}", self.name)))?,
            ),
            None => self.default,
        })
    }

    /// Its value now.
    pub fn get(&self, node: &Node) -> Result<i64> {
        self.from_stored(node.store.get(Table::Meta, self.key)?.as_ref())
    }

    /// Sets it to `secs`, audited. The record is made at the trusted time (see
    /// `audit_log::commit_setting_at_trusted_time`): changing a clock setting
    /// is how an operator gets out of a clock check, so it must not need to pass one.
    pub fn set(&self, node: &Node, secs: i64) -> Result<()> {
        if !(self.min..=self.max).contains(&secs) {
            return Err(Error::InvalidInput(format!(
                "{} must be between {} and {} seconds",
                self.flag, self.min, self.max
            )));
        }
        let seen = node.store.get(Table::Meta, self.key)?;
        crate::audit_log::commit_setting_at_trusted_time(node, self.name, secs.to_string(), |txn| {
            txn.require_unchanged(Table::Meta, self.key, seen.as_ref())
                .put(Table::Meta, self.key, &secs.to_be_bytes());
            Ok(())
        })
    }
}
