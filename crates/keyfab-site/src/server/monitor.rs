//! The monitoring listener (`site serve --metrics-listen ADDR`): `/metrics` and health
//! on plain HTTP without client certificates, for Prometheus and load balancers that
//! hold no station certificate. Bind it to loopback or a management network: it says
//! which entitlements a site holds and how far each is, never a key.
//!
//! - `GET /metrics`: the same text as the station API's `/metrics`;
//! - `GET /healthz/live`: 200 while the process answers;
//! - `GET /healthz/ready`: 200 when the site can decide — its store answers within
//!   [`READY_WITHIN`] and it has not stopped itself (`rollback_detected`, `log_broken`)
//!   — else 503 with the reason.

use super::api::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;

/// How long the store has to answer a readiness check.
pub const READY_WITHIN: Duration = Duration::from_secs(2);

/// The monitoring routes.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz/live", get(|| async { "live\n" }))
        .route("/healthz/ready", get(ready))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (node, metrics) = (state.node.clone(), state.metrics.clone());
    match tokio::task::spawn_blocking(move || metrics.render(&node)).await {
        Ok(Ok(text)) => ([("content-type", "text/plain; version=0.0.4")], text).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", e.code())).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let node = state.node.clone();
    let check = tokio::task::spawn_blocking(move || crate::latch::check(&node));
    match tokio::time::timeout(READY_WITHIN, check).await {
        Ok(Ok(Ok(()))) => "ready\n".into_response(),
        Ok(Ok(Err(e))) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", e.code()),
        )
            .into_response(),
        Ok(Err(_)) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the state store does not answer\n",
        )
            .into_response(),
    }
}
