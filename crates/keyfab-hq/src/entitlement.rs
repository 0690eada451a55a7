//! Entitlement issue: validate the policy, generate the keys, encrypt to the site, sign.
//!
//! Pool keys are generated chunk by chunk on every core and written straight into the
//! file, so a 1,000,000-device entitlement never holds more than one chunk of keys in
//! memory. HQ keeps only the public identity of each pool key (for reconciliation).

use crate::sites::{get_site, SiteRecord};
use keyfab_crypto::devicekey::{self, DeviceKeyType, KeyId};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::hpke::HpkePublicKey;
use keyfab_crypto::secret::{Secret32, SecretBytes};
use keyfab_crypto::sign::VerifyingKey;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Validity};
use keyfab_formats::entitlement::{
    write_entitlement, Addressing, ChunkRef, ContentSecrets, EntitlementContent, PoolSpec,
    DEFAULT_KEYS_PER_CHUNK,
};
use keyfab_formats::FormatError;
use keyfab_node::{encode, Error, Node, Result};
use keyfab_policy::{KeySource, Policy, PolicyDraft, PolicyError};
use keyfab_store::{Table, Txn};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Reads `policy.toml` and the approver keys it lists (paths relative to the policy
/// file), and returns the validated policy. Nothing is written.
pub fn load_policy(policy_path: &Path) -> Result<Policy> {
    let draft = PolicyDraft::parse(&read_policy_text(policy_path)?)?;
    let base = policy_path.parent().unwrap_or(Path::new("."));
    let mut keys = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for rel in draft.approver_paths() {
        let path = base.join(rel);
        let text = keyfab_formats::read_capped_text(&path, keyfab_formats::MAX_SMALL_INPUT)
            .map_err(|e| {
                PolicyError::new("approval.approvers", format!("{}: {e}", path.display()))
            })?;
        let key = VerifyingKey::from_pem(&text).map_err(|e| {
            PolicyError::new("approval.approvers", format!("{}: {e}", path.display()))
        })?;
        if !seen.insert(key.fingerprint()) {
            return Err(PolicyError::new(
                "approval.approvers",
                format!("{rel} is the same key as another approver"),
            )
            .into());
        }
        keys.push(key.to_pem());
    }
    let mut roots = Vec::new();
    for rel in draft.chip_root_paths() {
        let path = base.join(rel);
        let refused = |e: &dyn std::fmt::Display| {
            PolicyError::new("chips.roots", format!("{}: {e}", path.display()))
        };
        let bytes = keyfab_formats::read_capped(&path, keyfab_formats::MAX_SMALL_INPUT)
            .map_err(|e| refused(&e))?;
        roots.push(chip_root(&bytes).map_err(|e| refused(&e))?);
    }
    let draft = draft.with_chip_roots(roots)?;
    let draft = match draft.code_path() {
        Some(rel) => {
            let path = base.join(rel);
            let refused = |e: &dyn std::fmt::Display| {
                PolicyError::new("code.module", format!("{}: {e}", path.display()))
            };
            let bytes =
                keyfab_formats::read_capped(&path, 4 * keyfab_policy_code::MAX_MODULE_BYTES)
                    .map_err(|e| refused(&e))?;
            let wasm = keyfab_policy_code::module_bytes(&path, bytes).map_err(|e| refused(&e))?;
            let code = keyfab_policy_code::embed(rel, wasm).map_err(|e| refused(&e))?;
            draft.with_code(code)
        }
        None => draft,
    };
    Ok(draft.finish(keys)?)
}

/// A chip vendor root as a root file holds it (PEM or DER): one CA certificate.
fn chip_root(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let certs = x509::chip::read_chip_chain(bytes).map_err(|e| e.to_string())?;
    let [root] = certs.as_slice() else {
        return Err(format!(
            "{} certificates: list one root per file",
            certs.len()
        ));
    };
    let facts = x509::cert_facts(root).map_err(|e| e.to_string())?;
    if !facts.is_ca {
        return Err(format!(
            "'{}' is not a CA certificate (basicConstraints cA): a root certifies chips, it is not one",
            facts.common_name
        ));
    }
    if root.len() > keyfab_policy::MAX_CHIP_ROOT_BYTES {
        return Err(format!(
            "{} bytes, at most {}",
            root.len(),
            keyfab_policy::MAX_CHIP_ROOT_BYTES
        ));
    }
    Ok(root.clone())
}

/// Largest policy file: room for the largest `id_pattern` and much more.
const MAX_POLICY_BYTES: usize = 4 << 20;

/// The policy file's text: a file that is missing or unreadable is `not_found`; one too
/// large or not UTF-8 is an `invalid_policy`, read in bounded memory.
fn read_policy_text(path: &Path) -> Result<String> {
    let bytes = keyfab_formats::read_capped(path, MAX_POLICY_BYTES).map_err(|e| match e {
        keyfab_formats::FormatError::Io(e) => Error::NotFound(format!("{}: {e}", path.display())),
        other => PolicyError::new("policy", format!("{}: {other}", path.display())).into(),
    })?;
    String::from_utf8(bytes).map_err(|e| {
        PolicyError::new(
            "policy",
            format!(
                "{}: not UTF-8 text (byte {} is not); a policy is TOML, which is UTF-8",
                path.display(),
                e.utf8_error().valid_up_to()
            ),
        )
        .into()
    })
}

/// What HQ remembers about an entitlement it issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedRecord {
    /// The entitlement id.
    pub id: String,
    /// The site it is for.
    pub site: String,
    /// Its per-site sequence number.
    pub sequence: u64,
    /// When HQ made it.
    pub created_at: i64,
    /// The policy it carries.
    pub policy: Policy,
    /// Its batch CA's certificate (DER).
    #[serde(with = "serde_bytes")]
    pub batch_ca_cert: Vec<u8>,
    /// HQ's cluster certificate that issued the batch CA (DER): the middle of every device
    /// chain, even after HQ's certificate is renewed. Absent in records made before it
    /// was kept.
    #[serde(default)]
    pub hq_cluster_cert: Option<serde_bytes::ByteBuf>,
    /// The batch CA key, in HQ's custody: what signs the batch CA's CRLs. Absent in
    /// records made before HQ kept it.
    #[serde(default)]
    pub batch_key: Option<crate::devices::KeptKey>,
    /// The pool keys it carries, per key spec.
    pub pool: Vec<PoolSpec>,
    /// Pool keys per chunk of the file.
    pub keys_per_chunk: u32,
    /// The file's size.
    pub file_bytes: u64,
    /// When HQ revoked it, if it did.
    #[serde(default)]
    pub revoked_at: Option<i64>,
}

/// What `hq entitlement create` asks for.
pub struct CreateRequest<'a> {
    /// The site it is for.
    pub site: &'a str,
    /// The policy it carries.
    pub policy: Policy,
    /// Where the `.kfe` is written (a new file).
    pub out: &'a Path,
    /// Pool keys per chunk of the file.
    pub keys_per_chunk: u32,
    /// Called after each pool chunk with (keys done, keys total).
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

impl<'a> CreateRequest<'a> {
    /// A request with the default chunking and no progress report.
    pub fn new(site: &'a str, policy: Policy, out: &'a Path) -> Self {
        Self {
            site,
            policy,
            out,
            keys_per_chunk: DEFAULT_KEYS_PER_CHUNK,
            progress: None,
        }
    }
}

/// What was created.
#[derive(Debug, Clone)]
pub struct Created {
    /// The entitlement id.
    pub id: String,
    /// Its per-site sequence number.
    pub sequence: u64,
    /// The site it is for.
    pub site: String,
    /// Its quota.
    pub devices: u64,
    /// The pool keys it carries, per key spec.
    pub pool_keys: u64,
    /// The file's size.
    pub bytes: u64,
}

/// 32-byte record of a key's public identity (a KCV is padded with zeros).
pub fn key_id_bytes(id: &KeyId) -> [u8; 32] {
    match id {
        KeyId::Public(f) => f.0,
        KeyId::Kcv(k) => {
            let mut b = [0u8; 32];
            b[..3].copy_from_slice(k);
            b
        }
    }
}

/// Generates `count` keys on all cores; appends their secrets to `secrets` and their
/// identities to `ids`, in order.
pub fn generate_keys(
    kind: DeviceKeyType,
    count: usize,
    rng: &dyn keyfab_crypto::rng::SecureRng,
    secrets: &mut SecretBytes,
    ids: &mut Vec<u8>,
) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(count.max(1));
    let per = count.div_ceil(threads);
    let parts: Vec<Result<(SecretBytes, Vec<u8>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let n = per.min(count.saturating_sub(t * per));
                s.spawn(move || -> Result<(SecretBytes, Vec<u8>)> {
                    let mut sec = SecretBytes::new(Vec::with_capacity(n * 32));
                    let mut id = Vec::with_capacity(n * 32);
                    for _ in 0..n {
                        let (secret, key_id) = devicekey::generate(kind, rng)?;
                        sec.expose_mut().extend_from_slice(secret.expose());
                        id.extend_from_slice(&key_id_bytes(&key_id));
                    }
                    Ok((sec, id))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Bug("key generation thread failed".into())))
            })
            .collect()
    });
    for part in parts {
        let (sec, id) = part?;
        secrets.expose_mut().extend_from_slice(sec.expose());
        ids.extend_from_slice(&id);
    }
    Ok(())
}

/// Key of the row holding the public identities of one pool chunk.
pub(crate) fn pool_ids_key(id: &str, chunk: u64) -> Vec<u8> {
    let mut k = format!("pool/{id}/").into_bytes();
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

pub(crate) fn issued_key(id: &str) -> Vec<u8> {
    format!("ent/{id}").into_bytes()
}

/// Entitlements issued so far, oldest first by id order.
pub fn list_issued(node: &Node) -> Result<Vec<IssuedRecord>> {
    node.store
        .scan(Table::Issued, b"ent/", usize::MAX)?
        .into_iter()
        .map(|(_, v)| keyfab_node::decode(&v.value))
        .collect()
}

/// Reserves the next sequence number for `site`: a crash afterwards burns a number,
/// never reuses one (sites accept only increasing sequences).
pub(crate) fn reserve_sequence(node: &Node, site: &str) -> Result<(SiteRecord, u64)> {
    let (record, version) = get_site(node, site)?;
    let sequence = record.last_sequence + 1;
    let mut reserved = record.clone();
    reserved.last_sequence = sequence;
    let mut txn = Txn::default();
    txn.require_unchanged(Table::Sites, record.name.as_bytes(), Some(&version))
        .put(Table::Sites, record.name.as_bytes(), &encode(&reserved)?);
    if !node.store.commit(txn)?.is_committed() {
        return Err(Error::Conflict(
            "another file for this site is being created; retry".into(),
        ));
    }
    Ok((record, sequence))
}

/// Checks what the policy's device certificates need of the chain above them, and returns
/// when the batch CA must end: every profile encodes, and HQ's cluster certificate and the
/// root last as long as the longest-lived device certificate the site may issue — the
/// window limits when the site issues, never how long what it issued verifies.
fn check_device_chains(node: &Node, policy: &Policy, site: &str) -> Result<i64> {
    let values = keyfab_policy::certificate::TemplateValues {
        product: &policy.product,
        site,
        entitlement: "00000000000000000000000000000000",
    };
    for (i, key) in policy.keys.iter().enumerate() {
        if let Some(t) = &key.certificate {
            keyfab_formats::device_profile::device_profile(t, &values)
                .map_err(|e| PolicyError::new(format!("keys[{i}].certificate"), e.to_string()))?;
        }
    }
    let Some(end) = policy.certificates_end() else {
        return Ok(policy.valid_until);
    };
    let longest = policy
        .keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| k.certificate.as_ref().map(|c| (i, c.days)))
        .max_by_key(|(_, days)| match days {
            keyfab_policy::Lifetime::Days(d) => i64::from(*d),
            keyfab_policy::Lifetime::Forever => i64::MAX,
        });
    let (index, days) = longest.ok_or_else(|| Error::Bug("certificate lifetime".into()))?;
    for (what, cert, fix) in [
        (
            "HQ's cluster certificate",
            node.cluster_cert()?,
            "issue HQ a cluster certificate that lasts longer (`keyfab pki issue --role hq --days forever`, then `keyfab hq install-cert`)",
        ),
        (
            "the root certificate",
            node.root_cert()?,
            "a root that lasts longer is a new root (`keyfab pki init-root --days forever`)",
        ),
    ] {
        let until = x509::cert_facts(&cert)?.not_after.0;
        if until < end {
            return Err(PolicyError::new(
                format!("keys[{index}].certificate.days"),
                format!(
                    "device certificates issued until {} and valid for {} last until {}, but {what} ends {}: every device chain would stop verifying then; shorten the days, or {fix}",
                    keyfab_node::rfc3339(policy.valid_until),
                    days.describe(),
                    keyfab_node::rfc3339(end),
                    keyfab_node::rfc3339(until),
                ),
            )
            .into());
        }
    }
    Ok(end)
}

/// Creates an entitlement for a registered site and writes it to `req.out`.
pub fn create(node: &Node, req: CreateRequest<'_>) -> Result<Created> {
    let policy = req.policy;
    policy.validate()?;
    // A window that has already ended would give the site a file it can only refuse
    // with: nothing issued, nothing counted against the site's sequence.
    if policy.valid_until <= node.now().0 {
        return Err(keyfab_policy::PolicyError::new(
            "valid_until",
            format!(
                "{} has already passed (now {}): the site could provision nothing",
                keyfab_node::rfc3339(policy.valid_until),
                keyfab_node::rfc3339(node.now().0)
            ),
        )
        .into());
    }
    let certificates_end = check_device_chains(node, &policy, req.site)?;
    keyfab_node::out_file::check_new(req.out, "no entitlement was created")?;
    let (site, sequence) = reserve_sequence(node, req.site)?;
    let recipient = HpkePublicKey::from_sec1(&site.hpke_key)?;
    let cluster_cert = node.cluster_cert()?;
    let chain = node.service_chain()?;
    let now = node.now();
    let rng = node.rng.as_ref();

    let mut id_bytes = [0u8; 16];
    rng.fill(&mut id_bytes);
    let id = hex::encode(id_bytes);
    let batch_key = x509::BatchKey::generate(match policy.batch_ca_key {
        keyfab_policy::BatchCaKey::EcP256 => x509::BatchKeyType::EcP256,
        keyfab_policy::BatchCaKey::EcP384 => x509::BatchKeyType::EcP384,
    })?;
    let batch_ca_cert = x509::issue_batch_ca(
        node.cluster_signer()?,
        &cluster_cert,
        &batch_key,
        &format!("keyfab batch {id}"),
        Validity {
            not_before: UnixTime(policy.valid_from),
            not_after: UnixTime(certificates_end),
        },
        rng,
    )?;
    let kept_key = crate::devices::keep(node, &id, &batch_key)?;
    let master = Secret32::random(rng);
    let pool: Vec<PoolSpec> = policy
        .keys_from(KeySource::HqPool)
        .map(|k| PoolSpec {
            key: k.name.clone(),
            key_type: k.key_type,
            count: policy.devices,
        })
        .collect();
    let pool_keys: u64 = pool.iter().map(|p| p.count).sum();
    let content = EntitlementContent {
        id: id.clone(),
        sequence,
        hq: node.name.clone(),
        hq_cluster: Fingerprint::of(&cluster_cert).to_hex(),
        site: site.name.clone(),
        created_at: now.0,
        policy: policy.clone(),
        batch_ca_cert: batch_ca_cert.clone(),
        secrets: ContentSecrets {
            batch_ca_key: batch_key.to_pkcs8().expose().to_vec(),
            master_secret: master.expose().to_vec(),
        },
        pool: pool.clone(),
        keys_per_chunk: req.keys_per_chunk,
        acknowledged: site.acknowledged,
        hq_hpke_cert: node.service()?.hpke_cert,
    };
    let addressing = Addressing {
        id: id.clone(),
        sequence,
        hq: node.name.clone(),
        hq_cluster: Fingerprint::of(&cluster_cert),
        site: site.name.clone(),
        recipient: &recipient,
        created_at: now,
    };

    let mut done = 0u64;
    let mut ids_txn = Txn::default();
    let mut fill = |c: ChunkRef, out: &mut SecretBytes| -> keyfab_formats::Result<()> {
        let kind = keyfab_formats::entitlement::device_key_type(pool[c.spec].key_type);
        let mut ids = Vec::with_capacity(c.count as usize * 32);
        generate_keys(kind, c.count as usize, rng, out, &mut ids)
            .map_err(|e| FormatError::Write(e.to_string()))?;
        ids_txn.put(Table::Issued, &pool_ids_key(&id, c.index), &ids);
        if ids_txn.len() >= 64 {
            node.store
                .commit(std::mem::take(&mut ids_txn))
                .map_err(|e| FormatError::Write(e.to_string()))?;
        }
        done += c.count;
        if let Some(p) = req.progress {
            p(done, pool_keys);
        }
        Ok(())
    };
    let signer = node.service_signer()?;
    let written = keyfab_node::out_file::write_new_with(req.out, |file| {
        let mut spool = keyfab_node::out_file::spool_beside(req.out)?;
        write_entitlement(
            keyfab_formats::Output {
                file,
                spool: &mut spool,
            },
            &addressing,
            &content,
            &mut fill,
            signer,
            chain,
            rng,
        )
    });
    let cleanup = |node: &Node| {
        let mut t = Txn::default();
        t.delete_prefix(Table::Issued, format!("pool/{id}/").as_bytes());
        let _ = node.store.commit(t);
    };
    let summary = match written {
        Ok(s) => s,
        Err(e) => {
            cleanup(node);
            return Err(e.into());
        }
    };
    let record = IssuedRecord {
        id: id.clone(),
        site: site.name.clone(),
        sequence,
        created_at: now.0,
        policy: policy.clone(),
        batch_ca_cert,
        hq_cluster_cert: Some(serde_bytes::ByteBuf::from(cluster_cert)),
        batch_key: Some(kept_key),
        pool,
        keys_per_chunk: req.keys_per_chunk,
        file_bytes: summary.bytes,
        revoked_at: None,
    };
    let record_key = issued_key(&id);
    ids_txn.require_absent(Table::Issued, &record_key).put(
        Table::Issued,
        &record_key,
        &encode(&record)?,
    );
    node.store.commit(ids_txn)?;
    Ok(Created {
        id,
        sequence,
        site: site.name,
        devices: policy.devices,
        pool_keys,
        bytes: summary.bytes,
    })
}
