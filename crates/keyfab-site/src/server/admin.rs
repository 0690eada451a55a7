//! Station administration while `site serve` holds the site's store: a Unix socket in the
//! site's home (`HOME/serve.sock`, mode 0600), so `keyfab site station enroll | revoke |
//! list` keep working while the line runs. Whoever may open the socket may already read
//! the home; the socket gives no more than the home does.
//!
//! Protocol: one JSON request per connection, one JSON answer, then the connection
//! closes. Requests: `{"op":"station.enroll","name":N,"days":D}`,
//! `{"op":"station.renew","name":N,"days":D}`, `{"op":"station.revoke","name":N}`,
//! `{"op":"status"}`, `{"op":"station.list"}`, and, while a node sealed
//! by shares waits for them ([`wait_for_shares`]), `{"op":"unseal","share":S}` and
//! `{"op":"unseal.status"}`. Answers: `{"ok":…}` or `{"error":{"code","message"}}`.

use crate::stations::{self, StationRecord};
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::x509;
use keyfab_custody::unseal::{UnsealProgress, Unsealer};
use keyfab_node::{Code, Error, Node, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The socket's file name in the site's home.
pub const SOCKET: &str = "serve.sock";

/// Largest request accepted on the socket.
const MAX_REQUEST: u64 = 4096;

/// What a command asks a running `site serve` over its admin socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum AdminRequest {
    /// Enroll a station for `days`.
    #[serde(rename = "station.enroll")]
    Enroll {
        /// The station's name.
        name: String,
        /// Days its certificate is valid.
        days: i64,
    },
    /// Renew a station's certificate for `days`.
    #[serde(rename = "station.renew")]
    Renew {
        /// The station's name.
        name: String,
        /// Days its new certificate is valid.
        days: i64,
    },
    /// Revoke a station.
    #[serde(rename = "station.revoke")]
    Revoke {
        /// The station's name.
        name: String,
    },
    /// List the stations.
    #[serde(rename = "station.list")]
    List,
    /// The site's status (`keyfab site status`).
    #[serde(rename = "status")]
    Status,
    /// Submit one unseal share.
    #[serde(rename = "unseal")]
    Unseal {
        /// The share, as its holder typed it.
        share: ShareText,
    },
    /// How many shares are in.
    #[serde(rename = "unseal.status")]
    UnsealStatus,
}

/// An unseal share on its way through the socket: wiped when dropped, never printed.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShareText(pub String);

impl std::fmt::Debug for ShareText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShareText(..)")
    }
}

impl Drop for ShareText {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// What enrollment hands back: the station's files, PEM. Holds its private key: wiped
/// when dropped, left out of `Debug`.
#[derive(Serialize, Deserialize)]
pub struct EnrolledFiles {
    /// The station as recorded.
    pub record: StationRecord,
    /// The station's private key, PEM.
    pub key_pem: String,
    /// Its certificate, PEM.
    pub certificate_pem: String,
    /// The line CA that issued it: what the station trusts the site by.
    pub line_ca_pem: String,
}

impl EnrolledFiles {
    /// The files of a station just enrolled or renewed.
    pub fn of(e: &stations::Enrolled) -> Self {
        Self {
            key_pem: x509::to_pem(e.key.expose(), "PRIVATE KEY"),
            certificate_pem: x509::to_pem(&e.certificate, "CERTIFICATE"),
            line_ca_pem: x509::to_pem(&e.line_ca, "CERTIFICATE"),
            record: e.record.clone(),
        }
    }
}

impl std::fmt::Debug for EnrolledFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolledFiles")
            .field("record", &self.record)
            .field("key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl Drop for EnrolledFiles {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key_pem);
    }
}

/// What the running `site serve` answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminAnswer {
    /// Enroll a station for `days`.
    Enrolled(EnrolledFiles),
    /// A station, as it is now.
    Station(StationRecord),
    /// Every station.
    Stations(Vec<StationRecord>),
    /// How far unsealing is.
    Unseal(UnsealProgress),
    /// Where the site stands.
    Status(Box<crate::status::SiteStatus>),
}

fn handle(node: &Node, req: AdminRequest) -> Result<AdminAnswer> {
    Ok(match req {
        AdminRequest::Enroll { name, days } => {
            AdminAnswer::Enrolled(EnrolledFiles::of(&stations::enroll(node, &name, days)?))
        }
        AdminRequest::Renew { name, days } => {
            AdminAnswer::Enrolled(EnrolledFiles::of(&stations::renew(node, &name, days)?))
        }
        AdminRequest::Revoke { name } => AdminAnswer::Station(stations::revoke(node, &name)?),
        AdminRequest::List => AdminAnswer::Stations(stations::list(node)?),
        AdminRequest::Status => AdminAnswer::Status(Box::new(crate::status::site_status(node)?)),
        AdminRequest::Unseal { .. } | AdminRequest::UnsealStatus => {
            return Err(Error::Precondition("this node is unsealed already".into()))
        }
    })
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub(super) fn bind(home: &Path) -> Result<(tokio::net::UnixListener, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let path = home.join(SOCKET);
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, path))
}

/// Answers requests on `listener` until the task is dropped.
pub(super) async fn serve(
    listener: tokio::net::UnixListener,
    node: Arc<Node>,
    revocations: Arc<std::sync::atomic::AtomicU64>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let (node, revocations) = (node.clone(), revocations.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let answer = match read_request(read).await {
                Some(Ok(req)) => tokio::task::spawn_blocking(move || {
                    let answer = handle(&node, req);
                    // Connections re-check their station on their next request.
                    revocations.fetch_add(1, std::sync::atomic::Ordering::Release);
                    answer
                })
                .await
                .unwrap_or_else(|_| Err(Error::Bug("admin request".into()))),
                Some(Err(e)) => Err(e),
                None => return,
            };
            write_answer(&mut write, answer).await;
        });
    }
}

async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Option<Result<AdminRequest>> {
    let mut body = zeroize::Zeroizing::new(Vec::new());
    if read.take(MAX_REQUEST).read_to_end(&mut body).await.is_err() {
        return None;
    }
    Some(
        serde_json::from_slice::<AdminRequest>(&body)
            .map_err(|e| Error::InvalidInput(format!("admin request: {e}"))),
    )
}

async fn write_answer(write: &mut tokio::net::unix::OwnedWriteHalf, answer: Result<AdminAnswer>) {
    let json = match answer {
        Ok(a) => serde_json::json!({ "ok": a }),
        Err(e) => {
            serde_json::json!({"error": {"code": e.code().as_str(), "message": e.to_string()}})
        }
    };
    let _ = write.write_all(json.to_string().as_bytes()).await;
    let _ = write.shutdown().await;
}

/// A node sealed by shares, before it serves: takes shares one by one on
/// `HOME/serve.sock` (`keyfab site unseal`) until the threshold is met, then returns the
/// keystore's secret. Every other request is refused with `locked`. Returns `locked` if
/// the process is told to stop first.
pub fn wait_for_shares(
    home: &Path,
    mut unsealer: Unsealer,
    locked_on: Option<(std::net::SocketAddr, crate::stations::ServerIdentity)>,
    waiting: impl FnOnce(UnsealProgress, Option<std::net::SocketAddr>),
) -> Result<(SecretBytes, Option<std::net::SocketAddr>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Bug(format!("runtime: {e}")))?;
    runtime.block_on(async {
        let (listener, path) = bind(home)?;
        let why = |p: UnsealProgress| {
            format!(
                "the site is sealed: {} of {} unseal shares given",
                p.accepted, p.threshold
            )
        };
        let reason = Arc::new(std::sync::Mutex::new(why(unsealer.progress())));
        // With a serving identity kept from an unsealed run, stations get `locked`.
        let (station_task, station_addr) = match locked_on {
            Some((addr, identity)) => {
                let tls = Arc::new(super::tls_config(&identity)?);
                let tcp = tokio::net::TcpListener::bind(addr).await?;
                let bound = tcp.local_addr()?;
                let task = tokio::spawn(super::sealed::answer_locked(tcp, tls, reason.clone()));
                (Some(task), Some(bound))
            }
            None => (None, None),
        };
        waiting(unsealer.progress(), station_addr);
        let stop = super::shutdown_signal();
        tokio::pin!(stop);
        while !unsealer.progress().unsealed {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                _ = &mut stop => break,
            };
            let (read, mut write) = stream.into_split();
            let answer = match read_request(read).await {
                Some(Ok(AdminRequest::Unseal { share })) => unsealer
                    .submit(&share.0)
                    .map(AdminAnswer::Unseal)
                    .map_err(Error::from),
                Some(Ok(AdminRequest::UnsealStatus)) => Ok(AdminAnswer::Unseal(unsealer.progress())),
                Some(Ok(_)) => {
                    let p = unsealer.progress();
                    Err(Error::Sealed(format!(
                        "{} of {} unseal shares given",
                        p.accepted, p.threshold
                    )))
                }
                Some(Err(e)) => Err(e),
                None => continue,
            };
            if let Err(e) = &answer {
                tracing::warn!(target: "keyfab::unseal", error = %e, "admin request refused while sealed");
            } else {
                let p = unsealer.progress();
                tracing::info!(target: "keyfab::unseal", accepted = p.accepted, threshold = p.threshold, "unseal share accepted");
                if let Ok(mut r) = reason.lock() {
                    *r = why(p);
                }
            }
            write_answer(&mut write, answer).await;
        }
        if let Some(task) = station_task {
            task.abort();
            let _ = task.await;
        }
        drop(listener);
        let _ = std::fs::remove_file(&path);
        Ok((unsealer.passphrase()?, station_addr))
    })
}

/// Sends `req` to the `site serve` running in `home`; `None` if none is.
pub fn request(home: &Path, req: &AdminRequest) -> Option<Result<AdminAnswer>> {
    use std::io::{Read, Write};
    let path = home.join(SOCKET);
    let mut stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    let mut run = || -> Result<AdminAnswer> {
        let body = serde_json::to_vec(req).map_err(|e| Error::InvalidInput(e.to_string()))?;
        stream.write_all(&body)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let v: serde_json::Value = serde_json::from_slice(&answer)
            .map_err(|e| Error::Bug(format!("site serve answered: {e}")))?;
        if let Some(err) = v.get("error") {
            let message = err["message"].as_str().unwrap_or_default().to_owned();
            let code = err["code"].as_str().and_then(Code::parse);
            return Err(Error::Relayed {
                code: code.unwrap_or(Code::Internal),
                message,
            });
        }
        serde_json::from_value(v["ok"].clone())
            .map_err(|e| Error::Bug(format!("site serve answered: {e}")))
    };
    Some(run())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_station_key_and_no_share() {
        let files = EnrolledFiles {
            record: StationRecord {
                name: "line-1".into(),
                serial: "01".into(),
                enrolled_at: 0,
                not_after: 0,
                revoked_at: None,
                previous_serial: None,
            },
            key_pem: "-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n".into(),
            certificate_pem: String::new(),
            line_ca_pem: String::new(),
        };
        let shown = format!("{:?}", AdminAnswer::Enrolled(files));
        assert!(
            !shown.contains("SECRETSECRET") && !shown.contains("PRIVATE KEY"),
            "{shown}"
        );
        let share = AdminRequest::Unseal {
            share: ShareText("kfs1-0123abcd".into()),
        };
        assert!(!format!("{share:?}").contains("0123abcd"));
    }
}
