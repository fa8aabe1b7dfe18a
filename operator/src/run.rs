//! The `run` command: HTTP endpoints, leader election, both controllers, graceful shutdown.

use crate::context::{Context, Settings};
use crate::leader::{LeaseConfig, LeaseLock};
use crate::metrics::Metrics;
use crate::{Error, Result, round, shard};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Options of `omega-operator run`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Reconciler settings.
    pub settings: Settings,
    /// Leader election on a Lease; off runs the controllers at once (single replica, tests).
    pub leader_election: Option<LeaseOptions>,
    /// Address of `/metrics`, `/health` and `/ready`.
    pub listen: SocketAddr,
    /// Identity in Events and the Lease.
    pub identity: String,
}

/// Where the leader Lease lives.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Lease settings.
    pub lease: LeaseConfig,
}

#[derive(Clone)]
struct Http {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

/// OpenMetrics for Prometheus, the classic text format for everyone else.
async fn metrics_handler(
    State(h): State<Http>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let accept = headers.get("accept").and_then(|v| v.to_str().ok());
    let (kind, body) = omega_telemetry::exposition::negotiate(h.metrics.render(), accept);
    ([("content-type", kind)], body)
}

async fn health() -> &'static str {
    "ok"
}

async fn ready_handler(State(h): State<Http>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// Resolves when SIGTERM or Ctrl-C arrives.
async fn signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    warn!(error = %e, "no SIGTERM handler");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A future that resolves once `rx` sees `true`.
fn stopped(
    mut rx: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
    let (tx, done) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = rx.wait_for(|stop| *stop).await;
        let _ = tx.send(());
    });
    async move {
        let _ = done.await;
    }
}

/// Renews the Lease until told to stop (false) or until leadership is lost (true): another
/// replica holds the Lease, or no renewal succeeded within `renew_deadline`. The deadline is
/// checked before every sleep and bounds every renewal request, so a hung API call cannot
/// keep a deposed leader running.
async fn keep_leading(lock: &LeaseLock, mut stop: watch::Receiver<bool>) -> bool {
    let cfg = lock.config();
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        let left = cfg.renew_deadline.saturating_sub(last_renewal.elapsed());
        if left.is_zero() {
            error!(deadline = ?cfg.renew_deadline, "could not renew the leader Lease in time");
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.renew_every.min(left)) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
        // Counted from before the request: the Lease is valid from when it was written.
        let attempt = tokio::time::Instant::now();
        let left = cfg.renew_deadline.saturating_sub(last_renewal.elapsed());
        match tokio::time::timeout(left, lock.try_acquire()).await {
            Ok(Ok(true)) => last_renewal = attempt,
            Ok(Ok(false)) => {
                error!("lost the leader Lease to another replica");
                return true;
            }
            Ok(Err(e)) => warn!(error = %e, "renewing the leader Lease"),
            Err(_) => warn!("renewing the leader Lease timed out"),
        }
    }
}

/// Runs the operator until a signal (Ok) or a lost Lease (Err).
pub async fn run(client: Client, opts: Options) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health))
        .route("/ready", get(ready_handler))
        .with_state(Http { metrics: metrics.clone(), ready: ready.clone() });
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| Error::Runtime(format!("cannot listen on {}: {e}", opts.listen)))?;
    info!(addr = %opts.listen, "serving /metrics, /health and /ready");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "http server stopped");
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        signal().await;
        info!("shutting down");
        let _ = signal_tx.send(true);
    });

    let lock = opts.leader_election.as_ref().map(|l| {
        LeaseLock::new(Api::<Lease>::namespaced(client.clone(), &l.namespace), l.lease.clone())
    });
    if let Some(lock) = &lock {
        info!(lease = %lock.config().name, identity = %lock.config().identity, "waiting for leadership");
        loop {
            if *stop_rx.borrow() {
                return Ok(());
            }
            match lock.try_acquire().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election"),
            }
            let mut rx = stop_rx.clone();
            tokio::select! {
                _ = tokio::time::sleep(lock.config().renew_every) => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        }
        info!("acquired leadership");
    }
    metrics.leader.set(1);
    ready.store(true, Ordering::Relaxed);

    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        opts.settings.clone(),
        Some(opts.identity.clone()),
    ));
    let shards = tokio::spawn(shard::run(ctx.clone(), stopped(stop_rx.clone())));
    let rounds = tokio::spawn(round::run(ctx, stopped(stop_rx.clone())));

    let lost = match &lock {
        Some(lock) => keep_leading(lock, stop_rx.clone()).await,
        None => false,
    };
    if lost {
        // Stop both controllers before anyone else can lead (the Lease is still valid for
        // `lease_duration - renew_deadline`).
        metrics.leader.set(0);
        ready.store(false, Ordering::Relaxed);
        let _ = stop_tx.send(true);
    }
    let _ = shards.await;
    let _ = rounds.await;
    metrics.leader.set(0);
    if let Some(lock) = &lock
        && !lost
        && let Err(e) = lock.release().await
    {
        warn!(error = %e, "releasing the leader Lease");
    }
    if lost { Err(Error::Runtime("lost the leader Lease".into())) } else { Ok(()) }
}
