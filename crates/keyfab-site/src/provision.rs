//! Provisioning: the decide-and-record step (DESIGN.md), with group commit.
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

mod committer;
pub(crate) mod reservations;

pub use reservations::{Reservation, RESERVATION_LIFE_SECS};

use crate::audit_log::Appender;
use crate::entitlements::{dek_aad, pool_nonce, pool_row_key, EntitlementRecord};
use committer::committer;
use keyfab_audit::Head;
use keyfab_audit::{AuditedKey, Event};
use keyfab_crypto::aead::AeadKey;
use keyfab_crypto::devicekey::{self, DeviceKeyType, KeyId};
use keyfab_crypto::hpke::HpkePublicKey;
use keyfab_crypto::secret::{Secret32, SecretBytes};
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Validity};
use keyfab_node::{decode, encode, Error, Node, Result};
use keyfab_policy::PolicyError;
use keyfab_policy::{
    CompiledPolicy, Decision, DenyCode, EntitlementState, KeySource, KeySpec, KeyType,
};
use keyfab_policy_code::{CodeCounters, Counted, PolicyModule, Verdict};
use keyfab_store::{Table, Txn, Versioned};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{mpsc, Arc, Mutex};

const TIME_HWM: &[u8] = b"time_high_water";

/// How far a node chain's time runs ahead before it raises the site's trusted time.
const SITE_TIME_RAISE_SECS: i64 = 1;
pub(crate) const CLOCK_TOLERANCE: &[u8] = b"clock_tolerance";
/// How far the clock may fall behind the trusted time before provisioning stops, unless
/// the operator set another tolerance (`keyfab site config --clock-tolerance`).
pub const DEFAULT_CLOCK_TOLERANCE_SECS: i64 = 300;
/// The largest tolerance an operator may set: a day.
pub const MAX_CLOCK_TOLERANCE_SECS: i64 = 86_400;

/// One provisioning request, as a station or the CLI sends it.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    pub entitlement: String,
    pub device_id: String,
    pub station: Option<String>,
    /// The same id on a retry returns the same answer and consumes nothing more.
    pub request_id: String,
    /// DER CSR of the device's own key, for keys with source `device`.
    pub csr: Option<Vec<u8>>,
    /// The chip's transport key: the key material is sealed to it (HPKE, FORMATS.md
    /// §10), so whoever carries the answer never sees it in clear.
    pub transport_key: Option<HpkePublicKey>,
}

impl ProvisionRequest {
    /// A request for `device_id` under `entitlement` with no station, CSR or transport
    /// key; set those fields when the request has them.
    pub fn new(
        entitlement: impl Into<String>,
        device_id: impl Into<String>,
        request_id: impl Into<String>,
    ) -> Self {
        Self {
            entitlement: entitlement.into(),
            device_id: device_id.into(),
            station: None,
            request_id: request_id.into(),
            csr: None,
            transport_key: None,
        }
    }
}

/// A key handed to a device.
pub struct IssuedKey {
    pub name: String,
    pub key_type: KeyType,
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

#[derive(Debug)]
pub struct Provisioned {
    pub entitlement: String,
    pub device_id: String,
    pub request_id: String,
    pub audit_sequence: u64,
    /// This answer repeats an earlier one for the same request id.
    pub replayed: bool,
    pub keys: Vec<IssuedKey>,
    /// Issuers of the device certificates, nearest first: batch CA, HQ cluster CA.
    /// With the root certificate, `openssl verify` accepts every device certificate.
    pub chain: Vec<Vec<u8>>,
    /// With a transport key: the HPKE encapsulated key the chip opens the keys with.
    pub chip_enc: Option<Vec<u8>>,
    /// The site's name, part of what a chip package is bound to.
    pub site: String,
}

/// What the site keeps per provisioned device beside its audit record, which holds the
/// key ids and certificates: where that record is, and what a retry needs that the
/// audit must never hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceRecord {
    request_id: String,
    audit_sequence: u64,
    /// Key of the audit row holding that record.
    audit_row: u64,
    /// The node chain of that record; `None` for the site chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit_chain: Option<String>,
    time: i64,
    station: Option<String>,
    pool_index: Option<u64>,
    /// Per key spec: a `site` key's secret sealed under the entitlement's data key (so a
    /// retry gets the same key); empty for other sources.
    sealed: Vec<serde_bytes::ByteBuf>,
    /// What the station reported after programming, and the audit record of it. Once
    /// set, the keys are never handed out again.
    #[serde(default)]
    confirmed: Option<Confirmation>,
    /// Hex SHA-256 of the transport key the keys were sealed to, if any: a retry must
    /// carry the same key, or anyone retrying a request id could have the keys re-sealed
    /// to a key of their own.
    #[serde(default)]
    transport_key: Option<String>,
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
    pub fn as_str(self) -> &'static str {
        match self {
            Programming::Programmed => "programmed",
            Programming::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "programmed" => Some(Programming::Programmed),
            "failed" => Some(Programming::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Confirmation {
    result: Programming,
    audit_sequence: u64,
}

/// A confirmation, recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    pub entitlement: String,
    pub device_id: String,
    pub result: Programming,
    pub audit_sequence: u64,
    /// This repeats an earlier identical confirmation (nothing new was recorded).
    pub repeated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestRecord {
    device_id: String,
    audit_sequence: u64,
    /// `None` when allowed, else the refusal code.
    denied: Option<DenyCode>,
    /// The policy module's reason, when it refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Per-entitlement runtime state (counters, activation, revocation), one record so a
/// decision reads and guards one key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    /// A quorum approved `activate`.
    #[serde(default)]
    pub activated: bool,
    /// HQ revoked the entitlement.
    #[serde(default)]
    pub revoked: bool,
    pub total: u64,
    pub next_pool: u64,
    /// Devices allowed per calendar day (policy time zone), `YYYY-MM-DD` → count.
    pub days: BTreeMap<String, u64>,
    /// Kept only when the policy has a module: its inputs and state.
    #[serde(default, skip_serializing_if = "is_default")]
    pub code: CodeCounters,
    /// Pool slots granted to a cluster node and given back unused, `[start, end)`: the
    /// next grants take these before slots from `next_pool` on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub returned_pool: Vec<(u64, u64)>,
}

fn is_default(c: &CodeCounters) -> bool {
    *c == CodeCounters::default()
}

/// Everything needed to provision under one entitlement, unsealed once.
struct EntitlementContext {
    record: EntitlementRecord,
    policy: CompiledPolicy,
    dek: Secret32,
    aead: AeadKey,
    /// The entitlement's batch CA, its certificate parsed once.
    device_issuer: x509::DeviceIssuer,
    master: Secret32,
    chain: Vec<Vec<u8>>,
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
            confirm: self.confirm,
            reply: None,
        }
    }
}

/// The provisioning engine of one site node. Cheap to share between threads.
///
/// Threads: one crypto worker per core prepares requests (key generation, certificates),
/// then hands them to the one committer. A caller blocks once, for its answer. Keeping
/// crypto to one thread per core, instead of running it on every caller's thread, keeps
/// the committer — the thread every request waits for — scheduled on a busy machine.
pub struct Provisioner {
    node: Arc<Node>,
    contexts: Mutex<HashMap<String, Arc<EntitlementContext>>>,
    work: Mutex<Option<mpsc::Sender<Work>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// A request on its way to a crypto worker.
struct Work {
    ctx: Arc<EntitlementContext>,
    req: ProvisionRequest,
    confirm: Option<Programming>,
    reply: Reply,
}

fn ent_key(entitlement: &str, sub: &str) -> Vec<u8> {
    let mut k = entitlement.as_bytes().to_vec();
    k.push(b'/');
    k.extend_from_slice(sub.as_bytes());
    k
}

/// Key of a refused request in the `devices` table: the device's key ‖ 0x00 ‖ request id.
/// Request ids are scoped to their device (a retry names the same device), and a
/// device's record and its refusals share one key range, so one guard covers them all
/// ([`device_history_end`]). Allowed requests need no row of their own: the device
/// record holds the request id. Device ids that may be provisioned have no control
/// characters and request ids are printable, so no two keys collide.
fn refusal_key(dev_key: &[u8], request_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(dev_key.len() + 1 + request_id.len());
    k.extend_from_slice(dev_key);
    k.push(0);
    k.extend_from_slice(request_id.as_bytes());
    k
}

/// The end of a device's key range: its record and every refusal, `[dev_key, end)`.
fn device_history_end(dev_key: &[u8]) -> Vec<u8> {
    let mut end = dev_key.to_vec();
    end.push(1);
    end
}

/// Key of a refused request in the `requests` table, where stores written before
/// refusals moved next to their device keep them: entitlement ‖ '/' ‖ device id length
/// (u16 BE) ‖ device id ‖ request id. Read, never written.
fn legacy_request_key(entitlement: &str, device_id: &str, request_id: &str) -> Vec<u8> {
    let mut k = entitlement.as_bytes().to_vec();
    k.push(b'/');
    k.extend_from_slice(
        &u16::try_from(device_id.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    k.extend_from_slice(device_id.as_bytes());
    k.extend_from_slice(request_id.as_bytes());
    k
}

fn check_request_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidInput(
            "request id must be 1-128 printable ASCII characters".into(),
        ));
    }
    Ok(())
}

fn device_type(t: KeyType) -> DeviceKeyType {
    match t {
        KeyType::EcP256 => DeviceKeyType::EcP256,
        KeyType::Ed25519 => DeviceKeyType::Ed25519,
        KeyType::Aes256 => DeviceKeyType::Aes256,
    }
}

impl Provisioner {
    pub fn start(node: Arc<Node>) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (work_tx, work_rx) = mpsc::channel::<Work>();
        let work_rx = Arc::new(Mutex::new(work_rx));
        let mut threads = Vec::new();
        let committer_node = node.clone();
        if let Ok(h) = std::thread::Builder::new()
            .name("keyfab-committer".into())
            .spawn(move || committer(&committer_node, &jobs_rx))
        {
            threads.push(h);
        }
        for i in 0..std::thread::available_parallelism().map_or(1, |n| n.get()) {
            let (node, rx, jobs) = (node.clone(), work_rx.clone(), jobs_tx.clone());
            if let Ok(h) = std::thread::Builder::new()
                .name(format!("keyfab-crypto-{i}"))
                .spawn(move || crypto_worker(&node, &rx, &jobs))
            {
                threads.push(h);
            }
        }
        Self {
            node,
            contexts: Mutex::new(HashMap::new()),
            work: Mutex::new(Some(work_tx)),
            threads: Mutex::new(threads),
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
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
        let batch_pkcs8 = keyfab_crypto::aead::open_random_nonce(
            &dek,
            b"batch-ca-key",
            &record.sealed_batch_ca_key,
        )?;
        let master = keyfab_crypto::aead::open_random_nonce(
            &dek,
            b"master-secret",
            &record.sealed_master_secret,
        )?;
        let ctx = Arc::new(EntitlementContext {
            policy: CompiledPolicy::new(record.policy.clone())?,
            aead: AeadKey::new(&dek)?,
            device_issuer: x509::DeviceIssuer::new(
                SigningKey::from_pkcs8(batch_pkcs8.expose())?,
                &record.batch_ca_cert,
            )?,
            master: Secret32::from_slice(master.expose())
                .ok_or_else(|| Error::InvalidState("master secret".into()))?,
            chain: vec![record.batch_ca_cert.clone(), record.hq_cluster_cert.clone()],
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
        check_request_id(&req.request_id)?;
        let ctx = self.context(&req.entitlement)?;
        // A retry is recognised by the committer, which answers it from the record.
        let outcome = self.submit(&ctx, req.clone(), None)?;
        self.provisioned(&ctx, &req, outcome)
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
                keys,
                privates,
            } => self.answer(ctx, req, audit_sequence, keys, privates, false),
            Outcome::Confirmed { .. } => Err(Error::InvalidState("unexpected answer".into())),
        }
    }

    /// Records what the station reports after programming `device_id`: `programmed`, or
    /// `failed` (its keys are burned). Either way its keys are never handed out again. A
    /// repeated identical confirmation is answered from the record; a contradicting one
    /// is refused. Goes through the committer, in order with provisioning.
    pub fn confirm(
        &self,
        entitlement: &str,
        device_id: &str,
        result: Programming,
        station: Option<String>,
    ) -> Result<Confirmed> {
        let ctx = self.context(entitlement)?;
        let req = ProvisionRequest {
            entitlement: entitlement.to_owned(),
            device_id: device_id.to_owned(),
            station,
            request_id: String::new(),
            csr: None,
            transport_key: None,
        };
        match self.submit(&ctx, req, Some(result))? {
            Outcome::Confirmed {
                audit_sequence,
                repeated,
            } => Ok(Confirmed {
                entitlement: entitlement.to_owned(),
                device_id: device_id.to_owned(),
                result,
                audit_sequence,
                repeated,
            }),
            _ => Err(Error::InvalidState("unexpected answer".into())),
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
            .map_err(|_| Error::InvalidState("provisioner stopped".into()))?
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
            .map_err(|_| Error::InvalidState("provisioner stopped".into()))?
    }

    fn enqueue(
        &self,
        ctx: &Arc<EntitlementContext>,
        req: ProvisionRequest,
        confirm: Option<Programming>,
        reply: Reply,
    ) -> Result<()> {
        let work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        let tx = work
            .as_ref()
            .ok_or_else(|| Error::InvalidState("provisioner stopped".into()))?;
        tx.send(Work {
            ctx: ctx.clone(),
            req,
            confirm,
            reply,
        })
        .map_err(|_| Error::InvalidState("provisioner stopped".into()))
    }

    /// [`Provisioner::provision`] for async callers (the station API): the request waits
    /// for its commit without holding a thread.
    pub async fn provision_async(&self, req: ProvisionRequest) -> Result<Provisioned> {
        check_request_id(&req.request_id)?;
        let ctx = self.context(&req.entitlement)?;
        let outcome = self.submit_async(&ctx, req.clone(), None).await?;
        self.provisioned(&ctx, &req, outcome)
    }

    /// Per key spec, the work that needs no shared state.
    fn prepare(
        node: &Node,
        ctx: &EntitlementContext,
        req: &ProvisionRequest,
    ) -> Result<Vec<Prepared>> {
        let rng = node.rng.as_ref();
        let now = node.now();
        let device_key = match &req.csr {
            Some(der) => Some(
                x509::read_device_csr(der)
                    .map_err(|e| Error::InvalidInput(format!("--csr: {e}")))?,
            ),
            None => None,
        };
        if device_key.is_none()
            && ctx
                .policy
                .policy
                .keys_from(KeySource::Device)
                .next()
                .is_some()
        {
            return Err(Error::InvalidInput(
                "this entitlement has keys with source 'device': the request needs the device's CSR".into(),
            ));
        }
        let mut out = Vec::with_capacity(ctx.policy.policy.keys.len());
        for spec in &ctx.policy.policy.keys {
            let kind = device_type(spec.key_type);
            out.push(match spec.source {
                KeySource::HqPool => Prepared::Pool,
                KeySource::Site => {
                    let (secret, e) = devicekey::generate_expanded(kind, rng)?;
                    let cert = certify(ctx, spec, &req.device_id, e.public.as_ref(), now, rng)?;
                    let sealed = ctx.seal_site_key(&req.device_id, &spec.name, &secret, rng)?;
                    Prepared::Ready {
                        key_id: e.key_id,
                        sealed,
                        private: Some(e.private),
                        cert,
                    }
                }
                KeySource::Derived => {
                    let secret =
                        devicekey::derive(&ctx.master, &ctx.record.id, &spec.name, &req.device_id)?;
                    let e = devicekey::expand(kind, &secret)?;
                    Prepared::Ready {
                        key_id: e.key_id,
                        sealed: Vec::new(),
                        private: Some(e.private),
                        cert: None,
                    }
                }
                KeySource::Device => {
                    let public = device_key
                        .clone()
                        .ok_or_else(|| Error::InvalidInput("missing CSR".into()))?;
                    let matches = matches!(
                        (&public, spec.key_type),
                        (x509::DevicePublicKey::P256(_), KeyType::EcP256)
                            | (x509::DevicePublicKey::Ed25519(_), KeyType::Ed25519)
                    );
                    if !matches {
                        return Err(Error::InvalidInput(format!(
                            "the CSR's key is not of type {} as key '{}' requires",
                            spec.key_type.as_str(),
                            spec.name
                        )));
                    }
                    Prepared::Ready {
                        key_id: devicekey::public_key_id(&public),
                        sealed: Vec::new(),
                        private: None,
                        cert: certify(ctx, spec, &req.device_id, Some(&public), now, rng)?,
                    }
                }
            });
        }
        Ok(out)
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
            .ok_or_else(|| Error::InvalidState("request recorded without its device".into()))?;
        let record: DeviceRecord = decode(&v.value)?;
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
        if let Some(c) = record.confirmed {
            return Err(Error::InvalidState(format!(
                "device '{}' was confirmed {} (audit record {}): its keys are not handed out again",
                req.device_id,
                c.result.as_str(),
                c.audit_sequence
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
                return Err(Error::InvalidState(
                    "a device's audit record is not its provisioning".into(),
                ))
            }
        };
        let mut privates = Vec::new();
        for (i, spec) in ctx.policy.policy.keys.iter().enumerate() {
            let secret = match (spec.source, record.pool_index) {
                (KeySource::HqPool, Some(index)) => Some(read_pool_key(&self.node, ctx, i, index)?),
                (KeySource::Site, _) => {
                    let sealed = record
                        .sealed
                        .get(i)
                        .ok_or_else(|| Error::InvalidState("sealed site key".into()))?;
                    Some(unseal_site_key(ctx, &req.device_id, &spec.name, sealed)?)
                }
                (KeySource::Derived, _) => Some(devicekey::derive(
                    &ctx.master,
                    &ctx.record.id,
                    &spec.name,
                    &req.device_id,
                )?),
                _ => None,
            };
            let kind = device_type(spec.key_type);
            privates.push(
                secret
                    .map(|s| devicekey::expand(kind, &s).map(|e| e.private))
                    .transpose()?,
            );
        }
        self.answer(ctx, req, record.audit_sequence, keys, privates, true)
    }

    fn answer(
        &self,
        ctx: &EntitlementContext,
        req: &ProvisionRequest,
        audit_sequence: u64,
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
            entitlement: req.entitlement.clone(),
            device_id: req.device_id.clone(),
            request_id: req.request_id.clone(),
            audit_sequence,
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
        self.work.lock().unwrap_or_else(|p| p.into_inner()).take();
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

fn crypto_worker(node: &Node, work: &Mutex<mpsc::Receiver<Work>>, jobs: &mpsc::Sender<Job>) {
    loop {
        let next = work.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(Work {
            ctx,
            req,
            confirm,
            reply,
        }) = next
        else {
            return;
        };
        let prepared = match confirm {
            Some(_) => Ok(Vec::new()),
            None => Provisioner::prepare(node, &ctx, &req),
        };
        // Key generation left copies of the new key in the frames below this one.
        keyfab_crypto::secret::scrub_stack();
        match prepared {
            Ok(prepared) => {
                let job = Job {
                    ctx,
                    req,
                    prepared,
                    confirm,
                    reply: Some(reply),
                };
                if let Err(mpsc::SendError(mut job)) = jobs.send(job) {
                    if let Some(reply) = job.reply.take() {
                        reply.send(Err(Error::InvalidState("committer stopped".into())));
                    }
                    return;
                }
            }
            Err(e) => reply.send(Err(e)),
        }
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

/// The device certificate for `public` under the key spec's template, if it has one.
fn certify(
    ctx: &EntitlementContext,
    spec: &KeySpec,
    device_id: &str,
    public: Option<&x509::DevicePublicKey>,
    now: UnixTime,
    rng: &dyn keyfab_crypto::rng::SecureRng,
) -> Result<Option<(Vec<u8>, String)>> {
    let (Some(template), Some(public)) = (&spec.certificate, public) else {
        return Ok(None);
    };
    let serial = x509::random_serial(rng);
    let cert = ctx.device_issuer.issue(
        &template.subject.replace("{device_id}", device_id),
        public,
        serial,
        Validity {
            not_before: now,
            not_after: now.plus_days(i64::from(template.days)),
        },
    )?;
    Ok(Some((cert, hex::encode(serial))))
}

impl EntitlementContext {
    fn seal_site_key(
        &self,
        device_id: &str,
        name: &str,
        secret: &Secret32,
        rng: &dyn keyfab_crypto::rng::SecureRng,
    ) -> Result<Vec<u8>> {
        Ok(keyfab_crypto::aead::seal_random_nonce(
            &self.dek,
            rng,
            &site_key_aad(self, device_id, name),
            secret.expose(),
        )?)
    }
}

fn site_key_aad(ctx: &EntitlementContext, device_id: &str, name: &str) -> Vec<u8> {
    format!("keyfab-site-key-v1\0{}\0{device_id}\0{name}", ctx.record.id).into_bytes()
}

fn unseal_site_key(
    ctx: &EntitlementContext,
    device_id: &str,
    name: &str,
    sealed: &[u8],
) -> Result<Secret32> {
    let plain = keyfab_crypto::aead::open_random_nonce(
        &ctx.dek,
        &site_key_aad(ctx, device_id, name),
        sealed,
    )?;
    Secret32::from_slice(plain.expose())
        .ok_or_else(|| Error::InvalidState("site key length".into()))
}

/// The pool spec number (its position in the entitlement's pool) of key spec
/// `spec_index` of the policy.
fn pool_spec_of(ctx: &EntitlementContext, spec_index: usize) -> Result<u8> {
    let pool_spec = ctx
        .record
        .pool
        .iter()
        .position(|p| p.key == ctx.policy.policy.keys[spec_index].name)
        .ok_or_else(|| Error::InvalidState("key spec not in the pool".into()))?;
    u8::try_from(pool_spec).map_err(|_| Error::InvalidState("pool spec".into()))
}

/// Pool rows a batch will likely take, read ahead in one snapshot (on etcd one round
/// trip for the batch instead of one per device), keyed by row key.
type PoolRows = HashMap<Vec<u8>, Versioned>;

/// The pool slots a batch is expected to take, as (request's position in the batch, key
/// spec, slot): each request of an entitlement the next slot after the one before it, in
/// batch order, as long as the entitlement's counters still allow devices
/// ([`room_left`]). Requests beyond that would be refused, so nothing is planned for
/// them: a flood of requests past the quota or the day's limit costs no crypto.
fn plan_pool_slots(st: &Carried, batch: &[Job], now: i64) -> Vec<(usize, usize, u64)> {
    // Per entitlement: how many planned so far, and how many there is room for.
    let mut next_slot: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut plan = Vec::new();
    for (pos, job) in batch.iter().enumerate() {
        let pool_specs = || {
            job.prepared
                .iter()
                .enumerate()
                .filter(|(_, p)| matches!(p, Prepared::Pool))
        };
        if job.confirm.is_some() || pool_specs().next().is_none() {
            continue;
        }
        let ent = job.req.entitlement.as_str();
        let Some((counters, _)) = st.counters.get(ent) else {
            continue;
        };
        // A node chain takes the slots of its reservation, in order; otherwise the
        // entitlement's next slots.
        let reservation = match st.reservations.get(ent) {
            Some((r, _)) if st.chain.is_some() && job.ctx.code.is_none() => Some(r),
            _ => None,
        };
        let (planned, room) = next_slot.entry(ent).or_insert_with(|| {
            let room = match reservation {
                Some(r) => r.room_on(&job.ctx.policy.day_of(now)),
                None => room_left(&job.ctx, counters, now),
            };
            (0, room)
        });
        if *room == 0 {
            continue;
        }
        let slot = match reservation {
            Some(r) => r.nth_slot(*planned),
            None => Some(counters.next_pool + *planned),
        };
        let Some(slot) = slot else { continue };
        plan.extend(pool_specs().map(|(i, _)| (pos, i, slot)));
        *planned += 1;
        *room -= 1;
    }
    plan
}

/// The rows of the planned slots, read in one snapshot (on etcd one round trip for the
/// batch instead of one per device), keyed by row key. A slot not read ahead is read
/// when taken ([`read_pool_key`]).
fn read_pool_rows_ahead(
    store: &dyn keyfab_store::Store,
    batch: &[Job],
    plan: &[(usize, usize, u64)],
) -> Result<PoolRows> {
    if plan.is_empty() {
        return Ok(PoolRows::new());
    }
    let wanted = plan
        .iter()
        .map(|&(pos, i, index)| {
            let ctx = &batch[pos].ctx;
            Ok(pool_row_key(&ctx.record.id, pool_spec_of(ctx, i)?, index))
        })
        .collect::<Result<Vec<_>>>()?;
    let lookups: Vec<(Table, &[u8])> = wanted.iter().map(|k| (Table::Pool, k.as_slice())).collect();
    let found = store.get_many(&lookups)?;
    Ok(wanted
        .into_iter()
        .zip(found)
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect())
}

/// A pool key a batch is expected to take, expanded and certified ahead.
struct PoolKeyReady {
    /// The pool slot it was made for: used only if the decision takes that slot.
    index: u64,
    key_id: KeyId,
    private: SecretBytes,
    cert: Option<(Vec<u8>, String)>,
}

/// The pool keys of `batch` made ready on every core, keyed by (request's position in
/// the batch, key spec). A pool key's slot is known only as the batch is decided, and
/// expanding and certifying it (a scalar multiplication and a signature) on the one
/// committer thread would make the serial step as slow as the crypto; so each request
/// is assumed to take the next slot of its entitlement, in batch order, and its keys are
/// made in parallel before deciding. A request that does not take the slot assumed (a
/// refusal or a retry before it) has its keys made when it is decided instead.
fn make_pool_keys_ahead(
    node: &Node,
    batch: &[Job],
    plan: &[(usize, usize, u64)],
    ahead: &PoolRows,
    now: i64,
) -> HashMap<(usize, usize), PoolKeyReady> {
    let make = |part: &[(usize, usize, u64)]| -> Vec<((usize, usize), PoolKeyReady)> {
        let made = part
            .iter()
            .filter_map(|&(pos, i, index)| {
                let job = &batch[pos];
                let spec = &job.ctx.policy.policy.keys[i];
                let secret = read_pool_key_from(node, ahead, &job.ctx, i, index).ok()??;
                let e = devicekey::expand(device_type(spec.key_type), &secret).ok()?;
                let cert = certify(
                    &job.ctx,
                    spec,
                    &job.req.device_id,
                    e.public.as_ref(),
                    UnixTime(now),
                    node.rng.as_ref(),
                )
                .ok()?;
                Some((
                    (pos, i),
                    PoolKeyReady {
                        index,
                        key_id: e.key_id,
                        private: e.private,
                        cert,
                    },
                ))
            })
            .collect();
        keyfab_crypto::secret::scrub_stack();
        made
    };
    // Asked once: the standard library reads the process's cgroup files for it.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if plan.len() < 2 || cores < 2 {
        return make(plan).into_iter().collect();
    }
    let chunk = plan.len().div_ceil(cores);
    std::thread::scope(|s| {
        let mut parts = plan.chunks(chunk);
        let here = parts.next().unwrap_or(&[]);
        let others: Vec<_> = parts.map(|part| s.spawn(move || make(part))).collect();
        let mut made: HashMap<_, _> = make(here).into_iter().collect();
        for h in others {
            made.extend(h.join().unwrap_or_default());
        }
        made
    })
}

/// How many more devices `counters` allow under the quota and today's limit (none once
/// revoked). An upper bound only: the policy decides each request.
fn room_left(ctx: &EntitlementContext, counters: &Counters, now: i64) -> u64 {
    if counters.revoked {
        return 0;
    }
    let policy = &ctx.policy.policy;
    let room = policy.devices.saturating_sub(counters.total);
    match policy.daily_limit {
        Some(daily) => {
            let today = counters
                .days
                .get(&ctx.policy.day_of(now))
                .copied()
                .unwrap_or(0);
            room.min(daily.saturating_sub(today))
        }
        None => room,
    }
}

fn read_pool_key(
    node: &Node,
    ctx: &EntitlementContext,
    spec_index: usize,
    index: u64,
) -> Result<Secret32> {
    read_pool_key_from(node, &PoolRows::new(), ctx, spec_index, index)?.ok_or_else(|| {
        Error::InvalidState(format!("pool key {index} of '{}' is gone", ctx.record.id))
    })
}

/// [`read_pool_key`], from the rows read ahead when they hold it; `None` if the slot's
/// row is gone (destroyed by a revocation).
fn read_pool_key_from(
    node: &Node,
    ahead: &PoolRows,
    ctx: &EntitlementContext,
    spec_index: usize,
    index: u64,
) -> Result<Option<Secret32>> {
    let spec = pool_spec_of(ctx, spec_index)?;
    let key = pool_row_key(&ctx.record.id, spec, index);
    let stored = match ahead.get(&key) {
        Some(v) => Some(v.clone()),
        None => node.store.get(Table::Pool, &key)?,
    };
    let Some(v) = stored else {
        return Ok(None);
    };
    let plain = ctx.aead.open(pool_nonce(spec, index), &key, &v.value)?;
    Secret32::from_slice(plain.expose())
        .map(Some)
        .ok_or_else(|| Error::InvalidState("pool key length".into()))
}

fn i64_of(bytes: &[u8]) -> Result<i64> {
    Ok(i64::from_be_bytes(
        bytes
            .try_into()
            .map_err(|_| Error::InvalidState("stored time".into()))?,
    ))
}

/// What one batch's decisions start from: the audit head, the trusted time and the
/// counters, with the revisions that guard them; and, as the batch goes, the requests and
/// devices it has decided (so a second request in the same batch sees the first).
struct Carried {
    /// The node chain this engine appends to (a shared store), or `None`: the site chain.
    chain: Option<String>,
    head: Head,
    head_revision: Option<u64>,
    hwm: Option<i64>,
    hwm_revision: Option<u64>,
    counters: HashMap<String, (Counters, Option<u64>)>,
    requests: HashMap<Vec<u8>, RequestRecord>,
    devices: std::collections::HashSet<Vec<u8>>,
    /// Device records confirmed in this batch, as they will be stored.
    confirmed: HashMap<Vec<u8>, DeviceRecord>,
    /// The trusted time this batch wrote, if it did.
    hwm_written: Option<i64>,
    /// Entitlements whose counters this batch wrote.
    touched: Vec<String>,
    /// The settings as last read, with their revisions.
    settings: Option<Settings>,
    /// This node's reservation of each entitlement, with its revision (node chains
    /// only; see `reservations`).
    reservations: HashMap<String, (reservations::Reservation, Option<u64>)>,
    /// Entitlements whose reservation this batch wrote.
    reserved: Vec<String>,
}

/// Settings others may change, as a batch read them.
#[derive(Clone, Copy)]
struct Settings {
    tolerance: i64,
    tolerance_revision: Option<u64>,
    acknowledged_at: i64,
    acknowledged_revision: Option<u64>,
}

impl Carried {
    /// A batch's state not read yet: [`decide_batch`] reads it, with everything else the
    /// batch needs, in one snapshot — on etcd one round trip, which keeps the window in
    /// which another node's commit can invalidate it short.
    fn unread(chain: Option<String>) -> Self {
        Self {
            chain,
            head: Head::genesis(),
            head_revision: None,
            hwm: None,
            hwm_revision: None,
            counters: HashMap::new(),
            requests: HashMap::new(),
            devices: Default::default(),
            confirmed: HashMap::new(),
            hwm_written: None,
            touched: Vec::new(),
            settings: None,
            reservations: HashMap::new(),
            reserved: Vec::new(),
        }
    }

    /// The state after this batch committed at `revision`: what the next batch starts
    /// from without reading it again. Its guards still hold it to account — if another
    /// node committed meanwhile, the next commit fails and the state is read afresh.
    fn committed(mut self, revision: u64) -> Self {
        self.head_revision = Some(revision);
        if let Some(now) = self.hwm_written.take() {
            self.hwm = Some(now);
            self.hwm_revision = Some(revision);
        }
        for ent in std::mem::take(&mut self.touched) {
            if let Some((_, rev)) = self.counters.get_mut(&ent) {
                *rev = Some(revision);
            }
        }
        for ent in std::mem::take(&mut self.reserved) {
            if let Some((_, rev)) = self.reservations.get_mut(&ent) {
                *rev = Some(revision);
            }
        }
        self.requests.clear();
        self.devices.clear();
        self.confirmed.clear();
        self
    }
}

impl Carried {
    /// The counters of `entitlement` as this batch has them, read once per batch; the
    /// entitlement joins `touched` so they are written back with the batch.
    fn counters_of(
        &mut self,
        store: &dyn keyfab_store::Store,
        entitlement: &str,
        touched: &mut Vec<String>,
    ) -> Result<&mut Counters> {
        counters_in(&mut self.counters, store, entitlement, touched)
    }
}

/// [`Carried::counters_of`], on the map alone (so the rest of the state stays free to
/// borrow).
fn counters_in<'m>(
    counters: &'m mut HashMap<String, (Counters, Option<u64>)>,
    store: &dyn keyfab_store::Store,
    entitlement: &str,
    touched: &mut Vec<String>,
) -> Result<&'m mut Counters> {
    if !counters.contains_key(entitlement) {
        let v = store.get(Table::Counters, entitlement.as_bytes())?;
        let c = match &v {
            Some(v) => decode(&v.value)?,
            None => Counters::default(),
        };
        counters.insert(entitlement.to_owned(), (c, v.map(|v| v.revision)));
    }
    if !touched.iter().any(|t| t == entitlement) {
        touched.push(entitlement.to_owned());
    }
    counters
        .get_mut(entitlement)
        .map(|(c, _)| c)
        .ok_or_else(|| Error::InvalidState("counters".into()))
}

/// The decision a policy module's verdict makes, and its reason when it refused.
fn code_decision(verdict: Verdict) -> (Decision, Option<String>) {
    match verdict {
        Verdict::Allow => (Decision::Allow, None),
        Verdict::Deny { reason } => (Decision::Deny(DenyCode::PolicyDenied), Some(reason)),
        Verdict::Error { reason } => (Decision::Deny(DenyCode::PolicyError), Some(reason)),
    }
}

/// Decides one batch: every decision in order, in one transaction (one fsync).
///
/// `optimistic` (a shared store, the state carried from the last commit, no
/// confirmation in the batch): nothing is read — every request and device is taken as
/// new, and the commit is guarded on exactly that (their keys absent, the settings at the
/// revisions last read). If one was not new, the commit fails and the batch is decided
/// again the reading way. On etcd this saves one round trip in the common case.
/// `None`: another live node holds the quota the batch needs (see `reservations`), or
/// the state changed under the batch (a pool slot it took was destroyed by a
/// revocation); nothing was decided, and the batch is decided again shortly from a
/// fresh read.
fn decide_batch(
    node: &Node,
    st: &mut Carried,
    batch: Vec<Job>,
    optimistic: bool,
) -> Result<Option<(Txn, Vec<Result<Outcome>>)>> {
    let store = node.store.as_ref();
    let mut txn = Txn::default();
    let optimistic =
        optimistic && st.settings.is_some() && batch.iter().all(|j| j.confirm.is_none());

    // One snapshot read for the batch: the settings others may change, the log head, the
    // trusted time and the counters of the batch's entitlements, then every request and
    // device of the batch. On a replicated store this is one round trip.
    let keys: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = batch
        .iter()
        .map(|j| {
            let dev_key = ent_key(&j.req.entitlement, &j.req.device_id);
            (
                legacy_request_key(&j.req.entitlement, &j.req.device_id, &j.req.request_id),
                refusal_key(&dev_key, &j.req.request_id),
                dev_key,
            )
        })
        .collect();
    let mut entitlements: Vec<&str> = Vec::new();
    for j in &batch {
        if !entitlements.contains(&j.req.entitlement.as_str()) {
            entitlements.push(&j.req.entitlement);
        }
    }
    let head_key = crate::audit_log::head_key(st.chain.as_deref());
    let mut lookups: Vec<(Table, &[u8])> = vec![
        (Table::Meta, CLOCK_TOLERANCE),
        (Table::Meta, crate::checkpoints::HQ_ACK),
        (Table::Meta, &head_key),
        (Table::Meta, TIME_HWM),
    ];
    lookups.extend(entitlements.iter().map(|e| (Table::Counters, e.as_bytes())));
    let reservation_keys: Vec<Vec<u8>> = match &st.chain {
        Some(chain) => entitlements
            .iter()
            .map(|e| reservations::reservation_key(e, chain))
            .collect(),
        None => Vec::new(),
    };
    lookups.extend(
        reservation_keys
            .iter()
            .map(|k| (Table::Counters, k.as_slice())),
    );
    let shared_state = lookups.len();
    lookups.extend(keys.iter().flat_map(|(legacy, refusal, dev)| {
        [
            (Table::Requests, legacy.as_slice()),
            (Table::Devices, refusal.as_slice()),
            (Table::Devices, dev.as_slice()),
        ]
    }));
    // Read-free batches guard each device's key range below; batches that read guard
    // each device's record as read (on a shared store; the embedded one has no other
    // writer).
    let guard_reads = store.is_shared() && !(st.settings.is_some() && optimistic);
    let mut stored = match (&st.settings, optimistic) {
        (Some(settings), true) => {
            txn.require_revision(Table::Meta, CLOCK_TOLERANCE, settings.tolerance_revision)
                .require_revision(
                    Table::Meta,
                    crate::checkpoints::HQ_ACK,
                    settings.acknowledged_revision,
                );
            // One guard per decision: nothing at all kept for its device — no record,
            // no refusal. (Refusals in the legacy table are only in embedded stores,
            // which always read.)
            for (_, _, dev) in &keys {
                txn.require_absent_range(Table::Devices, dev, &device_history_end(dev));
            }
            vec![None; lookups.len() - shared_state].into_iter()
        }
        _ => {
            let mut read = store.get_many(&lookups)?.into_iter();
            let (tolerance, acknowledged) = (read.next().flatten(), read.next().flatten());
            let (head, hwm) = (read.next().flatten(), read.next().flatten());
            st.head = crate::audit_log::head_from(head.as_ref())?;
            st.head_revision = head.map(|v| v.revision);
            st.hwm = hwm.as_ref().map(|v| i64_of(&v.value)).transpose()?;
            st.hwm_revision = hwm.map(|v| v.revision);
            for ent in &entitlements {
                let v = read.next().flatten();
                let c = match &v {
                    Some(v) => decode(&v.value)?,
                    None => Counters::default(),
                };
                st.counters
                    .insert((*ent).to_owned(), (c, v.map(|v| v.revision)));
            }
            for ent in entitlements.iter().take(reservation_keys.len()) {
                let mine = reservations::reservation_of(read.next().flatten())?;
                st.reservations.insert((*ent).to_owned(), mine);
            }
            st.settings = Some(Settings {
                tolerance: tolerance
                    .as_ref()
                    .map(|v| i64_of(&v.value))
                    .transpose()?
                    .unwrap_or(DEFAULT_CLOCK_TOLERANCE_SECS),
                tolerance_revision: tolerance.map(|v| v.revision),
                acknowledged_at: acknowledged
                    .as_ref()
                    .map(|v| decode::<crate::checkpoints::Acknowledged>(&v.value))
                    .transpose()?
                    .map_or(i64::MIN, |a| a.acknowledged_at),
                acknowledged_revision: acknowledged.map(|v| v.revision),
            });
            read
        }
    };
    let (tolerance, acknowledged_at) = st
        .settings
        .as_ref()
        .map(|s| (s.tolerance, s.acknowledged_at))
        .ok_or_else(|| Error::InvalidState("settings".into()))?;
    if let (true, Some(settings)) = (guard_reads, &st.settings) {
        // As read: a receipt or a tolerance changed meanwhile makes the batch decide
        // again (nodes do not meet on the site chain's head, which records such changes).
        txn.require_revision(Table::Meta, CLOCK_TOLERANCE, settings.tolerance_revision)
            .require_revision(
                Table::Meta,
                crate::checkpoints::HQ_ACK,
                settings.acknowledged_revision,
            );
    }
    // A node chain's head is this engine's alone; the site chain's and the site-wide
    // trusted time are every writer's, so they are guarded on every commit.
    txn.require_revision(Table::Meta, &head_key, st.head_revision);
    if st.chain.is_none() {
        txn.require_revision(Table::Meta, TIME_HWM, st.hwm_revision);
    }
    let mut log = Appender::resume(&node.name, st.chain.as_deref(), st.head);

    let observed = node.now().0;
    // The trusted time: the site's mark, or this chain's last record if later.
    let hwm = st.hwm.unwrap_or(i64::MIN).max(st.head.time);
    if observed < hwm.saturating_sub(tolerance) {
        // Fail closed, and say so in the log.
        log.append(
            &mut txn,
            hwm,
            Event::ClockRollback {
                observed,
                high_water: hwm,
            },
        )?;
        st.head = log.head();
        st.hwm_written = None;
        st.touched.clear();
        log.finish(&mut txn);
        let outcomes = batch
            .iter()
            .map(|_| {
                Err(Error::ClockRollback {
                    observed,
                    high_water: hwm,
                })
            })
            .collect();
        return Ok(Some((txn, outcomes)));
    }
    let now = observed.max(hwm);
    // A node chain keeps its own time in its head; the site's mark, which a node that
    // starts reads as its floor, is raised at most once a second, so nodes seldom
    // collide on it.
    let raise = st.chain.is_none()
        || now
            >= st
                .hwm
                .unwrap_or(i64::MIN)
                .saturating_add(SITE_TIME_RAISE_SECS);
    if raise {
        if st.chain.is_some() {
            txn.require_revision(Table::Meta, TIME_HWM, st.hwm_revision);
        }
        txn.put(Table::Meta, TIME_HWM, &now.to_be_bytes());
        st.hwm_written = Some(now);
    }

    // Node chains decide against their own reservations: per entitlement, how many
    // requests of the batch may take a device from one.
    let mut wanted: Vec<(Arc<EntitlementContext>, u64)> = Vec::new();
    if st.chain.is_some() {
        for job in batch
            .iter()
            .filter(|j| j.confirm.is_none() && j.ctx.code.is_none())
        {
            match wanted
                .iter_mut()
                .find(|(c, _)| c.record.id == job.ctx.record.id)
            {
                Some((_, n)) => *n += 1,
                None => wanted.push((job.ctx.clone(), 1)),
            }
        }
    }
    let reserving_ents: Vec<String> = wanted.iter().map(|(c, _)| c.record.id.clone()).collect();
    // Entitlements whose reservation this batch allowed devices from.
    let mut used_from: Vec<String> = Vec::new();
    // Entitlements whose quota another live node holds: a request refused for the quota
    // or the day's limit there is not refused but waited for (the batch is decided again
    // shortly); requests refused for other reasons need no quota and are decided now.
    let mut held_elsewhere: Vec<String> = Vec::new();
    if let Some(chain) = st.chain.clone() {
        // Make each reservation hold what the batch may take.
        for (ctx, need) in wanted {
            let id = &ctx.record.id;
            let day = day_in(&mut Vec::new(), &ctx, now);
            let mut held = reservations::Held {
                ledger: match st.counters.remove(id) {
                    Some(l) => l,
                    None => reservations::ledger_of(store.get(Table::Counters, id.as_bytes())?)?,
                },
                mine: match st.reservations.remove(id) {
                    Some(m) => m,
                    None => reservations::reservation_of(
                        store.get(Table::Counters, &reservations::reservation_key(id, &chain))?,
                    )?,
                },
            };
            let room = reservations::ensure_room(node, &chain, &ctx, &mut held, need, &day, now);
            st.counters.insert(id.clone(), held.ledger);
            st.reservations.insert(id.clone(), held.mine);
            if let reservations::Room::Wait = room? {
                held_elsewhere.push(id.clone());
            }
        }
    }
    let pool_plan = plan_pool_slots(st, &batch, now);
    let pool_ahead = read_pool_rows_ahead(store, &batch, &pool_plan)?;
    let mut pool_ready = make_pool_keys_ahead(node, &batch, &pool_plan, &pool_ahead, now);
    let mut days: Vec<(String, String)> = Vec::new();
    let mut touched: Vec<String> = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    for (pos, (job, (_, req_key, dev_key))) in batch.into_iter().zip(keys).enumerate() {
        let Job {
            ctx,
            req,
            prepared,
            confirm,
            ..
        } = job;
        let (legacy_request, stored_request, stored_device) = (
            stored.next().flatten(),
            stored.next().flatten(),
            stored.next().flatten(),
        );
        let stored_request = stored_request.or(legacy_request);
        if guard_reads {
            // Read, not assumed: on a shared store another node may decide for the same
            // device meanwhile, and nodes no longer meet on a common log head or
            // counters — the device's record itself is what the commit is guarded on.
            txn.require_unchanged(Table::Devices, &dev_key, stored_device.as_ref());
        }
        if let Some(result) = confirm {
            let outcome = confirm_device(
                &mut txn,
                &mut log,
                now,
                &req,
                result,
                stored_device,
                &mut st.confirmed,
                &dev_key,
            );
            // A policy module may count today's programming failures.
            let first_failure = matches!(
                outcome,
                Ok(Outcome::Confirmed {
                    repeated: false,
                    ..
                })
            ) && result == Programming::Failed;
            if first_failure && ctx.code.is_some() {
                let day = day_in(&mut days, &ctx, now);
                st.counters_of(store, &req.entitlement, &mut touched)?
                    .code
                    .record_failed(&day);
            }
            outcomes.push(outcome);
            continue;
        }
        let earlier = match st.requests.get(&req_key) {
            Some(r) => Some(r.clone()),
            None => stored_request.map(|v| decode(&v.value)).transpose()?,
        };
        if let Some(rr) = earlier {
            outcomes.push(Ok(Outcome::Replay(rr)));
            continue;
        }
        // A device record answers a retry of the request that created it; any other
        // request for that device is refused as already provisioned.
        let already = match (st.devices.contains(&dev_key), stored_device) {
            (true, _) => true,
            (false, Some(v)) => {
                let d: DeviceRecord = decode(&v.value)?;
                if d.request_id == req.request_id {
                    outcomes.push(Ok(Outcome::Replay(RequestRecord {
                        device_id: req.device_id.clone(),
                        audit_sequence: d.audit_sequence,
                        denied: None,
                        reason: None,
                    })));
                    continue;
                }
                true
            }
            (false, None) => false,
        };
        let day = day_in(&mut days, &ctx, now);
        // A node chain decides against its reservation: the ledger counts every grant,
        // so the ledger less this node's unused grant is at least what all nodes allowed,
        // and below each limit while the grant lasts (see `reservations`).
        let reserving = st.chain.is_some() && ctx.code.is_none();
        let (held, next_slot) = match st.reservations.get(&req.entitlement) {
            Some((r, _)) if reserving => (r.room_on(&day), r.nth_slot(0)),
            _ => (0, None),
        };
        let c = if reserving {
            st.counters
                .get_mut(&req.entitlement)
                .map(|(c, _)| c)
                .ok_or_else(|| Error::InvalidState("counters".into()))?
        } else {
            counters_in(&mut st.counters, store, &req.entitlement, &mut touched)?
        };
        let state = EntitlementState {
            revoked: c.revoked,
            activated: c.activated
                || !ctx
                    .policy
                    .policy
                    .requires_approval(keyfab_policy::Action::Activate),
            last_acknowledged: ctx.record.created_at.max(acknowledged_at),
            total: c.total.saturating_sub(held),
            today: c.days.get(&day).copied().unwrap_or(0).saturating_sub(held),
        };
        let built_in = ctx.policy.decide(
            &state,
            &keyfab_policy::Request {
                device_id: &req.device_id,
                station: req.station.as_deref(),
                already_provisioned: already,
            },
            now,
        );
        // The policy module has the last word, in this same transaction.
        let (decision, reason) = match (built_in, &ctx.code) {
            (Decision::Allow, Some(module)) => {
                let counted = Counted {
                    total: c.total,
                    today: state.today,
                };
                // Run here, on the committer: the instance's memory is allocated and freed
                // on one thread, so the allocator reuses it warm. Instantiated on the
                // crypto workers and freed here, it cost 12-17% of throughput (pages
                // purged and faulted in again); here, none measurable (BENCHMARKS.md).
                let evaluation = c.code.evaluate(
                    module,
                    &ctx.policy,
                    now,
                    &day,
                    counted,
                    &req.device_id,
                    req.station.as_deref(),
                );
                code_decision(evaluation.verdict)
            }
            (other, _) => (other, None),
        };
        if let Decision::Deny(DenyCode::QuotaExceeded | DenyCode::DailyLimitExceeded) = decision {
            if held == 0 && held_elsewhere.contains(&req.entitlement) {
                return Ok(None);
            }
        }
        match decision {
            Decision::Deny(code) => {
                let (entitlement, request_id, device_id, station) = (
                    req.entitlement.clone(),
                    req.request_id.clone(),
                    req.device_id.clone(),
                    req.station.clone(),
                );
                let event = match reason.clone() {
                    Some(reason) => Event::ProvisionDeniedByCode {
                        entitlement,
                        request_id,
                        device_id,
                        station,
                        code: code.code().to_owned(),
                        reason,
                    },
                    None => Event::ProvisionDenied {
                        entitlement,
                        request_id,
                        device_id,
                        station,
                        code: code.code().to_owned(),
                    },
                };
                let seq = log.append(&mut txn, now, event)?;
                outcomes.push(Err(denied(code, &req.device_id, reason.as_deref())));
                let rr = RequestRecord {
                    device_id: req.device_id.clone(),
                    audit_sequence: seq,
                    denied: Some(code),
                    reason,
                };
                txn.put(Table::Devices, &req_key, &encode(&rr)?);
                st.requests.insert(req_key, rr);
            }
            Decision::Allow => {
                let has_pool = prepared.iter().any(|p| matches!(p, Prepared::Pool));
                let pool_index = match (has_pool, reserving) {
                    (false, _) => None,
                    (true, false) => Some(c.next_pool),
                    (true, true) => Some(next_slot.ok_or_else(|| {
                        Error::InvalidState("a reservation without pool slots".into())
                    })?),
                };
                let mut keys = Vec::new();
                let mut sealed_keys = Vec::new();
                let mut privates = Vec::new();
                for (i, (spec, p)) in ctx.policy.policy.keys.iter().zip(prepared).enumerate() {
                    let (key_id, sealed, private, cert) = match p {
                        Prepared::Pool => {
                            let index = pool_index
                                .ok_or_else(|| Error::InvalidState("pool index".into()))?;
                            if let Some(ready) = pool_ready
                                .remove(&(pos, i))
                                .filter(|ready| ready.index == index)
                            {
                                (ready.key_id, Vec::new(), Some(ready.private), ready.cert)
                            } else {
                                let kind = device_type(spec.key_type);
                                let Some(secret) =
                                    read_pool_key_from(node, &pool_ahead, &ctx, i, index)?
                                else {
                                    // Destroyed since the state was read (a revocation on
                                    // another node's watch): decide again from a fresh read.
                                    if store.is_shared() {
                                        return Ok(None);
                                    }
                                    return Err(Error::InvalidState(format!(
                                        "pool key {index} of '{}' is gone",
                                        ctx.record.id
                                    )));
                                };
                                let e = devicekey::expand(kind, &secret)?;
                                let cert = certify(
                                    &ctx,
                                    spec,
                                    &req.device_id,
                                    e.public.as_ref(),
                                    UnixTime(now),
                                    node.rng.as_ref(),
                                )?;
                                (e.key_id, Vec::new(), Some(e.private), cert)
                            }
                        }
                        Prepared::Ready {
                            key_id,
                            sealed,
                            private,
                            cert,
                        } => (key_id, sealed, private, cert),
                    };
                    let (certificate, cert_serial) = match cert {
                        Some((c, s)) => (Some(serde_bytes::ByteBuf::from(c)), Some(s)),
                        None => (None, None),
                    };
                    keys.push(AuditedKey {
                        name: spec.name.clone(),
                        key_id: key_id.to_text(),
                        cert_serial,
                        certificate,
                    });
                    sealed_keys.push(serde_bytes::ByteBuf::from(sealed));
                    privates.push(private);
                }
                let seq = log.append(
                    &mut txn,
                    now,
                    Event::ProvisionAllowed {
                        entitlement: req.entitlement.clone(),
                        request_id: req.request_id.clone(),
                        device_id: req.device_id.clone(),
                        station: req.station.clone(),
                        pool_index,
                        keys: keys.clone(),
                    },
                )?;
                if reserving {
                    if let Some((r, _)) = st.reservations.get_mut(&req.entitlement) {
                        r.used += 1;
                        if has_pool {
                            r.take_slot();
                        }
                    }
                    if !used_from.contains(&req.entitlement) {
                        used_from.push(req.entitlement.clone());
                    }
                } else {
                    c.total += 1;
                    if ctx.code.is_some() {
                        c.code.record_allowed(&day, req.station.as_deref());
                    }
                    *c.days.entry(day).or_insert(0) += 1;
                    if has_pool {
                        c.next_pool += 1;
                    }
                }
                let device = DeviceRecord {
                    request_id: req.request_id.clone(),
                    audit_sequence: seq,
                    audit_row: log.row_key().unwrap_or(seq),
                    audit_chain: st.chain.clone(),
                    time: now,
                    station: req.station.clone(),
                    pool_index,
                    sealed: sealed_keys,
                    confirmed: None,
                    transport_key: req.transport_key.as_ref().map(|k| k.fingerprint().to_hex()),
                };
                let rr = RequestRecord {
                    device_id: req.device_id.clone(),
                    audit_sequence: seq,
                    denied: None,
                    reason: None,
                };
                txn.put(Table::Devices, &dev_key, &encode(&device)?);
                st.devices.insert(dev_key);
                st.requests.insert(req_key, rr);
                outcomes.push(Ok(Outcome::Allowed {
                    audit_sequence: seq,
                    keys,
                    privates,
                }));
            }
        }
    }
    for ent in &touched {
        if let Some((c, rev)) = st.counters.get(ent) {
            txn.require_revision(Table::Counters, ent.as_bytes(), *rev);
            txn.put(Table::Counters, ent.as_bytes(), &encode(c)?);
        }
    }
    st.touched = touched;
    // Each reservation decided against: guarded where it was read (one taken back
    // cannot be spent), renewed, and the ledger guarded too (refusals for the limits
    // hold only while no node has gained a grant since).
    for ent in reserving_ents {
        if let (Some((r, rev)), Some((_, ledger_rev))) =
            (st.reservations.get_mut(&ent), st.counters.get(&ent))
        {
            let key = reservations::reservation_key(&ent, st.chain.as_deref().unwrap_or(""));
            txn.require_revision(Table::Counters, ent.as_bytes(), *ledger_rev)
                .require_revision(Table::Counters, &key, *rev);
            // Written (and marked as in use) only when this batch allowed devices from
            // it: a node that only refuses holds its grant as a node that died would,
            // and after `RESERVATION_LIFE_SECS` a node that needs the quota takes it.
            if used_from.contains(&ent) {
                r.seen_at = now;
                txn.put(Table::Counters, &key, &encode(r)?);
                st.reserved.push(ent);
            }
        }
    }
    st.head = log.head();
    log.finish(&mut txn);
    Ok(Some((txn, outcomes)))
}

/// The policy day of `now` for `ctx`'s entitlement, worked out once per batch: every
/// decision of a batch has the same time, and the time-zone conversion is the dearest
/// part of deciding.
fn day_in(days: &mut Vec<(String, String)>, ctx: &EntitlementContext, now: i64) -> String {
    if let Some((_, day)) = days.iter().find(|(id, _)| *id == ctx.record.id) {
        return day.clone();
    }
    let day = ctx.policy.day_of(now);
    days.push((ctx.record.id.clone(), day.clone()));
    day
}

/// Records one confirmation in the batch's transaction.
#[allow(clippy::too_many_arguments)]
fn confirm_device(
    txn: &mut Txn,
    log: &mut Appender,
    now: i64,
    req: &ProvisionRequest,
    result: Programming,
    stored: Option<Versioned>,
    confirmed: &mut HashMap<Vec<u8>, DeviceRecord>,
    dev_key: &[u8],
) -> Result<Outcome> {
    let mut record = match confirmed.get(dev_key) {
        Some(r) => r.clone(),
        None => match stored {
            Some(v) => decode::<DeviceRecord>(&v.value)?,
            None => {
                return Err(Error::NotFound(format!(
                    "device '{}' has no keys under {} to confirm",
                    req.device_id, req.entitlement
                )))
            }
        },
    };
    if let Some(c) = record.confirmed {
        return if c.result == result {
            Ok(Outcome::Confirmed {
                audit_sequence: c.audit_sequence,
                repeated: true,
            })
        } else {
            Err(Error::InvalidState(format!(
                "device '{}' was already confirmed {} (audit record {})",
                req.device_id,
                c.result.as_str(),
                c.audit_sequence
            )))
        };
    }
    let seq = log.append(
        txn,
        now,
        Event::DeviceConfirmed {
            entitlement: req.entitlement.clone(),
            device_id: req.device_id.clone(),
            station: req.station.clone(),
            result: result.as_str().to_owned(),
        },
    )?;
    record.confirmed = Some(Confirmation {
        result,
        audit_sequence: seq,
    });
    txn.put(Table::Devices, dev_key, &encode(&record)?);
    confirmed.insert(dev_key.to_vec(), record);
    Ok(Outcome::Confirmed {
        audit_sequence: seq,
        repeated: false,
    })
}

/// Every cluster node's reservation of `entitlement` (none on a single node).
pub fn reservations(node: &Node, entitlement: &str) -> Result<Vec<Reservation>> {
    Ok(reservations::all_reservations(node, entitlement)?
        .into_iter()
        .map(|(_, r, _)| r)
        .collect())
}

/// The counters of an entitlement: devices allowed in all and per day. On a cluster
/// the stored counters also count what nodes hold reserved and have not used yet; that
/// is left out here.
pub fn counters(node: &Node, entitlement: &str) -> Result<Counters> {
    if !node.store.is_shared() {
        return Ok(
            match node.store.get(Table::Counters, entitlement.as_bytes())? {
                Some(v) => decode(&v.value)?,
                None => Counters::default(),
            },
        );
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
    Ok(ledger)
}
