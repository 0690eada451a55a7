//! The committer: the one thread that decides and records, batch by batch.
//!
//! Requests prepared by the crypto workers queue here. A batch is as many as one commit
//! takes; it is decided in order and committed as one transaction, and only then are its
//! answers sent.

use super::cohorts::Cohorts;
use super::{decide_batch, Carried, Job, Outcome, Reply};
use keyfab_node::{Error, Node, Result};
use keyfab_store::CommitLimits;
use std::sync::mpsc;

/// Most decisions one commit carries.
const MAX_BATCH: usize = 512;

/// How long a batch keeps being decided again while other nodes commit first. Nodes
/// busy at once conflict on most commits (each moves the log head the other's next
/// commit is guarded on); a batch retried this long has met a store that cannot make
/// progress, and its callers get `unavailable`.
const CONFLICT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest pause before a batch is decided again after a conflict. Two nodes that
/// both just lost would otherwise read and commit in step and collide again; a random
/// pause up to this lets one of them through first.
const CONFLICT_PAUSE_MAX_MICROS: u64 = 2_000;

/// How long a node with nothing to decide keeps its unused grants of quota before it
/// gives them back.
const IDLE_GIVE_BACK: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a batch waits before it is decided again when another live node holds the
/// quota it needs.
const QUOTA_HELD_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Replies of one batch, handed out only after its commit.
type Replies = Vec<(Reply, Result<Outcome>)>;

pub(super) fn committer(node: &Node, rx: &mpsc::Receiver<Job>, cohorts: &Cohorts) {
    cohorts.register_committer();
    // Waking each caller costs a system call; a dispatcher does it, so the committer —
    // the one serial step — moves on to the next batch at once.
    let (to_dispatch, dispatch) = mpsc::channel::<Replies>();
    let dispatcher = std::thread::Builder::new()
        .name("keyfab-replies".into())
        .spawn(move || {
            while let Ok(replies) = dispatch.recv() {
                for (reply, outcome) in replies {
                    reply.send(outcome);
                }
            }
        });
    let deliver = |replies: Replies| {
        // Awaiting tasks are woken right here (a runtime wakes many with one system
        // call); blocked threads by the dispatcher.
        let blocking: Replies = replies
            .into_iter()
            .filter_map(|(reply, outcome)| match reply {
                Reply::Async(_) => {
                    reply.send(outcome);
                    None
                }
                Reply::Blocking(_) => Some((reply, outcome)),
            })
            .collect();
        if blocking.is_empty() {
            return;
        }
        if let Err(mpsc::SendError(replies)) = to_dispatch.send(blocking) {
            for (reply, outcome) in replies {
                reply.send(outcome);
            }
        }
    };
    let limits = node.store.commit_limits();
    // On a shared store this engine appends to a chain of its own (see
    // `keyfab_audit::Record::chain`): other nodes' commits never move its head.
    let chain = node
        .store
        .is_shared()
        .then(|| crate::audit_log::new_chain_id(node.rng.as_ref()));
    let mut pending: Option<Job> = None;
    let mut carried: Option<Carried> = None;
    // Whether this node may hold grants of quota (see `reservations`).
    let mut holding = false;
    loop {
        let first = match pending.take() {
            Some(j) => j,
            None => match (&chain, holding) {
                // A node that goes quiet gives its unused grants back at once: another
                // node may be waiting for them.
                (Some(chain), true) => match rx.recv_timeout(IDLE_GIVE_BACK) {
                    Ok(j) => j,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = super::reservations::give_back_all(node, chain);
                        holding = false;
                        carried = None;
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
                _ => match rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                },
            },
        };
        holding = chain.is_some();
        cohorts.await_last_cohort(super::cohorts::MAX_WAIT);
        let batch = gather(first, rx, &mut pending, limits);
        let (senders, batch): (Vec<Reply>, Vec<Job>) = batch
            .into_iter()
            .filter_map(|mut j| j.reply.take().map(|r| (r, j)))
            .unzip();
        // While the site lends its store (`site serve`), a command that keeps losing
        // its commit to these batches holds them back for one attempt.
        let turn = node
            .store
            .writers_gate()
            .map(keyfab_store::WritersGate::turn);
        let decided = decide_and_commit(node, batch, &mut carried, &chain);
        drop(turn);
        let replies = match decided {
            // Only now, after the commit, may any answer leave.
            Ok(outcomes) => senders.into_iter().zip(outcomes).collect(),
            Err(e) => fail_all(senders, &e),
        };
        cohorts.committed();
        deliver(replies);
        keyfab_crypto::secret::scrub_stack();
    }
    drop(to_dispatch);
    if let Ok(h) = dispatcher {
        let _ = h.join();
    }
    if let Some(chain) = &chain {
        // What this node was granted and did not use is the other nodes' again at once
        // (otherwise after `RESERVATION_LIFE_SECS`).
        let _ = super::reservations::give_back_all(node, chain);
    }
}

/// A batch: `first` and what waits behind it, as much as one commit takes — one write
/// per decision, plus the audit row, the log head, the trusted time and each
/// entitlement's counters (etcd: 128 writes and 128 compares), never split. The first
/// request that does not fit is left in `pending` to lead the next batch.
fn gather(
    first: Job,
    rx: &mpsc::Receiver<Job>,
    pending: &mut Option<Job>,
    limits: CommitLimits,
) -> Vec<Job> {
    let mut entitlements = vec![first.req.entitlement.clone()];
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        let Ok(j) = rx.try_recv() else { break };
        let new_entitlement = !entitlements.contains(&j.req.entitlement);
        let ents = entitlements.len() + usize::from(new_entitlement);
        // Writes: one per decision, the audit row, head and time, and per entitlement
        // its counters or this node's reservation of them.
        let writes = batch.len() + 1 + 3 + ents;
        // Guards: head, time, two settings, per entitlement the counters and the
        // reservation, and — decided without a read — each device's key range (its
        // record and refusals) empty.
        let guards = 4 + 2 * ents + batch.len() + 1;
        if writes > limits.max_writes || guards > limits.max_guards {
            *pending = Some(j);
            break;
        }
        if new_entitlement {
            entitlements.push(j.req.entitlement.clone());
        }
        batch.push(j);
    }
    batch
}

/// Decides `batch` and commits it. A guard that fails means the state changed since it
/// was read — on a shared store, another node's commit — and nothing was written: the
/// batch is decided again from a fresh read, a few times, before it fails. A commit that
/// failed outright is not retried here (its outcome is unknown; the caller's retry with
/// the same request id reads what happened).
///
/// On a shared store the state a batch leaves is `carried` to the next one, so a batch
/// costs one commit (round trips to etcd are the cost there); the embedded store reads
/// it afresh each time, which costs nothing.
fn decide_and_commit(
    node: &Node,
    batch: Vec<Job>,
    carried: &mut Option<Carried>,
    chain: &Option<String>,
) -> Result<Vec<Result<Outcome>>> {
    // A command's engine on a serving site holds the site's own batches back after its
    // first conflict, until its batch lands.
    let mut held = false;
    let outcome = decide_until_committed(node, batch, carried, chain, &mut held);
    if held {
        node.store.release_writers();
    }
    outcome
}

fn decide_until_committed(
    node: &Node,
    mut batch: Vec<Job>,
    carried: &mut Option<Carried>,
    chain: &Option<String>,
    held: &mut bool,
) -> Result<Vec<Result<Outcome>>> {
    let shared = node.store.is_shared();
    // Others' commits can fail this batch's guards: a cluster's other nodes, or the
    // site's commands through `HOME/serve.sock`.
    let others = node.store.concurrent_writers();
    let started = std::time::Instant::now();
    for attempt in 0.. {
        if attempt > 0 && !*held {
            *held = node.store.hold_writers()?;
        }
        let again: Option<Vec<Job>> = others.then(|| batch.iter().map(Job::retry_copy).collect());
        // Optimistic only on state carried from a commit; after a conflict, read.
        let (mut st, optimistic) = match carried.take() {
            Some(st) => (st, true),
            None => (Carried::unread(chain.clone()), false),
        };
        let Some((txn, outcomes)) = decide_batch(node, &mut st, batch, optimistic)? else {
            // Another live node holds the quota this batch needs: it spends it, gives
            // it back, or stops being live; ask again in a moment.
            match again {
                Some(jobs) if started.elapsed() < CONFLICT_PATIENCE => batch = jobs,
                _ => break,
            }
            std::thread::sleep(QUOTA_HELD_PAUSE);
            continue;
        };
        if txn.writes_nothing() && outcomes.iter().all(Result::is_err) {
            // Refused whole without a record (a site that stopped itself): nothing to
            // commit, nothing answered that a guard must hold; the next batch reads the
            // state afresh. (A batch that answers anything still commits its guards.)
            return Ok(outcomes);
        }
        if let keyfab_store::Outcome::Committed(revision) = node.store.commit(txn)? {
            if shared {
                *carried = Some(st.committed(revision));
            }
            return Ok(outcomes);
        }
        match again {
            Some(jobs) if started.elapsed() < CONFLICT_PATIENCE => batch = jobs,
            _ => break,
        }
        // The first retry goes at once (the state carried was merely stale); later ones
        // after a random pause, so that two nodes that keep colliding fall out of step.
        if attempt > 0 {
            let mut r = [0u8; 8];
            node.rng.fill(&mut r);
            let pause = u64::from_le_bytes(r) % CONFLICT_PAUSE_MAX_MICROS;
            std::thread::sleep(std::time::Duration::from_micros(pause));
        }
    }
    Err(Error::Unavailable(
        "the site's state kept changing under this node (other nodes' or commands' commits)".into(),
    ))
}

fn fail_all(senders: Vec<Reply>, e: &Error) -> Replies {
    senders
        .into_iter()
        .map(|reply| (reply, Err(e.relay())))
        .collect()
}
