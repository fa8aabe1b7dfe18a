//! The Postgres store's in-process similarity index (`SIMILAR_INDEX=memory`, the default).
//!
//! pgvector's HNSW index missed the 10 ms p99 target at 1,000,000 patterns on this machine
//! (20 ms with the index in 8 GB of shared buffers, 105 ms when it does not fit), took 39
//! minutes to build, and inserting into it is the slow step every new pattern waits for
//! (docs/benchmarks.md). So every server process keeps its own index of the shareable patterns
//! (success >= [`MIN_SHARED_QUALITY`]) in memory: the shared inverted-file [`Ann`] over int8
//! vectors, plus what a `similar` answer needs of each pattern (its wire form without id and
//! embedding, prost-encoded, ~60 bytes), and the latest round's aggregates. Postgres stays the
//! source of truth; this is a cache, rebuilt at every start.
//!
//! **Load.** Centroids are trained on a block sample of the table (k-means, so the lists stay
//! balanced whatever order the rows come in), then every shareable pattern is streamed from one
//! `REPEATABLE READ` snapshot, decoded on the async task while a builder thread assigns each
//! to its list (the two halves of the work overlap on two cores). The snapshot's merge
//! generation becomes the follow cursor. `/ready` is false until the load ends; `similar`
//! answers `UNAVAILABLE` meanwhile (the sync itself succeeds, without `similar`).
//!
//! **Retraining.** Centroids trained at start fit the data of that moment; a server started on
//! an empty or small table begins with the first vectors inserted as centroids, which find
//! about half of the true neighbours on clustered data where trained ones find nine in ten
//! (docs/benchmarks.md). So the index is rebuilt when it has outgrown its centroids, by the
//! same rule as the embedded store's ([`ann::retrain_due`]): once it is large enough to train
//! on, then each time it has taken in [`ann::GROWTH`]` - 1` times as many new patterns as its
//! centroids saw. A rebuild is a load into a *new* index on its own database session, while
//! the old one keeps serving and following; then, holding the step lock (so the old index's
//! follower pauses), the new index is caught up from its snapshot's generation to the latest
//! merge and swapped in. Queries never see an older state than before the swap, and the
//! follower resumes from the new index's cursor. Memory holds both indexes for the duration.
//!
//! **Follow.** Every change to `patterns` is made by the merge, one generation per merge
//! transaction, and merges are serialised (advisory lock), so generations commit in order:
//! rows it writes carry `index_seq = generation`, rows it deletes leave a tombstone in
//! `pattern_removals` with that generation, and `merge_state.generation` is the last committed
//! one. A follow step reads, in one snapshot, the tombstones and then the rows of the
//! generations after its cursor, and applies them in that order (a removal followed by a
//! re-put of the same id in the range ends with the row; the reverse order with no row, only a
//! tombstone). It runs right after this process's own merge (woken), and every
//! `MERGE_INTERVAL_MS` (at most a second) for what other processes merged, so a pattern is
//! searchable within about two merge intervals of its sync on every replica. Tombstones are kept for
//! [`super::TOMBSTONE_RETENTION`]; a process that fell further behind (a long outage) reloads.

use super::pool::db_err;
use super::rows::row_pattern;
use crate::store::ann::{
    self, Ann, IndexInfo, NO_OWNER, SAMPLE_PER_LIST, TRAIN_ITERATIONS, TRAIN_MIN_PER_LIST,
};
use crate::store::{SimilarPattern, SimilarQuery, StoreError, aggregate_pattern};
use futures::TryStreamExt;
use omega_protocol::pb;
use omega_protocol::validate::MIN_SHARED_QUALITY;
use omega_protocol::vector::{QuantizedVector, quantize};
use pgvector::Vector;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Postgres, Row, Transaction};
use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, Notify};
use uuid::Uuid;

/// Rows read per page while following (bounds the memory of a long catch-up).
const FOLLOW_PAGE: i64 = 10_000;
/// Rows handed to the builder thread at a time while loading.
const LOAD_CHUNK: usize = 2048;

/// What the index keeps of a pattern besides its vector: nothing, since `similar` serves
/// only aggregates; the patterns' index keeps the load, follow and retraining machinery
/// (and `/ready`) working until it is retired.
#[derive(Debug)]
struct Meta;

/// A pattern read from Postgres, ready to insert.
struct Prepared {
    id: Uuid,
    device: String,
    values: Vec<i8>,
    scale: f32,
    meta: Meta,
    list: Option<usize>,
}

/// A row of a follow step: a shareable pattern to (re)insert, or one to drop.
enum Change {
    Put(Prepared),
    Drop(Uuid),
}

/// The latest round's aggregates.
#[derive(Debug)]
struct Aggregates {
    version: i64,
    published_ms: i64,
    all: Vec<pb::AggregatedPattern>,
    /// Servable ones (a content id and an embedding), payload = index into `all`.
    ann: Ann<usize>,
}

impl Aggregates {
    fn empty() -> Self {
        // A few thousand at most: one list, scanned whole.
        Aggregates { version: 0, published_ms: 0, all: Vec::new(), ann: Ann::new(1, 1) }
    }
}

#[derive(Debug)]
struct Index {
    patterns: Ann<Meta>,
    /// Device id -> owner number in `patterns` (never shrinks; one entry per device that
    /// ever had a shareable pattern since the load).
    owners: HashMap<Box<str>, u32>,
    /// Last merge generation applied.
    cursor: i64,
    aggregates: Aggregates,
    /// Patterns the centroids were trained on (0: the first ones inserted).
    trained_on: usize,
    /// New patterns indexed since the build.
    added_since: usize,
}

impl Index {
    fn empty(lists: usize, probes: usize, centroids: &[QuantizedVector]) -> Self {
        Index {
            patterns: Ann::seeded(centroids, lists, probes),
            owners: HashMap::new(),
            cursor: 0,
            aggregates: Aggregates::empty(),
            trained_on: 0,
            added_since: 0,
        }
    }

    fn owner(&mut self, device: &str) -> u32 {
        if let Some(&o) = self.owners.get(device) {
            return o;
        }
        // NO_OWNER marks aggregates; MAX_DEVICES is validated below it.
        let o = (self.owners.len() as u32).min(NO_OWNER - 1);
        self.owners.insert(device.into(), o);
        o
    }

    fn put(&mut self, p: Prepared) {
        if !self.patterns.contains(&p.id) {
            self.added_since += 1;
        }
        let owner = self.owner(&p.device);
        self.patterns.insert_into(p.id, owner, &p.values, p.scale, p.meta, p.list);
    }
}

/// Why a follow step could not apply the changes.
enum FollowError {
    /// Tombstones this process needs were pruned: only a reload is correct.
    TooFarBehind,
    Store(StoreError),
}

impl From<StoreError> for FollowError {
    fn from(e: StoreError) -> Self {
        FollowError::Store(e)
    }
}

/// The in-process similarity index of one server process.
#[derive(Debug)]
pub(super) struct SimilarIndex {
    lists: usize,
    probes: usize,
    state: RwLock<Index>,
    /// Serialises loads and follow steps: two steps reading overlapping ranges from different
    /// snapshots could apply an older row after a newer tombstone.
    step: Mutex<()>,
    loaded: AtomicBool,
    /// Rows read by the load in progress (for `/ready`'s message).
    loading_rows: AtomicU64,
    /// Copy of `Index::cursor` for lock-free reads (counts).
    cursor: AtomicI64,
    wake: Notify,
    /// True while a retraining rebuild runs.
    rebuilding: AtomicBool,
    /// Retraining rebuilds swapped in since start.
    rebuilds: AtomicU64,
    /// Changed rows applied to rebuilt indexes between their snapshot and the swap.
    caught_up: AtomicU64,
}

/// What a build read.
struct Built {
    index: Index,
    patterns: u64,
    trained: usize,
    train_secs: f64,
    started: Instant,
}

/// Clears the rebuilding flag however a rebuild ends.
struct Rebuilding<'a>(&'a AtomicBool);

impl Drop for Rebuilding<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Pause after a failed retraining rebuild before the next attempt (doubling up to
/// [`RETRAIN_RETRY_MAX`]).
const RETRAIN_RETRY_MIN: Duration = Duration::from_secs(30);
const RETRAIN_RETRY_MAX: Duration = Duration::from_secs(600);

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Unavailable("similarity index lock poisoned by a panic".into())
}

fn prepare(row: &PgRow) -> Result<Prepared, StoreError> {
    let mut p = row_pattern(row).map_err(db_err)?;
    let id: Uuid = row.try_get("id").map_err(db_err)?;
    let device: String = row.try_get("device_id").map_err(db_err)?;
    let e = p.embedding.take().unwrap_or_default();
    p.id.clear();
    Ok(Prepared {
        id,
        device,
        values: ann::to_i8(&e.values),
        scale: e.scale,
        meta: Meta,
        list: None,
    })
}

const PATTERN_COLUMNS: &str = "id, device_id, content_id, embedding, success_rate, sample_count,
     time_slot, day_type, content_type, genres, created_at_ms, updated_at_ms";

async fn snapshot(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    Ok(tx)
}

/// The aggregates of the latest round, from `tx`'s snapshot.
async fn read_aggregates(tx: &mut Transaction<'_, Postgres>) -> Result<Aggregates, StoreError> {
    let row = sqlx::query(
        "SELECT global_version,
                COALESCE((extract(epoch FROM published_at) * 1000)::bigint, 0) AS published_ms
         FROM global_state WHERE id = 1",
    )
    .fetch_one(&mut **tx)
    .await
    .map_err(db_err)?;
    let all = super::publish::read_aggregates(&mut **tx).await?;
    let mut ann = Aggregates::empty().ann;
    for (i, a) in all.iter().enumerate() {
        if let Some(e) = a.embedding.as_ref().filter(|_| !a.content_id.is_empty())
            && let Ok(id) = Uuid::from_slice(&a.id)
        {
            ann.insert(id, NO_OWNER, &ann::to_i8(&e.values), e.scale, i);
        }
    }
    Ok(Aggregates {
        version: row.try_get("global_version").map_err(db_err)?,
        published_ms: row.try_get("published_ms").map_err(db_err)?,
        all,
        ann,
    })
}

impl SimilarIndex {
    pub(super) fn new(lists: usize, probes: usize) -> Self {
        SimilarIndex {
            lists,
            probes,
            state: RwLock::new(Index::empty(lists, probes, &[])),
            step: Mutex::new(()),
            loaded: AtomicBool::new(false),
            loading_rows: AtomicU64::new(0),
            cursor: AtomicI64::new(0),
            wake: Notify::new(),
            rebuilding: AtomicBool::new(false),
            rebuilds: AtomicU64::new(0),
            caught_up: AtomicU64::new(0),
        }
    }

    /// What the index is doing; `None` before the first load.
    pub(super) fn info(&self) -> Result<Option<IndexInfo>, StoreError> {
        if !self.loaded.load(Ordering::Acquire) {
            return Ok(None);
        }
        let st = self.state.read().map_err(poisoned)?;
        Ok(Some(IndexInfo {
            indexed: st.patterns.len(),
            lists: st.patterns.lists(),
            trained_on: st.trained_on,
            added_since: st.added_since,
            rebuilding: self.rebuilding.load(Ordering::Acquire),
            rebuilds: self.rebuilds.load(Ordering::Relaxed),
            caught_up: self.caught_up.load(Ordering::Relaxed),
        }))
    }

    /// True when the index has outgrown its centroids ([`ann::retrain_due`]).
    fn retrain_due(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
            && self.state.read().is_ok_and(|st| {
                ann::retrain_due(st.patterns.len(), self.lists, st.trained_on, st.added_since)
            })
    }

    /// Asks the follower for a step now (after a merge in this process).
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Ok once the first load is done.
    pub(super) fn check_loaded(&self) -> Result<(), StoreError> {
        if self.loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(StoreError::Unavailable(format!(
            "the similarity index is loading ({} patterns read so far)",
            self.loading_rows.load(Ordering::Relaxed)
        )))
    }

    /// The merge generation applied, `None` before the first load.
    pub(super) fn cursor(&self) -> Option<i64> {
        self.loaded.load(Ordering::Acquire).then(|| self.cursor.load(Ordering::Acquire))
    }

    /// The aggregates held (after [`SimilarIndex::sync`]), `None` before the first load.
    pub(super) fn aggregates(&self) -> Result<Option<Vec<pb::AggregatedPattern>>, StoreError> {
        if !self.loaded.load(Ordering::Acquire) {
            return Ok(None);
        }
        Ok(Some(self.state.read().map_err(poisoned)?.aggregates.all.clone()))
    }

    /// Nearest servable aggregates with at least `min_sources` devices (devices' patterns are
    /// never served).
    pub(super) fn similar(&self, q: &SimilarQuery) -> Result<Vec<SimilarPattern>, StoreError> {
        self.check_loaded()?;
        let Some(unit) = crate::store::unit(&q.interest) else { return Ok(Vec::new()) };
        let qv = quantize(&unit);
        let st = self.state.read().map_err(poisoned)?;
        let aggs = &st.aggregates;
        let (min, k) = (q.min_quality, q.min_sources);
        let hits = aggs.ann.search_by(&qv.values, q.limit, |_, &i| {
            aggs.all.get(i).is_some_and(|a| a.quality >= min && a.source_devices >= k)
        });
        Ok(hits
            .iter()
            .filter_map(|h| {
                let a = aggs.all.get(*aggs.ann.get(&h.key)?.payload)?;
                Some(SimilarPattern {
                    pattern: aggregate_pattern(a, aggs.published_ms),
                    sources: a.source_devices,
                    score: h.score,
                })
            })
            .collect())
    }

    /// Rebuilds the whole index from the database (the others keep serving the old one
    /// meanwhile, if any).
    pub(super) async fn load(&self, pool: &PgPool) -> Result<(), StoreError> {
        let _step = self.step.lock().await;
        self.load_locked(pool).await
    }

    async fn load_locked(&self, pool: &PgPool) -> Result<(), StoreError> {
        let built = self.build(pool).await?;
        let (cursor, lists_used) = (built.index.cursor, built.index.patterns.lists());
        *self.state.write().map_err(poisoned)? = built.index;
        self.cursor.store(cursor, Ordering::Release);
        self.loaded.store(true, Ordering::Release);
        tracing::info!(
            patterns = built.patterns,
            generation = cursor,
            lists = lists_used,
            trained_centroids = built.trained,
            train_secs = built.train_secs,
            secs = built.started.elapsed().as_secs_f64(),
            "similarity index loaded"
        );
        Ok(())
    }

    /// A new index of the shareable patterns of one database snapshot, with centroids trained
    /// on a sample; `self.state` is not touched.
    async fn build(&self, pool: &PgPool) -> Result<Built, StoreError> {
        let started = Instant::now();
        self.loading_rows.store(0, Ordering::Relaxed);
        let centroids = self.train(pool).await?;
        let (trained, train_secs) = (centroids.len(), started.elapsed().as_secs_f64());
        let (tx_rows, mut rx_rows) = tokio::sync::mpsc::channel::<Vec<Prepared>>(4);
        let (lists, probes) = (self.lists, self.probes);
        // The builder owns the new index: assigning a vector to its list (O(lists)) is the
        // expensive half of the load and runs here while the async side decodes rows.
        let builder =
            std::thread::Builder::new().name("omega-similar-load".into()).spawn(move || {
                let mut index = Index::empty(lists, probes, &centroids);
                while let Some(chunk) = rx_rows.blocking_recv() {
                    for p in chunk {
                        index.put(p);
                    }
                }
                index.patterns.shrink_to_fit();
                index
            })?;
        let read = async {
            let mut tx = snapshot(pool).await?;
            let cursor: i64 = sqlx::query_scalar("SELECT generation FROM merge_state WHERE id = 1")
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
            let aggregates = read_aggregates(&mut tx).await?;
            let sql = format!(
                "SELECT {PATTERN_COLUMNS} FROM patterns WHERE success_rate >= $1 AND embedding IS NOT NULL"
            );
            let mut rows = sqlx::query(&sql).bind(MIN_SHARED_QUALITY).fetch(&mut *tx);
            let mut chunk = Vec::with_capacity(LOAD_CHUNK);
            let mut n = 0u64;
            while let Some(row) = rows.try_next().await.map_err(db_err)? {
                chunk.push(prepare(&row)?);
                n += 1;
                if chunk.len() == LOAD_CHUNK {
                    self.loading_rows.store(n, Ordering::Relaxed);
                    if n % 200_000 < LOAD_CHUNK as u64 {
                        tracing::info!(patterns = n, "loading the similarity index");
                    }
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(LOAD_CHUNK));
                    tx_rows.send(full).await.map_err(|_| builder_stopped())?;
                }
            }
            drop(rows);
            tx_rows.send(chunk).await.map_err(|_| builder_stopped())?;
            drop(tx_rows);
            tx.commit().await.map_err(db_err)?;
            Ok::<_, StoreError>((cursor, aggregates, n))
        };
        let (cursor, aggregates, n) = read.await?;
        let mut index = tokio::task::spawn_blocking(move || builder.join())
            .await
            .map_err(|_| builder_stopped())?
            .map_err(|_| builder_stopped())?;
        index.cursor = cursor;
        index.aggregates = aggregates;
        // Untrained only when the table was too small to train on: the index then retrains
        // once it has grown enough. (Counted as trained otherwise, even if the sample came
        // back empty, so a failed sample cannot make every follow step rebuild.)
        let untrained = trained == 0 && (n as usize) < self.lists * TRAIN_MIN_PER_LIST;
        index.trained_on = if untrained { 0 } else { (n as usize).max(1) };
        index.added_since = 0;
        Ok(Built { index, patterns: n, trained, train_secs, started })
    }

    /// Rebuilds the index with freshly trained centroids while the old one keeps serving and
    /// following, then catches the new one up and swaps it in (module doc). `bulk` is a
    /// session of its own: the long snapshot read must not hold up the follower's.
    async fn retrain(&self, bulk: &PgPool) -> Result<(), StoreError> {
        self.rebuilding.store(true, Ordering::Release);
        let _flag = Rebuilding(&self.rebuilding);
        let (before, old_trained_on) = {
            let st = self.state.read().map_err(poisoned)?;
            (st.patterns.len(), st.trained_on)
        };
        let built = self.build(bulk).await?;
        let (trained, read) = (built.trained, built.patterns);
        let fresh = RwLock::new(built.index);
        let _step = self.step.lock().await;
        let caught_up = match self.follow(bulk, &fresh).await {
            Ok(applied) => applied,
            Err(FollowError::Store(e)) => return Err(e),
            Err(FollowError::TooFarBehind) => {
                return Err(StoreError::Unavailable(
                    "tombstones were pruned while the similarity index was rebuilt".into(),
                ));
            }
        };
        let fresh = fresh.into_inner().map_err(poisoned)?;
        let (cursor, indexed, trained_on) = (fresh.cursor, fresh.patterns.len(), fresh.trained_on);
        let old = std::mem::replace(&mut *self.state.write().map_err(poisoned)?, fresh);
        self.cursor.store(cursor, Ordering::Release);
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
        self.caught_up.fetch_add(caught_up as u64, Ordering::Relaxed);
        drop(old);
        tracing::info!(
            before,
            old_trained_on,
            read,
            caught_up,
            indexed,
            trained_on,
            trained_centroids = trained,
            generation = cursor,
            secs = built.started.elapsed().as_secs_f64(),
            "similarity index rebuilt with retrained centroids"
        );
        Ok(())
    }

    /// Centroids trained on a block sample of the shareable patterns; none (the index grows
    /// its own) when the table is small.
    async fn train(&self, pool: &PgPool) -> Result<Vec<QuantizedVector>, StoreError> {
        let stored: i64 = sqlx::query_scalar("SELECT patterns FROM merge_state WHERE id = 1")
            .fetch_one(pool)
            .await
            .map_err(db_err)?;
        if (stored.max(0) as u64) < (self.lists * TRAIN_MIN_PER_LIST) as u64 {
            return Ok(Vec::new());
        }
        let want = self.lists * SAMPLE_PER_LIST;
        // Twice the rows wanted, in block units: some rows are below the shareable rate.
        let percent = (200.0 * want as f64 / stored as f64).clamp(0.0001, 100.0);
        let sample: Vec<Vector> = sqlx::query_scalar(
            "SELECT embedding FROM patterns TABLESAMPLE SYSTEM ($1::float8)
             WHERE success_rate >= $2 AND embedding IS NOT NULL LIMIT $3",
        )
        .bind(percent)
        .bind(MIN_SHARED_QUALITY)
        .bind(want as i64)
        .fetch_all(pool)
        .await
        .map_err(db_err)?;
        let lists = self.lists;
        tokio::task::spawn_blocking(move || {
            let sample: Vec<Vec<f32>> =
                sample.into_iter().filter_map(|v| crate::store::unit(v.as_slice())).collect();
            ann::train_centroids(&sample, lists, TRAIN_ITERATIONS)
        })
        .await
        .map_err(|_| builder_stopped())
    }

    /// Applies what was merged since the cursor (reloading when that is no longer possible);
    /// a no-op before the first load. On return the index reflects at least every merge
    /// committed before the call.
    pub(super) async fn sync(&self, pool: &PgPool) -> Result<(), StoreError> {
        let _step = self.step.lock().await;
        if !self.loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.follow(pool, &self.state).await {
            Ok(_) => {
                let cursor = self.state.read().map_err(poisoned)?.cursor;
                self.cursor.store(cursor, Ordering::Release);
                Ok(())
            }
            Err(FollowError::Store(e)) => Err(e),
            Err(FollowError::TooFarBehind) => {
                tracing::warn!(
                    "tombstones the similarity index needs were pruned (it fell behind); reloading"
                );
                self.load_locked(pool).await
            }
        }
    }

    /// Applies to `target` what was merged after its cursor; returns the rows applied. The
    /// caller holds the step lock.
    async fn follow(&self, pool: &PgPool, target: &RwLock<Index>) -> Result<usize, FollowError> {
        let (cursor, version) = {
            let st = target.read().map_err(poisoned)?;
            (st.cursor, st.aggregates.version)
        };
        // Cheap check first: most steps find nothing new.
        let row = sqlx::query(
            "SELECT m.generation, m.removals_pruned_to, s.global_version
             FROM merge_state m, global_state s WHERE m.id = 1 AND s.id = 1",
        )
        .fetch_one(pool)
        .await
        .map_err(db_err)?;
        let generation: i64 = row.try_get("generation").map_err(db_err)?;
        let global: i64 = row.try_get("global_version").map_err(db_err)?;
        if generation == cursor && global == version {
            return Ok(0);
        }
        let mut tx = snapshot(pool).await?;
        let row = sqlx::query(
            "SELECT m.generation, m.removals_pruned_to, s.global_version
             FROM merge_state m, global_state s WHERE m.id = 1 AND s.id = 1",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
        let generation: i64 = row.try_get("generation").map_err(db_err)?;
        if row.try_get::<i64, _>("removals_pruned_to").map_err(db_err)? > cursor {
            return Err(FollowError::TooFarBehind);
        }
        let aggregates = if row.try_get::<i64, _>("global_version").map_err(db_err)? != version {
            Some(read_aggregates(&mut tx).await?)
        } else {
            None
        };
        let mut applied = 0;
        if generation != cursor {
            let gone: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM pattern_removals WHERE index_seq > $1 AND index_seq <= $2",
            )
            .bind(cursor)
            .bind(generation)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            {
                let mut st = target.write().map_err(poisoned)?;
                for id in &gone {
                    st.patterns.remove(id);
                }
            }
            applied += gone.len();
            let sql = format!(
                "SELECT index_seq, success_rate >= $3 AND embedding IS NOT NULL AS shareable,
                        {PATTERN_COLUMNS}
                 FROM patterns
                 WHERE (index_seq, id) > ($1, $4) AND index_seq <= $2
                 ORDER BY index_seq, id LIMIT $5"
            );
            let mut after = (cursor, Uuid::nil());
            loop {
                let rows = sqlx::query(&sql)
                    .bind(after.0)
                    .bind(generation)
                    .bind(MIN_SHARED_QUALITY)
                    .bind(after.1)
                    .bind(FOLLOW_PAGE)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_err)?;
                let Some(last) = rows.last() else { break };
                after = (
                    last.try_get("index_seq").map_err(db_err)?,
                    last.try_get("id").map_err(db_err)?,
                );
                self.apply(target, &rows)?;
                applied += rows.len();
                if (rows.len() as i64) < FOLLOW_PAGE {
                    break;
                }
            }
        }
        tx.commit().await.map_err(db_err)?;
        let mut st = target.write().map_err(poisoned)?;
        st.cursor = generation;
        if let Some(a) = aggregates {
            st.aggregates = a;
        }
        Ok(applied)
    }

    /// Applies one page of changed rows: decoding and list assignment outside the write lock,
    /// so queries wait only for the O(1) inserts.
    fn apply(&self, target: &RwLock<Index>, rows: &[PgRow]) -> Result<(), StoreError> {
        let mut changes = Vec::with_capacity(rows.len());
        for r in rows {
            if r.try_get::<bool, _>("shareable").map_err(db_err)? {
                changes.push(Change::Put(prepare(r)?));
            } else {
                changes.push(Change::Drop(r.try_get("id").map_err(db_err)?));
            }
        }
        {
            let st = target.read().map_err(poisoned)?;
            for c in &mut changes {
                if let Change::Put(p) = c {
                    p.list = st.patterns.nearest_list(&p.values);
                }
            }
        }
        let mut st = target.write().map_err(poisoned)?;
        for c in changes {
            match c {
                Change::Put(p) => st.put(p),
                Change::Drop(id) => {
                    st.patterns.remove(&id);
                }
            }
        }
        Ok(())
    }

    /// The background task: loads (retrying while the database is unreachable), then
    /// follows, woken by this process's merges and at least every `interval`, and rebuilds
    /// with retrained centroids when the index has outgrown them. The load and the rebuilds
    /// read on `bulk`, a session of their own, so a rebuild never holds up the follower's.
    pub(super) async fn run(&self, pool: PgPool, bulk: PgPool, interval: Duration) {
        let mut backoff = Duration::from_millis(200);
        while !self.loaded.load(Ordering::Acquire) {
            match self.load(&bulk).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "loading the similarity index failed; will retry");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        tokio::join!(self.follow_loop(&pool, interval), self.retrain_loop(&bulk, interval));
    }

    async fn follow_loop(&self, pool: &PgPool, interval: Duration) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.sync(pool).await {
                tracing::warn!(error = %e, "following the merge into the similarity index failed; will retry");
            }
        }
    }

    /// Checks every `interval` whether a rebuild is due (a read lock and two compares).
    async fn retrain_loop(&self, pool: &PgPool, interval: Duration) {
        let mut pause = RETRAIN_RETRY_MIN;
        loop {
            tokio::time::sleep(interval).await;
            if !self.retrain_due() {
                continue;
            }
            match self.retrain(pool).await {
                Ok(()) => pause = RETRAIN_RETRY_MIN,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_secs = pause.as_secs(),
                        "rebuilding the similarity index failed; keeping the old one");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRAIN_RETRY_MAX);
                }
            }
        }
    }
}

fn builder_stopped() -> StoreError {
    StoreError::Unavailable("the similarity index builder stopped".into())
}
