//! REST admin API (`REST_ADDR`) and the Prometheus endpoint (`METRICS_ADDR`).
//!
//! - `GET /health`: the process is up (always 200).
//! - `GET /live`: the process is not wedged (always 200 while it answers).
//! - `GET /ready`: 200 when the store is reachable and migrated and the shard is not
//!   draining, 503 otherwise; the body says which.
//! - `GET /api/v1/stats`: [`omega_protocol::admin::ShardStats`] as JSON.
//! - `GET /metrics`: OpenMetrics when the scraper asks for it (Prometheus does), else the
//!   classic Prometheus text format.

use crate::service::Service;
use crate::state::AppState;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Routes of `REST_ADDR`.
pub fn router(service: Service) -> Router {
    let state = service.state().clone();
    Router::new()
        .route("/api/v1/stats", get(stats))
        .with_state(service)
        .route("/health", get(health))
        .route("/live", get(health))
        .route("/ready", get(ready))
        .with_state(state)
}

/// Routes of `METRICS_ADDR`.
pub fn metrics_router(registry: Arc<Registry>) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(registry)
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn ready(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let draining = st.draining.load(Ordering::Acquire);
    let store = st.store_ready.load(Ordering::Acquire);
    let code = if store && !draining { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        code,
        Json(
            serde_json::json!({ "ready": store && !draining, "store": store, "draining": draining }),
        ),
    )
}

async fn stats(State(service): State<Service>) -> impl IntoResponse {
    Json(service.stats().await)
}

/// OpenMetrics for Prometheus, the classic text format for everyone else.
async fn metrics(
    State(registry): State<Arc<Registry>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (kind, body) =
        omega_telemetry::exposition::negotiate(crate::metrics::render(&registry), accept);
    ([(header::CONTENT_TYPE, kind)], body)
}
