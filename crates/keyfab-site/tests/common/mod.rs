//! What the station API's in-process tests share.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step stops the test"
)]

use axum::body::Body;
use axum::http::Request;
use keyfab_site::server::api::PeerCertificate;

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
