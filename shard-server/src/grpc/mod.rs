//! gRPC transport: the device-facing `Constellation` service ([`sync`]) and the internal
//! `ShardAdmin` service ([`admin`]), the conversion of layer errors to gRPC statuses, the
//! layer that counts every sync outcome (including requests tonic refuses before a handler
//! runs: oversized, undecodable, zstd bombs). Connections are accepted by [`crate::conn`].

pub mod admin;
pub mod gate;
pub mod sync;

use crate::metrics::{Metrics, status_label};
use crate::service::{ServiceError, SyncOutcome};
use crate::store::StoreError;
use omega_protocol::ValidationError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::Status;
use tonic::codegen::http;

/// gRPC path of `Constellation.Sync`.
pub const SYNC_PATH: &str = "/omega.v1.Constellation/Sync";

/// gRPC path of `Constellation.Register`.
pub const REGISTER_PATH: &str = "/omega.v1.Constellation/Register";

/// A store error as the status a client sees.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => Status::unavailable(format!("store unavailable: {m}")),
        e @ StoreError::Capacity { .. } => Status::resource_exhausted(e.to_string()),
        e @ StoreError::VersionExhausted(_) => Status::failed_precondition(e.to_string()),
        e @ StoreError::UnknownDevice => Status::failed_precondition(e.to_string()),
        e => {
            tracing::error!(error = %e, "store error");
            Status::internal("internal store error")
        }
    }
}

/// A use case's error as the status a client sees.
pub fn service_status(e: ServiceError) -> Status {
    match e {
        e @ ServiceError::Draining => Status::unavailable(e.to_string()),
        e @ ServiceError::RateLimited(_) => Status::resource_exhausted(e.to_string()),
        e @ ServiceError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
        e @ ServiceError::Forbidden(_) => Status::permission_denied(e.to_string()),
        ServiceError::Invalid(e) => invalid(e),
        ServiceError::Store(e) => store_status(e),
    }
}

/// A validation error as `INVALID_ARGUMENT`, naming the field.
pub fn invalid(e: ValidationError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// gRPC path prefix of the device-facing service.
pub const DEVICE_PREFIX: &str = "/omega.v1.Constellation/";

/// Gives requests tonic refuses before any handler runs the codes a device client expects:
/// an oversized message is `RESOURCE_EXHAUSTED` (tonic says `OUT_OF_RANGE`) and bytes that
/// do not decode are `INVALID_ARGUMENT` (tonic says `INTERNAL`, which would read as a server
/// fault and invite retries).
pub fn remap_decode_errors(headers: &mut http::HeaderMap) {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok());
    let msg = headers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let new = match code {
        Some(11) if msg.contains("too") && msg.contains("large") => 8,
        Some(13)
            if msg.contains("decode")
                || msg.contains("compression")
                || msg.contains("decompress") =>
        {
            3
        }
        _ => return,
    };
    headers.insert("grpc-status", http::HeaderValue::from(new));
}

/// Tower layer counting `Sync` requests by outcome with their latency, and `Register`
/// requests by outcome.
#[derive(Debug, Clone)]
pub struct SyncMetricsLayer {
    metrics: Arc<Metrics>,
}

impl SyncMetricsLayer {
    /// A layer feeding `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        SyncMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for SyncMetricsLayer {
    type Service = SyncMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SyncMetricsService { inner, metrics: self.metrics.clone() }
    }
}

/// See [`SyncMetricsLayer`].
#[derive(Debug, Clone)]
pub struct SyncMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for SyncMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let is_sync = req.uri().path() == SYNC_PATH;
        let is_register = req.uri().path() == REGISTER_PATH;
        let is_device = req.uri().path().starts_with(DEVICE_PREFIX);
        let start = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let mut res = fut.await;
            if let (true, Ok(r)) = (is_device, &mut res) {
                remap_decode_errors(r.headers_mut());
            }
            if is_sync || is_register {
                let label = match &res {
                    Ok(r) => match r.headers().get("grpc-status") {
                        // Trailers-only response: an error before or from the handler.
                        Some(v) => v
                            .to_str()
                            .ok()
                            .and_then(|s| s.parse::<i32>().ok())
                            .map_or("unknown", |c| status_label(tonic::Code::from_i32(c))),
                        None => r.extensions().get::<SyncOutcome>().map_or("ok", |o| o.0),
                    },
                    Err(_) => "internal",
                };
                if is_sync {
                    metrics.observe_sync(label, start.elapsed());
                } else {
                    metrics.observe_register(label);
                }
            }
            res
        })
    }
}
