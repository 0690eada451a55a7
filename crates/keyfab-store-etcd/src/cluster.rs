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
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
        std::fs::create_dir_all(dir)?;
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            let name = format!("m{}", i + 1);
            members.push(Member {
                client_url: format!("http://127.0.0.1:{}", free_port()?),
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
        };
        for i in 0..size {
            cluster.spawn(i, "new")?;
        }
        cluster.wait_ready(Duration::from_secs(30))?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize, state: &str) -> std::io::Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let m = &mut self.members[i];
        let log = std::fs::File::create(&m.log)?;
        let child = Command::new("etcd")
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
            if let Ok(store) = crate::EtcdStore::connect(&endpoints, "keyfab-probe") {
                if keyfab_store::Store::revision(&store).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("the etcd cluster did not come up"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Client URLs of every member (running or not), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The `--store` value naming this cluster: `etcd://127.0.0.1:P1,127.0.0.1:P2,…`.
    pub fn store_spec(&self) -> String {
        let hosts: Vec<&str> = self
            .members
            .iter()
            .map(|m| m.client_url.trim_start_matches("http://"))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

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
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(Duration::from_millis(500));
            let status = runtime.block_on(async {
                let mut c =
                    etcd_client::Client::connect([m.client_url.as_str()], Some(options)).await?;
                c.status().await
            });
            if let Ok(s) = status {
                let leader = s.leader();
                // Ask that member which of our members it is.
                for (j, other) in self.members.iter().enumerate() {
                    let options = etcd_client::ConnectOptions::new()
                        .with_connect_timeout(Duration::from_millis(500))
                        .with_timeout(Duration::from_millis(500));
                    let id = runtime.block_on(async {
                        let mut c = etcd_client::Client::connect(
                            [other.client_url.as_str()],
                            Some(options),
                        )
                        .await?;
                        c.status().await
                    });
                    if let Ok(o) = id {
                        if o.header().map(|h| h.member_id()) == Some(leader) && leader != 0 {
                            return Some(j);
                        }
                    }
                }
            }
        }
        None
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
