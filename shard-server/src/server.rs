//! `omega-shard serve`: builds the state, binds the four listeners, runs background probes,
//! and shuts down gracefully.
//!
//! Shutdown (SIGTERM or SIGINT), in two steps:
//! 1. at once, `/ready` answers 503 and new syncs and registrations get `UNAVAILABLE`, while
//!    every listener stays open for `DRAIN_DELAY_SECS`: load balancers and the kubelet only
//!    learn that a replica is leaving by probing `/ready`, so closing REST at once would hide
//!    the 503 and keep sending devices to a closed port until the endpoint is removed;
//! 2. then the listeners close and the servers wait for in-flight requests (at most
//!    `DRAIN_TIMEOUT_SECS`); the store is flushed and the process exits 0.
//!
//! A second signal during step 1 skips the rest of the delay.

use crate::auth::{AdminGate, AdminToken, DeviceKeys, load_or_create_secret};
use crate::config::ServeArgs;
use crate::grpc::gate::DeviceGateLayer;
use crate::grpc::{self, SyncMetricsLayer, admin::AdminService, sync::ConstellationService};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::rest;
use crate::service::Service;
use crate::state::{AppState, Settings};
use crate::store::{self, StoreError, StoreOptions};
use omega_protocol::pb::constellation_server::ConstellationServer;
use omega_protocol::pb::shard_admin_server::ShardAdminServer;
use omega_protocol::validate::MAX_MESSAGE_BYTES;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::codec::CompressionEncoding;

/// Largest `ShardAdmin` message (a round's aggregates).
pub const ADMIN_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is invalid.
    #[error("invalid configuration")]
    Config(#[from] crate::config::ConfigError),
    /// The store could not be opened.
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    /// A listener could not be bound.
    #[error("cannot listen on {var} {addr}")]
    Bind {
        /// Variable naming the address.
        var: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The device secret could not be read or created.
    #[error("cannot read or create the device secret under DATA_DIR")]
    Secret(#[source] std::io::Error),
    /// A server failed while running.
    #[error("{0}")]
    Transport(String),
}

async fn bind(var: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { var, addr, source })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Runs the server until SIGTERM. `registry` may already hold other metrics.
pub async fn serve(args: ServeArgs, mut registry: Registry) -> Result<(), ServerError> {
    args.validate()?;
    let opts = StoreOptions::from(&args.store);
    let secret = match &args.device_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => load_or_create_secret(&opts.data_dir).map_err(ServerError::Secret)?,
    };
    let store = store::open(&opts).await?;
    let metrics = Arc::new(Metrics::register(&mut registry, args.shard_id));
    let registry = Arc::new(registry);
    let state = Arc::new(AppState::new(
        store.clone(),
        DeviceKeys::new(&secret),
        metrics.clone(),
        RateLimiter::new(args.rate_limit_per_minute, args.rate_limit_burst),
        RateLimiter::new(args.register_rate_per_minute, args.register_rate_burst),
        RateLimiter::new(args.auth_failures_per_minute, args.auth_failures_burst),
        Settings {
            shard_id: args.shard_id,
            region: args.region.clone(),
            max_devices: args.max_devices,
            model_id: args.model_id.clone(),
            similar_cache: Duration::from_secs(args.similar_cache_secs),
            collab_serving: args.collab_serving,
            min_sources: args.min_sources,
        },
    ));
    state.refresh().await;

    let grpc_l = bind("GRPC_ADDR", args.grpc_addr).await?;
    let admin_l = bind("ADMIN_GRPC_ADDR", args.admin_grpc_addr).await?;
    let rest_l = bind("REST_ADDR", args.rest_addr).await?;
    let metrics_l = bind("METRICS_ADDR", args.metrics_addr).await?;
    tracing::info!(
        shard_id = args.shard_id,
        region = %args.region,
        store = store.kind(),
        grpc = %local(&grpc_l),
        admin = %local(&admin_l),
        rest = %local(&rest_l),
        metrics = %local(&metrics_l),
        "omega-shard serving"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let state = state.clone();
        let delay = Duration::from_secs(args.drain_delay_secs);
        tokio::spawn(async move {
            shutdown_signal().await;
            state.draining.store(true, Ordering::Release);
            tracing::info!(
                drain_delay_secs = delay.as_secs(),
                "shutdown requested: not ready, refusing new requests, finishing in-flight ones"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown_signal() => tracing::info!("second signal: closing listeners now"),
            }
            tracing::info!("closing listeners");
            let _ = stop_tx.send(true);
        });
    }
    {
        let state = state.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => state.refresh().await,
                    _ = stopped(stop.clone()) => return,
                }
            }
        });
    }

    let service = Service::new(state.clone());
    let device = ConstellationServer::new(ConstellationService::new(service.clone()))
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let lim = &args.limits;
    let secs = Duration::from_secs;
    let keepalive = (lim.http2_keepalive_secs > 0).then(|| secs(lim.http2_keepalive_secs));
    let device_srv = tonic::transport::Server::builder()
        .max_concurrent_streams(lim.max_streams_per_connection)
        .concurrency_limit_per_connection(lim.max_streams_per_connection as usize)
        .timeout(secs(lim.request_timeout_secs))
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(secs(lim.http2_keepalive_timeout_secs)))
        .max_connection_age(secs(lim.max_connection_age_secs))
        .max_connection_age_grace(secs(lim.max_connection_age_grace_secs))
        .http2_max_header_list_size(lim.max_header_bytes)
        // A flood of streams opened and reset at once (CVE-2023-44487) closes the connection.
        .http2_max_pending_accept_reset_streams(Some(lim.max_streams_per_connection as usize * 4))
        .layer(SyncMetricsLayer::new(metrics.clone()))
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(lim.max_in_flight as usize))
        .layer(DeviceGateLayer::new(state.clone()))
        .add_service(device)
        .serve_with_incoming_shutdown(
            grpc::counted_incoming(
                grpc_l,
                metrics.grpc_connections.clone(),
                lim.max_connections as usize,
            ),
            stopped(stop_rx.clone()),
        );
    let admin = ShardAdminServer::new(AdminService::new(service.clone()))
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(ADMIN_MAX_MESSAGE_BYTES);
    // The token is checked on the headers, before tonic reads or decodes a body. Without a
    // token, validation allowed only a loopback address: local callers only.
    let gate = AdminGate(args.admin_token.as_deref().map(|t| AdminToken::new(t.trim())));
    let admin = tonic::service::interceptor::InterceptedService::new(admin, move |r| gate.check(r));
    let admin_srv = tonic::transport::Server::builder()
        .add_service(admin)
        .serve_with_incoming_shutdown(grpc::incoming(admin_l), stopped(stop_rx.clone()));
    let rest_srv =
        axum::serve(rest_l, rest::router(service)).with_graceful_shutdown(stopped(stop_rx.clone()));
    let metrics_srv = axum::serve(metrics_l, rest::metrics_router(registry))
        .with_graceful_shutdown(stopped(stop_rx.clone()));

    let all = async {
        let (d, a, r, m) = tokio::join!(device_srv, admin_srv, rest_srv, metrics_srv);
        d.map_err(|e| ServerError::Transport(format!("device gRPC: {e}")))?;
        a.map_err(|e| ServerError::Transport(format!("admin gRPC: {e}")))?;
        r.map_err(|e| ServerError::Transport(format!("REST: {e}")))?;
        m.map_err(|e| ServerError::Transport(format!("metrics: {e}")))?;
        Ok::<(), ServerError>(())
    };
    let drain = Duration::from_secs(args.drain_timeout_secs);
    let deadline = async {
        stopped(stop_rx.clone()).await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        r = all => r?,
        _ = deadline => tracing::warn!("drain timeout reached; closing remaining connections"),
    }
    store.flush().await?;
    tracing::info!("omega-shard stopped");
    Ok(())
}

fn local(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// `omega-shard migrate`: applies the schema (Postgres) or replays and checks the log
/// (embedded; `--repair` truncates a damaged one after a backup), then exits.
pub async fn migrate(args: &crate::config::MigrateArgs) -> Result<&'static str, ServerError> {
    args.store.validate()?;
    let opts = StoreOptions { repair: args.repair, ..StoreOptions::from(&args.store) };
    if opts.postgres_url.is_some() {
        // Only the schema: opening the store would also start loading the similarity index.
        store::postgres::migrate_database(&opts).await?;
        return Ok("postgres");
    }
    let store = store::open(&opts).await?;
    store.check_ready().await?;
    store.flush().await?;
    Ok(store.kind())
}
