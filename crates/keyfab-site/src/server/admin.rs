//! Station administration while `site serve` holds the site's store: a Unix socket in the
//! site's home (`HOME/serve.sock`, mode 0600), so `keyfab site station enroll | revoke |
//! list` keep working while the line runs. Whoever may open the socket may already read
//! the home; the socket gives no more than the home does.
//!
//! Protocol: one JSON request per connection, one JSON answer, then the connection
//! closes. Requests: `{"op":"station.enroll","name":N,"days":D}`,
//! `{"op":"station.revoke","name":N}`, `{"op":"station.list"}`. Answers: `{"ok":…}` or
//! `{"error":{"code","message"}}`.

use crate::stations::{self, StationRecord};
use keyfab_crypto::x509;
use keyfab_node::{Error, Node, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The socket's file name in the site's home.
pub const SOCKET: &str = "serve.sock";

/// Largest request accepted on the socket.
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum AdminRequest {
    #[serde(rename = "station.enroll")]
    Enroll { name: String, days: i64 },
    #[serde(rename = "station.revoke")]
    Revoke { name: String },
    #[serde(rename = "station.list")]
    List,
}

/// What enrollment hands back: the station's files, PEM. Holds its private key.
#[derive(Debug, Serialize, Deserialize)]
pub struct EnrolledFiles {
    pub record: StationRecord,
    pub key_pem: String,
    pub certificate_pem: String,
    pub line_ca_pem: String,
}

impl Drop for EnrolledFiles {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key_pem);
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminAnswer {
    Enrolled(EnrolledFiles),
    Station(StationRecord),
    Stations(Vec<StationRecord>),
}

fn handle(node: &Node, req: AdminRequest) -> Result<AdminAnswer> {
    Ok(match req {
        AdminRequest::Enroll { name, days } => {
            let e = stations::enroll(node, &name, days)?;
            AdminAnswer::Enrolled(EnrolledFiles {
                key_pem: x509::to_pem(e.key.expose(), "PRIVATE KEY"),
                certificate_pem: x509::to_pem(&e.certificate, "CERTIFICATE"),
                line_ca_pem: x509::to_pem(&e.line_ca, "CERTIFICATE"),
                record: e.record.clone(),
            })
        }
        AdminRequest::Revoke { name } => AdminAnswer::Station(stations::revoke(node, &name)?),
        AdminRequest::List => AdminAnswer::Stations(stations::list(node)?),
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
            let mut body = Vec::new();
            if read.take(MAX_REQUEST).read_to_end(&mut body).await.is_err() {
                return;
            }
            let answer = match serde_json::from_slice::<AdminRequest>(&body) {
                Ok(req) => tokio::task::spawn_blocking(move || {
                    let answer = handle(&node, req);
                    // Connections re-check their station on their next request.
                    revocations.fetch_add(1, std::sync::atomic::Ordering::Release);
                    answer
                })
                .await
                .unwrap_or_else(|_| Err(Error::InvalidState("admin request".into()))),
                Err(e) => Err(Error::InvalidInput(format!("admin request: {e}"))),
            };
            let json = match answer {
                Ok(a) => serde_json::json!({ "ok": a }),
                Err(e) => {
                    serde_json::json!({"error": {"code": e.code(), "message": e.to_string()}})
                }
            };
            let _ = write.write_all(json.to_string().as_bytes()).await;
            let _ = write.shutdown().await;
        });
    }
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
            .map_err(|e| Error::InvalidState(format!("site serve answered: {e}")))?;
        if let Some(err) = v.get("error") {
            let message = err["message"].as_str().unwrap_or_default().to_owned();
            return Err(match err["code"].as_str() {
                Some("not_found") => Error::NotFound(message),
                Some("invalid_input") => Error::InvalidInput(message),
                _ => Error::InvalidState(message),
            });
        }
        serde_json::from_value(v["ok"].clone())
            .map_err(|e| Error::InvalidState(format!("site serve answered: {e}")))
    };
    Some(run())
}
