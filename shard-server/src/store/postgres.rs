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

mod similar_index;

use super::ann::IndexInfo;
use super::{
    Counts, ExportItem, ExportPage, GlobalState, MAX_DEVICE_CONTENTS, Publish, Published,
    Registered, SimilarIndex, SimilarPattern, SimilarQuery, Store, StoreError, StoreOptions,
    SyncApplied, SyncWrite,
};
use async_trait::async_trait;
use omega_protocol::pb;
use omega_protocol::validate::{MIN_SHARED_QUALITY, MIN_STORED_QUALITY};
use omega_protocol::vector::{QuantizedVector, quantize};
use pgvector::Vector;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Executor, Row};
use std::collections::{HashMap, HashSet, VecDeque};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// The embedded migrations (`shard-server/migrations`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Name of the HNSW index on `patterns.embedding`.
pub const HNSW_INDEX: &str = "pattern_vectors_embedding_hnsw";

const OP_PUT: i16 = 1;
const OP_UPDATE: i16 = 2;
const OP_REMOVE: i16 = 3;
const MERGE_LOCK: i64 = 0x6f6d_6567_616d; // "omegam"
const INDEX_LOCK: i64 = 0x6f6d_6567_6169; // "omegai"
const MAX_BATCH: usize = 512;
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
/// How often the merge task prunes tombstones past [`TOMBSTONE_RETENTION`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);

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

/// Maps a database error to the store's error, separating "unreachable" from the rest.
pub fn db_err(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &e {
        E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Tls(_) => {
            StoreError::Unavailable(e.to_string())
        }
        E::Protocol(_) => StoreError::Unavailable(e.to_string()),
        E::Database(d) => match d.code().as_deref() {
            Some(c) if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Database(e.to_string()),
        },
        _ => StoreError::Database(e.to_string()),
    }
}

/// When the sync writers last wrote, so the background steps can tell whether syncs are
/// flowing.
#[derive(Debug)]
struct Activity {
    origin: Instant,
    last_write_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { origin: Instant::now(), last_write_ms: AtomicU64::new(0) }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that "never written" (0) reads as long ago from the very start.
        self.origin.elapsed().as_millis() as u64 + 1
    }

    fn wrote(&self) {
        self.last_write_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// True when no sync was written within `quiet`.
    fn idle_for(&self, quiet: Duration) -> bool {
        let last = self.last_write_ms.load(Ordering::Relaxed);
        last == 0 || self.now_ms().saturating_sub(last) >= quiet.as_millis() as u64
    }
}

/// Without a sync written for this long, the indexer runs without pauses.
const IDLE_AFTER: Duration = Duration::from_secs(1);

struct Job {
    write: SyncWrite,
    reply: oneshot::Sender<Result<SyncApplied, StoreError>>,
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

/// A pool on `url` whose sessions show as `name` in `pg_stat_activity`.
fn pool(url: &str, name: &str, size: u32, ef_search: u32) -> Result<PgPool, StoreError> {
    Ok(pool_of(connect_options(url, name)?, size, ef_search))
}

/// One session for reads of a whole table by design (the similarity index's load at start
/// and its rebuilds, which log their own timing): sqlx's slow-statement warning would fire on
/// every one of them, so statement logging is off here.
fn bulk_read_pool(url: &str, name: &str, ef_search: u32) -> Result<PgPool, StoreError> {
    Ok(pool_of(connect_options(url, name)?.disable_statement_logging(), 1, ef_search))
}

fn connect_options(url: &str, name: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Database(format!("bad database URL: {e}")))?
        .application_name(name))
}

fn pool_of(opts: PgConnectOptions, size: u32, ef_search: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Duration::from_secs(300))
        // A broken connection fails one query and is dropped; pinging on every checkout
        // would add a round trip to every sync.
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                conn.execute(format!("SET hnsw.ef_search = {ef_search}").as_str()).await?;
                Ok(())
            })
        })
        .connect_lazy_with(opts)
}

/// Runs the migrations and creates the HNSW index (`omega-shard migrate`, and at start).
pub async fn migrate(pool: &PgPool, m: u32, ef_construction: u32) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => db_err(e),
        other => StoreError::Database(format!("migration failed: {other}")),
    })?;
    let existing: Option<Vec<String>> =
        sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE relname = $1")
            .bind(HNSW_INDEX)
            .fetch_optional(pool)
            .await
            .map_err(db_err)?
            .flatten();
    match existing {
        None => {
            // Created on an empty table at first start: cheap. The values are validated
            // integers, so formatting them into DDL is safe.
            let ddl = format!(
                "CREATE INDEX IF NOT EXISTS {HNSW_INDEX} ON pattern_vectors USING hnsw \
                 (embedding vector_cosine_ops) WITH (m = {m}, ef_construction = {ef_construction})"
            );
            pool.execute(ddl.as_str()).await.map_err(db_err)?;
        }
        Some(opts) => {
            let want = [format!("m={m}"), format!("ef_construction={ef_construction}")];
            if !want.iter().all(|w| opts.contains(w)) {
                tracing::warn!(
                    existing = ?opts,
                    wanted = ?want,
                    "the HNSW index was built with other parameters; they apply after \
                     `REINDEX INDEX CONCURRENTLY {HNSW_INDEX}`"
                );
            }
        }
    }
    Ok(())
}

/// Migrates the database at `url` through `pool`, retrying for up to 30 s while it comes up.
async fn migrate_when_up(pool: &PgPool, opts: &StoreOptions) -> Result<(), StoreError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match migrate(pool, opts.hnsw_m, opts.hnsw_ef_construction).await {
            Ok(()) => return Ok(()),
            Err(StoreError::Unavailable(e)) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn primary_url(opts: &StoreOptions) -> Result<&str, StoreError> {
    opts.postgres_url.as_deref().ok_or_else(|| StoreError::Database("no DATABASE_URL".into()))
}

/// `omega-shard migrate`: the migrations and the HNSW index, nothing else (no background
/// tasks, no similarity index load).
pub async fn migrate_database(opts: &StoreOptions) -> Result<(), StoreError> {
    let primary = pool(primary_url(opts)?, "omega-shard-migrate", 2, opts.hnsw_ef_search)?;
    let done = migrate_when_up(&primary, opts).await;
    primary.close().await;
    done
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

fn vector(p: &pb::Pattern) -> Option<Vector> {
    let e = p.embedding.as_ref()?;
    Some(Vector::from(QuantizedVector::from_bytes(&e.values, e.scale).dequantize()))
}

fn wire_embedding(v: &Vector) -> pb::Embedding {
    let q = quantize(v.as_slice());
    pb::Embedding { values: q.to_bytes(), scale: q.scale }
}

fn genres_json(c: Option<&pb::PatternContext>) -> String {
    serde_json::to_string(&c.map(|c| c.genres.clone()).unwrap_or_default())
        .unwrap_or_else(|_| "[]".into())
}

fn row_pattern(row: &PgRow) -> Result<pb::Pattern, sqlx::Error> {
    let id: Uuid = row.try_get("id")?;
    let emb: Vector = row.try_get("embedding")?;
    let samples: i64 = row.try_get("sample_count")?;
    Ok(pb::Pattern {
        id: id.as_bytes().to_vec(),
        content_id: row.try_get("content_id")?,
        embedding: Some(wire_embedding(&emb)),
        success_rate: row.try_get("success_rate")?,
        sample_count: u32::try_from(samples).unwrap_or(u32::MAX),
        context: Some(pb::PatternContext {
            time_slot: i32::from(row.try_get::<i16, _>("time_slot")?),
            day_type: i32::from(row.try_get::<i16, _>("day_type")?),
            content_type: i32::from(row.try_get::<i16, _>("content_type")?),
            genres: row.try_get("genres")?,
        }),
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

/// Columns of `pattern_intake` rows, for one `unnest` insert.
#[derive(Default)]
struct IntakeCols {
    device: Vec<String>,
    op: Vec<i16>,
    id: Vec<Uuid>,
    content: Vec<Option<String>>,
    emb: Vec<Option<Vector>>,
    rate: Vec<Option<f32>>,
    samples: Vec<Option<i64>>,
    slot: Vec<Option<i16>>,
    day: Vec<Option<i16>>,
    ctype: Vec<Option<i16>>,
    genres: Vec<Option<String>>,
    created: Vec<Option<i64>>,
    updated: Vec<Option<i64>>,
}

impl IntakeCols {
    fn push_write(&mut self, w: &SyncWrite) {
        for p in &w.added {
            let Ok(id) = Uuid::from_slice(&p.id) else { continue };
            let c = p.context.as_ref();
            self.device.push(w.device_id.clone());
            self.op.push(OP_PUT);
            self.id.push(id);
            self.content.push(Some(p.content_id.clone()));
            self.emb.push(vector(p));
            self.rate.push(Some(p.success_rate));
            self.samples.push(Some(i64::from(p.sample_count)));
            self.slot.push(Some(c.map_or(0, |c| c.time_slot) as i16));
            self.day.push(Some(c.map_or(0, |c| c.day_type) as i16));
            self.ctype.push(Some(c.map_or(0, |c| c.content_type) as i16));
            self.genres.push(Some(genres_json(c)));
            self.created.push(Some(p.created_at_ms));
            self.updated.push(Some(p.updated_at_ms));
        }
        for u in &w.updated {
            let Ok(id) = Uuid::from_slice(&u.id) else { continue };
            self.meta(&w.device_id, OP_UPDATE, id);
            let last = self.op.len() - 1;
            self.rate[last] = Some(u.success_rate);
            self.samples[last] = Some(i64::from(u.extra_samples));
            self.updated[last] = Some(w.now_ms);
        }
        for id in &w.removed {
            self.meta(&w.device_id, OP_REMOVE, *id);
        }
    }

    fn meta(&mut self, device: &str, op: i16, id: Uuid) {
        self.device.push(device.to_owned());
        self.op.push(op);
        self.id.push(id);
        self.content.push(None);
        self.emb.push(None);
        self.rate.push(None);
        self.samples.push(None);
        self.slot.push(None);
        self.day.push(None);
        self.ctype.push(None);
        self.genres.push(None);
        self.created.push(None);
        self.updated.push(None);
    }
}

async fn write_batch(
    pool: &PgPool,
    jobs: &[SyncWrite],
) -> Result<HashMap<String, Result<SyncApplied, StoreError>>, StoreError> {
    let ids: Vec<String> = jobs.iter().map(|j| j.device_id.clone()).collect();
    let versions: Vec<i64> = jobs.iter().map(|j| j.local_version as i64).collect();
    let adds: Vec<Option<Vector>> =
        jobs.iter().map(|j| j.interest_add.clone().map(Vector::from)).collect();
    let mut tx = pool.begin().await.map_err(db_err)?;
    let rows = sqlx::query(
        "UPDATE devices d SET local_version = v.lv, last_sync_at = now(), syncs = d.syncs + 1,
             interest = CASE WHEN v.add IS NULL THEN d.interest
                             WHEN d.interest IS NULL THEN v.add
                             ELSE d.interest + v.add END
         FROM unnest($1::text[], $2::bigint[], $3::vector[]) AS v(device_id, lv, add)
         WHERE d.device_id = v.device_id AND d.local_version < v.lv
         RETURNING d.device_id, d.region, d.local_version, d.interest",
    )
    .bind(&ids)
    .bind(&versions)
    .bind(&adds)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    let mut out: HashMap<String, Result<SyncApplied, StoreError>> = HashMap::new();
    for r in &rows {
        let interest: Option<Vector> = r.try_get("interest").map_err(db_err)?;
        out.insert(
            r.try_get("device_id").map_err(db_err)?,
            Ok(SyncApplied {
                applied: true,
                acknowledged_version: r.try_get::<i64, _>("local_version").map_err(db_err)? as u64,
                region: r.try_get("region").map_err(db_err)?,
                interest: interest.map(|v| v.to_vec()),
            }),
        );
    }
    if out.len() < jobs.len() {
        let missing: Vec<String> = ids.iter().filter(|i| !out.contains_key(*i)).cloned().collect();
        let rows = sqlx::query(
            "SELECT device_id, region, local_version, interest FROM devices
             WHERE device_id = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        for r in &rows {
            let interest: Option<Vector> = r.try_get("interest").map_err(db_err)?;
            out.insert(
                r.try_get("device_id").map_err(db_err)?,
                Ok(SyncApplied {
                    applied: false,
                    acknowledged_version: r.try_get::<i64, _>("local_version").map_err(db_err)?
                        as u64,
                    region: r.try_get("region").map_err(db_err)?,
                    interest: interest.map(|v| v.to_vec()),
                }),
            );
        }
        for m in missing {
            out.entry(m).or_insert(Err(StoreError::UnknownDevice));
        }
    }
    let mut cols = IntakeCols::default();
    for j in jobs {
        if matches!(out.get(&j.device_id), Some(Ok(a)) if a.applied) {
            cols.push_write(j);
        }
    }
    if !cols.op.is_empty() {
        sqlx::query(
            "INSERT INTO pattern_intake (device_id, op, pattern_id, content_id, embedding,
                 success_rate, sample_count, time_slot, day_type, content_type, genres,
                 created_at_ms, updated_at_ms)
             SELECT d, o, p, c, e, s, n, ts, dt, ct,
                    CASE WHEN g IS NULL THEN NULL
                         ELSE ARRAY(SELECT jsonb_array_elements_text(g::jsonb)) END,
                    ca, ua
             FROM unnest($1::text[], $2::int2[], $3::uuid[], $4::text[], $5::vector[],
                         $6::real[], $7::int8[], $8::int2[], $9::int2[], $10::int2[],
                         $11::text[], $12::int8[], $13::int8[])
                  AS x(d, o, p, c, e, s, n, ts, dt, ct, g, ca, ua)",
        )
        .bind(&cols.device)
        .bind(&cols.op)
        .bind(&cols.id)
        .bind(&cols.content)
        .bind(&cols.emb)
        .bind(&cols.rate)
        .bind(&cols.samples)
        .bind(&cols.slot)
        .bind(&cols.day)
        .bind(&cols.ctype)
        .bind(&cols.genres)
        .bind(&cols.created)
        .bind(&cols.updated)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)?;
    Ok(out)
}

/// Group commit: takes every queued sync (one per device per batch) into one transaction.
async fn writer(pool: PgPool, mut rx: mpsc::Receiver<Job>, activity: Arc<Activity>) {
    let mut deferred: VecDeque<Job> = VecDeque::new();
    loop {
        let mut batch: Vec<Job> = Vec::new();
        let mut devices: HashSet<String> = HashSet::new();
        let mut later = VecDeque::new();
        while let Some(j) = deferred.pop_front() {
            if batch.len() < MAX_BATCH && devices.insert(j.write.device_id.clone()) {
                batch.push(j);
            } else {
                later.push_back(j);
            }
        }
        deferred = later;
        if batch.is_empty() {
            match rx.recv().await {
                Some(j) => {
                    devices.insert(j.write.device_id.clone());
                    batch.push(j);
                }
                None => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) if devices.insert(j.write.device_id.clone()) => batch.push(j),
                Ok(j) => deferred.push_back(j),
                Err(_) => break,
            }
        }
        let writes: Vec<SyncWrite> = batch.iter().map(|j| j.write.clone()).collect();
        activity.wrote();
        match write_batch(&pool, &writes).await {
            Ok(mut results) => {
                for j in batch {
                    let r = results
                        .remove(&j.write.device_id)
                        .unwrap_or(Err(StoreError::UnknownDevice));
                    let _ = j.reply.send(r);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let unavailable = matches!(e, StoreError::Unavailable(_));
                for j in batch {
                    let err = if unavailable {
                        StoreError::Unavailable(msg.clone())
                    } else {
                        StoreError::Database(msg.clone())
                    };
                    let _ = j.reply.send(Err(err));
                }
            }
        }
    }
}

enum Final {
    Put { seq: i64, device: String, rate: f32, samples: i64, updated: i64 },
    Update { device: String, rate: f32, extra: i64, updated: i64 },
    Remove { device: String },
}

/// Moves up to `batch` intake rows into `patterns`; returns how many it consumed.
async fn merge_once(pool: &PgPool, batch: i64) -> Result<usize, StoreError> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(MERGE_LOCK)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    if !locked {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT seq, device_id, op, pattern_id, success_rate, sample_count, updated_at_ms
         FROM pattern_intake ORDER BY seq LIMIT $1",
    )
    .bind(batch)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let generation: i64 = sqlx::query_scalar("SELECT nextval('pattern_index_gen')")
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    // Each device's operations on an id fold into one final operation per (id, device), in
    // seq order. Devices are kept apart: another device's removal or update of an id it does
    // not own is a no-op (the statements below are guarded by device), and must not hide
    // the owner's own operations in the same batch.
    let mut order: Vec<(Uuid, String)> = Vec::new();
    let mut fin: HashMap<(Uuid, String), Final> = HashMap::new();
    let mut merged_seqs: Vec<i64> = Vec::with_capacity(rows.len());
    for r in &rows {
        let seq: i64 = r.try_get("seq").map_err(db_err)?;
        let device: String = r.try_get("device_id").map_err(db_err)?;
        let op: i16 = r.try_get("op").map_err(db_err)?;
        let id: Uuid = r.try_get("pattern_id").map_err(db_err)?;
        let rate: Option<f32> = r.try_get("success_rate").map_err(db_err)?;
        let samples: Option<i64> = r.try_get("sample_count").map_err(db_err)?;
        let updated: Option<i64> = r.try_get("updated_at_ms").map_err(db_err)?;
        merged_seqs.push(seq);
        let key = (id, device.clone());
        let (rate, samples, updated) =
            (rate.unwrap_or(0.0), samples.unwrap_or(0), updated.unwrap_or(0));
        let previous = fin.remove(&key);
        if previous.is_none() {
            order.push(key.clone());
        }
        let next = match (op, previous) {
            (OP_PUT, _) => Final::Put { seq, device, rate, samples, updated },
            (OP_UPDATE, _) if rate < MIN_STORED_QUALITY => Final::Remove { device },
            (OP_UPDATE, Some(Final::Put { seq, device, samples: s, .. })) => {
                Final::Put { seq, device, rate, samples: s.saturating_add(samples), updated }
            }
            (OP_UPDATE, Some(Final::Update { device, extra, .. })) => {
                Final::Update { device, rate, extra: extra.saturating_add(samples), updated }
            }
            (OP_UPDATE, Some(r @ Final::Remove { .. })) => r,
            (OP_UPDATE, None) => Final::Update { device, rate, extra: samples, updated },
            _ => Final::Remove { device },
        };
        fin.insert(key, next);
    }
    let (mut rm_id, mut rm_dev) = (Vec::new(), Vec::new());
    let (mut put_seq, mut put_rate, mut put_n, mut put_upd) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut put_id, mut put_dev) = (Vec::new(), Vec::new());
    let (mut up_id, mut up_dev, mut up_rate, mut up_extra, mut up_upd) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One insert statement cannot write an id twice: when several devices put the same id in
    // one batch, the earliest put is the one tried (an id another device owns already is
    // never overwritten, whoever tries).
    let mut first_put: HashMap<Uuid, i64> = HashMap::new();
    for (key, f) in &fin {
        if let Final::Put { seq, .. } = f {
            let e = first_put.entry(key.0).or_insert(*seq);
            *e = (*e).min(*seq);
        }
    }
    for key in order {
        let id = key.0;
        match fin.remove(&key) {
            Some(Final::Remove { device }) => {
                rm_id.push(id);
                rm_dev.push(device);
            }
            Some(Final::Put { seq, device, rate, samples, updated })
                if first_put.get(&id) == Some(&seq) =>
            {
                put_id.push(id);
                put_dev.push(device);
                put_seq.push(seq);
                put_rate.push(rate);
                put_n.push(samples);
                put_upd.push(updated);
            }
            Some(Final::Put { .. }) | None => {}
            Some(Final::Update { device, rate, extra, updated }) => {
                up_id.push(id);
                up_dev.push(device);
                up_rate.push(rate);
                up_extra.push(extra);
                up_upd.push(updated);
            }
        }
    }
    // Change in the number of rows of `patterns`, kept in `merge_state`.
    let mut added: i64 = 0;
    if !rm_id.is_empty() {
        // Each deleted row leaves a tombstone of this generation, so that processes following
        // the merge into their in-memory index see removals too (the rows themselves are gone).
        let done = sqlx::query(
            "WITH gone AS (
                 DELETE FROM patterns p USING unnest($1::uuid[], $2::text[]) AS x(id, d)
                 WHERE p.id = x.id AND p.device_id = x.d RETURNING p.id)
             INSERT INTO pattern_removals (index_seq, id) SELECT $3, id FROM gone",
        )
        .bind(&rm_id)
        .bind(&rm_dev)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        added -= done.rows_affected() as i64;
        sqlx::query(
            "DELETE FROM pattern_vectors p USING unnest($1::uuid[], $2::text[]) AS x(id, d)
             WHERE p.id = x.id AND p.device_id = x.d",
        )
        .bind(&rm_id)
        .bind(&rm_dev)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    if !put_seq.is_empty() {
        // Ids that exist already are updated (or, another device's, left alone), not added;
        // merges are serialised, so nothing adds them between this count and the insert.
        let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM patterns WHERE id = ANY($1)")
            .bind(&put_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        added += put_id.len() as i64 - existing;
        sqlx::query(
            "INSERT INTO patterns (id, device_id, content_id, embedding, success_rate,
                 sample_count, time_slot, day_type, content_type, genres, created_at_ms,
                 updated_at_ms, index_seq)
             SELECT i.pattern_id, i.device_id, i.content_id, i.embedding, x.rate, x.n,
                    i.time_slot, i.day_type, i.content_type, i.genres, i.created_at_ms, x.upd, $5
             FROM unnest($1::int8[], $2::real[], $3::int8[], $4::int8[]) AS x(seq, rate, n, upd)
             JOIN pattern_intake i ON i.seq = x.seq
             ON CONFLICT (id) DO UPDATE SET index_seq = EXCLUDED.index_seq,
                 content_id = EXCLUDED.content_id,
                 embedding = EXCLUDED.embedding, success_rate = EXCLUDED.success_rate,
                 sample_count = EXCLUDED.sample_count, time_slot = EXCLUDED.time_slot,
                 day_type = EXCLUDED.day_type, content_type = EXCLUDED.content_type,
                 genres = EXCLUDED.genres, updated_at_ms = EXCLUDED.updated_at_ms
             WHERE patterns.device_id = EXCLUDED.device_id",
        )
        .bind(&put_seq)
        .bind(&put_rate)
        .bind(&put_n)
        .bind(&put_upd)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        // A re-put id may carry a new embedding: the indexer adds it back. Only the owner's:
        // a put of another device's id changed nothing above.
        sqlx::query(
            "DELETE FROM pattern_vectors v USING unnest($1::uuid[], $2::text[]) AS x(id, d)
             WHERE v.id = x.id AND v.device_id = x.d",
        )
        .bind(&put_id)
        .bind(&put_dev)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    if !up_id.is_empty() {
        sqlx::query(
            "UPDATE patterns p SET success_rate = x.rate, sample_count = p.sample_count + x.extra,
                 updated_at_ms = x.upd, index_seq = $6
             FROM unnest($1::uuid[], $2::text[], $3::real[], $4::int8[], $5::int8[])
                  AS x(id, d, rate, extra, upd)
             WHERE p.id = x.id AND p.device_id = x.d",
        )
        .bind(&up_id)
        .bind(&up_dev)
        .bind(&up_rate)
        .bind(&up_extra)
        .bind(&up_upd)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        // No longer shareable: out of the search now; still shareable: the indexer refreshes
        // the rate (the rows were re-queued through index_seq).
        sqlx::query(
            "DELETE FROM pattern_vectors v USING unnest($1::uuid[], $2::real[]) AS x(id, rate)
             WHERE v.id = x.id AND x.rate < $3",
        )
        .bind(&up_id)
        .bind(&up_rate)
        .bind(MIN_SHARED_QUALITY)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    // Exactly the rows read above, not "every seq up to the last one": sequence values are
    // taken at insert time but become visible at commit, so a writer's row with a lower seq
    // can commit after the SELECT above and would be deleted unmerged (an acknowledged sync
    // lost). It is merged by the next batch instead.
    sqlx::query("DELETE FROM pattern_intake WHERE seq = ANY($1)")
        .bind(&merged_seqs)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    // The generation commits with the changes: a follower that reads it also sees them.
    sqlx::query("UPDATE merge_state SET patterns = patterns + $1, generation = $2 WHERE id = 1")
        .bind(added)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(rows.len())
}

/// Deletes tombstones older than [`TOMBSTONE_RETENTION`] and records the highest generation
/// deleted, so that a follower behind it knows it must reload.
async fn prune_tombstones(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query(
        "WITH gone AS (
             DELETE FROM pattern_removals
             WHERE removed_at < now() - make_interval(secs => $1) RETURNING index_seq)
         UPDATE merge_state
         SET removals_pruned_to = GREATEST(removals_pruned_to, (SELECT max(index_seq) FROM gone))
         WHERE id = 1 AND EXISTS (SELECT 1 FROM gone)",
    )
    .bind(TOMBSTONE_RETENTION.as_secs_f64())
    .execute(pool)
    .await
    .map_err(db_err)?;
    Ok(())
}

async fn merger(
    pool: PgPool,
    interval: Duration,
    batch: i64,
    memory: Option<Arc<similar_index::SimilarIndex>>,
) {
    let mut pruned = Instant::now();
    loop {
        let merged = merge_once(&pool, batch).await;
        if let (Ok(n), Some(m)) = (&merged, &memory)
            && *n > 0
        {
            m.wake();
        }
        match merged {
            Ok(n) if n as i64 >= batch => continue, // backlog: keep going
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "intake merge failed; will retry"),
        }
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            if let Err(e) = prune_tombstones(&pool).await {
                tracing::warn!(error = %e, "pruning removal tombstones failed; will retry");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Copies up to `batch` patterns written since the indexer's cursor into `pattern_vectors`
/// (the shareable ones); returns how many rows it read, `None` when another indexer runs.
async fn index_once(pool: &PgPool, batch: i64) -> Result<Option<usize>, StoreError> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(INDEX_LOCK)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    if !locked {
        return Ok(None);
    }
    let rows = sqlx::query(
        "WITH cur AS (SELECT last_seq, last_id FROM indexer_state WHERE id = 1)
         SELECT p.id, p.index_seq FROM patterns p, cur
         WHERE (p.index_seq, p.id) > (cur.last_seq, cur.last_id)
         ORDER BY p.index_seq, p.id LIMIT $1",
    )
    .bind(batch)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    let Some(last) = rows.last() else { return Ok(Some(0)) };
    let (last_id, last_seq): (Uuid, i64) =
        (last.try_get("id").map_err(db_err)?, last.try_get("index_seq").map_err(db_err)?);
    let ids =
        rows.iter().map(|r| r.try_get("id")).collect::<Result<Vec<Uuid>, _>>().map_err(db_err)?;
    sqlx::query(
        "INSERT INTO pattern_vectors (id, device_id, success_rate, embedding)
         SELECT id, device_id, success_rate, embedding FROM patterns
         WHERE id = ANY($1) AND success_rate >= $2
         ON CONFLICT (id) DO UPDATE SET success_rate = EXCLUDED.success_rate",
    )
    .bind(&ids)
    .bind(MIN_SHARED_QUALITY)
    .execute(&mut *tx)
    .await
    .map_err(db_err)?;
    sqlx::query("UPDATE indexer_state SET last_seq = $1, last_id = $2 WHERE id = 1")
        .bind(last_seq)
        .bind(last_id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(Some(rows.len()))
}

/// Duty-cycled while syncs flow: one batch, then a pause, so HNSW inserts never take a whole
/// core from syncs. With no sync written for [`IDLE_AFTER`], full batches follow each other
/// without a pause, so the backlog of a busy period drains in the next lull.
async fn indexer(pool: PgPool, interval: Duration, batch: i64, activity: Arc<Activity>) {
    loop {
        match index_once(&pool, batch).await {
            Ok(Some(n)) if n as i64 >= batch && activity.idle_for(IDLE_AFTER) => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "vector indexing failed; will retry"),
        }
        tokio::time::sleep(interval).await;
    }
}

/// Every aggregate of the latest round.
async fn read_aggregates<'e, E>(db: E) -> Result<Vec<pb::AggregatedPattern>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let rows = sqlx::query(
        "SELECT id, content_id, embedding, quality, source_devices, total_samples,
                time_slot, day_type, content_type, genres, region
         FROM global_patterns",
    )
    .fetch_all(db)
    .await
    .map_err(db_err)?;
    rows.iter()
        .map(|r| {
            let id: Uuid = r.try_get("id")?;
            let emb: Vector = r.try_get("embedding")?;
            let sources: i64 = r.try_get("source_devices")?;
            let samples: i64 = r.try_get("total_samples")?;
            Ok(pb::AggregatedPattern {
                id: id.as_bytes().to_vec(),
                content_id: r.try_get("content_id")?,
                embedding: Some(wire_embedding(&emb)),
                quality: r.try_get("quality")?,
                source_devices: u32::try_from(sources.max(0)).unwrap_or(u32::MAX),
                total_samples: samples.max(0) as u64,
                context: Some(pb::PatternContext {
                    time_slot: i32::from(r.try_get::<i16, _>("time_slot")?),
                    day_type: i32::from(r.try_get::<i16, _>("day_type")?),
                    content_type: i32::from(r.try_get::<i16, _>("content_type")?),
                    genres: r.try_get("genres")?,
                }),
                region: r.try_get("region")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db_err)
}

fn trend_from_row(row: &PgRow) -> Result<pb::TrendSignal, sqlx::Error> {
    let content: Option<String> = row.try_get("content_id")?;
    let centroid: Option<Vector> = row.try_get("centroid")?;
    let target = match (content, centroid) {
        (Some(c), _) => Some(pb::trend_signal::Target::ContentId(c)),
        (None, Some(v)) => Some(pb::trend_signal::Target::Centroid(wire_embedding(&v))),
        (None, None) => None,
    };
    Ok(pb::TrendSignal { target, score: row.try_get("score")?, region: row.try_get("region")? })
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
        let rows = sqlx::query(
            "SELECT * FROM (
               (SELECT p.id, p.content_id, p.embedding, p.success_rate, p.sample_count,
                       p.time_slot, p.day_type, p.content_type, p.genres, p.created_at_ms,
                       p.updated_at_ms, false AS aggregate, v.distance
                FROM (SELECT id, embedding <=> $1 AS distance FROM pattern_vectors
                      WHERE device_id <> $2 AND success_rate >= $3
                      ORDER BY embedding <=> $1 LIMIT $4) v
                JOIN patterns p ON p.id = v.id
                WHERE p.success_rate >= $3)
               UNION ALL
               (SELECT g.id, g.content_id, g.embedding, g.quality AS success_rate,
                       LEAST(g.total_samples, 4294967295) AS sample_count, g.time_slot,
                       g.day_type, g.content_type, g.genres,
                       (extract(epoch FROM s.published_at) * 1000)::bigint AS created_at_ms,
                       (extract(epoch FROM s.published_at) * 1000)::bigint AS updated_at_ms,
                       true AS aggregate, g.embedding <=> $1 AS distance
                FROM global_patterns g, global_state s
                WHERE g.quality >= $3 AND g.content_id <> '' AND s.id = 1
                ORDER BY g.embedding <=> $1 LIMIT $4)
             ) s ORDER BY distance LIMIT $4",
        )
        .bind(&query)
        .bind(&q.device_id)
        .bind(q.min_quality)
        .bind(q.limit as i64)
        .fetch_all(self.reader())
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let distance: f64 = r.try_get("distance")?;
                Ok(SimilarPattern {
                    pattern: row_pattern(r)?,
                    aggregate: r.try_get("aggregate")?,
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
        let mut tx = self.primary.begin().await.map_err(db_err)?;
        let fresh: Option<String> = sqlx::query_scalar(
            "INSERT INTO published_rounds (round_id, global_version) VALUES ($1, 0)
             ON CONFLICT (round_id) DO NOTHING RETURNING round_id",
        )
        .bind(&p.round_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let current: i64 =
            sqlx::query_scalar("SELECT global_version FROM global_state WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
        if fresh.is_none() {
            tx.rollback().await.map_err(db_err)?;
            return Ok(Published { applied: false, global_version: current as u64 });
        }
        let version = (p.global_version as i64).max(current + 1);
        sqlx::query("UPDATE published_rounds SET global_version = $2 WHERE round_id = $1")
            .bind(&p.round_id)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query("DELETE FROM global_patterns").execute(&mut *tx).await.map_err(db_err)?;
        sqlx::query("DELETE FROM trends").execute(&mut *tx).await.map_err(db_err)?;
        let mut a_id = Vec::new();
        let mut a_content = Vec::new();
        let mut a_emb = Vec::new();
        let mut a_q = Vec::new();
        let mut a_src = Vec::new();
        let mut a_n = Vec::new();
        let (mut a_slot, mut a_day, mut a_ct) = (Vec::new(), Vec::new(), Vec::new());
        let mut a_genres = Vec::new();
        let mut a_region = Vec::new();
        for a in &p.patterns {
            let (Ok(id), Some(e)) = (Uuid::from_slice(&a.id), a.embedding.as_ref()) else {
                continue;
            };
            let c = a.context.as_ref();
            a_id.push(id);
            a_content.push(a.content_id.clone());
            a_emb.push(Vector::from(QuantizedVector::from_bytes(&e.values, e.scale).dequantize()));
            a_q.push(a.quality);
            a_src.push(i64::from(a.source_devices));
            a_n.push(a.total_samples.min(i64::MAX as u64) as i64);
            a_slot.push(c.map_or(0, |c| c.time_slot) as i16);
            a_day.push(c.map_or(0, |c| c.day_type) as i16);
            a_ct.push(c.map_or(0, |c| c.content_type) as i16);
            a_genres.push(genres_json(c));
            a_region.push(a.region.clone());
        }
        sqlx::query(
            "INSERT INTO global_patterns (id, content_id, embedding, quality, source_devices,
                 total_samples, time_slot, day_type, content_type, genres, region)
             SELECT id, c, e, q, s, n, ts, dt, ct, ARRAY(SELECT jsonb_array_elements_text(g::jsonb)), r
             FROM unnest($1::uuid[], $2::text[], $3::vector[], $4::real[], $5::int8[],
                         $6::int8[], $7::int2[], $8::int2[], $9::int2[], $10::text[], $11::text[])
                  AS x(id, c, e, q, s, n, ts, dt, ct, g, r)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&a_id)
        .bind(&a_content)
        .bind(&a_emb)
        .bind(&a_q)
        .bind(&a_src)
        .bind(&a_n)
        .bind(&a_slot)
        .bind(&a_day)
        .bind(&a_ct)
        .bind(&a_genres)
        .bind(&a_region)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let mut trends = p.trends.clone();
        trends.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut t_pos = Vec::new();
        let mut t_content: Vec<Option<String>> = Vec::new();
        let mut t_centroid: Vec<Option<Vector>> = Vec::new();
        let mut t_score = Vec::new();
        let mut t_region = Vec::new();
        for (i, t) in trends.iter().enumerate() {
            let (c, v) = match &t.target {
                Some(pb::trend_signal::Target::ContentId(c)) => (Some(c.clone()), None),
                Some(pb::trend_signal::Target::Centroid(e)) => (
                    None,
                    Some(Vector::from(
                        QuantizedVector::from_bytes(&e.values, e.scale).dequantize(),
                    )),
                ),
                None => continue,
            };
            t_pos.push(i as i32);
            t_content.push(c);
            t_centroid.push(v);
            t_score.push(t.score);
            t_region.push(t.region.clone());
        }
        sqlx::query(
            "INSERT INTO trends (position, content_id, centroid, score, region)
             SELECT * FROM unnest($1::int4[], $2::text[], $3::vector[], $4::real[], $5::text[])",
        )
        .bind(&t_pos)
        .bind(&t_content)
        .bind(&t_centroid)
        .bind(&t_score)
        .bind(&t_region)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        sqlx::query(
            "UPDATE global_state SET global_version = $1, round_id = $2, published_at = now()
             WHERE id = 1",
        )
        .bind(version)
        .bind(&p.round_id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        self.invalidate_global();
        if let Some(m) = &self.memory
            && let Err(e) = m.sync(&self.primary).await
        {
            // Published all the same; the follower installs the aggregates on its next step.
            tracing::warn!(error = %e, "could not load the published aggregates into memory yet");
        }
        Ok(Published { applied: true, global_version: version as u64 })
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
