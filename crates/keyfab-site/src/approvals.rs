//! Quorum approvals at the site: issue a request, accept approvals, activate.
//!
//! Thresholds count distinct approver keys (by fingerprint), only keys the signed policy
//! lists (thresholds count distinct listed keys). A submission is all or nothing: one bad approval refuses
//! the lot and nothing changes.

use crate::audit_log::Appender;
use crate::entitlements::EntitlementRecord;
use crate::provision::Counters;
use keyfab_audit::Event;
use keyfab_crypto::sign::VerifyingKey;
use keyfab_formats::approval::{verify_approval, ApprovalRequest, Reprovision};
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_policy::{Action, CompiledPolicy, Raise};
use keyfab_store::{Table, Txn};
use std::collections::BTreeSet;

fn request_key(nonce: &str) -> Vec<u8> {
    format!("approval-request/{nonce}").into_bytes()
}

fn entitlement(node: &Node, id: &str) -> Result<EntitlementRecord> {
    let v = node
        .store
        .get(Table::Entitlements, id.as_bytes())?
        .ok_or_else(|| Error::UnknownEntitlement(id.to_owned()))?;
    decode(&v.value)
}

fn approver_keys(record: &EntitlementRecord) -> Result<Vec<VerifyingKey>> {
    record
        .policy
        .approval
        .as_ref()
        .map(|a| {
            a.approver_keys
                .iter()
                .map(|p| Ok(VerifyingKey::from_pem(p)?))
                .collect()
        })
        .unwrap_or_else(|| Ok(Vec::new()))
}

/// What a request asks approvers to approve.
#[derive(Debug, Clone)]
pub enum Ask {
    /// Starting production under the entitlement.
    Activate,
    /// Raising its daily limit over a run of policy days.
    RaiseLimit(Raise),
    /// Giving a device that has its keys new ones, once: its earlier keys are burned.
    Reprovision(Reprovision),
}

impl Ask {
    fn action(&self) -> Action {
        match self {
            Ask::Activate => Action::Activate,
            Ask::RaiseLimit(_) => Action::RaiseLimit,
            Ask::Reprovision(_) => Action::Reprovision,
        }
    }
}

/// Issues an approval request for `ask` on an entitlement, valid for `ttl_secs`.
pub fn request(node: &Node, id: &str, ask: &Ask, ttl_secs: i64) -> Result<Vec<u8>> {
    let record = entitlement(node, id)?;
    let act = ask.action();
    if !record.policy.requires_approval(act) {
        return Err(Error::InvalidInput(format!(
            "the policy of {id} does not ask for approval of '{}'",
            act.as_str()
        )));
    }
    if ttl_secs < 60 {
        return Err(Error::InvalidInput(
            "an approval request must live at least a minute".into(),
        ));
    }
    let now = node.now().0;
    let counters = crate::provision::counters(node, id)?;
    let mut reprovision = None;
    let raise = match ask {
        Ask::Activate if counters.activated => {
            return Err(Error::Precondition(format!("{id} is already activated")));
        }
        Ask::Activate => None,
        Ask::Reprovision(r) => {
            let held = node.store.get(
                Table::Devices,
                &crate::provision::device_record_key(id, &r.device_id),
            )?;
            if !keyfab_policy::id_shape_ok(&r.device_id) || held.is_none() {
                return Err(Error::InvalidInput(format!(
                    "device '{}' holds no keys under {id}: only a provisioned device is re-provisioned",
                    r.device_id
                )));
            }
            if r.reason.as_ref().is_some_and(|t| {
                t.is_empty()
                    || t.len() > keyfab_formats::approval::MAX_REASON
                    || t.chars().any(char::is_control)
            }) {
                return Err(Error::InvalidInput(format!(
                    "--reason: 1 to {} characters, no control characters",
                    keyfab_formats::approval::MAX_REASON
                )));
            }
            reprovision = Some(r.clone());
            None
        }
        Ask::RaiseLimit(raise) => {
            let policy = CompiledPolicy::new(record.policy.clone())?;
            raise
                .check(&policy)
                .map_err(|e| Error::InvalidInput(format!("{}: {}", e.field, e.message)))?;
            let today = policy.day_of(now);
            if raise.to_day < today {
                return Err(Error::InvalidInput(format!(
                    "raise.to_day: {} has passed (today is {today} in {})",
                    raise.to_day, record.policy.timezone
                )));
            }
            Some(raise.clone())
        }
    };
    let mut nonce = [0u8; 16];
    node.rng.fill(&mut nonce);
    let req = ApprovalRequest {
        format: "keyfab-approval-request".into(),
        version: u32::from(keyfab_formats::approval::REQUEST_VERSION),
        site: node.name.clone(),
        entitlement: id.to_owned(),
        action: act.as_str().to_owned(),
        nonce: hex::encode(nonce),
        created_at: now,
        expires_at: now.saturating_add(ttl_secs),
        product: record.policy.product.clone(),
        devices: record.policy.devices,
        daily_limit: record.policy.daily_limit,
        valid_from: record.policy.valid_from,
        valid_until: record.policy.valid_until,
        stations: record.policy.allowed_stations.clone(),
        raise,
        reprovision,
    };
    // Signed by the site: the approver checks it up to the root before reading it.
    let file = req.to_file(node.service_signer()?, &node.service_chain()?)?;
    let mut txn = Txn::default();
    txn.put(Table::Meta, &request_key(&req.nonce), &file);
    node.store.commit(txn)?;
    Ok(file)
}

/// The outcome of a submission.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The entitlement.
    pub entitlement: String,
    /// The action approved.
    pub action: String,
    /// New approvers counted by this submission.
    pub accepted: usize,
    /// Distinct approvers counted so far, and the threshold.
    pub count: usize,
    /// How many it needs.
    pub threshold: u32,
    /// The entitlement is activated (the quorum for `activate` is met).
    pub activated: bool,
    /// The raise this submission put in force (the quorum for its request is met).
    pub raised: Option<Raise>,
    /// The device this submission allowed one more provisioning, its earlier keys
    /// burned (the quorum for its request is met).
    pub reprovisioned: Option<String>,
}

/// What approvals count towards: `activate` counts distinct approvers over any of the
/// entitlement's requests; an action with parameters counts them per request, so that
/// approvals of different raises never add up.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Tally {
    entitlement: String,
    action: String,
    /// The request's nonce, for actions counted per request.
    nonce: Option<String>,
}

impl Tally {
    fn of(req: &ApprovalRequest) -> Self {
        Tally {
            entitlement: req.entitlement.clone(),
            action: req.action.clone(),
            nonce: (req.action != Action::Activate.as_str()).then(|| req.nonce.clone()),
        }
    }

    /// Where its approvals are kept: one row per approver, under this prefix.
    fn prefix(&self) -> Vec<u8> {
        let mut p = format!("approval/{}/{}/", self.entitlement, self.action);
        if let Some(nonce) = &self.nonce {
            p.push_str(nonce);
            p.push('/');
        }
        p.into_bytes()
    }
}

/// Verifies every approval, then counts them in one transaction.
pub fn submit(node: &Node, files: &[Vec<u8>]) -> Result<Vec<Submitted>> {
    if files.is_empty() {
        return Err(Error::InvalidInput("no approval files given".into()));
    }
    let now = node.now().0;
    // Every key any imported policy lists: an approval is authenticated against these
    // before anything in it is read.
    let mut records = std::collections::BTreeMap::new();
    let mut all_keys = Vec::new();
    for (_, v) in node.store.scan(Table::Entitlements, b"", usize::MAX)? {
        let rec: EntitlementRecord = decode(&v.value)?;
        all_keys.extend(approver_keys(&rec)?);
        records.insert(rec.id.clone(), rec);
    }
    let mut verified = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let a = verify_approval(file, &all_keys)
            .map_err(|e| Error::ApprovalInvalid(format!("file {}: {e}", i + 1)))?;
        let req = &a.request;
        let rec = records.get(&req.entitlement).ok_or_else(|| {
            Error::ApprovalInvalid(format!("file {}: unknown entitlement", i + 1))
        })?;
        if !approver_keys(rec)?
            .iter()
            .any(|k| k.fingerprint() == a.approver)
        {
            return Err(Error::ApprovalInvalid(format!(
                "file {}: approver {} is not listed in the policy of {}",
                i + 1,
                a.approver,
                rec.id
            )));
        }
        let issued = node.store.get(Table::Meta, &request_key(&req.nonce))?;
        if req.site != node.name || issued.map(|v| v.value) != Some(a.request_file.clone()) {
            return Err(Error::ApprovalInvalid(format!(
                "file {}: approves a request this site did not issue (or one already satisfied)",
                i + 1
            )));
        }
        if now >= req.expires_at {
            return Err(Error::ApprovalInvalid(format!(
                "file {}: the request expired",
                i + 1
            )));
        }
        let detached = keyfab_formats::approval::detach(file)
            .map_err(|e| Error::ApprovalInvalid(format!("file {}: {e}", i + 1)))?;
        verified.push((a, detached));
    }

    // Read, decided and committed again while the serving site's batches move the head.
    let landed = crate::audit_log::until_landed(node, || {
        let mut txn = Txn::default();
        let mut log = Appender::begin(node, &mut txn)?;
        let mut results = Vec::new();
        let tallies: BTreeSet<Tally> = verified
            .iter()
            .map(|(a, _)| Tally::of(&a.request))
            .collect();
        for tally in tallies {
            let rec = &records[&tally.entitlement];
            let threshold = rec.policy.approval_threshold();
            let prefix = tally.prefix();
            // Approver → what is kept of the approval (per-request tallies: the
            // approval, detached).
            let mut approvers: std::collections::BTreeMap<String, Vec<u8>> = node
                .store
                .scan(Table::Meta, &prefix, usize::MAX)?
                .into_iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                        v.value,
                    )
                })
                .collect();
            let mut accepted = 0;
            for (a, detached) in verified
                .iter()
                .filter(|(a, _)| Tally::of(&a.request) == tally)
            {
                let fp = a.approver.to_hex();
                if approvers.contains_key(&fp) {
                    continue;
                }
                let kept = match tally.nonce {
                    Some(_) => detached.clone(),
                    None => a.request.nonce.as_bytes().to_vec(),
                };
                accepted += 1;
                let mut key = prefix.clone();
                key.extend_from_slice(fp.as_bytes());
                txn.require_absent(Table::Meta, &key)
                    .put(Table::Meta, &key, &kept);
                approvers.insert(fp.clone(), kept);
                log.append(
                    &mut txn,
                    now,
                    Event::ApprovalAccepted {
                        entitlement: tally.entitlement.clone(),
                        action: tally.action.clone(),
                        approver: fp,
                        nonce: a.request.nonce.clone(),
                    },
                )?;
            }
            let quorum = approvers.len() >= threshold as usize;
            let mut activated = false;
            let mut raised = None;
            let mut reprovisioned = None;
            if quorum {
                let seen = node
                    .store
                    .get(Table::Counters, tally.entitlement.as_bytes())?;
                let mut c: Counters = match &seen {
                    Some(v) => decode(&v.value)?,
                    None => Counters::default(),
                };
                let request = verified
                    .iter()
                    .map(|(a, _)| a)
                    .find(|a| Tally::of(&a.request) == tally);
                match (tally.action.as_str(), request) {
                    ("activate", _) => {
                        activated = true;
                        if !c.activated {
                            c.activated = true;
                            log.append(
                                &mut txn,
                                now,
                                Event::EntitlementActivated {
                                    entitlement: tally.entitlement.clone(),
                                },
                            )?;
                        }
                    }
                    ("raise-limit", Some(a)) => {
                        let raise = a.request.raise.clone().ok_or_else(|| {
                            Error::Bug("a raise-limit request without its raise".into())
                        })?;
                        log.append(&mut txn, now, quorum_event(&tally, a, &approvers))?;
                        c.raises.push(raise.clone());
                        raised = Some(raise);
                    }
                    ("reprovision", Some(a)) => {
                        let device = a
                            .request
                            .reprovision
                            .as_ref()
                            .ok_or_else(|| {
                                Error::Bug("a reprovision request without its device".into())
                            })?
                            .device_id
                            .clone();
                        // Its record goes, and with it the keys a retry could fetch: the
                        // next request for the device is decided as a first one.
                        let key = crate::provision::device_record_key(&tally.entitlement, &device);
                        let held = node.store.get(Table::Devices, &key)?;
                        if held.is_none() {
                            return Err(Error::Precondition(format!(
                                "device '{device}' holds no keys under {} any more (re-provisioned already?): nothing was changed",
                                tally.entitlement
                            )));
                        }
                        txn.require_unchanged(Table::Devices, &key, held.as_ref())
                            .delete(Table::Devices, &key);
                        log.append(&mut txn, now, quorum_event(&tally, a, &approvers))?;
                        reprovisioned = Some(device);
                    }
                    (other, _) => {
                        return Err(Error::Bug(format!("no way to carry out '{other}'")));
                    }
                }
                txn.require_unchanged(Table::Counters, tally.entitlement.as_bytes(), seen.as_ref())
                    .put(Table::Counters, tally.entitlement.as_bytes(), &encode(&c)?);
                // Satisfied: its requests cannot be used again.
                for (a, _) in verified
                    .iter()
                    .filter(|(a, _)| Tally::of(&a.request) == tally)
                {
                    txn.delete(Table::Meta, &request_key(&a.request.nonce));
                }
            }
            results.push(Submitted {
                entitlement: tally.entitlement,
                action: tally.action,
                accepted,
                count: approvers.len(),
                threshold,
                activated,
                raised,
                reprovisioned,
            });
        }
        log.finish(&mut txn);
        Ok(node.store.commit(txn)?.is_committed().then_some(results))
    })?;
    let results = landed
        .ok_or_else(|| Error::Conflict("site state changed meanwhile; submit again".into()))?;
    Ok(results)
}

/// The record of a request that reached its threshold: the request, and each approval
/// counted for it, detached (`approvers` maps each approver to it).
fn quorum_event(
    tally: &Tally,
    a: &keyfab_formats::approval::Approval,
    approvers: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Event {
    Event::QuorumApproved {
        entitlement: tally.entitlement.clone(),
        action: tally.action.clone(),
        nonce: a.request.nonce.clone(),
        request: serde_bytes::ByteBuf::from(a.request_file.clone()),
        approvals: approvers
            .values()
            .map(|d| serde_bytes::ByteBuf::from(d.clone()))
            .collect(),
    }
}
