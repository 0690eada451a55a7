//! The store contract as executable checks: every backend's tests run this one suite
//! against a fresh, empty store of that backend ("one suite, all backends"). Each check
//! panics with what broke.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test suite: a failed check stops the test, with what broke"
)]

use crate::{Outcome, Store, Table, Txn};

/// Runs every check against `store`, which must be empty.
pub fn run_all(store: &dyn Store) {
    guards_make_commits_all_or_nothing(store);
    range_guards_see_every_key_in_the_range(store);
    tables_do_not_see_each_other(store);
    scan_and_delete_prefix_and_range(store);
    revisions_are_store_wide_and_predictable(store);
    reads_of_many_keys_come_in_order(store);
    a_purge_keeps_what_is_live(store);
}

/// After a purge every live value, its revision and the next commit are as before; what
/// was deleted stays deleted.
fn a_purge_keeps_what_is_live(s: &dyn Store) {
    let mut t = Txn::default();
    t.put(Table::Pool, b"purge/kept", b"kept")
        .put(Table::Pool, b"purge/gone", b"gone");
    s.commit(t).unwrap();
    let mut t = Txn::default();
    t.delete(Table::Pool, b"purge/gone");
    s.commit(t).unwrap();
    let kept = s.get(Table::Pool, b"purge/kept").unwrap();
    let revision = s.revision().unwrap();
    s.purge_deleted().unwrap();
    assert_eq!(s.get(Table::Pool, b"purge/kept").unwrap(), kept);
    assert!(s.get(Table::Pool, b"purge/gone").unwrap().is_none());
    assert_eq!(s.revision().unwrap(), revision);
    let many = s
        .get_many(&[(Table::Pool, b"purge/kept"), (Table::Pool, b"purge/gone")])
        .unwrap();
    assert_eq!(many, vec![kept, None]);
    let mut t = Txn::default();
    t.put(Table::Pool, b"purge/after", b"v");
    assert!(s.commit(t).unwrap().is_committed());
}

fn guards_make_commits_all_or_nothing(s: &dyn Store) {
    let mut t = Txn::default();
    t.put(Table::Meta, b"a", b"1");
    let Ok(Outcome::Committed(r1)) = s.commit(t) else {
        panic!("a plain put did not commit")
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
    // Absence is a guard too.
    let mut first = Txn::default();
    first
        .require_absent(Table::Meta, b"once")
        .put(Table::Meta, b"once", b"1");
    assert!(s.commit(first).unwrap().is_committed());
    let mut second = Txn::default();
    second
        .require_absent(Table::Meta, b"once")
        .put(Table::Meta, b"once", b"2");
    assert_eq!(s.commit(second).unwrap(), Outcome::Conflict);
    let mut t = Txn::default();
    t.delete_prefix(Table::Meta, b"");
    s.commit(t).unwrap();
}

/// A range guard holds only while no key at all lies in `[start, end)`: the end is
/// excluded, keys just outside either bound and keys of other tables do not count.
fn range_guards_see_every_key_in_the_range(s: &dyn Store) {
    let mut t = Txn::default();
    t.put(Table::Devices, b"e/dev", b"record")
        .put(Table::Devices, b"e/dew", b"next device")
        .put(Table::Requests, b"e/dev\x00r-1", b"other table");
    assert!(s.commit(t).unwrap().is_committed());
    let guarded = |start: &[u8], end: &[u8]| {
        let mut t = Txn::default();
        t.require_absent_range(Table::Devices, start, end)
            .put(Table::Meta, b"range-probe", b"x");
        s.commit(t).unwrap()
    };
    assert_eq!(guarded(b"e/dev", b"e/dev\x01"), Outcome::Conflict);
    assert_eq!(guarded(b"e/de", b"e/dev\x00"), Outcome::Conflict);
    assert!(guarded(b"e/dev\x00", b"e/dev\x01").is_committed());
    assert!(guarded(b"e/dex", b"e/dey").is_committed());
    assert!(
        guarded(b"e/dev\x01", b"e/dew").is_committed(),
        "the end is excluded"
    );
    let mut t = Txn::default();
    t.put(Table::Devices, b"e/dev\x00r-2", b"refusal");
    assert!(s.commit(t).unwrap().is_committed());
    assert_eq!(guarded(b"e/dev\x00", b"e/dev\x01"), Outcome::Conflict);
    // A failed range guard wrote nothing.
    let mut t = Txn::default();
    t.require_absent_range(Table::Devices, b"e/", b"e0")
        .put(Table::Meta, b"never", b"x");
    assert_eq!(s.commit(t).unwrap(), Outcome::Conflict);
    assert!(s.get(Table::Meta, b"never").unwrap().is_none());
    for table in [Table::Devices, Table::Requests, Table::Meta] {
        let mut t = Txn::default();
        t.delete_prefix(table, b"");
        s.commit(t).unwrap();
    }
}

fn tables_do_not_see_each_other(s: &dyn Store) {
    let mut t = Txn::default();
    t.put(Table::Meta, b"k", b"meta")
        .put(Table::Pool, b"k", b"pool");
    s.commit(t).unwrap();
    assert_eq!(s.get(Table::Meta, b"k").unwrap().unwrap().value, b"meta");
    assert_eq!(s.get(Table::Pool, b"k").unwrap().unwrap().value, b"pool");
    assert_eq!(s.scan(Table::Meta, b"", 10).unwrap().len(), 1);
    let mut t = Txn::default();
    t.delete_prefix(Table::Meta, b"");
    s.commit(t).unwrap();
    assert!(s.get(Table::Meta, b"k").unwrap().is_none());
    assert!(s.get(Table::Pool, b"k").unwrap().is_some());
    let mut t = Txn::default();
    t.delete_prefix(Table::Pool, b"");
    s.commit(t).unwrap();
}

fn scan_and_delete_prefix_and_range(s: &dyn Store) {
    let mut t = Txn::default();
    for k in [&b"p/1"[..], b"p/2", b"p/3", b"q/1"] {
        t.put(Table::Pool, k, b"v");
    }
    // A key of bytes 0xff must not break prefix arithmetic.
    t.put(Table::Pool, &[0xff, 0xff], b"high");
    s.commit(t).unwrap();
    assert_eq!(s.scan(Table::Pool, b"p/", 10).unwrap().len(), 3);
    let page = |from: &[u8], limit| {
        s.scan_from(Table::Pool, b"p/", from, limit)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    };
    assert_eq!(page(b"p/2", 10), [b"p/2".to_vec(), b"p/3".to_vec()]);
    assert_eq!(page(b"p/2\0", 1), [b"p/3".to_vec()]);
    assert_eq!(page(b"a", 1), [b"p/1".to_vec()]);
    assert!(page(b"q", 10).is_empty());
    assert_eq!(s.scan(Table::Pool, &[0xff], 10).unwrap().len(), 1);
    let mut t = Txn::default();
    t.delete_range(Table::Pool, b"p/2", b"p/3");
    s.commit(t).unwrap();
    assert_eq!(s.scan(Table::Pool, b"p/", 10).unwrap().len(), 2);
    let mut t = Txn::default();
    t.delete_prefix(Table::Pool, b"p/");
    s.commit(t).unwrap();
    assert!(s.scan(Table::Pool, b"p/", 10).unwrap().is_empty());
    assert_eq!(s.scan(Table::Pool, b"q/", 10).unwrap().len(), 1);
    let mut t = Txn::default();
    t.delete_prefix(Table::Pool, b"");
    s.commit(t).unwrap();
    assert!(s.scan(Table::Pool, b"", 10).unwrap().is_empty());
}

/// One revision per commit, store-wide: a writer can guard a key with the revision its
/// own commit just before will give it (the committer's pipeline relies on it).
fn revisions_are_store_wide_and_predictable(s: &dyn Store) {
    let before = s.revision().unwrap();
    let mut t = Txn::default();
    t.put(Table::Counters, b"c", b"1");
    let Outcome::Committed(r) = s.commit(t).unwrap() else {
        panic!("no commit")
    };
    assert_eq!(r, before + 1);
    assert_eq!(s.revision().unwrap(), r);
    let mut next = Txn::default();
    next.require_revision(Table::Counters, b"c", Some(r))
        .put(Table::Counters, b"c", b"2");
    assert_eq!(s.commit(next).unwrap(), Outcome::Committed(r + 1));
    let mut t = Txn::default();
    t.delete(Table::Counters, b"c");
    s.commit(t).unwrap();
    assert!(s.get(Table::Counters, b"c").unwrap().is_none());
}

fn reads_of_many_keys_come_in_order(s: &dyn Store) {
    // 100 writes: within etcd's default of 128 operations per transaction.
    let mut t = Txn::default();
    for i in 0..100u32 {
        t.put(Table::Devices, &i.to_be_bytes(), &i.to_le_bytes());
    }
    s.commit(t).unwrap();
    let keys: Vec<[u8; 4]> = (0..200u32).rev().map(|i| i.to_be_bytes()).collect();
    let lookups: Vec<(Table, &[u8])> = keys.iter().map(|k| (Table::Devices, &k[..])).collect();
    let got = s.get_many(&lookups).unwrap();
    assert_eq!(got.len(), 200);
    for (i, v) in (0..200u32).rev().zip(got) {
        match v {
            Some(v) => assert_eq!(v.value, i.to_le_bytes(), "key {i}"),
            None => assert!(i >= 100, "key {i} missing"),
        }
    }
    let mut t = Txn::default();
    t.delete_prefix(Table::Devices, b"");
    s.commit(t).unwrap();
}
