//! The store contract (`keyfab_store::Store`) on an etcd v3 cluster: what lets several
//! stateless keyfab nodes share one site's state.
//!
//! Which API for which job: [`EtcdStore::connect`] to a cluster (several endpoints, for
//! fail-over) under a key namespace; then the `Store` methods as for any backend.
//!
//! How the contract maps onto etcd (idempotency by request id, ambiguous outcomes resolved by reading, linearizable state only):
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

use etcd_client::{
    CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, Txn as EtcdTxn, TxnOp,
};
use keyfab_store::{
    prefix_end, CommitLimits, Guard, Outcome, Purged, Result, Store, StoreError, Table, Txn,
    Versioned, Write,
};
use std::sync::Mutex;

/// How long a call may take, tries on other members included, before it fails (closed):
/// a cluster that lost its quorum answers nothing, and a station must hear so within
/// seconds.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);
/// How long one try at one member may take: a paused or partitioned member holds a call
/// this long before the next try goes to another member.
const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);
/// etcd 3.4's default bounds on one transaction: 128 operations (`--max-txn-ops`, for
/// the compares and the writes each) and
/// 1.5 MiB per request (`--max-request-bytes`); the byte bound is kept with room for the
/// namespace prefixes and framing.
const LIMITS: CommitLimits = CommitLimits {
    max_writes: 128,
    max_bytes: 1_200_000,
    max_guards: 128,
};

/// The store contract on an etcd v3 cluster: each commit is one etcd transaction whose
/// compares are the guards.
pub struct EtcdStore {
    /// The etcd client's own runtime, one thread: calls run there, and the caller waits
    /// on a channel — so the store is usable from any thread, a server's async workers
    /// included (a `block_on` there would panic).
    runtime: Option<tokio::runtime::Runtime>,
    members: Mutex<Members>,
    /// Every key of this store starts with it: several sites may share one cluster.
    namespace: Vec<u8>,
    /// Transactions sent with writes: consensus rounds.
    commits: std::sync::atomic::AtomicU64,
}

/// The members' client URLs and the one calls go to: calls stay with a member that
/// answers, and move to the next when it fails (a client that spread calls over all
/// members kept sending a share of them to a dead one).
struct Members {
    urls: Vec<String>,
    current: usize,
    client: Option<etcd_client::Client>,
    tls: Option<etcd_client::TlsOptions>,
}

/// TLS to the etcd members: the CA that signed their certificates, and this node's own
/// certificate and key when they ask for one. The key is the operator's file, read at
/// start; it is not a keyfab secret (it opens nothing but the connection).
#[derive(Clone)]
pub struct EtcdTls {
    /// The CA that issued the members' certificates (PEM).
    pub ca_pem: Vec<u8>,
    /// Certificate and private key (PEM).
    pub client: Option<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl EtcdTls {
    /// etcd-client's TLS options for these files: for a caller that talks to the
    /// members directly (a test harness asking for a member's status).
    pub fn options(&self) -> etcd_client::TlsOptions {
        let options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&self.ca_pem));
        match &self.client {
            Some((cert, key)) => {
                options.identity(etcd_client::Identity::from_pem(cert, key.as_slice()))
            }
            None => options,
        }
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Allowed on any thread, an async worker's included (dropping a runtime there
        // would panic).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(format!("etcd: {e}"))
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port`), keeping this store's
    /// keys under `namespace`.
    pub fn connect(endpoints: &[String], namespace: &str) -> Result<Self> {
        Self::connect_with(endpoints, namespace, None)
    }

    /// [`EtcdStore::connect`] over TLS (`https://` endpoints): the members' certificates
    /// checked against `tls.ca_pem`, and this node's client certificate presented when
    /// the members require one (`--client-cert-auth`).
    pub fn connect_with(
        endpoints: &[String],
        namespace: &str,
        tls: Option<&EtcdTls>,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keyfab-etcd")
            .enable_all()
            .build()
            .map_err(io)?;
        if endpoints.is_empty() {
            return Err(StoreError::Io("etcd: no endpoints".into()));
        }
        let store = Self {
            runtime: Some(runtime),
            members: Mutex::new(Members {
                urls: endpoints.to_vec(),
                current: 0,
                client: None,
                tls: tls.map(EtcdTls::options),
            }),
            namespace: format!("{namespace}/").into_bytes(),
            commits: std::sync::atomic::AtomicU64::new(0),
        };
        // Reach one member now, so a wrong address is reported here.
        let mut reached = Err(StoreError::Io("etcd: no member answered".into()));
        for _ in 0..endpoints.len() {
            match store.client() {
                Ok(_) => {
                    reached = Ok(());
                    break;
                }
                Err((which, e)) => {
                    store.failed(which);
                    reached = Err(e);
                }
            }
        }
        reached?;
        store.prefer_leader();
        Ok(store)
    }

    /// The client URL of the member calls go to now.
    pub fn member(&self) -> String {
        let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        m.urls[m.current].clone()
    }

    /// Sends calls to the leader, when the member reached knows it and it is one of
    /// `endpoints`: a write sent to a follower is forwarded to the leader, a hop that
    /// costs the members CPU on every commit. Best effort — without an answer, calls
    /// stay where they are; after a failover they go wherever answers.
    fn prefer_leader(&self) {
        let Ok((_, client)) = self.client() else {
            return;
        };
        let asked = self.run(async move {
            let (mut status, mut members) = (client.clone(), client);
            let leader = status.status().await?.leader();
            let list = members.member_list().await?;
            Ok::<_, etcd_client::Error>(
                list.members()
                    .iter()
                    .find(|m| m.id() == leader)
                    .map(|m| m.client_urls().to_vec())
                    .unwrap_or_default(),
            )
        });
        let Ok(Ok(leader_urls)) = asked else { return };
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let at = m.urls.iter().position(|u| {
            leader_urls
                .iter()
                .any(|l| l.trim_end_matches('/') == u.trim_end_matches('/'))
        });
        if let Some(at) = at {
            if at != m.current {
                m.current = at;
                m.client = None;
            }
        }
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

    /// The client of the member calls go to now (connected on first use), and which it is.
    fn client(&self) -> std::result::Result<(usize, etcd_client::Client), (usize, StoreError)> {
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let which = m.current;
        if let Some(c) = &m.client {
            return Ok((which, c.clone()));
        }
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(ATTEMPT_TIMEOUT)
            .with_timeout(ATTEMPT_TIMEOUT);
        if let Some(tls) = &m.tls {
            options = options.with_tls(tls.clone());
        }
        let url = m.urls[which].clone();
        let client = self
            .run(async move { etcd_client::Client::connect([url], Some(options)).await })
            .map_err(|e| (which, e))?
            .map_err(|e| (which, io(e)))?;
        m.client = Some(client.clone());
        Ok((which, client))
    }

    /// Runs `future` on the client's runtime and waits for it on this thread.
    fn run<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| StoreError::Io("etcd: the store is closed".into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv()
            .map_err(|_| StoreError::Io("etcd: the call was dropped".into()))
    }

    /// Member `which` failed a call: the next calls go to the next member.
    fn failed(&self, which: usize) {
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        if m.current == which {
            m.current = (which + 1) % m.urls.len();
            m.client = None;
        }
    }

    /// Runs one call, again on failure while [`REQUEST_TIMEOUT`] allows — but only where
    /// trying again cannot apply anything twice: a read (`may_repeat`), or a call that
    /// never left (the member it went to refused the connection; the client spreads
    /// calls over the members, so the next try goes to another). A commit that may have
    /// reached a member is never sent again: its outcome is unknown and the caller
    /// resolves it by reading.
    fn call<T, F, Fut>(&self, may_repeat: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>
            + Send
            + 'static,
    {
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
        let mut tries = 0usize;
        loop {
            tries += 1;
            let error = match self.client() {
                Ok((which, client)) => match self.run(f(client))? {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        // Whatever went wrong, the next call tries another member.
                        self.failed(which);
                        if !(may_repeat || never_sent(&e)) {
                            // A commit that may have reached a member: its outcome is
                            // unknown, and saying "nothing happened" would be a guess.
                            return Err(StoreError::Indeterminate(e.to_string()));
                        }
                        io(e)
                    }
                },
                // Not even connected: nothing was sent.
                Err((which, e)) => {
                    self.failed(which);
                    e
                }
            };
            // No try that could end after the deadline: a call fails within it.
            if std::time::Instant::now() + ATTEMPT_TIMEOUT > deadline {
                return Err(error);
            }
            // Every member tried once: wait a little before the next round (an election
            // takes about a second).
            let members = self.members.lock().map_or(1, |m| m.urls.len());
            if tries.is_multiple_of(members) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }

    /// A stored key without the namespace and the table byte.
    fn strip<'a>(&self, key: &'a [u8]) -> &'a [u8] {
        key.get(self.namespace.len() + 1..).unwrap_or_default()
    }
}

/// Whether a failed call certainly never reached a member: its connection was refused.
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect")
        }
        _ => false,
    }
}

fn versioned(kv: &etcd_client::KeyValue) -> Versioned {
    Versioned {
        value: kv.value().to_vec(),
        revision: kv.mod_revision().max(0) as u64,
    }
}

impl EtcdStore {
    /// [`Store::get_many`]: one transaction of reads per 128 keys (one round trip each),
    /// every read at the revision of the first: one snapshot, as the contract says.
    fn get_many_at_one_revision(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Versioned>>> {
        let mut at: Option<i64> = None;
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(LIMITS.max_writes) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(table, key)| {
                    TxnOp::get(
                        self.key(*table, key),
                        at.map(|r| GetOptions::new().with_revision(r)),
                    )
                })
                .collect();
            let resp = self.call(true, |mut c| {
                let request = EtcdTxn::new().and_then(ops.clone());
                async move { c.txn(request).await }
            })?;
            if at.is_none() {
                at = resp.header().map(|h| h.revision());
            }
            for r in resp.op_responses() {
                match r {
                    etcd_client::TxnOpResponse::Get(g) => out.push(g.kvs().first().map(versioned)),
                    _ => return Err(StoreError::Io("etcd: unexpected transaction answer".into())),
                }
            }
        }
        Ok(out)
    }
}

impl Store for EtcdStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Versioned>> {
        let key = self.key(table, key);
        let resp = self.call(true, |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
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
        let resp = self.call(true, |mut c| {
            let (start, options) = (start.clone(), options.clone());
            async move { c.get(start, Some(options)).await }
        })?;
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
                // etcd compares every key in the range; with none there, the zero
                // revision of an absent key.
                Guard::AbsentRange(t, start, end) => {
                    Compare::create_revision(self.key(*t, start), CompareOp::Equal, 0)
                        .with_range(self.key(*t, end))
                }
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
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let resp = self.call(false, |mut c| {
            let request = request.clone();
            async move { c.txn(request).await }
        })?;
        if !resp.succeeded() {
            return Ok(Outcome::Conflict);
        }
        let revision = resp.header().map_or(0, |h| h.revision()).max(0) as u64;
        Ok(Outcome::Committed(revision))
    }

    fn get_many(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Versioned>>> {
        // A compaction (`purge_deleted`, after a revocation) between two chunks removes
        // the revision the later ones read at: the snapshot is read again from the start.
        match self.get_many_at_one_revision(keys) {
            Err(e) if e.to_string().contains("compacted") => self.get_many_at_one_revision(keys),
            other => other,
        }
    }

    fn commit_limits(&self) -> CommitLimits {
        LIMITS
    }

    fn is_shared(&self) -> bool {
        true
    }

    /// Compacts etcd's history up to now (physically: the call returns once the members
    /// have dropped the old revisions), so a deleted value is no longer readable at an
    /// earlier revision. Each member's file keeps the freed pages until it is
    /// defragmented (`etcdctl defrag`), which blocks that member while it runs: left to
    /// the operator's maintenance window.
    fn purge_deleted(&self) -> Result<Purged> {
        let revision = i64::try_from(self.revision()?).unwrap_or(i64::MAX);
        let compacted = self.call(true, move |mut c| async move {
            c.compact(revision, Some(CompactionOptions::new().with_physical()))
                .await
        });
        match compacted {
            Ok(_) => Ok(Purged::Compacted {
                revision: revision as u64,
            }),
            // Another node compacted to here or beyond already.
            Err(e) if e.to_string().contains("compacted") => Ok(Purged::Compacted {
                revision: revision as u64,
            }),
            Err(e) => Err(e),
        }
    }

    fn commits_sent(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn revision(&self) -> Result<u64> {
        let resp = self.call(true, |mut c| {
            let key = self.namespace.clone();
            async move { c.get(key, Some(GetOptions::new().with_count_only())).await }
        })?;
        Ok(resp.header().map_or(0, |h| h.revision()).max(0) as u64)
    }
}
