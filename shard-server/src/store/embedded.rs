//! The embedded store: all state in memory, made durable by a write-ahead log with group
//! commit and periodic snapshots under `DATA_DIR/embedded/` ([`wal`]), searched with an
//! in-process inverted-file index ([`super::ann`]) whose centroids are trained on the data at
//! open and retrained in the background as it grows ([`index`]).
//!
//! Every change is a [`wal::Record`] applied by one deterministic function, [`State::apply`],
//! both live and when replaying the log at start, so what is recovered is exactly what was
//! served. A change is applied in memory and queued for the log under the same write lock (so
//! the log order is the apply order); the caller is answered only after the writer thread has
//! `fdatasync`ed it. Throughput comes from group commit: one fsync covers every sync that
//! arrived while the previous one ran.
//!
//! Compaction: when the log passes `WAL_COMPACT_MB`, the writer serialises the state under a
//! read lock (writes wait; about a second per million patterns), starts log generation N+1,
//! writes `snapshot-N+1` atomically and deletes generation N. Recovery loads the newest
//! snapshot and replays every log of that generation or later.

mod index;
pub mod wal;

pub use crate::store::ann::{GROWTH, IndexInfo};

use super::ann::NO_OWNER;
use super::{
    Counts, ExportItem, ExportPage, GlobalState, MAX_DEVICE_CONTENTS, Publish, Published,
    Registered, SimilarPattern, SimilarQuery, Store, StoreError, StoreOptions, SyncApplied,
    SyncWrite,
};
use async_trait::async_trait;
use omega_protocol::pb;
use omega_protocol::validate::{MIN_SHARED_QUALITY, MIN_STORED_QUALITY};
use omega_protocol::vector::EMBEDDING_DIM;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, mpsc};
use tokio::sync::oneshot;
use uuid::Uuid;
use wal::{Kind, Record};

#[derive(Debug, Clone)]
struct Device {
    idx: u32,
    region: String,
    local_version: u64,
    interest: Option<Vec<f32>>,
    registered_ms: i64,
    last_sync_ms: i64,
}

#[derive(Debug, Clone)]
struct Stored {
    owner: u32,
    pattern: pb::Pattern,
}

/// Everything the embedded store knows.
#[derive(Debug)]
pub struct State {
    devices: HashMap<String, Device>,
    names: Vec<String>,
    patterns: BTreeMap<Uuid, Stored>,
    /// Pattern ids per owner, for [`Store::device_contents`] without a full scan.
    owned: HashMap<u32, HashSet<Uuid>>,
    aggregates: HashMap<Uuid, pb::AggregatedPattern>,
    rounds: HashSet<String>,
    global: GlobalState,
    published_ms: i64,
    index: index::Index,
}

fn uuid(bytes: &[u8]) -> Option<Uuid> {
    Uuid::from_slice(bytes).ok()
}

/// What the similarity index holds for an id, borrowed from the state.
#[derive(Debug, Clone, Copy)]
struct Indexed<'a> {
    owner: u32,
    values: &'a [u8],
    scale: f32,
}

/// What the similarity index must hold for `id`: a servable aggregate (with a content id and
/// a quality at or above the shareable rate; it wins over a device's pattern that reuses its
/// id, so no device can shadow a published aggregate), else a shareable pattern, else
/// nothing. The one definition of "indexed", used by live changes and every build alike.
/// `similar` serves only the aggregates (owner [`NO_OWNER`]); the patterns keep the index's
/// training and retraining as they were until the patterns' index is retired.
fn indexed<'a>(
    patterns: &'a BTreeMap<Uuid, Stored>,
    aggregates: &'a HashMap<Uuid, pb::AggregatedPattern>,
    id: &Uuid,
) -> Option<Indexed<'a>> {
    let aggregate = aggregates
        .get(id)
        .filter(|a| !a.content_id.is_empty() && a.quality >= MIN_SHARED_QUALITY)
        .and_then(|a| a.embedding.as_ref())
        .filter(|e| e.values.len() == EMBEDDING_DIM)
        .map(|e| Indexed { owner: NO_OWNER, values: &e.values, scale: e.scale });
    aggregate.or_else(|| {
        let s = patterns.get(id).filter(|s| s.pattern.success_rate >= MIN_SHARED_QUALITY)?;
        let e = s.pattern.embedding.as_ref().filter(|e| e.values.len() == EMBEDDING_DIM)?;
        Some(Indexed { owner: s.owner, values: &e.values, scale: e.scale })
    })
}

impl State {
    fn new(lists: usize, probes: usize) -> Self {
        State {
            devices: HashMap::new(),
            names: Vec::new(),
            patterns: BTreeMap::new(),
            owned: HashMap::new(),
            aggregates: HashMap::new(),
            rounds: HashSet::new(),
            global: GlobalState::default(),
            published_ms: 0,
            index: index::Index::deferred(lists, probes),
        }
    }

    fn indexed(&self, id: &Uuid) -> Option<Indexed<'_>> {
        indexed(&self.patterns, &self.aggregates, id)
    }

    /// Brings the index in line with the state for `id`, after any change to it.
    fn reindex(&mut self, id: Uuid) {
        if self.index.is_deferred() {
            return;
        }
        self.index.put(id, indexed(&self.patterns, &self.aggregates, &id));
    }

    fn add_device(&mut self, id: &str, region: &str, at_ms: i64) -> &mut Device {
        let idx = self.names.len() as u32;
        if !self.devices.contains_key(id) {
            self.names.push(id.to_owned());
        }
        self.devices.entry(id.to_owned()).or_insert_with(|| Device {
            idx,
            region: region.to_owned(),
            local_version: 0,
            interest: None,
            registered_ms: at_ms,
            last_sync_ms: 0,
        })
    }

    fn put_pattern(&mut self, owner: u32, p: pb::Pattern) {
        let Some(id) = uuid(&p.id) else { return };
        if self.patterns.get(&id).is_some_and(|s| s.owner != owner) {
            return; // another device's id: never overwritten
        }
        self.owned.entry(owner).or_default().insert(id);
        self.patterns.insert(id, Stored { owner, pattern: p });
        self.reindex(id);
    }

    fn drop_pattern(&mut self, id: &Uuid, owner: u32) {
        self.patterns.remove(id);
        self.reindex(*id);
        if let Some(ids) = self.owned.get_mut(&owner) {
            ids.remove(id);
            if ids.is_empty() {
                self.owned.remove(&owner);
            }
        }
    }

    /// Applies one record. Deterministic: live application and replay give the same state.
    pub fn apply(&mut self, rec: &Record) {
        match &rec.kind {
            Some(Kind::Register(r)) => {
                self.add_device(&r.device_id, &r.region, r.at_ms);
            }
            Some(Kind::Device(d)) => {
                let dev = self.add_device(&d.device_id, &d.region, d.registered_ms);
                dev.local_version = d.local_version;
                dev.interest = (!d.interest.is_empty()).then(|| d.interest.clone());
                dev.last_sync_ms = d.last_sync_ms;
            }
            Some(Kind::Patterns(ps)) => {
                let Some(owner) = self.devices.get(&ps.device_id).map(|d| d.idx) else { return };
                for p in &ps.patterns {
                    self.put_pattern(owner, p.clone());
                }
            }
            Some(Kind::Sync(s)) => self.apply_sync(s),
            Some(Kind::Publish(p)) => self.apply_publish(p),
            None => {}
        }
    }

    fn apply_sync(&mut self, s: &wal::SyncRec) {
        let Some(dev) = self.devices.get_mut(&s.device_id) else { return };
        dev.local_version = s.local_version;
        dev.last_sync_ms = s.at_ms;
        if !s.interest_add.is_empty() {
            match &mut dev.interest {
                Some(v) if v.len() == s.interest_add.len() => {
                    v.iter_mut().zip(&s.interest_add).for_each(|(a, b)| *a += b)
                }
                slot => *slot = Some(s.interest_add.clone()),
            }
        }
        let owner = dev.idx;
        for p in &s.added {
            self.put_pattern(owner, p.clone());
        }
        for u in &s.updated {
            let Some(id) = uuid(&u.id) else { continue };
            let Some(st) = self.patterns.get_mut(&id).filter(|st| st.owner == owner) else {
                continue;
            };
            if u.success_rate < MIN_STORED_QUALITY {
                self.drop_pattern(&id, owner);
                continue;
            }
            st.pattern.success_rate = u.success_rate;
            st.pattern.sample_count = st.pattern.sample_count.saturating_add(u.extra_samples);
            st.pattern.updated_at_ms = s.at_ms;
            self.reindex(id);
        }
        for r in &s.removed {
            let Some(id) = uuid(r) else { continue };
            if self.patterns.get(&id).is_some_and(|st| st.owner == owner) {
                self.drop_pattern(&id, owner);
            }
        }
    }

    fn apply_publish(&mut self, p: &wal::PublishRec) {
        self.rounds.insert(p.round_id.clone());
        self.rounds.extend(p.published_rounds.iter().cloned());
        // Aggregates without a content id cannot be served as patterns (a device refuses a
        // pattern without one); they still count as published (see `indexed`).
        let mut changed: Vec<Uuid> = self.aggregates.drain().map(|(id, _)| id).collect();
        for a in &p.patterns {
            let Some(id) = uuid(&a.id) else { continue };
            self.aggregates.insert(id, a.clone());
            changed.push(id);
        }
        for id in changed {
            self.reindex(id);
        }
        let mut trends = p.trends.clone();
        trends.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.global =
            GlobalState { version: p.global_version, round_id: p.round_id.clone(), trends };
    }

    /// The records that rebuild this state (a snapshot).
    fn snapshot(&self, buf: &mut Vec<u8>) {
        let mut by_owner: HashMap<u32, Vec<pb::Pattern>> = HashMap::new();
        for st in self.patterns.values() {
            by_owner.entry(st.owner).or_default().push(st.pattern.clone());
        }
        for name in &self.names {
            let Some(d) = self.devices.get(name) else { continue };
            wal::frame(
                &Record {
                    kind: Some(Kind::Device(wal::DeviceRec {
                        device_id: name.clone(),
                        region: d.region.clone(),
                        local_version: d.local_version,
                        interest: d.interest.clone().unwrap_or_default(),
                        registered_ms: d.registered_ms,
                        last_sync_ms: d.last_sync_ms,
                    })),
                },
                buf,
            );
            if let Some(ps) = by_owner.remove(&d.idx) {
                for chunk in ps.chunks(4096) {
                    wal::frame(
                        &Record {
                            kind: Some(Kind::Patterns(wal::PatternsRec {
                                device_id: name.clone(),
                                patterns: chunk.to_vec(),
                            })),
                        },
                        buf,
                    );
                }
            }
        }
        if !self.rounds.is_empty() {
            let mut aggs: Vec<_> = self.aggregates.values().cloned().collect();
            aggs.sort_by(|a, b| a.id.cmp(&b.id));
            let mut rounds: Vec<_> = self.rounds.iter().cloned().collect();
            rounds.sort();
            wal::frame(
                &Record {
                    kind: Some(Kind::Publish(wal::PublishRec {
                        round_id: self.global.round_id.clone(),
                        global_version: self.global.version,
                        patterns: aggs,
                        trends: self.global.trends.clone(),
                        published_rounds: rounds,
                    })),
                },
                buf,
            );
        }
    }
}

pub use super::aggregate_pattern;

enum Msg {
    Append(Vec<u8>, oneshot::Sender<Result<(), String>>),
    Flush(oneshot::Sender<Result<(), String>>),
}

/// The embedded store.
pub struct EmbeddedStore {
    state: Arc<RwLock<State>>,
    tx: mpsc::Sender<Msg>,
    /// Wakes the index rebuild thread.
    rebuild: mpsc::Sender<()>,
    failed: Arc<AtomicBool>,
    dir: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("dir", &self.dir).finish()
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Unavailable("embedded store lock poisoned by a panic".into())
}

impl EmbeddedStore {
    /// Opens (creating) the store under `opts.data_dir/embedded`: replays its log, then builds
    /// the similarity index with centroids trained on what was loaded.
    pub fn open(opts: &StoreOptions) -> Result<Self, StoreError> {
        let started = std::time::Instant::now();
        let dir = opts.data_dir.join("embedded");
        std::fs::create_dir_all(&dir)?;
        let mut state = State::new(opts.ann_lists, opts.ann_probes);
        let (snaps, wals) = wal::generations(&dir)?;
        let base = snaps.last().copied().unwrap_or(0);
        if base > 0 {
            let path = wal::snapshot_path(&dir, base);
            let tail = wal::read_frames(&path, |r| {
                state.apply(&r);
                Ok(())
            })?;
            if tail != wal::Tail::Clean {
                return Err(StoreError::Corrupt(format!("{} is damaged", path.display())));
            }
        }
        let (logs, stale_wals): (Vec<u64>, Vec<u64>) = wals.into_iter().partition(|&n| n >= base);
        for (i, &n) in logs.iter().enumerate() {
            let path = wal::wal_path(&dir, n);
            let tail = wal::read_frames(&path, |r| {
                state.apply(&r);
                Ok(())
            })?;
            if let wal::Tail::Torn(at) = tail {
                if i + 1 != logs.len() {
                    return Err(StoreError::Corrupt(format!(
                        "{} is damaged at byte {at} and a newer log follows",
                        path.display()
                    )));
                }
                if let Some(next) = wal::next_valid_frame(&path, at)? {
                    if !opts.repair {
                        return Err(StoreError::Corrupt(format!(
                            "{} is damaged at byte {at} and valid records follow at byte {next}: \
                             not a torn tail. `omega-shard migrate --repair` keeps a copy of the \
                             file and truncates it at byte {at}, losing what follows",
                            path.display()
                        )));
                    }
                    let copy = wal::backup(&path, at)?;
                    tracing::warn!(
                        path = %path.display(), at, next, backup = %copy.display(),
                        "repair: truncating a damaged write-ahead log after backing it up"
                    );
                } else {
                    tracing::warn!(path = %path.display(), at, "cutting a torn write-ahead log tail");
                }
                wal::truncate(&path, at)?;
            }
        }
        // Generations below the newest snapshot are in it: a crash between writing the
        // snapshot and deleting them leaves them behind.
        for &n in snaps.iter().filter(|&&n| n < base) {
            let _ = std::fs::remove_file(wal::snapshot_path(&dir, n));
        }
        for n in stale_wals {
            let _ = std::fs::remove_file(wal::wal_path(&dir, n));
        }
        let generation = logs.last().copied().unwrap_or(base);
        let log = wal::LogFile::open(&wal::wal_path(&dir, generation))?;
        let replay_secs = started.elapsed().as_secs_f64();
        let state = Arc::new(RwLock::new(state));
        let built = index::build(&state, false, index::Tuning::at_open(), &mut || {})?;
        let info = {
            let mut st = state.write().map_err(poisoned)?;
            index::install_at_open(&mut st, built);
            tracing::info!(
                devices = st.devices.len(),
                patterns = st.patterns.len(),
                generation,
                "embedded store opened"
            );
            st.index.info()
        };
        tracing::info!(
            indexed = info.indexed,
            lists = info.lists,
            trained_on = info.trained_on,
            replay_secs,
            secs = started.elapsed().as_secs_f64(),
            "similarity index built"
        );
        let rebuild = index::spawn_rebuilder(state.clone())?;
        let failed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            rx,
            log,
            dir: dir.clone(),
            generation,
            state: state.clone(),
            failed: failed.clone(),
            compact_bytes: opts.wal_compact_bytes,
        };
        std::thread::Builder::new().name("omega-wal".into()).spawn(move || writer.run())?;
        Ok(EmbeddedStore { state, tx, rebuild, failed, dir })
    }

    /// What the similarity index is doing.
    pub fn index_info(&self) -> Result<IndexInfo, StoreError> {
        Ok(self.read()?.index.info())
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, State>, StoreError> {
        self.state.read().map_err(poisoned)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, State>, StoreError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the write-ahead log failed; restart".into()));
        }
        self.state.write().map_err(poisoned)
    }

    /// Applies `rec` and queues it for the log; the receiver resolves once it is durable.
    fn commit(
        &self,
        st: &mut State,
        rec: Record,
    ) -> Result<oneshot::Receiver<Result<(), String>>, StoreError> {
        let mut buf = Vec::new();
        wal::frame(&rec, &mut buf);
        st.apply(&rec);
        // The rebuild itself runs on its own thread; here it is only flagged, so that every
        // change from now on is recorded for it under this same lock.
        if st.index.start_rebuild_if_due() && self.rebuild.send(()).is_err() {
            st.index.abort();
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Append(buf, tx))
            .map_err(|_| StoreError::Unavailable("write-ahead log writer stopped".into()))?;
        Ok(rx)
    }

    /// Resolves once everything queued before it is durable.
    fn barrier(&self) -> Result<oneshot::Receiver<Result<(), String>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .map_err(|_| StoreError::Unavailable("write-ahead log writer stopped".into()))?;
        Ok(rx)
    }
}

async fn durable(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), StoreError> {
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("write-ahead log: {e}"))),
        Err(_) => Err(StoreError::Unavailable("write-ahead log writer stopped".into())),
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the write-ahead log failed".into()));
        }
        Ok(())
    }

    async fn register(
        &self,
        device_id: &str,
        region: &str,
        max_devices: u64,
        now_ms: i64,
    ) -> Result<Registered, StoreError> {
        let (rx, out) = {
            let mut st = self.write()?;
            if let Some(d) = st.devices.get(device_id) {
                (self.barrier()?, Registered { region: d.region.clone(), created: false })
            } else {
                if st.devices.len() as u64 >= max_devices {
                    return Err(StoreError::Capacity { max: max_devices });
                }
                let rec = Record {
                    kind: Some(Kind::Register(wal::RegisterRec {
                        device_id: device_id.into(),
                        region: region.into(),
                        at_ms: now_ms,
                    })),
                };
                (self.commit(&mut st, rec)?, Registered { region: region.into(), created: true })
            }
        };
        durable(rx).await?;
        Ok(out)
    }

    async fn apply_sync(&self, w: SyncWrite) -> Result<SyncApplied, StoreError> {
        let (rx, out) = {
            let mut st = self.write()?;
            let d = st.devices.get(&w.device_id).ok_or(StoreError::UnknownDevice)?;
            let mut out = SyncApplied {
                applied: false,
                acknowledged_version: d.local_version,
                region: d.region.clone(),
                interest: d.interest.clone(),
            };
            if w.local_version <= d.local_version {
                // The original may still be in flight: answer once it is durable.
                (self.barrier()?, out)
            } else {
                let rec = Record {
                    kind: Some(Kind::Sync(wal::SyncRec {
                        device_id: w.device_id.clone(),
                        local_version: w.local_version,
                        added: w.added,
                        updated: w.updated,
                        removed: w.removed.iter().map(|u| u.as_bytes().to_vec()).collect(),
                        interest_add: w.interest_add.unwrap_or_default(),
                        at_ms: w.now_ms,
                    })),
                };
                let rx = self.commit(&mut st, rec)?;
                let d = st.devices.get(&w.device_id).ok_or(StoreError::UnknownDevice)?;
                out.applied = true;
                out.acknowledged_version = d.local_version;
                out.interest = d.interest.clone();
                (rx, out)
            }
        };
        durable(rx).await?;
        Ok(out)
    }

    async fn similar(&self, q: SimilarQuery) -> Result<Vec<SimilarPattern>, StoreError> {
        let Some(unit) = super::unit(&q.interest) else { return Ok(Vec::new()) };
        let qv = omega_protocol::vector::quantize(&unit);
        let st = self.read()?;
        // Only aggregates (owner NO_OWNER) are candidates: devices' patterns are never served.
        let hits = st.index.ann.search_by(&qv.values, q.limit, |owner, _| owner == NO_OWNER);
        Ok(hits
            .into_iter()
            .filter_map(|h| {
                let a = st.aggregates.get(&h.key)?;
                (a.quality >= q.min_quality && a.source_devices >= q.min_sources).then(|| {
                    SimilarPattern {
                        pattern: aggregate_pattern(a, st.published_ms),
                        sources: a.source_devices,
                        score: h.score,
                    }
                })
            })
            .collect())
    }

    async fn settle(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn global(&self) -> Result<GlobalState, StoreError> {
        Ok(self.read()?.global.clone())
    }

    async fn export(
        &self,
        after: Option<Uuid>,
        limit: usize,
        min_quality: f32,
    ) -> Result<ExportPage, StoreError> {
        let st = self.read()?;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut items = Vec::with_capacity(limit);
        let mut last = true;
        for s in st.patterns.range((start, Bound::Unbounded)).map(|(_, s)| s) {
            if s.pattern.success_rate < min_quality {
                continue;
            }
            if items.len() == limit {
                last = false;
                break;
            }
            let name = st.names.get(s.owner as usize).cloned().unwrap_or_default();
            let region = st.devices.get(&name).map(|d| d.region.clone()).unwrap_or_default();
            items.push(ExportItem { pattern: s.pattern.clone(), device_id: name, region });
        }
        Ok(ExportPage { items, last })
    }

    async fn publish(&self, p: Publish) -> Result<Published, StoreError> {
        let (rx, out) = {
            let mut st = self.write()?;
            if st.rounds.contains(&p.round_id) {
                (self.barrier()?, Published { applied: false, global_version: st.global.version })
            } else {
                let version = super::next_global_version(p.global_version, st.global.version)
                    .ok_or(StoreError::VersionExhausted(super::MAX_GLOBAL_VERSION))?;
                st.published_ms = crate::clock::now_ms();
                let rec = Record {
                    kind: Some(Kind::Publish(wal::PublishRec {
                        round_id: p.round_id,
                        global_version: version,
                        patterns: p.patterns,
                        trends: p.trends,
                        published_rounds: Vec::new(),
                    })),
                };
                (self.commit(&mut st, rec)?, Published { applied: true, global_version: version })
            }
        };
        durable(rx).await?;
        Ok(out)
    }

    async fn device_contents(&self, device_id: &str) -> Result<Vec<String>, StoreError> {
        let st = self.read()?;
        let Some(ids) = st.devices.get(device_id).and_then(|d| st.owned.get(&d.idx)) else {
            return Ok(Vec::new());
        };
        let mut latest: HashMap<&str, i64> = HashMap::new();
        for p in ids.iter().filter_map(|id| st.patterns.get(id)).map(|s| &s.pattern) {
            if !p.content_id.is_empty() {
                let t = latest.entry(p.content_id.as_str()).or_insert(p.updated_at_ms);
                *t = (*t).max(p.updated_at_ms);
            }
        }
        let mut order: Vec<(&str, i64)> = latest.into_iter().collect();
        order.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        Ok(order.into_iter().take(MAX_DEVICE_CONTENTS).map(|(c, _)| c.to_owned()).collect())
    }

    async fn aggregates(&self) -> Result<Vec<pb::AggregatedPattern>, StoreError> {
        Ok(self.read()?.aggregates.values().cloned().collect())
    }

    async fn counts(&self, active_since_ms: i64) -> Result<Counts, StoreError> {
        let st = self.read()?;
        Ok(Counts {
            devices_total: st.devices.len() as u64,
            devices_active: st
                .devices
                .values()
                .filter(|d| d.last_sync_ms >= active_since_ms && d.last_sync_ms > 0)
                .count() as u64,
            patterns: st.patterns.len() as u64,
            backlog: 0,
            global_version: st.global.version,
        })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        durable(self.barrier()?).await
    }
}

struct Writer {
    rx: mpsc::Receiver<Msg>,
    log: wal::LogFile,
    dir: PathBuf,
    generation: u64,
    state: Arc<RwLock<State>>,
    failed: Arc<AtomicBool>,
    compact_bytes: u64,
}

type Ack = oneshot::Sender<Result<(), String>>;

impl Writer {
    fn run(mut self) {
        while let Ok(first) = self.rx.recv() {
            let mut buf = Vec::new();
            let mut acks: Vec<Ack> = Vec::new();
            take(first, &mut buf, &mut acks);
            while buf.len() < 8 << 20 {
                match self.rx.try_recv() {
                    Ok(m) => take(m, &mut buf, &mut acks),
                    Err(_) => break,
                }
            }
            self.write(&buf, acks);
            if self.log.len() >= self.compact_bytes
                && !self.failed.load(Ordering::Acquire)
                && let Err(e) = self.compact()
            {
                tracing::error!(error = %e, "write-ahead log compaction failed");
                self.failed.store(true, Ordering::Release);
            }
        }
    }

    fn write(&mut self, buf: &[u8], acks: Vec<Ack>) {
        let res = if self.failed.load(Ordering::Acquire) {
            Err("the write-ahead log failed earlier".to_string())
        } else if buf.is_empty() {
            Ok(())
        } else {
            self.log.append_durable(buf).map_err(|e| e.to_string())
        };
        if let Err(e) = &res {
            tracing::error!(error = %e, "write-ahead log append failed; the store stops accepting writes");
            self.failed.store(true, Ordering::Release);
        }
        for a in acks {
            let _ = a.send(res.clone());
        }
    }

    fn compact(&mut self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let state = self.state.clone();
        let snapshot = {
            let st = state.read().map_err(poisoned)?;
            // Everything queued so far is already applied in memory (records are queued under
            // the write lock, which this read lock excludes): log it in the old generation.
            let mut buf = Vec::new();
            let mut acks = Vec::new();
            while let Ok(m) = self.rx.try_recv() {
                take(m, &mut buf, &mut acks);
            }
            self.write(&buf, acks);
            let mut snap = Vec::new();
            st.snapshot(&mut snap);
            snap
        };
        let next = self.generation + 1;
        self.log = wal::LogFile::open(&wal::wal_path(&self.dir, next))?;
        wal::write_atomic(&wal::snapshot_path(&self.dir, next), &snapshot)?;
        remove_generation(&self.dir, self.generation);
        self.generation = next;
        tracing::info!(
            generation = next,
            snapshot_bytes = snapshot.len(),
            ms = started.elapsed().as_millis() as u64,
            "write-ahead log compacted"
        );
        Ok(())
    }
}

fn take(m: Msg, buf: &mut Vec<u8>, acks: &mut Vec<Ack>) {
    match m {
        Msg::Append(bytes, ack) => {
            buf.extend_from_slice(&bytes);
            acks.push(ack);
        }
        Msg::Flush(ack) => acks.push(ack),
    }
}

fn remove_generation(dir: &Path, n: u64) {
    let _ = std::fs::remove_file(wal::wal_path(dir, n));
    let _ = std::fs::remove_file(wal::snapshot_path(dir, n));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(id: u128, rate: f32) -> pb::Pattern {
        let mut v = vec![0.0f32; 384];
        v[(id % 384) as usize] = 1.0;
        let q = omega_protocol::vector::quantize(&v);
        pb::Pattern {
            id: Uuid::from_u128(id).as_bytes().to_vec(),
            content_id: format!("c{id}"),
            embedding: Some(pb::Embedding { values: q.to_bytes(), scale: q.scale }),
            success_rate: rate,
            sample_count: 1,
            context: None,
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    #[tokio::test]
    async fn compaction_keeps_state_across_generations_and_restarts() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut opts = StoreOptions::embedded(dir.path());
        opts.wal_compact_bytes = 4096; // compact every few syncs
        {
            let s = EmbeddedStore::open(&opts).expect("open");
            s.register("a", "eu", 10, 1).await.expect("register");
            for v in 1..=40u64 {
                let w = SyncWrite {
                    device_id: "a".into(),
                    local_version: v,
                    added: vec![pattern(u128::from(v), 0.9)],
                    now_ms: 5,
                    ..Default::default()
                };
                assert!(s.apply_sync(w).await.expect("sync").applied);
            }
            s.flush().await.expect("flush");
        }
        let (snaps, _) = wal::generations(&dir.path().join("embedded")).expect("ls");
        assert!(!snaps.is_empty(), "compaction wrote a snapshot");
        assert!(snaps.len() <= 2, "old generations are deleted: {snaps:?}");
        let s = EmbeddedStore::open(&opts).expect("reopen");
        let c = s.counts(0).await.expect("counts");
        assert_eq!((c.devices_total, c.patterns), (1, 40));
        let again = SyncWrite { device_id: "a".into(), local_version: 40, ..Default::default() };
        let out = s.apply_sync(again).await.expect("sync");
        assert!(!out.applied);
        assert_eq!(out.acknowledged_version, 40);
    }
}
