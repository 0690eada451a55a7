//! The embedded backend: one redb file, one write transaction per commit, fsync before
//! returning (redb's `Durability::Immediate`).
//!
//! All logical tables share one redb table, `keyfab-v1`, their keys prefixed with a
//! table byte; the store-wide revision is one more key. A redb commit rewrites the pages
//! it touches in every B-tree it touches, so one tree instead of eight cuts the bytes
//! each commit writes (and fsyncs) several times over. Values are stored as
//! `revision (u64 BE) ‖ value`.

use crate::{
    prefix_end, Guard, Outcome, Purged, Result, Store, StoreError, Table, Txn, Versioned, Write,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

/// The page cache of the store file.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

const KV: TableDefinition<'static, &'static [u8], &'static [u8]> =
    TableDefinition::new("keyfab-v1");

/// Key of the store-wide revision: a table byte no logical table uses.
const REVISION_KEY: &[u8] = &[0xff, b'r', b'e', b'v'];

fn full_key(t: Table, key: &[u8]) -> Vec<u8> {
    t.full_key(key)
}

/// The store contract on one redb file in the node's home: one process at a time,
/// every commit durable (`fdatasync`) before it returns.
pub struct EmbeddedStore {
    /// Replaced whole by [`Store::purge_deleted`]; every other use reads it.
    db: RwLock<Database>,
    path: PathBuf,
}

/// Rows copied per write transaction when the file is rewritten.
const PURGE_BATCH: usize = 50_000;

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
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

impl EmbeddedStore {
    /// Opens (or creates) the store file. A second process opening the same file gets
    /// [`StoreError::Busy`].
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            db: RwLock::new(open_file(path)?),
            path: path.to_owned(),
        })
    }

    fn db(&self) -> RwLockReadGuard<'_, Database> {
        self.db.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies every row of `from` into `to`, in batches; the last commit is durable.
    fn copy_rows(from: &Database, to: &Database) -> Result<()> {
        let r = from.begin_read().map_err(io)?;
        let t = r.open_table(KV).map_err(io)?;
        let mut rows = t.iter().map_err(io)?.peekable();
        loop {
            let mut w = to.begin_write().map_err(io)?;
            let last = {
                let mut out = w.open_table(KV).map_err(io)?;
                for _ in 0..PURGE_BATCH {
                    let Some(row) = rows.next() else { break };
                    let (k, v) = row.map_err(io)?;
                    out.insert(k.value(), v.value()).map_err(io)?;
                }
                rows.peek().is_none()
            };
            w.set_durability(if last {
                redb::Durability::Immediate
            } else {
                redb::Durability::None
            })
            .map_err(io)?;
            w.commit().map_err(io)?;
            if last {
                return Ok(());
            }
        }
    }
}

/// Opens (or creates) a store file, its table made if missing.
fn open_file(path: &Path) -> Result<Database> {
    // A bounded page cache: redb's default (1 GiB) would let a large import or
    // provisioning run grow the process that far.
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    // The state is its user's alone, whatever the umask was when it was made.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    let db = crate::prefill::PrefilledFile::new(file)
        .and_then(|backend| {
            redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create_with_backend(backend)
        })
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
    Ok(db)
}

/// Overwrites `file` with zeros over `len` bytes and syncs it.
fn zero_file(file: &std::fs::File, len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at).map_err(io)?;
        at += n as u64;
    }
    file.sync_data().map_err(io)
}

impl Store for EmbeddedStore {
    /// Copies the live rows into a new file beside the store, renames it over the store,
    /// then overwrites the old file (still open, no longer named) with zeros before it is
    /// closed: freed pages leave the medium with it. Every other store call waits
    /// meanwhile. A crash midway leaves either file whole: the new one is only renamed in
    /// once complete and durable.
    fn purge_deleted(&self) -> Result<Purged> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        let fresh_path = self.path.with_extension("redb.purge");
        let _ = std::fs::remove_file(&fresh_path);
        let old = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(io)?;
        let fresh = open_file(&fresh_path)?;
        if let Err(e) = Self::copy_rows(&db, &fresh) {
            drop(fresh);
            let _ = std::fs::remove_file(&fresh_path);
            return Err(e);
        }
        std::fs::rename(&fresh_path, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        // The old database is closed before its file is zeroed: closing writes to it.
        drop(std::mem::replace(&mut *db, fresh));
        let bytes = old.metadata().map_err(io)?.len();
        zero_file(&old, bytes)?;
        Ok(Purged::Rewritten { bytes })
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Versioned>> {
        // The guard lives to the end of the call: a purge waits for it.
        let db = self.db();
        let r = db.begin_read().map_err(io)?;
        let t = r.open_table(KV).map_err(io)?;
        match t.get(full_key(table, key).as_slice()).map_err(io)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn scan_from(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Versioned)>> {
        // The guard lives to the end of the call: a purge waits for it.
        let db = self.db();
        let r = db.begin_read().map_err(io)?;
        let t = r.open_table(KV).map_err(io)?;
        let wanted = full_key(table, prefix);
        let start = full_key(table, from.max(prefix));
        let mut out = Vec::new();
        for item in t.range(start.as_slice()..).map_err(io)? {
            let (k, v) = item.map_err(io)?;
            if !k.value().starts_with(&wanted) || out.len() >= limit {
                break;
            }
            out.push((k.value()[1..].to_vec(), decode(v.value())?));
        }
        Ok(out)
    }

    fn commit(&self, txn: Txn) -> Result<Outcome> {
        let db = self.db();
        let mut w = db.begin_write().map_err(io)?;
        w.set_durability(if txn.lazy {
            redb::Durability::None
        } else {
            redb::Durability::Immediate
        })
        .map_err(io)?;
        let revision = {
            let mut table = w.open_table(KV).map_err(io)?;
            for g in &txn.guards {
                let holds = match g {
                    Guard::Absent(t, k) => {
                        table.get(full_key(*t, k).as_slice()).map_err(io)?.is_none()
                    }
                    Guard::AtRevision(t, k, r) => {
                        match table.get(full_key(*t, k).as_slice()).map_err(io)? {
                            Some(v) => decode(v.value())?.revision == *r,
                            None => false,
                        }
                    }
                    Guard::AbsentRange(t, start, end) => {
                        let (start, end) = (full_key(*t, start), full_key(*t, end));
                        start >= end
                            || table
                                .range(start.as_slice()..end.as_slice())
                                .map_err(io)?
                                .next()
                                .is_none()
                    }
                };
                if !holds {
                    drop(table);
                    w.abort().map_err(io)?;
                    return Ok(Outcome::Conflict);
                }
            }
            let current = match table.get(REVISION_KEY).map_err(io)? {
                Some(v) => u64::from_be_bytes(
                    v.value()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("revision".into()))?,
                ),
                None => 0,
            };
            let revision = current + 1;
            table
                .insert(REVISION_KEY, &revision.to_be_bytes()[..])
                .map_err(io)?;
            let mut buf = Vec::new();
            for write in &txn.writes {
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
            revision
        };
        w.commit().map_err(io)?;
        Ok(Outcome::Committed(revision))
    }

    fn get_many(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Versioned>>> {
        // The guard lives to the end of the call: a purge waits for it.
        let db = self.db();
        let r = db.begin_read().map_err(io)?;
        let t = r.open_table(KV).map_err(io)?;
        keys.iter()
            .map(
                |(table, k)| match t.get(full_key(*table, k).as_slice()).map_err(io)? {
                    Some(v) => Ok(Some(decode(v.value())?)),
                    None => Ok(None),
                },
            )
            .collect()
    }

    fn revision(&self) -> Result<u64> {
        // The guard lives to the end of the call: a purge waits for it.
        let db = self.db();
        let r = db.begin_read().map_err(io)?;
        let t = r.open_table(KV).map_err(io)?;
        Ok(match t.get(REVISION_KEY).map_err(io)? {
            Some(v) => u64::from_be_bytes(v.value().try_into().unwrap_or([0; 8])),
            None => 0,
        })
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
    fn a_purge_leaves_no_deleted_value_in_the_file_and_everything_else_as_it_was() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.redb");
        let secret = b"a deleted secret that must not stay in the file".repeat(4);
        let s = EmbeddedStore::open(&path).unwrap();
        let mut t = Txn::default();
        t.put(Table::Meta, b"kept", b"kept value")
            .put(Table::Pool, b"gone", &secret);
        s.commit(t).unwrap();
        let mut t = Txn::default();
        t.delete(Table::Pool, b"gone");
        s.commit(t).unwrap();
        let holds = |p: &Path| {
            let bytes = std::fs::read(p).unwrap();
            bytes.windows(secret.len()).any(|w| w == secret.as_slice())
        };
        assert!(holds(&path), "the freed page keeps the bytes until a purge");
        let before = s.revision().unwrap();
        assert!(matches!(
            s.purge_deleted().unwrap(),
            Purged::Rewritten { .. }
        ));
        assert!(!holds(&path));
        assert_eq!(s.revision().unwrap(), before);
        assert_eq!(
            s.get(Table::Meta, b"kept").unwrap().unwrap().value,
            b"kept value"
        );
        assert!(s.get(Table::Pool, b"gone").unwrap().is_none());
        let mut t = Txn::default();
        t.put(Table::Meta, b"after", b"v");
        assert!(s.commit(t).unwrap().is_committed());
        drop(s);
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.get(Table::Meta, b"after").unwrap().unwrap().value, b"v");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no file left beside it"
        );
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
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.get(Table::Meta, b"k").unwrap().unwrap().value, b"v");
        assert_eq!(s.revision().unwrap(), 1);
    }
}
