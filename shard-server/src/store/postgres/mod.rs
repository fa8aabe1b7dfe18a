//! The Postgres + pgvector store.
//!
//! Measured here on 384-dim rows, inserting into a table that carries an HNSW index runs at
//! ~150 rows/s per session while appending to an unindexed one runs at tens of thousands, so
//! the index is kept off every path that must be fast. Three tables, three stages:
//!
//! 1. **Sync** (one transaction per batch of concurrent syncs, two writer tasks that split
//!    the devices between them): bump
//!    `devices.local_version` only when the new version is higher (the idempotency check and
//!    the row lock in one statement), then append the delta's operations to the unindexed
//!    `pattern_intake`.
//! 2. **Merge** (background, every `MERGE_INTERVAL_MS`, up to `MERGE_BATCH` rows per
//!    transaction, one replica at a time via an advisory lock): collapse the operations per
//!    pattern and apply them to `patterns`, which has only btree indexes, so it keeps up with
//!    the intake. Removals and quality drops are also applied to `pattern_vectors` here (cheap
//!    deletes). Exports merge first, so a federation round sees every acknowledged sync.
//!    Each merge is one generation: rows it writes carry it in `index_seq`, rows it deletes
//!    leave a tombstone in `pattern_removals`, and `merge_state.generation` says which
//!    generation committed last.
//! 3. **Similarity index**, one of two (`SIMILAR_INDEX`):
//!    - `memory` (default): every server process keeps the shareable patterns (success >= 0.8)
//!      in an in-process index, loaded at start and following the merge generations
//!      ([`similar_index`]); a pattern is searchable within about two merge intervals, on
//!      every replica, and a query never touches the database.
//!    - `pgvector`: a background indexer (`INDEX_BATCH` rows then a pause of
//!      `INDEX_INTERVAL_MS`) copies shareable patterns written since its cursor into
//!      `pattern_vectors`, the HNSW-indexed table similarity queries then search. This is the
//!      slow step; the pause bounds the CPU it takes from syncs. When no sync has been
//!      written for a second, it skips the pause and catches up batch after batch. The
//!      indexer runs only in this mode: with `memory`, `pattern_vectors` (and its HNSW index,
//!      still created by the migrations) is left as it is, apart from the merge's deletes.
//!
//! Both background steps run small and often (by default a merge every 200 ms, 20 rows per
//! index batch) rather than large and rarely: on the 2-core benchmark machine a merge of a
//! second's intake (~2,700 rows) or a 100-row index batch is a burst of CPU and WAL that every
//! sync in flight waits behind, and it set the p99 (docs/benchmarks.md); the same work in
//! five times smaller slices costs the same CPU and took ~30 ms off the p99. Each has its own
//! one-session pool, so neither ever runs more than one statement at a time.
//!
//! Freshness: a pattern is in `patterns` (and exports) within one merge interval, and in other
//! devices' `similar` answers: with `memory`, right after the merge in the process that ran
//! it and within one more merge interval in the others; with `pgvector`, once the indexer
//! reaches it: immediately while the indexer keeps up, after `backlog / index rate` when it
//! does not (`constellation_intake_backlog` counts intake rows plus rows waiting for the
//! indexer).
//!
//! With `pgvector`, similarity queries read from the `DATABASE_READ_URLS` replicas when
//! configured, and device contents always do (they tolerate replication lag: both are already
//! a merge interval behind); the in-memory index follows the primary.
//! Exports and the global version always read the primary: an export must contain every
//! acknowledged sync and a device must never be handed a global version older than the one
//! just published, neither of which a lagging replica guarantees.
//! Connections that break (a database restart) are dropped by the pool and re-opened on the
//! next use; errors that mean "cannot reach the database" become
//! [`StoreError::Unavailable`].

mod indexer;
mod merge;
mod pool;
mod publish;
mod rows;
mod similar_index;
mod writer;

pub use pool::{MIGRATOR, db_err, migrate, migrate_database};

use super::ann::IndexInfo;
use super::{
    Counts, ExportItem, ExportPage, GlobalState, MAX_DEVICE_CONTENTS, Publish, Published,
    Registered, SimilarIndex, SimilarPattern, SimilarQuery, Store, StoreError, StoreOptions,
    SyncApplied, SyncWrite,
};
use async_trait::async_trait;
use indexer::{index_once, indexer};
use merge::{merge_once, merger, prune_tombstones};
use omega_protocol::pb;
use pgvector::Vector;
use pool::{bulk_read_pool, migrate_when_up, pool, primary_url};
use publish::{read_aggregates, trend_from_row};
use rows::row_pattern;
use sqlx::Row;
use sqlx::postgres::PgPool;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;
use writer::{Activity, Job, writer};

/// Name of the HNSW index on `patterns.embedding`.
pub const HNSW_INDEX: &str = "pattern_vectors_embedding_hnsw";

const WRITERS: usize = 2;
const GLOBAL_TTL: Duration = Duration::from_secs(1);
/// How long the merge keeps tombstones of deleted patterns: a process whose in-memory index
/// fell further behind than this (a long outage) reloads it instead of following.
pub const TOMBSTONE_RETENTION: Duration = Duration::from_secs(3600);
/// Longest pause between two follow steps of the in-memory index, whatever
/// `MERGE_INTERVAL_MS` is: other processes' merges reach this one's `similar` within it.
const FOLLOW_MAX_PAUSE: Duration = Duration::from_secs(1);
/// Longest [`PostgresStore::open`] waits for the in-memory index to load.
const OPEN_WAITS_FOR_LOAD: Duration = Duration::from_secs(2);

/// Up to this many devices, active devices are counted exactly (a scan of a few MB).
const ACTIVE_EXACT_MAX: u64 = 10_000;
/// Devices the active-device sample aims at on larger shards.
const ACTIVE_SAMPLE_ROWS: f64 = 10_000.0;
/// Patterns waiting for the indexer are counted up to this many (a bounded index range scan).
const UNINDEXED_COUNT_CAP: i64 = 100_000;

/// Percentage of `devices` blocks to sample for the active-device count, `None` to count all.
fn active_sample_percent(total: u64) -> Option<f64> {
    (total > ACTIVE_EXACT_MAX).then(|| (100.0 * ACTIVE_SAMPLE_ROWS / total as f64).max(0.001))
}

/// The Postgres store.
pub struct PostgresStore {
    primary: PgPool,
    readers: Vec<PgPool>,
    next_reader: AtomicUsize,
    jobs: Vec<mpsc::Sender<Job>>,
    global: Mutex<Option<(Instant, GlobalState)>>,
    /// The in-process similarity index (`SIMILAR_INDEX=memory`).
    memory: Option<Arc<similar_index::SimilarIndex>>,
    latest_migration: i64,
    merge_batch: i64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("readers", &self.readers.len()).finish()
    }
}

impl PostgresStore {
    /// Connects, migrates (retrying for up to 30 s while the database comes up) and starts
    /// the writer and merge tasks, and either the in-memory similarity index (loading in the
    /// background: [`Store::check_ready`] fails until it is loaded) or the pgvector indexer.
    pub async fn open(opts: &StoreOptions) -> Result<Self, StoreError> {
        let url = primary_url(opts)?;
        let primary = pool(url, "omega-shard", opts.pool_size, opts.hnsw_ef_search)?;
        let readers = opts
            .read_urls
            .iter()
            .map(|u| pool(u, "omega-shard-read", opts.pool_size, opts.hnsw_ef_search))
            .collect::<Result<Vec<_>, _>>()?;
        migrate_when_up(&primary, opts).await?;
        // Devices are split between the writers by hash, so two batches never lock the same
        // device row (no deadlocks) while one batch's commit overlaps the next one's work.
        let mut jobs = Vec::new();
        let mut tasks = Vec::new();
        let activity = Arc::new(Activity::new());
        for _ in 0..WRITERS {
            let (tx, rx) = mpsc::channel(4096);
            jobs.push(tx);
            tasks.push(tokio::spawn(writer(primary.clone(), rx, activity.clone())));
        }
        // The background steps have one session each: their own pool bounds them to one
        // statement at a time, and they can be told apart in pg_stat_activity.
        let memory = match opts.similar_index {
            SimilarIndex::Memory => {
                let index =
                    Arc::new(similar_index::SimilarIndex::new(opts.ann_lists, opts.ann_probes));
                let (follow, every) = (index.clone(), opts.merge_interval.min(FOLLOW_MAX_PAUSE));
                let session = pool(url, "omega-shard-follow", 1, opts.hnsw_ef_search)?;
                let bulk = bulk_read_pool(url, "omega-shard-load", opts.hnsw_ef_search)?;
                tasks.push(tokio::spawn(async move { follow.run(session, bulk, every).await }));
                Some(index)
            }
            SimilarIndex::Pgvector => {
                tasks.push(tokio::spawn(indexer(
                    pool(url, "omega-shard-index", 1, opts.hnsw_ef_search)?,
                    opts.index_interval,
                    i64::from(opts.index_batch),
                    activity,
                )));
                None
            }
        };
        tasks.push(tokio::spawn(merger(
            pool(url, "omega-shard-merge", 1, opts.hnsw_ef_search)?,
            opts.merge_interval,
            i64::from(opts.merge_batch),
            memory.clone(),
        )));
        if let Some(m) = &memory {
            // A small database loads in milliseconds: wait that long, so such a server is
            // ready at once rather than at the next readiness probe (every 2 s). A large one
            // keeps loading in the background while the listeners start.
            let deadline = Instant::now() + OPEN_WAITS_FOR_LOAD;
            while m.check_loaded().is_err() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(PostgresStore {
            primary,
            readers,
            next_reader: AtomicUsize::new(0),
            jobs,
            global: Mutex::new(None),
            memory,
            latest_migration: MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0),
            merge_batch: i64::from(opts.merge_batch),
            tasks,
        })
    }

    fn reader(&self) -> &PgPool {
        if self.readers.is_empty() {
            return &self.primary;
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        &self.readers[i]
    }

    /// The primary pool (tools and tests).
    pub fn pool(&self) -> &PgPool {
        &self.primary
    }

    /// Deletes removal tombstones older than [`TOMBSTONE_RETENTION`] now (the merge task does
    /// it every minute; tools and tests).
    pub async fn prune_tombstones(&self) -> Result<(), StoreError> {
        prune_tombstones(&self.primary).await
    }

    /// What this process's in-memory similarity index is doing; `None` with
    /// `SIMILAR_INDEX=pgvector` or before its first load (tools and tests).
    pub fn memory_index_info(&self) -> Result<Option<IndexInfo>, StoreError> {
        match &self.memory {
            Some(m) => m.info(),
            None => Ok(None),
        }
    }

    /// Applies the whole intake backlog to `patterns` (fast: no vector index there).
    async fn merge_all(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let n = merge_once(&self.primary, self.merge_batch.max(5000)).await?;
            if n == 0 {
                let left: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pattern_intake)")
                    .fetch_one(&self.primary)
                    .await
                    .map_err(db_err)?;
                if !left {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(StoreError::Unavailable("intake rows still unmerged".into()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Devices that synced since `since_ms`: counted exactly on a small shard, estimated from
    /// a block sample of about [`ACTIVE_SAMPLE_ROWS`] devices on a large one.
    async fn active_devices(&self, total: u64, since_ms: i64) -> Result<u64, StoreError> {
        let since = since_ms as f64;
        let counted: i64 = match active_sample_percent(total) {
            None => sqlx::query_scalar(
                "SELECT count(*) FROM devices WHERE last_sync_at >= to_timestamp($1::float8 / 1000)",
            )
            .bind(since)
            .fetch_one(&self.primary)
            .await
            .map_err(db_err)?,
            Some(pct) => {
                let sampled: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM devices TABLESAMPLE SYSTEM ($2::float4)
                     WHERE last_sync_at >= to_timestamp($1::float8 / 1000)",
                )
                .bind(since)
                .bind(pct as f32)
                .fetch_one(&self.primary)
                .await
                .map_err(db_err)?;
                (sampled as f64 * 100.0 / pct).round() as i64
            }
        };
        Ok((counted.max(0) as u64).min(total))
    }

    fn invalidate_global(&self) {
        if let Ok(mut g) = self.global.lock() {
            *g = None;
        }
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.primary)
                .await
                .map_err(db_err)?;
        if v.unwrap_or(0) < self.latest_migration {
            return Err(StoreError::Unavailable(format!(
                "schema at migration {}, need {}",
                v.unwrap_or(0),
                self.latest_migration
            )));
        }
        match &self.memory {
            Some(m) => m.check_loaded(),
            None => Ok(()),
        }
    }

    async fn register(
        &self,
        device_id: &str,
        region: &str,
        max_devices: u64,
        _now_ms: i64,
    ) -> Result<Registered, StoreError> {
        let mut tx = self.primary.begin().await.map_err(db_err)?;
        let inserted: Option<String> = sqlx::query_scalar(
            "INSERT INTO devices (device_id, region) VALUES ($1, $2)
             ON CONFLICT (device_id) DO NOTHING RETURNING region",
        )
        .bind(device_id)
        .bind(region)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let Some(region) = inserted else {
            let region: String =
                sqlx::query_scalar("SELECT region FROM devices WHERE device_id = $1")
                    .bind(device_id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            return Ok(Registered { region, created: false });
        };
        let counted: Option<i64> = sqlx::query_scalar(
            "UPDATE global_state SET devices = devices + 1 WHERE id = 1 AND devices < $1
             RETURNING devices",
        )
        .bind(i64::try_from(max_devices).unwrap_or(i64::MAX))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        if counted.is_none() {
            tx.rollback().await.map_err(db_err)?;
            return Err(StoreError::Capacity { max: max_devices });
        }
        tx.commit().await.map_err(db_err)?;
        Ok(Registered { region, created: true })
    }

    async fn apply_sync(&self, write: SyncWrite) -> Result<SyncApplied, StoreError> {
        let (reply, rx) = oneshot::channel();
        let h =
            write.device_id.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        self.jobs[h % self.jobs.len()]
            .send(Job { write, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the database writer stopped".into()))?;
        rx.await.map_err(|_| StoreError::Unavailable("the database writer stopped".into()))?
    }

    async fn similar(&self, q: SimilarQuery) -> Result<Vec<SimilarPattern>, StoreError> {
        if let Some(m) = &self.memory {
            return m.similar(&q);
        }
        if super::unit(&q.interest).is_none() {
            return Ok(Vec::new());
        }
        let query = Vector::from(q.interest.clone());
        // Published aggregates only: a TV never receives another device's pattern.
        let rows = sqlx::query(
            "SELECT g.id, g.content_id, g.embedding, g.quality AS success_rate,
                    LEAST(g.total_samples, 4294967295) AS sample_count, g.time_slot,
                    g.day_type, g.content_type, g.genres, g.source_devices,
                    (extract(epoch FROM s.published_at) * 1000)::bigint AS created_at_ms,
                    (extract(epoch FROM s.published_at) * 1000)::bigint AS updated_at_ms,
                    g.embedding <=> $1 AS distance
             FROM global_patterns g, global_state s
             WHERE g.quality >= $2 AND g.content_id <> '' AND g.source_devices >= $3
               AND s.id = 1
             ORDER BY g.embedding <=> $1 LIMIT $4",
        )
        .bind(&query)
        .bind(q.min_quality)
        .bind(i64::from(q.min_sources))
        .bind(q.limit as i64)
        .fetch_all(self.reader())
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let distance: f64 = r.try_get("distance")?;
                let sources: i64 = r.try_get("source_devices")?;
                Ok(SimilarPattern {
                    pattern: row_pattern(r)?,
                    sources: u32::try_from(sources.max(0)).unwrap_or(u32::MAX),
                    score: (1.0 - distance) as f32,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db_err)
    }

    async fn settle(&self) -> Result<(), StoreError> {
        self.merge_all().await?;
        if let Some(m) = &self.memory {
            // The first load may still run (the background task holds it); wait for it, then
            // apply everything merged since.
            let deadline = Instant::now() + Duration::from_secs(600);
            while m.check_loaded().is_err() {
                if Instant::now() > deadline {
                    return m.check_loaded();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return m.sync(&self.primary).await;
        }
        loop {
            match index_once(&self.primary, 10_000).await? {
                Some(0) => return Ok(()),
                Some(_) => {}
                // The background indexer holds the lock: wait for its batch to commit.
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn global(&self) -> Result<GlobalState, StoreError> {
        if let Ok(g) = self.global.lock()
            && let Some((_, state)) = g.as_ref().filter(|(at, _)| at.elapsed() < GLOBAL_TTL)
        {
            return Ok(state.clone());
        }
        // The primary, never a replica: a lagging replica would serve a version older than
        // one a device was already given (or one just published), and its trends with it.
        let row = sqlx::query("SELECT global_version, round_id FROM global_state WHERE id = 1")
            .fetch_one(&self.primary)
            .await
            .map_err(db_err)?;
        let trends =
            sqlx::query("SELECT content_id, centroid, score, region FROM trends ORDER BY position")
                .fetch_all(&self.primary)
                .await
                .map_err(db_err)?
                .iter()
                .map(trend_from_row)
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
        let state = GlobalState {
            version: row.try_get::<i64, _>("global_version").map_err(db_err)? as u64,
            round_id: row.try_get("round_id").map_err(db_err)?,
            trends,
        };
        if let Ok(mut g) = self.global.lock() {
            *g = Some((Instant::now(), state.clone()));
        }
        Ok(state)
    }

    async fn export(
        &self,
        after: Option<Uuid>,
        limit: usize,
        min_quality: f32,
    ) -> Result<ExportPage, StoreError> {
        if after.is_none() {
            self.merge_all().await?;
        }
        // The primary, never a replica: the merge above ran there, and a federation round
        // must see every sync acknowledged before it started, which a lagging replica may not.
        let rows = sqlx::query(
            "SELECT p.id, p.device_id, d.region, p.content_id, p.embedding, p.success_rate,
                    p.sample_count, p.time_slot, p.day_type, p.content_type, p.genres,
                    p.created_at_ms, p.updated_at_ms
             FROM patterns p JOIN devices d ON d.device_id = p.device_id
             WHERE ($1::uuid IS NULL OR p.id > $1) AND p.success_rate >= $2
             ORDER BY p.id LIMIT $3",
        )
        .bind(after)
        .bind(min_quality)
        .bind(limit as i64 + 1)
        .fetch_all(&self.primary)
        .await
        .map_err(db_err)?;
        let last = rows.len() <= limit;
        let items = rows
            .iter()
            .take(limit)
            .map(|r| {
                Ok(ExportItem {
                    pattern: row_pattern(r)?,
                    device_id: r.try_get("device_id")?,
                    region: r.try_get("region")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db_err)?;
        Ok(ExportPage { items, last })
    }

    async fn publish(&self, p: Publish) -> Result<Published, StoreError> {
        let published = publish::publish(&self.primary, p).await?;
        if !published.applied {
            return Ok(published);
        }
        self.invalidate_global();
        if let Some(m) = &self.memory
            && let Err(e) = m.sync(&self.primary).await
        {
            // Published all the same; the follower installs the aggregates on its next step.
            tracing::warn!(error = %e, "could not load the published aggregates into memory yet");
        }
        Ok(published)
    }

    async fn device_contents(&self, device_id: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT content_id FROM patterns
             WHERE device_id = $1 AND content_id <> ''
             GROUP BY content_id ORDER BY max(updated_at_ms) DESC, content_id LIMIT $2",
        )
        .bind(device_id)
        .bind(MAX_DEVICE_CONTENTS as i64)
        .fetch_all(self.reader())
        .await
        .map_err(db_err)
    }

    async fn aggregates(&self) -> Result<Vec<pb::AggregatedPattern>, StoreError> {
        // Read when the global version changed: catch up first, so the answer is at least as
        // new as the version the caller saw (which came from the primary).
        if let Some(m) = &self.memory {
            m.sync(&self.primary).await?;
            if let Some(all) = m.aggregates()? {
                return Ok(all);
            }
        }
        // The primary: the version that triggered this read may be newer than a replica.
        read_aggregates(&self.primary).await
    }

    async fn counts(&self, active_since_ms: i64) -> Result<Counts, StoreError> {
        // Runs every 2 s and on every /api/v1/stats: no statement here may scan a big table.
        // Devices and merged patterns are counters kept by the writes; intake rows come from
        // the ends of its sequence (an upper bound: rolled-back inserts leave gaps); rows
        // waiting for the indexer are counted up to a cap.
        // Not yet searchable: with the in-memory index, rows written by generations it has not
        // applied (all of them while it loads: -1); with pgvector, rows past the indexer.
        let unindexed = match &self.memory {
            Some(_) => "SELECT 1 FROM patterns p WHERE p.index_seq > $2 LIMIT $1",
            None => {
                "SELECT 1 FROM patterns p, indexer_state i
                 WHERE i.id = 1 AND (p.index_seq, p.id) > (i.last_seq, i.last_id) LIMIT $1"
            }
        };
        let sql = format!(
            "SELECT s.devices, s.global_version, m.patterns AS merged,
                    COALESCE((SELECT max(seq) - min(seq) + 1 FROM pattern_intake), 0) AS intake,
                    (SELECT count(*) FROM ({unindexed}) b) AS unindexed
             FROM global_state s, merge_state m WHERE s.id = 1 AND m.id = 1"
        );
        let mut query = sqlx::query(&sql).bind(UNINDEXED_COUNT_CAP);
        if let Some(m) = &self.memory {
            query = query.bind(m.cursor().unwrap_or(-1));
        }
        let row = query.fetch_one(&self.primary).await.map_err(db_err)?;
        let get = |c: &str| row.try_get::<i64, _>(c).map(|v| v.max(0) as u64).map_err(db_err);
        let devices_total = get("devices")?;
        let intake = get("intake")?;
        Ok(Counts {
            devices_total,
            devices_active: self.active_devices(devices_total, active_since_ms).await?,
            patterns: get("merged")? + intake,
            backlog: intake + get("unindexed")?,
            global_version: get("global_version")?,
        })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Every acknowledged sync is committed already; intake rows are merged at next start.
        for t in &self.tasks {
            t.abort();
        }
        self.primary.close().await;
        for r in &self.readers {
            r.close().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_idle_until_a_write_and_again_after_a_quiet_period() {
        let a = Activity::new();
        assert!(a.idle_for(Duration::from_secs(3600)), "nothing written yet");
        a.wrote();
        assert!(!a.idle_for(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.idle_for(Duration::from_millis(20)));
        assert!(!a.idle_for(Duration::from_secs(1)));
    }

    #[test]
    fn active_devices_are_counted_exactly_on_small_shards_and_sampled_on_large_ones() {
        assert_eq!(active_sample_percent(0), None);
        assert_eq!(active_sample_percent(ACTIVE_EXACT_MAX), None);
        let pct = active_sample_percent(4_000_000).expect("sampled");
        assert!((pct - 0.25).abs() < 1e-9, "{pct}");
        // The sample stays near ACTIVE_SAMPLE_ROWS devices whatever the size.
        for total in [10_001u64, 100_000, 4_000_000] {
            let pct = active_sample_percent(total).expect("sampled");
            let rows = total as f64 * pct / 100.0;
            assert!((rows - ACTIVE_SAMPLE_ROWS).abs() < 1.0, "{total}: {rows}");
        }
    }
}
