//! The embedded backend: a redb file behind a write-ahead journal.
//!
//! All logical tables share one redb table, `keyfab-v1`, their keys prefixed with a
//! table byte; the store-wide revision is one more key. Values are stored as
//! `revision (u64 BE) ‖ value`.
//!
//! A commit is appended to the journal and made durable with one `fdatasync` (see
//! [`crate::journal`]); its writes then live in memory, in the *active* layer, over what
//! redb holds. When the layer has grown to a few MiB it is frozen, the journal moves to
//! its other file, and a background thread writes the frozen layer into redb in one
//! transaction — many commits' pages written once instead of once per commit, which is
//! what a redb commit per batch of devices cost. Reads look at the active layer, then the
//! frozen one, then redb.
//!
//! Commits that delete a range of keys, or carry more than [`DIRECT_BYTES`], go to redb
//! directly (after the layers, in the same redb transaction): imports and revocations,
//! rare and large, where a journal would only write the bytes twice.
//!
//! Opening replays what the journal holds beyond redb's revision into redb; closing
//! writes the layers into redb and removes the journal, so a closed store is the redb
//! file alone.

use crate::journal::{self, Entry};
use crate::{prefix_end, Guard, Outcome, Result, Store, StoreError, Table, Txn, Versioned, Write};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The page cache of the store file.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Commits larger than this go to redb directly rather than through the journal.
pub const DIRECT_BYTES: usize = 1024 * 1024;

/// How much the active layer holds before it is frozen and written into redb.
const FLUSH_BYTES: usize = 8 * 1024 * 1024;

/// How much may wait in memory in all: beyond it, a commit waits for the background
/// write (a disk slower than the commits must not grow the process without bound).
const MAX_UNFLUSHED_BYTES: usize = 64 * 1024 * 1024;

/// What an entry of a layer costs in memory beyond its key and value.
const ENTRY_OVERHEAD: usize = 64;

const KV: TableDefinition<'static, &'static [u8], &'static [u8]> =
    TableDefinition::new("keyfab-v1");

/// Key of the store-wide revision: a table byte no logical table uses.
const REVISION_KEY: &[u8] = &[0xff, b'r', b'e', b'v'];

pub struct EmbeddedStore {
    inner: Arc<Inner>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    db: Database,
    /// Held by the one commit in progress: commits are serial, and the journal is theirs.
    journal: Mutex<Journal>,
    state: Mutex<State>,
    /// Signalled when a layer is frozen, when one has reached redb, and on close.
    changed: Condvar,
    /// How much the active layer holds before it is frozen.
    flush_bytes: usize,
}

/// What is committed but not yet in redb.
struct State {
    revision: u64,
    active: Layer,
    frozen: Option<Arc<Layer>>,
    closing: bool,
    /// Why the background write failed: commits fail from then on (the journal still
    /// holds everything, and opening again replays it).
    flush_failed: Option<String>,
}

/// Writes by full key: the value and the revision that wrote it, or `None` for a delete.
#[derive(Default)]
struct Layer {
    entries: BTreeMap<Vec<u8>, Option<(u64, Vec<u8>)>>,
    bytes: usize,
    last_revision: u64,
}

impl Layer {
    fn apply(&mut self, revision: u64, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.bytes += key.len() + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD;
        self.entries.insert(key, value.map(|v| (revision, v)));
        self.last_revision = revision;
    }
}

/// The journal's two files, used in turn: one takes commits while the other's layer is
/// written into redb.
struct Journal {
    paths: [PathBuf; 2],
    current: usize,
    file: Option<File>,
    /// Where the next entry goes in the current file.
    offset: u64,
    /// Entries appended to the current file without an fsync (lazy commits).
    unsynced: bool,
    /// A redb commit without an fsync happened: redb must be made durable before the
    /// journal continues past it.
    redb_unsynced: bool,
    /// An append or fsync failed: what the file holds is unknown, so nothing more is
    /// appended (opening again replays what is there).
    failed: bool,
    buf: Vec<u8>,
}

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| StoreError::Io("a thread failed while holding the store".into()))
}

fn decode(raw: &[u8]) -> Result<Versioned> {
    if raw.len() < 8 {
        return Err(StoreError::Corrupt(
            "value shorter than its revision".into(),
        ));
    }
    let (rev, value) = raw.split_at(8);
    let mut r = [0u8; 8];
    r.copy_from_slice(rev);
    Ok(Versioned {
        value: value.to_vec(),
        revision: u64::from_be_bytes(r),
    })
}

fn journal_paths(path: &Path) -> [PathBuf; 2] {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    [0, 1].map(|i| path.with_file_name(format!("{name}.journal{i}")))
}

fn stored_revision(t: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<u64> {
    Ok(match t.get(REVISION_KEY).map_err(io)? {
        Some(v) => u64::from_be_bytes(
            v.value()
                .try_into()
                .map_err(|_| StoreError::Corrupt("revision".into()))?,
        ),
        None => 0,
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the store file. A second process opening the same file gets
    /// [`StoreError::Busy`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, FLUSH_BYTES)
    }

    /// [`EmbeddedStore::open`] with the active layer frozen at `flush_bytes`: tests use a
    /// small one to move layers into redb all the time.
    pub fn open_with(path: &Path, flush_bytes: usize) -> Result<Self> {
        // A bounded page cache: redb's default (1 GiB) would let a large import or
        // provisioning run grow the process that far.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Busy,
                other => io(other),
            })?;
        // Create the table only if missing: opening an existing store must not write to
        // it, so a refused operation leaves the file byte for byte as it was.
        let exists = db.begin_read().map_err(io)?.open_table(KV).is_ok();
        if !exists {
            let w = db.begin_write().map_err(io)?;
            w.open_table(KV).map_err(io)?;
            w.commit().map_err(io)?;
        }
        let paths = journal_paths(path);
        let revision = replay(&db, &paths)?;
        let inner = Arc::new(Inner {
            db,
            journal: Mutex::new(Journal {
                paths,
                current: 0,
                file: None,
                offset: 0,
                unsynced: false,
                redb_unsynced: false,
                failed: false,
                buf: Vec::new(),
            }),
            state: Mutex::new(State {
                revision,
                active: Layer::default(),
                frozen: None,
                closing: false,
                flush_failed: None,
            }),
            changed: Condvar::new(),
            flush_bytes,
        });
        let flusher = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("keyfab-store".into())
                .spawn(move || inner.write_frozen_layers())
                .map_err(io)?
        };
        Ok(Self {
            inner,
            flusher: Some(flusher),
        })
    }
}

/// Writes into redb what the journal files hold beyond redb's revision, then removes
/// them. Returns the store's revision.
fn replay(db: &Database, paths: &[PathBuf; 2]) -> Result<u64> {
    let stored = {
        let r = db.begin_read().map_err(io)?;
        stored_revision(&r.open_table(KV).map_err(io)?)?
    };
    let mut entries: Vec<Entry> = Vec::new();
    let mut found = false;
    for p in paths {
        match std::fs::read(p) {
            Ok(bytes) => {
                found = true;
                entries.extend(
                    journal::parse(&bytes)?
                        .into_iter()
                        .filter(|e| e.revision > stored),
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
    }
    if !found {
        return Ok(stored);
    }
    entries.sort_by_key(|e| e.revision);
    let mut revision = stored;
    for e in &entries {
        if e.revision != revision + 1 {
            return Err(StoreError::Corrupt(format!(
                "the journal lacks revision {} (it holds {} next)",
                revision + 1,
                e.revision
            )));
        }
        revision = e.revision;
    }
    if !entries.is_empty() {
        let mut layer = Layer::default();
        for e in entries {
            for (k, v) in e.ops {
                layer.apply(e.revision, k, v);
            }
            layer.last_revision = e.revision;
        }
        write_layer(db, &layer, redb::Durability::Immediate)?;
    }
    for p in paths {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
    }
    Ok(revision)
}

/// Writes a layer's entries into redb in one transaction, with its last revision.
fn write_layer(db: &Database, layer: &Layer, durability: redb::Durability) -> Result<()> {
    let mut w = db.begin_write().map_err(io)?;
    w.set_durability(durability).map_err(io)?;
    {
        let mut table = w.open_table(KV).map_err(io)?;
        put_layer(&mut table, layer)?;
    }
    w.commit().map_err(io)
}

fn put_layer(table: &mut redb::Table<&'static [u8], &'static [u8]>, layer: &Layer) -> Result<()> {
    let mut buf = Vec::new();
    for (k, v) in &layer.entries {
        match v {
            Some((rev, value)) => {
                buf.clear();
                buf.extend_from_slice(&rev.to_be_bytes());
                buf.extend_from_slice(value);
                table.insert(k.as_slice(), buf.as_slice()).map_err(io)?;
            }
            None => {
                table.remove(k.as_slice()).map_err(io)?;
            }
        }
    }
    if layer.last_revision > 0 {
        table
            .insert(REVISION_KEY, &layer.last_revision.to_be_bytes()[..])
            .map_err(io)?;
    }
    Ok(())
}

impl Journal {
    /// Appends an entry; durable on return unless `lazy`.
    fn append(&mut self, db: &Database, revision: u64, txn: &Txn) -> Result<()> {
        if self.failed {
            return Err(StoreError::Io(
                "an earlier write to the store's journal failed; open the store again".into(),
            ));
        }
        if self.redb_unsynced {
            // redb holds a commit without its fsync; the journal's next entries would
            // continue from it. An empty durable commit makes it durable.
            let w = db.begin_write().map_err(io)?;
            w.commit().map_err(io)?;
            self.redb_unsynced = false;
        }
        self.buf.clear();
        journal::encode_into(
            &mut self.buf,
            revision,
            txn.writes().iter().filter_map(|w| match w {
                Write::Put(t, k, v) => Some(journal::OpRef {
                    table: t.byte(),
                    key: k,
                    value: Some(v),
                }),
                Write::Delete(t, k) => Some(journal::OpRef {
                    table: t.byte(),
                    key: k,
                    value: None,
                }),
                // Range deletes never come here (see `goes_to_redb`).
                Write::DeletePrefix(..) | Write::DeleteRange(..) => None,
            }),
        );
        let result = self.write_buf(txn.is_lazy());
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn write_buf(&mut self, lazy: bool) -> Result<()> {
        self.open_current()?;
        let Some(file) = &self.file else {
            return Err(StoreError::Io("journal file".into()));
        };
        file.write_all_at(&self.buf, self.offset).map_err(io)?;
        if lazy {
            self.unsynced = true;
        } else {
            file.sync_data().map_err(io)?;
            self.unsynced = false;
        }
        self.offset += self.buf.len() as u64;
        Ok(())
    }

    /// The current file, created (and its directory entry made durable) if needed.
    fn open_current(&mut self) -> Result<()> {
        if self.file.is_none() {
            let path = &self.paths[self.current];
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io)?;
            file.write_all_at(journal::MAGIC, 0).map_err(io)?;
            file.sync_data().map_err(io)?;
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
            self.offset = journal::MAGIC.len() as u64;
            self.file = Some(file);
        }
        Ok(())
    }

    /// Moves to the other file: the current one's entries are now a frozen layer. What
    /// the other file held reached redb (no layer is frozen when this is called); it is
    /// written over from its start.
    fn rotate(&mut self) -> Result<()> {
        if self.unsynced {
            if let Some(f) = &self.file {
                f.sync_data().map_err(io)?;
            }
            self.unsynced = false;
        }
        self.current = 1 - self.current;
        self.file = None;
        Ok(())
    }

    /// Starts the current file over: everything in the journal has reached redb.
    fn restart(&mut self) {
        self.offset = journal::MAGIC.len() as u64;
        self.unsynced = false;
    }
}

fn full_key(t: Table, key: &[u8]) -> Vec<u8> {
    t.full_key(key)
}

/// Whether a commit goes to redb directly: range deletes (the journal holds keys, and
/// the range's keys would have to be listed) and large commits (imports: the journal
/// would write their bytes twice).
fn goes_to_redb(txn: &Txn) -> bool {
    txn.bytes() > DIRECT_BYTES
        || txn
            .writes()
            .iter()
            .any(|w| matches!(w, Write::DeletePrefix(..) | Write::DeleteRange(..)))
}

/// The layers' entry for a full key — a value or a delete — or `None` when only redb
/// knows it. The active layer is newer than the frozen one.
fn layered<'s>(st: &'s State, key: &[u8]) -> Option<&'s Option<(u64, Vec<u8>)>> {
    st.active
        .entries
        .get(key)
        .or_else(|| st.frozen.as_ref().and_then(|f| f.entries.get(key)))
}

fn versioned(entry: &Option<(u64, Vec<u8>)>) -> Option<Versioned> {
    entry.as_ref().map(|(revision, value)| Versioned {
        value: value.clone(),
        revision: *revision,
    })
}

/// The layers' entries from `start` (before `end`, if given), newest first for a key,
/// until `limit` of them are values: enough to merge with redb for a scan of `limit`
/// (a redb key past the last one taken is never reached — the scan is full before).
fn layered_range(
    st: &State,
    start: &[u8],
    end: Option<&[u8]>,
    limit: usize,
) -> Vec<(Vec<u8>, Option<Versioned>)> {
    use std::ops::Bound;
    if end.is_some_and(|end| end <= start) {
        return Vec::new();
    }
    let bounds = (
        Bound::Included(start),
        end.map_or(Bound::Unbounded, Bound::Excluded),
    );
    let mut a = st.active.entries.range::<[u8], _>(bounds).peekable();
    let mut f = st
        .frozen
        .iter()
        .flat_map(|f| f.entries.range::<[u8], _>(bounds))
        .peekable();
    let mut out = Vec::new();
    let mut values = 0;
    while values < limit {
        let next = match (a.peek(), f.peek()) {
            (None, None) => break,
            (Some(_), None) => a.next(),
            (None, Some(_)) => f.next(),
            (Some((ka, _)), Some((kf, _))) => match ka.cmp(kf) {
                std::cmp::Ordering::Less => a.next(),
                std::cmp::Ordering::Greater => f.next(),
                std::cmp::Ordering::Equal => {
                    f.next();
                    a.next()
                }
            },
        };
        let Some((k, v)) = next else { break };
        values += usize::from(v.is_some());
        out.push((k.clone(), versioned(v)));
    }
    out
}

fn revision_in(raw: &[u8]) -> Result<u64> {
    raw.get(..8)
        .and_then(|r| r.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("value shorter than its revision".into()))
}

/// The revision that last wrote `key` (a full key), `None` if absent.
fn revision_of<T: ReadableTable<&'static [u8], &'static [u8]>>(
    st: &State,
    table: &T,
    key: &[u8],
) -> Result<Option<u64>> {
    if let Some(entry) = layered(st, key) {
        return Ok(entry.as_ref().map(|(r, _)| *r));
    }
    match table.get(key).map_err(io)? {
        Some(v) => Ok(Some(revision_in(v.value())?)),
        None => Ok(None),
    }
}

/// Whether no key lies in `[start, end)` (full keys).
fn range_is_empty<T: ReadableTable<&'static [u8], &'static [u8]>>(
    st: &State,
    table: &T,
    start: &[u8],
    end: &[u8],
) -> Result<bool> {
    if start >= end {
        return Ok(true);
    }
    if layered_range(st, start, Some(end), 1)
        .iter()
        .any(|(_, v)| v.is_some())
    {
        return Ok(false);
    }
    for item in table.range(start..end).map_err(io)? {
        let (k, _) = item.map_err(io)?;
        // Deleted in a layer (a value there was found above).
        if layered(st, k.value()).is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn guards_hold<T: ReadableTable<&'static [u8], &'static [u8]>>(
    st: &State,
    table: &T,
    guards: &[Guard],
) -> Result<bool> {
    for g in guards {
        let holds = match g {
            Guard::Absent(t, k) => revision_of(st, table, &full_key(*t, k))?.is_none(),
            Guard::AtRevision(t, k, r) => revision_of(st, table, &full_key(*t, k))? == Some(*r),
            Guard::AbsentRange(t, start, end) => {
                range_is_empty(st, table, &full_key(*t, start), &full_key(*t, end))?
            }
        };
        if !holds {
            return Ok(false);
        }
    }
    Ok(true)
}

fn poisoned() -> StoreError {
    StoreError::Io("a thread failed while holding the store".into())
}

impl Inner {
    /// The background thread: writes each frozen layer into redb, then lets it go.
    fn write_frozen_layers(&self) {
        loop {
            let layer = {
                let Ok(mut st) = self.state.lock() else {
                    return;
                };
                loop {
                    if let Some(f) = &st.frozen {
                        break Arc::clone(f);
                    }
                    if st.closing {
                        return;
                    }
                    st = match self.changed.wait(st) {
                        Ok(st) => st,
                        Err(_) => return,
                    };
                }
            };
            let written = write_layer(&self.db, &layer, redb::Durability::Immediate);
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            let failed = written.is_err();
            match written {
                Ok(()) => st.frozen = None,
                Err(e) => {
                    st.flush_failed = Some(format!(
                        "writing committed state into the store file failed: {e}"
                    ))
                }
            }
            self.changed.notify_all();
            if failed {
                return;
            }
        }
    }

    /// Waits while `until` holds and no background write has failed.
    fn wait_while<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        until: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>> {
        while until(&st) && st.flush_failed.is_none() {
            st = self.changed.wait(st).map_err(|_| poisoned())?;
        }
        match &st.flush_failed {
            Some(why) => Err(StoreError::Io(why.clone())),
            None => Ok(st),
        }
    }

    /// A commit through the journal.
    fn commit_journaled(&self, journal: &mut Journal, txn: Txn) -> Result<Outcome> {
        let revision = {
            let st = lock(&self.state)?;
            // Memory is bounded: a disk slower than the commits makes them wait here.
            let mut st = self.wait_while(st, |st| {
                st.active.bytes >= MAX_UNFLUSHED_BYTES && st.frozen.is_some()
            })?;
            if st.active.bytes >= self.flush_bytes && st.frozen.is_none() {
                journal.rotate()?;
                st.frozen = Some(Arc::new(std::mem::take(&mut st.active)));
                self.changed.notify_all();
            }
            let read = self.db.begin_read().map_err(io)?;
            let table = read.open_table(KV).map_err(io)?;
            if !guards_hold(&st, &table, txn.guards())? {
                return Ok(Outcome::Conflict);
            }
            st.revision + 1
        };
        journal.append(&self.db, revision, &txn)?;
        // Visible to readers only now that it is durable.
        let mut st = lock(&self.state)?;
        for w in txn.into_writes() {
            match w {
                Write::Put(t, k, v) => st.active.apply(revision, full_key(t, &k), Some(v)),
                Write::Delete(t, k) => st.active.apply(revision, full_key(t, &k), None),
                Write::DeletePrefix(..) | Write::DeleteRange(..) => {}
            }
        }
        st.active.last_revision = revision;
        st.revision = revision;
        Ok(Outcome::Committed(revision))
    }

    /// A commit straight into redb, with the active layer before it in the same redb
    /// transaction (the frozen one is first waited for). The journal then starts over.
    fn commit_to_redb(&self, journal: &mut Journal, txn: Txn) -> Result<Outcome> {
        let st = lock(&self.state)?;
        let mut st = self.wait_while(st, |st| st.frozen.is_some())?;
        // Without an fsync only if nothing of the journal's goes with it.
        let lazy = txn.is_lazy() && st.active.entries.is_empty();
        let mut w = self.db.begin_write().map_err(io)?;
        w.set_durability(if lazy {
            redb::Durability::None
        } else {
            redb::Durability::Immediate
        })
        .map_err(io)?;
        let revision = st.revision + 1;
        {
            let mut table = w.open_table(KV).map_err(io)?;
            if !guards_hold(&st, &table, txn.guards())? {
                drop(table);
                w.abort().map_err(io)?;
                return Ok(Outcome::Conflict);
            }
            put_layer(&mut table, &st.active)?;
            table
                .insert(REVISION_KEY, &revision.to_be_bytes()[..])
                .map_err(io)?;
            apply_to_redb(&mut table, revision, txn.writes())?;
        }
        w.commit().map_err(io)?;
        st.active = Layer::default();
        st.revision = revision;
        journal.redb_unsynced = lazy;
        journal.restart();
        Ok(Outcome::Committed(revision))
    }
}

fn apply_to_redb(
    table: &mut redb::Table<&'static [u8], &'static [u8]>,
    revision: u64,
    writes: &[Write],
) -> Result<()> {
    let mut buf = Vec::new();
    for write in writes {
        match write {
            Write::Put(t, k, v) => {
                buf.clear();
                buf.extend_from_slice(&revision.to_be_bytes());
                buf.extend_from_slice(v);
                table
                    .insert(full_key(*t, k).as_slice(), buf.as_slice())
                    .map_err(io)?;
            }
            Write::Delete(t, k) => {
                table.remove(full_key(*t, k).as_slice()).map_err(io)?;
            }
            Write::DeletePrefix(t, p) => {
                let start = full_key(*t, p);
                match prefix_end(&start) {
                    Some(end) => table
                        .retain_in(start.as_slice()..end.as_slice(), |_, _| false)
                        .map_err(io)?,
                    None => table
                        .retain_in(start.as_slice().., |_, _| false)
                        .map_err(io)?,
                }
            }
            Write::DeleteRange(t, start, end) => {
                let (start, end) = (full_key(*t, start), full_key(*t, end));
                table
                    .retain_in(start.as_slice()..end.as_slice(), |_, _| false)
                    .map_err(io)?;
            }
        }
    }
    Ok(())
}

impl EmbeddedStore {
    /// Reads full keys from one consistent view: the layers as they are now, and a redb
    /// snapshot taken at the same moment.
    fn read_keys(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Versioned>>> {
        let (layered_hits, read) = {
            let st = lock(&self.inner.state)?;
            let hits: Vec<Option<Option<Versioned>>> = keys
                .iter()
                .map(|k| layered(&st, k).map(versioned))
                .collect();
            let read = if hits.iter().any(Option::is_none) {
                Some(self.inner.db.begin_read().map_err(io)?)
            } else {
                None
            };
            (hits, read)
        };
        let table = match &read {
            Some(r) => Some(r.open_table(KV).map_err(io)?),
            None => None,
        };
        keys.iter()
            .zip(layered_hits)
            .map(|(k, hit)| match (hit, &table) {
                (Some(v), _) => Ok(v),
                (None, Some(t)) => match t.get(k.as_slice()).map_err(io)? {
                    Some(v) => Ok(Some(decode(v.value())?)),
                    None => Ok(None),
                },
                (None, None) => Ok(None),
            })
            .collect()
    }
}

impl Store for EmbeddedStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Versioned>> {
        Ok(self
            .read_keys(&[full_key(table, key)])?
            .into_iter()
            .next()
            .flatten())
    }

    fn get_many(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Versioned>>> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|(t, k)| full_key(*t, k)).collect();
        self.read_keys(&keys)
    }

    fn scan_from(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Versioned)>> {
        let wanted = full_key(table, prefix);
        let start = full_key(table, from.max(prefix));
        let end = prefix_end(&wanted);
        let (layers, read) = {
            let st = lock(&self.inner.state)?;
            let layers = layered_range(&st, &start, end.as_deref(), limit);
            (layers, self.inner.db.begin_read().map_err(io)?)
        };
        let t = read.open_table(KV).map_err(io)?;
        let mut disk = t.range(start.as_slice()..).map_err(io)?;
        let mut next_disk = || -> Result<Option<(Vec<u8>, Versioned)>> {
            match disk.next() {
                Some(item) => {
                    let (k, v) = item.map_err(io)?;
                    if !k.value().starts_with(&wanted) {
                        return Ok(None);
                    }
                    Ok(Some((k.value().to_vec(), decode(v.value())?)))
                }
                None => Ok(None),
            }
        };
        let mut layers = layers.into_iter().peekable();
        let mut on_disk = next_disk()?;
        let mut out = Vec::new();
        while out.len() < limit {
            let from_layer = match (layers.peek(), &on_disk) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((lk, _)), Some((dk, _))) => lk <= dk,
            };
            if from_layer {
                let Some((k, v)) = layers.next() else { break };
                if on_disk.as_ref().is_some_and(|(dk, _)| *dk == k) {
                    on_disk = next_disk()?;
                }
                if let Some(v) = v {
                    out.push((k[1..].to_vec(), v));
                }
            } else if let Some((k, v)) = on_disk.take() {
                out.push((k[1..].to_vec(), v));
                on_disk = next_disk()?;
            }
        }
        Ok(out)
    }

    fn commit(&self, txn: Txn) -> Result<Outcome> {
        let mut journal = lock(&self.inner.journal)?;
        if journal.failed {
            return Err(StoreError::Io(
                "an earlier write to the store's journal failed; open the store again".into(),
            ));
        }
        if goes_to_redb(&txn) {
            self.inner.commit_to_redb(&mut journal, txn)
        } else {
            self.inner.commit_journaled(&mut journal, txn)
        }
    }

    fn revision(&self) -> Result<u64> {
        Ok(lock(&self.inner.state)?.revision)
    }
}

impl Drop for EmbeddedStore {
    /// Writes what is in memory into redb and removes the journal. Anything that fails
    /// here leaves the journal, which the next open replays.
    fn drop(&mut self) {
        {
            // Even after a panic elsewhere: the background thread must stop.
            let mut st = self
                .inner
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st.closing = true;
            self.inner.changed.notify_all();
        }
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
        let Ok(journal) = self.inner.journal.lock() else {
            return;
        };
        let Ok(st) = self.inner.state.lock() else {
            return;
        };
        if st.frozen.is_some() || st.flush_failed.is_some() || journal.failed {
            return;
        }
        if (st.active.last_revision > 0 || journal.redb_unsynced)
            && write_layer(&self.inner.db, &st.active, redb::Durability::Immediate).is_err()
        {
            return;
        }
        for p in &journal.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, EmbeddedStore) {
        let d = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&d.path().join("s.redb")).unwrap();
        (d, s)
    }

    #[test]
    fn the_store_contract_holds() {
        let (_d, s) = store();
        crate::conformance::run_all(&s);
    }

    #[test]
    fn the_store_contract_holds_while_layers_move_into_redb_all_the_time() {
        let d = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open_with(&d.path().join("s.redb"), 1).unwrap();
        crate::conformance::run_all(&s);
    }

    #[test]
    fn data_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.redb");
        {
            let s = EmbeddedStore::open(&path).unwrap();
            let mut t = Txn::default();
            t.put(Table::Meta, b"k", b"v");
            s.commit(t).unwrap();
        }
        assert!(
            !journal_paths(&path).iter().any(|p| p.exists()),
            "a closed store is its redb file alone"
        );
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.get(Table::Meta, b"k").unwrap().unwrap().value, b"v");
        assert_eq!(s.revision().unwrap(), 1);
    }

    /// A process that dies leaves its commits in the journal only; opening replays them.
    #[test]
    fn commits_only_in_the_journal_survive_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.redb");
        let saved = d.path().join("saved");
        std::fs::create_dir(&saved).unwrap();
        {
            // A small layer size: some commits reach redb, the last ones only the journal.
            let s = EmbeddedStore::open_with(&path, 600).unwrap();
            for i in 0u32..40 {
                let mut t = Txn::default();
                t.put(Table::Devices, &i.to_be_bytes(), &[7u8; 100]);
                if i % 3 == 0 {
                    t.delete(Table::Devices, &(i / 2).to_be_bytes());
                }
                assert!(s.commit(t).unwrap().is_committed());
            }
            // The files as a crash would leave them (the store is then closed cleanly).
            let _no_commits = lock(&s.inner.journal).unwrap();
            let st = lock(&s.inner.state).unwrap();
            let _no_background_write = s.inner.wait_while(st, |st| st.frozen.is_some()).unwrap();
            let r = s.inner.db.begin_read().unwrap();
            let in_redb = stored_revision(&r.open_table(KV).unwrap()).unwrap();
            assert!(
                (1..40).contains(&in_redb),
                "some commits reached redb, the last ones only the journal ({in_redb})"
            );
            for p in std::iter::once(&path).chain(journal_paths(&path).iter()) {
                if p.exists() {
                    std::fs::copy(p, saved.join(p.file_name().unwrap())).unwrap();
                }
            }
        }
        for p in std::iter::once(&path).chain(journal_paths(&path).iter()) {
            let _ = std::fs::remove_file(p);
            let from = saved.join(p.file_name().unwrap());
            if from.exists() {
                std::fs::copy(from, p).unwrap();
            }
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.revision().unwrap(), 40);
        let rows = s.scan(Table::Devices, b"", usize::MAX).unwrap();
        let deleted: Vec<u32> = (0u32..40).filter(|i| i % 3 == 0).map(|i| i / 2).collect();
        let expected: Vec<u32> = (0u32..40)
            .filter(|i| {
                // Deleted by a later commit than the one that wrote it.
                !(deleted.contains(i) && (0u32..40).any(|j| j % 3 == 0 && j / 2 == *i && j >= *i))
            })
            .collect();
        let got: Vec<u32> = rows
            .iter()
            .map(|(k, _)| u32::from_be_bytes(k.as_slice().try_into().unwrap()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn reads_see_layers_over_redb() {
        let d = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open_with(&d.path().join("s.redb"), 300).unwrap();
        for round in 0u8..20 {
            let mut t = Txn::default();
            for k in 0u8..10 {
                if (k + round) % 4 == 0 {
                    t.delete(Table::Meta, &[k]);
                } else {
                    t.put(Table::Meta, &[k], &[round]);
                }
            }
            let r = match s.commit(t).unwrap() {
                Outcome::Committed(r) => r,
                Outcome::Conflict => panic!("no guard"),
            };
            let present: Vec<u8> = (0u8..10).filter(|k| (k + round) % 4 != 0).collect();
            let rows = s.scan(Table::Meta, b"", usize::MAX).unwrap();
            assert_eq!(rows.iter().map(|(k, _)| k[0]).collect::<Vec<_>>(), present);
            assert!(rows
                .iter()
                .all(|(_, v)| v.value == [round] && v.revision == r));
            // Paging sees the same.
            let page = s.scan_from(Table::Meta, b"", &[present[1]], 2).unwrap();
            assert_eq!(
                page.iter().map(|(k, _)| k[0]).collect::<Vec<_>>(),
                present[1..3]
            );
            // A range guard sees a key of a layer, and a delete of a layer hides redb's.
            let mut absent = Txn::default();
            absent
                .require_absent_range(Table::Meta, &[0], &[1])
                .put(Table::Requests, b"x", b"y");
            assert_eq!(
                s.commit(absent).unwrap().is_committed(),
                !present.contains(&0),
                "round {round}"
            );
        }
    }
}
