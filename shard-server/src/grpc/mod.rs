//! gRPC transport: the device-facing `Constellation` service ([`sync`]) and the internal
//! `ShardAdmin` service ([`admin`]), the conversion of layer errors to gRPC statuses, the
//! layer that counts every sync outcome (including requests tonic refuses before a handler
//! runs: oversized, undecodable, zstd bombs), and connection counting.

pub mod admin;
pub mod gate;
pub mod sync;

use crate::metrics::{Metrics, status_label};
use crate::service::{ServiceError, SyncOutcome};
use crate::store::StoreError;
use omega_protocol::ValidationError;
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};

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

/// A TCP connection that keeps `constellation_grpc_connections` up to date and holds one of
/// the `MAX_CONNECTIONS` permits while open.
#[derive(Debug)]
pub struct CountedStream {
    inner: TcpStream,
    gauge: Gauge,
    _permit: OwnedSemaphorePermit,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for CountedStream {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepted connections of `listener` with TCP_NODELAY set, counted in `gauge`, at most
/// `max` open at once: a connection beyond it is closed as soon as it is accepted (the
/// client sees a reset and retries later or elsewhere), so it costs no more than an accept.
pub fn counted_incoming(
    listener: TcpListener,
    gauge: Gauge,
    max: usize,
) -> impl Stream<Item = std::io::Result<CountedStream>> {
    let permits = Arc::new(Semaphore::new(max));
    TcpListenerStream::new(listener).filter_map(move |r| match r {
        Err(e) => Some(Err(e)),
        Ok(s) => match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let _ = s.set_nodelay(true);
                gauge.inc();
                Some(Ok(CountedStream { inner: s, gauge: gauge.clone(), _permit: permit }))
            }
            Err(_) => {
                tracing::debug!("MAX_CONNECTIONS reached: closing a new connection");
                None
            }
        },
    })
}

/// Accepted connections of `listener` with TCP_NODELAY set.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|r| {
        r.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    })
}
