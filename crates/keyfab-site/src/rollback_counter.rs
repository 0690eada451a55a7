//! Tier A of rollback detection: the site's state bound to a TPM 2.0 monotonic counter
//! (`site init --rollback-counter`, `keyfab_tpm`).
//!
//! The store keeps, in `meta/tpm_counter`, where the counter is, its authorization value
//! (wrapped by the custody's data-key wrapping, so only this site's keystore opens it)
//! and the counter value its state corresponds to. The custody holds a marker key, so
//! that removing that row from the store does not switch the check off.
//!
//! Advancing is two steps: the store records value + 1, then the TPM steps up to it. The
//! TPM only ever goes up; so a state whose recorded value is below the TPM's is an older
//! copy put back (a restored home), and one above the TPM's by more than the one step an
//! interrupted advance leaves is bound to another TPM, or to an older copy of the TPM's
//! own state. Either way the site latches `rollback_detected` (audited) with both values.
//! What escapes is what a copy taken after the last advance hands out again before the
//! next: the site advances when `site serve` or a `site provision` lot starts, and at
//! every export and checkpoint (docs/THREAT-MODEL.md, "Rollback").

use keyfab_audit::Event;
use keyfab_crypto::secret::Secret32;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_store::{Table, Txn, Versioned};
use keyfab_tpm::{Counter, CounterSpec, TpmError};
use serde::{Deserialize, Serialize};

/// The store row.
pub(crate) const ROW: &[u8] = b"tpm_counter";
/// The custody's marker: this site has a counter.
const MARKER: &str = "tpm-counter";

/// What the store keeps of the counter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Bound {
    /// Where it is (`CounterSpec`, canonical).
    spec: String,
    /// Its authorization value, wrapped by the custody.
    auth: serde_bytes::ByteBuf,
    /// The counter value the state corresponds to.
    value: u64,
    /// An advance recorded `value` and has not seen the TPM step to it yet: the one case
    /// where the TPM may be one behind.
    #[serde(default)]
    pending: bool,
}

fn auth_aad(spec: &CounterSpec) -> Vec<u8> {
    format!("keyfab-tpm-counter-auth-v1\0{:#010x}", spec.index()).into_bytes()
}

fn unavailable(e: TpmError) -> Error {
    Error::TpmUnavailable(e.to_string())
}

/// Binds a new site's state to a counter defined now at `spec`: the marker key, a
/// random authorization value, the counter, and the row. Refused for a store other nodes
/// share (a counter is one machine's).
pub fn init(node: &mut Node, spec: &CounterSpec) -> Result<u64> {
    if node.store.is_shared() {
        return Err(Error::InvalidInput(
            "--rollback-counter binds one machine's state to its TPM: it needs the embedded store"
                .into(),
        ));
    }
    let auth = Secret32::random(node.rng.as_ref());
    let (_, value) = Counter::define(spec, auth.expose()).map_err(|e| match e {
        TpmError::AlreadyDefined(_) => Error::InvalidInput(e.to_string()),
        e => unavailable(e),
    })?;
    let wrapped = node
        .custody
        .wrap_data_key(&auth, &auth_aad(spec), node.rng.as_ref())?;
    node.custody
        .generate_signing_key(MARKER, node.rng.as_ref())?;
    let bound = Bound {
        spec: spec.to_string(),
        auth: wrapped.into(),
        value,
        pending: false,
    };
    let mut txn = Txn::default();
    txn.require_absent(Table::Meta, ROW)
        .put(Table::Meta, ROW, &encode(&bound)?);
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::Conflict("the state changed meanwhile".into()));
    }
    Ok(value)
}

/// The counter, and the row as read; `None` for a site without one.
fn open(node: &Node) -> Result<Option<(Counter, Bound, Versioned)>> {
    let stored = node.store.get(Table::Meta, ROW)?;
    let Some(stored) = stored else {
        if node.custody.signer(MARKER).is_ok() {
            return Err(Error::TpmUnavailable(
                "this site was initialised with a TPM rollback counter, and its state no longer names it: the state was altered".into(),
            ));
        }
        return Ok(None);
    };
    let bound: Bound = decode(&stored.value)?;
    let spec: CounterSpec = bound
        .spec
        .parse()
        .map_err(|e: TpmError| Error::Corrupt(e.to_string()))?;
    let auth = node
        .custody
        .unwrap_data_key(&bound.auth, &auth_aad(&spec))?;
    let counter = Counter::open(&spec, auth.expose()).map_err(unavailable)?;
    Ok(Some((counter, bound, stored)))
}

/// Compares the TPM's value with the state's and latches the site `rollback_detected`
/// when they disagree (after completing an advance that stopped between its steps). A
/// site without a counter passes.
pub fn check(node: &Node) -> Result<()> {
    let Some((mut counter, bound, _)) = open(node)? else {
        return Ok(());
    };
    compare(node, &mut counter, &bound).map(|_| ())
}

/// [`check`] on a counter and row already read; `true` when it completed an advance
/// that had stopped between its steps (the row changed).
fn compare(node: &Node, counter: &mut Counter, bound: &Bound) -> Result<bool> {
    let tpm = counter.read().map_err(unavailable)?;
    let state = bound.value;
    if tpm == state {
        return Ok(false);
    }
    if bound.pending && tpm.checked_add(1) == Some(state) {
        // The last advance recorded its value and stopped before the TPM stepped.
        let stepped = counter.increment().map_err(unavailable)?;
        if stepped == state {
            settle(node)?;
            return Ok(true);
        }
    }
    let why = if tpm > state {
        format!("the TPM's rollback counter is at {tpm} and this state recorded {state}: the state is an older copy put back")
    } else {
        format!("the TPM's rollback counter is at {tpm} and this state recorded {state}: the TPM is not the one this state was bound to, or its own state was put back")
    };
    crate::latch::latch(node, crate::latch::Cause::RollbackDetected, &why)?;
    Err(Error::RollbackDetected(why))
}

/// Advances the counter: the state records the next value, then the TPM steps to it. A
/// site without a counter does nothing. Returns the new value.
pub fn advance(node: &Node) -> Result<Option<u64>> {
    let Some((mut counter, mut bound, mut stored)) = open(node)? else {
        return Ok(None);
    };
    if compare(node, &mut counter, &bound)? {
        stored = node
            .store
            .get(Table::Meta, ROW)?
            .ok_or_else(|| Error::Corrupt("the rollback counter's row went".into()))?;
        bound = decode(&stored.value)?;
    }
    bound.value = bound
        .value
        .checked_add(1)
        .ok_or_else(|| Error::TpmUnavailable("the counter is at its end".into()))?;
    bound.pending = true;
    let row = encode(&bound)?;
    // The value, in the state and in the log, in one commit (retried while a serving
    // site's batches move the log's head).
    let landed = crate::audit_log::record_at_trusted_time(
        node,
        |_| Event::RollbackCounterAdvanced { value: bound.value },
        |txn, _| {
            txn.require_unchanged(Table::Meta, ROW, Some(&stored))
                .put(Table::Meta, ROW, &row);
            Ok(true)
        },
    )?;
    if landed.is_none() {
        return Err(Error::Conflict(
            "the rollback counter advanced meanwhile; run the command again".into(),
        ));
    }
    let tpm = counter.increment().map_err(unavailable)?;
    if tpm != bound.value {
        // Someone else stepped it (its authorization is the site's alone), or it is not
        // the TPM this state was bound to.
        compare(node, &mut counter, &bound)?;
    }
    settle(node)?;
    Ok(Some(bound.value))
}

/// Marks the advance recorded in the row as done: the TPM stepped to its value.
fn settle(node: &Node) -> Result<()> {
    let Some(stored) = node.store.get(Table::Meta, ROW)? else {
        return Ok(());
    };
    let mut bound: Bound = decode(&stored.value)?;
    if !bound.pending {
        return Ok(());
    }
    bound.pending = false;
    let mut txn = Txn::default();
    txn.require_unchanged(Table::Meta, ROW, Some(&stored))
        .put(Table::Meta, ROW, &encode(&bound)?);
    // Lost to another advance: that one settles its own.
    node.store.commit(txn)?;
    Ok(())
}

/// The counter value this site's state corresponds to, if it has a counter.
pub fn recorded(node: &Node) -> Result<Option<u64>> {
    node.store
        .get(Table::Meta, ROW)?
        .map(|v| decode::<Bound>(&v.value).map(|b| b.value))
        .transpose()
}
