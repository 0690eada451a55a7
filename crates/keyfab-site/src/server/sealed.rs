//! A site sealed by unseal shares, waiting for them: it still answers stations — every
//! request with `locked` — so that a line sees why it is not served. That needs a TLS
//! identity while the keystore is closed: the serving key and chain of the last unsealed
//! run, kept in `HOME/serve-identity.pem` (mode 0600) for homes sealed by shares. The
//! key only proves "this is the site's server" to stations; it opens nothing, and the
//! sealed server answers nothing but `locked`.

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

/// Answers every request on `listener` with `locked` (HTTP 503) over TLS with `tls`,
/// a client certificate of the site's line CA required, until dropped.
pub async fn answer_locked(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
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
                    let body = serde_json::json!({"error": {"code": "locked", "message": message}})
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
