//! Node home: init, unlock, certificate installation and the service identity.

use crate::backends::{Backends, BuiltInOnly};
use crate::custody_choice::{CustodyChoice, CUSTODY_FILE};
use crate::socket_store::SocketStore;
use crate::store_choice::{StoreChoice, STORE_FILE};
use crate::{Error, Result};
use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::sign::EcdsaSigner;
use keyfab_crypto::time::{Clock, UnixTime};
use keyfab_crypto::x509::{self, Purpose, Role, Validity};
use keyfab_custody::Custody;
use keyfab_store::{Store, Table, Txn};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The sealed software keystore in a home.
pub const KEYSTORE_FILE: &str = "keystore.kfs";
/// The embedded store in a home.
pub const STATE_FILE: &str = "state.redb";
/// The cluster key's certificate request, written by `init` for the root CA.
pub const CSR_FILE: &str = "cluster.csr";
const CLUSTER_KEY: &str = "cluster";
/// Service certificates live this long (or until the cluster certificate ends).
const SERVICE_DAYS: i64 = 365;

/// What a home holds: HQ or a site. Opening a home as the other kind is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Headquarters: policies, entitlements, audit imports.
    Hq,
    /// A factory site: provisioning within the entitlements HQ issued.
    Site,
}

impl NodeKind {
    /// The role its cluster certificate must carry.
    pub fn role(self) -> Role {
        match self {
            NodeKind::Hq => Role::Hq,
            NodeKind::Site => Role::Site,
        }
    }
    fn as_str(self) -> &'static str {
        self.role().as_str()
    }
}

/// The node's current service keys and certificates. `generation` grows with rotation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceIdentity {
    /// 1 for the first identity, one more at each rotation.
    pub generation: u32,
    /// The custody handle of the signing key.
    pub signing_handle: String,
    /// The custody handle of the HPKE key (files for this node are sealed to it).
    pub hpke_handle: String,
    /// The signing key's certificate (DER), issued by the cluster key.
    #[serde(with = "serde_bytes")]
    pub signing_cert: Vec<u8>,
    /// The HPKE key's certificate (DER), issued by the cluster key.
    #[serde(with = "serde_bytes")]
    pub hpke_cert: Vec<u8>,
}

/// An unlocked home: its identity keys, its state, and the randomness and clock every
/// engine step takes from it (injected, so tests are deterministic).
pub struct Node {
    /// HQ or site.
    pub kind: NodeKind,
    /// The home directory.
    pub dir: PathBuf,
    /// The cluster name given at `init` (the site's name, for a site).
    pub name: String,
    /// Identity keys: the software keystore or a PKCS#11 token ([`CustodyChoice`]).
    pub custody: Box<dyn Custody>,
    /// The node's state: the embedded store in its home by default; any backend that
    /// keeps the `keyfab_store::Store` contract (etcd, for a cluster) can stand in.
    pub store: Box<dyn Store>,
    /// Where every key, nonce and id of this node comes from.
    pub rng: Box<dyn SecureRng>,
    /// What "now" is for every decision of this node.
    pub clock: Box<dyn Clock>,
}

fn taken(store: &StoreChoice) -> Error {
    Error::Precondition(format!(
        "the store {} already holds a keyfab node: copy that node's home to add a node to it",
        store.describe()
    ))
}

fn meta(store: &dyn Store, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(store.get(Table::Meta, key.as_bytes())?.map(|v| v.value))
}

impl Node {
    /// Creates a node home: keystore, store, cluster key and `cluster.csr`.
    pub fn init(
        dir: &Path,
        kind: NodeKind,
        name: &str,
        passphrase: &SecretBytes,
        rng: Box<dyn SecureRng>,
        clock: Box<dyn Clock>,
    ) -> Result<Node> {
        Self::init_with(
            dir,
            kind,
            name,
            &CustodyChoice::Software,
            &StoreChoice::Embedded,
            &BuiltInOnly,
            passphrase,
            rng,
            clock,
        )
    }

    /// [`Node::init`] with the identity keys where `custody` says and the state where
    /// `store` says, reached through `backends` when not built in; `secret` is the
    /// keystore passphrase or the token's user PIN.
    #[allow(clippy::too_many_arguments)]
    pub fn init_with(
        dir: &Path,
        kind: NodeKind,
        name: &str,
        custody: &CustodyChoice,
        store: &StoreChoice,
        backends: &dyn Backends,
        secret: &SecretBytes,
        rng: Box<dyn SecureRng>,
        clock: Box<dyn Clock>,
    ) -> Result<Node> {
        check_name(name)?;
        if dir.join(KEYSTORE_FILE).exists()
            || dir.join(CUSTODY_FILE).exists()
            || dir.join(STATE_FILE).exists()
            || dir.join(STORE_FILE).exists()
        {
            return Err(Error::Precondition(format!(
                "{} already holds a keyfab node",
                dir.display()
            )));
        }
        let store_choice = store;
        // A shared store is reached, and found free, before anything is written here: an
        // unreachable cluster or a taken namespace leaves no half-made home behind.
        let shared = match store_choice {
            StoreChoice::Embedded => None,
            StoreChoice::Etcd { .. } => {
                let store = store_choice.open(dir, backends)?;
                if meta(store.as_ref(), "kind")?.is_some() {
                    return Err(taken(store_choice));
                }
                Some(store)
            }
        };
        crate::home::create_private_dir(dir)?;
        let mut custody = custody.create(
            dir,
            &dir.join(KEYSTORE_FILE),
            secret,
            rng.as_ref(),
            backends,
        )?;
        custody.generate_signing_key(CLUSTER_KEY, rng.as_ref())?;
        let store = match shared {
            Some(store) => store,
            None => store_choice.open(dir, backends)?,
        };
        let mut txn = Txn::default();
        txn.require_absent(Table::Meta, b"kind")
            .put(Table::Meta, b"kind", kind.as_str().as_bytes())
            .put(Table::Meta, b"name", name.as_bytes());
        if !store.commit(txn)?.is_committed() {
            return Err(taken(store_choice));
        }
        store_choice.save(dir)?;
        let csr = x509::cluster_csr(custody.signer(CLUSTER_KEY)?, name)?;
        crate::home::write_private_file(
            &dir.join(CSR_FILE),
            x509::to_pem(&csr, "CERTIFICATE REQUEST").as_bytes(),
        )?;
        Ok(Node {
            kind,
            dir: dir.to_owned(),
            name: name.to_owned(),
            custody,
            store,
            rng,
            clock,
        })
    }

    /// Unlocks an existing home of the given kind; a store or custody that is not built
    /// in is reached through `backends`. While a `site serve` holds the home's embedded
    /// store, its store is reached through `HOME/serve.sock`
    /// ([`crate::socket_store`]).
    pub fn open(
        dir: &Path,
        kind: NodeKind,
        passphrase: &SecretBytes,
        rng: Box<dyn SecureRng>,
        clock: Box<dyn Clock>,
        backends: &dyn Backends,
    ) -> Result<Node> {
        Self::open_as(dir, kind, passphrase, (rng, clock), backends, true)
    }

    /// [`Node::open`] for the process that serves the home: the store itself, never one
    /// lent by another process (a second `site serve` on a served home is `in_use`).
    pub fn open_to_serve(
        dir: &Path,
        kind: NodeKind,
        passphrase: &SecretBytes,
        rng: Box<dyn SecureRng>,
        clock: Box<dyn Clock>,
        backends: &dyn Backends,
    ) -> Result<Node> {
        Self::open_as(dir, kind, passphrase, (rng, clock), backends, false)
    }

    fn open_as(
        dir: &Path,
        kind: NodeKind,
        passphrase: &SecretBytes,
        (rng, clock): (Box<dyn SecureRng>, Box<dyn Clock>),
        backends: &dyn Backends,
        borrow_served: bool,
    ) -> Result<Node> {
        if !dir.join(KEYSTORE_FILE).exists() && !dir.join(CUSTODY_FILE).exists() {
            return Err(Error::NotFound(format!(
                "no keyfab {} node in {} (run `keyfab {} init` first)",
                kind.as_str(),
                dir.display(),
                kind.as_str()
            )));
        }
        crate::home::check_private(dir)?;
        let custody =
            CustodyChoice::load(dir)?.open(&dir.join(KEYSTORE_FILE), passphrase, backends)?;
        let store = match StoreChoice::load(dir)?.open(dir, backends) {
            Err(Error::InUse) if borrow_served => {
                match SocketStore::connect(dir, custody.signer(CLUSTER_KEY)?) {
                    Some(served) => Box::new(served?),
                    None => return Err(Error::InUse),
                }
            }
            other => other?,
        };
        let stored_kind = meta(store.as_ref(), "kind")?.unwrap_or_default();
        if stored_kind != kind.as_str().as_bytes() {
            return Err(Error::Precondition(format!(
                "{} holds a {} node, not a {} node",
                dir.display(),
                String::from_utf8_lossy(&stored_kind),
                kind.as_str()
            )));
        }
        let name = String::from_utf8(meta(store.as_ref(), "name")?.unwrap_or_default())
            .map_err(|_| Error::Corrupt("node name".into()))?;
        Ok(Node {
            kind,
            dir: dir.to_owned(),
            name,
            custody,
            store,
            rng,
            clock,
        })
    }

    /// The node as `site serve` runs it: its embedded store lent to the site's commands
    /// through `HOME/serve.sock` ([`crate::socket_store`]), so every writer of it knows
    /// that others commit between its reads and its commits ([`keyfab_store::Hosted`]).
    /// A shared store (etcd) stays as it is.
    pub fn hosting(self) -> Node {
        if self.store.is_shared() {
            return self;
        }
        Node {
            store: Box::new(keyfab_store::Hosted::new(self.store)),
            ..self
        }
    }

    /// The node's clock, read once.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// Installs the cluster certificate the root issued, after checking it against the
    /// root, the role and this node's own cluster key; then issues the service identity.
    pub fn install_cert(
        &mut self,
        cluster_cert: &[u8],
        root_cert: &[u8],
    ) -> Result<ServiceIdentity> {
        if meta(self.store.as_ref(), "cluster_cert")?.is_some() {
            return Err(Error::Precondition(
                "a cluster certificate is already installed".into(),
            ));
        }
        let now = self.now();
        let facts =
            x509::validate_cluster_certificate(root_cert, cluster_cert, self.kind.role(), now)
                .map_err(|e| Error::InvalidInput(format!("certificate refused: {e}")))?;
        let own = self.custody.signer(CLUSTER_KEY)?.verifying_key();
        if facts.public_point.as_deref() != Some(own.sec1()) {
            return Err(Error::InvalidInput(
                "certificate is for another key than this node's cluster key".into(),
            ));
        }
        if facts.common_name != self.name {
            return Err(Error::InvalidInput(format!(
                "certificate names '{}', this node is '{}'",
                facts.common_name, self.name
            )));
        }
        let identity = self.issue_service_identity(1, cluster_cert, facts.not_after)?;
        let mut txn = Txn::default();
        txn.require_absent(Table::Meta, b"cluster_cert")
            .put(Table::Meta, b"root_cert", root_cert)
            .put(Table::Meta, b"cluster_cert", cluster_cert)
            .put(Table::Meta, b"service", &encode(&identity)?);
        if !self.store.commit(txn)?.is_committed() {
            return Err(Error::Precondition(
                "a cluster certificate is already installed".into(),
            ));
        }
        Ok(identity)
    }

    fn issue_service_identity(
        &mut self,
        generation: u32,
        cluster_cert: &[u8],
        cluster_not_after: UnixTime,
    ) -> Result<ServiceIdentity> {
        let now = self.now();
        // The first generation keeps the plain names; later ones add a random tag, so
        // that an attempt whose commit failed cannot block the next with its keys.
        let tag = match generation {
            1 => String::new(),
            _ => {
                let mut t = [0u8; 4];
                self.rng.fill(&mut t);
                format!("-{}", u32::from_be_bytes(t))
            }
        };
        let signing_handle = format!("service-sign-{generation}{tag}");
        let hpke_handle = format!("service-hpke-{generation}{tag}");
        let sign_pub = self
            .custody
            .generate_signing_key(&signing_handle, self.rng.as_ref())?;
        let hpke_pub = self
            .custody
            .generate_hpke_key(&hpke_handle, self.rng.as_ref())?;
        let validity = Validity {
            not_before: now,
            not_after: now.plus_days(SERVICE_DAYS).min(cluster_not_after),
        };
        let cluster = self.custody.signer(CLUSTER_KEY)?;
        let role = self.kind.role();
        let issue = |point: &[u8], what: &str, purpose: Purpose| {
            let req = x509::ServiceCert {
                subject_point: point,
                common_name: &format!("{} {what} {generation}", self.name),
                role,
                purpose,
                validity,
            };
            x509::issue_service_certificate(cluster, cluster_cert, req, self.rng.as_ref())
        };
        let signing_cert = issue(sign_pub.sec1(), "signing", Purpose::Signing)?;
        let hpke_cert = issue(hpke_pub.sec1(), "encryption", Purpose::KeyAgreement)?;
        Ok(ServiceIdentity {
            generation,
            signing_handle,
            hpke_handle,
            signing_cert,
            hpke_cert,
        })
    }

    fn require(&self, key: &str) -> Result<Vec<u8>> {
        meta(self.store.as_ref(), key)?.ok_or_else(|| {
            Error::Precondition(format!(
                "no cluster certificate installed yet (run `keyfab {} install-cert`)",
                self.kind.as_str()
            ))
        })
    }

    /// The root CA certificate (DER) installed with the cluster certificate.
    pub fn root_cert(&self) -> Result<Vec<u8>> {
        self.require("root_cert")
    }

    /// This node's cluster certificate (DER), issued by the root.
    pub fn cluster_cert(&self) -> Result<Vec<u8>> {
        self.require("cluster_cert")
    }

    /// SHA-256 of the cluster certificate: how HQ and the site name each other.
    pub fn cluster_fingerprint(&self) -> Result<Fingerprint> {
        Ok(Fingerprint::of(&self.cluster_cert()?))
    }

    /// The current service identity (signing and HPKE keys with their certificates).
    pub fn service(&self) -> Result<ServiceIdentity> {
        decode(&self.require("service")?)
    }

    /// Earlier service identities, oldest first: their HPKE keys still open what was
    /// sealed to them, their certificates still verify what they signed.
    pub fn service_history(&self) -> Result<Vec<ServiceIdentity>> {
        match meta(self.store.as_ref(), "service_history")? {
            Some(bytes) => decode(&bytes),
            None => Ok(Vec::new()),
        }
    }

    /// Every HPKE key files may be sealed to for this node, the current one first:
    /// its fingerprint and custody handle.
    pub fn recipients(&self) -> Result<Vec<(Fingerprint, String)>> {
        let mut handles = vec![self.service()?.hpke_handle];
        handles.extend(
            self.service_history()?
                .into_iter()
                .rev()
                .map(|s| s.hpke_handle),
        );
        handles
            .into_iter()
            .map(|h| Ok((self.custody.hpke(&h)?.public_key()?.fingerprint(), h)))
            .collect()
    }

    /// The fingerprints of [`Node::recipients`], for checking what a file is addressed to.
    pub fn recipient_fingerprints(&self) -> Result<Vec<Fingerprint>> {
        Ok(self.recipients()?.into_iter().map(|(f, _)| f).collect())
    }

    /// The HPKE key of this node that a file addressed to `recipient` (hex fingerprint)
    /// was sealed to.
    pub fn recipient_for(
        &self,
        recipient: &str,
    ) -> Result<&dyn keyfab_crypto::hpke::HpkeRecipient> {
        let handle = self
            .recipients()?
            .into_iter()
            .find(|(f, _)| f.to_hex() == recipient)
            .map(|(_, h)| h)
            .ok_or_else(|| {
                Error::Precondition(format!(
                    "no service key of this node has fingerprint {recipient}"
                ))
            })?;
        Ok(self.custody.hpke(&handle)?)
    }

    /// New service keys and certificates (the next generation), issued under the
    /// cluster certificate, not yet in use: [`Node::activate_service_identity`] makes
    /// them current in a transaction of the caller's (the site adds its audit record).
    pub fn next_service_identity(&mut self) -> Result<ServiceIdentity> {
        let current = self.service()?;
        let generation = self
            .service_history()?
            .iter()
            .map(|s| s.generation)
            .chain([current.generation])
            .max()
            .unwrap_or(0)
            + 1;
        let cluster_cert = self.cluster_cert()?;
        let not_after = x509::cert_facts(&cluster_cert)?.not_after;
        self.issue_service_identity(generation, &cluster_cert, not_after)
    }

    /// Into `txn`: `next` becomes the service identity; the current one joins the
    /// history (its keys still open, its certificates still verify what they sealed and
    /// signed). Guarded: a concurrent rotation makes the commit fail.
    pub fn activate_service_identity(&self, txn: &mut Txn, next: &ServiceIdentity) -> Result<()> {
        let seen = self.store.get(Table::Meta, b"service")?.ok_or_else(|| {
            Error::Precondition(
                "no service identity yet (install the cluster certificate first)".into(),
            )
        })?;
        let mut history = self.service_history()?;
        history.push(decode(&seen.value)?);
        txn.require_unchanged(Table::Meta, b"service", Some(&seen))
            .put(Table::Meta, b"service", &encode(next)?)
            .put(Table::Meta, b"service_history", &encode(&history)?);
        Ok(())
    }

    /// [`Node::next_service_identity`] and [`Node::activate_service_identity`] in one
    /// commit of their own (HQ, which keeps no audit log of its own actions).
    pub fn rotate_service_keys(&mut self) -> Result<ServiceIdentity> {
        let next = self.next_service_identity()?;
        let mut txn = Txn::default();
        self.activate_service_identity(&mut txn, &next)?;
        if !self.store.commit(txn)?.is_committed() {
            return Err(Error::Conflict(
                "the service identity changed meanwhile; rotate again".into(),
            ));
        }
        Ok(next)
    }

    /// The chain this node signs with: [service signing cert, cluster cert].
    pub fn service_chain(&self) -> Result<Vec<Vec<u8>>> {
        Ok(vec![self.service()?.signing_cert, self.cluster_cert()?])
    }

    /// The cluster CA key (issues service certificates and, at HQ, batch CAs).
    pub fn cluster_signer(&self) -> Result<&dyn EcdsaSigner> {
        Ok(self.custody.signer(CLUSTER_KEY)?)
    }

    /// The current service signing key: what signs this node's files.
    pub fn service_signer(&self) -> Result<&dyn EcdsaSigner> {
        Ok(self.custody.signer(&self.service()?.signing_handle)?)
    }
}

/// Cluster, site and station names: 1–64 of `[a-z0-9._-]`, starting alphanumeric
/// ([`keyfab_policy::ids::name_shape_ok`]).
pub fn check_name(name: &str) -> Result<()> {
    keyfab_policy::SiteName::try_from(name)
        .map(drop)
        .map_err(|_| {
            Error::InvalidInput(format!(
                "name '{name}' must be 1-64 characters of a-z 0-9 . _ - starting with a letter or digit"
            ))
        })
}

/// A stored record's bytes (CBOR).
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| Error::Bug(e.to_string()))?;
    Ok(out)
}

/// A stored record read back; bytes that do not decode are `corrupt`.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    ciborium::from_reader(bytes).map_err(|e| Error::Corrupt(format!("stored record: {e}")))
}

/// A stored record that cannot be read back: the store is damaged.
pub fn decode_err(what: &str) -> Error {
    Error::Corrupt(format!("stored {what} is unreadable"))
}
