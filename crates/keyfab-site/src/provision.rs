//! Provisioning: the decide-and-record step, with group commit.
//!
//! Request threads do the expensive work that needs no shared state first — generate
//! `site` keys, derive `derived` keys, check `device` CSRs, sign their certificates —
//! then hand the request to the single committer thread. The committer takes every
//! request waiting, and for each in order reads the state (counters, device index,
//! request ids, audit head; the batch's own earlier decisions included), runs the pure
//! `decide`, takes pool slots, and appends the audit record. The batch becomes one store
//! transaction: one fsync for many decisions. Only after that commit returns does any
//! request thread receive its answer, so no key leaves before its record is durable.
//! A storage error fails the whole batch closed: nothing is released.
//!
//! Here: requests, answers and the crypto workers. `committer`: the serial loop and its
//! batches. `decide`: a batch's state and the steps that decide it, in one transaction
//! (the snapshot, the guards, the clock, reserving, pool keys ahead, write back).
//! `rules`: the decision proper, pure (the clock, the policy and its module). `record`:
//! each request decided and recorded (confirmation, retry, refusal, release).
//! `records`: what is stored per device, request and entitlement, and under which keys.
//! `keys`: the keys a device gets, prepared before the decision and made again for a
//! retry. `cohorts`: which requests a batch waits for, so that commits carry more decisions.
//! `fair_queue`: the crypto workers' queue, served station by station in turn.
//! `pool_keys`: HQ pool slots a batch takes, read and made ready ahead. `key_reserve`:
//! P-256 keys for `site` key specs generated ahead on otherwise idle cores.
//! `reservations`: on a cluster, each node's share of the quota.

mod cohorts;
mod committer;
mod decide;
mod fair_queue;
mod key_reserve;
mod keys;
mod pool_keys;
mod record;
mod records;
pub(crate) mod reservations;
mod rules;

pub use reservations::{Reservation, RESERVATION_LIFE_SECS};

use crate::audit_log::Appender;
use crate::entitlements::{dek_aad, pool_nonce, pool_row_key, EntitlementRecord};
use committer::committer;
use decide::{decide_batch, Carried};
use keyfab_audit::Head;
use keyfab_audit::{AuditedKey, Event};
use keyfab_crypto::aead::AeadKey;
use keyfab_crypto::devicekey::{self, KeyId};
use keyfab_crypto::hpke::HpkePublicKey;
use keyfab_crypto::secret::{Secret32, SecretBytes};
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509;
use keyfab_formats::attestation::ChipSeen;
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_policy::PolicyError;
use keyfab_policy::{CompiledPolicy, Decision, DenyCode, EntitlementState, KeySource, KeyType};
use keyfab_policy::{DeviceId, EntitlementId, RequestId, StationName};
use keyfab_policy_code::{Counted, PolicyModule, Verdict};
use keyfab_store::{Table, Txn, Versioned};
use keys::{certify, device_type};
pub use records::Counters;
use records::{
    device_history_end, ent_key, i64_of, legacy_request_key, refusal_key, Confirmation,
    DeviceRecord, RequestRecord,
};

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};

pub(crate) const TIME_HWM: &[u8] = b"time_high_water";

/// How far a node chain's time runs ahead before it raises the site's trusted time.
const SITE_TIME_RAISE_SECS: i64 = 1;
use crate::settings::{CLOCK_MAX_JUMP, CLOCK_TOLERANCE};

/// One provisioning request, as a station or the CLI sends it. Its ids were checked
/// where they came in ([`keyfab_policy::ids`]): the engine never sees one that was not.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    /// The entitlement id.
    pub entitlement: EntitlementId,
    /// The device id.
    pub device_id: DeviceId,
    /// The station that asks, when known (the station API always knows).
    pub station: Option<StationName>,
    /// The same id on a retry returns the same answer and consumes nothing more.
    pub request_id: RequestId,
    /// DER CSR of the device's own key, for keys with source `device`.
    pub csr: Option<Vec<u8>>,
    /// The chip's transport key: the key material is sealed to it (HPKE, FORMATS.md
    /// §10), so whoever carries the answer never sees it in clear.
    pub transport_key: Option<HpkePublicKey>,
    /// The chip's certificate chain (DER, leaf first), as the chip gave it: what proves,
    /// under a policy's `[chips]`, that the transport key (or the CSR's key) is a chip's.
    pub chip_chain: Option<Vec<Vec<u8>>>,
}

impl ProvisionRequest {
    /// A request for `device_id` under `entitlement` with no station, CSR or transport
    /// key; set those fields when the request has them.
    pub fn new(entitlement: EntitlementId, device_id: DeviceId, request_id: RequestId) -> Self {
        Self {
            entitlement,
            device_id,
            station: None,
            request_id,
            csr: None,
            transport_key: None,
            chip_chain: None,
        }
    }

    /// [`ProvisionRequest::new`] from text: an id without its shape is `invalid_input`,
    /// its message naming which id (never repeating it).
    pub fn parse(
        entitlement: impl AsRef<str>,
        device_id: impl AsRef<str>,
        request_id: impl AsRef<str>,
    ) -> Result<Self> {
        Ok(Self::new(
            checked(entitlement.as_ref())?,
            checked(device_id.as_ref())?,
            checked(request_id.as_ref())?,
        ))
    }
}

impl ProvisionRequest {
    /// The station's name as records keep it.
    pub fn station_text(&self) -> Option<String> {
        self.station.as_ref().map(|s| s.to_string())
    }
}

/// A request must have an id of its own: the empty one is how a confirmation travels.
fn refuse_confirmation_id(req: &ProvisionRequest) -> Result<()> {
    if req.request_id.is_confirmation() {
        return Err(Error::InvalidInput(
            "a provisioning request needs a request id".into(),
        ));
    }
    Ok(())
}

/// `text` as the id or name type `T`, or `invalid_input` saying why.
pub fn checked<T: TryFrom<String, Error = keyfab_policy::IdError>>(text: &str) -> Result<T> {
    T::try_from(text.to_owned()).map_err(|e| Error::InvalidInput(e.to_string()))
}

/// A key handed to a device.
pub struct IssuedKey {
    /// The key's name in the policy.
    pub name: String,
    /// Its type.
    pub key_type: KeyType,
    /// Where it came from.
    pub source: KeySource,
    /// `spki-sha256:…` or `kcv:…`: what the audit log holds.
    pub key_id: String,
    /// PKCS#8 DER for asymmetric keys, the raw 32 bytes for AES; none for `device` keys,
    /// and none when the request carried a transport key (see `sealed`).
    pub private: Option<SecretBytes>,
    /// The same, sealed to the chip's transport key (with [`Provisioned::chip_enc`]).
    pub sealed: Option<Vec<u8>>,
    /// DER device certificate.
    pub certificate: Option<Vec<u8>>,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .field("private", &self.private.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// The certificates above an entitlement's device certificates, nearest first (batch
/// CA, HQ cluster CA), in DER and in PEM: every answer carries them, so they are encoded
/// once per entitlement, not per device.
#[derive(Debug)]
pub struct IssuerChain {
    /// DER.
    pub der: Vec<Vec<u8>>,
    /// PEM.
    pub pem: Vec<String>,
}

impl IssuerChain {
    fn new(der: Vec<Vec<u8>>) -> Self {
        let pem = der.iter().map(|c| x509::to_pem(c, "CERTIFICATE")).collect();
        Self { der, pem }
    }
}

/// A released answer: the device's keys, recorded before they were handed out.
#[derive(Debug)]
pub struct Provisioned {
    /// The entitlement id.
    pub entitlement: String,
    /// The device id.
    pub device_id: String,
    /// The request id.
    pub request_id: String,
    /// The audit record of the decision.
    pub audit_sequence: u64,
    /// The cluster node whose audit chain holds that record (none on a single-node
    /// site: the site's own chain): which node decided.
    pub audit_chain: Option<String>,
    /// This answer repeats an earlier one for the same request id.
    pub replayed: bool,
    /// The device's keys.
    pub keys: Vec<IssuedKey>,
    /// Issuers of the device certificates, nearest first: batch CA, HQ cluster CA.
    /// With the root certificate, `openssl verify` accepts every device certificate.
    pub chain: Arc<IssuerChain>,
    /// With a transport key: the HPKE encapsulated key the chip opens the keys with.
    pub chip_enc: Option<Vec<u8>>,
    /// The site's name, part of what a chip package is bound to.
    pub site: String,
}

/// The outcome of programming a device, as its station reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Programming {
    /// The device holds its keys.
    Programmed,
    /// Programming failed: the keys are burned, never handed out again.
    Failed,
}

impl Programming {
    /// The name stations and records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Programming::Programmed => "programmed",
            Programming::Failed => "failed",
        }
    }

    /// The result named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "programmed" => Some(Programming::Programmed),
            "failed" => Some(Programming::Failed),
            _ => None,
        }
    }
}

/// A confirmation, recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// The entitlement id.
    pub entitlement: String,
    /// The device id.
    pub device_id: String,
    /// `programmed` or `failed`.
    pub result: Programming,
    /// The audit record of the decision.
    pub audit_sequence: u64,
    /// This repeats an earlier identical confirmation (nothing new was recorded).
    pub repeated: bool,
}

/// Everything needed to provision under one entitlement, unsealed once.
struct EntitlementContext {
    record: EntitlementRecord,
    policy: CompiledPolicy,
    dek: Secret32,
    aead: AeadKey,
    /// The entitlement's batch CA, its certificate parsed once; `None` once its key was
    /// destroyed.
    device_issuer: Option<x509::DeviceIssuer>,
    /// Each key spec's certificate profile, encoded once (none: no certificate).
    profiles: Vec<Option<x509::DeviceProfile>>,
    master: Secret32,
    chain: Arc<IssuerChain>,
    /// The policy module, compiled once.
    code: Option<PolicyModule>,
}

/// Work done before the committer: one entry per key spec of the policy.
#[derive(Clone)]
enum Prepared {
    /// Taken from the pool by the committer.
    Pool,
    Ready {
        key_id: KeyId,
        /// A `site` key's secret sealed under the entitlement's data key, for the device
        /// record (so a retry returns the same key); empty otherwise.
        sealed: Vec<u8>,
        /// What the device receives (PKCS#8, or raw AES); none for `device` keys.
        private: Option<SecretBytes>,
        cert: Option<(Vec<u8>, String)>,
    },
}

enum Outcome {
    Allowed {
        audit_sequence: u64,
        audit_chain: Option<String>,
        keys: Vec<AuditedKey>,
        privates: Vec<Option<SecretBytes>>,
    },
    Replay(RequestRecord),
    Confirmed {
        audit_sequence: u64,
        repeated: bool,
    },
}

/// Where a request's outcome goes: a thread blocked on it, or a task awaiting it.
enum Reply {
    Blocking(mpsc::SyncSender<Result<Outcome>>),
    Async(tokio::sync::oneshot::Sender<Result<Outcome>>),
}

impl Reply {
    fn send(self, outcome: Result<Outcome>) {
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Async(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

struct Job {
    ctx: Arc<EntitlementContext>,
    req: ProvisionRequest,
    prepared: Vec<Prepared>,
    /// The request's chip chain as judged against the policy's `[chips]`.
    chip: Arc<ChipSeen>,
    /// A confirmation of `req.device_id` rather than a provisioning request.
    confirm: Option<Programming>,
    /// Taken by the committer, which answers after the commit.
    reply: Option<Reply>,
}

impl Job {
    /// The job without its reply channel, to decide it again after a conflict.
    fn retry_copy(&self) -> Job {
        Job {
            ctx: self.ctx.clone(),
            req: self.req.clone(),
            prepared: self.prepared.clone(),
            chip: self.chip.clone(),
            confirm: self.confirm,
            reply: None,
        }
    }
}

/// The provisioning engine of one site node. Cheap to share between threads.
///
/// Threads: crypto workers, one per core but one (`crypto_workers`), prepare requests
/// (key generation, certificates), then hand them to the one committer; the key reserve
/// makes keys on idle cores. A caller blocks once, for its answer. Keeping crypto to
/// these threads, instead of running it on every caller's thread, keeps the committer —
/// the thread every request waits for — scheduled on a busy machine.
pub struct Provisioner {
    node: Arc<Node>,
    contexts: Mutex<HashMap<String, Arc<EntitlementContext>>>,
    /// Requests on their way to the crypto workers, station by station in turn.
    work: Arc<fair_queue::FairQueue<Work>>,
    reserve: Arc<key_reserve::KeyReserve>,
    cohorts: Arc<cohorts::Cohorts>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// A request on its way to a crypto worker.
struct Work {
    /// See [`cohorts`].
    cohort: u64,
    ctx: Arc<EntitlementContext>,
    req: ProvisionRequest,
    confirm: Option<Programming>,
    reply: Reply,
}

/// The request ids a site's own lot (`site provision --device-ids`) gives its devices:
/// this prefix and the SHA-256 of the device id — the same on a rerun, so a lot resumes,
/// and never accepted from a station ([`lot_request_id`], the station API refuses the
/// prefix), so no station can have a lot's answer by naming its device.
pub const LOT_REQUEST_PREFIX: &str = "lot:";

/// The request id of `device_id` in a site's own lot.
pub fn lot_request_id(device_id: &str) -> String {
    format!(
        "{LOT_REQUEST_PREFIX}{}",
        hex::encode(keyfab_crypto::hash::sha256(device_id.as_bytes()))
    )
}

impl Provisioner {
    /// Starts the engine's committer and crypto workers on `node`.
    pub fn start(node: Arc<Node>) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let work = Arc::new(fair_queue::FairQueue::default());
        let mut threads = Vec::new();
        let reserve = key_reserve::KeyReserve::new();
        let cohorts = Arc::new(cohorts::Cohorts::default());
        let committer_node = node.clone();
        let committer_cohorts = cohorts.clone();
        if let Ok(h) = std::thread::Builder::new()
            .name("keyfab-committer".into())
            .spawn(move || committer(&committer_node, &jobs_rx, &committer_cohorts))
        {
            threads.push(h);
        }
        for i in 0..crypto_workers() {
            let (node, rx, jobs) = (node.clone(), work.clone(), jobs_tx.clone());
            let (reserve, cohorts) = (reserve.clone(), cohorts.clone());
            if let Ok(h) = std::thread::Builder::new()
                .name(format!("keyfab-crypto-{i}"))
                .spawn(move || crypto_worker(&node, &rx, &jobs, &reserve, &cohorts))
            {
                threads.push(h);
            }
        }
        Self {
            node,
            contexts: Mutex::new(HashMap::new()),
            work,
            reserve,
            cohorts,
            threads: Mutex::new(threads),
        }
    }

    /// The node it decides for.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Drops the unsealed contexts of entitlements whose batch CA key is gone from the
    /// store (destroyed by this node, another node or a command), so the key does not live
    /// on in this process's memory.
    pub fn forget_destroyed_batch_keys(&self) -> Result<()> {
        let held: Vec<String> = {
            let cache = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .iter()
                .filter(|(_, c)| c.device_issuer.is_some())
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in held {
            let stored = self.node.store.get(Table::Entitlements, id.as_bytes())?;
            let gone = match stored {
                Some(v) => !crate::batch_key::holds_key(&decode(&v.value)?),
                None => true,
            };
            if gone {
                let mut cache = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
                cache.remove(&id);
            }
        }
        Ok(())
    }

    fn context(&self, id: &str) -> Result<Arc<EntitlementContext>> {
        let mut cache = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(id) {
            return Ok(c.clone());
        }
        let v = self
            .node
            .store
            .get(Table::Entitlements, id.as_bytes())?
            .ok_or_else(|| Error::UnknownEntitlement(id.to_owned()))?;
        let record: EntitlementRecord = decode(&v.value)?;
        let dek = self
            .node
            .custody
            .unwrap_data_key(&record.wrapped_data_key, &dek_aad(id))?;
        // Gone once the window ended or HQ revoked (crate::batch_key): the policy refuses
        // every release then, and nothing can be issued.
        let device_issuer = if crate::batch_key::holds_key(&record) {
            let batch_pkcs8 = keyfab_crypto::aead::open_random_nonce(
                &dek,
                b"batch-ca-key",
                &record.sealed_batch_ca_key,
            )?;
            Some(x509::DeviceIssuer::new(
                x509::BatchKey::from_pkcs8(batch_pkcs8.expose())?,
                &record.batch_ca_cert,
            )?)
        } else {
            None
        };
        let master = keyfab_crypto::aead::open_random_nonce(
            &dek,
            b"master-secret",
            &record.sealed_master_secret,
        )?;
        let values = keyfab_policy::certificate::TemplateValues {
            product: &record.policy.product,
            site: &self.node.name,
            entitlement: &record.id,
        };
        let profiles = record
            .policy
            .keys
            .iter()
            .map(|k| {
                k.certificate
                    .as_ref()
                    .map(|t| keyfab_formats::device_profile::device_profile(t, &values))
                    .transpose()
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let ctx = Arc::new(EntitlementContext {
            profiles,
            policy: CompiledPolicy::new(record.policy.clone())?,
            aead: AeadKey::new(&dek)?,
            device_issuer,
            master: Secret32::from_slice(master.expose())
                .ok_or_else(|| Error::Corrupt("master secret".into()))?,
            chain: Arc::new(IssuerChain::new(vec![
                record.batch_ca_cert.clone(),
                record.hq_cluster_cert.clone(),
            ])),
            code: record
                .policy
                .code
                .as_ref()
                .map(keyfab_policy_code::load_embedded)
                .transpose()
                .map_err(|e| PolicyError::new("code.module", e.to_string()))?,
            dek,
            record,
        });
        cache.insert(id.to_owned(), ctx.clone());
        Ok(ctx)
    }

    /// Provisions one device, or refuses with the policy's code (exit 3). Safe to call
    /// from many threads at once.
    pub fn provision(&self, req: ProvisionRequest) -> Result<Provisioned> {
        refuse_confirmation_id(&req)?;
        let ctx = self.context(&req.entitlement)?;
        // A retry is recognised by the committer, which answers it from the record.
        let outcome = self
            .submit(&ctx, req.clone(), None)
            .map_err(|e| explained(&ctx, e))?;
        self.provisioned(&ctx, &req, outcome)
            .map_err(|e| explained(&ctx, e))
    }

    /// The answer to `req` once the committer decided it.
    fn provisioned(
        &self,
        ctx: &EntitlementContext,
        req: &ProvisionRequest,
        outcome: Outcome,
    ) -> Result<Provisioned> {
        match outcome {
            Outcome::Replay(rr) => self.answer_replay(ctx, req, rr),
            Outcome::Allowed {
                audit_sequence,
                audit_chain,
                keys,
                privates,
            } => self.answer(
                ctx,
                req,
                (audit_chain, audit_sequence),
                keys,
                privates,
                false,
            ),
            Outcome::Confirmed { .. } => Err(Error::Bug("unexpected answer".into())),
        }
    }

    /// Records what the station reports after programming `device_id`: `programmed`, or
    /// `failed` (its keys are burned). Either way its keys are never handed out again. A
    /// repeated identical confirmation is answered from the record; a contradicting one
    /// is refused. Goes through the committer, in order with provisioning.
    pub fn confirm(
        &self,
        entitlement: &EntitlementId,
        device_id: &DeviceId,
        result: Programming,
        station: Option<StationName>,
    ) -> Result<Confirmed> {
        let req = ProvisionRequest {
            entitlement: entitlement.clone(),
            device_id: device_id.clone(),
            station,
            request_id: RequestId::confirmation(),
            csr: None,
            transport_key: None,
            chip_chain: None,
        };
        let ctx = self.context(entitlement)?;
        match self.submit(&ctx, req, Some(result))? {
            Outcome::Confirmed {
                audit_sequence,
                repeated,
            } => Ok(Confirmed {
                entitlement: entitlement.to_string(),
                device_id: device_id.to_string(),
                result,
                audit_sequence,
                repeated,
            }),
            _ => Err(Error::Bug("unexpected answer".into())),
        }
    }

    /// Hands a request to the workers and waits for the committer's outcome.
    fn submit(
        &self,
        ctx: &Arc<EntitlementContext>,
        req: ProvisionRequest,
        confirm: Option<Programming>,
    ) -> Result<Outcome> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.enqueue(ctx, req, confirm, Reply::Blocking(reply))?;
        answer
            .recv()
            .map_err(|_| Error::Bug("provisioner stopped".into()))?
    }

    /// [`Provisioner::submit`] for async callers: awaits the outcome without holding a
    /// thread.
    async fn submit_async(
        &self,
        ctx: &Arc<EntitlementContext>,
        req: ProvisionRequest,
        confirm: Option<Programming>,
    ) -> Result<Outcome> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.enqueue(ctx, req, confirm, Reply::Async(reply))?;
        answer
            .await
            .map_err(|_| Error::Bug("provisioner stopped".into()))?
    }

    fn enqueue(
        &self,
        ctx: &Arc<EntitlementContext>,
        req: ProvisionRequest,
        confirm: Option<Programming>,
        reply: Reply,
    ) -> Result<()> {
        let cohort = self.cohorts.entered();
        let station = req.station_text().unwrap_or_default();
        let work = Work {
            cohort,
            ctx: ctx.clone(),
            req,
            confirm,
            reply,
        };
        self.work.push(&station, work).map_err(|_| {
            self.cohorts.left(cohort);
            Error::Bug("provisioner stopped".into())
        })
    }

    /// [`Provisioner::provision`] for async callers (the station API): the request waits
    /// for its commit without holding a thread.
    pub async fn provision_async(&self, req: ProvisionRequest) -> Result<Provisioned> {
        refuse_confirmation_id(&req)?;
        let ctx = self.context(&req.entitlement)?;
        let outcome = self
            .submit_async(&ctx, req.clone(), None)
            .await
            .map_err(|e| explained(&ctx, e))?;
        self.provisioned(&ctx, &req, outcome)
            .map_err(|e| explained(&ctx, e))
    }

    fn answer_replay(
        &self,
        ctx: &EntitlementContext,
        req: &ProvisionRequest,
        rr: RequestRecord,
    ) -> Result<Provisioned> {
        if rr.device_id != req.device_id {
            return Err(Error::InvalidInput(format!(
                "request id '{}' was used for device '{}'",
                req.request_id, rr.device_id
            )));
        }
        if let Some(code) = rr.denied {
            return Err(denied(code, &req.device_id, rr.reason.as_deref()));
        }
        let v = self
            .node
            .store
            .get(Table::Devices, &ent_key(&req.entitlement, &req.device_id))?
            .ok_or_else(|| Error::Corrupt("request recorded without its device".into()))?;
        let record = DeviceRecord::from_stored(&v.value)?;
        // Confirmed: whatever the retry carries, the keys are not handed out again (a
        // line's rerun reads this as "done before").
        if let Some(c) = record.confirmed {
            return Err(Error::Precondition(format!(
                "device '{}' was confirmed {} (audit record {}): its keys are not handed out again",
                req.device_id,
                c.result.as_str(),
                c.audit_sequence
            )));
        }
        let sealed_to = req.transport_key.as_ref().map(|k| k.fingerprint().to_hex());
        if record.transport_key != sealed_to {
            return Err(Error::InvalidInput(format!(
                "request id '{}' was answered {}; a retry must carry the same transport key",
                req.request_id,
                if record.transport_key.is_some() {
                    "sealed to a chip's transport key"
                } else {
                    "without a transport key"
                }
            )));
        }
        // A retry must come from the same chip: the chain's leaf the release was
        // attested with.
        let chip_now = req
            .chip_chain
            .as_ref()
            .and_then(|c| c.first())
            .map(|leaf| keyfab_crypto::hash::Fingerprint::of(leaf).to_hex());
        let checks_chips = ctx.policy.policy.chips.as_ref().is_some_and(|c| c.checks());
        if checks_chips && record.chip != chip_now {
            return Err(Error::InvalidInput(format!(
                "request id '{}' was answered {}; a retry must carry the same chip certificate chain",
                req.request_id,
                if record.chip.is_some() {
                    "for a chip whose certificate chain verified"
                } else {
                    "without a chip certificate chain"
                }
            )));
        }
        let audit = crate::audit_log::record_in_row(
            &self.node,
            record.audit_chain.as_deref(),
            record.audit_row,
            record.audit_sequence,
        )?;
        let keys = match audit.event {
            keyfab_audit::Event::ProvisionAllowed { keys, .. } => keys,
            _ => {
                return Err(Error::Corrupt(
                    "a device's audit record is not its provisioning".into(),
                ))
            }
        };
        let privates = keys::replayed_privates(&self.node, ctx, &req.device_id, &record)?;
        self.answer(
            ctx,
            req,
            (record.audit_chain, record.audit_sequence),
            keys,
            privates,
            true,
        )
    }

    fn answer(
        &self,
        ctx: &EntitlementContext,
        req: &ProvisionRequest,
        (audit_chain, audit_sequence): (Option<String>, u64),
        audited: Vec<AuditedKey>,
        privates: Vec<Option<SecretBytes>>,
        replayed: bool,
    ) -> Result<Provisioned> {
        let mut keys: Vec<IssuedKey> = ctx
            .policy
            .policy
            .keys
            .iter()
            .zip(audited)
            .zip(privates)
            .map(|((spec, audited), private)| IssuedKey {
                name: spec.name.clone(),
                key_type: spec.key_type,
                source: spec.source,
                key_id: audited.key_id,
                private,
                sealed: None,
                certificate: audited.certificate.map(|c| c.into_vec()),
            })
            .collect();
        let chip_enc = match &req.transport_key {
            Some(chip) => Some(self.seal_to_chip(chip, req, &mut keys)?),
            None => None,
        };
        Ok(Provisioned {
            entitlement: req.entitlement.to_string(),
            device_id: req.device_id.to_string(),
            request_id: req.request_id.to_string(),
            audit_sequence,
            audit_chain,
            replayed,
            keys,
            chain: ctx.chain.clone(),
            chip_enc,
            site: self.node.name.clone(),
        })
    }

    /// Replaces every key's clear private part with its sealing to `chip`; returns the
    /// encapsulated key. The clear parts are dropped (zeroized) here.
    fn seal_to_chip(
        &self,
        chip: &HpkePublicKey,
        req: &ProvisionRequest,
        keys: &mut [IssuedKey],
    ) -> Result<Vec<u8>> {
        let with_private: Vec<(&str, &[u8])> = keys
            .iter()
            .filter_map(|k| k.private.as_ref().map(|p| (k.name.as_str(), p.expose())))
            .collect();
        let binding = keyfab_formats::chip::Binding {
            site: &self.node.name,
            entitlement: &req.entitlement,
            device_id: &req.device_id,
        };
        let (enc, sealed) =
            keyfab_formats::chip::seal_keys(chip, &binding, &with_private, self.node.rng.as_ref())?;
        let mut sealed = sealed.into_iter();
        for k in keys.iter_mut() {
            if k.private.take().is_some() {
                k.sealed = sealed.next();
            }
        }
        Ok(enc)
    }
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        // Closing the work queue stops the workers, whose exit closes the committer's.
        self.work.close();
        self.reserve.stop();
        for h in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = h.join();
        }
    }
}

/// How many crypto workers: one core fewer than the machine has (at least one). The
/// committer is the step every request waits for and keeps a core busy; with a worker on
/// every core as well, it shared its core and took batches of fewer decisions. Measured
/// on two cores at concurrency 64 (six alternations, BENCHMARKS.md): one worker 37.7k
/// devices/s against 35.0k with two, the committer's CPU per device 13.5–16.3 µs
/// against 16.8–18.5; the cores' idle moments go to the key reserve.
fn crypto_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

fn crypto_worker(
    node: &Node,
    work: &fair_queue::FairQueue<Work>,
    jobs: &mpsc::Sender<Job>,
    reserve: &key_reserve::KeyReserve,
    cohorts: &cohorts::Cohorts,
) {
    loop {
        let next = work.pop();
        let Some(Work {
            cohort,
            ctx,
            req,
            confirm,
            reply,
        }) = next
        else {
            return;
        };
        let prepared = match confirm {
            Some(_) => Ok((Vec::new(), ChipSeen::Absent)),
            None => keys::prepare(node, &ctx, &req, reserve),
        };
        // Key generation left copies of the new key in the frames below this one.
        keyfab_crypto::secret::scrub_stack();
        match prepared {
            Ok((prepared, chip)) => {
                let job = Job {
                    ctx,
                    req,
                    prepared,
                    chip: Arc::new(chip),
                    confirm,
                    reply: Some(reply),
                };
                let sent = jobs.send(job);
                cohorts.left(cohort);
                if let Err(mpsc::SendError(mut job)) = sent {
                    if let Some(reply) = job.reply.take() {
                        reply.send(Err(Error::Bug("committer stopped".into())));
                    }
                    return;
                }
            }
            Err(e) => {
                cohorts.left(cohort);
                reply.send(Err(e));
            }
        }
    }
}

/// A refusal with what the operator does next, where the policy says: for
/// `approval_required`, which action needs how many approvals of which keys, and the
/// commands that gather them.
fn explained(ctx: &EntitlementContext, e: Error) -> Error {
    use keyfab_node::Code;
    match e {
        Error::Denied {
            code: Code::ApprovalRequired,
            message,
        } => {
            let policy = &ctx.policy.policy;
            let Some(approval) = &policy.approval else {
                return Error::Denied {
                    code: Code::ApprovalRequired,
                    message,
                };
            };
            let keys: Vec<String> = approval
                .approver_keys
                .iter()
                .map(|pem| {
                    keyfab_crypto::sign::VerifyingKey::from_pem(pem).map_or_else(
                        |_| "(unreadable key)".to_owned(),
                        |k| k.fingerprint().to_hex()[..16].to_owned(),
                    )
                })
                .collect();
            let id = &ctx.record.id;
            Error::Denied {
                code: Code::ApprovalRequired,
                message: format!(
                    "{message}: entitlement {id} needs {} approvals of `activate` from distinct keys among {} (fingerprints); at the site: `keyfab site approval request --home HOME --entitlement {id} --action activate --out activate.req`, each approver: `keyfab approver sign --key KEY activate.req --out NAME.approval`, then `keyfab site approval submit --home HOME NAME.approval …`",
                    approval.threshold,
                    keys.join(", ")
                ),
            }
        }
        e => e,
    }
}

fn denied(code: DenyCode, device_id: &str, reason: Option<&str>) -> Error {
    let because = reason.map(|r| format!(" ({r})")).unwrap_or_default();
    Error::Denied {
        code: code.code(),
        message: format!(
            "device '{device_id}' refused by the policy: {}{because}",
            code.code()
        ),
    }
}

/// Every cluster node's reservation of `entitlement` (none on a single node).
pub fn reservations(node: &Node, entitlement: &str) -> Result<Vec<Reservation>> {
    Ok(reservations::all_reservations(node, entitlement)?
        .into_iter()
        .map(|(_, r, _)| r)
        .collect())
}

/// The key of `device_id`'s record under `entitlement` in the devices table: present
/// exactly while the device holds keys the site released.
pub(crate) fn device_record_key(entitlement: &str, device_id: &str) -> Vec<u8> {
    ent_key(entitlement, device_id)
}

/// The counters of an entitlement: devices allowed in all and per day. On a cluster
/// the stored counters also count what nodes hold reserved and have not used yet; that
/// is left out here.
pub fn counters(node: &Node, entitlement: &str) -> Result<Counters> {
    Ok(counters_and_held(node, entitlement)?.0)
}

/// [`counters`], and the devices cluster nodes hold reserved and have not used yet (0
/// on a single node), both from one read.
pub fn counters_and_held(node: &Node, entitlement: &str) -> Result<(Counters, u64)> {
    if !node.store.is_shared() {
        let counters = match node.store.get(Table::Counters, entitlement.as_bytes())? {
            Some(v) => decode(&v.value)?,
            None => Counters::default(),
        };
        return Ok((counters, 0));
    }
    // The ledger and every reservation in one read (one snapshot): a block given back
    // between two reads would be counted as allowed.
    let mut ledger = Counters::default();
    let mut held = Vec::new();
    let own = reservations::reservations_prefix(entitlement);
    for (key, v) in node
        .store
        .scan(Table::Counters, entitlement.as_bytes(), usize::MAX)?
    {
        if key == entitlement.as_bytes() {
            ledger = decode(&v.value)?;
        } else if key.starts_with(&own) {
            held.push(decode::<Reservation>(&v.value)?);
        }
    }
    for r in &held {
        reservations::give_back(&mut ledger, r);
    }
    Ok((ledger, held.iter().map(Reservation::unused).sum()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record a station's request can put in the log, with the longest reason a
    /// policy module may give: what the station sent, once admitted, must leave every
    /// one of them far below what an export carries.
    fn records_of(req: &ProvisionRequest) -> Vec<keyfab_audit::Record> {
        let reason = "\u{10FFFF}".repeat(keyfab_policy_code::MAX_REASON_BYTES / 4);
        let (entitlement, device_id, station) = (
            req.entitlement.to_string(),
            req.device_id.to_string(),
            req.station_text(),
        );
        let request_id = req.request_id.to_string();
        let events = [
            Event::ProvisionDeniedByCode {
                entitlement: entitlement.clone(),
                request_id: request_id.clone(),
                device_id: device_id.clone(),
                station: station.clone(),
                code: "policy_denied".into(),
                reason,
            },
            Event::StationMismatch {
                entitlement: entitlement.clone(),
                action: "provision".into(),
                request_id: Some(request_id),
                device_id: device_id.clone(),
                station: station.clone(),
            },
            Event::DeviceConfirmed {
                entitlement,
                device_id,
                station,
                result: "programmed".into(),
            },
        ];
        events
            .into_iter()
            .map(|event| {
                Head::genesis().next(
                    i64::MAX,
                    "a-site-name-of-sixty-four-characters-aaaaaaaaaaaaaaaaaaaaaaaaaa",
                    event,
                )
            })
            .collect()
    }

    /// One field of a request: short or up to the body cap, of printable ASCII or of any
    /// characters — so that every mix of admitted and oversized fields comes up.
    fn field() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let size = prop_oneof![0usize..=160, 0usize..crate::server::api::MAX_BODY_BYTES];
        let chars = prop_oneof![
            proptest::collection::vec(proptest::char::range('!', '~'), 1..8),
            proptest::collection::vec(proptest::char::any(), 1..8),
        ];
        (size, chars).prop_map(|(n, fill)| fill.iter().cycle().take(n).collect())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Arbitrary station input, up to the API's body cap: either refused before any
        /// decision, or every record it can make fits in an export with room to spare.
        #[test]
        fn no_station_input_makes_a_record_an_export_cannot_carry(
            fields in proptest::collection::vec(field(), 3),
            station in proptest::option::of("[a-z0-9][a-z0-9._-]{0,80}"),
        ) {
            let body = serde_json::json!({
                "request_id": fields[0],
                "entitlement": fields[1],
                "device_id": fields[2],
            })
            .to_string();
            let Ok(mut req) = crate::server::api::parse_provision(body.as_bytes(), "line-1") else {
                return Ok(());
            };
            match station.map(|s| checked::<StationName>(&s)).transpose() {
                Ok(station) => req.station = station,
                Err(_) => return Ok(()),
            }
            for r in records_of(&req) {
                let len = r.to_bytes().len();
                proptest::prop_assert!(len <= keyfab_formats::audit_bundle::MAX_RECORD / 16, "{len} bytes");
            }
        }
    }

    #[test]
    fn ids_beyond_the_bound_are_refused_before_any_decision_and_not_echoed() {
        let long = "D".repeat(65_000);
        let err = ProvisionRequest::parse("e1", &long, "r-1").expect_err("a 65 kB device id");
        assert_eq!(err.code(), keyfab_node::Code::InvalidInput);
        assert!(err.to_string().contains("65000 bytes"), "{err}");
        assert!(err.to_string().len() < 200, "{err}");
        for bad in ["", "has space", "tab\t", "é"] {
            assert_eq!(
                ProvisionRequest::parse("e1", bad, "r-1")
                    .map_err(|e| e.code())
                    .err(),
                Some(keyfab_node::Code::InvalidInput),
                "{bad:?}"
            );
        }
        assert!(ProvisionRequest::parse("e1", "D".repeat(128), "r-1").is_ok());
        // The empty request id is how a confirmation travels: no request may carry it.
        let confirmation = ProvisionRequest::new(
            checked("e1").unwrap(),
            checked("D-1").unwrap(),
            RequestId::confirmation(),
        );
        assert_eq!(
            refuse_confirmation_id(&confirmation).map_err(|e| e.code()),
            Err(keyfab_node::Code::InvalidInput)
        );
    }
}
