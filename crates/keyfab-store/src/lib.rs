//! The store contract and its embedded backend.
//!
//! The contract is etcd's, so a clustered backend can implement it unchanged: a set of
//! tables of byte keys and byte values; every write commit bumps one store-wide
//! *revision*, and each key remembers the revision that last wrote it. A [`Txn`] carries
//! guards ("this key is still at revision r", or "absent") and writes; it commits
//! atomically and durably only if every guard holds, otherwise nothing is written and
//! the caller re-reads (ambiguous outcomes are resolved by reading).
//!
//! Which API for which job:
//! - open the node's store: [`EmbeddedStore::open`] (redb file, fsync on every commit);
//! - read: [`Store::get`], [`Store::scan`];
//! - write atomically with optimistic checks: [`Store::commit`].
//!
//! ```
//! use keyfab_store::{EmbeddedStore, Store, Table, Txn};
//! let dir = tempfile::tempdir().unwrap();
//! let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
//! let mut txn = Txn::default();
//! txn.require_absent(Table::Meta, b"site");
//! txn.put(Table::Meta, b"site", b"shenzhen-1");
//! assert!(store.commit(txn).unwrap().is_committed());
//! assert_eq!(store.get(Table::Meta, b"site").unwrap().unwrap().value, b"shenzhen-1");
//! ```
#![forbid(unsafe_code)]

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod embedded;
mod prefill;

pub use embedded::EmbeddedStore;

/// The logical tables. Each backend maps them to its own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Node identity, certificates, high-water marks.
    Meta,
    /// Imported entitlements, one record each.
    Entitlements,
    /// Encrypted pool key records, keyed by pool id ‖ key spec ‖ index.
    Pool,
    /// Imports in progress, so an interrupted one is cleaned up.
    Staging,
    /// The audit log.
    Audit,
    /// HQ: registered sites.
    Sites,
    /// HQ: entitlements issued.
    Issued,
    /// Site: per-entitlement counters (total, per day, next pool index).
    Counters,
    /// Site: one record per provisioned device, keyed by entitlement ‖ device id.
    Devices,
    /// Site: request ids seen, keyed by entitlement ‖ request id (idempotent retries).
    Requests,
}

/// The first key after every key that starts with `prefix`, if there is one (none when
/// the prefix is all 0xff bytes): the end of a prefix range.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl Table {
    /// The byte that keeps this table's keys apart from every other's in a backend's
    /// single key space.
    pub fn byte(self) -> u8 {
        Table::ALL.iter().position(|x| *x == self).unwrap_or(0xfe) as u8
    }

    /// `key` of this table in a backend's single key space: the table byte, then the key.
    pub fn full_key(self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(key.len() + 1);
        k.push(self.byte());
        k.extend_from_slice(key);
        k
    }

    /// Every table.
    pub const ALL: [Table; 10] = [
        Table::Meta,
        Table::Entitlements,
        Table::Pool,
        Table::Staging,
        Table::Audit,
        Table::Sites,
        Table::Issued,
        Table::Counters,
        Table::Devices,
        Table::Requests,
    ];
    /// The table's name, as the store keys it.
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Entitlements => "entitlements",
            Table::Pool => "pool",
            Table::Staging => "staging",
            Table::Audit => "audit",
            Table::Sites => "sites",
            Table::Issued => "issued",
            Table::Counters => "counters",
            Table::Devices => "devices",
            Table::Requests => "requests",
        }
    }
}

/// A value and the revision of the commit that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The value.
    pub value: Vec<u8>,
    /// The store-wide revision of the commit that wrote it.
    pub revision: u64,
}

/// A condition a transaction commits under (what a backend compares).
#[derive(Debug, Clone)]
pub enum Guard {
    /// The key is absent.
    Absent(Table, Vec<u8>),
    /// The key was last written at exactly this revision.
    AtRevision(Table, Vec<u8>, u64),
    /// No key in `[start, end)`: one guard over everything kept under a prefix.
    AbsentRange(Table, Vec<u8>, Vec<u8>),
}

/// One write of a transaction (what a backend applies).
#[derive(Debug, Clone)]
pub enum Write {
    /// Writes a value under a key.
    Put(Table, Vec<u8>, Vec<u8>),
    /// Removes a key.
    Delete(Table, Vec<u8>),
    /// Removes every key that starts with a prefix.
    DeletePrefix(Table, Vec<u8>),
    /// Keys in `start..end`.
    DeleteRange(Table, Vec<u8>, Vec<u8>),
}

/// An atomic, guarded set of writes.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    guards: Vec<Guard>,
    writes: Vec<Write>,
    /// Not fsync'd on its own: made durable by the next durable commit.
    lazy: bool,
    /// Bytes of keys and values written so far.
    bytes: usize,
}

impl Txn {
    /// Guards the commit on `key` being absent now.
    pub fn require_absent(&mut self, table: Table, key: &[u8]) -> &mut Self {
        self.guards.push(Guard::Absent(table, key.to_vec()));
        self
    }
    /// Requires no key in `[start, end)` — one guard where a store counts them (etcd
    /// takes 128 per commit) instead of one per key.
    pub fn require_absent_range(&mut self, table: Table, start: &[u8], end: &[u8]) -> &mut Self {
        self.guards
            .push(Guard::AbsentRange(table, start.to_vec(), end.to_vec()));
        self
    }
    /// Requires `key` unchanged since it was read as `seen` (absent if `None`).
    pub fn require_unchanged(
        &mut self,
        table: Table,
        key: &[u8],
        seen: Option<&Versioned>,
    ) -> &mut Self {
        self.guards.push(match seen {
            Some(v) => Guard::AtRevision(table, key.to_vec(), v.revision),
            None => Guard::Absent(table, key.to_vec()),
        });
        self
    }
    /// Requires `key` to have been last written at `revision` (absent if `None`): for a
    /// writer that knows which revision its own earlier, still uncommitted, transaction
    /// will give the key.
    pub fn require_revision(
        &mut self,
        table: Table,
        key: &[u8],
        revision: Option<u64>,
    ) -> &mut Self {
        self.guards.push(match revision {
            Some(r) => Guard::AtRevision(table, key.to_vec(), r),
            None => Guard::Absent(table, key.to_vec()),
        });
        self
    }
    /// Writes `value` under `key` if the commit's guards hold.
    pub fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> &mut Self {
        self.put_owned(table, key.to_vec(), value.to_vec())
    }
    /// Whether committing would write nothing (guards only): such a commit can be left
    /// out, and the store stays byte for byte as it was.
    pub fn writes_nothing(&self) -> bool {
        self.writes.is_empty()
    }
    /// [`Txn::put`] of buffers the caller no longer needs: large values are not copied.
    pub fn put_owned(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) -> &mut Self {
        self.bytes += key.len() + value.len();
        self.writes.push(Write::Put(table, key, value));
        self
    }

    /// Removes `key` if the commit's guards hold.
    pub fn delete(&mut self, table: Table, key: &[u8]) -> &mut Self {
        self.bytes += key.len();
        self.writes.push(Write::Delete(table, key.to_vec()));
        self
    }
    /// Removes every key starting with `prefix` if the commit's guards hold.
    pub fn delete_prefix(&mut self, table: Table, prefix: &[u8]) -> &mut Self {
        self.bytes += prefix.len();
        self.writes
            .push(Write::DeletePrefix(table, prefix.to_vec()));
        self
    }
    /// Deletes every key in `start..end`.
    pub fn delete_range(&mut self, table: Table, start: &[u8], end: &[u8]) -> &mut Self {
        self.bytes += start.len() + end.len();
        self.writes
            .push(Write::DeleteRange(table, start.to_vec(), end.to_vec()));
        self
    }
    /// Marks the transaction as needing no fsync of its own: for staging writes that no
    /// reader acts on until a later, durable commit makes them count (and makes them
    /// durable with it).
    pub fn non_durable(&mut self) -> &mut Self {
        self.lazy = true;
        self
    }
    /// Whether the transaction writes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
    /// The guards, for backends.
    pub fn guards(&self) -> &[Guard] {
        &self.guards
    }
    /// The writes in order, for backends.
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }
    /// Whether the transaction may skip its own fsync ([`Txn::non_durable`]).
    pub fn is_lazy(&self) -> bool {
        self.lazy
    }
    /// How many writes the transaction holds.
    pub fn len(&self) -> usize {
        self.writes.len()
    }
    /// Bytes of the keys and values written: what a backend's request size bound counts.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Whether `self` plus `writes` more writes of `bytes` more bytes stays within
    /// `limits`, with `reserve` writes kept for what the caller adds at the end.
    pub fn fits(&self, limits: CommitLimits, writes: usize, bytes: usize, reserve: usize) -> bool {
        self.len().saturating_add(writes).saturating_add(reserve) <= limits.max_writes
            && self.bytes().saturating_add(bytes) <= limits.max_bytes
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Durable at this revision.
    Committed(u64),
    /// A guard failed; nothing was written.
    Conflict,
}

impl Outcome {
    /// Whether the commit landed.
    pub fn is_committed(self) -> bool {
        matches!(self, Outcome::Committed(_))
    }
}

/// Why a store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached, or failed to read or write.
    #[error("store I/O failed: {0}")]
    Io(String),
    /// What the store holds does not read back.
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    /// The store is open in another process.
    #[error("store is in use by another keyfab process")]
    Busy,
    /// A commit was sent and no answer came back (a timeout, a member lost mid-call, a
    /// process paused past its deadline): it may have been applied or not. Only reading
    /// tells which.
    #[error("the store did not confirm the commit: {0}")]
    Indeterminate(String),
}

/// A store operation's result.
pub type Result<T> = std::result::Result<T, StoreError>;

/// How much one commit may carry. The embedded store takes any size; etcd refuses a
/// transaction over its bounds (128 operations and 1.5 MiB by default), and a caller
/// must not split an atomic step to fit — so callers that write in bulk (imports, group
/// commit) size their batches by these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitLimits {
    /// Most writes (puts and deletes) in one commit.
    pub max_writes: usize,
    /// Most bytes of keys and values in one commit.
    pub max_bytes: usize,
    /// Most guards (compares) in one commit.
    pub max_guards: usize,
}

impl CommitLimits {
    /// No limit: what an embedded store takes.
    pub const UNBOUNDED: CommitLimits = CommitLimits {
        max_writes: usize::MAX,
        max_bytes: usize::MAX,
        max_guards: usize::MAX,
    };
}

/// The contract every backend keeps. Reads are linearizable; commits are atomic and
/// durable before they return `Committed`.
pub trait Store: Send + Sync {
    /// The value of `key` and the revision that wrote it, if present.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Versioned>>;
    /// All entries whose key starts with `prefix`, in key order, at most `limit`.
    fn scan(&self, table: Table, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Versioned)>> {
        self.scan_from(table, prefix, prefix, limit)
    }
    /// The entries whose key starts with `prefix` and is not before `from`, in key
    /// order, at most `limit`: reading a large table page by page keeps only one page
    /// in memory.
    fn scan_from(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Versioned)>>;
    /// Applies `txn` atomically if all its guards hold, durably before it returns.
    fn commit(&self, txn: Txn) -> Result<Outcome>;
    /// Several reads from one consistent snapshot, in order.
    fn get_many(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Versioned>>> {
        keys.iter().map(|(t, k)| self.get(*t, k)).collect()
    }
    /// The revision of the last commit.
    fn revision(&self) -> Result<u64>;
    /// The most one commit may carry.
    fn commit_limits(&self) -> CommitLimits {
        CommitLimits::UNBOUNDED
    }
    /// Commits sent so far by this handle, conflicts included: for a replicated store,
    /// its consensus rounds (what `keyfab bench provision --store etcd` reports per
    /// device). Not counted by stores where it means nothing.
    fn commits_sent(&self) -> u64 {
        0
    }
    /// Whether other processes commit to this store too (several nodes of a cluster), so
    /// a guard may fail because of them, not only because of a bug or a crash.
    fn is_shared(&self) -> bool {
        false
    }
    /// Whether a commit this handle did not make may land between its reads and its
    /// commit: several cluster nodes, or one node's embedded store that other processes
    /// of the same site also write through it ([`Hosted`]). A writer that finds a guard
    /// failed then reads again and retries, instead of taking it for damage.
    fn concurrent_writers(&self) -> bool {
        self.is_shared()
    }
    /// For a store lent by another process ([`Hosted`], reached through its socket):
    /// asks the lending process to hold its own writers back until
    /// [`Store::release_writers`], so a command whose commit keeps losing to a busy line
    /// lands on its next try. `false` where nothing can be held (a cluster's nodes are
    /// not held; they retry).
    fn hold_writers(&self) -> Result<bool> {
        Ok(false)
    }
    /// Ends what [`Store::hold_writers`] began.
    fn release_writers(&self) {}
    /// The gate this process's own writers take turns at, when it lends the store
    /// ([`Hosted`]).
    fn writers_gate(&self) -> Option<&WritersGate> {
        None
    }
    /// Removes from the store's medium what deleted values it can still reach, after a
    /// commit that destroyed key material (a revocation, a batch CA key's end): a B-tree
    /// frees a deleted value's page but leaves its bytes there until the page is reused.
    /// Returns what the backend did, for the operator.
    fn purge_deleted(&self) -> Result<Purged> {
        Ok(Purged::NotNeeded)
    }
}

/// What [`Store::purge_deleted`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purged {
    /// The live rows were copied into a new file that replaced the old one, and the old
    /// file was overwritten with zeros before it was let go: this many bytes.
    Rewritten {
        /// The size of the file overwritten.
        bytes: u64,
    },
    /// The replicated store's history was compacted up to this revision: a deleted value
    /// can no longer be read at an earlier one.
    Compacted {
        /// The revision compacted to.
        revision: u64,
    },
    /// The backend keeps no deleted value (an in-memory store).
    NotNeeded,
}

/// A store this process hosts for other processes of the same node (`site serve` lends
/// its embedded store to the site's commands through `HOME/serve.sock`): the same store,
/// whose users learn from [`Store::concurrent_writers`] that commits they did not make
/// land between their reads and their commits.
pub struct Hosted {
    store: Box<dyn Store>,
    gate: WritersGate,
}

impl Hosted {
    /// `store`, lent from now on.
    pub fn new(store: Box<dyn Store>) -> Self {
        Self {
            store,
            gate: WritersGate::default(),
        }
    }
}

/// Where a lending process's own busy writer (the site's committer) and a borrowing
/// command take turns: the writer takes a shared [`WritersGate::turn`] for each
/// read-decide-commit round; a command that lost its commit to those rounds holds the
/// gate ([`WritersGate::hold`]) for one more attempt, which then lands — the line waits
/// for that one attempt, never longer than the holder's bound.
#[derive(Default)]
pub struct WritersGate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    /// Rounds under way.
    sharing: usize,
    /// Holders waiting for the rounds under way to end: no new round starts.
    waiting: usize,
    /// Held: no round starts.
    held: bool,
    /// Rounds waiting to start.
    rounds_waiting: usize,
    /// Whether a round started since the last release: until one has (when one waits),
    /// no new hold is granted, so holds one after another cannot stop the line.
    round_since_release: bool,
}

/// A writer's round at the gate; over when dropped.
pub struct Turn<'a>(&'a WritersGate);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.sharing -= 1;
        drop(s);
        self.0.changed.notify_all();
    }
}

impl WritersGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A round for the lending process's writer: waits while the gate is held, or
    /// about to be.
    pub fn turn(&self) -> Turn<'_> {
        let mut s = self.lock();
        s.rounds_waiting += 1;
        // A holder waiting lets one round through after each release.
        while s.held || (s.waiting > 0 && s.round_since_release) {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.rounds_waiting -= 1;
        s.round_since_release = true;
        s.sharing += 1;
        Turn(self)
    }

    /// Holds the gate once the rounds under way are over (and no one else holds it);
    /// `false` if that took longer than `patience`.
    pub fn hold(&self, patience: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + patience;
        let mut s = self.lock();
        s.waiting += 1;
        while s.held || s.sharing > 0 || (s.rounds_waiting > 0 && !s.round_since_release) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.waiting -= 1;
                drop(s);
                self.changed.notify_all();
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        s.waiting -= 1;
        s.held = true;
        true
    }

    /// Lets the writer's rounds go on.
    pub fn release(&self) {
        let mut s = self.lock();
        s.held = false;
        s.round_since_release = false;
        drop(s);
        self.changed.notify_all();
    }
}

impl Store for Hosted {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Versioned>> {
        self.store.get(table, key)
    }
    fn scan_from(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Versioned)>> {
        self.store.scan_from(table, prefix, from, limit)
    }
    fn commit(&self, txn: Txn) -> Result<Outcome> {
        self.store.commit(txn)
    }
    fn get_many(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Versioned>>> {
        self.store.get_many(keys)
    }
    fn revision(&self) -> Result<u64> {
        self.store.revision()
    }
    fn commit_limits(&self) -> CommitLimits {
        self.store.commit_limits()
    }
    fn commits_sent(&self) -> u64 {
        self.store.commits_sent()
    }
    fn is_shared(&self) -> bool {
        self.store.is_shared()
    }
    fn concurrent_writers(&self) -> bool {
        true
    }
    fn purge_deleted(&self) -> Result<Purged> {
        self.store.purge_deleted()
    }
    fn writers_gate(&self) -> Option<&WritersGate> {
        Some(&self.gate)
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn a_hold_waits_for_the_round_under_way_and_stops_new_ones() {
        let gate = WritersGate::default();
        let round = gate.turn();
        // Held only once the round under way is over.
        assert!(!gate.hold(Duration::from_millis(20)));
        drop(round);
        assert!(gate.hold(Duration::from_millis(20)));
        let started = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _round = gate.turn();
                started.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!started.load(Ordering::SeqCst), "a round began while held");
            gate.release();
        });
        assert!(started.load(Ordering::SeqCst));
    }

    #[test]
    fn holds_one_after_another_let_a_waiting_round_through_between_them() {
        let gate = WritersGate::default();
        let rounds = std::sync::atomic::AtomicUsize::new(0);
        assert!(gate.hold(Duration::from_millis(20)));
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _round = gate.turn();
                rounds.fetch_add(1, Ordering::SeqCst);
            });
            // The round is waiting now.
            std::thread::sleep(Duration::from_millis(50));
            gate.release();
            // The next hold comes only after that round.
            assert!(gate.hold(Duration::from_secs(5)));
            assert_eq!(rounds.load(Ordering::SeqCst), 1);
            gate.release();
        });
    }
}
