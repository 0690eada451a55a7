//! A TPM 2.0 simulator on loopback for tests and benchmarks: Debian's `swtpm` (package
//! `swtpm`) as a child process, its state in a directory the caller owns, so that it can
//! be stopped, started again on the same state (what survives is what a real TPM's NV
//! memory keeps), or started on an older copy of that state (a TPM that answers lower
//! than it should).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running simulator; killed when dropped.
pub struct Swtpm {
    state: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Swtpm {
    /// Starts a simulator whose state lives in `state` (made if missing), on a free pair
    /// of loopback ports (the TPM command port and, one above it, the control port, as
    /// the TSS's `swtpm` TCTI expects).
    pub fn start(state: &Path) -> std::io::Result<Swtpm> {
        std::fs::create_dir_all(state)?;
        let mut s = Swtpm {
            state: state.to_owned(),
            port: adjacent_free_ports()?,
            child: None,
        };
        s.restart()?;
        Ok(s)
    }

    /// The TSS TCTI configuration that reaches it (`swtpm:host=127.0.0.1,port=P`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The directory its state lives in.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Stops it (SIGKILL: what it has written to its state stays, as a TPM's NV memory
    /// does across a power cut).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on its state, on the same ports, and waits until it answers.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        let log = std::fs::File::create(self.state.join("swtpm.log"))?;
        let child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!(
                "type=tcp,port={},bindaddr=127.0.0.1",
                self.port + 1
            ))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("swtpm (Debian package swtpm) could not start: {e}"),
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("swtpm did not listen within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback port whose next port is free too.
fn adjacent_free_ports() -> std::io::Result<u16> {
    for _ in 0..64 {
        let port = crate::etcd::free_port()?;
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no two adjacent free ports"))
}
