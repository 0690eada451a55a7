//! The station end of the production line: a client of `keyfab site serve` over mutual
//! TLS.
//!
//! Which API for which job:
//! - the files `keyfab site station enroll` wrote: [`StationDir::load`];
//! - ask for a device's keys: [`Client::provision`] (retries a dropped connection with
//!   the same request id, on the next URL if there are several);
//! - the chip end, which opens keys sealed to it and checks its certificates:
//!   [`device::SimulatedChip`].
//!
//! The client trusts only its site's line CA, presents its station certificate, and
//! speaks TLS 1.3 only.
#![forbid(unsafe_code)]

pub mod device;

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
    /// The chip's transport key (SEC1, base64): the keys come back sealed to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport_key: Option<String>,
}

/// Tries a dropped request this many times in all (over all URLs).
const ATTEMPTS: usize = 6;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    urls: Vec<String>,
    /// The URL calls start with: the last one that answered. A node that stops
    /// answering costs one timeout, not one per request.
    preferred: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Requests sent again so far, and why (shared by clones).
    retried: std::sync::Arc<RetryCounters>,
}

#[derive(Default)]
struct RetryCounters {
    busy: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

/// Requests a client sent again (same request id), by reason; reports show it as is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Retries {
    /// Answered `429 busy`: the station had more requests in flight than the site
    /// allows one station.
    pub busy: u64,
    /// No answer: the connection was refused, closed (a station past the site's bound
    /// of connections is closed after the handshake) or timed out.
    pub dropped: u64,
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
            // Answers take milliseconds, `unavailable` a few seconds: a node that takes
            // longer is hung (paused, partitioned), and the next URL is tried.
            .timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StationError::StationDir(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            urls: urls
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            preferred: Default::default(),
            retried: Default::default(),
        })
    }

    /// The requests this client (and its clones) sent again so far, by reason.
    pub fn retries(&self) -> Retries {
        use std::sync::atomic::Ordering;
        Retries {
            busy: self.retried.busy.load(Ordering::Relaxed),
            dropped: self.retried.dropped.load(Ordering::Relaxed),
        }
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
        use std::sync::atomic::Ordering;
        let first = self.preferred.load(Ordering::Relaxed);
        for attempt in 0..ATTEMPTS {
            let which = (first + attempt) % self.urls.len();
            let url = &self.urls[which];
            match request(&self.http, url).send().await {
                // The site has this station's bound of requests in flight: wait, retry.
                Ok(resp) if resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                    self.retried.busy.fetch_add(1, Ordering::Relaxed);
                    last = format!("{url}: busy");
                    tokio::time::sleep(Duration::from_millis(20 << attempt.min(4))).await;
                }
                // The site's state store is failing over: nothing was released, and the
                // same request (same request id) is safe to send again, to any node.
                Ok(resp) if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    match answer(resp).await {
                        Err(StationError::Refused { code, message, .. })
                            if code == "unavailable" =>
                        {
                            last = format!("{url}: unavailable: {message}");
                            tokio::time::sleep(Duration::from_millis(200 << attempt.min(4))).await;
                        }
                        other => return other,
                    }
                }
                Ok(resp) => {
                    self.preferred.store(which, Ordering::Relaxed);
                    return answer(resp).await;
                }
                Err(e) => {
                    self.retried.dropped.fetch_add(1, Ordering::Relaxed);
                    last = format!("{url}: {}", error_chain(&e));
                    // Later calls start at the next URL, unless another call moved on.
                    let _ = self.preferred.compare_exchange(
                        which,
                        (which + 1) % self.urls.len(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
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

/// Runs `f` on a runtime of its own (a thread per core: a simulated line's chips do real
/// cryptography), for callers that are not async.
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> std::io::Result<T> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

/// What a simulated line did.
#[derive(Debug, Default)]
pub struct LineReport {
    /// Devices that got keys, opened them and confirmed them programmed.
    pub programmed: u64,
    /// Devices whose package did not check out on the chip: confirmed failed (burned).
    pub failed: u64,
    /// Why, by reason.
    pub failures: std::collections::BTreeMap<String, u64>,
    /// Refusals by the site, by code.
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Requests no site answered.
    pub unreachable: u64,
    /// Time from request to confirmed, per device that got keys.
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

/// A simulated production line: for every id of `devices`, a chip with its own transport
/// key asks for its keys (request id = device id, so a rerun resumes), opens and checks
/// them against `root_cert`, and confirms — `concurrency` devices at a time. `done` is
/// called after each device.
pub async fn run_line(
    client: &Client,
    entitlement: &str,
    devices: Vec<String>,
    concurrency: usize,
    root_cert: &[u8],
    done: &(dyn Fn(u64) + Sync),
) -> LineReport {
    let started = std::time::Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let client = Arc::new(client.clone());
    let root = Arc::new(root_cert.to_vec());
    let mut report = LineReport::default();
    let mut finished = 0u64;
    let mut tally = |report: &mut LineReport, outcome: DeviceOutcome| {
        match outcome {
            DeviceOutcome::Programmed(t) => {
                report.programmed += 1;
                report.latencies.push(t);
            }
            DeviceOutcome::Failed(why) => {
                report.failed += 1;
                *report.failures.entry(why).or_insert(0) += 1;
            }
            DeviceOutcome::Refused(code) => *report.refused.entry(code).or_insert(0) += 1,
            DeviceOutcome::Unreachable => report.unreachable += 1,
        }
        finished += 1;
        done(finished);
    };
    for device in devices {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (client, root, entitlement) = (client.clone(), root.clone(), entitlement.to_owned());
        tasks.spawn(async move {
            let _permit = permit;
            one_device(&client, &entitlement, &device, &root).await
        });
        while let Some(Ok(outcome)) = tasks.try_join_next() {
            tally(&mut report, outcome);
        }
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok(outcome) = joined {
            tally(&mut report, outcome);
        }
    }
    report.elapsed = started.elapsed();
    report
}

enum DeviceOutcome {
    Programmed(Duration),
    Failed(String),
    Refused(String),
    Unreachable,
}

async fn one_device(
    client: &Client,
    entitlement: &str,
    device: &str,
    root: &[u8],
) -> DeviceOutcome {
    use keyfab_crypto::time::Clock;
    let started = std::time::Instant::now();
    let chip = device::SimulatedChip::new(device, &keyfab_crypto::rng::SystemRng);
    let transport_key = match chip.transport_key() {
        Ok(k) => k,
        Err(e) => return DeviceOutcome::Failed(e.to_string()),
    };
    let req = ProvisionRequest {
        request_id: device.to_owned(),
        entitlement: entitlement.to_owned(),
        device_id: device.to_owned(),
        csr: None,
        transport_key: Some(transport_key),
    };
    let bundle = match client.provision(&req).await {
        Ok(b) => b,
        Err(StationError::Refused { code, .. }) => return DeviceOutcome::Refused(code),
        Err(_) => return DeviceOutcome::Unreachable,
    };
    // The device's clock, read when it checks (a certificate issued this very second is
    // not valid a second earlier).
    let now = keyfab_crypto::time::SystemClock.now();
    let (result, why) = match chip.program(&bundle, root, now) {
        Ok(_keys) => ("programmed", None),
        Err(e) => ("failed", Some(e.to_string())),
    };
    match client.confirm(entitlement, device, result).await {
        Ok(_) => match why {
            None => DeviceOutcome::Programmed(started.elapsed()),
            Some(why) => DeviceOutcome::Failed(why),
        },
        Err(StationError::Refused { code, .. }) => DeviceOutcome::Refused(code),
        Err(_) => DeviceOutcome::Unreachable,
    }
}
