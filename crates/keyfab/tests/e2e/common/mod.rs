//! A world of real homes driven through the real binary.
#![allow(dead_code)]

pub(crate) use keyfab_testkit::forge::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub(crate) const PASS: &str = "integration test passphrase";

pub(crate) struct Out {
    pub code: i32,
    pub json: serde_json::Value,
}

pub(crate) fn keyfab(args: &[&str], now: Option<&str>) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyfab"));
    cmd.arg("--json")
        .args(args)
        .env("KEYFAB_PASSPHRASE", PASS)
        .env_remove("KEYFAB_HOME");
    match now {
        Some(t) => cmd.env("KEYFAB_NOW", t),
        None => cmd.env_remove("KEYFAB_NOW"),
    };
    let out = cmd.output().expect("run keyfab");
    // No command may end by a signal (a crash), whatever it printed before.
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&out.status) {
        panic!(
            "keyfab {args:?} was killed by signal {signal}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of {args:?} is not one JSON document ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Out {
        code: out.status.code().unwrap_or(-1),
        json,
    }
}

pub(crate) fn ok(args: &[&str]) -> serde_json::Value {
    let o = keyfab(args, None);
    assert_eq!(o.code, 0, "{args:?} failed: {}", o.json);
    o.json
}

impl Out {
    /// Asserts the command failed with `exit` and the error `code`, and that its message
    /// says `says`.
    pub(crate) fn assert_error(&self, exit: i32, code: &str, says: &str) {
        assert_eq!(
            (self.code, self.json["error"]["code"].as_str()),
            (exit, Some(code)),
            "{}",
            self.json
        );
        assert!(
            self.json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(says)),
            "{}",
            self.json
        );
    }
}

/// A copy of a home's files into `to` (emptied first), private as the home is — what an
/// operator's `cp -a` or a restored backup gives.
pub(crate) fn copy_home(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

pub(crate) fn s(p: &Path) -> String {
    p.display().to_string()
}

pub(crate) struct World {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub hq: PathBuf,
    pub site: PathBuf,
}

impl World {
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub(crate) fn root(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    ok(&[
        "pki",
        "init-root",
        "--home",
        &s(&root),
        "--subject",
        &format!("CN={name}"),
    ]);
    root
}

pub(crate) fn node(dir: &Path, root: &Path, kind: &str, name: &str) -> PathBuf {
    node_with(dir, root, kind, name, &[], |_| Vec::new()).0
}

/// [`node`] with extra `init` arguments; `unlock` sees what `init` reported and returns
/// the global arguments (unseal share files, say) the commands that open the home need.
/// Returns the home and those arguments.
pub(crate) fn node_with(
    dir: &Path,
    root: &Path,
    kind: &str,
    name: &str,
    init_extra: &[&str],
    unlock: impl FnOnce(&serde_json::Value) -> Vec<String>,
) -> (PathBuf, Vec<String>) {
    let home = dir.join(name);
    let home_arg = s(&home);
    let custody = token_custody(init_extra);
    let mut init = vec![kind, "init", "--home", &home_arg, "--name", name];
    init.extend(init_extra);
    init.extend(custody.iter().map(String::as_str));
    let report = ok(&init);
    let unlock = unlock(&report);
    let crt = s(&dir.join(format!("{name}.crt")));
    ok(&[
        "pki",
        "issue",
        "--home",
        &s(root),
        "--csr",
        &s(&home.join("cluster.csr")),
        "--role",
        kind,
        "--out",
        &crt,
    ]);
    let root_crt = s(&root.join("root.crt"));
    let mut install: Vec<&str> = vec![
        kind,
        "install-cert",
        "--home",
        &home_arg,
        "--cert",
        &crt,
        "--root-cert",
        &root_crt,
    ];
    install.extend(unlock.iter().map(String::as_str));
    ok(&install);
    (home, unlock)
}

/// With `KEYFAB_TEST_CUSTODY=softhsm` (the test script's second pass, with
/// `SOFTHSM2_CONF` set), every home `node` makes keeps its identity keys in a fresh
/// SoftHSM2 token whose user PIN is the test passphrase: the `--custody` arguments for
/// `init`. None otherwise, and none for a home sealed by unseal shares.
fn token_custody(init_extra: &[&str]) -> Vec<String> {
    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    if std::env::var("KEYFAB_TEST_CUSTODY").as_deref() != Ok("softhsm")
        || init_extra.contains(&"--unseal-shares")
    {
        return Vec::new();
    }
    let mut id = [0u8; 6];
    keyfab_crypto::rng::SecureRng::fill(&keyfab_crypto::rng::SystemRng, &mut id);
    let label = format!("kf-test-{}", hex_of(&id));
    // Made in this process, so that this process's own (already initialized) SoftHSM
    // knows the token too when a test opens the home here; one at a time, since each
    // takes the first free slot.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    keyfab_custody_pkcs11::init_token(Path::new(MODULE), &label, "test-so-pin", PASS)
        .expect("initialize a SoftHSM2 token");
    vec![
        "--custody".into(),
        format!("pkcs11:module={MODULE},token={label},sessions=4"),
    ]
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn register(dir: &Path, hq: &Path, site: &Path) {
    let kfi = dir.join(format!(
        "{}.kfi",
        site.file_name().unwrap().to_string_lossy()
    ));
    ok(&[
        "site",
        "identity",
        "export",
        "--home",
        &s(site),
        "--out",
        &s(&kfi),
    ]);
    ok(&["hq", "site", "add", "--home", &s(hq), &s(&kfi)]);
}

pub(crate) fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let root = root(dir.path(), "root");
    let hq = node(dir.path(), &root, "hq", "acme-hq");
    let site = node(dir.path(), &root, "site", "shenzhen-1");
    register(dir.path(), &hq, &site);
    World {
        dir,
        root,
        hq,
        site,
    }
}

pub(crate) const POLICY: &str = r#"
product = "thermostat-v2"
devices = {devices}
valid_from  = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"

[limits]
daily = 1
timezone = "Asia/Shanghai"

[[keys]]
name = "identity"
type = "ec-p256"
source = "hq-pool"
certificate = { subject = "CN={device_id},O=Acme", days = 3650 }

[[keys]]
name = "signing"
type = "ed25519"
source = "hq-pool"

[[keys]]
name = "transport"
type = "aes-256"
source = "hq-pool"
"#;

pub(crate) fn policy(dir: &Path, devices: u64) -> PathBuf {
    let p = dir.join(format!("policy-{devices}.toml"));
    std::fs::write(&p, POLICY.replace("{devices}", &devices.to_string())).unwrap();
    p
}

/// An entitlement of the standard policy for `devices` devices: (file, id).
pub(crate) fn create(w: &World, site: &str, devices: u64, out: &str) -> (PathBuf, String) {
    create_from(w, site, &policy(w.dir.path(), devices), out)
}

/// An entitlement of the policy file `policy`: (file, id).
pub(crate) fn create_from(w: &World, site: &str, policy: &Path, out: &str) -> (PathBuf, String) {
    let out = w.path(out);
    let o = try_create(w, site, policy, &out);
    assert_eq!(o.code, 0, "entitlement create failed: {}", o.json);
    (out, o.json["id"].as_str().unwrap().to_owned())
}

/// `hq entitlement create` of `policy` for `site` into `out`, however it ends.
pub(crate) fn try_create(w: &World, site: &str, policy: &Path, out: &Path) -> Out {
    keyfab(
        &[
            "hq",
            "entitlement",
            "create",
            "--home",
            &s(&w.hq),
            "--site",
            site,
            "--policy",
            &s(policy),
            "--out",
            &s(out),
        ],
        None,
    )
}

/// An entitlement of the policy `text` (written to `name`.toml), created at HQ and
/// imported at `w`'s site: its id.
pub(crate) fn imported(w: &World, text: &str, name: &str) -> String {
    let policy = w.path(&format!("{name}.toml"));
    std::fs::write(&policy, text).unwrap();
    let (kfe, id) = create_from(w, "shenzhen-1", &policy, &format!("{name}.kfe"));
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    id
}

/// The arguments of `site provision` for the lot of device ids in `list`, into `out`.
pub(crate) fn lot_args(site: &Path, id: &str, list: &Path, out: &Path) -> Vec<String> {
    ["site", "provision", "--home", &s(site), "--entitlement", id]
        .into_iter()
        .map(str::to_owned)
        .chain(["--device-ids".into(), s(list), "--out".into(), s(out)])
        .collect()
}

/// Writes `ids` into the world's `lot.txt` and provisions them as a lot into `out`, with
/// `extra` arguments: the command's report.
pub(crate) fn provision_lot(
    w: &World,
    id: &str,
    ids: &[String],
    out: &Path,
    extra: &[&str],
) -> serde_json::Value {
    let list = w.path("lot.txt");
    std::fs::write(&list, ids.join("\n")).unwrap();
    let mut args = lot_args(&w.site, id, &list, out);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `site provision` of one device, with `extra` arguments, at `now` (default: the clock).
pub(crate) fn provision(
    w: &World,
    id: &str,
    device: &str,
    extra: &[&str],
    now: Option<&str>,
) -> Out {
    provision_in(&w.site, id, device, extra, now)
}

/// [`provision`] at the site whose home is `home`.
pub(crate) fn provision_in(
    home: &Path,
    id: &str,
    device: &str,
    extra: &[&str],
    now: Option<&str>,
) -> Out {
    let mut args = vec![
        "site",
        "provision",
        "--home",
        home.to_str().unwrap(),
        "--entitlement",
        id,
        "--device-id",
        device,
    ];
    args.extend_from_slice(extra);
    keyfab(&args, now)
}

/// SHA-256 of every file under `dir`, by relative path: "unchanged" means byte for byte,
/// except for the store, which redb rewrites the header of on every open and close: it
/// is compared entry by entry (every table, key, value and revision, and the store
/// revision).
pub(crate) fn snapshot(dir: &Path) -> Vec<(String, [u8; 32])> {
    snapshot_with(dir, true)
}

/// Like [`snapshot`], but blind to the store-wide revision counter: what a refused
/// import may advance (it staged rows and took them away again) without changing any
/// key, value or per-key revision.
pub(crate) fn content_snapshot(dir: &Path) -> Vec<(String, [u8; 32])> {
    snapshot_with(dir, false)
}

fn snapshot_with(dir: &Path, with_store_revision: bool) -> Vec<(String, [u8; 32])> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                let digest = if rel.ends_with(".redb") {
                    store_digest(&p, with_store_revision)
                } else {
                    keyfab_crypto::hash::sha256(&std::fs::read(&p).unwrap())
                };
                out.push((rel, digest));
            }
        }
    }
    out.sort();
    out
}

fn store_digest(path: &Path, with_store_revision: bool) -> [u8; 32] {
    use keyfab_store::{EmbeddedStore, Store, Table};
    let store = EmbeddedStore::open(path).unwrap();
    let mut h = keyfab_crypto::hash::Sha256Stream::default();
    if with_store_revision {
        h.update(&store.revision().unwrap().to_be_bytes());
    }
    for t in Table::ALL {
        for (k, v) in store.scan(t, b"", usize::MAX).unwrap() {
            for part in [t.name().as_bytes(), &k, &v.value, &v.revision.to_be_bytes()] {
                h.update(&(part.len() as u64).to_be_bytes());
                h.update(part);
            }
        }
    }
    h.finish()
}

/// `keyfab site entitlement import` of `file` into `site`, at `now` if given.
pub(crate) fn import(site: &Path, file: &Path, now: Option<&str>) -> Out {
    keyfab(
        &[
            "site",
            "entitlement",
            "import",
            "--home",
            &s(site),
            &s(file),
        ],
        now,
    )
}

/// Unlocks a site home in this process, as the engine does.
/// A clock the test moves, for a site opened in this process.
#[derive(Clone)]
pub(crate) struct TestClock(pub std::sync::Arc<std::sync::atomic::AtomicI64>);

impl TestClock {
    pub(crate) fn at(t: i64) -> Self {
        Self(std::sync::Arc::new(std::sync::atomic::AtomicI64::new(t)))
    }
    pub(crate) fn set(&self, t: i64) {
        self.0.store(t, std::sync::atomic::Ordering::SeqCst);
    }
}

impl keyfab_crypto::time::Clock for TestClock {
    fn now(&self) -> keyfab_crypto::time::UnixTime {
        keyfab_crypto::time::UnixTime(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// The site at `home`, opened in this process on `clock`.
pub(crate) fn site_with_clock(home: &Path, clock: &TestClock) -> keyfab_node::Node {
    keyfab_node::Node::open(
        home,
        keyfab_node::NodeKind::Site,
        &keyfab_crypto::secret::SecretBytes::new(PASS.as_bytes().to_vec()),
        Box::new(keyfab_crypto::rng::SystemRng),
        Box::new(clock.clone()),
        &keyfab_backends::Linked,
    )
    .unwrap()
}

pub(crate) fn open_site(home: &Path) -> keyfab_node::Node {
    keyfab_node::Node::open(
        home,
        keyfab_node::NodeKind::Site,
        &keyfab_crypto::secret::SecretBytes::new(PASS.as_bytes().to_vec()),
        Box::new(keyfab_crypto::rng::SystemRng),
        Box::new(keyfab_crypto::time::SystemClock),
        &keyfab_backends::Linked,
    )
    .unwrap()
}

/// `site audit export` of `w`'s site into `name` (in the world's directory).
pub(crate) fn export(w: &World, name: &str) -> PathBuf {
    let out = w.path(name);
    let o = try_export(&w.site, &out);
    assert_eq!(o.code, 0, "export failed: {}", o.json);
    out
}

/// `site audit export` of the site at `home` into `out`, however it ends.
pub(crate) fn try_export(home: &Path, out: &Path) -> Out {
    try_export_at(home, out, None)
}

/// [`try_export`] at `now` (default: the clock).
pub(crate) fn try_export_at(home: &Path, out: &Path, now: Option<&str>) -> Out {
    keyfab(
        &[
            "site",
            "audit",
            "export",
            "--home",
            &s(home),
            "--out",
            &s(out),
        ],
        now,
    )
}

/// The site's log exported into `name`, imported at HQ, and HQ's report (JSON).
pub(crate) fn export_import_report(w: &World, name: &str) -> serde_json::Value {
    let kfa = export(w, name);
    ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&kfa)]);
    ok(&["hq", "report", "--home", &s(&w.hq)])
}

/// Exports the site's log into `name`, imports it at HQ, and requires HQ's report to
/// find no violation: the report.
pub(crate) fn hq_finds_no_violations(w: &World, name: &str) -> serde_json::Value {
    let report = export_import_report(w, name);
    assert_eq!(
        report["violations"].as_array().unwrap().len(),
        0,
        "{report}"
    );
    report
}

/// A running `keyfab site serve`, stopped with SIGTERM when dropped.
pub(crate) struct Server {
    pub child: Child,
    pub addr: String,
    /// Its stderr after the first line (the logs), read as it comes so the pipe never
    /// fills.
    logs: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    pub(crate) fn start(home: &Path) -> Server {
        Self::start_with(home, &[])
    }

    pub(crate) fn start_with(home: &Path, extra: &[&str]) -> Server {
        let (child, stderr) = Self::spawn(home, extra);
        Self::attach(child, stderr)
    }

    /// [`Server::start_with`], its clock at `now` (RFC 3339, `KEYFAB_NOW`).
    pub(crate) fn start_at(home: &Path, now: &str) -> Server {
        let (child, stderr) = Self::spawn_env(home, &[], &[("KEYFAB_NOW", now)]);
        Self::attach(child, stderr)
    }

    /// [`Server::start_with`] with `env` set for the server.
    pub(crate) fn start_env(home: &Path, env: &[(&str, &str)]) -> Server {
        let (child, stderr) = Self::spawn_env(home, &[], env);
        Self::attach(child, stderr)
    }

    pub(crate) fn spawn(home: &Path, extra: &[&str]) -> (Child, std::process::ChildStderr) {
        Self::spawn_env(home, extra, &[])
    }

    pub(crate) fn spawn_env(
        home: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Child, std::process::ChildStderr) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyfab"))
            .envs(env.iter().copied())
            .args(["--json", "site", "serve", "--home", &s(home)])
            .args(["--listen", "127.0.0.1:0", "--handshake-timeout", "1"])
            .args(["--header-timeout", "1"])
            .args(extra)
            .env("KEYFAB_PASSPHRASE", PASS)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        (child, stderr)
    }

    /// The next stderr line.
    pub(crate) fn raw_line(stderr: &mut std::process::ChildStderr) -> Vec<u8> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stderr.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        line
    }

    /// The next stderr line, as JSON (serve's status lines).
    pub(crate) fn line(stderr: &mut std::process::ChildStderr) -> serde_json::Value {
        let line = Self::raw_line(stderr);
        serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("serve said {:?}: {e}", String::from_utf8_lossy(&line)))
    }

    /// Waits for the line that says where it listens (log lines of the sealed wait may
    /// come first), then keeps reading the logs.
    pub(crate) fn attach(child: Child, mut stderr: std::process::ChildStderr) -> Server {
        let addr = loop {
            let line = Self::raw_line(&mut stderr);
            assert!(!line.is_empty(), "serve ended before it listened");
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
            if let Some(addr) = v["listening"].as_str() {
                break addr.to_owned();
            }
        };
        let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Server { child, addr, logs }
    }

    pub(crate) fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub(crate) fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// SIGTERM; the exit status and the one JSON report on stdout.
    pub(crate) fn stop(mut self) -> (i32, serde_json::Value) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        (code, serde_json::from_str(out.trim()).unwrap_or_default())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hq entitlement revoke` of entitlement `id`, written to `out`.
pub(crate) fn revoke(w: &World, id: &str, reason: Option<&str>, out: &Path) -> serde_json::Value {
    let mut args = vec![
        "hq".to_owned(),
        "entitlement".into(),
        "revoke".into(),
        "--home".into(),
        s(&w.hq),
        "--id".into(),
        id.into(),
        "--out".into(),
        s(out),
    ];
    if let Some(reason) = reason {
        args.extend(["--reason".into(), reason.into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&args)
}

/// `site approval request` at `w`'s site for `action` on entitlement `id`, into `out`.
pub(crate) fn approval_request(w: &World, id: &str, action: &str, out: &Path) -> serde_json::Value {
    let o = try_approval_request(w, id, &["--action", action], out);
    assert_eq!(o.code, 0, "site approval request: {}", o.json);
    o.json
}

/// `site approval request` at `w`'s site on entitlement `id` with `action_args` (the
/// action and its parameters), into `out`: however it ends.
pub(crate) fn try_approval_request(w: &World, id: &str, action_args: &[&str], out: &Path) -> Out {
    let (home, out) = (s(&w.site), s(out));
    let mut args = vec![
        "site",
        "approval",
        "request",
        "--home",
        &home,
        "--entitlement",
        id,
    ];
    args.extend_from_slice(action_args);
    args.extend(["--out", out.as_str()]);
    keyfab(&args, None)
}

pub(crate) fn enroll(home: &Path, name: &str, dir: &Path) -> serde_json::Value {
    enroll_with(home, name, dir, &[])
}

/// [`enroll`] with `extra` arguments (`--days N`).
pub(crate) fn enroll_with(
    home: &Path,
    name: &str,
    dir: &Path,
    extra: &[&str],
) -> serde_json::Value {
    let (home, dir) = (s(home), s(dir));
    let mut args = vec![
        "site", "station", "enroll", "--home", &home, "--name", name, "--out", &dir,
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

/// A loopback port free a moment ago, for a listener a test names in advance.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on plain HTTP at `addr`: the whole answer, status line first.
pub(crate) fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    answer
}

/// Moves the time of a record on by a second, in the site's store, as someone with
/// access to it could: the first record of the first row, among those whose key starts
/// with `rows` (`[0]` the site chain's rows, `c/` node chains'), that another record of
/// its chain follows (a later one in the row, or a later row of the chain).
pub(crate) fn edit_audit_record(site: &Path, rows: &[u8]) {
    use keyfab_store::{Table, Txn};
    let node = open_site(site);
    let all: Vec<(Vec<u8>, Vec<u8>)> = node
        .store
        .scan(Table::Audit, rows, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(key, row)| {
            let framed = keyfab_audit::unpack_row(&row.value).unwrap().into_owned();
            (key, framed)
        })
        .collect();
    // A row's key is its chain's prefix, then the first record's sequence (u64 BE).
    let chain_of = |key: &[u8]| key[..key.len() - 8].to_vec();
    let (key, framed) = all
        .iter()
        .enumerate()
        .find(|(i, (key, framed))| {
            keyfab_audit::split_row(framed).unwrap().len() > 1
                || all[i + 1..]
                    .iter()
                    .any(|(k, _)| chain_of(k) == chain_of(key))
        })
        .map(|(_, row)| row.clone())
        .expect("a record that another of its chain follows");
    let records = keyfab_audit::split_row(&framed).unwrap();
    let mut edited = Vec::new();
    for (i, bytes) in records.iter().enumerate() {
        let mut r = keyfab_audit::Record::from_bytes(bytes).unwrap();
        if i == 0 {
            r.time += 1;
        }
        keyfab_audit::frame_into(&mut edited, &r.to_bytes());
    }
    let mut txn = Txn::default();
    txn.put(Table::Audit, &key, &keyfab_audit::pack_row(&edited));
    assert!(node.store.commit(txn).unwrap().is_committed());
}

/// The request id and the command an error after a release names, as the operator
/// would copy them.
pub(crate) fn retry_named(error: &str) -> (String, String) {
    let id = error
        .split("request id ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .expect("the error names the request id")
        .to_owned();
    let command = error
        .lines()
        .last()
        .expect("the error ends with the command")
        .trim()
        .to_owned();
    (id, command)
}

/// `keyfab station COMMAND` as station `dir` of the site at `url`, for `device` of
/// entitlement `id`, with `extra` arguments.
pub(crate) fn station(
    command: &str,
    url: &str,
    dir: &Path,
    id: &str,
    device: &str,
    extra: &[&str],
) -> Out {
    let dir = s(dir);
    let mut args = vec![
        "station",
        command,
        "--url",
        url,
        "--station-dir",
        &dir,
        "--entitlement",
        id,
        "--device-id",
        device,
    ];
    args.extend_from_slice(extra);
    keyfab(&args, None)
}

/// `keyfab station provision` of `device` with request id `request`.
pub(crate) fn station_provision(
    url: &str,
    dir: &Path,
    id: &str,
    device: &str,
    request: &str,
) -> Out {
    station(
        "provision",
        url,
        dir,
        id,
        device,
        &["--request-id", request],
    )
}

/// `hq audit import` of `kfa` with its receipt written to `kfk`: HQ's answer (JSON).
pub(crate) fn hq_import_with_receipt(w: &World, kfa: &Path, kfk: &Path) -> serde_json::Value {
    ok(&[
        "hq",
        "audit",
        "import",
        "--home",
        &s(&w.hq),
        &s(kfa),
        "--receipt-out",
        &s(kfk),
    ])
}

/// A policy whose keys the site makes (no pool: the quota is the only shared thing):
/// product `busy`, 5000 devices.
pub(crate) const SITE_KEYS: &str = r#"product = "busy"
devices = 5000
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"
[[keys]]
name = "identity"
type = "ec-p256"
source = "site"
certificate = { subject = "CN={device_id},O=Acme", days = 365 }
"#;

/// `approver sign` of request `req` with `who`'s key (`who.key` in the world) into
/// `out`, trusting `root`, with `extra` arguments, at `now`: however it ends.
pub(crate) fn try_sign_approval(
    w: &World,
    who: &str,
    (req, root): (&Path, &Path),
    out: &Path,
    extra: &[&str],
    now: Option<&str>,
) -> Out {
    let (key, root, req, out) = (s(&w.path(&format!("{who}.key"))), s(root), s(req), s(out));
    let mut args = vec![
        "approver",
        "sign",
        "--key",
        &key,
        "--root-cert",
        &root,
        &req,
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    keyfab(&args, now)
}

/// [`try_sign_approval`] under the world's root, confirmed with `--yes`; it must succeed.
pub(crate) fn sign_approval(w: &World, who: &str, req: &Path, out: &Path) {
    let root = w.root.join("root.crt");
    let o = try_sign_approval(w, who, (req, &root), out, &["--yes"], None);
    assert_eq!(o.code, 0, "approver sign: {}", o.json);
}

/// `hq device revoke` of `device`'s certificates under `id`, for `reason`, with `extra`
/// arguments: its JSON.
pub(crate) fn revoke_device(
    w: &World,
    id: &str,
    device: &str,
    reason: &str,
    extra: &[&str],
) -> serde_json::Value {
    let hq = s(&w.hq);
    let mut args = vec![
        "hq",
        "device",
        "revoke",
        "--home",
        &hq,
        "--entitlement",
        id,
        "--device-id",
        device,
        "--reason",
        reason,
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

/// `hq manifest` of entitlement `id` in `format` into `name` in the world, with `extra`
/// arguments: its JSON.
pub(crate) fn hq_manifest(
    w: &World,
    id: &str,
    format: &str,
    name: &str,
    extra: &[&str],
) -> serde_json::Value {
    let (home, out) = (s(&w.hq), s(&w.path(name)));
    let mut args = vec![
        "hq",
        "manifest",
        "--home",
        &home,
        "--entitlement",
        id,
        "--format",
        format,
        "--out",
        &out,
    ];
    args.extend(extra);
    ok(&args)
}

/// `site serve` of `home` on any free port when it is expected to refuse to start: its
/// answer.
pub(crate) fn serve_refused(home: &Path) -> Out {
    keyfab(
        &[
            "site",
            "serve",
            "--home",
            &s(home),
            "--listen",
            "127.0.0.1:0",
        ],
        None,
    )
}

/// What HQ finds in a log `w`'s site signs but did not write: `events` as the site's
/// first export, imported at `w`'s HQ — its violations.
pub(crate) fn hq_violations_in_forged_log(
    w: &World,
    events: Vec<(i64, keyfab_audit::Event)>,
) -> Vec<serde_json::Value> {
    let out = w.path("lies.kfa");
    let site = open_site(&w.site);
    write_forged_log(&site, events, &"f".repeat(32), &out);
    drop(site);
    let o = ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&out)]);
    o["violations"].as_array().unwrap().clone()
}

/// `site audit checkpoint` of the site at `home` into `out`: its JSON.
pub(crate) fn checkpoint(home: &Path, out: &Path) -> serde_json::Value {
    ok(&[
        "site",
        "audit",
        "checkpoint",
        "--home",
        &s(home),
        "--out",
        &s(out),
    ])
}
