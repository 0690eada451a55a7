//! `keyfab site serve`: the station API over mutual TLS 1.3 (docs/openapi.json).
//!
//! Which API for which job:
//! - the routes, testable in-process: [`api::app`];
//! - run the server until SIGTERM or SIGINT: [`serve`];
//! - the site's commands while it runs: `HOME/serve.sock` ([`admin`]).
//!
//! A connection gets nothing before its TLS handshake proves a certificate of this
//! site's line CA (`crate::stations`); the handshake has a deadline, and so does each
//! request's header (a client that trickles bytes is cut off); the number of open
//! connections is bounded; request bodies are capped. On SIGTERM the server stops
//! accepting, lets every request in flight finish — a key is released only after its
//! audit record is durable, so a request either completes or leaves nothing — and exits.

pub mod admin;
pub mod api;
pub mod fairness;
pub mod metrics;
pub mod monitor;
pub mod sealed;

use crate::provision::Provisioner;
use crate::stations::ServerIdentity;
use api::{AppState, PeerCertificate};
use hyper_util::rt::{TokioIo, TokioTimer};
use keyfab_node::{Error, Node, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// How `serve` runs; the defaults suit one production line.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Host names and IP addresses stations use to reach this server (the server
    /// certificate's names).
    pub names: Vec<String>,
    /// Connections at once, all stations together.
    pub max_connections: usize,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Longest a request's headers may take to arrive.
    pub header_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Per-station bounds on connections and requests in flight.
    pub per_station: fairness::Bounds,
    /// Longest a request may take, its body upload included.
    pub request_timeout: Duration,
    /// What `/metrics` says of the binary (`keyfab_build_info`).
    pub build: metrics::BuildInfo,
    /// Where to serve `/metrics` and health on plain HTTP, without client certificates
    /// ([`monitor`]); none: only the station API's `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// For a site bound to a TPM counter: the least time between two advances while
    /// the state changes ([`crate::rollback_counter`]).
    pub rollback_counter_every: Duration,
}

impl ServeConfig {
    /// The defaults for `listen` and `names`.
    pub fn new(listen: SocketAddr, names: Vec<String>) -> Self {
        Self {
            listen,
            names,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            per_station: fairness::Bounds::default(),
            request_timeout: Duration::from_secs(30),
            rollback_counter_every: Duration::from_secs(60),
            build: metrics::BuildInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                commit: "unknown".to_owned(),
            },
            metrics_listen: None,
        }
    }
}

/// What happened while serving, reported when the server stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServeSummary {
    /// Connections accepted.
    pub connections: u64,
    /// Connections refused (over a bound, or failed handshakes).
    pub refused_connections: u64,
}

fn internal(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Bug(format!("{what}: {e}"))
}

/// The TLS configuration: TLS 1.3 only, this site's identity, and a client certificate
/// of this site's line CA required.
pub fn tls_config(identity: &ServerIdentity) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let line_ca = identity
        .chain
        .last()
        .ok_or_else(|| internal("server identity", "empty chain"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(line_ca.clone()))
        .map_err(|e| internal("line CA", e))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| internal("client verifier", e))?;
    let chain = identity
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.expose().to_vec()));
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| internal("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| internal("server certificate", e))
}

/// Serves until SIGTERM or SIGINT. `ready` learns the bound address first (useful with
/// port 0).
pub fn serve(
    mut node: Node,
    config: ServeConfig,
    ready: impl FnOnce(SocketAddr),
) -> Result<ServeSummary> {
    let identity = crate::stations::server_identity(&mut node, &config.names)?;
    let tls = Arc::new(tls_config(&identity)?);
    // A home sealed by shares keeps this identity, to answer `locked` while sealed next;
    // a cluster node, to answer `unavailable` while its store has no quorum next.
    if node.store.is_shared() || keyfab_custody::unseal::UnsealConfig::load(&node.dir)?.is_some() {
        sealed::save_serving_identity(&node.dir, &identity)?;
    }
    drop(identity);
    let node = Arc::new(node);
    let state = AppState {
        provisioner: Arc::new(Provisioner::start(node.clone())),
        node,
        metrics: Arc::new(metrics::Metrics::new(config.build.clone())),
        revocations: Arc::default(),
        limits: Arc::new(fairness::StationLimits::new(config.per_station)),
        request_timeout: config.request_timeout,
        tpm_failing: Arc::default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyfab-serve")
        .build()
        .map_err(|e| internal("runtime", e))?;
    let summary = runtime.block_on(run(state, tls, config, ready))?;
    Ok(summary)
}

/// Advances the site's TPM counter every `every` while its state changes (keys
/// released, records appended): the window in which a copy of the home can be put back
/// unnoticed is at most `every` of production; an idle site writes nothing to the TPM.
/// While an advance fails, `failing` is set — stations are refused `tpm_unavailable` —
/// and it is tried again every second.
async fn advance_rollback_counter(
    node: Arc<Node>,
    every: Duration,
    failing: Arc<std::sync::atomic::AtomicBool>,
) {
    // The state as the start's advance left it.
    let n = node.clone();
    let mut seen = tokio::task::spawn_blocking(move || n.store.revision().ok())
        .await
        .ok()
        .flatten();
    use std::sync::atomic::Ordering;
    loop {
        let behind = failing.load(Ordering::Relaxed);
        tokio::time::sleep(if behind {
            Duration::from_secs(1).min(every)
        } else {
            every
        })
        .await;
        let n = node.clone();
        let advanced = tokio::task::spawn_blocking(move || {
            let now = n.store.revision()?;
            if seen == Some(now) && !behind {
                return Ok(seen);
            }
            crate::rollback_counter::advance(&n)?;
            n.store.revision().map(Some).map_err(Error::from)
        });
        match advanced.await {
            Ok(Ok(revision)) => {
                seen = revision;
                if failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!(target: "keyfab::rollback", "TPM rollback counter advanced again: releasing keys");
                }
            }
            Ok(Err(e)) => {
                failing.store(true, Ordering::Relaxed);
                tracing::error!(target: "keyfab::rollback", error = %e, "TPM rollback counter not advanced: releasing nothing until it is");
            }
            Err(_) => return,
        }
    }
}

/// How often a serving site looks for batch CA keys whose window has ended.
const RETIRE_EVERY: Duration = Duration::from_secs(60);

/// Destroys the batch CA keys of entitlements whose window has ended
/// ([`crate::batch_key::retire_ended`]) at start, then every [`RETIRE_EVERY`]; and forgets
/// the ones destroyed in this process's memory.
async fn retire_ended_batch_keys(provisioner: Arc<Provisioner>) {
    loop {
        let p = provisioner.clone();
        let retired = tokio::task::spawn_blocking(move || {
            let ids = crate::batch_key::retire_ended(p.node())?;
            p.forget_destroyed_batch_keys()?;
            Ok::<_, Error>(ids)
        });
        match retired.await {
            Ok(Ok(ids)) => {
                for id in ids {
                    tracing::info!(target: "keyfab::entitlement", entitlement = %id, "window ended: batch CA key destroyed");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(target: "keyfab::entitlement", error = %e, "batch CA keys not retired; trying again")
            }
            Err(_) => return,
        }
        tokio::time::sleep(RETIRE_EVERY).await;
    }
}

async fn run(
    state: AppState,
    tls: Arc<rustls::ServerConfig>,
    config: ServeConfig,
    ready: impl FnOnce(SocketAddr),
) -> Result<ServeSummary> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            Error::InvalidInput(format!(
                "cannot listen on {}: {e} (another process, another site serve perhaps, may hold it: choose another --listen)",
                config.listen
            ))
        })?;
    let (admin_listener, admin_path) = admin::bind(&state.node.dir)?;
    let admin_task = tokio::spawn(admin::serve(admin_listener, state.clone()));
    let retire_task = tokio::spawn(retire_ended_batch_keys(state.provisioner.clone()));
    let counter_task = match crate::rollback_counter::recorded(&state.node)? {
        Some(_) => Some(tokio::spawn(advance_rollback_counter(
            state.node.clone(),
            config.rollback_counter_every,
            state.tpm_failing.clone(),
        ))),
        None => None,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let limits = state.limits.clone();
    let metrics = state.metrics.clone();
    let monitor_task = match config.metrics_listen {
        Some(addr) => {
            let monitor = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Error::InvalidInput(format!("cannot listen on {addr} for --metrics-listen: {e}"))
            })?;
            tracing::info!(target: "keyfab::monitor", addr = %monitor.local_addr()?, "metrics and health on plain HTTP");
            let app = monitor::app(Arc::new(state.clone()));
            Some(tokio::spawn(async move {
                let _ = axum::serve(monitor, app).await;
            }))
        }
        None => None,
    };
    // Ready (and saying so) only once every listener is bound.
    ready(listener.local_addr()?);
    let router = api::app(state);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut summary = ServeSummary::default();
    let (refusals_tx, mut refusals) = tokio::sync::mpsc::unbounded_channel::<()>();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                // Out of file descriptors, say: wait a moment rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Beyond the bound, a connection is closed at once rather than queued.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(target: "keyfab::tls", %peer, "connection bound reached");
            metrics.connection_over_bound();
            summary.refused_connections += 1;
            drop(tcp);
            continue;
        };
        summary.connections += 1;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let refused = refusals_tx.clone();
        let limits = limits.clone();
        let metrics = metrics.clone();
        let http = {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(config.header_timeout)
                .keep_alive(true);
            b
        };
        let handshake_timeout = config.handshake_timeout;
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                // No certificate, a certificate of another line CA, an expired one, a
                // handshake that never finishes: closed before any handler runs.
                Ok(Err(e)) => {
                    tracing::info!(target: "keyfab::tls", %peer, error = %e, "handshake refused");
                    metrics.handshake_refused();
                    let _ = refused.send(());
                    return;
                }
                Err(_) => {
                    tracing::info!(target: "keyfab::tls", %peer, "handshake timed out");
                    metrics.handshake_refused();
                    let _ = refused.send(());
                    return;
                }
            };
            let Some(der) = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
            else {
                let _ = refused.send(());
                return;
            };
            // A station past its bound of open connections is closed here: the handshake
            // proved the certificate, whose CN is the station's name.
            let station = keyfab_crypto::x509::cert_facts(&der)
                .map(|f| f.common_name)
                .unwrap_or_default();
            let Some(_connection) = limits.connection(&station) else {
                tracing::warn!(target: "keyfab::tls", %peer, station, "station over its bound of connections");
                let _ = refused.send(());
                // Held a moment before it is closed: a station that reconnects at once
                // would otherwise make the site pay a handshake per attempt, in a loop,
                // out of the other stations' share of the cores.
                tokio::time::sleep(OVER_BOUND_HOLD).await;
                return;
            };
            let cert = PeerCertificate::new(der);
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(cert.clone());
                    let mut router = router.clone();
                    async move {
                        use tower::Service;
                        router.call(req.map(axum::body::Body::new)).await
                    }
                },
            );
            let conn = http.serve_connection(TokioIo::new(tls), service);
            let _ = watcher.watch(conn).await;
        });
        while refusals.try_recv().is_ok() {
            summary.refused_connections += 1;
        }
    }
    tracing::info!("stopping: no new connections; requests in flight finish");
    drop(listener);
    admin_task.abort();
    retire_task.abort();
    if let Some(task) = counter_task {
        task.abort();
    }
    if let Some(task) = monitor_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&admin_path);
    // In-flight requests finish; idle keep-alive connections close.
    let _ = tokio::time::timeout(config.shutdown_grace, graceful.shutdown()).await;
    while refusals.try_recv().is_ok() {
        summary.refused_connections += 1;
    }
    Ok(summary)
}

/// How long a connection past its station's bound is held, unread, before it is closed.
const OVER_BOUND_HOLD: Duration = Duration::from_secs(1);

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
