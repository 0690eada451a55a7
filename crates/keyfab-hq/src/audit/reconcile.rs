//! Reconciling a site's log: each record replayed against what HQ issued — the policy's
//! decision on HQ's own counters, pool slots against HQ's keys, approvals, revocations,
//! confirmations, clock resets — and every disagreement a violation.

use super::*;
use crate::device_index::DeviceIndex;
use crate::entitlement::{issued_key, IssuedRecord};
use keyfab_formats::attestation::ChipSeen;
use keyfab_policy::{CompiledPolicy, Decision, DenyCode, EntitlementState};

/// Whether `code` names a refusal of the `[chips]` rules.
fn is_chip_code(code: &str) -> bool {
    [
        DenyCode::ChipUntrusted,
        DenyCode::ChipKeyMismatch,
        DenyCode::ChipBindingMismatch,
    ]
    .iter()
    .any(|c| c.code().as_str() == code)
}

/// A release's chip as HQ judges it again: the recorded chain against the roots of the
/// policy HQ signed, with the transport key the site recorded and the key of the CSR the
/// device keys were certified for.
fn chip_seen(
    policy: &keyfab_policy::Policy,
    attested: Option<&super::attested::Attestation>,
    keys: &[keyfab_audit::AuditedKey],
) -> ChipSeen {
    let Some(a) = attested else {
        return ChipSeen::Absent;
    };
    let csr_key = policy
        .keys
        .iter()
        .zip(keys)
        .find(|(spec, _)| spec.source == keyfab_policy::KeySource::Device)
        .map(|(_, k)| k.key_id.clone());
    keyfab_formats::attestation::judge(
        policy.chips.as_ref(),
        Some(&a.chain),
        a.transport_key.clone(),
        csr_key,
    )
}

/// What reconciliation needs of one entitlement, looked up once per import.
pub(super) struct Issued {
    pub(super) record: IssuedRecord,
    pub(super) policy: CompiledPolicy,
    /// Indexes of the policy's `hq-pool` key specs.
    pub(super) pool_specs: Vec<usize>,
    /// The policy module, compiled once for the replay.
    pub(super) code: Option<keyfab_policy_code::PolicyModule>,
}

/// A decision as the site's log records it.
pub(super) enum Recorded<'a> {
    /// Released, with the chip attestation recorded before it, if any.
    Allowed {
        chip: Option<super::attested::Attestation>,
    },
    /// Refused with `code`; `reason` is the policy module's, when it refused.
    Denied {
        code: &'a String,
        reason: Option<&'a String>,
    },
}

/// A decision as the site recorded it: for what, from where, when.
pub(super) struct Decided<'a> {
    pub(super) entitlement: &'a str,
    pub(super) device_id: &'a str,
    pub(super) station: Option<&'a str>,
    pub(super) time: i64,
}

impl<'a> Decided<'a> {
    fn new(
        entitlement: &'a str,
        device_id: &'a str,
        station: &'a Option<String>,
        time: i64,
    ) -> Self {
        Decided {
            entitlement,
            device_id,
            station: station.as_deref(),
            time,
        }
    }
}

pub(super) struct Reconciler<'a> {
    pub(super) node: &'a Node,
    pub(super) site: String,
    pub(super) log: &'a mut SiteLog,
    /// The place in the site's log of the record being reconciled.
    pub(super) position: u64,
    /// Each chain's latest record time (`None`: the site chain). Time runs forward
    /// within a chain; nodes' clocks differ a little, so not across chains.
    pub(super) last_times: HashMap<Option<String>, i64>,
    /// Entitlements HQ issued to this site (`None`: not issued, or to another site).
    pub(super) issued: HashMap<String, Option<Arc<Issued>>>,
    /// The devices released before, by earlier imports or earlier in this one.
    pub(super) devices: DeviceIndex,
    /// The last pool-key id row read, by chunk: releases walk a chunk in order.
    pub(super) pool_row: Option<((String, u64), Vec<u8>)>,
    /// The last calendar day computed, and for which entitlement.
    pub(super) last_day: Option<(Arc<Issued>, keyfab_policy::DaySpan)>,
    pub(super) replicas: BTreeMap<String, Replica>,
    pub(super) violations: Vec<Violation>,
    /// The clock resets HQ issued to this site, read when the log first carries one.
    pub(super) clock_resets: Option<Vec<crate::sites::ClockResetIssued>>,
    /// The chip attestations waiting for the release they precede.
    pub(super) attested: super::attested::Attestations,
}

impl<'a> Reconciler<'a> {
    fn clock_resets(&mut self) -> Result<&[crate::sites::ClockResetIssued]> {
        if self.clock_resets.is_none() {
            let (site, _) = crate::sites::get_site(self.node, &self.site)?;
            self.clock_resets = Some(site.clock_resets);
        }
        Ok(self.clock_resets.as_deref().unwrap_or_default())
    }

    pub(super) fn new(node: &'a Node, site: &str, log: &'a mut SiteLog) -> Self {
        let heads = Heads::of(log);
        let mut last_times: HashMap<Option<String>, i64> = heads
            .chains
            .into_iter()
            .map(|(id, h)| (Some(id), h.time))
            .collect();
        last_times.insert(None, heads.site.time);
        Self {
            node,
            site: site.to_owned(),
            log,
            position: 0,
            last_times,
            issued: HashMap::new(),
            devices: DeviceIndex::default(),
            pool_row: None,
            last_day: None,
            replicas: BTreeMap::new(),
            violations: Vec::new(),
            clock_resets: None,
            attested: Default::default(),
        }
    }

    fn violation(
        &mut self,
        entitlement: Option<&str>,
        device: Option<&str>,
        kind: ViolationKind,
        detail: String,
    ) {
        if let Some(e) = entitlement {
            if let Some(rep) = self.replicas.get_mut(e) {
                rep.violations += 1;
            }
        }
        self.violations.push(Violation {
            site: self.site.clone(),
            sequence: self.position,
            entitlement: entitlement.map(str::to_owned),
            device_id: device.map(str::to_owned),
            kind,
            detail,
        });
    }

    /// The entitlement as HQ issued it to this site, if it did.
    fn issued(&mut self, id: &str) -> Result<Option<Arc<Issued>>> {
        if let Some(found) = self.issued.get(id) {
            return Ok(found.clone());
        }
        let found = match self.node.store.get(Table::Issued, &issued_key(id))? {
            Some(v) => {
                let record: IssuedRecord = decode(&v.value)?;
                if record.site == self.site {
                    let policy = CompiledPolicy::new(record.policy.clone())?;
                    let pool_specs = record
                        .policy
                        .keys
                        .iter()
                        .enumerate()
                        .filter(|(_, k)| k.source == keyfab_policy::KeySource::HqPool)
                        .map(|(i, _)| i)
                        .collect();
                    let code = record
                        .policy
                        .code
                        .as_ref()
                        .map(keyfab_policy_code::load_embedded)
                        .transpose()
                        .map_err(|e| {
                            keyfab_policy::PolicyError::new("code.module", e.to_string())
                        })?;
                    Some(Arc::new(Issued {
                        record,
                        policy,
                        pool_specs,
                        code,
                    }))
                } else {
                    None
                }
            }
            None => None,
        };
        self.issued.insert(id.to_owned(), found.clone());
        Ok(found)
    }

    /// The calendar day of `time` under `issued`'s policy.
    fn day_of(&mut self, issued: &Arc<Issued>, time: i64) -> String {
        if let Some((policy, span)) = &self.last_day {
            if Arc::ptr_eq(policy, issued) && span.contains(time) {
                return span.day.clone();
            }
        }
        let span = issued.policy.day_span(time);
        let day = span.day.clone();
        self.last_day = Some((issued.clone(), span));
        day
    }

    fn replica(&mut self, id: &str) -> Result<&mut Replica> {
        if !self.replicas.contains_key(id) {
            let stored = self
                .node
                .store
                .get(Table::Audit, &replica_key(&self.site, id))?;
            let r = stored
                .map(|v| decode(&v.value))
                .transpose()?
                .unwrap_or_default();
            self.replicas.insert(id.to_owned(), r);
        }
        self.replicas
            .get_mut(id)
            .ok_or_else(|| Error::Bug("replica".into()))
    }

    /// Loads, in one snapshot, what the index knows of the devices of `records`.
    pub(super) fn prefetch(&mut self, records: &[Record]) -> Result<()> {
        let devices = records.iter().filter_map(device_of);
        self.devices.load(self.node.store.as_ref(), devices)
    }

    /// Adds the device index rows changed since they were last written to `txn`, when
    /// enough have changed, or with `all`.
    pub(super) fn stage_new_devices(&mut self, txn: &mut Txn, all: bool) {
        self.devices.stage(txn, all);
    }

    pub(super) fn record(&mut self, r: &Record) -> Result<()> {
        self.check_time(r);
        let paired = self.attested.next(r);
        self.unreleased_attestation(paired.unreleased);
        match &r.event {
            Event::ChipAttested { .. } => {}
            Event::ProvisionAllowed {
                entitlement,
                device_id,
                station,
                pool_index,
                keys,
                ..
            } => {
                let decided = Decided::new(entitlement, device_id, station, r.time);
                let recorded = Recorded::Allowed {
                    chip: paired.release,
                };
                self.decision(decided, recorded, *pool_index, keys)?;
            }
            Event::EntitlementImported { entitlement, .. } => self.on_imported(entitlement)?,
            Event::ReceiptImported {
                acknowledged_at, ..
            } => {
                self.log.acknowledged_at = self.log.acknowledged_at.max(*acknowledged_at);
            }
            Event::ApprovalAccepted {
                entitlement,
                action,
                approver,
                ..
            } => self.on_approval(entitlement, action, approver)?,
            Event::QuorumApproved {
                entitlement,
                action,
                nonce,
                request,
                approvals,
            } => {
                let approved = Approved {
                    entitlement,
                    action,
                    nonce,
                    request,
                    approvals,
                };
                self.on_quorum(r.time, &approved)?;
            }
            Event::EntitlementActivated { entitlement } => self.on_activated(entitlement)?,
            Event::EntitlementRevoked {
                entitlement,
                destroyed_pool_keys,
                ..
            } => self.on_revoked(entitlement, *destroyed_pool_keys)?,
            Event::ProvisionDenied {
                entitlement,
                device_id,
                station,
                code,
                ..
            } => {
                let decided = Decided::new(entitlement, device_id, station, r.time);
                let recorded = Recorded::Denied { code, reason: None };
                self.decision(decided, recorded, None, &[])?;
            }
            Event::ProvisionDeniedByCode {
                entitlement,
                device_id,
                station,
                code,
                reason,
                ..
            } => {
                let decided = Decided::new(entitlement, device_id, station, r.time);
                let recorded = Recorded::Denied {
                    code,
                    reason: Some(reason),
                };
                self.decision(decided, recorded, None, &[])?;
            }
            Event::DeviceConfirmed {
                entitlement,
                device_id,
                result,
                ..
            } => self.on_confirmed(entitlement, device_id, result, r.time)?,
            Event::StationMismatch { entitlement, .. } => {
                // Nothing was released: an attempt, counted with the refusals.
                if self.issued(entitlement)?.is_some() {
                    *self
                        .replica(entitlement)?
                        .refusals
                        .entry("station_not_allowed".into())
                        .or_insert(0) += 1;
                }
            }
            Event::ClockReset {
                to,
                size,
                acknowledged_at,
                ..
            } => self.on_clock_reset(r.time, *to, *size, *acknowledged_at)?,
            Event::RollbackCounterAdvanced { value } => self.on_counter(*value),
            Event::ClockRollback { .. }
            | Event::ClockAhead { .. }
            | Event::SiteLatched { .. }
            | Event::SettingChanged { .. }
            | Event::BatchKeyDestroyed { .. }
            | Event::AuditExported { .. } => {}
        }
        Ok(())
    }

    /// A chip attestation is recorded just before its release, in the same commit: one
    /// that a release of its request does not follow is a record the site did not
    /// write so.
    fn unreleased_attestation(&mut self, attested: Option<super::attested::Attestation>) {
        if let Some(a) = attested {
            self.violation(
                Some(&a.entitlement),
                Some(&a.device_id),
                ViolationKind::ChipAttestation,
                format!(
                    "record {} of its chain attests chip certificate {} for request '{}', which the next record does not release",
                    a.sequence, a.certificate, a.request_id
                ),
            );
        }
    }

    /// Each chain's times never go back, except at a clock reset (whether HQ issued it
    /// is [`Reconciler::on_clock_reset`]'s to check).
    fn check_time(&mut self, r: &Record) {
        let last_time = self.last_times.entry(r.chain.clone()).or_insert(i64::MIN);
        let backwards = r.time < *last_time && !r.resets_time();
        *last_time = match r.resets_time() {
            true => r.time,
            false => (*last_time).max(r.time),
        };
        if backwards {
            self.violation(
                None,
                None,
                ViolationKind::TimestampBackwards,
                format!(
                    "record {} is earlier than the one before it in its chain",
                    self.position
                ),
            );
        }
    }

    fn on_imported(&mut self, entitlement: &str) -> Result<()> {
        if self.issued(entitlement)?.is_none() {
            self.violation(
                Some(entitlement),
                None,
                ViolationKind::UnknownEntitlement,
                "HQ issued no such entitlement to this site".into(),
            );
        }
        self.replica(entitlement)?.imported = true;
        Ok(())
    }

    /// An approval counts only from an approver the entitlement lists; approvals of
    /// `activate` count towards its activation (the others are proven with the action,
    /// [`Reconciler::on_quorum`]).
    fn on_approval(&mut self, entitlement: &str, action: &str, approver: &str) -> Result<()> {
        let listed = match self.issued(entitlement)? {
            Some(entry) => entry.record.policy.approval.as_ref().is_some_and(|a| {
                a.approver_keys.iter().any(|pem| {
                    keyfab_crypto::sign::VerifyingKey::from_pem(pem)
                        .is_ok_and(|k| k.fingerprint().to_hex() == approver)
                })
            }),
            None => false,
        };
        if listed {
            if action == keyfab_policy::Action::Activate.as_str() {
                self.replica(entitlement)?
                    .approvers
                    .insert(approver.to_owned());
            }
        } else {
            self.violation(
                Some(entitlement),
                None,
                ViolationKind::ApproverNotListed,
                format!("approver {approver}"),
            );
        }
        Ok(())
    }

    /// An activation needs the threshold of distinct listed approvers before it.
    fn on_activated(&mut self, entitlement: &str) -> Result<()> {
        let threshold = self
            .issued(entitlement)?
            .map_or(u32::MAX, |entry| entry.record.policy.approval_threshold());
        let count = self.replica(entitlement)?.approvers.len();
        if count < threshold as usize {
            self.violation(
                Some(entitlement),
                None,
                ViolationKind::ActivatedWithoutQuorum,
                format!("{count} of {threshold} approvers"),
            );
        }
        self.replica(entitlement)?.activated = true;
        Ok(())
    }

    /// An action the site carried out on a quorum: in force in HQ's replay only when the
    /// approvals the record keeps prove the quorum to HQ itself.
    fn on_quorum(&mut self, time: i64, approved: &Approved<'_>) -> Result<()> {
        let Some(entry) = self.issued(approved.entitlement)? else {
            self.violation(
                Some(approved.entitlement),
                None,
                ViolationKind::UnknownEntitlement,
                "a quorum approval for an entitlement HQ never issued to this site".into(),
            );
            return Ok(());
        };
        let proven = approved.prove(&self.site, time, &entry.policy);
        // A device is re-provisioned only after it was provisioned.
        let proven = match proven {
            Ok(Proven::Reprovision(device))
                if self
                    .devices
                    .released(self.node.store.as_ref(), approved.entitlement, &device)?
                    .is_none() =>
            {
                Err(format!("device '{device}' was never provisioned"))
            }
            other => other,
        };
        match proven {
            Ok(Proven::Raise(raise)) => self.replica(approved.entitlement)?.raises.push(raise),
            Ok(Proven::Reprovision(device)) => {
                let rep = self.replica(approved.entitlement)?;
                rep.superseded += 1;
                rep.reprovisions.insert(device);
            }
            Err(detail) => self.violation(
                Some(approved.entitlement),
                None,
                ViolationKind::QuorumNotProven,
                format!("'{}' request {}: {detail}", approved.action, approved.nonce),
            ),
        }
        Ok(())
    }

    /// The site's TPM counter only goes up, across every export HQ imported.
    fn on_counter(&mut self, value: u64) {
        let last = self.log.rollback_counter;
        if last.is_some_and(|last| value <= last) {
            self.violation(
                None,
                None,
                ViolationKind::RollbackCounterRegressed,
                format!(
                    "the site's TPM rollback counter is recorded at {value} after {}: its state was put back",
                    last.unwrap_or_default()
                ),
            );
        }
        self.log.rollback_counter = Some(last.map_or(value, |last| last.max(value)));
    }

    /// A revocation the site records must be one HQ issued.
    fn on_revoked(&mut self, entitlement: &str, destroyed_pool_keys: u64) -> Result<()> {
        let revoked_by_hq = self
            .issued(entitlement)?
            .is_some_and(|entry| entry.record.revoked_at.is_some());
        if !revoked_by_hq {
            self.violation(
                Some(entitlement),
                None,
                ViolationKind::RevokedWithoutRevocation,
                "HQ issued no revocation".into(),
            );
        }
        let rep = self.replica(entitlement)?;
        rep.revoked = true;
        rep.destroyed += destroyed_pool_keys;
        Ok(())
    }

    /// A confirmation: of a device that received keys, with a known result; a first
    /// failure counts for a policy module.
    fn on_confirmed(
        &mut self,
        entitlement: &str,
        device_id: &str,
        result: &str,
        time: i64,
    ) -> Result<()> {
        let released = self.issued(entitlement)?.is_some()
            && self
                .devices
                .released(self.node.store.as_ref(), entitlement, device_id)?
                .is_some();
        if !released {
            self.violation(
                Some(entitlement),
                Some(device_id),
                ViolationKind::ConfirmedWithoutRelease,
                "a confirmation of a device that received no keys".into(),
            );
        }
        let code_day = match self.issued(entitlement)? {
            Some(entry) if entry.code.is_some() => Some(self.day_of(&entry, time)),
            _ => None,
        };
        let rep = self.replica(entitlement)?;
        match result {
            "programmed" => rep.confirmed += 1,
            "failed" => {
                rep.burned += 1;
                // Only the first confirmation of a device reaches the log.
                if let (Some(day), true) = (code_day, released) {
                    rep.code.record_failed(&day);
                }
            }
            _ => self.violation(
                Some(entitlement),
                Some(device_id),
                ViolationKind::MalformedConfirmation,
                format!("unknown result '{result}'"),
            ),
        }
        Ok(())
    }

    /// A clock reset must be one HQ issued (`hq site reset-clock`), recorded at its time.
    fn on_clock_reset(
        &mut self,
        time: i64,
        to: i64,
        size: u64,
        acknowledged_at: i64,
    ) -> Result<()> {
        let issued = self.clock_resets()?.iter().any(|c| {
            c.acknowledged_at == acknowledged_at && c.trusted_time == to && c.size == size
        });
        if issued && time == to {
            self.log.acknowledged_at = self.log.acknowledged_at.max(acknowledged_at);
        } else {
            self.violation(
                None,
                None,
                ViolationKind::ClockResetNotIssued,
                format!(
                    "the site's trusted time was reset to {} on a receipt of {} HQ did not issue",
                    keyfab_node::rfc3339(to),
                    keyfab_node::rfc3339(acknowledged_at)
                ),
            );
        }
        Ok(())
    }

    /// A decision the site recorded, replayed: a refusal must be one the policy gives
    /// (and a module's, the same one); a release one the policy allows, from a pool slot
    /// never taken, with the keys HQ put there — then counted.
    fn decision(
        &mut self,
        d: Decided<'_>,
        recorded: Recorded<'_>,
        pool_index: Option<u64>,
        keys: &[keyfab_audit::AuditedKey],
    ) -> Result<()> {
        let (entitlement, device_id) = (d.entitlement, d.device_id);
        let allowed = matches!(recorded, Recorded::Allowed { .. });
        let Some(entry) = self.issued(entitlement)? else {
            if allowed {
                self.violation(
                    Some(entitlement),
                    Some(device_id),
                    ViolationKind::UnknownEntitlement,
                    "keys released under an entitlement HQ never issued to this site".into(),
                );
            }
            return Ok(());
        };
        let chip = match &recorded {
            Recorded::Allowed { chip } => chip_seen(&entry.record.policy, chip.as_ref(), keys),
            // A refusal releases nothing, and the log does not keep a refused request's
            // chain: a chip refusal stands as recorded, and any other was decided after
            // the chip rules passed.
            Recorded::Denied { code, .. } if is_chip_code(code) => {
                *self
                    .replica(entitlement)?
                    .refusals
                    .entry(code.to_string())
                    .or_insert(0) += 1;
                return Ok(());
            }
            Recorded::Denied { .. } => ChipSeen::Absent,
        };
        let chip_rules = match recorded {
            Recorded::Allowed { .. } => chip.as_request(),
            Recorded::Denied { .. } => keyfab_policy::Chip::Assumed,
        };
        let (decision, reason, day) = self.replay(&entry, &d, chip_rules)?;
        if let Recorded::Denied {
            code,
            reason: recorded_reason,
        } = recorded
        {
            self.check_refusal(&d, code, recorded_reason, decision, reason)?;
            return Ok(());
        }
        let reason = match decision {
            Decision::Deny(code) => chip.reason(code, d.time).or(reason),
            Decision::Allow => reason,
        };
        if let Decision::Deny(c) = decision {
            let because = reason.map(|r| format!(" ({r})")).unwrap_or_default();
            self.violation(
                Some(entitlement),
                Some(device_id),
                ViolationKind::Broke(c.code()),
                format!(
                    "keys released although the policy refuses: {}{because}",
                    c.code()
                ),
            );
        }
        if !entry.pool_specs.is_empty() {
            self.check_pool_slot(&entry, &d, pool_index, keys)?;
        }
        self.count_release(&entry, &d, day, pool_index)
    }

    /// The policy's decision on `d` as HQ replays it, on its own counters: the built-in
    /// rules, then the module where the site ran it (after the built-in rules allowed).
    /// Returns the decision, a module's reason, and the policy day.
    fn replay(
        &mut self,
        entry: &Arc<Issued>,
        d: &Decided<'_>,
        chip: keyfab_policy::Chip<'_>,
    ) -> Result<(Decision, Option<String>, String)> {
        // Released before, and not since allowed once more by a proven quorum.
        let already = self
            .devices
            .released(self.node.store.as_ref(), d.entitlement, d.device_id)?
            .is_some()
            && !self
                .replica(d.entitlement)?
                .reprovisions
                .contains(d.device_id);
        let acknowledged = entry.record.created_at.max(self.log.acknowledged_at);
        let day = self.day_of(entry, d.time);
        let state = {
            let rep = self.replica(d.entitlement)?;
            EntitlementState {
                revoked: rep.revoked,
                activated: rep.activated,
                last_acknowledged: acknowledged,
                total: rep.total,
                today: rep.days.get(&day).copied().unwrap_or(0),
                raised_daily: keyfab_policy::raised_on(&rep.raises, &day),
            }
        };
        let built_in = entry.policy.decide(
            &state,
            &keyfab_policy::Request {
                device_id: d.device_id,
                station: d.station,
                already_provisioned: already,
                chip,
            },
            d.time,
        );
        let (decision, reason) = match (built_in, &entry.code) {
            (Decision::Allow, Some(module)) => {
                let counted = keyfab_policy_code::Counted {
                    total: state.total,
                    today: state.today,
                };
                let evaluation = self.replica(d.entitlement)?.code.evaluate(
                    module,
                    &entry.policy,
                    d.time,
                    &day,
                    counted,
                    d.device_id,
                    d.station,
                );
                match evaluation.verdict {
                    keyfab_policy_code::Verdict::Allow => (Decision::Allow, None),
                    keyfab_policy_code::Verdict::Deny { reason } => {
                        (Decision::Deny(DenyCode::PolicyDenied), Some(reason))
                    }
                    keyfab_policy_code::Verdict::Error { reason } => {
                        (Decision::Deny(DenyCode::PolicyError), Some(reason))
                    }
                }
            }
            (other, _) => (other, None),
        };
        Ok((decision, reason, day))
    }

    /// A refusal the site recorded, counted, against the replay's `decision`: a refusal
    /// the policy allows is a violation; a module's must replay exactly — the same
    /// code, and for `policy_denied` the same reason.
    fn check_refusal(
        &mut self,
        d: &Decided<'_>,
        code: &str,
        recorded_reason: Option<&String>,
        decision: Decision,
        reason: Option<String>,
    ) -> Result<()> {
        *self
            .replica(d.entitlement)?
            .refusals
            .entry(code.to_owned())
            .or_insert(0) += 1;
        match decision {
            Decision::Allow => self.violation(
                Some(d.entitlement),
                Some(d.device_id),
                ViolationKind::DeniedButAllowed,
                format!("the site refused with {code}, the policy allows it"),
            ),
            Decision::Deny(c) if recorded_reason.is_some() => {
                let same = c.code().as_str() == code
                    && (c != DenyCode::PolicyDenied
                        || reason.as_deref() == recorded_reason.map(String::as_str));
                if !same {
                    self.violation(
                        Some(d.entitlement),
                        Some(d.device_id),
                        ViolationKind::CodeReplayDiffers,
                        format!(
                            "the site's module refused with {code} ({}), the replay gives {} ({})",
                            recorded_reason.map_or("", String::as_str),
                            c.code(),
                            reason.as_deref().unwrap_or("")
                        ),
                    );
                }
            }
            Decision::Deny(_) => {}
        }
        Ok(())
    }

    /// A release's pool slot: never taken before, and holding exactly the keys the site
    /// recorded for it.
    fn check_pool_slot(
        &mut self,
        entry: &Arc<Issued>,
        d: &Decided<'_>,
        pool_index: Option<u64>,
        keys: &[keyfab_audit::AuditedKey],
    ) -> Result<()> {
        let taken = match pool_index {
            Some(index) => self.replica(d.entitlement)?.pool_taken(index),
            None => false,
        };
        match pool_index {
            Some(index) if !taken => {
                for (spec_no, key_index) in entry.pool_specs.iter().enumerate() {
                    let audited = keys.get(*key_index).map_or("", |k| k.key_id.as_str());
                    if !self.pool_key_matches(&entry.record, spec_no, index, audited)? {
                        self.violation(
                            Some(d.entitlement),
                            Some(d.device_id),
                            ViolationKind::PoolKeyNotIssued,
                            format!("slot {index}: {audited} is not the key HQ put there"),
                        );
                    }
                }
            }
            Some(index) => {
                self.violation(
                    Some(d.entitlement),
                    Some(d.device_id),
                    ViolationKind::PoolKeyReused,
                    format!("slot {index} was given out before"),
                );
            }
            None => {
                self.violation(
                    Some(d.entitlement),
                    Some(d.device_id),
                    ViolationKind::PoolKeyNotIssued,
                    "no pool slot recorded".into(),
                );
            }
        }
        Ok(())
    }

    /// A release, counted in HQ's replica of the entitlement.
    fn count_release(
        &mut self,
        entry: &Arc<Issued>,
        d: &Decided<'_>,
        day: String,
        pool_index: Option<u64>,
    ) -> Result<()> {
        // A device released twice keeps the index entry of its first release.
        self.devices
            .insert(d.entitlement, d.device_id, self.position);
        let has_code = entry.code.is_some();
        let rep = self.replica(d.entitlement)?;
        rep.total += 1;
        // A re-provisioning uses up its approval.
        rep.reprovisions.remove(d.device_id);
        if has_code {
            rep.code.record_allowed(&day, d.station);
        }
        match rep.days.get_mut(&day) {
            Some(n) => *n += 1,
            None => {
                rep.days.insert(day, 1);
            }
        }
        if let Some(index) = pool_index {
            rep.take_pool_slot(index);
        }
        Ok(())
    }

    fn pool_key_matches(
        &mut self,
        issued: &IssuedRecord,
        spec: usize,
        index: u64,
        audited: &str,
    ) -> Result<bool> {
        let kpc = u64::from(issued.keys_per_chunk.max(1));
        // Chunk numbering as in the file: specs one after another, chunk 1 first.
        let mut chunk = 1u64;
        for p in issued.pool.iter().take(spec) {
            chunk += p.count.div_ceil(kpc);
        }
        chunk += index / kpc;
        let cached = self
            .pool_row
            .as_ref()
            .is_some_and(|((id, c), _)| *id == issued.id && *c == chunk);
        if !cached {
            let Some(row) = self.node.store.get(
                Table::Issued,
                &crate::entitlement::pool_ids_key(&issued.id, chunk),
            )?
            else {
                return Ok(false);
            };
            self.pool_row = Some(((issued.id.clone(), chunk), row.value));
        }
        let Some((_, row)) = &self.pool_row else {
            return Ok(false);
        };
        let at = ((index % kpc) * 32) as usize;
        let Some(id) = row.get(at..at + 32) else {
            return Ok(false);
        };
        let expected = if let Some(hex) = audited.strip_prefix("spki-sha256:") {
            Fingerprint::from_hex(hex).map(|f| f.0.to_vec())
        } else if let Some(hex) = audited.strip_prefix("kcv:") {
            hex::decode(hex).ok().map(|mut k| {
                k.resize(32, 0);
                k
            })
        } else {
            None
        };
        Ok(expected.as_deref() == Some(id))
    }
}

/// A `quorum_approved` record: a request and the approvals the site counted for it.
struct Approved<'a> {
    entitlement: &'a str,
    action: &'a str,
    nonce: &'a str,
    request: &'a [u8],
    approvals: &'a [serde_bytes::ByteBuf],
}

impl Approved<'_> {
    /// What the approvals prove, under `policy`, of an action `site` carried out at
    /// `time`: what was approved, or why they prove nothing.
    fn prove(
        &self,
        site: &str,
        time: i64,
        policy: &CompiledPolicy,
    ) -> std::result::Result<Proven, String> {
        use keyfab_formats::approval::{attach, verify_approval, ApprovalRequest};
        use keyfab_policy::Action;
        let p = &policy.policy;
        let action = [Action::RaiseLimit, Action::Reprovision]
            .into_iter()
            .find(|a| a.as_str() == self.action);
        if !action.is_some_and(|a| p.requires_approval(a)) {
            return Err(format!("the policy puts no '{}' to a quorum", self.action));
        }
        let req = ApprovalRequest::from_file(self.request).map_err(|e| e.to_string())?;
        if req.site != site
            || req.entitlement != self.entitlement
            || req.action != self.action
            || req.nonce != self.nonce
        {
            return Err("the request kept is for something else".into());
        }
        if time >= req.expires_at {
            return Err("carried out after the request expired".into());
        }
        let keys = p
            .approval
            .iter()
            .flat_map(|a| &a.approver_keys)
            .filter_map(|pem| keyfab_crypto::sign::VerifyingKey::from_pem(pem).ok())
            .collect::<Vec<_>>();
        let mut approvers = BTreeSet::new();
        for detached in self.approvals {
            let file = attach(detached, self.request).map_err(|e| e.to_string())?;
            let approval = verify_approval(&file, &keys).map_err(|e| e.to_string())?;
            approvers.insert(approval.approver);
        }
        let threshold = p.approval_threshold();
        if approvers.len() < threshold as usize {
            return Err(format!(
                "{} of {threshold} distinct listed approvers",
                approvers.len()
            ));
        }
        match (req.raise, req.reprovision) {
            (Some(raise), None) => {
                raise
                    .check(policy)
                    .map_err(|e| format!("{}: {}", e.field, e.message))?;
                Ok(Proven::Raise(raise))
            }
            (None, Some(r)) => Ok(Proven::Reprovision(r.device_id)),
            _ => Err("the request names no parameters for its action".into()),
        }
    }
}

/// What a proven quorum approved.
enum Proven {
    /// A raise of the daily limit.
    Raise(keyfab_policy::Raise),
    /// One more provisioning of this device, its earlier keys burned.
    Reprovision(String),
}
