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

/// Where node chains keep their heads (Meta): this prefix, then the chain's id.
const CHAIN_HEADS: &[u8] = b"audit_head/";

/// Where node chains keep their rows (Audit): this prefix, the chain's id, `/`, then the
/// row's first sequence (u64 BE). Site-chain rows are keyed by the sequence alone, whose
/// first byte is zero, so the two never mix.
const CHAIN_ROWS: &[u8] = b"c/";

/// Site-chain rows: 8-byte sequences, below 2^56 in any real log.
const SITE_ROWS: &[u8] = &[0];

/// The Meta key of `chain`'s head, or of the site chain's.
pub(crate) fn head_key(chain: Option<&str>) -> Vec<u8> {
    match chain {
        Some(c) => [CHAIN_HEADS, c.as_bytes()].concat(),
        None => AUDIT_HEAD.to_vec(),
    }
}

/// The Audit key of `chain`'s row that starts at `first`.
fn row_key_of(chain: Option<&str>, first: u64) -> Vec<u8> {
    match chain {
        Some(c) => [CHAIN_ROWS, c.as_bytes(), b"/", &first.to_be_bytes()].concat(),
        None => first.to_be_bytes().to_vec(),
    }
}

/// A fresh node chain's id: `n` and 16 hex digits. Each running provisioning engine on a
/// shared store takes one, so no two processes ever append to the same chain (homes are
/// copied to make nodes, so nothing kept in a home could tell them apart).
pub(crate) fn new_chain_id(rng: &dyn keyfab_crypto::rng::SecureRng) -> String {
    let mut b = [0u8; 8];
    rng.fill(&mut b);
    format!("n{}", hex::encode(b))
}

pub(crate) struct Appender {
    head: Head,
    site: String,
    /// `None`: the site chain.
    chain: Option<String>,
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
            chain: None,
            first: None,
            row: Vec::new(),
        })
    }

    /// Continues `chain` (the site chain if `None`) from a head the caller holds (the
    /// committer's pipeline, whose head may not be committed yet); the caller guards the
    /// head itself.
    pub(crate) fn resume(site: &str, chain: Option<&str>, head: Head) -> Self {
        Self {
            head,
            site: site.to_owned(),
            chain: chain.map(str::to_owned),
            first: None,
            row: Vec::new(),
        }
    }

    /// Adds a record at `time` (raised to the last record's time if earlier); returns its
    /// sequence number.
    pub(crate) fn append(&mut self, _txn: &mut Txn, time: i64, event: Event) -> Result<u64> {
        let mut r: Record = self.head.next(time.max(self.head.time), &self.site, event);
        r.chain.clone_from(&self.chain);
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
                row_key_of(self.chain.as_deref(), first),
                keyfab_audit::pack_row(&self.row),
            );
        }
        txn.put(
            Table::Meta,
            &head_key(self.chain.as_deref()),
            &self.head.to_bytes(),
        );
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

/// The audit record `sequence` of `chain`, stored in the row that starts at `row`.
pub(crate) fn record_in_row(
    node: &Node,
    chain: Option<&str>,
    row: u64,
    sequence: u64,
) -> Result<Record> {
    let v = node
        .store
        .get(Table::Audit, &row_key_of(chain, row))?
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
    RecordStream::new(node)?.collect()
}

/// The canonical bytes of the site's log, oldest first: the site chain and every node
/// chain merged in commit order (each row carries the store revision that wrote it, and
/// rows are never rewritten). Only rows committed before the stream began are read, so a
/// commit landing meanwhile can never slip in before a row already returned: the order
/// of what has been read — what checkpoints and exports fix — never changes. Rows are
/// read a page at a time per chain, so a log of millions of records is walked without
/// holding it in memory.
pub(crate) struct RecordStream<'a> {
    node: &'a Node,
    /// The store's revision when the stream began.
    cut: u64,
    chains: Vec<ChainRows>,
    page: std::vec::IntoIter<Vec<u8>>,
}

/// One chain's rows, read a page at a time.
struct ChainRows {
    prefix: Vec<u8>,
    /// The key to read the next page from; `None` once the chain is exhausted.
    next_key: Option<Vec<u8>>,
    rows: std::collections::VecDeque<Versioned>,
}

/// Rows read per page: a row holds one transaction's records (up to a provisioning
/// batch), so a page stays within a few MiB.
const ROWS_PER_PAGE: usize = 64;

impl<'a> RecordStream<'a> {
    pub(crate) fn new(node: &'a Node) -> Result<Self> {
        let cut = node.store.revision()?;
        let mut chains = vec![ChainRows::new(SITE_ROWS.to_vec())];
        for id in chain_ids(node)? {
            chains.push(ChainRows::new([CHAIN_ROWS, id.as_bytes(), b"/"].concat()));
        }
        Ok(Self {
            node,
            cut,
            chains,
            page: Vec::new().into_iter(),
        })
    }

    /// The next row in commit order, or `None` at the end.
    fn next_row(&mut self) -> Result<Option<Versioned>> {
        let mut oldest: Option<(usize, u64)> = None;
        for (i, chain) in self.chains.iter_mut().enumerate() {
            if chain.rows.is_empty() {
                chain.read_page(self.node)?;
            }
            // Rows after the cut are newer than everything this stream returns; so are
            // the rest of that chain's.
            if let Some(row) = chain.rows.front() {
                if row.revision <= self.cut && oldest.is_none_or(|(_, r)| row.revision < r) {
                    oldest = Some((i, row.revision));
                }
            }
        }
        Ok(oldest.and_then(|(i, _)| self.chains[i].rows.pop_front()))
    }
}

impl ChainRows {
    fn new(prefix: Vec<u8>) -> Self {
        Self {
            next_key: Some(prefix.clone()),
            prefix,
            rows: Default::default(),
        }
    }

    fn read_page(&mut self, node: &Node) -> Result<()> {
        let Some(from) = self.next_key.take() else {
            return Ok(());
        };
        let rows = node
            .store
            .scan_from(Table::Audit, &self.prefix, &from, ROWS_PER_PAGE)?;
        // The smallest key after the last row read: the same key with a zero byte added.
        self.next_key = match rows.last() {
            Some((k, _)) if rows.len() == ROWS_PER_PAGE => Some([k.as_slice(), &[0]].concat()),
            _ => None,
        };
        self.rows.extend(rows.into_iter().map(|(_, v)| v));
        Ok(())
    }
}

/// The ids of every node chain that has committed a record.
fn chain_ids(node: &Node) -> Result<Vec<String>> {
    let heads = node.store.scan(Table::Meta, CHAIN_HEADS, usize::MAX)?;
    heads
        .into_iter()
        .map(|(k, _)| {
            String::from_utf8(k[CHAIN_HEADS.len()..].to_vec())
                .map_err(|_| decode_err("audit chain id"))
        })
        .collect()
}

impl Iterator for RecordStream<'_> {
    type Item = Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.page.next() {
                return Some(Ok(r));
            }
            match self.next_row() {
                Ok(Some(row)) => match row_records(&row.value) {
                    Ok(records) => self.page = records.into_iter(),
                    Err(e) => return Some(Err(e)),
                },
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
