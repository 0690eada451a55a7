//! The station end of the production line: a client of `keyfab site serve` over mutual
//! TLS.
//!
//! Which API for which job:
//! - the files `keyfab site station enroll` wrote: [`StationDir::load`];
//! - ask for a device's keys: [`Client::provision`] (retries a dropped connection with
//!   the same request id, on the next URL if there are several).
//!
//! The client trusts only its site's line CA, presents its station certificate, and
//! speaks TLS 1.3 only.
#![forbid(unsafe_code)]

use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::x509;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// File names inside a station directory.
pub const KEY_FILE: &str = "station.key";
pub const CERT_FILE: &str = "station.crt";
pub const LINE_CA_FILE: &str = "line-ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum StationError {
    /// The site answered with a refusal: its stable code and message.
    #[error("{code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// No URL answered (connection refused, TLS handshake failed, timed out).
    #[error("no site answered: {0}")]
    Unreachable(String),
    #[error("station directory: {0}")]
    StationDir(String),
    #[error("the site's answer is not what the API describes: {0}")]
    BadAnswer(String),
}

pub type Result<T> = std::result::Result<T, StationError>;

/// A station's identity, as enrolled: its key, its certificate, its site's line CA.
pub struct StationDir {
    key: SecretBytes,
    certificate: Vec<u8>,
    line_ca: Vec<u8>,
}

impl StationDir {
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str, tag: &str| -> Result<Vec<u8>> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| StationError::StationDir(format!("{}: {e}", path.display())))?;
            x509::from_pem(&text, tag)
                .map_err(|e| StationError::StationDir(format!("{}: {e}", path.display())))
        };
        Ok(Self {
            key: SecretBytes::new(read(KEY_FILE, "PRIVATE KEY")?),
            certificate: read(CERT_FILE, "CERTIFICATE")?,
            line_ca: read(LINE_CA_FILE, "CERTIFICATE")?,
        })
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.line_ca.clone()))
            .map_err(|e| StationError::StationDir(format!("line CA: {e}")))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.expose().to_vec()));
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| StationError::StationDir(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![CertificateDer::from(self.certificate.clone())], key)
            .map_err(|e| StationError::StationDir(format!("station certificate: {e}")))
    }
}

/// What a station asks for one device (SPEC.md §5).
#[derive(Debug, Clone, Serialize)]
pub struct ProvisionRequest {
    pub request_id: String,
    pub entitlement: String,
    pub device_id: String,
    /// The device's CSR, PEM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// Tries a dropped request this many times in all (over all URLs).
const ATTEMPTS: usize = 6;

pub struct Client {
    http: reqwest::Client,
    urls: Vec<String>,
}

impl Client {
    /// A client of the site at `urls` (tried in turn), as the station of `dir`.
    pub fn new(dir: &StationDir, urls: &[String]) -> Result<Self> {
        if urls.is_empty() {
            return Err(StationError::Unreachable("no URL given".into()));
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(dir.tls_config()?)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StationError::StationDir(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            urls: urls
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
        })
    }

    /// The device bundle for `req`: key material, certificates. A connection that drops
    /// before the answer is retried with the same request id, so the site answers the
    /// retry from its record instead of deciding again.
    pub async fn provision(&self, req: &ProvisionRequest) -> Result<serde_json::Value> {
        self.call(|http, url| http.post(format!("{url}/v1/provision")).json(req))
            .await
    }

    /// `POST /v1/confirm`: tells the site the device was `programmed`, or `failed` (its
    /// keys are then burned). Repeating the same confirmation is harmless.
    pub async fn confirm(
        &self,
        entitlement: &str,
        device_id: &str,
        result: &str,
    ) -> Result<serde_json::Value> {
        let body = serde_json::json!({"entitlement": entitlement, "device_id": device_id, "result": result});
        self.call(|http, url| http.post(format!("{url}/v1/confirm")).json(&body))
            .await
    }

    /// `GET /v1/entitlements`: what this station may use, and what is left.
    pub async fn entitlements(&self) -> Result<serde_json::Value> {
        self.call(|http, url| http.get(format!("{url}/v1/entitlements")))
            .await
    }

    async fn call(
        &self,
        request: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<serde_json::Value> {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            let url = &self.urls[attempt % self.urls.len()];
            match request(&self.http, url).send().await {
                Ok(resp) => return answer(resp).await,
                Err(e) => {
                    last = format!("{url}: {}", error_chain(&e));
                    if attempt + 1 >= self.urls.len() {
                        tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
                    }
                }
            }
        }
        Err(StationError::Unreachable(last))
    }
}

async fn answer(resp: reqwest::Response) -> Result<serde_json::Value> {
    let status = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| StationError::BadAnswer(e.to_string()))?;
    if status.is_success() {
        return Ok(body);
    }
    let text = |k: &str| body["error"][k].as_str().unwrap_or_default().to_owned();
    Err(StationError::Refused {
        status: status.as_u16(),
        code: text("code"),
        message: text("message"),
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Runs `f` on a small runtime of its own, for callers that are not async.
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> std::io::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}
