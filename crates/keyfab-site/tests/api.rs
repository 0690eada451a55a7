//! The station API's routes in-process (`oneshot`), without TLS: the server puts the
//! peer's certificate on each request, these tests put it there themselves.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::request;
use keyfab_crypto::rng::SystemRng;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::{SystemClock, UnixTime};
use keyfab_crypto::x509::{self, Role, Validity};
use keyfab_node::{Node, NodeKind};
use keyfab_site::server::api::{app, AppState};
use std::sync::Arc;
use tower::ServiceExt;

/// An installed site with one enrolled station; its certificate (DER).
fn site(dir: &std::path::Path) -> (Node, Vec<u8>) {
    let pass = SecretBytes::new(b"api test".to_vec());
    let mut node = Node::init(
        &dir.join("site"),
        NodeKind::Site,
        "shenzhen-1",
        &pass,
        Box::new(SystemRng),
        Box::new(SystemClock),
    )
    .unwrap();
    let now = keyfab_crypto::time::Clock::now(&SystemClock);
    let validity = Validity {
        not_before: UnixTime(now.0 - 60),
        not_after: now.plus_days(30),
    };
    let root_key = SigningKey::generate(&SystemRng).unwrap();
    let root = x509::root_certificate(&root_key, "CN=Test Root", validity, &SystemRng).unwrap();
    let csr = x509::from_pem(
        &std::fs::read_to_string(dir.join("site").join(keyfab_node::CSR_FILE)).unwrap(),
        "CERTIFICATE REQUEST",
    )
    .unwrap();
    let cluster = x509::issue_cluster_certificate(
        &root_key,
        &root,
        &x509::read_csr(&csr).unwrap(),
        Role::Site,
        validity,
        &SystemRng,
    )
    .unwrap();
    node.install_cert(&cluster, &root).unwrap();
    keyfab_site::stations::line_ca(&mut node).unwrap();
    let station = keyfab_site::stations::enroll(&node, "line-1", 30).unwrap();
    (node, station.certificate)
}

fn state(node: Node) -> AppState {
    common::state(Arc::new(node))
}

async fn call(state: &AppState, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_answer_stations_only() {
    let dir = tempfile::tempdir().unwrap();
    let (node, cert) = site(dir.path());
    let state = state(node);

    // Health needs no station.
    let resp = app(state.clone())
        .oneshot(request("GET", "/healthz", None, ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Everything else does.
    let (status, json) = call(&state, request("GET", "/v1/entitlements", None, "")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["error"]["code"], "untrusted_signer");
    let (status, json) = call(&state, request("GET", "/v1/entitlements", Some(&cert), "")).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["entitlements"], serde_json::json!([]));

    // Bodies are parsed strictly.
    for (body, code) in [
        ("not json", "malformed"),
        (
            r#"{"request_id":"r","entitlement":"e","device_id":"d","extra":1}"#,
            "malformed",
        ),
        (r#"{"request_id":"r","entitlement":"e"}"#, "malformed"),
        (
            r#"{"request_id":"r","entitlement":"e","device_id":"d","csr":"nope"}"#,
            "malformed",
        ),
    ] {
        let (status, json) =
            call(&state, request("POST", "/v1/provision", Some(&cert), body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {json}");
        assert_eq!(json["error"]["code"], code, "{body}");
    }
    let (status, json) = call(
        &state,
        request(
            "POST",
            "/v1/provision",
            Some(&cert),
            r#"{"request_id":"r","entitlement":"nope","device_id":"d"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{json}");
    assert_eq!(json["error"]["code"], "unknown_entitlement");
    let big = "x".repeat(keyfab_site::server::api::MAX_BODY_BYTES + 1);
    let resp = app(state.clone())
        .oneshot(request("POST", "/v1/provision", Some(&cert), &big))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // A certificate this site never issued, and a revoked station's.
    let (status, _) = call(
        &state,
        request("GET", "/metrics", Some(b"not a certificate"), ""),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    keyfab_site::stations::revoke(&state.node, "line-1").unwrap();
    state
        .revocations
        .fetch_add(1, std::sync::atomic::Ordering::Release);
    let (status, json) = call(&state, request("GET", "/v1/entitlements", Some(&cert), "")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("revoked"));
}

/// Every route the OpenAPI document lists is served, with its method, and the document
/// itself is served as it is committed.
#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_describes_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let (node, cert) = site(dir.path());
    let state = state(node);
    let doc: serde_json::Value = serde_json::from_str(keyfab_site::server::api::OPENAPI).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 6);
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            let body = if m == "POST" { "{}" } else { "" };
            let resp = app(state.clone())
                .oneshot(request(&m, path, Some(&cert), body))
                .await
                .unwrap();
            assert!(
                resp.status() != StatusCode::NOT_FOUND
                    && resp.status() != StatusCode::METHOD_NOT_ALLOWED,
                "{m} {path}: {}",
                resp.status()
            );
        }
    }
    let (status, served) = call(&state, request("GET", "/v1/openapi.json", None, "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, doc);
}
