//! A site that cannot serve yet still answers stations, so that a line sees why it is
//! not served: sealed by unseal shares and waiting for them, every request gets
//! `locked`; waiting for its etcd cluster's quorum, `unavailable` (both 503). That needs
//! a TLS identity before the keystore or the store is open: the serving key and chain of
//! the last run, kept in `HOME/serve-identity.pem` (mode 0600) for homes sealed by shares
//! and for cluster nodes. The key only proves "this is the site's server" to stations; it
//! opens nothing, and the waiting server answers nothing but its refusal.

use crate::stations::ServerIdentity;
use hyper_util::rt::{TokioIo, TokioTimer};
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::x509;
use keyfab_node::Result;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The file, in a home sealed by shares.
pub const SERVING_IDENTITY_FILE: &str = "serve-identity.pem";

/// Keeps `identity` for the next sealed start.
pub fn save_serving_identity(home: &Path, identity: &ServerIdentity) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = x509::to_pem_secret(identity.key.expose(), "PRIVATE KEY");
    let certs: Vec<String> = identity
        .chain
        .iter()
        .map(|c| x509::to_pem(c, "CERTIFICATE"))
        .collect();
    // Sized once: growing it would leave a copy of the key behind in freed memory.
    let mut text = zeroize::Zeroizing::new(String::with_capacity(
        key.len() + certs.iter().map(String::len).sum::<usize>(),
    ));
    text.push_str(&key);
    for cert in &certs {
        text.push_str(cert);
    }
    let tmp = home.join(format!("{SERVING_IDENTITY_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, home.join(SERVING_IDENTITY_FILE))?;
    Ok(())
}

/// The identity kept by [`save_serving_identity`], if there is one.
pub fn load_serving_identity(home: &Path) -> Result<Option<ServerIdentity>> {
    let text = match std::fs::read_to_string(home.join(SERVING_IDENTITY_FILE)) {
        Ok(t) => zeroize::Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let blocks = x509::pem_blocks(&text)?;
    let mut key = None;
    let mut chain = Vec::new();
    for (tag, der) in blocks {
        match tag.as_str() {
            "PRIVATE KEY" => key = Some(SecretBytes::new(der)),
            "CERTIFICATE" => chain.push(der),
            _ => {}
        }
    }
    Ok(match key {
        Some(key) if chain.len() == 2 => Some(ServerIdentity { key, chain }),
        _ => None,
    })
}

/// Answers every request on `listener` with `code` (HTTP 503: `locked` while sealed,
/// `unavailable` while the state store does not answer) over TLS with `tls`, a client
/// certificate of the site's line CA required, until dropped.
pub async fn answer_refusing(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    code: &'static str,
    why: Arc<std::sync::Mutex<String>>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (acceptor, why) = (acceptor.clone(), why.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |_req| {
                let message = why.lock().map(|m| m.clone()).unwrap_or_default();
                async move {
                    let body = serde_json::json!({"error": {"code": code, "message": message}})
                        .to_string();
                    hyper::Response::builder()
                        .status(503)
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from(body))
                }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Stations answered with a refusal from a thread of its own while the caller waits
/// (for the state store); stops when dropped.
pub struct AnsweringMeanwhile {
    /// Where stations are answered.
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for AnsweringMeanwhile {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers stations on `addr` with `unavailable` and `why`, with the identity kept in
/// `home` by an earlier run; `None` if there is none.
pub fn answer_unavailable_meanwhile(
    home: &Path,
    addr: std::net::SocketAddr,
    why: String,
) -> Result<Option<AnsweringMeanwhile>> {
    let Some(identity) = load_serving_identity(home)? else {
        return Ok(None);
    };
    let tls = Arc::new(super::tls_config(&identity)?);
    let tcp = std::net::TcpListener::bind(addr)?;
    tcp.set_nonblocking(true)?;
    let bound = tcp.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("keyfab-unavailable".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(tcp) else {
                    return;
                };
                let why = Arc::new(std::sync::Mutex::new(why));
                tokio::select! {
                    _ = answer_refusing(listener, tls, "unavailable", why) => {}
                    _ = stopped => {}
                }
            });
        })?;
    Ok(Some(AnsweringMeanwhile {
        addr: bound,
        stop: Some(stop),
        thread: Some(thread),
    }))
}
