//! The embedded backend: one redb file, one write transaction per commit, fsync before
//! returning (redb's `Durability::Immediate`).
//!
//! Values are stored as `revision (u64 BE) ‖ value`; the store-wide revision lives under
//! a reserved key of its own table.

use crate::{Guard, Outcome, Result, Store, StoreError, Table, Txn, Versioned, Write};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

type Def = TableDefinition<'static, &'static [u8], &'static [u8]>;

const REVISION: Def = TableDefinition::new("__revision");

fn def(t: Table) -> Def {
    TableDefinition::new(t.name())
}

pub struct EmbeddedStore {
    db: Database,
}

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
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Busy,
            other => io(other),
        })?;
        // Create missing tables only: opening an existing store must not write to it, so
        // a refused operation leaves the file byte for byte as it was.
        let complete = {
            let r = db.begin_read().map_err(io)?;
            Table::ALL.iter().all(|t| r.open_table(def(*t)).is_ok())
                && r.open_table(REVISION).is_ok()
        };
        if !complete {
            let w = db.begin_write().map_err(io)?;
            for t in Table::ALL {
                w.open_table(def(t)).map_err(io)?;
            }
            w.open_table(REVISION).map_err(io)?;
            w.commit().map_err(io)?;
        }
        Ok(Self { db })
    }
}

fn guard_key(g: &Guard) -> (Table, &[u8], Option<u64>) {
    match g {
        Guard::Absent(t, k) => (*t, k, None),
        Guard::AtRevision(t, k, r) => (*t, k, Some(*r)),
    }
}

fn write_table(w: &Write) -> Table {
    match w {
        Write::Put(t, ..)
        | Write::Delete(t, _)
        | Write::DeletePrefix(t, _)
        | Write::DeleteRange(t, ..) => *t,
    }
}

impl Store for EmbeddedStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Versioned>> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(def(table)).map_err(io)?;
        match t.get(key).map_err(io)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn scan(&self, table: Table, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Versioned)>> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(def(table)).map_err(io)?;
        let mut out = Vec::new();
        for item in t.range(prefix..).map_err(io)? {
            let (k, v) = item.map_err(io)?;
            if !k.value().starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.value().to_vec(), decode(v.value())?));
        }
        Ok(out)
    }

    fn commit(&self, txn: Txn) -> Result<Outcome> {
        let mut w = self.db.begin_write().map_err(io)?;
        w.set_durability(redb::Durability::Immediate).map_err(io)?;
        // Each table is opened once per commit (opening is not free in redb); within a
        // table, guards and writes keep their order.
        for t in Table::ALL {
            let guards: Vec<_> = txn
                .guards
                .iter()
                .map(guard_key)
                .filter(|g| g.0 == t)
                .collect();
            if guards.is_empty() {
                continue;
            }
            let table = w.open_table(def(t)).map_err(io)?;
            for (_, key, want) in guards {
                let current = match table.get(key).map_err(io)? {
                    Some(v) => Some(decode(v.value())?.revision),
                    None => None,
                };
                if current != want {
                    drop(table);
                    w.abort().map_err(io)?;
                    return Ok(Outcome::Conflict);
                }
            }
        }
        let revision = {
            let mut rev_table = w.open_table(REVISION).map_err(io)?;
            let current = match rev_table.get(&b"rev"[..]).map_err(io)? {
                Some(v) => {
                    let b: [u8; 8] = v
                        .value()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("revision".into()))?;
                    u64::from_be_bytes(b)
                }
                None => 0,
            };
            let next = current + 1;
            rev_table
                .insert(&b"rev"[..], &next.to_be_bytes()[..])
                .map_err(io)?;
            next
        };
        let mut buf = Vec::new();
        for t in Table::ALL {
            let mut writes = txn.writes.iter().filter(|w| write_table(w) == t).peekable();
            if writes.peek().is_none() {
                continue;
            }
            let mut table = w.open_table(def(t)).map_err(io)?;
            for write in writes {
                match write {
                    Write::Put(_, k, v) => {
                        buf.clear();
                        buf.extend_from_slice(&revision.to_be_bytes());
                        buf.extend_from_slice(v);
                        table.insert(k.as_slice(), buf.as_slice()).map_err(io)?;
                    }
                    Write::Delete(_, k) => {
                        table.remove(k.as_slice()).map_err(io)?;
                    }
                    Write::DeletePrefix(_, p) => {
                        table
                            .retain_in(p.as_slice().., |k, _| !k.starts_with(p))
                            .map_err(io)?;
                    }
                    Write::DeleteRange(_, start, end) => {
                        table
                            .retain_in(start.as_slice()..end.as_slice(), |_, _| false)
                            .map_err(io)?;
                    }
                }
            }
        }
        w.commit().map_err(io)?;
        Ok(Outcome::Committed(revision))
    }

    fn get_many(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Versioned>>> {
        let r = self.db.begin_read().map_err(io)?;
        let mut out = Vec::with_capacity(keys.len());
        for (t, k) in keys {
            let table = r.open_table(def(*t)).map_err(io)?;
            out.push(match table.get(*k).map_err(io)? {
                Some(v) => Some(decode(v.value())?),
                None => None,
            });
        }
        Ok(out)
    }

    fn revision(&self) -> Result<u64> {
        let r = self.db.begin_read().map_err(io)?;
        let t = r.open_table(REVISION).map_err(io)?;
        Ok(match t.get(&b"rev"[..]).map_err(io)? {
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
    fn guards_make_commits_all_or_nothing() {
        let (_d, s) = store();
        let mut t = Txn::default();
        t.put(Table::Meta, b"a", b"1");
        let Outcome::Committed(r1) = s.commit(t).unwrap() else {
            panic!()
        };
        let seen = s.get(Table::Meta, b"a").unwrap();
        assert_eq!(seen.as_ref().unwrap().revision, r1);

        // A writer that read `a` at r1 wins; a second one holding the same stale read loses
        // and writes nothing at all.
        let mut ok = Txn::default();
        ok.require_unchanged(Table::Meta, b"a", seen.as_ref())
            .put(Table::Meta, b"a", b"2");
        assert!(s.commit(ok).unwrap().is_committed());
        let mut stale = Txn::default();
        stale
            .require_unchanged(Table::Meta, b"a", seen.as_ref())
            .put(Table::Meta, b"a", b"3")
            .put(Table::Meta, b"b", b"x");
        assert_eq!(s.commit(stale).unwrap(), Outcome::Conflict);
        assert_eq!(s.get(Table::Meta, b"a").unwrap().unwrap().value, b"2");
        assert!(s.get(Table::Meta, b"b").unwrap().is_none());
    }

    #[test]
    fn scan_and_delete_prefix() {
        let (_d, s) = store();
        let mut t = Txn::default();
        for k in [&b"p/1"[..], b"p/2", b"q/1"] {
            t.put(Table::Pool, k, b"v");
        }
        s.commit(t).unwrap();
        assert_eq!(s.scan(Table::Pool, b"p/", 10).unwrap().len(), 2);
        let mut t = Txn::default();
        t.delete_prefix(Table::Pool, b"p/");
        s.commit(t).unwrap();
        assert!(s.scan(Table::Pool, b"p/", 10).unwrap().is_empty());
        assert_eq!(s.scan(Table::Pool, b"q/", 10).unwrap().len(), 1);
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
