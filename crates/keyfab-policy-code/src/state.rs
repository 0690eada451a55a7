//! The module's own key-value state: small, bounded, committed with the decision.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::collections::BTreeMap;

/// Most entries a module may keep.
pub const MAX_STATE_ENTRIES: usize = 64;
/// Longest key: 1 to 64 bytes of printable ASCII.
pub const MAX_STATE_KEY_BYTES: usize = 64;
/// Longest value, in bytes.
pub const MAX_STATE_VALUE_BYTES: usize = 256;

/// An entitlement's policy-module state: what the module wrote with `state_set`, as the
/// last committed decision left it. The site stores it with the entitlement's counters;
/// HQ rebuilds it by replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ModuleState {
    entries: BTreeMap<String, ByteBuf>,
    /// Previous values of the keys written by the running evaluation, to undo them.
    #[serde(skip)]
    undo: Vec<(String, Option<ByteBuf>)>,
}

impl ModuleState {
    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(|v| v.as_slice())
    }

    /// How many keys are set.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every key and value, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Writes `value` under `key` (`None` removes it), remembering the old value so the
    /// evaluation can be undone.
    pub(crate) fn write(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        check_key(key)?;
        if let Some(v) = value {
            if v.len() > MAX_STATE_VALUE_BYTES {
                return Err(format!(
                    "state value of {} bytes; at most {MAX_STATE_VALUE_BYTES}",
                    v.len()
                ));
            }
            if !self.entries.contains_key(key) && self.entries.len() >= MAX_STATE_ENTRIES {
                return Err(format!("more than {MAX_STATE_ENTRIES} state entries"));
            }
        }
        let old = match value {
            Some(v) => self.entries.insert(key.to_owned(), ByteBuf::from(v)),
            None => self.entries.remove(key),
        };
        self.undo.push((key.to_owned(), old));
        Ok(())
    }

    /// Undoes every write since the evaluation began, newest first.
    pub(crate) fn roll_back(&mut self) {
        while let Some((key, old)) = self.undo.pop() {
            match old {
                Some(v) => self.entries.insert(key, v),
                None => self.entries.remove(&key),
            };
        }
    }

    /// The state with the evaluation's writes kept.
    pub(crate) fn into_committed(mut self) -> Self {
        self.undo.clear();
        self
    }

    /// Whether a stored state keeps the bounds a module is held to (a state read from
    /// outside — a store, a log replay — is checked before use).
    pub fn within_bounds(&self) -> bool {
        self.entries.len() <= MAX_STATE_ENTRIES
            && self
                .entries
                .iter()
                .all(|(k, v)| check_key(k).is_ok() && v.len() <= MAX_STATE_VALUE_BYTES)
    }
}

fn check_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.len() <= MAX_STATE_KEY_BYTES
        && key.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "state keys are 1-{MAX_STATE_KEY_BYTES} bytes of printable ASCII"
        ))
    }
}
