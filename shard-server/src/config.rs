//! Configuration: every setting is an environment variable and a CLI flag (DESIGN.md's names
//! and defaults), checked once at start-up so a bad value stops the process with a message
//! that names the variable.

use crate::store::{SimilarIndex, StoreOptions};
use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Log output format (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines.
    Text,
}

/// Where data lives: Postgres when `DATABASE_URL` (or `POSTGRES_URL`) is set, else the
/// embedded store under `DATA_DIR`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Postgres URL (`postgres://…`); also read from `POSTGRES_URL`. Unset: embedded store.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Read replicas, comma-separated: similarity queries and device contents read there
    /// (tolerating replication lag); exports and the global version always read the primary.
    #[arg(long, env = "DATABASE_READ_URLS", value_delimiter = ',', hide_env_values = true)]
    pub database_read_urls: Vec<String>,
    /// Directory of the embedded store (and of its generated device secret).
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Connections in the primary pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: u32,
    /// HNSW `m` of the pattern index (pgvector: 2..=100).
    #[arg(long, env = "HNSW_M", default_value_t = 16)]
    pub hnsw_m: u32,
    /// HNSW `ef_construction` (pgvector: 4..=1000, at least 2·m).
    #[arg(long, env = "HNSW_EF_CONSTRUCTION", default_value_t = 64)]
    pub hnsw_ef_construction: u32,
    /// HNSW `ef_search` for similarity queries (at least the 16 candidates a sync asks for;
    /// each doubling roughly doubles query cost).
    #[arg(long, env = "HNSW_EF_SEARCH", default_value_t = 40)]
    pub hnsw_ef_search: u32,
    /// How often the background merge moves intake rows into `patterns`.
    #[arg(long, env = "MERGE_INTERVAL_MS", default_value_t = 200)]
    pub merge_interval_ms: u64,
    /// Most intake rows one merge transaction moves.
    #[arg(long, env = "MERGE_BATCH", default_value_t = 5000)]
    pub merge_batch: u32,
    /// Pause between two batches of the vector indexer while syncs flow (bounds its CPU
    /// share; skipped when no sync was written for a second).
    #[arg(long, env = "INDEX_INTERVAL_MS", default_value_t = 200)]
    pub index_interval_ms: u64,
    /// Patterns the vector indexer inserts into the HNSW index per batch (one transaction; a
    /// small batch keeps each burst of index work short).
    #[arg(long, env = "INDEX_BATCH", default_value_t = 20)]
    pub index_batch: u32,
    /// Postgres: what serves similarity queries. `memory`: an in-process index of the
    /// shareable patterns, loaded at start (`/ready` is false until it is) and following the
    /// merge (~600 bytes per pattern); `pgvector`: the HNSW index on `pattern_vectors`, fed by
    /// the background indexer (which runs only in this mode).
    #[arg(long, env = "SIMILAR_INDEX", value_enum, default_value_t = SimilarIndex::Memory)]
    pub similar_index: SimilarIndex,
    /// In-process ANN (embedded store, Postgres with SIMILAR_INDEX=memory): inverted lists.
    #[arg(long, env = "ANN_LISTS", default_value_t = 256)]
    pub ann_lists: u32,
    /// In-process ANN: lists scanned per query (at least).
    #[arg(long, env = "ANN_PROBES", default_value_t = 8)]
    pub ann_probes: u32,
    /// Embedded store: compact the write-ahead log into a snapshot past this size.
    #[arg(long, env = "WAL_COMPACT_MB", default_value_t = 256)]
    pub wal_compact_mb: u64,
}

impl StoreArgs {
    /// The Postgres URL from `DATABASE_URL`, else `POSTGRES_URL`.
    pub fn postgres_url(&self) -> Option<String> {
        self.database_url
            .clone()
            .or_else(|| std::env::var("POSTGRES_URL").ok())
            .filter(|u| !u.trim().is_empty())
    }

    /// Checks ranges and URL schemes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = self.postgres_url() {
            check_pg_url("DATABASE_URL", &url)?;
        }
        for u in &self.database_read_urls {
            check_pg_url("DATABASE_READ_URLS", u)?;
        }
        range("DB_POOL_SIZE", self.db_pool_size.into(), 2, 1000)?;
        range("HNSW_M", self.hnsw_m.into(), 2, 100)?;
        range("HNSW_EF_CONSTRUCTION", self.hnsw_ef_construction.into(), 4, 1000)?;
        if self.hnsw_ef_construction < 2 * self.hnsw_m {
            return Err(ConfigError::Invalid {
                var: "HNSW_EF_CONSTRUCTION",
                msg: format!("must be at least 2 x HNSW_M ({})", 2 * self.hnsw_m),
            });
        }
        range("HNSW_EF_SEARCH", self.hnsw_ef_search.into(), 1, 1000)?;
        range("MERGE_INTERVAL_MS", self.merge_interval_ms, 10, 3_600_000)?;
        range("MERGE_BATCH", self.merge_batch.into(), 1, 1_000_000)?;
        range("INDEX_INTERVAL_MS", self.index_interval_ms, 0, 3_600_000)?;
        range("INDEX_BATCH", self.index_batch.into(), 1, 1_000_000)?;
        range("ANN_LISTS", self.ann_lists.into(), 1, 65_536)?;
        range("ANN_PROBES", self.ann_probes.into(), 1, self.ann_lists.into())?;
        range("WAL_COMPACT_MB", self.wal_compact_mb, 1, 1 << 20)?;
        Ok(())
    }
}

/// `omega-shard migrate` settings.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Store settings.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Embedded store: when the newest log is damaged with valid records after the damage
    /// (which `serve` refuses), copy it to `wal-N.corrupt-<offset>` and truncate it at the
    /// first bad frame, losing what follows.
    #[arg(long)]
    pub repair: bool,
}

/// `omega-shard serve` settings.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// This shard's number.
    #[arg(long, env = "SHARD_ID", default_value_t = 1)]
    pub shard_id: u32,
    /// Region of the devices this shard serves (trends are per region).
    #[arg(long, env = "REGION", default_value = "local")]
    pub region: String,
    /// Most devices this shard registers; a new device beyond it gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_DEVICES", default_value_t = 4_000_000)]
    pub max_devices: u64,
    /// Store settings.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Device-facing gRPC (`Constellation`).
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Internal gRPC (`ShardAdmin`); never expose it to devices. Loopback by default: any
    /// other address needs `ADMIN_TOKEN`.
    #[arg(long, env = "ADMIN_GRPC_ADDR", default_value = "127.0.0.1:50052")]
    pub admin_grpc_addr: SocketAddr,
    /// Bearer token every `ShardAdmin` call must carry (at least 16 bytes; the operator
    /// generates it into a Secret). Unset: only allowed with a loopback `ADMIN_GRPC_ADDR`,
    /// which then admits local callers without a token.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// REST: /health, /ready, /live, /api/v1/stats.
    #[arg(long, env = "REST_ADDR", default_value = "0.0.0.0:8080")]
    pub rest_addr: SocketAddr,
    /// Prometheus /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Key of the device tokens. Required with Postgres; generated under DATA_DIR otherwise.
    #[arg(long, env = "OMEGA_DEVICE_SECRET", hide_env_values = true)]
    pub device_secret: Option<String>,
    /// Embedding model this shard accepts; deltas of another model are refused.
    #[arg(long, env = "MODEL_ID", default_value = omega_protocol::DEFAULT_MODEL_ID)]
    pub model_id: String,
    /// Sustained syncs per minute one device may make.
    #[arg(long, env = "RATE_LIMIT_PER_MINUTE", default_value_t = 120)]
    pub rate_limit_per_minute: u32,
    /// Syncs a device may make back to back before the per-minute rate applies.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 20)]
    pub rate_limit_burst: u32,
    /// New registrations one peer (client IP address) may make per minute, sustained. A
    /// device registers once in its life, so this only slows a peer that creates devices in
    /// bulk (filling `MAX_DEVICES`, loading the database). Behind a proxy that hides client
    /// addresses every device shares one peer: raise it there.
    #[arg(long, env = "REGISTER_RATE_PER_MINUTE", default_value_t = 1200)]
    pub register_rate_per_minute: u32,
    /// Registrations one peer may make back to back before the per-minute rate applies.
    #[arg(long, env = "REGISTER_RATE_BURST", default_value_t = 2000)]
    pub register_rate_burst: u32,
    /// Seconds a device's `similar` answer is reused (0 = recompute on every sync); dropped
    /// early when the global version changes.
    #[arg(long, env = "SIMILAR_CACHE_SECS", default_value_t = 30)]
    pub similar_cache_secs: u64,
    /// Page collaborative item vectors (the device's watched contents and its best
    /// candidates) into `similar` once a round published them; off: interest-based `similar`.
    #[arg(
        long,
        env = "COLLAB_SERVING",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub collab_serving: bool,
    /// k: a device is only ever served published aggregates that at least this many distinct
    /// devices back (aggregates below it are kept but never served).
    #[arg(long, env = "MIN_SOURCES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_sources: u32,
    /// Bad-token requests one client address (IPv4, or IPv6 /64) may make per minute,
    /// sustained; past it, its requests are refused before their body is read.
    #[arg(long, env = "AUTH_FAILURES_PER_MINUTE", default_value_t = 60)]
    pub auth_failures_per_minute: u32,
    /// Bad-token requests one client address may make back to back.
    #[arg(long, env = "AUTH_FAILURES_BURST", default_value_t = 30)]
    pub auth_failures_burst: u32,
    /// Device token keys and lifetimes, revocation, enrolment.
    #[command(flatten)]
    pub tokens: TokenArgs,
    /// TLS of the device port.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Device port limits, all applied before authentication.
    #[command(flatten)]
    pub limits: Limits,
    /// Seconds between SIGTERM and closing the listeners. Meanwhile `/ready` answers 503 (so
    /// the load balancer takes the replica out of rotation: it needs a probe period or two to
    /// notice), new syncs and registrations get UNAVAILABLE, and in-flight requests finish.
    #[arg(long, env = "DRAIN_DELAY_SECS", default_value_t = 5)]
    pub drain_delay_secs: u64,
    /// Seconds to wait for in-flight requests once the listeners are closed.
    #[arg(long, env = "DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,
}

/// Device tokens (see docs/operations.md, "Rotating the device token key").
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Token key ring, `kid:secret[,kid:secret…]`: the first key signs new tokens, every key
    /// is accepted. Unset (and no `TOKEN_KEYS_FILE`): one key, id `0`, of
    /// `OMEGA_DEVICE_SECRET`.
    #[arg(long, env = "TOKEN_KEYS", hide_env_values = true, conflicts_with = "token_keys_file")]
    pub token_keys: Option<String>,
    /// File holding the key ring, one `kid:secret` per line (`#` comments), re-read every
    /// `RELOAD_INTERVAL_SECS`: a rotation needs no restart.
    #[arg(long, env = "TOKEN_KEYS_FILE")]
    pub token_keys_file: Option<PathBuf>,
    /// Days a token lives. A device renews it while it syncs, so this is how long a device
    /// may stay inactive before its token expires and the shard refuses it.
    #[arg(long, env = "DEVICE_EXPIRY_DAYS", default_value_t = 90)]
    pub device_expiry_days: u64,
    /// A sync presenting a token older than this many days gets a fresh one.
    #[arg(long, env = "TOKEN_RENEW_AFTER_DAYS", default_value_t = 7)]
    pub token_renew_after_days: u64,
    /// Accept tokens issued before key ids existed (HMAC of `OMEGA_DEVICE_SECRET`, no
    /// expiry); each is replaced at its next sync. Switch off once every device has synced.
    #[arg(
        long,
        env = "ACCEPT_LEGACY_TOKENS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub accept_legacy_tokens: bool,
    /// File of revoked device ids, one per line (`#` comments), re-read every
    /// `RELOAD_INTERVAL_SECS`: a listed device is refused whatever token it shows.
    #[arg(long, env = "REVOKED_DEVICES_FILE")]
    pub revoked_devices_file: Option<PathBuf>,
    /// Vendor-issued enrolment secrets, comma-separated: when set, registering a new device
    /// id needs one of them in `RegisterRequest.enrollment_secret`.
    #[arg(long, env = "ENROLLMENT_SECRETS", value_delimiter = ',', hide_env_values = true)]
    pub enrollment_secrets: Vec<String>,
    /// Seconds between two reads of the files above and of the TLS certificate and key.
    #[arg(long, env = "RELOAD_INTERVAL_SECS", default_value_t = 10)]
    pub reload_interval_secs: u64,
}

/// Shortest accepted enrolment secret, in bytes.
pub const MIN_ENROLLMENT_SECRET_BYTES: usize = 16;

impl TokenArgs {
    /// Checks ranges, and reads the key ring once so a bad one stops the start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        range("DEVICE_EXPIRY_DAYS", self.device_expiry_days, 1, 3650)?;
        range("TOKEN_RENEW_AFTER_DAYS", self.token_renew_after_days, 0, 3650)?;
        if self.token_renew_after_days >= self.device_expiry_days {
            return Err(ConfigError::Invalid {
                var: "TOKEN_RENEW_AFTER_DAYS",
                msg: "must be less than DEVICE_EXPIRY_DAYS".into(),
            });
        }
        range("RELOAD_INTERVAL_SECS", self.reload_interval_secs, 1, 3600)?;
        if let Some(k) = &self.token_keys {
            crate::tokens::KeyRing::parse(k)
                .map_err(|e| ConfigError::Invalid { var: "TOKEN_KEYS", msg: e.to_string() })?;
        }
        if self.enrollment_secrets.iter().any(|s| s.trim().len() < MIN_ENROLLMENT_SECRET_BYTES) {
            return Err(ConfigError::Invalid {
                var: "ENROLLMENT_SECRETS",
                msg: format!("each secret must be at least {MIN_ENROLLMENT_SECRET_BYTES} bytes"),
            });
        }
        Ok(())
    }
}

/// TLS of the device port (`GRPC_ADDR`). Both files or neither: without them the port
/// speaks plaintext HTTP/2 (for a TLS-terminating proxy in front, or tests).
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM certificate chain of the device port, re-read every `RELOAD_INTERVAL_SECS`.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate, re-read with it.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
}

/// Resource limits of the device port (`GRPC_ADDR`), which anyone can reach: every one holds
/// before a request is authenticated, so no client can make the shard hold unbounded memory.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Open connections at most; a connection beyond it is closed as soon as it is accepted.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: u32,
    /// Concurrent requests (HTTP/2 streams) per connection.
    #[arg(long, env = "MAX_STREAMS_PER_CONNECTION", default_value_t = 8)]
    pub max_streams_per_connection: u32,
    /// Requests in progress across all connections; one more is answered RESOURCE_EXHAUSTED
    /// at once (load shedding) instead of queueing.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 512)]
    pub max_in_flight: u32,
    /// Seconds a request may take from its headers to its answer, body upload included; a
    /// slower one is cancelled and its buffers freed.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 10)]
    pub request_timeout_secs: u64,
    /// Seconds between HTTP/2 keepalive pings; a peer that does not answer one within
    /// `HTTP2_KEEPALIVE_TIMEOUT_SECS` is disconnected (0 = no pings).
    #[arg(long, env = "HTTP2_KEEPALIVE_SECS", default_value_t = 30)]
    pub http2_keepalive_secs: u64,
    /// Seconds to wait for a keepalive ping's answer.
    #[arg(long, env = "HTTP2_KEEPALIVE_TIMEOUT_SECS", default_value_t = 10)]
    pub http2_keepalive_timeout_secs: u64,
    /// Seconds after which a connection is asked to close (HTTP/2 GOAWAY), so that even an
    /// idle or abusive connection does not live forever and load rebalances across replicas.
    #[arg(long, env = "MAX_CONNECTION_AGE_SECS", default_value_t = 600)]
    pub max_connection_age_secs: u64,
    /// Seconds a connection past its age may take to finish its requests before it is cut.
    #[arg(long, env = "MAX_CONNECTION_AGE_GRACE_SECS", default_value_t = 30)]
    pub max_connection_age_grace_secs: u64,
    /// Seconds a device port connection may stay without a byte from its peer before it is
    /// closed (a live client answers the keepalive pings, so it must exceed
    /// `HTTP2_KEEPALIVE_SECS` + `HTTP2_KEEPALIVE_TIMEOUT_SECS`). Also bounds a TLS handshake.
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Seconds a REST client may stay silent, e.g. in the middle of its request headers,
    /// before its connection is closed.
    #[arg(long, env = "REST_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub rest_header_timeout_secs: u64,
    /// Largest request header block, bytes.
    #[arg(long, env = "MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: u32,
}

impl Limits {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        range("MAX_CONNECTIONS", self.max_connections.into(), 1, 10_000_000)?;
        range("MAX_STREAMS_PER_CONNECTION", self.max_streams_per_connection.into(), 1, 1000)?;
        range("MAX_IN_FLIGHT", self.max_in_flight.into(), 1, 1_000_000)?;
        range("REQUEST_TIMEOUT_SECS", self.request_timeout_secs, 1, 3600)?;
        range("HTTP2_KEEPALIVE_SECS", self.http2_keepalive_secs, 0, 3600)?;
        range("HTTP2_KEEPALIVE_TIMEOUT_SECS", self.http2_keepalive_timeout_secs, 1, 600)?;
        range("MAX_CONNECTION_AGE_SECS", self.max_connection_age_secs, 10, 7 * 86_400)?;
        range("MAX_CONNECTION_AGE_GRACE_SECS", self.max_connection_age_grace_secs, 0, 3600)?;
        range("MAX_HEADER_BYTES", self.max_header_bytes.into(), 1024, 1 << 20)?;
        range("IDLE_TIMEOUT_SECS", self.idle_timeout_secs, 1, 86_400)?;
        range("REST_HEADER_TIMEOUT_SECS", self.rest_header_timeout_secs, 1, 3600)?;
        let ping = self.http2_keepalive_secs + self.http2_keepalive_timeout_secs;
        if self.http2_keepalive_secs > 0 && self.idle_timeout_secs <= ping {
            return Err(ConfigError::Invalid {
                var: "IDLE_TIMEOUT_SECS",
                msg: format!(
                    "must exceed HTTP2_KEEPALIVE_SECS + HTTP2_KEEPALIVE_TIMEOUT_SECS ({ping}), \
                     or live clients between two requests are cut"
                ),
            });
        }
        Ok(())
    }
}

/// Shortest accepted `ADMIN_TOKEN`, in bytes.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value outside what the server supports.
    #[error("{var}: {msg}")]
    Invalid {
        /// The environment variable (the flag is its lowercase, dashed twin).
        var: &'static str,
        /// What is wrong.
        msg: String,
    },
}

fn range(var: &'static str, v: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::Invalid { var, msg: format!("{v} is outside {min}..={max}") });
    }
    Ok(())
}

fn check_pg_url(var: &'static str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(())
    } else {
        Err(ConfigError::Invalid { var, msg: "must be a postgres:// or postgresql:// URL".into() })
    }
}

impl ServeArgs {
    /// Checks every setting; the first problem is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store.validate()?;
        if self.region.is_empty() || self.region.len() > omega_protocol::validate::MAX_STRING_BYTES
        {
            return Err(ConfigError::Invalid {
                var: "REGION",
                msg: "must be 1 to 256 bytes".into(),
            });
        }
        if self.model_id.is_empty() {
            return Err(ConfigError::Invalid { var: "MODEL_ID", msg: "must not be empty".into() });
        }
        range("MAX_DEVICES", self.max_devices, 1, u64::from(u32::MAX))?;
        range("RATE_LIMIT_PER_MINUTE", self.rate_limit_per_minute.into(), 1, 1_000_000)?;
        range("RATE_LIMIT_BURST", self.rate_limit_burst.into(), 1, 1_000_000)?;
        range("REGISTER_RATE_PER_MINUTE", self.register_rate_per_minute.into(), 1, 1_000_000)?;
        range("REGISTER_RATE_BURST", self.register_rate_burst.into(), 1, 1_000_000)?;
        range("AUTH_FAILURES_PER_MINUTE", self.auth_failures_per_minute.into(), 1, 1_000_000)?;
        range("AUTH_FAILURES_BURST", self.auth_failures_burst.into(), 1, 1_000_000)?;
        self.limits.validate()?;
        self.tokens.validate()?;
        range("DRAIN_DELAY_SECS", self.drain_delay_secs, 0, 300)?;
        range("DRAIN_TIMEOUT_SECS", self.drain_timeout_secs, 0, 3600)?;
        match &self.device_secret {
            Some(s) if s.len() < crate::auth::MIN_SECRET_BYTES => {
                return Err(ConfigError::Invalid {
                    var: "OMEGA_DEVICE_SECRET",
                    msg: format!("must be at least {} bytes", crate::auth::MIN_SECRET_BYTES),
                });
            }
            None if self.store.postgres_url().is_some() => {
                return Err(ConfigError::Invalid {
                    var: "OMEGA_DEVICE_SECRET",
                    msg: "is required with DATABASE_URL (every replica must share it)".into(),
                });
            }
            _ => {}
        }
        match &self.admin_token {
            Some(t) if t.trim().len() < MIN_ADMIN_TOKEN_BYTES => {
                return Err(ConfigError::Invalid {
                    var: "ADMIN_TOKEN",
                    msg: format!("must be at least {MIN_ADMIN_TOKEN_BYTES} bytes"),
                });
            }
            None if !self.admin_grpc_addr.ip().is_loopback() => {
                return Err(ConfigError::Invalid {
                    var: "ADMIN_TOKEN",
                    msg: format!(
                        "is required when ADMIN_GRPC_ADDR ({}) is not a loopback address",
                        self.admin_grpc_addr
                    ),
                });
            }
            _ => {}
        }
        let addrs = [
            ("GRPC_ADDR", self.grpc_addr),
            ("ADMIN_GRPC_ADDR", self.admin_grpc_addr),
            ("REST_ADDR", self.rest_addr),
            ("METRICS_ADDR", self.metrics_addr),
        ];
        for (i, (var, a)) in addrs.iter().enumerate() {
            if a.port() != 0 && addrs[..i].iter().any(|(_, b)| b == a) {
                return Err(ConfigError::Invalid {
                    var,
                    msg: format!("{a} is already used by another listener"),
                });
            }
        }
        Ok(())
    }
}

impl From<&StoreArgs> for StoreOptions {
    fn from(a: &crate::config::StoreArgs) -> Self {
        StoreOptions {
            postgres_url: a.postgres_url(),
            read_urls: a.database_read_urls.clone(),
            data_dir: a.data_dir.clone(),
            pool_size: a.db_pool_size,
            hnsw_m: a.hnsw_m,
            hnsw_ef_construction: a.hnsw_ef_construction,
            hnsw_ef_search: a.hnsw_ef_search,
            merge_interval: std::time::Duration::from_millis(a.merge_interval_ms),
            merge_batch: a.merge_batch,
            index_interval: std::time::Duration::from_millis(a.index_interval_ms),
            index_batch: a.index_batch,
            similar_index: a.similar_index,
            ann_lists: a.ann_lists as usize,
            ann_probes: a.ann_probes as usize,
            wal_compact_bytes: a.wal_compact_mb << 20,
            repair: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        let mut v = vec!["omega-shard"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).expect("parse").serve
    }

    #[test]
    fn defaults_match_design() {
        let s = parse(&[]);
        assert_eq!(s.shard_id, 1);
        assert_eq!(s.region, "local");
        assert_eq!(s.max_devices, 4_000_000);
        assert_eq!(s.grpc_addr.port(), 50051);
        assert_eq!(s.admin_grpc_addr.port(), 50052);
        assert_eq!(s.rest_addr.port(), 8080);
        assert_eq!(s.metrics_addr.port(), 9090);
        assert_eq!(s.model_id, omega_protocol::DEFAULT_MODEL_ID);
        assert_eq!(s.store.data_dir, PathBuf::from("./data"));
        assert!(s.collab_serving);
        assert_eq!((s.drain_delay_secs, s.drain_timeout_secs), (5, 20));
        assert_eq!((s.register_rate_per_minute, s.register_rate_burst), (1200, 2000));
        assert!(!parse(&["--collab-serving", "false"]).collab_serving);
        assert!(!parse(&["--collab-serving", "off"]).collab_serving);
        assert_eq!(s.store.similar_index, SimilarIndex::Memory);
        let pgv = parse(&["--similar-index", "pgvector"]).store.similar_index;
        assert_eq!(pgv, SimilarIndex::Pgvector);
    }

    #[test]
    fn an_unknown_similar_index_is_refused_with_the_choices() {
        let err = Cli::try_parse_from(["omega-shard", "--similar-index", "hnsw"])
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("hnsw") && err.contains("memory") && err.contains("pgvector"),
            "{err}"
        );
    }

    #[test]
    fn bad_settings_name_their_variable() {
        let cases: &[(&[&str], &str)] = &[
            (&["--database-url", "mysql://x"], "DATABASE_URL"),
            (&["--database-url", "postgres://x/y"], "OMEGA_DEVICE_SECRET: is required"),
            (&["--device-secret", "short"], "OMEGA_DEVICE_SECRET: must be at least"),
            (&["--hnsw-m", "1"], "HNSW_M"),
            (&["--hnsw-m", "40", "--hnsw-ef-construction", "64"], "at least 2 x HNSW_M"),
            (&["--region", ""], "REGION"),
            (&["--max-devices", "0"], "MAX_DEVICES"),
            (&["--rest-addr", "0.0.0.0:50051"], "REST_ADDR"),
            (&["--ann-probes", "2000"], "ANN_PROBES"),
            (&["--drain-delay-secs", "301"], "DRAIN_DELAY_SECS"),
            (&["--register-rate-burst", "0"], "REGISTER_RATE_BURST"),
        ];
        for (args, want) in cases {
            let err = parse(args).validate().expect_err(want).to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
        let ok = parse(&["--database-url", "postgres://x/y", "--device-secret", &"s".repeat(16)]);
        assert!(ok.validate().is_ok());
    }
}
