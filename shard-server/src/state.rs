//! What every request handler shares: the store, keys, metrics, limits and the process's
//! readiness, plus the per-device cache of `similar` answers, the collaborative-serving state
//! and the cached counters.

use crate::auth::DeviceKeys;
use crate::collab::Collab;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::store::{Counts, SharedStore};
use crate::tokens::{DeviceTokens, Enrollment};
use omega_protocol::admin::ShardStats;
use omega_protocol::pb;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Devices count as active when they synced within this window.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Settings the handlers read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `SHARD_ID`.
    pub shard_id: u32,
    /// `REGION`: default region of devices that register without one.
    pub region: String,
    /// `MAX_DEVICES`.
    pub max_devices: u64,
    /// `MODEL_ID`.
    pub model_id: String,
    /// How long a device's `similar` answer is reused.
    pub similar_cache: Duration,
    /// `COLLAB_SERVING`: page collaborative item vectors instead of interest-based `similar`.
    pub collab_serving: bool,
    /// `MIN_SOURCES`: k of everything a device is served.
    pub min_sources: u32,
}

const CACHE_SHARDS: usize = 16;
const CACHE_PER_SHARD: usize = 8192;

#[derive(Debug, Clone)]
struct CachedSimilar {
    at: Instant,
    version: u64,
    patterns: Arc<Vec<pb::Pattern>>,
}

/// Per-device cache of anonymised `similar` answers, bounded in size.
#[derive(Debug)]
pub struct SimilarCache {
    ttl: Duration,
    shards: Vec<Mutex<HashMap<String, CachedSimilar>>>,
}

impl SimilarCache {
    /// A cache keeping answers for `ttl` (zero disables it).
    pub fn new(ttl: Duration) -> Self {
        SimilarCache { ttl, shards: (0..CACHE_SHARDS).map(|_| Mutex::default()).collect() }
    }

    fn shard(&self, device: &str) -> &Mutex<HashMap<String, CachedSimilar>> {
        let h = device.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        &self.shards[h as usize % CACHE_SHARDS]
    }

    /// The cached answer, if fresh and computed at `version`.
    pub fn get(&self, device: &str, version: u64, now: Instant) -> Option<Arc<Vec<pb::Pattern>>> {
        if self.ttl.is_zero() {
            return None;
        }
        let map = self.shard(device).lock().ok()?;
        map.get(device)
            .filter(|c| c.version == version && now.saturating_duration_since(c.at) < self.ttl)
            .map(|c| c.patterns.clone())
    }

    /// Stores an answer. A full shard is emptied (cheap, and entries are short-lived).
    pub fn put(&self, device: &str, version: u64, now: Instant, patterns: Arc<Vec<pb::Pattern>>) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut map) = self.shard(device).lock() {
            if map.len() >= CACHE_PER_SHARD && !map.contains_key(device) {
                map.clear();
            }
            map.insert(device.to_owned(), CachedSimilar { at: now, version, patterns });
        }
    }
}

/// Shared by every handler.
pub struct AppState {
    /// The store.
    pub store: SharedStore,
    /// Pseudonym keys (and the legacy token key).
    pub keys: DeviceKeys,
    /// Device tokens: key ring, expiry, revocation.
    pub tokens: DeviceTokens,
    /// Enrolment secrets a new device must show, if configured.
    pub enrollment: Option<Enrollment>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-device rate limit of syncs.
    pub limiter: RateLimiter,
    /// Per-peer (client IP) rate limit of registrations.
    pub register_limiter: RateLimiter,
    /// Per-peer budget of requests with a bad token; a peer past it is refused before its
    /// request body is read.
    pub auth_failures: RateLimiter,
    /// Settings.
    pub settings: Settings,
    /// Set on SIGTERM: `/ready` false, new syncs refused.
    pub draining: AtomicBool,
    /// Last store probe succeeded.
    pub store_ready: AtomicBool,
    /// Process start.
    pub started: Instant,
    /// `similar` answers.
    pub similar: SimilarCache,
    /// Collaborative serving: catalog of the current global version, per-device cursors.
    pub collab: Collab,
    syncs_ok: AtomicU64,
    rate: Mutex<VecDeque<(Instant, u64)>>,
    counts: Mutex<Counts>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("store", &self.store.kind())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Builds the shared state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: SharedStore,
        keys: DeviceKeys,
        tokens: DeviceTokens,
        enrollment: Option<Enrollment>,
        metrics: Arc<Metrics>,
        limiter: RateLimiter,
        register_limiter: RateLimiter,
        auth_failures: RateLimiter,
        settings: Settings,
    ) -> Self {
        AppState {
            store,
            keys,
            tokens,
            enrollment,
            metrics,
            limiter,
            register_limiter,
            auth_failures,
            similar: SimilarCache::new(settings.similar_cache),
            collab: Collab::default(),
            settings,
            draining: AtomicBool::new(false),
            store_ready: AtomicBool::new(false),
            started: Instant::now(),
            syncs_ok: AtomicU64::new(0),
            rate: Mutex::new(VecDeque::new()),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// Ready: store reachable and migrated, and not draining.
    pub fn ready(&self) -> bool {
        self.store_ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    /// Counts a successful sync.
    pub fn count_sync(&self) {
        self.syncs_ok.fetch_add(1, Ordering::Relaxed);
    }

    /// Samples the sync counter (called every few seconds) and refreshes the cached store
    /// counters and gauges.
    pub async fn refresh(&self) {
        self.sample_rate();
        self.refresh_counts().await;
    }

    fn sample_rate(&self) {
        let now = Instant::now();
        if let Ok(mut r) = self.rate.lock() {
            r.push_back((now, self.syncs_ok.load(Ordering::Relaxed)));
            while r.len() > 2
                && r.front().is_some_and(|(t, _)| now.duration_since(*t).as_secs() > 60)
            {
                r.pop_front();
            }
        }
    }

    /// Probes the store and refreshes the counters and gauges.
    pub async fn refresh_counts(&self) {
        let ready = self.store.check_ready().await;
        if let Err(e) = &ready {
            tracing::warn!(error = %e, "store not ready");
        }
        self.store_ready.store(ready.is_ok(), Ordering::Release);
        self.metrics.ready.set(i64::from(self.ready()));
        let since = crate::clock::now_ms() - ACTIVE_WINDOW.as_millis() as i64;
        // Counted even while not ready (the similarity index loading, migrations pending):
        // `constellation_store_up` says whether the database itself answers.
        let counts = self.store.counts(since).await;
        self.metrics.store_up.set(i64::from(counts.is_ok()));
        if ready.is_ok()
            && let Ok(c) = counts
        {
            self.metrics.total_devices.set(c.devices_total as i64);
            self.metrics.active_devices.set(c.devices_active as i64);
            self.metrics.patterns.set(c.patterns as i64);
            self.metrics.intake_backlog.set(c.backlog as i64);
            if let Ok(mut cached) = self.counts.lock() {
                *cached = c;
            }
        }
    }

    fn syncs_per_second(&self) -> f64 {
        let Ok(r) = self.rate.lock() else { return 0.0 };
        match (r.front(), r.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                (n1 - n0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// The document `/api/v1/stats` and `ShardAdmin.Stats` serve.
    pub fn stats(&self) -> ShardStats {
        let c = self.counts.lock().map(|c| c.clone()).unwrap_or_default();
        ShardStats {
            shard_id: self.settings.shard_id,
            region: self.settings.region.clone(),
            devices_total: c.devices_total,
            devices_active: c.devices_active,
            patterns: c.patterns,
            syncs_total: self.syncs_ok.load(Ordering::Relaxed),
            syncs_per_second: self.syncs_per_second(),
            grpc_connections: self.metrics.grpc_connections.get().max(0) as u64,
            global_version: c.global_version,
            store: self.store.kind().into(),
            model_id: self.settings.model_id.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            ready: self.ready(),
        }
    }
}
