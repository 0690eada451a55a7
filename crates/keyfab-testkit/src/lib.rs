//! A keyfab world for library-level tests: a root CA, an HQ and a site certified by it,
//! the site registered at HQ — all in the test's process, in a temporary directory, on
//! a clock the test moves. Tests of the engines (the site's decide-and-record step,
//! HQ's reconciliation) build on it instead of on the binary, so each step can be
//! checked on its own.
//!
//! Test code only: it panics on anything unexpected, and never ships in a binary.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness only (never in a binary): anything unexpected stops the test"
)]

pub mod forge;

use keyfab_crypto::rng::SystemRng;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::{Clock, UnixTime};
use keyfab_crypto::x509::{self, Role, Validity};
use keyfab_node::{Backends, BuiltInOnly, CustodyChoice, Node, NodeKind, StoreChoice};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// 2026-06-01T00:00:00Z: where a world's clock starts.
pub const T0: i64 = 1_780_272_000;
/// One day in seconds.
pub const DAY: i64 = 86_400;
/// The site's name in every world.
pub const SITE: &str = "shenzhen-1";

/// A clock the test moves; the nodes read it through their `Clock`.
#[derive(Clone)]
pub struct TestClock(Arc<AtomicI64>);

impl TestClock {
    /// A clock at Unix time `t`.
    pub fn at(t: i64) -> Self {
        Self(Arc::new(AtomicI64::new(t)))
    }

    /// Moves the clock to Unix time `t`.
    pub fn set(&self, t: i64) {
        self.0.store(t, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> UnixTime {
        UnixTime(self.0.load(Ordering::SeqCst))
    }
}

/// The passphrase of every home of a world.
pub fn pass() -> SecretBytes {
    SecretBytes::new(b"keyfab testkit".to_vec())
}

/// The root CA: its key, its certificate (DER), and the validity it gives.
pub struct Root {
    /// The root's signing key.
    pub key: SigningKey,
    /// The root's certificate (DER).
    pub cert: Vec<u8>,
    /// The validity it gives the certificates it issues.
    pub validity: Validity,
}

impl Root {
    /// A root valid from a day before [`T0`] with no end, as `pki init-root` makes it by
    /// default (it is in every device chain, so it outlasts every device certificate).
    pub fn new() -> Self {
        let validity = Validity {
            not_before: UnixTime(T0 - DAY),
            not_after: x509::NO_EXPIRY,
        };
        let key = SigningKey::generate(&SystemRng).expect("root key");
        let cert = x509::root_certificate(&key, "CN=Testkit Root", validity, &SystemRng)
            .expect("root certificate");
        Root {
            key,
            cert,
            validity,
        }
    }

    /// A node of `kind` named `name` in `dir/name`, its state in `store`, its cluster
    /// certificate issued by this root.
    pub fn node(
        &self,
        dir: &Path,
        kind: NodeKind,
        name: &str,
        store: &StoreChoice,
        backends: &dyn Backends,
        clock: &TestClock,
    ) -> Node {
        let home = dir.join(name);
        let mut node = Node::init_with(
            &home,
            kind,
            name,
            &CustodyChoice::Software,
            store,
            backends,
            &pass(),
            Box::new(SystemRng),
            Box::new(clock.clone()),
        )
        .expect("node init");
        let csr = std::fs::read_to_string(home.join(keyfab_node::CSR_FILE)).expect("csr");
        let csr = x509::from_pem(&csr, "CERTIFICATE REQUEST").expect("csr pem");
        let role = match kind {
            NodeKind::Hq => Role::Hq,
            NodeKind::Site => Role::Site,
        };
        let cluster = x509::issue_cluster_certificate(
            &self.key,
            &self.cert,
            &x509::read_csr(&csr).expect("csr"),
            role,
            self.validity,
            &SystemRng,
        )
        .expect("cluster certificate");
        node.install_cert(&cluster, &self.cert)
            .expect("install cert");
        node
    }
}

impl Default for Root {
    fn default() -> Self {
        Self::new()
    }
}

/// HQ `acme-hq` and site [`SITE`], certified by one root, the site registered at HQ.
pub struct World {
    /// The temporary directory holding every home of the world.
    pub dir: tempfile::TempDir,
    /// The clock every node reads.
    pub clock: TestClock,
    /// The root CA that certified HQ and the site.
    pub root: Root,
    /// HQ, the site registered at it.
    pub hq: Node,
    /// The site, shared with the provisioner.
    pub site: Arc<Node>,
}

impl World {
    /// A world whose site keeps its state in an embedded store.
    pub fn new() -> Self {
        Self::on(
            tempfile::tempdir().expect("temp dir"),
            &StoreChoice::Embedded,
            &BuiltInOnly,
        )
    }

    /// A world in `dir` whose site keeps its state in `store`, reached through
    /// `backends` when it is not the embedded store.
    pub fn on(dir: tempfile::TempDir, store: &StoreChoice, backends: &dyn Backends) -> Self {
        let clock = TestClock::at(T0);
        let root = Root::new();
        let hq = root.node(
            dir.path(),
            NodeKind::Hq,
            "acme-hq",
            &StoreChoice::Embedded,
            &BuiltInOnly,
            &clock,
        );
        let site = root.node(dir.path(), NodeKind::Site, SITE, store, backends, &clock);
        let identity = keyfab_site::identity::export_identity(&site).expect("identity");
        keyfab_hq::sites::add_site(&hq, &identity).expect("site add");
        World {
            dir,
            clock,
            root,
            hq,
            site: Arc::new(site),
        }
    }

    /// The site's home.
    pub fn site_home(&self) -> PathBuf {
        self.dir.path().join(SITE)
    }

    /// An entitlement of `policy_text` (with `files` beside it: approver keys, a
    /// module), created at HQ: the `.kfe` file.
    pub fn create(&self, name: &str, policy_text: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        for (file, bytes) in files {
            std::fs::write(dir.join(file), bytes).expect("file");
        }
        let path = dir.join("policy.toml");
        std::fs::write(&path, policy_text).expect("policy");
        let policy = keyfab_hq::entitlement::load_policy(&path).expect("policy loads");
        let out = dir.join("e.kfe");
        let req = keyfab_hq::entitlement::CreateRequest::new(SITE, policy, &out);
        keyfab_hq::entitlement::create(&self.hq, req).expect("entitlement create");
        out
    }

    /// [`World::create`], then imported at the site: its id.
    pub fn entitlement(&self, name: &str, policy_text: &str, files: &[(&str, &[u8])]) -> String {
        let kfe = self.create(name, policy_text, files);
        keyfab_site::entitlements::import(&self.site, &kfe, None)
            .expect("entitlement import")
            .id
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// A policy of `devices` devices valid for 2026, with `extra` TOML after its header and
/// one key of `source` (`site`, `hq-pool`, `derived`…): ec-p256, or aes-256 when derived.
pub fn policy(devices: u64, extra: &str, source: &str) -> String {
    let key_type = if source == "derived" {
        "aes-256"
    } else {
        "ec-p256"
    };
    format!(
        "product = \"p\"\ndevices = {devices}\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2027-01-01T00:00:00Z\"\n{extra}\n\
         [[keys]]\nname = \"identity\"\ntype = \"{key_type}\"\nsource = \"{source}\"\n"
    )
}
