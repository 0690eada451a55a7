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
    /// The latest time a record may have: the trusted time plus the jump the site
    /// adopts (`site config --clock-max-jump`); `None` when unbounded (the committer,
    /// which checks the clock itself; a clock setting; a log with no time yet).
    latest: Option<(i64, i64)>,
    /// The revision of the head as [`Appender::begin`] read it.
    head_revision: Option<u64>,
}

/// The site's trusted time: the later of its persisted mark (`stored`) and the site
/// chain's last record, or `None` before the first record.
pub(crate) fn trusted_time(stored: Option<&Versioned>, head: &Head) -> Result<Option<i64>> {
    let mark = match stored {
        Some(v) => i64::from_be_bytes(
            v.value
                .as_slice()
                .try_into()
                .map_err(|_| decode_err("trusted time"))?,
        ),
        None => i64::MIN,
    };
    Ok(Some(mark.max(head.time)).filter(|t| *t != i64::MIN))
}

impl Appender {
    /// Reads the head and guards it in `txn`: a concurrent writer makes the commit fail.
    /// Refuses with `clock_ahead` — and says so in the log, at the trusted time, in a
    /// transaction of its own — when the clock is further past the trusted time than the
    /// site adopts: the command would otherwise move the trusted time there.
    pub(crate) fn begin(node: &Node, txn: &mut Txn) -> Result<Self> {
        // One read for the three (one round trip on etcd, where a longer window between
        // this read and the commit means more commits lost to busy nodes).
        let jump = crate::settings::CLOCK_MAX_JUMP.key;
        let mut read = node
            .store
            .get_many(&[
                (Table::Meta, AUDIT_HEAD),
                (Table::Meta, crate::provision::TIME_HWM),
                (Table::Meta, jump),
            ])?
            .into_iter();
        let (seen, mark, jump) = (
            read.next().flatten(),
            read.next().flatten(),
            read.next().flatten(),
        );
        let mut log = Self::from_head(node, txn, seen)?;
        let Some(trusted) = trusted_time(mark.as_ref(), &log.head)? else {
            return Ok(log);
        };
        let max_jump = crate::settings::CLOCK_MAX_JUMP.from_stored(jump.as_ref())?;
        let observed = node.now().0;
        if observed > trusted.saturating_add(max_jump) {
            let mut refusal = Txn::default();
            let mut record = Self::resume(&node.name, None, log.head);
            record.append(
                &mut refusal,
                trusted,
                Event::ClockAhead {
                    observed,
                    high_water: trusted,
                },
            )?;
            record.finish(&mut refusal);
            refusal.require_revision(Table::Meta, AUDIT_HEAD, log.head_revision);
            // A writer in between changed the head: the refusal stands all the same.
            node.store.commit(refusal)?;
            return Err(Error::ClockAhead {
                observed,
                trusted,
                max_jump,
            });
        }
        log.latest = Some((trusted.saturating_add(max_jump), max_jump));
        Ok(log)
    }

    /// [`Appender::begin`] without the clock check, for changing a clock setting (at
    /// [`Appender::trusted`]): the way out of a clock check must not need to pass one.
    pub(crate) fn begin_unbounded(node: &Node, txn: &mut Txn) -> Result<Self> {
        let seen = node.store.get(Table::Meta, AUDIT_HEAD)?;
        Self::from_head(node, txn, seen)
    }

    /// The appender after the head `seen`, guarded in `txn`.
    fn from_head(node: &Node, txn: &mut Txn, seen: Option<Versioned>) -> Result<Self> {
        let head = head_from(seen.as_ref())?;
        txn.require_unchanged(Table::Meta, AUDIT_HEAD, seen.as_ref());
        Ok(Self {
            head,
            site: node.name.clone(),
            chain: None,
            first: None,
            row: Vec::new(),
            latest: None,
            head_revision: seen.map(|v| v.revision),
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
            latest: None,
            head_revision: None,
        }
    }

    /// Adds a record at `time` (raised to the last record's time if earlier); returns its
    /// sequence number. A time past what [`Appender::begin`] allows is `clock_ahead`.
    pub(crate) fn append(&mut self, _txn: &mut Txn, time: i64, event: Event) -> Result<u64> {
        if let Some((latest, max_jump)) = self.latest {
            if time > latest {
                return Err(Error::ClockAhead {
                    observed: time,
                    trusted: latest - max_jump,
                    max_jump,
                });
            }
        }
        self.push(time.max(self.head.time), event)
    }

    /// Adds a `clock_reset` record at the time it resets to, even when that is earlier
    /// than the last record's: the one record a chain's time may go back at (HQ accepts
    /// it only if it issued the reset).
    pub(crate) fn append_clock_reset(&mut self, event: Event) -> Result<u64> {
        let Event::ClockReset { to, .. } = event else {
            return Err(Error::Bug("not a clock reset".into()));
        };
        self.push(to, event)
    }

    fn push(&mut self, time: i64, event: Event) -> Result<u64> {
        let mut r: Record = self.head.next(time, &self.site, event);
        r.chain.clone_from(&self.chain);
        let bytes = r.to_bytes();
        u32::try_from(bytes.len()).map_err(|_| Error::Bug("audit record too large".into()))?;
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

    /// The time of the last record: what a record made now without moving the trusted
    /// time on is stamped with.
    pub(crate) fn trusted(&self) -> i64 {
        self.head.time
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

/// How many times a command's commit is tried while other writers keep moving the log
/// head under it ([`until_landed`]).
const LANDING_ATTEMPTS: usize = 64;

/// Longest pause between two attempts of [`until_landed`].
const LANDING_PAUSE_MAX_MICROS: u64 = 4_000;

/// Records `event` at the trusted time (the clock's, before there is one), in one
/// commit with what `also` adds to the transaction, [`until_landed`]: what a site
/// records about itself — stopping, advancing its rollback counter — must not need its
/// clock to pass a check. `also` returns `false` when the state it would change is
/// already as wanted (nothing is committed then). `None`: no attempt landed.
pub(crate) fn record_at_trusted_time(
    node: &Node,
    event: impl Fn(i64) -> keyfab_audit::Event,
    also: impl Fn(&mut Txn, i64) -> Result<bool>,
) -> Result<Option<()>> {
    until_landed(node, || {
        let mut txn = Txn::default();
        let mut log = Appender::begin_unbounded(node, &mut txn)?;
        let at = match log.trusted() {
            i64::MIN => node.now().0,
            t => t,
        };
        if !also(&mut txn, at)? {
            return Ok(Some(()));
        }
        log.append(&mut txn, at, event(at))?;
        log.finish(&mut txn);
        Ok(node.store.commit(txn)?.is_committed().then_some(()))
    })
}

/// Runs `attempt` until it lands. An attempt reads what it decides on, appends to the
/// site chain from the head as it reads it ([`Appender::begin`]) and commits, guarded on
/// both; `Ok(None)` means a guard failed and nothing was written. On a store that others
/// write too ([`keyfab_store::Store::concurrent_writers`]) it is tried again:
/// - through a serving site's socket, the site's batches — each appends to the chain —
///   are held back for the next attempt ([`keyfab_store::Store::hold_writers`]), which
///   then loses only to a real change of what it read;
/// - elsewhere (a cluster's nodes) after a short random pause, up to
///   [`LANDING_ATTEMPTS`] times.
///
/// `None`: no attempt landed.
pub(crate) fn until_landed<T>(
    node: &Node,
    mut attempt: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let attempts = if node.store.concurrent_writers() {
        LANDING_ATTEMPTS
    } else {
        1
    };
    let mut held = false;
    let mut landed = Ok(None);
    for i in 0..attempts {
        if i == 1 {
            held = match node.store.hold_writers() {
                Ok(held) => held,
                Err(e) => {
                    landed = Err(e.into());
                    break;
                }
            };
        }
        landed = attempt();
        if !matches!(landed, Ok(None)) || (held && i >= 1) {
            break;
        }
        if i + 1 < attempts {
            let mut r = [0u8; 8];
            node.rng.fill(&mut r);
            let pause = u64::from_le_bytes(r) % LANDING_PAUSE_MAX_MICROS;
            std::thread::sleep(std::time::Duration::from_micros(pause));
        }
    }
    if held {
        node.store.release_writers();
    }
    landed
}

/// Commits `change` (its guards and writes on the transaction) together with one
/// `setting_changed` record `name` = `value`: a change that bears on security and its
/// audit record land together or not at all. A concurrent writer makes it fail with
/// `conflict` (try again) unless it only moved the log head ([`until_landed`]).
pub(crate) fn commit_setting(
    node: &Node,
    name: &str,
    value: String,
    change: impl FnMut(&mut Txn) -> Result<()>,
) -> Result<()> {
    commit_setting_in(node, false, name, value, change)
}

/// [`commit_setting`] for a setting of the clock checks: recorded at the trusted time,
/// without the check (see [`Appender::begin_unbounded`]).
pub(crate) fn commit_setting_at_trusted_time(
    node: &Node,
    name: &str,
    value: String,
    change: impl FnMut(&mut Txn) -> Result<()>,
) -> Result<()> {
    commit_setting_in(node, true, name, value, change)
}

fn commit_setting_in(
    node: &Node,
    at_trusted_time: bool,
    name: &str,
    value: String,
    mut change: impl FnMut(&mut Txn) -> Result<()>,
) -> Result<()> {
    let landed = until_landed(node, || {
        let mut txn = Txn::default();
        let (mut log, at) = if at_trusted_time {
            let log = Appender::begin_unbounded(node, &mut txn)?;
            let at = match log.trusted() {
                i64::MIN => node.now().0,
                trusted => trusted,
            };
            (log, at)
        } else {
            (Appender::begin(node, &mut txn)?, node.now().0)
        };
        log.append(
            &mut txn,
            at,
            Event::SettingChanged {
                name: name.to_owned(),
                value: value.clone(),
            },
        )?;
        log.finish(&mut txn);
        change(&mut txn)?;
        Ok(node.store.commit(txn)?.is_committed().then_some(()))
    })?;
    landed.ok_or_else(|| Error::Conflict("site state changed meanwhile; try again".into()))
}

/// The log head as stored at [`AUDIT_HEAD`] (the genesis head before the first record).
pub(crate) fn head_from(stored: Option<&Versioned>) -> Result<Head> {
    match stored {
        Some(v) => Head::from_bytes(&v.value).ok_or_else(|| decode_err("audit head")),
        None => Ok(Head::genesis()),
    }
}

/// More records than a site-chain row holds: one commit's (a provisioning batch of at
/// most 512 decisions, one record each). The last row starts less than this far before
/// the head.
const MAX_ROW_RECORDS: u64 = 1024;

/// Why the site chain's stored head is not its last stored record, if it is not: a cheap
/// look (one short scan) at whether the log was cut, extended or edited at its end.
pub(crate) fn head_mismatch(node: &Node) -> Result<Option<String>> {
    let seen = node.store.get(Table::Meta, AUDIT_HEAD)?;
    let head = head_from(seen.as_ref())?;
    let from = row_key_of(None, head.sequence.saturating_sub(MAX_ROW_RECORDS).max(1));
    let mut rows = node
        .store
        .scan_from(Table::Audit, SITE_ROWS, &from, usize::MAX)?;
    if node.store.concurrent_writers() {
        // Rows other writers committed after the head was read came with heads of their
        // own (a row and its head are written in one commit): they are not this head's.
        let cut = seen.as_ref().map_or(0, |v| v.revision);
        rows.retain(|(_, v)| v.revision <= cut);
    }
    let last = match rows.last() {
        Some((_, v)) => row_records(&v.value)?.pop(),
        None => None,
    };
    let found = match &last {
        Some(bytes) => Some((
            Record::from_bytes(bytes)
                .map_err(|e| Error::Corrupt(e.to_string()))?
                .sequence,
            leaf_hash(bytes),
        )),
        None => None,
    };
    Ok(match found {
        None if head.sequence == 0 => None,
        Some((sequence, hash)) if sequence == head.sequence && hash == head.hash => None,
        None => Some(format!(
            "the log's head is record {}, and no record of it is stored",
            head.sequence
        )),
        Some((sequence, _)) => Some(format!(
            "the log's head is record {}, its last stored record is {sequence}{}",
            head.sequence,
            if sequence == head.sequence {
                ", with other content"
            } else {
                ""
            }
        )),
    })
}

/// How many records the whole log holds: every chain's head, summed.
pub(crate) fn log_size(node: &Node) -> Result<u64> {
    let site = head_from(node.store.get(Table::Meta, AUDIT_HEAD)?.as_ref())?;
    let mut size = site.sequence;
    for (_, v) in node.store.scan(Table::Meta, CHAIN_HEADS, usize::MAX)? {
        size += head_from(Some(&v))?.sequence;
    }
    Ok(size)
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
        let r = Record::from_bytes(&bytes).map_err(|e| Error::Corrupt(e.to_string()))?;
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
