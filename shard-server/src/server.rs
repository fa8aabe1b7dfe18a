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
use crate::config::{ServeArgs, TokenArgs};
use crate::conn::{self, DeviceAccept, IdleListener};
use crate::grpc::gate::DeviceGateLayer;
use crate::grpc::{SyncMetricsLayer, admin::AdminService, sync::ConstellationService};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::reload::Watched;
use crate::rest;
use crate::service::Service;
use crate::state::{AppState, Settings};
use crate::store::{self, StoreError, StoreOptions};
use crate::tls::{CertStore, TlsError};
use crate::tokens::{DeviceTokens, Enrollment, KeyRing, TokenError, TokenPolicy};
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
    /// A file named by the configuration could not be read.
    #[error("cannot read {var} {path}")]
    File {
        /// Variable naming the file.
        var: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The token key ring is unusable.
    #[error("TOKEN_KEYS / TOKEN_KEYS_FILE")]
    Keys(#[from] TokenError),
    /// The TLS certificate or key is unusable.
    #[error("device port TLS")]
    Tls(#[from] TlsError),
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

fn read(var: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::File { var, path: path.into(), source })
}

/// The key ring of `TOKEN_KEYS`, `TOKEN_KEYS_FILE` (with its bytes, to watch), or the single
/// key of the shard secret.
fn key_ring(a: &TokenArgs, secret: &[u8]) -> Result<(KeyRing, Option<Vec<u8>>), ServerError> {
    if let Some(keys) = &a.token_keys {
        return Ok((KeyRing::parse(keys)?, None));
    }
    if let Some(path) = &a.token_keys_file {
        let bytes = read("TOKEN_KEYS_FILE", path)?;
        return Ok((KeyRing::parse(&String::from_utf8_lossy(&bytes))?, Some(bytes)));
    }
    Ok((KeyRing::single(crate::tokens::DEFAULT_KID, secret), None))
}

/// Re-reads the key ring, revocation list and TLS files every `RELOAD_INTERVAL_SECS`.
struct Reloader {
    keys: Option<Watched>,
    revoked: Option<Watched>,
    tls: Option<(Watched, Watched, Arc<CertStore>)>,
}

impl Reloader {
    fn poll(&mut self, tokens: &DeviceTokens) {
        fn changed(w: &Watched) -> Option<Vec<u8>> {
            w.changed()
                .map_err(|e| {
                    tracing::error!(file = %w.path().display(), error = %e, "cannot re-read; keeping the previous version")
                })
                .ok()
                .flatten()
        }
        if let Some(w) = &mut self.keys
            && let Some(bytes) = changed(w)
        {
            match KeyRing::parse(&String::from_utf8_lossy(&bytes)) {
                Ok(ring) => {
                    tracing::info!(kids = ?ring.kids(), "token key ring reloaded");
                    tokens.set_ring(ring);
                    w.taken(bytes);
                }
                Err(e) => {
                    tracing::error!(error = %e, "TOKEN_KEYS_FILE refused; keeping the previous key ring")
                }
            }
        }
        if let Some(w) = &mut self.revoked
            && let Some(bytes) = changed(w)
        {
            let ids = crate::tokens::parse_revoked(&String::from_utf8_lossy(&bytes));
            tracing::info!(devices = ids.len(), "revocation list reloaded");
            tokens.set_revoked(ids);
            w.taken(bytes);
        }
        if let Some((cert, key, store)) = &mut self.tls {
            let (c, k) = (changed(cert), changed(key));
            if c.is_some() || k.is_some() {
                let c = c.map_or_else(|| std::fs::read(cert.path()), Ok);
                let k = k.map_or_else(|| std::fs::read(key.path()), Ok);
                match (c, k) {
                    (Ok(c), Ok(k)) => match crate::tls::certified_key(&c, &k) {
                        Ok(ck) => {
                            store.set(ck);
                            tracing::info!("device port TLS certificate reloaded");
                            cert.taken(c);
                            key.taken(k);
                        }
                        // A certificate and key written one after the other mismatch for a
                        // moment: the next poll takes the pair.
                        Err(e) => {
                            tracing::warn!(error = %e, "new TLS files refused; keeping the previous certificate")
                        }
                    },
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::error!(error = %e, "cannot re-read the TLS files")
                    }
                }
            }
        }
    }
}

/// Runs the server until SIGTERM. `registry` may already hold other metrics.
pub async fn serve(args: ServeArgs, mut registry: Registry) -> Result<(), ServerError> {
    args.validate()?;
    let opts = StoreOptions::from(&args.store);
    let secret = match &args.device_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => load_or_create_secret(&opts.data_dir).map_err(ServerError::Secret)?,
    };
    let (ring, ring_bytes) = key_ring(&args.tokens, &secret)?;
    let day = 86_400;
    let tokens = DeviceTokens::new(
        ring,
        DeviceKeys::new(&secret),
        TokenPolicy {
            lifetime_secs: args.tokens.device_expiry_days * day,
            renew_after_secs: args.tokens.token_renew_after_days * day,
            accept_legacy: args.tokens.accept_legacy_tokens,
        },
    );
    let mut reloader = Reloader {
        keys: args.tokens.token_keys_file.clone().map(|p| Watched::new(p, ring_bytes)),
        revoked: None,
        tls: None,
    };
    if let Some(path) = &args.tokens.revoked_devices_file {
        let bytes = read("REVOKED_DEVICES_FILE", path)?;
        tokens.set_revoked(crate::tokens::parse_revoked(&String::from_utf8_lossy(&bytes)));
        reloader.revoked = Some(Watched::new(path.clone(), Some(bytes)));
    }
    let enrollment = (!args.tokens.enrollment_secrets.is_empty())
        .then(|| Enrollment::new(&args.tokens.enrollment_secrets));
    let tls = match (&args.tls.tls_cert_file, &args.tls.tls_key_file) {
        (Some(cert), Some(key)) => {
            let (c, k) = (read("TLS_CERT_FILE", cert)?, read("TLS_KEY_FILE", key)?);
            let certs = Arc::new(CertStore::new(crate::tls::certified_key(&c, &k)?));
            let config = crate::tls::server_config(certs.clone())?;
            reloader.tls = Some((
                Watched::new(cert.clone(), Some(c)),
                Watched::new(key.clone(), Some(k)),
                certs,
            ));
            Some(tokio_rustls::TlsAcceptor::from(config))
        }
        _ => None,
    };
    let store = store::open(&opts).await?;
    let metrics = Arc::new(Metrics::register(&mut registry, args.shard_id));
    let registry = Arc::new(registry);
    let state = Arc::new(AppState::new(
        store.clone(),
        DeviceKeys::new(&secret),
        tokens,
        enrollment,
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
        tls = tls.is_some(),
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

    {
        let state = state.clone();
        let stop = stop_rx.clone();
        let every = Duration::from_secs(args.tokens.reload_interval_secs);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => reloader.poll(&state.tokens),
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
            conn::device_incoming(
                grpc_l,
                metrics.grpc_connections.clone(),
                DeviceAccept {
                    max_connections: lim.max_connections as usize,
                    idle: secs(lim.idle_timeout_secs),
                    tls,
                    handshake_timeout: secs(lim.idle_timeout_secs.min(lim.request_timeout_secs)),
                },
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
        .serve_with_incoming_shutdown(conn::incoming(admin_l), stopped(stop_rx.clone()));
    let rest_l = IdleListener::new(rest_l, secs(lim.rest_header_timeout_secs));
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
