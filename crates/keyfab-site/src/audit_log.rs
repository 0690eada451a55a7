//! Appending to the site's audit log inside a store transaction: the head is read once,
//! guarded, advanced per record, and written back when the transaction is finished, so
//! records commit atomically with what they describe.

use keyfab_audit::{Event, Head, Record};
use keyfab_node::{decode_err, Error, Node, Result};
use keyfab_store::{Store, Table, Txn};

pub(crate) const AUDIT_HEAD: &[u8] = b"audit_head";

pub(crate) struct Appender {
    head: Head,
    site: String,
}

impl Appender {
    /// Reads the head and guards it in `txn`: a concurrent writer makes the commit fail.
    pub(crate) fn begin(node: &Node, txn: &mut Txn) -> Result<Self> {
        let seen = node.store.get(Table::Meta, AUDIT_HEAD)?;
        let head = match &seen {
            Some(v) => Head::from_bytes(&v.value).ok_or_else(|| decode_err("audit head"))?,
            None => Head::genesis(),
        };
        txn.require_unchanged(Table::Meta, AUDIT_HEAD, seen.as_ref());
        Ok(Self {
            head,
            site: node.name.clone(),
        })
    }

    /// Adds a record at `time` (raised to the last record's time if earlier).
    pub(crate) fn append(&mut self, txn: &mut Txn, time: i64, event: Event) -> Result<u64> {
        let r: Record = self.head.next(time.max(self.head.time), &self.site, event);
        self.head = Head::after(&r).map_err(|e| Error::InvalidState(e.to_string()))?;
        txn.put(Table::Audit, &r.sequence.to_be_bytes(), &r.to_bytes());
        Ok(r.sequence)
    }

    /// Writes the new head into `txn`.
    pub(crate) fn finish(self, txn: &mut Txn) {
        txn.put(Table::Meta, AUDIT_HEAD, &self.head.to_bytes());
    }
}
