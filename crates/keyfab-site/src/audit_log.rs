//! The site's audit log in the store.
//!
//! Appending happens inside a store transaction: the head is read once, guarded,
//! advanced per record, and written back when the transaction is finished, so records
//! commit atomically with what they describe. The records appended in one transaction are
//! stored as one row (key = sequence of the first, u64 BE; value = the records'
//! canonical bytes, each behind a u32 BE length, packed by [`keyfab_audit::pack_row`]):
//! a batch of decisions costs one B-tree insert, not one per record. Each record is
//! still hashed and chained on its own.

use keyfab_audit::merkle::leaf_hash;
use keyfab_audit::{Event, Head, Record};
use keyfab_node::{decode_err, Error, Node, Result};
use keyfab_store::{Table, Txn, Versioned};

pub(crate) const AUDIT_HEAD: &[u8] = b"audit_head";

pub(crate) struct Appender {
    head: Head,
    site: String,
    first: Option<u64>,
    row: Vec<u8>,
}

impl Appender {
    /// Reads the head and guards it in `txn`: a concurrent writer makes the commit fail.
    pub(crate) fn begin(node: &Node, txn: &mut Txn) -> Result<Self> {
        let seen = node.store.get(Table::Meta, AUDIT_HEAD)?;
        let head = head_from(seen.as_ref())?;
        txn.require_unchanged(Table::Meta, AUDIT_HEAD, seen.as_ref());
        Ok(Self {
            head,
            site: node.name.clone(),
            first: None,
            row: Vec::new(),
        })
    }

    /// Continues from a head the caller holds (the committer's pipeline, whose head may
    /// not be committed yet); the caller guards the head itself.
    pub(crate) fn resume(site: &str, head: Head) -> Self {
        Self {
            head,
            site: site.to_owned(),
            first: None,
            row: Vec::new(),
        }
    }

    /// Adds a record at `time` (raised to the last record's time if earlier); returns its
    /// sequence number.
    pub(crate) fn append(&mut self, _txn: &mut Txn, time: i64, event: Event) -> Result<u64> {
        let r: Record = self.head.next(time.max(self.head.time), &self.site, event);
        let bytes = r.to_bytes();
        u32::try_from(bytes.len())
            .map_err(|_| Error::InvalidState("audit record too large".into()))?;
        self.head = Head {
            sequence: r.sequence,
            hash: leaf_hash(&bytes),
            time: r.time,
        };
        self.first.get_or_insert(r.sequence);
        keyfab_audit::frame_into(&mut self.row, &bytes);
        Ok(r.sequence)
    }

    /// The head after the records appended so far.
    pub(crate) fn head(&self) -> Head {
        self.head
    }

    /// Key of the row this transaction's records go to (the first one's sequence).
    pub(crate) fn row_key(&self) -> Option<u64> {
        self.first
    }

    /// Writes the records and the new head into `txn`.
    pub(crate) fn finish(self, txn: &mut Txn) {
        if let Some(first) = self.first {
            // Packed (LZ4): on etcd every byte of it is replicated and written by each
            // member, and a batch's records share most of theirs.
            txn.put_owned(
                Table::Audit,
                first.to_be_bytes().to_vec(),
                keyfab_audit::pack_row(&self.row),
            );
        }
        txn.put(Table::Meta, AUDIT_HEAD, &self.head.to_bytes());
    }
}

/// Commits `change` (its guards and writes on the transaction) together with one
/// `setting_changed` record `name` = `value`: a change that bears on security and its
/// audit record land together or not at all. A concurrent writer makes it fail with
/// `invalid_state` (try again).
pub(crate) fn commit_setting(
    node: &Node,
    name: &str,
    value: String,
    change: impl FnOnce(&mut Txn) -> Result<()>,
) -> Result<()> {
    let mut txn = Txn::default();
    let mut log = Appender::begin(node, &mut txn)?;
    log.append(
        &mut txn,
        node.now().0,
        Event::SettingChanged {
            name: name.to_owned(),
            value,
        },
    )?;
    log.finish(&mut txn);
    change(&mut txn)?;
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::InvalidState(
            "site state changed meanwhile; try again".into(),
        ));
    }
    Ok(())
}

/// The log head as stored at [`AUDIT_HEAD`] (the genesis head before the first record).
pub(crate) fn head_from(stored: Option<&Versioned>) -> Result<Head> {
    match stored {
        Some(v) => Head::from_bytes(&v.value).ok_or_else(|| decode_err("audit head")),
        None => Ok(Head::genesis()),
    }
}

/// The canonical bytes of each record of a stored row, packed or not.
fn row_records(value: &[u8]) -> Result<Vec<Vec<u8>>> {
    let framed = keyfab_audit::unpack_row(value).map_err(|_| decode_err("audit row"))?;
    let records = keyfab_audit::split_row(&framed).map_err(|_| decode_err("audit row"))?;
    Ok(records.into_iter().map(<[u8]>::to_vec).collect())
}

/// The audit record `sequence`, stored in the row keyed `row`.
pub(crate) fn record_in_row(node: &Node, row: u64, sequence: u64) -> Result<Record> {
    let v = node
        .store
        .get(Table::Audit, &row.to_be_bytes())?
        .ok_or_else(|| decode_err("audit row"))?;
    for bytes in row_records(&v.value)? {
        let r = Record::from_bytes(&bytes).map_err(|e| Error::InvalidState(e.to_string()))?;
        if r.sequence == sequence {
            return Ok(r);
        }
    }
    Err(decode_err("audit record"))
}

/// The canonical bytes of every audit record, in order.
pub(crate) fn record_bytes(node: &Node) -> Result<Vec<Vec<u8>>> {
    RecordStream::new(node).collect()
}

/// The canonical bytes of the audit records, oldest first, read a page of rows at a
/// time: a log of millions of records is walked without holding it in memory.
pub(crate) struct RecordStream<'a> {
    node: &'a Node,
    /// The key to read the next page from; `None` once the log is exhausted.
    next_key: Option<Vec<u8>>,
    page: std::vec::IntoIter<Vec<u8>>,
}

/// Rows read per page: a row holds one transaction's records (up to a provisioning
/// batch), so a page stays within a few MiB.
const ROWS_PER_PAGE: usize = 64;

impl<'a> RecordStream<'a> {
    pub(crate) fn new(node: &'a Node) -> Self {
        Self {
            node,
            next_key: Some(Vec::new()),
            page: Vec::new().into_iter(),
        }
    }

    fn read_page(&mut self, from: &[u8]) -> Result<()> {
        let rows = self
            .node
            .store
            .scan_from(Table::Audit, b"", from, ROWS_PER_PAGE)?;
        // The smallest key after the last row read: the same key with a zero byte added.
        self.next_key = match rows.last() {
            Some((k, _)) if rows.len() == ROWS_PER_PAGE => Some([k.as_slice(), &[0]].concat()),
            _ => None,
        };
        let mut records = Vec::new();
        for (_, v) in &rows {
            records.extend(row_records(&v.value)?);
        }
        self.page = records.into_iter();
        Ok(())
    }
}

impl Iterator for RecordStream<'_> {
    type Item = Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.page.next() {
                return Some(Ok(r));
            }
            let from = self.next_key.take()?;
            if let Err(e) = self.read_page(&from) {
                return Some(Err(e));
            }
        }
    }
}
