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
pub mod http;

use keyfab_crypto::secret::SecretBytes;
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
}

/// Tries a dropped request this many times in all (over all URLs).
const ATTEMPTS: usize = 6;

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
    endpoints: Vec<http::Endpoint>,
    /// Connections between requests, oldest first.
    idle: std::sync::Mutex<std::collections::VecDeque<IdleConnection>>,
    /// The URL calls start with: the last one that answered. A node that stops
    /// answering costs one timeout, not one per request.
    preferred: std::sync::atomic::AtomicUsize,
    /// Requests sent again so far, and why.
    retried: RetryCounters,
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
    /// station of `dir`.
    pub fn new(dir: &StationDir, urls: &[String]) -> Result<Self> {
        if urls.is_empty() {
            return Err(StationError::Unreachable("no URL given".into()));
        }
        let endpoints = urls
            .iter()
            .map(|u| http::Endpoint::parse(u).map_err(StationError::BadUrl))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                tls: Arc::new(dir.tls_config()?),
                endpoints,
                idle: Default::default(),
                preferred: Default::default(),
                retried: Default::default(),
            }),
        })
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
        let body = serde_json::to_vec(req).map_err(|e| StationError::BadAnswer(e.to_string()))?;
        self.call("POST", "/v1/provision", Some(&body))
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
        use std::sync::atomic::Ordering;
        let inner = &self.inner;
        let count = inner.endpoints.len();
        let mut last = String::new();
        let mut certificate_refusals = 0;
        let first = inner.preferred.load(Ordering::Relaxed);
        for attempt in 0..ATTEMPTS {
            let which = (first + attempt) % count;
            let url = &inner.endpoints[which].url;
            match self.exchange(which, method, path, body) {
                // The site has this station's bound of requests in flight: wait, retry.
                Ok(resp) if resp.status == 429 => {
                    inner.retried.busy.fetch_add(1, Ordering::Relaxed);
                    last = format!("{url}: busy");
                    std::thread::sleep(Duration::from_millis(20 << attempt.min(4)));
                }
                // The site's state store is failing over: nothing was released, and the
                // same request (same request id) is safe to send again, to any node.
                Ok(resp) if resp.status == 503 => match answer(&resp) {
                    Err(StationError::Refused { code, message, .. })
                        if code == keyfab_formats::Code::Unavailable.as_str() =>
                    {
                        last = format!("{url}: unavailable: {message}");
                        std::thread::sleep(Duration::from_millis(200 << attempt.min(4)));
                    }
                    other => return other,
                },
                Ok(resp) => {
                    inner.preferred.store(which, Ordering::Relaxed);
                    return answer(&resp);
                }
                Err(e) => {
                    if let Some(why) = certificate_refusal(&e) {
                        certificate_refusals += 1;
                        last = format!("{url}: {why}");
                        if certificate_refusals >= count {
                            return Err(StationError::Untrusted(last));
                        }
                        continue;
                    }
                    inner.retried.dropped.fetch_add(1, Ordering::Relaxed);
                    last = format!("{url}: {e}");
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
        Err(StationError::Unreachable(last))
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
    /// Devices whose package did not check out on the chip: confirmed failed (burned).
    pub failed: u64,
    /// Why, by reason.
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

/// A simulated production line: for every id of `devices`, a chip with its own transport
/// key asks for its keys (request id = device id, so a rerun resumes), opens and checks
/// them against `root_cert`, and confirms — `concurrency` programmers at a time, each on
/// a thread of its own. `done` is called after each device with how many are done.
pub fn run_line(
    client: &Client,
    entitlement: &str,
    devices: Vec<String>,
    concurrency: usize,
    root_cert: &[u8],
    done: &(dyn Fn(u64) + Sync),
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
                        report.tally(one_device(client, entitlement, device, root_cert));
                        done(finished.fetch_add(1, Ordering::Relaxed) + 1);
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
                Err(_) => all.tally(DeviceOutcome::Unreachable(
                    "a programmer thread panicked".into(),
                )),
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
    fn tally(&mut self, outcome: DeviceOutcome) {
        match outcome {
            DeviceOutcome::Programmed(t) => {
                self.programmed += 1;
                self.latencies.push(t);
            }
            DeviceOutcome::Failed(why) => {
                self.failed += 1;
                *self.failures.entry(why).or_insert(0) += 1;
            }
            DeviceOutcome::Refused(code) => *self.refused.entry(code).or_insert(0) += 1,
            DeviceOutcome::Unreachable(why) => {
                self.unreachable += 1;
                self.note_unreachable(why, 1);
            }
        }
    }

    /// Counts `n` devices unanswered for `why`. Reasons can name a time or an address,
    /// so past [`MAX_REASONS`] distinct ones the rest are counted together.
    fn note_unreachable(&mut self, why: String, n: u64) {
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
        self.failed += other.failed;
        self.unreachable += other.unreachable;
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

enum DeviceOutcome {
    Programmed(Duration),
    Failed(String),
    Refused(String),
    Unreachable(String),
}

fn one_device(client: &Client, entitlement: &str, device: &str, root: &[u8]) -> DeviceOutcome {
    use keyfab_crypto::time::Clock;
    let started = std::time::Instant::now();
    let chip = device::SimulatedChip::new(device, &keyfab_crypto::rng::SystemRng);
    let transport_key = match chip.transport_key() {
        Ok(k) => k,
        Err(e) => return DeviceOutcome::Failed(e.to_string()),
    };
    // Random, so no other station can guess it from the device id (the site answers a
    // retry only to the station that made the request, all the same).
    let mut request_id = [0u8; 16];
    keyfab_crypto::rng::SecureRng::fill(&keyfab_crypto::rng::SystemRng, &mut request_id);
    let req = ProvisionRequest {
        request_id: hex::encode(request_id),
        entitlement: entitlement.to_owned(),
        device_id: device.to_owned(),
        csr: None,
        transport_key: Some(transport_key),
    };
    let bundle = match client.provision(&req) {
        Ok(b) => b,
        Err(StationError::Refused { code, .. }) => return DeviceOutcome::Refused(code),
        Err(e) => return DeviceOutcome::Unreachable(e.to_string()),
    };
    // The device's clock, read when it checks (a certificate issued this very second is
    // not valid a second earlier).
    let now = keyfab_crypto::time::SystemClock.now();
    let (result, why) = match chip.program(&bundle, root, now) {
        Ok(_keys) => ("programmed", None),
        Err(e) => ("failed", Some(e.to_string())),
    };
    match client.confirm(entitlement, device, result) {
        Ok(_) => match why {
            None => DeviceOutcome::Programmed(started.elapsed()),
            Some(why) => DeviceOutcome::Failed(why),
        },
        Err(StationError::Refused { code, .. }) => DeviceOutcome::Refused(code),
        Err(e) => DeviceOutcome::Unreachable(e.to_string()),
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
            a.tally(DeviceOutcome::Unreachable(format!("at second {i}")));
            b.tally(DeviceOutcome::Unreachable("connection refused".into()));
        }
        a.merge(b);
        assert_eq!(a.unreachable, 40);
        assert_eq!(a.unreachable_reasons.values().sum::<u64>(), 40);
        assert_eq!(a.unreachable_reasons.len(), MAX_REASONS + 1);
        assert_eq!(a.unreachable_reasons["at second 0"], 1);
        assert_eq!(a.unreachable_reasons[OTHER_REASONS], 32);
    }
}
