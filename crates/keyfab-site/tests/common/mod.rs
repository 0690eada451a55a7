//! What the station API's in-process tests share.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step stops the test"
)]

use axum::body::Body;
use axum::http::Request;
use keyfab_node::Node;
use keyfab_site::server::api::{AppState, PeerCertificate};
use keyfab_site::server::metrics::Metrics;
use std::sync::Arc;

/// The routes' state over `node`, as `site serve` builds it (default bounds).
pub(crate) fn state(node: Arc<Node>) -> AppState {
    AppState {
        provisioner: Arc::new(keyfab_site::provision::Provisioner::start(node.clone())),
        node,
        metrics: Arc::new(Metrics::default()),
        revocations: Arc::default(),
        limits: Arc::default(),
        request_timeout: std::time::Duration::from_secs(30),
        tpm_failing: Arc::default(),
    }
}

/// A request as the server hands it to the routes: with the peer's certificate (DER)
/// on it when the TLS handshake had one.
pub(crate) fn request(method: &str, path: &str, cert: Option<&[u8]>, body: &str) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    if let Some(c) = cert {
        req.extensions_mut()
            .insert(PeerCertificate::new(c.to_vec()));
    }
    req
}
