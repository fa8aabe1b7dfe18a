//! Storage behind one trait, with two implementations:
//!
//! - [`postgres::PostgresStore`]: Postgres + pgvector, for production shards;
//! - [`embedded::EmbeddedStore`]: a write-ahead log + snapshot under `DATA_DIR` with an
//!   in-memory ANN index, the default when no `DATABASE_URL` is set.
//!
//! Both pass the same test suite (`tests/store_suite.rs`). The service layer decides *what*
//! to store (validation, quality filter, interest vector); a store only makes it durable and
//! atomic: a [`SyncWrite`] is applied whole or not at all, exactly once per
//! `(device_id, local_version)`.

use async_trait::async_trait;
use omega_protocol::pb;
use std::sync::Arc;
use uuid::Uuid;

pub mod ann;
pub mod embedded;
pub mod postgres;

/// Why a store operation failed. Converted to a gRPC status at the transport boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing database cannot be reached (clients should retry).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// `MAX_DEVICES` devices are registered already.
    #[error("this shard is full: {max} devices registered")]
    Capacity {
        /// The limit.
        max: u64,
    },
    /// A sync from a device that never registered here.
    #[error("device is not registered on this shard; call Register first")]
    UnknownDevice,
    /// Stored data that cannot be decoded.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// A publish would move the global version past the largest both stores keep.
    #[error("the global version cannot go past {0}")]
    VersionExhausted(u64),
    /// A database error that is not about reachability.
    #[error("database error: {0}")]
    Database(String),
    /// Local file I/O (embedded store).
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Most content ids [`Store::device_contents`] returns.
pub const MAX_DEVICE_CONTENTS: usize = 10_000;

/// A registered device.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The region the device is served in (the one it first registered with).
    pub region: String,
    /// True when this call created the device.
    pub created: bool,
}

/// One sync, already validated and quality-filtered by the service.
#[derive(Debug, Clone, Default)]
pub struct SyncWrite {
    /// Device id (authenticated).
    pub device_id: String,
    /// The delta's `local_version`; applied only when above the stored one.
    pub local_version: u64,
    /// New patterns (all at or above the stored-quality threshold), wire form.
    pub added: Vec<pb::Pattern>,
    /// Changes to this device's patterns. A pattern whose rate falls below the stored-quality
    /// threshold is removed.
    pub updated: Vec<pb::PatternUpdate>,
    /// This device's patterns to delete.
    pub removed: Vec<Uuid>,
    /// Addition to the device's interest vector (success-weighted sum of the added
    /// embeddings); `None` when nothing was added.
    pub interest_add: Option<Vec<f32>>,
    /// Server time, unix ms.
    pub now_ms: i64,
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncApplied {
    /// False when `local_version` was not above the stored one: nothing changed.
    pub applied: bool,
    /// The `local_version` stored for the device after this call.
    pub acknowledged_version: u64,
    /// The device's region.
    pub region: String,
    /// The device's interest vector after this call (unnormalised), if it has one.
    pub interest: Option<Vec<f32>>,
}

/// A pattern offered to a device, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SimilarPattern {
    /// A published aggregate in wire form (its group id, the publication time).
    pub pattern: pb::Pattern,
    /// Distinct devices behind it (as the round published it: noisy in a DP round).
    pub sources: u32,
    /// Cosine similarity to the query.
    pub score: f32,
}

/// A similarity query. Only published aggregates are searched, never a device's own
/// patterns: what a TV receives is always something `min_sources` devices agree on.
#[derive(Debug, Clone)]
pub struct SimilarQuery {
    /// Interest vector (any length > 0; cosine is scale-free).
    pub interest: Vec<f32>,
    /// Most results.
    pub limit: usize,
    /// Lowest quality.
    pub min_quality: f32,
    /// k: aggregates with fewer distinct devices are never returned.
    pub min_sources: u32,
}

/// The state a federation round published last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalState {
    /// Version devices compare with `known_global_version`.
    pub version: u64,
    /// The round that produced it ("" before the first round).
    pub round_id: String,
    /// Trend signals of that round, highest score first.
    pub trends: Vec<pb::TrendSignal>,
}

/// A published round.
#[derive(Debug, Clone)]
pub struct Publish {
    /// Idempotency key.
    pub round_id: String,
    /// Version the round asks for; the stored version becomes `max(this, current + 1)`.
    pub global_version: u64,
    /// Aggregates (validated against k by the caller).
    pub patterns: Vec<pb::AggregatedPattern>,
    /// Trends.
    pub trends: Vec<pb::TrendSignal>,
}

/// Result of a publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// False when this round was published before (nothing changed).
    pub applied: bool,
    /// Version served now.
    pub global_version: u64,
}

/// One exported pattern with its owner (the service turns the owner into a pseudonym).
#[derive(Debug, Clone)]
pub struct ExportItem {
    /// Wire form.
    pub pattern: pb::Pattern,
    /// Owner device id; never leaves the shard.
    pub device_id: String,
    /// Owner's region.
    pub region: String,
}

/// A page of exported patterns, ordered by pattern id.
#[derive(Debug, Clone, Default)]
pub struct ExportPage {
    /// Patterns with id greater than the cursor.
    pub items: Vec<ExportItem>,
    /// True when no pattern follows this page.
    pub last: bool,
}

/// Counters for stats and gauges. Read every 2 s, so never computed by scanning a big table.
/// Embedded: exact, from memory. Postgres: see each field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Devices registered (Postgres: a counter kept by registration; exact).
    pub devices_total: u64,
    /// Devices that synced since the given time (Postgres: exact up to 10,000 devices, above
    /// that estimated from a block sample of about 10,000 devices).
    pub devices_active: u64,
    /// Patterns stored (Postgres: merged patterns, a counter kept by the merge, plus intake
    /// rows not merged yet, an upper bound since updates and removals count too).
    pub patterns: u64,
    /// Postgres: intake rows not yet merged plus merged patterns similarity queries do not
    /// reflect yet (counted up to 100,000): with `SIMILAR_INDEX=memory`, those this process's
    /// in-memory index has not followed (all of them while it loads); with `pgvector`, those
    /// the indexer has not reached. 0 for the embedded store.
    pub backlog: u64,
    /// Global version served.
    pub global_version: u64,
}

/// The storage contract of a shard.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `embedded` or `postgres`.
    fn kind(&self) -> &'static str;

    /// Ok when the store is reachable and its schema is current.
    async fn check_ready(&self) -> Result<(), StoreError>;

    /// Registers a device (idempotent). A new device beyond `max_devices` is refused with
    /// [`StoreError::Capacity`].
    async fn register(
        &self,
        device_id: &str,
        region: &str,
        max_devices: u64,
        now_ms: i64,
    ) -> Result<Registered, StoreError>;

    /// Applies a sync atomically and durably: when this returns Ok, the write survives a
    /// crash of the process.
    async fn apply_sync(&self, write: SyncWrite) -> Result<SyncApplied, StoreError>;

    /// Nearest published aggregates with at least `min_sources` devices (never a device's
    /// pattern).
    async fn similar(&self, query: SimilarQuery) -> Result<Vec<SimilarPattern>, StoreError>;

    /// Makes every applied sync visible to [`Store::similar`] and [`Store::export`] now
    /// (Postgres: merges the intake backlog; embedded: nothing to do).
    async fn settle(&self) -> Result<(), StoreError>;

    /// The latest published round (may be cached for about a second).
    async fn global(&self) -> Result<GlobalState, StoreError>;

    /// Patterns with success rate `>= min_quality` and id `> after`, in id order.
    async fn export(
        &self,
        after: Option<Uuid>,
        limit: usize,
        min_quality: f32,
    ) -> Result<ExportPage, StoreError>;

    /// Installs a round's aggregates and trends atomically; idempotent on `round_id`.
    async fn publish(&self, publish: Publish) -> Result<Published, StoreError>;

    /// Distinct content ids of `device_id`'s stored patterns, most recently updated first
    /// (ties by content id), at most [`MAX_DEVICE_CONTENTS`], empty ids left out: the order
    /// the collaborative query weighs them in (`omega_protocol::collab`). An unknown device
    /// has none: the answer is an empty list, not [`StoreError::UnknownDevice`]. Postgres
    /// reads merged patterns, so a sync's patterns appear here within `MERGE_INTERVAL_MS`.
    async fn device_contents(&self, device_id: &str) -> Result<Vec<String>, StoreError>;

    /// The aggregates the last [`Store::publish`] installed (every one of them, including
    /// those without a content id), in no particular order; empty before the first round.
    async fn aggregates(&self) -> Result<Vec<pb::AggregatedPattern>, StoreError>;

    /// Counters; `active_since_ms` bounds "active".
    async fn counts(&self, active_since_ms: i64) -> Result<Counts, StoreError>;

    /// Makes everything acknowledged durable and stops background work (shutdown).
    async fn flush(&self) -> Result<(), StoreError>;
}

/// A shared store.
pub type SharedStore = Arc<dyn Store>;

/// What serves the Postgres store's similarity queries (`SIMILAR_INDEX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SimilarIndex {
    /// An in-process inverted-file index over the shareable patterns, loaded from Postgres at
    /// start and kept in step with it by following the merge (`postgres/similar_index.rs`).
    #[default]
    Memory,
    /// pgvector's HNSW index on `pattern_vectors`, fed by the background indexer.
    Pgvector,
}

/// Largest global version a store keeps (Postgres stores it in a `bigint`).
pub const MAX_GLOBAL_VERSION: u64 = i64::MAX as u64;

/// The version a new publish installs: the one asked for, or one past the current one,
/// whichever is larger; `None` past [`MAX_GLOBAL_VERSION`].
pub fn next_global_version(asked: u64, current: u64) -> Option<u64> {
    let next = asked.max(current.checked_add(1)?);
    (next <= MAX_GLOBAL_VERSION).then_some(next)
}

/// Options of the stores (`omega-shard` builds them from its `StoreArgs`).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Postgres URL, or `None` for the embedded store.
    pub postgres_url: Option<String>,
    /// Read replicas.
    pub read_urls: Vec<String>,
    /// Embedded store directory.
    pub data_dir: std::path::PathBuf,
    /// Primary pool size.
    pub pool_size: u32,
    /// HNSW `m`.
    pub hnsw_m: u32,
    /// HNSW `ef_construction`.
    pub hnsw_ef_construction: u32,
    /// HNSW `ef_search`.
    pub hnsw_ef_search: u32,
    /// Merge period.
    pub merge_interval: std::time::Duration,
    /// Merge batch.
    pub merge_batch: u32,
    /// Pause between indexer batches.
    pub index_interval: std::time::Duration,
    /// Rows per indexer batch.
    pub index_batch: u32,
    /// Postgres: what serves similarity queries.
    pub similar_index: SimilarIndex,
    /// In-process ANN lists (embedded store; Postgres with [`SimilarIndex::Memory`]).
    pub ann_lists: usize,
    /// In-process ANN probes.
    pub ann_probes: usize,
    /// Embedded WAL compaction threshold.
    pub wal_compact_bytes: u64,
    /// Embedded: truncate a damaged log at its first bad frame (after a backup copy) instead
    /// of refusing to open (`omega-shard migrate --repair`).
    pub repair: bool,
}

impl StoreOptions {
    /// Defaults for the embedded store in `dir` (tests, tools).
    pub fn embedded(dir: impl Into<std::path::PathBuf>) -> Self {
        StoreOptions {
            postgres_url: None,
            read_urls: Vec::new(),
            data_dir: dir.into(),
            pool_size: 16,
            hnsw_m: 16,
            hnsw_ef_construction: 64,
            hnsw_ef_search: 40,
            merge_interval: std::time::Duration::from_millis(200),
            merge_batch: 5000,
            index_interval: std::time::Duration::from_millis(200),
            index_batch: 20,
            similar_index: SimilarIndex::Memory,
            ann_lists: 256,
            ann_probes: 8,
            wal_compact_bytes: 256 << 20,
            repair: false,
        }
    }

    /// Defaults for Postgres at `url`.
    pub fn postgres(url: &str) -> Self {
        StoreOptions { postgres_url: Some(url.into()), ..StoreOptions::embedded("./data") }
    }
}

/// Opens the store the options select (running migrations for Postgres).
pub async fn open(opts: &StoreOptions) -> Result<SharedStore, StoreError> {
    match &opts.postgres_url {
        Some(_) => Ok(Arc::new(postgres::PostgresStore::open(opts).await?)),
        None => Ok(Arc::new(embedded::EmbeddedStore::open(opts)?)),
    }
}

/// Converts an aggregate into the pattern form devices receive.
pub fn aggregate_pattern(a: &pb::AggregatedPattern, at_ms: i64) -> pb::Pattern {
    pb::Pattern {
        id: a.id.clone(),
        content_id: a.content_id.clone(),
        embedding: a.embedding.clone(),
        success_rate: a.quality,
        sample_count: u32::try_from(a.total_samples).unwrap_or(u32::MAX).max(1),
        context: a.context.clone(),
        created_at_ms: at_ms,
        updated_at_ms: at_ms,
    }
}

/// Unit-normalised copy of `v`, or `None` for a zero or non-finite vector.
pub fn unit(v: &[f32]) -> Option<Vec<f32>> {
    let mut u = v.to_vec();
    omega_protocol::vector::l2_normalize(&mut u).then_some(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_version_moves_up_and_never_wraps() {
        assert_eq!(next_global_version(0, 0), Some(1));
        assert_eq!(next_global_version(7, 3), Some(7));
        assert_eq!(next_global_version(2, 3), Some(4));
        assert_eq!(next_global_version(MAX_GLOBAL_VERSION, 3), Some(MAX_GLOBAL_VERSION));
        assert_eq!(next_global_version(u64::MAX, 3), None);
        assert_eq!(next_global_version(0, MAX_GLOBAL_VERSION), None);
        assert_eq!(next_global_version(0, u64::MAX), None);
    }
}
