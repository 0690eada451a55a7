//! HQ's index of the devices each entitlement released, to catch a device released
//! twice — within one audit import or across imports.
//!
//! Rows are groups of devices: key `devices/<entitlement>/<device id without its last two
//! characters>`, value = the group's entries sorted, each 11 bytes: the length of the last
//! characters (u8: 2, or 0 when the id is all in the key), those characters (2 bytes,
//! zero when absent), and the audit sequence of the release (u64 BE). Factories number devices with serials that share all but their last digits,
//! so about a hundred devices share one row, and an import of a million releases reads
//! and writes ten thousand rows rather than a million (random ids get a row each, as they
//! would without grouping). FORMATS.md §9 describes the row.

use keyfab_node::{Error, Result};
use keyfab_store::{Store, Table, Txn};
use std::collections::HashMap;

/// Groups kept in memory between batches; beyond this, clean groups are dropped.
const MAX_CACHED_GROUPS: usize = 4096;

/// Changed groups are written once this many have piled up (or at the end). Scattered
/// device ids touch a different B-tree page each, and a copy-on-write tree rewrites every
/// page a commit touches: writing a few groups per commit rewrote the whole index over
/// and over. Sorted and in bulk, each page is rewritten once per flush. ~20 MB at most.
const FLUSH_DIRTY_GROUPS: usize = 128 * 1024;

/// Bytes of one entry in a row: length (1), last characters (2), sequence (8).
const ENTRY: usize = 11;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    suffix: [u8; 2],
    len: u8,
    sequence: u64,
}

#[derive(Default)]
struct Group {
    /// Sorted by (suffix, len): one entry per device.
    entries: Vec<Entry>,
    dirty: bool,
}

impl Group {
    fn parse(row: &[u8]) -> Option<Self> {
        if !row.len().is_multiple_of(ENTRY) {
            return None;
        }
        let entries = row
            .chunks_exact(ENTRY)
            .map(|e| Entry {
                suffix: [e[1], e[2]],
                len: e[0],
                sequence: u64::from_be_bytes(e[3..].try_into().unwrap_or_default()),
            })
            .collect();
        Some(Group {
            entries,
            dirty: false,
        })
    }

    fn to_row(&self) -> Vec<u8> {
        let mut row = Vec::with_capacity(self.entries.len() * ENTRY);
        for e in &self.entries {
            row.push(e.len);
            row.extend_from_slice(&e.suffix);
            row.extend_from_slice(&e.sequence.to_be_bytes());
        }
        row
    }

    fn find(&self, suffix: &[u8; 2], len: u8) -> std::result::Result<usize, usize> {
        self.entries
            .binary_search_by(|e| (e.suffix, e.len).cmp(&(*suffix, len)))
    }
}

/// The row key of `device`'s group, and the device's last two characters (the whole id
/// goes into the key when those are not printable ASCII, so that no group holds more than
/// 94² devices however a site names them).
fn split(entitlement: &str, device: &str) -> (Vec<u8>, [u8; 2], u8) {
    let bytes = device.as_bytes();
    let cut = match bytes.len().checked_sub(2) {
        Some(cut) if bytes[cut..].iter().all(u8::is_ascii_graphic) => cut,
        _ => bytes.len(),
    };
    let (prefix, rest) = bytes.split_at(cut);
    let mut key = Vec::with_capacity(9 + entitlement.len() + prefix.len());
    key.extend_from_slice(b"devices/");
    key.extend_from_slice(entitlement.as_bytes());
    key.push(b'/');
    key.extend_from_slice(prefix);
    let mut suffix = [0u8; 2];
    suffix[..rest.len()].copy_from_slice(rest);
    (key, suffix, rest.len() as u8)
}

/// The groups an import has touched, authoritative once loaded: the stored row plus what
/// this import added. Only one import writes at a time (the store file is exclusive).
#[derive(Default)]
pub(crate) struct DeviceIndex {
    groups: HashMap<Vec<u8>, Group>,
    /// How many groups are dirty.
    dirty: usize,
}

impl DeviceIndex {
    /// Loads, in one snapshot, the groups of `devices` not in memory yet.
    pub(crate) fn load<'d>(
        &mut self,
        store: &dyn Store,
        devices: impl Iterator<Item = (&'d str, &'d str)>,
    ) -> Result<()> {
        if self.groups.len() > MAX_CACHED_GROUPS {
            self.groups.retain(|_, g| g.dirty);
        }
        let mut wanted: Vec<Vec<u8>> = devices
            .map(|(e, d)| split(e, d).0)
            .filter(|k| !self.groups.contains_key(k))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let lookups: Vec<(Table, &[u8])> = wanted
            .iter()
            .map(|k| (Table::Audit, k.as_slice()))
            .collect();
        let rows = store.get_many(&lookups)?;
        for (key, row) in wanted.iter().zip(rows) {
            let group = match row {
                Some(v) => Group::parse(&v.value)
                    .ok_or_else(|| Error::Corrupt("device index row".into()))?,
                None => Group::default(),
            };
            self.groups.insert(key.clone(), group);
        }
        Ok(())
    }

    /// The audit sequence of `device`'s release, if it was released.
    pub(crate) fn released(
        &mut self,
        store: &dyn Store,
        entitlement: &str,
        device: &str,
    ) -> Result<Option<u64>> {
        let (key, suffix, len) = split(entitlement, device);
        if !self.groups.contains_key(&key) {
            self.load(store, std::iter::once((entitlement, device)))?;
        }
        Ok(self
            .groups
            .get(&key)
            .and_then(|g| g.find(&suffix, len).ok().map(|i| g.entries[i].sequence)))
    }

    /// Records `device`'s release at `sequence`, unless an earlier release is recorded.
    /// The group must be loaded (by [`DeviceIndex::released`] or [`DeviceIndex::load`]).
    pub(crate) fn insert(&mut self, entitlement: &str, device: &str, sequence: u64) {
        let (key, suffix, len) = split(entitlement, device);
        let group = self.groups.entry(key).or_default();
        if let Err(at) = group.find(&suffix, len) {
            group.entries.insert(
                at,
                Entry {
                    suffix,
                    len,
                    sequence,
                },
            );
            self.dirty += usize::from(!group.dirty);
            group.dirty = true;
        }
    }

    /// Forgets `device`'s release if it happened after `accepted` (a record staged by an
    /// import that did not finish). The group must be loaded.
    pub(crate) fn forget_after(&mut self, entitlement: &str, device: &str, accepted: u64) {
        let (key, suffix, len) = split(entitlement, device);
        if let Some(group) = self.groups.get_mut(&key) {
            if let Ok(at) = group.find(&suffix, len) {
                if group.entries[at].sequence > accepted {
                    group.entries.remove(at);
                    self.dirty += usize::from(!group.dirty);
                    group.dirty = true;
                }
            }
        }
    }

    /// Writes the groups changed since the last write into `txn`, once enough have
    /// changed to be worth it, or always with `all`. Until then the changes live here, and
    /// [`DeviceIndex::released`] sees them.
    pub(crate) fn stage(&mut self, txn: &mut Txn, all: bool) {
        if !all && self.dirty < FLUSH_DIRTY_GROUPS {
            return;
        }
        self.dirty = 0;
        for (key, group) in self.groups.iter_mut().filter(|(_, g)| g.dirty) {
            if group.entries.is_empty() {
                txn.delete(Table::Audit, key);
            } else {
                txn.put(Table::Audit, key, &group.to_row());
            }
            group.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfab_store::EmbeddedStore;

    #[test]
    fn serials_share_rows_and_every_device_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let mut index = DeviceIndex::default();
        let ids: Vec<String> = (0..1000)
            .map(|i| format!("SN-{i:06}"))
            .chain(["a", "ab", "é", "日本語", ""].map(str::to_owned))
            .collect();
        index
            .load(&store, ids.iter().map(|d| ("e1", d.as_str())))
            .unwrap();
        for (n, d) in ids.iter().enumerate() {
            assert_eq!(index.released(&store, "e1", d).unwrap(), None);
            index.insert("e1", d, n as u64 + 1);
            index.insert("e1", d, 9999); // a second release keeps the first
        }
        let mut txn = Txn::default();
        index.stage(&mut txn, true);
        // 10 serial groups (SN-0000.. to SN-0009..), "" and "a" and "é" each whole in
        // their key (too short, or not ASCII), "ab" in the group of prefix "", and 日本語
        // whole in its key.
        assert_eq!(txn.len(), 10 + 4);
        store.commit(txn).unwrap();

        let mut fresh = DeviceIndex::default();
        for (n, d) in ids.iter().enumerate() {
            assert_eq!(
                fresh.released(&store, "e1", d).unwrap(),
                Some(n as u64 + 1),
                "{d}"
            );
            assert_eq!(fresh.released(&store, "e2", d).unwrap(), None);
        }
        assert_eq!(fresh.released(&store, "e1", "SN-001000").unwrap(), None);
        fresh.forget_after("e1", "SN-000999", 999);
        fresh.forget_after("e1", "SN-000998", 999);
        let mut txn = Txn::default();
        fresh.stage(&mut txn, true);
        store.commit(txn).unwrap();
        let mut again = DeviceIndex::default();
        assert_eq!(again.released(&store, "e1", "SN-000999").unwrap(), None);
        assert_eq!(
            again.released(&store, "e1", "SN-000998").unwrap(),
            Some(999)
        );
    }
}
