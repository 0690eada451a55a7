//! A real etcd cluster on loopback, for tests and benchmarks: N members as child
//! processes in a directory the caller owns, on free ports, each of which can be killed
//! (SIGKILL), paused (SIGSTOP), resumed and restarted on its data. Nothing is simulated:
//! these are Debian's `etcd` processes (`etcd-server`), talking raft to each other.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member: its URLs, data, and process (when running).
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster; every member is killed when it is dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<ClusterTls>,
}

/// Files for members that serve clients over TLS and require client certificates, and
/// the client side that reaches them.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The members' server certificate (PEM file).
    pub server_cert: PathBuf,
    /// The members' server key (PEM file).
    pub server_key: PathBuf,
    /// The CA of both the members' and the clients' certificates.
    pub ca: PathBuf,
    /// A client certificate and key the members accept, as files (for `--etcd-cert`,
    /// `--etcd-key`) and loaded.
    pub client_cert: PathBuf,
    /// The client key (PEM file).
    pub client_key: PathBuf,
    /// The same client identity, loaded, for a store to connect with.
    pub client: keyfab_store_etcd::EtcdTls,
}

impl ClusterTls {
    /// A fresh CA in `dir`, a server certificate for 127.0.0.1 and a client certificate
    /// it issued, written as PEM files.
    pub fn generate(dir: &Path) -> std::io::Result<ClusterTls> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let bad = |e: rcgen::Error| std::io::Error::other(e.to_string());
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate().map_err(bad)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca_params.self_signed(&ca_key).map_err(bad)?.pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let issue = |ip: bool| -> std::io::Result<(String, String)> {
            let key = KeyPair::generate().map_err(bad)?;
            let mut params = CertificateParams::new(vec!["localhost".to_owned()]).map_err(bad)?;
            if ip {
                params
                    .subject_alt_names
                    .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
            }
            let cert = params.signed_by(&key, &issuer).map_err(bad)?.pem();
            Ok((cert, key.serialize_pem()))
        };
        let (server_cert, server_key) = issue(true)?;
        let (client_cert, client_key) = issue(false)?;
        let write = |name: &str, text: &str| -> std::io::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            Ok(p)
        };
        Ok(ClusterTls {
            server_cert: write("server.crt", &server_cert)?,
            server_key: write("server.key", &server_key)?,
            ca: write("ca.crt", &ca_pem)?,
            client_cert: write("client.crt", &client_cert)?,
            client_key: write("client.key", &client_key)?,
            client: keyfab_store_etcd::EtcdTls {
                ca_pem: ca_pem.into_bytes(),
                client: Some((client_cert.into_bytes(), client_key.into_bytes().into())),
            },
        })
    }
}

/// A loopback port nobody listens on, and that this process has not handed out before
/// (clusters started side by side by parallel tests must not pick the same one).
pub(crate) fn free_port() -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

fn signal(child: &Child, signal: &str) -> std::io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("kill -{signal} failed")))
    }
}

impl EtcdCluster {
    /// Starts `size` members under `dir` and waits (up to 30 s) until the cluster
    /// answers linearizable reads.
    pub fn start(size: usize, dir: &Path) -> std::io::Result<EtcdCluster> {
        Self::start_with(size, dir, None)
    }

    /// [`EtcdCluster::start`] with members that speak TLS to clients and require a
    /// client certificate.
    pub fn start_with(
        size: usize,
        dir: &Path,
        tls: Option<ClusterTls>,
    ) -> std::io::Result<EtcdCluster> {
        std::fs::create_dir_all(dir)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            let name = format!("m{}", i + 1);
            members.push(Member {
                client_url: format!("{scheme}://127.0.0.1:{}", free_port()?),
                peer_url: format!("http://127.0.0.1:{}", free_port()?),
                data_dir: dir.join(format!("{name}.etcd")),
                log: dir.join(format!("{name}.log")),
                name,
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            tls,
        };
        for i in 0..size {
            cluster.spawn(i, "new")?;
        }
        // A loaded machine (parallel tests, other clusters) can take a while to elect.
        cluster.wait_ready(Duration::from_secs(60))?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize, state: &str) -> std::io::Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let tls = self.tls.clone();
        let m = &mut self.members[i];
        let log = std::fs::File::create(&m.log)?;
        let mut command = Command::new("etcd");
        if let Some(t) = &tls {
            command
                .arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "keyfab-test"])
            // Elections in about a second on loopback, so failure tests do not wait long.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("etcd not found or not runnable ({e}): install etcd-server"),
                )
            })?;
        m.child = Some(child);
        Ok(())
    }

    /// Waits until a linearizable read succeeds through the running members.
    pub fn wait_ready(&self, within: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let endpoints = self.endpoints();
            let client_tls = self.tls.as_ref().map(|t| &t.client);
            if let Ok(store) =
                keyfab_store_etcd::EtcdStore::connect_with(&endpoints, "keyfab-probe", client_tls)
            {
                if keyfab_store::Store::revision(&store).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| {
                        let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(5).collect();
                        format!("{}: {}", m.name, tail.join(" | "))
                    })
                    .collect();
                return Err(std::io::Error::other(format!(
                    "the etcd cluster did not come up; last log lines: {}",
                    logs.join("; ")
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Client URLs of every member (running or not), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The `--store` value naming this cluster: `etcd://127.0.0.1:P1,127.0.0.1:P2,…`
    /// (`etcds://…` over TLS; the certificate files are the caller's to add).
    pub fn store_spec(&self) -> String {
        let hosts: Vec<&str> = self
            .members
            .iter()
            .map(|m| m.client_url.split("://").nth(1).unwrap_or_default())
            .collect();
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", hosts.join(","))
    }

    /// How many members the cluster has.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) -> std::io::Result<()> {
        if let Some(mut child) = self.members[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGSTOP member `i`: it holds its ports and answers nothing.
    pub fn pause(&mut self, i: usize) -> std::io::Result<()> {
        match &self.members[i].child {
            Some(child) => signal(child, "STOP"),
            None => Ok(()),
        }
    }

    /// SIGCONT member `i`.
    pub fn resume(&mut self, i: usize) -> std::io::Result<()> {
        match &self.members[i].child {
            Some(child) => signal(child, "CONT"),
            None => Ok(()),
        }
    }

    /// Starts a killed member again on its data: it rejoins the cluster.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        if self.members[i].child.is_none() {
            self.spawn(i, "existing")?;
        }
        Ok(())
    }

    /// The member that leads now, asked of each running member (`None` while there is
    /// no quorum or during an election).
    pub fn leader(&self) -> Option<usize> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let status = |url: &str| {
            let (url, options) = (url.to_owned(), self.options());
            runtime
                .block_on(async move {
                    let mut c = etcd_client::Client::connect([url], Some(options)).await?;
                    c.status().await
                })
                .ok()
        };
        // Each running member's own id, and whom one of them follows.
        let ids: Vec<Option<u64>> = self
            .members
            .iter()
            .map(|m| {
                m.child.as_ref()?;
                status(&m.client_url)?.header().map(|h| h.member_id())
            })
            .collect();
        let leader = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .find_map(|m| status(&m.client_url).map(|s| s.leader()))
            .filter(|l| *l != 0)?;
        ids.iter().position(|id| *id == Some(leader))
    }

    fn options(&self) -> etcd_client::ConnectOptions {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_millis(500));
        match &self.tls {
            Some(t) => options.with_tls(t.client.options()),
            None => options,
        }
    }

    /// The log file of member `i` (etcd's stderr), for a failing test to show.
    pub fn log(&self, i: usize) -> &Path {
        &self.members[i].log
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                // A paused member must be continued to die promptly.
                let _ = signal(&child, "CONT");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
