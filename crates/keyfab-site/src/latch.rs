//! The site's latch: once it knows its state is behind what HQ acknowledged (a restored
//! copy of its home) or its audit chain does not verify, it releases no key again.
//!
//! Detection happens where the evidence is — a file from HQ whose checkpoint the log no
//! longer holds, an export that finds its own range changed, `site audit verify` — and
//! each one latches: a `site_latched` record and a `meta/latched` row, in one commit.
//! Every key-releasing path reads the latch in the same transaction as its decision (the
//! committer's batch) and refuses while it is set, across restarts. A latched site still
//! exports its log, so HQ sees what happened; provisioning resumes only on a home HQ
//! provisions again (docs/OPERATIONS.md, "When the site stops itself").

use keyfab_audit::Event;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Versioned};
use serde::{Deserialize, Serialize};

/// Where the latch is kept (`meta`).
pub(crate) const LATCHED: &[u8] = b"latched";

/// Why the site stopped itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The state is behind, or differs from, a checkpoint HQ acknowledged.
    RollbackDetected,
    /// The audit chain does not verify.
    LogBroken,
}

impl Cause {
    /// The stable code a latched site answers with.
    pub fn code(self) -> &'static str {
        match self {
            Cause::RollbackDetected => "rollback_detected",
            Cause::LogBroken => "log_broken",
        }
    }
}

/// The latch as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latch {
    /// Why it latched.
    pub cause: Cause,
    /// What was found.
    pub reason: String,
    /// The site's trusted time when it latched.
    pub since: i64,
}

impl Latch {
    /// The refusal every key-releasing path answers while the latch is set.
    pub fn refusal(&self) -> Error {
        let why = format!(
            "this site stopped itself at {} and releases no key: {} (docs/OPERATIONS.md, \"When the site stops itself\")",
            keyfab_node::rfc3339(self.since),
            self.reason
        );
        match self.cause {
            Cause::RollbackDetected => Error::RollbackDetected(why),
            Cause::LogBroken => Error::LogBroken(why),
        }
    }

    pub(crate) fn from_stored(stored: Option<&Versioned>) -> Result<Option<Latch>> {
        stored.map(|v| decode(&v.value)).transpose()
    }
}

/// The latch, if the site is stopped.
pub fn latched(node: &Node) -> Result<Option<Latch>> {
    Latch::from_stored(node.store.get(Table::Meta, LATCHED)?.as_ref())
}

/// Refuses with the latch's error if the site is stopped.
pub fn check(node: &Node) -> Result<()> {
    match latched(node)? {
        Some(l) => Err(l.refusal()),
        None => Ok(()),
    }
}

/// Stops the site for `cause`, audited (`site_latched`), unless it is stopped already.
/// Recorded at the trusted time: a site that found its state rolled back must not need
/// its clock to pass a check to say so.
pub fn latch(node: &Node, cause: Cause, reason: &str) -> Result<()> {
    let landed = crate::audit_log::record_at_trusted_time(
        node,
        |_| Event::SiteLatched {
            code: cause.code().to_owned(),
            reason: reason.to_owned(),
        },
        |txn, since| {
            if node.store.get(Table::Meta, LATCHED)?.is_some() {
                return Ok(false);
            }
            let latch = Latch {
                cause,
                reason: reason.to_owned(),
                since,
            };
            txn.require_absent(Table::Meta, LATCHED)
                .put(Table::Meta, LATCHED, &encode(&latch)?);
            Ok(true)
        },
    )?;
    landed.ok_or_else(|| {
        Error::Conflict("site state kept changing while it tried to stop itself; try again".into())
    })
}

/// Latches the site for `cause` and returns the refusal it now answers.
fn stop(node: &Node, cause: Cause, reason: &str) -> Result<()> {
    latch(node, cause, reason)?;
    check(node)
}

/// What `site provision` checks before it decides, cheaply (a few reads, whatever the
/// log's length): the latch; that the log's stored head is its last stored record; that
/// the log holds at least the records HQ acknowledged. A mismatch latches the site.
pub fn check_cheaply(node: &Node) -> Result<()> {
    check(node)?;
    // Tier A: the TPM's counter against the state's (a site initialised with one).
    crate::rollback_counter::check(node)?;
    if let Some(why) = crate::audit_log::head_mismatch(node)? {
        return stop(
            node,
            Cause::LogBroken,
            &format!("the audit chain is broken: {why}"),
        );
    }
    if let Some(ack) = crate::checkpoints::acknowledged(node)? {
        let size = crate::audit_log::log_size(node)?;
        if size < ack.head.size {
            let why = format!(
                "HQ acknowledged {} audit records, this site has {size}: its state was restored from an older copy",
                ack.head.size
            );
            return stop(node, Cause::RollbackDetected, &why);
        }
    }
    Ok(())
}

/// What `site serve` checks before it serves: [`check_cheaply`], then the whole audit
/// chain, chain by chain, and — on a single node's own store — each entitlement's
/// counters against the records they summarise (an edited, truncated or partly
/// restored state latches the site).
pub fn check_on_start(node: &Node) -> Result<()> {
    check_cheaply(node)?;
    let records = crate::entitlements::audit_records(node)?;
    if let Err(e) = keyfab_audit::verify_merged(&records) {
        let reason = format!("the audit chain is broken: {e}");
        return stop(node, Cause::LogBroken, &reason);
    }
    // On a shared store the counters are the ledger of grants to nodes, not of devices.
    if !node.store.is_shared() {
        if let Some(why) = counters_mismatch(node, &records)? {
            let reason = format!("the site's state does not match its audit log: {why}");
            return stop(node, Cause::LogBroken, &reason);
        }
    }
    Ok(())
}

/// Where an entitlement's counters disagree with its `provision_allowed` records: the
/// devices allowed, the pool slots taken, the devices per day summed.
fn counters_mismatch(node: &Node, records: &[keyfab_audit::Record]) -> Result<Option<String>> {
    let mut allowed: std::collections::HashMap<&str, (u64, u64)> = Default::default();
    for r in records {
        if let Event::ProvisionAllowed {
            entitlement,
            pool_index,
            ..
        } = &r.event
        {
            let (devices, pool) = allowed.entry(entitlement.as_str()).or_default();
            *devices += 1;
            *pool += u64::from(pool_index.is_some());
        }
    }
    for (id, v) in node.store.scan(Table::Counters, b"", usize::MAX)? {
        let id = String::from_utf8_lossy(&id).into_owned();
        let c: crate::provision::Counters = decode(&v.value)?;
        let (devices, pool) = allowed.remove(id.as_str()).unwrap_or_default();
        let by_day: u64 = c.days.values().sum();
        if (c.total, c.next_pool, by_day) != (devices, pool, devices) {
            return Ok(Some(format!(
                "entitlement '{id}' counts {} devices ({by_day} by day) and {} pool slots taken; its audit records allow {devices}, {pool} from the pool",
                c.total, c.next_pool
            )));
        }
    }
    Ok(allowed.into_iter().next().map(|(id, (devices, _))| {
        format!("entitlement '{id}' has no counters; its audit records allow {devices} devices")
    }))
}
