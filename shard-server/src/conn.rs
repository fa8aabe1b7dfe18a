//! Accepted connections as the listeners hand them to the servers: counted and capped
//! (`MAX_CONNECTIONS`), optionally TLS, and closed when the peer sends nothing for a while.
//!
//! The idle cut is on reads: a connection whose peer sent no byte for the idle timeout is
//! closed. A live gRPC client always sends something within `HTTP2_KEEPALIVE_SECS` +
//! `HTTP2_KEEPALIVE_TIMEOUT_SECS` (it answers the server's pings), which is why the device
//! port's idle timeout must exceed that sum; a socket that never sends its HTTP/2 preface or
//! stops in the middle of its headers is cut. On REST the same cut bounds how long a client
//! may take between two bytes of its request headers.

use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A stream that fails its reads once the peer sent nothing for `idle`.
#[derive(Debug)]
pub struct Idle<S> {
    inner: S,
    idle: Duration,
    last_read: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<S> Idle<S> {
    /// `inner`, cut after `idle` without a byte from the peer.
    pub fn new(inner: S, idle: Duration) -> Self {
        let now = Instant::now();
        Idle { inner, idle, last_read: now, timer: Box::pin(tokio::time::sleep_until(now + idle)) }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_read(cx, buf) {
            if r.is_ok() && buf.filled().len() > before {
                // Only a timestamp per read: the timer is moved when it fires, not here.
                self.last_read = Instant::now();
            }
            return Poll::Ready(r);
        }
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let due = self.last_read + self.idle;
            if Instant::now() >= due {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "idle connection closed",
                )));
            }
            self.timer.as_mut().reset(due);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
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

/// A TCP connection of the device port: keeps `constellation_grpc_connections` up to date,
/// holds one of the `MAX_CONNECTIONS` permits while open, and is cut when idle.
#[derive(Debug)]
pub struct Counted {
    inner: Idle<TcpStream>,
    gauge: Gauge,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

macro_rules! delegate_io {
    ($t:ty, $($field:tt)+) => {
        impl AsyncRead for $t {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.$($field)+).poll_read(cx, buf)
            }
        }
        impl AsyncWrite for $t {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.$($field)+).poll_write(cx, buf)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.$($field)+).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.$($field)+).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.$($field)+).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.$($field)+.is_write_vectored()
            }
        }
    };
}

delegate_io!(Counted, inner);

/// A device port connection, plaintext or TLS.
#[derive(Debug)]
pub enum DeviceConn {
    /// Plaintext HTTP/2.
    Plain(Counted),
    /// HTTP/2 over TLS.
    Tls(Box<TlsStream<Counted>>),
}

impl AsyncRead for DeviceConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DeviceConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            DeviceConn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DeviceConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DeviceConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            DeviceConn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DeviceConn::Plain(s) => Pin::new(s).poll_flush(cx),
            DeviceConn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DeviceConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            DeviceConn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DeviceConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            DeviceConn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            DeviceConn::Plain(s) => s.is_write_vectored(),
            DeviceConn::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl Connected for DeviceConn {
    // The TCP peer in both cases: the gate and the rate limits key on the client address.
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        let tcp = match self {
            DeviceConn::Plain(s) => s.inner.get_ref(),
            DeviceConn::Tls(s) => s.get_ref().0.inner.get_ref(),
        };
        tcp.connect_info()
    }
}

/// How the device port accepts connections.
#[derive(Clone)]
pub struct DeviceAccept {
    /// `MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// Idle cut (`IDLE_TIMEOUT_SECS`).
    pub idle: Duration,
    /// TLS, when configured; the handshake must finish within `handshake_timeout`.
    pub tls: Option<TlsAcceptor>,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
}

/// Handshakes in progress at once; more wait in the accept queue.
const CONCURRENT_HANDSHAKES: usize = 256;

/// Accepted connections of the device port. A connection beyond `MAX_CONNECTIONS` is closed
/// as soon as it is accepted (the client sees a reset and retries later or elsewhere), so it
/// costs no more than an accept; a failed or slow TLS handshake is dropped.
pub fn device_incoming(
    listener: TcpListener,
    gauge: Gauge,
    accept: DeviceAccept,
) -> impl Stream<Item = std::io::Result<DeviceConn>> {
    use futures::StreamExt as _;
    let permits = Arc::new(Semaphore::new(accept.max_connections));
    let idle = accept.idle;
    TcpListenerStream::new(listener)
        .filter_map(move |r| {
            let counted = match r {
                Err(e) => Some(Err(e)),
                Ok(s) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let _ = s.set_nodelay(true);
                        gauge.inc();
                        let inner = Idle::new(s, idle);
                        Some(Ok(Counted { inner, gauge: gauge.clone(), _permit: permit }))
                    }
                    Err(_) => {
                        tracing::debug!("MAX_CONNECTIONS reached: closing a new connection");
                        None
                    }
                },
            };
            std::future::ready(counted)
        })
        .map(move |r| {
            let tls = accept.tls.clone();
            let limit = accept.handshake_timeout;
            async move {
                match (r, tls) {
                    (Err(e), _) => Some(Err(e)),
                    (Ok(s), None) => Some(Ok(DeviceConn::Plain(s))),
                    (Ok(s), Some(tls)) => match tokio::time::timeout(limit, tls.accept(s)).await {
                        Ok(Ok(t)) => Some(Ok(DeviceConn::Tls(Box::new(t)))),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            None
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            None
                        }
                    },
                }
            }
        })
        .buffer_unordered(CONCURRENT_HANDSHAKES)
        .filter_map(std::future::ready)
}

/// Accepted connections of `listener` with TCP_NODELAY set (the admin port).
pub fn incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|r| {
        r.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    })
}

/// The REST listener: each connection is cut when its peer sends nothing for `idle`, which
/// bounds a client stalling in the middle of its request headers.
#[derive(Debug)]
pub struct IdleListener {
    inner: TcpListener,
    idle: Duration,
}

impl IdleListener {
    /// `inner` with connections cut after `idle` of silence.
    pub fn new(inner: TcpListener, idle: Duration) -> Self {
        IdleListener { inner, idle }
    }
}

impl axum::serve::Listener for IdleListener {
    type Io = Idle<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (s, a) = axum::serve::Listener::accept(&mut self.inner).await;
        (Idle::new(s, self.idle), a)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
