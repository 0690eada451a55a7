//! The store contract (`keyfab_store::Store`) on an etcd v3 cluster: what lets several
//! stateless keyfab nodes share one site's state.
//!
//! Which API for which job: [`EtcdStore::connect`] to a cluster (several endpoints, for
//! fail-over) under a key namespace; then the `Store` methods as for any backend.
//!
//! How the contract maps onto etcd (DESIGN.md invariants 4 and 5):
//! - a commit is one etcd `Txn`: every guard a `Compare` on the key's `mod_revision`
//!   (`create_revision = 0` for "absent"), every write an operation; it either applies
//!   whole or not at all, and is durable (raft, fsync) when it returns;
//! - revisions are etcd's own: store-wide, one per committed transaction, so a writer can
//!   predict the revision its commit gives a key, as with the embedded backend;
//! - reads are linearizable (etcd's default), never served from a member's stale copy;
//!   reads of many keys are pinned to one revision, so they come from one snapshot;
//! - no lease, lock or TTL decides anything.
//!
//! etcd bounds a transaction (128 operations and 1.5 MiB by default); a commit beyond
//! them is refused with an error, never split (which would break atomicity).
#![forbid(unsafe_code)]

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn as EtcdTxn, TxnOp};
use keyfab_store::{
    prefix_end, Guard, Outcome, Result, Store, StoreError, Table, Txn, Versioned, Write,
};
use std::sync::Mutex;

pub struct EtcdStore {
    runtime: tokio::runtime::Runtime,
    client: Mutex<etcd_client::Client>,
    /// Every key of this store starts with it: several sites may share one cluster.
    namespace: Vec<u8>,
}

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(format!("etcd: {e}"))
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port`), keeping this store's
    /// keys under `namespace`.
    pub fn connect(endpoints: &[String], namespace: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io)?;
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10));
        let client = runtime
            .block_on(etcd_client::Client::connect(endpoints, Some(options)))
            .map_err(io)?;
        Ok(Self {
            runtime,
            client: Mutex::new(client),
            namespace: format!("{namespace}/").into_bytes(),
        })
    }

    fn key(&self, table: Table, key: &[u8]) -> Vec<u8> {
        let mut k = self.namespace.clone();
        k.extend_from_slice(&table.full_key(key));
        k
    }

    /// The end of the range of keys that start with `start` (within this namespace).
    fn range_end(&self, start: &[u8]) -> Vec<u8> {
        prefix_end(start).unwrap_or_else(|| prefix_end(&self.namespace).unwrap_or(vec![0]))
    }

    fn client(&self) -> etcd_client::Client {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A stored key without the namespace and the table byte.
    fn strip<'a>(&self, key: &'a [u8]) -> &'a [u8] {
        key.get(self.namespace.len() + 1..).unwrap_or_default()
    }
}

fn versioned(kv: &etcd_client::KeyValue) -> Versioned {
    Versioned {
        value: kv.value().to_vec(),
        revision: kv.mod_revision().max(0) as u64,
    }
}

impl Store for EtcdStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Versioned>> {
        let mut c = self.client();
        let resp = self
            .runtime
            .block_on(c.get(self.key(table, key), None))
            .map_err(io)?;
        Ok(resp.kvs().first().map(versioned))
    }

    fn scan_from(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Versioned)>> {
        let wanted = self.key(table, prefix);
        let start = self.key(table, from.max(prefix));
        let mut options = GetOptions::new().with_range(self.range_end(&wanted));
        if limit < i64::MAX as usize {
            options = options.with_limit(limit as i64);
        }
        let mut c = self.client();
        let resp = self
            .runtime
            .block_on(c.get(start, Some(options)))
            .map_err(io)?;
        Ok(resp
            .kvs()
            .iter()
            .filter(|kv| kv.key().starts_with(&wanted))
            .take(limit)
            .map(|kv| (self.strip(kv.key()).to_vec(), versioned(kv)))
            .collect())
    }

    fn commit(&self, txn: Txn) -> Result<Outcome> {
        let compares: Vec<Compare> = txn
            .guards()
            .iter()
            .map(|g| match g {
                Guard::Absent(t, k) => {
                    Compare::create_revision(self.key(*t, k), CompareOp::Equal, 0)
                }
                Guard::AtRevision(t, k, r) => Compare::mod_revision(
                    self.key(*t, k),
                    CompareOp::Equal,
                    i64::try_from(*r).unwrap_or(i64::MAX),
                ),
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .writes()
            .iter()
            .map(|w| match w {
                Write::Put(t, k, v) => TxnOp::put(self.key(*t, k), v.clone(), None),
                Write::Delete(t, k) => TxnOp::delete(self.key(*t, k), None),
                Write::DeletePrefix(t, p) => {
                    let start = self.key(*t, p);
                    let end = self.range_end(&start);
                    TxnOp::delete(start, Some(DeleteOptions::new().with_range(end)))
                }
                Write::DeleteRange(t, a, b) => TxnOp::delete(
                    self.key(*t, a),
                    Some(DeleteOptions::new().with_range(self.key(*t, b))),
                ),
            })
            .collect();
        let request = EtcdTxn::new().when(compares).and_then(ops);
        let mut c = self.client();
        let resp = self.runtime.block_on(c.txn(request)).map_err(io)?;
        if !resp.succeeded() {
            return Ok(Outcome::Conflict);
        }
        let revision = resp.header().map_or(0, |h| h.revision()).max(0) as u64;
        Ok(Outcome::Committed(revision))
    }

    fn get_many(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Versioned>>> {
        // Every read at the revision of the first: one snapshot, as the contract says.
        let mut c = self.client();
        let mut at = None;
        let mut out = Vec::with_capacity(keys.len());
        for (table, key) in keys {
            let options = at.map(|r| GetOptions::new().with_revision(r));
            let resp = self
                .runtime
                .block_on(c.get(self.key(*table, key), options))
                .map_err(io)?;
            if at.is_none() {
                at = resp.header().map(|h| h.revision());
            }
            out.push(resp.kvs().first().map(versioned));
        }
        Ok(out)
    }

    fn revision(&self) -> Result<u64> {
        let mut c = self.client();
        let resp = self
            .runtime
            .block_on(c.get(
                self.namespace.clone(),
                Some(GetOptions::new().with_count_only()),
            ))
            .map_err(io)?;
        Ok(resp.header().map_or(0, |h| h.revision()).max(0) as u64)
    }
}
