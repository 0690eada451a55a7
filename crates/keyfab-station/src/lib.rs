//! The station end of the production line: a client of `keyfab site serve` over mutual
//! TLS.
//!
//! Which API for which job:
//! - the files `keyfab site station enroll` wrote: [`StationDir::load`];
//! - ask for a device's keys: [`Client::provision`] (retries a dropped connection with
//!   the same request id, on the next URL if there are several);
//! - the chip end, which opens keys sealed to it and checks its certificates:
//!   [`device::SimulatedChip`]; the vendor that certified it, for drills:
//!   [`chip_vendor::ChipVendor`].
//!
//! The client trusts only its site's line CA, presents its station certificate, and
//! speaks TLS 1.3 only.
#![forbid(unsafe_code)]

pub mod chip_vendor;
pub mod device;
pub mod http;

use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::time::Clock;
use keyfab_crypto::x509;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// File names inside a station directory.
pub const KEY_FILE: &str = "station.key";
/// The station's certificate in its directory (PEM).
pub const CERT_FILE: &str = "station.crt";
/// The site's line CA in a station's directory (PEM): the root of the site's TLS identity.
pub const LINE_CA_FILE: &str = "line-ca.crt";

/// Why a station's request got no keys.
#[derive(Debug, thiserror::Error)]
pub enum StationError {
    /// The site answered with a refusal: its stable code and message.
    #[error("{code}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The stable code (README.md, "Exit codes and error codes").
        code: String,
        /// The site's message.
        message: String,
    },
    /// No URL answered (connection refused, closed, timed out).
    #[error("no site answered: {0}")]
    Unreachable(String),
    /// Every URL's TLS handshake failed on a certificate: the site's was not accepted
    /// here, or the site did not accept this station's. Not sent again: it would fail
    /// the same way.
    #[error("{0}")]
    Untrusted(String),
    /// A URL that is not `https://HOST[:PORT]`.
    #[error("URL: {0}")]
    BadUrl(String),
    /// The station directory is missing a file or holds a bad one.
    #[error("station directory: {0}")]
    StationDir(String),
    /// A simulated chip vendor's directory is missing a file or holds a bad one.
    #[error("chip vendor: {0}")]
    ChipVendor(String),
    /// An answer that does not parse as the API describes.
    #[error("the site's answer is not what the API describes: {0}")]
    BadAnswer(String),
}

/// A station operation's result.
pub type Result<T> = std::result::Result<T, StationError>;

/// A station's identity, as enrolled: its key, its certificate, its site's line CA.
pub struct StationDir {
    key: SecretBytes,
    certificate: Vec<u8>,
    line_ca: Vec<u8>,
}

impl StationDir {
    /// Reads a directory `keyfab site station enroll` wrote.
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str, tag: &str| -> Result<Vec<u8>> {
            let path = dir.join(name);
            let text = keyfab_formats::read_capped_text(&path, keyfab_formats::MAX_SMALL_INPUT)
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

    fn tls_config(&self, clock: Arc<dyn Clock>) -> Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.line_ca.clone()))
            .map_err(|e| StationError::StationDir(format!("line CA: {e}")))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.expose().to_vec()));
        rustls::ClientConfig::builder_with_details(provider, Arc::new(TlsTime(clock)))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| StationError::StationDir(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![CertificateDer::from(self.certificate.clone())], key)
            .map_err(|e| StationError::StationDir(format!("station certificate: {e}")))
    }
}

/// The station's clock as TLS reads it, to check the site's certificate: injected, like
/// every clock in keyfab, so drills (`KEYFAB_NOW`) see what the station would then.
struct TlsTime(Arc<dyn Clock>);

impl std::fmt::Debug for TlsTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsTime")
    }
}

impl rustls::time_provider::TimeProvider for TlsTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        let seconds = u64::try_from(self.0.now().0).ok()?;
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            Duration::from_secs(seconds),
        ))
    }
}

/// What a station asks for one device (docs/openapi.json).
#[derive(Debug, Clone, Serialize)]
pub struct ProvisionRequest {
    /// The request id: the same id sent again gets the same answer, never a second one.
    pub request_id: String,
    /// The entitlement's id.
    pub entitlement: String,
    /// The device's id.
    pub device_id: String,
    /// The device's CSR, PEM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
    /// The chip's transport key (SEC1, base64): the keys come back sealed to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport_key: Option<String>,
    /// The chip's certificate chain, leaf first: each certificate's DER, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chip_certificates: Option<Vec<String>>,
}

/// Tries a dropped request this many times in all (over all URLs), unless the client is
/// told otherwise ([`Client::with_attempts`]).
pub const DEFAULT_ATTEMPTS: usize = 6;

/// The most a client may be told to try: about ten minutes of waiting between tries.
pub const MAX_ATTEMPTS: usize = 200;

/// A connection unused this long is closed rather than reused: the site may have closed
/// it meanwhile (it closes connections idle past its header timeout).
const IDLE_REUSE: Duration = Duration::from_secs(5);

/// Idle connections kept for reuse, at most: one per programmer of the largest simulated
/// line (`keyfab station run --concurrency` takes up to 1024).
const IDLE_KEPT: usize = 1024;

/// A connection between two requests: to which endpoint, and idle since when.
struct IdleConnection {
    endpoint: usize,
    connection: Box<http::Connection>,
    since: std::time::Instant,
}

const TIMEOUTS: http::Timeouts = http::Timeouts {
    connect: Duration::from_secs(5),
    // Answers take milliseconds, `unavailable` a few seconds: a node that takes longer
    // is hung (paused, partitioned), and the next URL is tried.
    answer: Duration::from_secs(10),
};

/// A client of the site; clones share its connections and counters. Calls block: each
/// of a line's programmers asks from a thread of its own.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    tls: Arc<rustls::ClientConfig>,
    /// The station's time.
    clock: Arc<dyn Clock>,
    endpoints: Vec<http::Endpoint>,
    /// How many times in all (over all URLs) a request is sent before giving up.
    attempts: usize,
    /// The station's secret for what a line derives per device (request ids, the
    /// simulated chips' transport keys): the same device gets the same ones on a rerun.
    line_secret: keyfab_crypto::secret::Secret32,
    /// Connections between requests, oldest first.
    idle: std::sync::Mutex<std::collections::VecDeque<IdleConnection>>,
    /// The URL calls start with: the last one that answered. A node that stops
    /// answering costs one timeout, not one per request.
    preferred: std::sync::atomic::AtomicUsize,
    /// Requests sent again so far, and why.
    retried: RetryCounters,
    /// The vendor that certified the simulated chips of a line, if they are certified.
    chip_vendor: Option<Arc<chip_vendor::ChipVendor>>,
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
    /// A client of the site at `urls` (`https://HOST:PORT`, tried in turn), as the
    /// station of `dir`, on the system clock.
    pub fn new(dir: &StationDir, urls: &[String]) -> Result<Self> {
        Self::with_clock(dir, urls, Arc::new(keyfab_crypto::time::SystemClock))
    }

    /// [`Client::new`], reading time (to check the site's certificate, and a simulated
    /// chip's certificates) from `clock`.
    pub fn with_clock(dir: &StationDir, urls: &[String], clock: Arc<dyn Clock>) -> Result<Self> {
        if urls.is_empty() {
            return Err(StationError::Unreachable("no URL given".into()));
        }
        let endpoints = urls
            .iter()
            .map(|u| http::Endpoint::parse(u).map_err(StationError::BadUrl))
            .collect::<Result<Vec<_>>>()?;
        let line_secret =
            keyfab_crypto::kdf::hkdf_sha256(dir.key.expose(), b"keyfab station line v1", b"")
                .map_err(|e| StationError::StationDir(format!("station key: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                tls: Arc::new(dir.tls_config(clock.clone())?),
                clock,
                endpoints,
                attempts: DEFAULT_ATTEMPTS,
                line_secret,
                idle: Default::default(),
                preferred: Default::default(),
                retried: Default::default(),
                chip_vendor: None,
            }),
        })
    }

    /// This client, trying each request up to `attempts` times in all (1 to
    /// [`MAX_ATTEMPTS`]) before it reports the last answer. Call before cloning.
    pub fn with_attempts(mut self, attempts: usize) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.attempts = attempts.clamp(1, MAX_ATTEMPTS);
        }
        self
    }

    /// This client, its line's simulated chips certified by `vendor`: each request of a
    /// line carries its chip's certificate chain. Call before cloning.
    pub fn with_chip_vendor(mut self, vendor: chip_vendor::ChipVendor) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.chip_vendor = Some(Arc::new(vendor));
        }
        self
    }

    /// What this station derives for `device` of `entitlement` for `purpose`: the same
    /// on every run, different for every station (it comes from the station's key).
    fn derived(
        &self,
        purpose: &str,
        entitlement: &str,
        device: &str,
    ) -> Result<keyfab_crypto::secret::Secret32> {
        let info = [purpose, entitlement, device].join("\0");
        keyfab_crypto::kdf::hkdf_sha256(self.inner.line_secret.expose(), b"", info.as_bytes())
            .map_err(|e| StationError::StationDir(e.to_string()))
    }

    /// The request id a line uses for `device`: the same on a rerun, so a rerun is
    /// answered from the record (keys released and not yet confirmed come back, sealed
    /// to the same chip); unguessable by other stations.
    pub fn line_request_id(&self, entitlement: &str, device: &str) -> Result<String> {
        let secret = self.derived("request-id", entitlement, device)?;
        Ok(format!("line-{}", hex::encode(&secret.expose()[..16])))
    }

    /// The simulated chip a line programs as `device`: its transport key derived like
    /// the request id, so a rerun's chip opens what the site sealed to the first run's.
    pub fn line_chip(&self, entitlement: &str, device: &str) -> Result<device::SimulatedChip> {
        // A 32-byte string is a P-256 scalar but for about 2^-32 of them: the next one.
        let mut last = None;
        for round in 0..4 {
            let secret =
                self.derived(&format!("chip-transport-key/{round}"), entitlement, device)?;
            match device::SimulatedChip::with_transport_key(device, secret.expose()) {
                Ok(chip) => return self.certified(chip),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| StationError::BadAnswer("no transport key".into())))
    }

    /// `chip`, with the certificate chain its vendor gave it, when the line's chips are
    /// certified: the chip's serial is its device id.
    fn certified(&self, chip: device::SimulatedChip) -> Result<device::SimulatedChip> {
        let Some(vendor) = &self.inner.chip_vendor else {
            return Ok(chip);
        };
        let point = chip.transport_point()?;
        let chain = vendor.chain_of(
            chip.device_id(),
            &point,
            &keyfab_crypto::rng::SystemRng,
            self.inner.clock.now(),
        )?;
        Ok(chip.with_certificates(chain))
    }

    /// The requests this client (and its clones) sent again so far, by reason.
    pub fn retries(&self) -> Retries {
        use std::sync::atomic::Ordering;
        Retries {
            busy: self.inner.retried.busy.load(Ordering::Relaxed),
            dropped: self.inner.retried.dropped.load(Ordering::Relaxed),
        }
    }

    /// The device bundle for `req`: key material, certificates. A connection that drops
    /// before the answer is retried with the same request id, so the site answers the
    /// retry from its record instead of deciding again.
    pub fn provision(&self, req: &ProvisionRequest) -> Result<serde_json::Value> {
        self.provision_answered(req).map(|(bundle, _)| bundle)
    }

    /// [`Client::provision`], with the URL that answered.
    pub fn provision_answered(
        &self,
        req: &ProvisionRequest,
    ) -> Result<(serde_json::Value, String)> {
        let body = serde_json::to_vec(req).map_err(|e| StationError::BadAnswer(e.to_string()))?;
        self.call_at("POST", "/v1/provision", Some(&body))
    }

    /// `POST /v1/confirm`: tells the site the device was `programmed`, or `failed` (its
    /// keys are then burned). Repeating the same confirmation is harmless.
    pub fn confirm(
        &self,
        entitlement: &str,
        device_id: &str,
        result: &str,
    ) -> Result<serde_json::Value> {
        let body = serde_json::json!({"entitlement": entitlement, "device_id": device_id, "result": result});
        self.call("POST", "/v1/confirm", Some(body.to_string().as_bytes()))
    }

    /// `GET /healthz`: whether a site answers, at the first URL that does. Needs no
    /// station check: the TLS handshake still needs the station's certificate.
    pub fn healthz(&self) -> Result<()> {
        let mut last = String::new();
        for (which, endpoint) in self.inner.endpoints.iter().enumerate() {
            match self.exchange(which, "GET", "/healthz", None) {
                Ok(resp) if resp.status == 200 => return Ok(()),
                Ok(resp) => last = format!("{}: status {}", endpoint.url, resp.status),
                Err(e) => last = format!("{}: {e}", endpoint.url),
            }
        }
        Err(StationError::Unreachable(last))
    }

    /// `GET /v1/entitlements`: what this station may use, and what is left.
    pub fn entitlements(&self) -> Result<serde_json::Value> {
        self.call("GET", "/v1/entitlements", None)
    }

    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<serde_json::Value> {
        self.call_at(method, path, body).map(|(answer, _)| answer)
    }

    /// One request, sent again as the retry rules say; the answer and the URL that gave
    /// it.
    fn call_at(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(serde_json::Value, String)> {
        use std::sync::atomic::Ordering;
        let inner = &self.inner;
        let count = inner.endpoints.len();
        // The last thing each URL said, so the final error names them all.
        let mut said: Vec<Option<String>> = vec![None; count];
        let mut unavailable = false;
        let mut certificate_refusals = 0;
        let first = inner.preferred.load(Ordering::Relaxed);
        for attempt in 0..inner.attempts {
            let which = (first + attempt) % count;
            match self.exchange(which, method, path, body) {
                // The site has this station's bound of requests in flight: wait, retry.
                Ok(resp) if resp.status == 429 => {
                    inner.retried.busy.fetch_add(1, Ordering::Relaxed);
                    said[which] = Some("busy".into());
                    std::thread::sleep(Duration::from_millis(20 << attempt.min(4)));
                }
                // The site's state store is failing over: nothing was released, and the
                // same request (same request id) is safe to send again, to any node.
                Ok(resp) if resp.status == 503 => match answer(&resp) {
                    Err(StationError::Refused { code, message, .. })
                        if code == keyfab_formats::Code::Unavailable.as_str() =>
                    {
                        said[which] = Some(format!("unavailable: {message}"));
                        unavailable = true;
                        std::thread::sleep(Duration::from_millis(200 << attempt.min(4)));
                    }
                    other => return other.map(|a| (a, inner.endpoints[which].url.clone())),
                },
                Ok(resp) => {
                    inner.preferred.store(which, Ordering::Relaxed);
                    return answer(&resp).map(|a| (a, inner.endpoints[which].url.clone()));
                }
                Err(e) => {
                    if let Some(why) = certificate_refusal(&e) {
                        certificate_refusals += 1;
                        said[which] = Some(why);
                        if certificate_refusals >= count {
                            return Err(StationError::Untrusted(self.each_url(&said)));
                        }
                        continue;
                    }
                    inner.retried.dropped.fetch_add(1, Ordering::Relaxed);
                    said[which] = Some(e.to_string());
                    // Later calls start at the next URL, unless another call moved on.
                    let _ = inner.preferred.compare_exchange(
                        which,
                        (which + 1) % count,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    if attempt + 1 >= count {
                        std::thread::sleep(Duration::from_millis(100 << attempt.min(4)));
                    }
                }
            }
        }
        let tried = format!(
            "after {} attempts: {}",
            inner.attempts,
            self.each_url(&said)
        );
        // A site that answered, but could not reach its state store, is not unreachable:
        // it said `unavailable`, and the request is safe to send again.
        if unavailable {
            Err(StationError::Refused {
                status: 503,
                code: keyfab_formats::Code::Unavailable.as_str().into(),
                message: tried,
            })
        } else {
            Err(StationError::Unreachable(tried))
        }
    }

    /// `url: what it said` for every URL, in the order given.
    fn each_url(&self, said: &[Option<String>]) -> String {
        self.inner
            .endpoints
            .iter()
            .zip(said)
            .map(|(e, s)| format!("{}: {}", e.url, s.as_deref().unwrap_or("not tried")))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// One request to endpoint `which`, on an idle connection to it if there is one. A
    /// kept connection the site closed meanwhile answers nothing at all: the request
    /// goes again at once on a new connection (the same request, which had no effect:
    /// the site reads no request from a connection it closed).
    fn exchange(
        &self,
        which: usize,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::result::Result<http::Response, http::ExchangeError> {
        let inner = &self.inner;
        if let Some(mut conn) = self.idle_connection(which) {
            match conn.exchange(method, path, body) {
                Ok(resp) => {
                    self.keep(which, conn, &resp);
                    return Ok(resp);
                }
                Err(http::ExchangeError::Io {
                    answered_nothing: true,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        let mut conn = http::Connection::open(&inner.endpoints[which], &inner.tls, TIMEOUTS)
            .map(Box::new)
            .map_err(|error| http::ExchangeError::Io {
                error,
                answered_nothing: true,
            })?;
        let resp = conn.exchange(method, path, body)?;
        self.keep(which, conn, &resp);
        Ok(resp)
    }

    /// The connection to endpoint `which` that was used last, if one is idle. Those idle
    /// past [`IDLE_REUSE`] are closed first (outside the lock), oldest first: the queue
    /// is in the order connections went idle, so a look at its front finds them all.
    fn idle_connection(&self, which: usize) -> Option<Box<http::Connection>> {
        let now = std::time::Instant::now();
        let mut stale = Vec::new();
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= IDLE_REUSE)
        {
            stale.extend(idle.pop_front());
        }
        let at = idle.iter().rposition(|c| c.endpoint == which);
        let found = at.and_then(|at| idle.remove(at)).map(|c| c.connection);
        drop(idle);
        drop(stale);
        found
    }

    fn keep(&self, which: usize, connection: Box<http::Connection>, resp: &http::Response) {
        if !resp.keep_alive {
            return;
        }
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.push_back(IdleConnection {
            endpoint: which,
            connection,
            since: std::time::Instant::now(),
        });
        let over = (idle.len() > IDLE_KEPT).then(|| idle.pop_front());
        drop(idle);
        drop(over);
    }
}

/// Why a TLS handshake failed on a certificate, if it did: the site's certificate did
/// not verify here, or the site sent an alert refusing this station's.
fn certificate_refusal(e: &http::ExchangeError) -> Option<String> {
    use rustls::{AlertDescription as Alert, CertificateError};
    let http::ExchangeError::Io { error, .. } = e else {
        return None;
    };
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        refused @ rustls::Error::InvalidCertificate(why) => {
            let clock = matches!(
                why,
                CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. }
            );
            Some(format!(
                "the site's certificate is not accepted here: {}{}",
                refused,
                if clock {
                    " (compare this machine's clock with the site's)"
                } else {
                    ""
                }
            ))
        }
        rustls::Error::AlertReceived(
            alert @ (Alert::BadCertificate
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::CertificateUnknown
            | Alert::UnknownCA
            | Alert::UnsupportedCertificate
            | Alert::CertificateRequired
            | Alert::AccessDenied),
        ) => Some(format!(
            "the site refused this station's certificate ({alert:?}): enrolled with another site, expired, or not a station certificate"
        )),
        _ => None,
    }
}

fn answer(resp: &http::Response) -> Result<serde_json::Value> {
    let body: serde_json::Value = serde_json::from_slice(&resp.body)
        .map_err(|e| StationError::BadAnswer(format!("status {}: {e}", resp.status)))?;
    if (200..300).contains(&resp.status) {
        return Ok(body);
    }
    let text = |k: &str| body["error"][k].as_str().unwrap_or_default().to_owned();
    Err(StationError::Refused {
        status: resp.status,
        code: text("code"),
        message: text("message"),
    })
}

/// What a simulated line did.
#[derive(Debug, Default)]
pub struct LineReport {
    /// Devices that got keys, opened them and confirmed them programmed.
    pub programmed: u64,
    /// Devices an earlier run programmed (confirmed then): nothing asked again.
    pub already_programmed: u64,
    /// Devices whose package did not check out on the chip: confirmed failed (burned).
    pub failed: u64,
    /// Devices an earlier run confirmed failed: their keys are burned.
    pub already_failed: u64,
    /// Why devices failed, by reason.
    pub failures: std::collections::BTreeMap<String, u64>,
    /// Refusals by the site, by code.
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Devices no site answered.
    pub unreachable: u64,
    /// Why, by reason (the last error of the device's request).
    pub unreachable_reasons: std::collections::BTreeMap<String, u64>,
    /// Time from request to confirmed, per device that got keys.
    pub latencies: Vec<Duration>,
    /// How long the whole run took.
    pub elapsed: Duration,
}

/// What became of one device of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceResult {
    /// Keys received, opened on the chip, confirmed programmed.
    Programmed,
    /// An earlier run programmed it.
    AlreadyProgrammed,
    /// Keys received but did not check out on the chip: confirmed failed (burned).
    Failed,
    /// An earlier run confirmed it failed.
    AlreadyFailed,
    /// The site refused: see the code.
    Refused,
    /// No site answered: see the reason. A rerun sends the same request again.
    Unreachable,
}

/// One device of a line, as `keyfab station run --device-log` writes it: enough to
/// reconcile the line's own records with the site's audit log.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceLine {
    /// The device.
    pub device_id: String,
    /// The request id its keys were asked with (the same on every run).
    pub request_id: String,
    /// What became of it.
    pub result: DeviceResult,
    /// The site's code, when it refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Why it failed or went unanswered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The audit record of the site's decision, when keys came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_sequence: Option<u64>,
    /// The cluster node whose audit chain holds it (a cluster site).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_chain: Option<String>,
    /// The URL that answered the request for keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Time from request to confirmation, when it was programmed now.
    #[serde(skip)]
    pub took: Option<Duration>,
}

/// A simulated production line: for every id of `devices`, a chip asks for its keys,
/// opens and checks them against `root_cert`, and confirms — `concurrency` programmers
/// at a time, each on a thread of its own. Each device's request id and chip transport
/// key are derived from the station's key, so a rerun resumes: keys released and not
/// confirmed are answered again and programmed, devices confirmed before are counted as
/// done, and refusals that pass with time are decided again. `done` is called with each
/// device's line and how many are done.
pub fn run_line(
    client: &Client,
    entitlement: &str,
    devices: Vec<String>,
    concurrency: usize,
    root_cert: &[u8],
    done: &(dyn Fn(&DeviceLine, u64) + Sync),
) -> LineReport {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    let started = std::time::Instant::now();
    let next = AtomicUsize::new(0);
    let finished = AtomicU64::new(0);
    let programmers = concurrency.clamp(1, devices.len().max(1));
    let mut report = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..programmers)
            .map(|_| {
                scope.spawn(|| {
                    let mut report = LineReport::default();
                    while let Some(device) = devices.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let line = one_device(client, entitlement, device, root_cert);
                        done(&line, finished.fetch_add(1, Ordering::Relaxed) + 1);
                        report.tally(line);
                    }
                    report
                })
            })
            .collect();
        let mut all = LineReport::default();
        for worker in workers {
            match worker.join() {
                Ok(part) => all.merge(part),
                // A programmer that panicked: its device went unanswered.
                Err(_) => all.note_unreachable("a programmer thread panicked".into(), 1),
            }
        }
        all
    });
    report.elapsed = started.elapsed();
    report
}

/// How many distinct reasons a line report keeps for devices no site answered.
const MAX_REASONS: usize = 8;
const OTHER_REASONS: &str = "other reasons";

impl LineReport {
    fn tally(&mut self, line: DeviceLine) {
        let reason = line.reason.unwrap_or_default();
        match line.result {
            DeviceResult::Programmed => {
                self.programmed += 1;
                self.latencies.extend(line.took);
            }
            DeviceResult::AlreadyProgrammed => self.already_programmed += 1,
            DeviceResult::AlreadyFailed => self.already_failed += 1,
            DeviceResult::Failed => {
                self.failed += 1;
                *self.failures.entry(reason).or_insert(0) += 1;
            }
            DeviceResult::Refused => {
                *self
                    .refused
                    .entry(line.code.unwrap_or_default())
                    .or_insert(0) += 1
            }
            DeviceResult::Unreachable => self.note_unreachable(reason, 1),
        }
    }

    /// Counts `n` devices unanswered for `why`. Reasons can name a time or an address,
    /// so past [`MAX_REASONS`] distinct ones the rest are counted together.
    fn note_unreachable(&mut self, why: String, n: u64) {
        self.unreachable += n;
        let why = if self.unreachable_reasons.len() >= MAX_REASONS
            && !self.unreachable_reasons.contains_key(&why)
        {
            OTHER_REASONS.to_owned()
        } else {
            why
        };
        *self.unreachable_reasons.entry(why).or_insert(0) += n;
    }

    fn merge(&mut self, other: LineReport) {
        self.programmed += other.programmed;
        self.already_programmed += other.already_programmed;
        self.failed += other.failed;
        self.already_failed += other.already_failed;
        for (why, n) in other.unreachable_reasons {
            self.note_unreachable(why, n);
        }
        for (why, n) in other.failures {
            *self.failures.entry(why).or_insert(0) += n;
        }
        for (code, n) in other.refused {
            *self.refused.entry(code).or_insert(0) += n;
        }
        self.latencies.extend(other.latencies);
    }
}

fn one_device(client: &Client, entitlement: &str, device: &str, root: &[u8]) -> DeviceLine {
    let mut line = DeviceLine {
        device_id: device.to_owned(),
        request_id: String::new(),
        result: DeviceResult::Unreachable,
        code: None,
        reason: None,
        audit_sequence: None,
        audit_chain: None,
        url: None,
        took: None,
    };
    let (result, code, reason) = match program(client, entitlement, device, root, &mut line) {
        Ok(result) => (result, None, None),
        Err((result, StationError::Refused { code, message, .. })) => {
            (result, Some(code), Some(message))
        }
        Err((result, e)) => (result, None, Some(e.to_string())),
    };
    line.result = result;
    line.code = code;
    line.reason = reason;
    line
}

/// Programs one device; on failure, what it counts as and why.
fn program(
    client: &Client,
    entitlement: &str,
    device: &str,
    root: &[u8],
    line: &mut DeviceLine,
) -> std::result::Result<DeviceResult, (DeviceResult, StationError)> {
    let started = std::time::Instant::now();
    let failed = |e: StationError| (DeviceResult::Failed, e);
    let unanswered = |e: StationError| match e {
        StationError::Refused { .. } => (DeviceResult::Refused, e),
        e => (DeviceResult::Unreachable, e),
    };
    line.request_id = client
        .line_request_id(entitlement, device)
        .map_err(failed)?;
    let chip = client.line_chip(entitlement, device).map_err(failed)?;
    let req = ProvisionRequest {
        request_id: line.request_id.clone(),
        entitlement: entitlement.to_owned(),
        device_id: device.to_owned(),
        csr: None,
        transport_key: Some(chip.transport_key().map_err(failed)?),
        chip_certificates: chip.certificates_base64(),
    };
    let bundle = match client.provision_answered(&req) {
        Ok((bundle, url)) => {
            line.url = Some(url);
            bundle
        }
        // Our own request, confirmed by an earlier run: the site keeps its keys from
        // everyone now. Repeating the confirmation says which way it went.
        Err(StationError::Refused { code, .. })
            if code == keyfab_formats::Code::InvalidState.as_str() =>
        {
            return match client.confirm(entitlement, device, "programmed") {
                Ok(answer) if answer["repeated"] == true => Ok(DeviceResult::AlreadyProgrammed),
                Err(StationError::Refused { code, .. })
                    if code == keyfab_formats::Code::InvalidState.as_str() =>
                {
                    Ok(DeviceResult::AlreadyFailed)
                }
                Ok(_) => Err((
                    DeviceResult::Refused,
                    StationError::BadAnswer("a confirmation that repeated nothing".into()),
                )),
                Err(e) => Err(unanswered(e)),
            };
        }
        Err(e) => return Err(unanswered(e)),
    };
    line.audit_sequence = bundle["audit_sequence"].as_u64();
    line.audit_chain = bundle["audit_chain"].as_str().map(str::to_owned);
    // The device's clock, read when it checks (a certificate issued this very second is
    // not valid a second earlier).
    let now = client.inner.clock.now();
    let checked = chip.program(&bundle, root, now);
    let result = if checked.is_ok() {
        "programmed"
    } else {
        "failed"
    };
    client
        .confirm(entitlement, device, result)
        .map_err(unanswered)?;
    match checked {
        Ok(_keys) => {
            line.took = Some(started.elapsed());
            Ok(DeviceResult::Programmed)
        }
        Err(e) => Err(failed(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_report_keeps_a_bounded_number_of_reasons_and_counts_every_device() {
        let mut a = LineReport::default();
        let mut b = LineReport::default();
        for i in 0..20 {
            a.note_unreachable(format!("at second {i}"), 1);
            b.note_unreachable("connection refused".into(), 1);
        }
        a.merge(b);
        assert_eq!(a.unreachable, 40);
        assert_eq!(a.unreachable_reasons.values().sum::<u64>(), 40);
        assert_eq!(a.unreachable_reasons.len(), MAX_REASONS + 1);
        assert_eq!(a.unreachable_reasons["at second 0"], 1);
        assert_eq!(a.unreachable_reasons[OTHER_REASONS], 32);
    }
}
