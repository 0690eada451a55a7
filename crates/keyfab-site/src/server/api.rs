//! The station API's routes (docs/openapi.json): what a station may ask, and the answers.
//!
//! `fn app(state) -> Router`: tested in-process with `oneshot`; `serve` puts it behind
//! mutual TLS. Every route but `/healthz` runs after the station check: the request
//! carries the certificate its connection presented ([`PeerCertificate`]), which must
//! belong to an enrolled, unrevoked station of this site — checked again on every
//! request, so a revocation also stops connections already open.

use super::metrics::Metrics;
use crate::provision::{ProvisionRequest, Provisioner};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use keyfab_node::{Code, Error, Node};
use keyfab_policy::{DeviceId, EntitlementId};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// This API, described (docs/openapi.json).
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");

/// Largest request body accepted (a provisioning request with a CSR is ~1 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The DER certificate the TLS peer presented, put on each request by the server, with
/// the connection's last station check.
#[derive(Clone)]
pub struct PeerCertificate {
    der: Arc<Vec<u8>>,
    checked: Arc<std::sync::Mutex<Option<Checked>>>,
}

impl PeerCertificate {
    /// The certificate a connection presented (DER).
    pub fn new(der: Vec<u8>) -> Self {
        Self {
            der: Arc::new(der),
            checked: Arc::default(),
        }
    }
}

/// A passed station check: reused by the connection's next requests while no station was
/// revoked through this server since, and for at most [`CHECK_FOR`] (revocations made
/// elsewhere — another node of a cluster — are seen within that time).
#[derive(Clone)]
struct Checked {
    station: String,
    generation: u64,
    at: Instant,
}

const CHECK_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The station a request speaks for, after the station check.
#[derive(Clone)]
pub struct Station(pub String);

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The site.
    pub node: Arc<Node>,
    /// The decide-and-record engine.
    pub provisioner: Arc<Provisioner>,
    /// What `/metrics` reports.
    pub metrics: Arc<Metrics>,
    /// Bumped by every revocation made through this server: invalidates the checks
    /// connections keep.
    pub revocations: Arc<std::sync::atomic::AtomicU64>,
    /// Per-station bounds on connections and requests in flight.
    pub limits: Arc<super::fairness::StationLimits>,
    /// Longest a request may take, body upload included: a station that starts a
    /// request and stalls frees its slot.
    pub request_timeout: std::time::Duration,
    /// Set while the site's TPM rollback counter cannot be advanced: nothing is
    /// released until it can (`tpm_unavailable`), so that keeping the TPM from answering
    /// does not widen the window in which a copy of the home goes unnoticed.
    pub tpm_failing: Arc<std::sync::atomic::AtomicBool>,
}

/// The state as the routes hold it: axum clones it for every extractor of every request,
/// and one reference count costs less than one per field (their drops were 2.5 % of the
/// serving threads' time at 32 stations).
type Shared = Arc<AppState>;

/// The station API's routes.
pub fn app(state: AppState) -> Router {
    let state: Shared = Arc::new(state);
    let station_api = Router::new()
        .route("/v1/provision", post(provision))
        .route("/v1/confirm", post(confirm))
        .route("/v1/entitlements", get(entitlements))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_station,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/v1/openapi.json",
            get(|| async { ([("content-type", "application/json")], OPENAPI) }),
        )
        .merge(station_api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

/// What a request asked for, filled in by its handler once its body parsed: the access
/// line carries it, so a request can be followed from its access line to its decision
/// line (both name the request id, the station and the entitlement).
#[derive(Clone, Default)]
pub struct Asked(Arc<std::sync::Mutex<Option<(String, String)>>>);

impl Asked {
    /// Notes the request id and entitlement of the request.
    fn note(&self, request_id: &str, entitlement: &str) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some((request_id.to_owned(), entitlement.to_owned()));
        }
    }
}

/// One structured log line per request: who asked what, the answer, how long it took.
/// The station is known once its check passed; failures say so with their status.
async fn access_log(mut req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let asked = Asked::default();
    req.extensions_mut().insert(asked.clone());
    let started = Instant::now();
    let resp = next.run(req).await;
    let station = resp
        .extensions()
        .get::<Station>()
        .map(|s| s.0.clone())
        .unwrap_or_default();
    let (request_id, entitlement) = asked
        .0
        .lock()
        .ok()
        .and_then(|mut slot| slot.take())
        .unwrap_or_default();
    tracing::info!(
        target: "keyfab::access",
        %method,
        path,
        station,
        request_id,
        entitlement,
        status = resp.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

/// An error as the API answers it: a stable code and a short message.
/// The HTTP status is the code's (`Code::http_status`), unless a handler names another
/// with `with_status`.
pub struct ApiError {
    status: StatusCode,
    code: Code,
    message: String,
}

impl ApiError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
        }
    }

    fn with_status(self, status: StatusCode) -> Self {
        Self { status, ..self }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let code = e.code();
        // A damaged store's or a bug's details stay in the server's log; the station
        // gets the code and a fixed message.
        let message = if code.is_private() {
            tracing::error!(code = code.as_str(), error = %e, "site error");
            match code {
                Code::Corrupt => "the site's stored state is damaged: see the site's log",
                Code::Io => "the site could not read or write its files: see the site's log",
                _ => "internal error: see the site's log",
            }
            .to_owned()
        } else {
            e.to_string()
        };
        ApiError::new(code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code.as_str(), "message": self.message}})),
        )
            .into_response()
    }
}

async fn require_station(
    State(state): State<Shared>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(peer) = req.extensions().get::<PeerCertificate>().cloned() else {
        return Err(
            ApiError::new(Code::UntrustedSigner, "a station certificate is required")
                .with_status(StatusCode::UNAUTHORIZED),
        );
    };
    let generation = state.revocations.load(std::sync::atomic::Ordering::Acquire);
    let cached = peer
        .checked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .filter(|c| c.generation == generation && c.at.elapsed() < CHECK_FOR);
    let name = match cached {
        Some(c) => c.station,
        None => {
            let (node, der) = (state.node.clone(), peer.der.clone());
            let checked = tokio::task::spawn_blocking(move || crate::stations::check(&node, &der))
                .await
                .map_err(|_| ApiError::new(Code::Internal, "check"))?;
            let name = match checked {
                Ok(name) => name,
                Err(e) => {
                    // The access log names the station a refused certificate claims (its
                    // CN, from a certificate the line CA issued): a revoked station's
                    // attempts are traceable to it.
                    let mut refused = station_refused(e).into_response();
                    if let Ok(facts) = keyfab_crypto::x509::cert_facts(&peer.der) {
                        refused.extensions_mut().insert(Station(facts.common_name));
                    }
                    return Ok(refused);
                }
            };
            *peer.checked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Checked {
                station: name.clone(),
                generation,
                at: Instant::now(),
            });
            name
        }
    };
    let Some(_slot) = state.limits.request(&name) else {
        state.metrics.busy();
        return Err(ApiError::new(
            Code::Busy,
            format!("station '{name}' has its bound of requests in flight; retry"),
        ));
    };
    state.metrics.station_seen(&name, state.node.now().0);
    req.extensions_mut().insert(Station(name.clone()));
    tokio::time::timeout(state.request_timeout, next.run(req))
        .await
        .map(|mut resp| {
            resp.extensions_mut().insert(Station(name));
            resp
        })
        .map_err(|_| {
            ApiError::new(
                Code::Timeout,
                "the request took too long (a body that never finished?); retry with the same request id",
            )
        })
}

/// `POST /v1/provision`. Unknown fields are refused, so a request that asks for
/// something this site does not do (say, a transport key) is not silently served
/// without it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionBody {
    request_id: String,
    entitlement: String,
    device_id: String,
    /// The device's CSR, PEM.
    csr: Option<String>,
    /// The chip's transport key (P-256, SEC1 uncompressed, base64): the key material
    /// comes back sealed to it.
    transport_key: Option<String>,
    /// The chip's certificate chain, leaf first: each certificate's DER, base64.
    chip_certificates: Option<Vec<String>>,
}

/// A station whose certificate does not check out is refused (403, with the check's
/// code). A check that could not read the site's state — the store failing over — is
/// not a refusal: it is answered like any request the store could not serve (503
/// `unavailable`), and the station sends the same request again.
fn station_refused(e: Error) -> ApiError {
    match e {
        Error::Unavailable(_) | Error::OutcomeUnknown(_) | Error::Locked => ApiError::from(e),
        e => ApiError::new(e.code(), e.to_string()).with_status(StatusCode::FORBIDDEN),
    }
}

/// An id or name from a station as its type, or `invalid_input` (400) saying why.
fn checked<T: TryFrom<String, Error = keyfab_policy::IdError>>(text: &str) -> Result<T, ApiError> {
    Ok(crate::provision::checked(text)?)
}

fn malformed(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(Code::Malformed, format!("{what}: {e}"))
}

/// Parses a `POST /v1/provision` body strictly (unknown fields, a bad CSR or transport
/// key: `malformed`) into the engine's request for `station`.
pub fn parse_provision(body: &[u8], station: &str) -> Result<ProvisionRequest, ApiError> {
    let body: ProvisionBody =
        serde_json::from_slice(body).map_err(|e| malformed("request body", e))?;
    if body
        .request_id
        .starts_with(crate::provision::LOT_REQUEST_PREFIX)
    {
        return Err(ApiError::new(
            Code::InvalidInput,
            format!(
                "request ids starting with '{}' are the site's own (its lots); choose another",
                crate::provision::LOT_REQUEST_PREFIX
            ),
        ));
    }
    let csr = body
        .csr
        .as_deref()
        .map(|pem| keyfab_crypto::x509::from_pem(pem, "CERTIFICATE REQUEST"))
        .transpose()
        .map_err(|e| malformed("csr", e))?;
    let transport_key = body
        .transport_key
        .as_deref()
        .map(|b64| {
            use base64::Engine;
            let point = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| e.to_string())?;
            keyfab_crypto::hpke::HpkePublicKey::from_sec1(&point).map_err(|e| e.to_string())
        })
        .transpose()
        .map_err(|e| malformed("transport_key", e))?;
    let chip_chain = body
        .chip_certificates
        .as_deref()
        .map(chip_certificates)
        .transpose()
        .map_err(|e| malformed("chip_certificates", e))?;
    Ok(ProvisionRequest {
        entitlement: checked(&body.entitlement)?,
        device_id: checked(&body.device_id)?,
        station: Some(checked(station)?),
        request_id: checked(&body.request_id)?,
        csr,
        transport_key,
        chip_chain,
    })
}

/// A chain as the station API carries it: 1 to [`MAX_CHIP_CHAIN`] base64 DER
/// certificates of at most [`MAX_CHIP_CERT_BYTES`] each.
///
/// [`MAX_CHIP_CHAIN`]: keyfab_crypto::x509::chip::MAX_CHIP_CHAIN
/// [`MAX_CHIP_CERT_BYTES`]: keyfab_crypto::x509::chip::MAX_CHIP_CERT_BYTES
fn chip_certificates(encoded: &[String]) -> Result<Vec<Vec<u8>>, String> {
    use base64::Engine;
    use keyfab_crypto::x509::chip::{MAX_CHIP_CERT_BYTES, MAX_CHIP_CHAIN};
    if encoded.is_empty() || encoded.len() > MAX_CHIP_CHAIN {
        return Err(format!(
            "{} certificates, 1 to {MAX_CHIP_CHAIN}",
            encoded.len()
        ));
    }
    encoded
        .iter()
        .enumerate()
        .map(|(i, b64)| {
            // Base64 is 4/3 of the bytes: refuse before decoding what cannot fit.
            if b64.len() > MAX_CHIP_CERT_BYTES.div_ceil(3) * 4 {
                return Err(format!(
                    "certificate {i}: more than {MAX_CHIP_CERT_BYTES} bytes"
                ));
            }
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("certificate {i}: {e}"))
        })
        .collect()
}

/// Parses a `POST /v1/confirm` body strictly: (entitlement, device id, result).
pub fn parse_confirm(
    body: &[u8],
) -> Result<(EntitlementId, DeviceId, crate::provision::Programming), ApiError> {
    let body: ConfirmBody =
        serde_json::from_slice(body).map_err(|e| malformed("request body", e))?;
    let result = crate::provision::Programming::parse(&body.result)
        .ok_or_else(|| malformed("result", "must be programmed or failed"))?;
    Ok((
        checked(&body.entitlement)?,
        checked(&body.device_id)?,
        result,
    ))
}

/// A body the server would not read (over [`MAX_BODY_BYTES`], cut off): the JSON error
/// shape, with the rejection's own status (413 for a body too large).
fn unreadable(rejection: BytesRejection) -> ApiError {
    ApiError::new(Code::InvalidInput, format!("request body: {rejection}"))
        .with_status(rejection.status())
}

async fn provision(
    State(state): State<Shared>,
    Extension(Station(station)): Extension<Station>,
    Extension(asked): Extension<Asked>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = parse_provision(&body.map_err(unreadable)?, &station)?;
    if state.tpm_failing.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::TpmUnavailable(
            "the site cannot advance its counter; nothing is released until the TPM answers (retry)".into(),
        )
        .into());
    }
    asked.note(&req.request_id, &req.entitlement);
    let entitlement = req.entitlement.clone();
    let started = Instant::now();
    let (device_id, request_id) = (req.device_id.clone(), req.request_id.clone());
    let outcome = state.provisioner.provision_async(req).await;
    state.metrics.observe(&outcome, started.elapsed());
    if matches!(&outcome, Ok(p) if !p.replayed) {
        state.metrics.station_provisioned(&station);
    }
    match &outcome {
        Ok(p) => tracing::debug!(
            target: "keyfab::provision",
            station = station.as_str(),
            entitlement = entitlement.as_str(),
            device_id = device_id.as_str(),
            request_id = request_id.as_str(),
            audit_sequence = p.audit_sequence,
            replayed = p.replayed,
            sealed_to_chip = p.chip_enc.is_some(),
            "released"
        ),
        Err(e) => tracing::debug!(
            target: "keyfab::provision",
            station = station.as_str(),
            entitlement = entitlement.as_str(),
            device_id = device_id.as_str(),
            request_id = request_id.as_str(),
            code = e.code().as_str(),
            "refused"
        ),
    }
    let provisioned = outcome?;
    // The answer holds the keys: its buffer is zeroized when the server drops it.
    let body = axum::body::Bytes::from_owner(crate::bundle::device_bundle_bytes(&provisioned));
    let response = (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    drop(provisioned);
    // Sealing to the chip handled the keys in frames below this one, on this thread.
    keyfab_crypto::secret::scrub_stack();
    Ok(response)
}

/// `POST /v1/confirm`: the station programmed the device, or failed to.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfirmBody {
    entitlement: String,
    device_id: String,
    /// `programmed` or `failed`.
    result: String,
}

async fn confirm(
    State(state): State<Shared>,
    Extension(Station(station)): Extension<Station>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (entitlement, device_id, result) = parse_confirm(&body.map_err(unreadable)?)?;
    let station = checked(&station)?;
    let provisioner = state.provisioner.clone();
    let c = tokio::task::spawn_blocking(move || {
        provisioner.confirm(&entitlement, &device_id, result, Some(station))
    })
    .await
    .map_err(|_| ApiError::new(Code::Internal, "confirm"))??;
    if !c.repeated {
        state.metrics.confirmed(c.result.as_str());
    }
    Ok(Json(json!({
        "entitlement": c.entitlement,
        "device_id": c.device_id,
        "result": c.result.as_str(),
        "audit_sequence": c.audit_sequence,
        "repeated": c.repeated,
    }))
    .into_response())
}

/// `GET /v1/entitlements`: what this station may use, and what is left of it.
async fn entitlements(
    State(state): State<Shared>,
    Extension(Station(station)): Extension<Station>,
) -> Result<Response, ApiError> {
    let node = state.node.clone();
    let list = tokio::task::spawn_blocking(move || usable(&node, &station))
        .await
        .map_err(|_| ApiError::new(Code::Internal, "list"))??;
    Ok(Json(json!({ "entitlements": list })).into_response())
}

fn usable(node: &Node, station: &str) -> keyfab_node::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for e in crate::entitlements::list(node)? {
        let p = &e.policy;
        if p.allowed_stations
            .as_ref()
            .is_some_and(|allowed| !allowed.iter().any(|a| a == station))
        {
            continue;
        }
        let standing = crate::entitlements::standing(node, &e)?;
        out.push(json!({
            "id": e.id,
            "product": p.product,
            "state": standing.state,
            "devices": p.devices,
            "provisioned": standing.provisioned,
            "left": standing.left,
            "daily_limit": standing.daily_limit,
            "today": standing.today,
            "left_today": standing.left_today,
            "valid_from": keyfab_node::rfc3339(p.valid_from),
            "valid_until": keyfab_node::rfc3339(p.valid_until),
            "keys": p.keys.iter().map(|k| json!({"name": k.name, "type": k.key_type.as_str(), "source": k.source.as_str()})).collect::<Vec<_>>(),
        }));
    }
    Ok(out)
}

async fn metrics(State(state): State<Shared>) -> Result<Response, ApiError> {
    let node = state.node.clone();
    let metrics = state.metrics.clone();
    let text = tokio::task::spawn_blocking(move || metrics.render(&node))
        .await
        .map_err(|_| ApiError::new(Code::Internal, "metrics"))??;
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_station_check_the_store_could_not_serve_is_sent_again_not_refused() {
        let failover = station_refused(Error::Unavailable("no etcd leader".into()));
        assert_eq!(failover.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(failover.code, Code::Unavailable);
        let refused = station_refused(Error::Verification(
            keyfab_formats::FormatError::UntrustedSigner("revoked".into()),
        ));
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert_eq!(refused.code, Code::UntrustedSigner);
    }
}
