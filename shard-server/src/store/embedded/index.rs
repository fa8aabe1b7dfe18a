//! The embedded store's similarity index, and how its centroids are kept trained.
//!
//! The index ([`Ann`]) holds every shareable pattern and servable aggregate; what it holds for
//! an id is a function of the state alone ([`super::State::indexed`]). So it can be built from
//! the state at any moment, and a change only has to say *which* id changed.
//!
//! **Centroids.** An inverted file is only as good as its centroids: on clustered data, the
//! first vectors inserted as centroids find 0.58 of the true top 16 where centroids trained by
//! k-means find 0.92 (docs/benchmarks.md). So:
//! - at open, the log is replayed without indexing, then centroids are trained on a sample of
//!   the loaded vectors ([`ann::train_centroids`], as the Postgres store does) and the index is
//!   built with every core (nothing else runs yet). Below [`TRAIN_MIN_PER_LIST`] vectors per
//!   list, training is not worth it and the first vectors become the centroids (bootstrap);
//! - while running, the index is rebuilt with freshly trained centroids when it has outgrown
//!   them ([`retrain_due`]): once the bootstrap index holds enough vectors, then each time it
//!   has taken in [`ann::GROWTH`]` - 1` times as many new vectors as its centroids were trained
//!   on.
//!   Rebuilds cost O(n · lists) each; growing geometrically keeps their sum within a small
//!   multiple of the last one.
//!
//! **Rebuilding off the sync path.** A sync that makes a rebuild due only flags it, under the
//! write lock it holds anyway ([`Index::start_rebuild_if_due`]), and wakes the rebuild thread.
//! From that moment, every change still updates the old index (queries stay fresh) and also
//! records its id as *dirty*. The thread samples the state and trains centroids, then builds
//! the new index from the state in chunks of [`Tuning::chunk`] ids, holding the read lock only
//! while it copies a chunk (the O(lists) list assignment runs unlocked). Then it catches up:
//! it takes the dirty ids (so a later change dirties its id again), reads what the index must
//! hold for each under the read lock, and applies that to the new index; when few are left,
//! it takes the write lock, applies the rest and swaps the new index in. What the new index
//! holds for an id is thus read from the state after the id's last change (or, for an id never
//! changed during the rebuild, by the scan), so no change made meanwhile is lost, in whatever
//! order they came. Syncs wait only for short locks: a chunk's copy, and the final swap.

use super::{Indexed, State, poisoned};
use crate::store::StoreError;
use crate::store::ann::{
    self, Ann, IndexInfo, SAMPLE_PER_LIST, TRAIN_ITERATIONS, TRAIN_MIN_PER_LIST, retrain_due,
    train_centroids,
};
use omega_protocol::vector::QuantizedVector;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::HashSet;
use std::ops::Bound;
use std::sync::{Arc, RwLock, mpsc};
use std::time::Instant;
use uuid::Uuid;

/// Seed of the training sample: the same state gives the same index.
const SAMPLE_SEED: u64 = 0x0e6a_1dc5;

#[derive(Debug)]
enum Mode {
    /// Replaying the log at open: the index is built once, afterwards.
    Deferred,
    /// Every change updates the index.
    Live,
    /// Every change updates the index and records its id for the rebuild in progress.
    Rebuilding(HashSet<Uuid>),
}

/// The index with its training bookkeeping.
#[derive(Debug)]
pub(super) struct Index {
    pub(super) ann: Ann,
    lists: usize,
    probes: usize,
    mode: Mode,
    trained_on: usize,
    added_since: usize,
    rebuilds: u64,
    caught_up: u64,
}

impl Index {
    /// An index that ignores changes until [`Index::install`] (replay at open).
    pub(super) fn deferred(lists: usize, probes: usize) -> Self {
        Index {
            ann: Ann::new(lists, probes),
            lists: lists.max(1),
            probes: probes.max(1),
            mode: Mode::Deferred,
            trained_on: 0,
            added_since: 0,
            rebuilds: 0,
            caught_up: 0,
        }
    }

    /// True while replaying (changes are not indexed one by one).
    pub(super) fn is_deferred(&self) -> bool {
        matches!(self.mode, Mode::Deferred)
    }

    /// Makes the index hold `entry` for `id` (nothing when `None`).
    pub(super) fn put(&mut self, id: Uuid, entry: Option<Indexed<'_>>) {
        match &mut self.mode {
            Mode::Deferred => return,
            Mode::Live => {}
            Mode::Rebuilding(dirty) => {
                dirty.insert(id);
            }
        }
        match entry {
            Some(e) => {
                if !self.ann.contains(&id) {
                    self.added_since += 1;
                }
                self.ann.insert(id, e.owner, &ann::to_i8(e.values), e.scale, ());
            }
            None => {
                self.ann.remove(&id);
            }
        }
    }

    /// Starts recording changes for a rebuild when one is due and none runs; true when the
    /// caller must wake the rebuild thread. Two compares in the common case.
    pub(super) fn start_rebuild_if_due(&mut self) -> bool {
        if !matches!(self.mode, Mode::Live)
            || !retrain_due(self.ann.len(), self.lists, self.trained_on, self.added_since)
        {
            return false;
        }
        self.mode = Mode::Rebuilding(HashSet::new());
        true
    }

    /// Gives up a rebuild (it failed, or its thread is gone). The next attempt waits for the
    /// next growth step, as after a successful one, so a failing rebuild is not retried on
    /// every sync.
    pub(super) fn abort(&mut self) {
        if matches!(self.mode, Mode::Rebuilding(_)) {
            self.mode = Mode::Live;
            self.trained_on = self.trained_on.max(self.ann.len());
            self.added_since = 0;
        }
    }

    fn take_dirty(&mut self) -> Result<HashSet<Uuid>, StoreError> {
        match &mut self.mode {
            Mode::Rebuilding(dirty) => Ok(std::mem::take(dirty)),
            _ => Err(StoreError::Unavailable("the index rebuild was cancelled".into())),
        }
    }

    /// Swaps `built` in and goes live; returns the old index (drop it outside the lock).
    fn install(&mut self, built: Built, caught_up: usize) -> Ann {
        if matches!(self.mode, Mode::Rebuilding(_)) {
            self.rebuilds += 1;
            self.caught_up += caught_up as u64;
        }
        self.mode = Mode::Live;
        self.trained_on = built.trained_on;
        self.added_since = 0;
        std::mem::replace(&mut self.ann, built.ann)
    }

    pub(super) fn info(&self) -> IndexInfo {
        IndexInfo {
            indexed: self.ann.len(),
            lists: self.ann.lists(),
            trained_on: self.trained_on,
            added_since: self.added_since,
            rebuilding: matches!(self.mode, Mode::Rebuilding(_)),
            rebuilds: self.rebuilds,
            caught_up: self.caught_up,
        }
    }
}

/// How a build runs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tuning {
    /// Ids copied per read lock (~0.1 ms of lock per thousand in a release build).
    pub chunk: usize,
    /// Threads assigning vectors to lists.
    pub threads: usize,
    /// At most this many dirty ids are applied under the write lock at the swap (each costs an
    /// O(lists) assignment: ~15 µs at 256 lists).
    pub swap_max_dirty: usize,
    /// Catch-up rounds before the swap takes whatever is dirty (bounds a rebuild under a
    /// write rate the catch-up cannot outrun).
    pub max_rounds: usize,
}

impl Tuning {
    /// A rebuild while syncs run: one thread, so syncs keep a core.
    pub(super) const BACKGROUND: Tuning =
        Tuning { chunk: 1024, threads: 1, swap_max_dirty: 64, max_rounds: 16 };

    /// The build at open: nothing else runs, use every core.
    pub(super) fn at_open() -> Tuning {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        Tuning { chunk: 8192, threads, ..Tuning::BACKGROUND }
    }
}

/// A new index, not yet swapped in.
#[derive(Debug)]
pub(super) struct Built {
    ann: Ann,
    trained_on: usize,
}

/// An indexed entry copied out of the state.
struct Owned {
    key: Uuid,
    owner: u32,
    values: Vec<i8>,
    scale: f32,
}

impl Owned {
    fn of(key: Uuid, e: Indexed<'_>) -> Self {
        Owned { key, owner: e.owner, values: ann::to_i8(e.values), scale: e.scale }
    }
}

/// A cursor over every indexed id of a state that changes between calls: patterns in id
/// order, then aggregates (one round's worth, read in one go).
#[derive(Debug, Default)]
struct Scan {
    after: Option<Uuid>,
    patterns_done: bool,
    done: bool,
}

impl Scan {
    /// Calls `f` for the indexed entries among the next `limit` pattern ids (or for the
    /// aggregates, at the end).
    fn next(&mut self, st: &State, limit: usize, mut f: impl FnMut(Uuid, Indexed<'_>)) {
        if !self.patterns_done {
            let lower = self.after.map_or(Bound::Unbounded, Bound::Excluded);
            let mut n = 0;
            for id in st.patterns.range((lower, Bound::Unbounded)).map(|(id, _)| *id).take(limit) {
                n += 1;
                self.after = Some(id);
                if let Some(e) = st.indexed(&id) {
                    f(id, e);
                }
            }
            if n == limit {
                return;
            }
            self.patterns_done = true;
        }
        // An aggregate id that is also a pattern id was visited with the patterns.
        for id in st.aggregates.keys().filter(|id| !st.patterns.contains_key(id)) {
            if let Some(e) = st.indexed(id) {
                f(*id, e);
            }
        }
        self.done = true;
    }
}

/// The list each vector joins in `ann` (`None` while it still takes centroids), computed on
/// `threads` threads.
fn assign(ann: &Ann, chunk: &[Owned], threads: usize) -> Vec<Option<usize>> {
    let one = |part: &[Owned]| -> Vec<Option<usize>> {
        part.iter().map(|e| ann.nearest_list(&e.values)).collect()
    };
    if threads <= 1 || chunk.len() < 64 {
        return one(chunk);
    }
    let per = chunk.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = chunk.chunks(per).map(|p| (p.len(), s.spawn(move || one(p)))).collect();
        // A part whose thread failed is assigned by the insert itself.
        parts.into_iter().flat_map(|(n, h)| h.join().unwrap_or_else(|_| vec![None; n])).collect()
    })
}

fn read(state: &RwLock<State>) -> Result<std::sync::RwLockReadGuard<'_, State>, StoreError> {
    state.read().map_err(poisoned)
}

/// Builds an index of everything `state` holds, taking its read lock one chunk at a time.
/// Trains centroids when `always_train`, or when there are enough vectors for it.
/// `between` runs after each chunk with no lock held (tests change the state there).
pub(super) fn build(
    state: &RwLock<State>,
    always_train: bool,
    t: Tuning,
    between: &mut dyn FnMut(),
) -> Result<Built, StoreError> {
    let (lists, probes) = {
        let st = read(state)?;
        (st.index.lists, st.index.probes)
    };
    // Pass 1: a uniform sample (reservoir), and the count.
    let want = lists.saturating_mul(SAMPLE_PER_LIST);
    let mut rng = StdRng::seed_from_u64(SAMPLE_SEED);
    let mut sample: Vec<Vec<f32>> = Vec::new();
    let mut seen = 0usize;
    let mut scan = Scan::default();
    while !scan.done {
        scan.next(&*read(state)?, t.chunk, |_, e| {
            seen += 1;
            let slot = if sample.len() < want {
                Some(sample.len())
            } else {
                Some(rng.random_range(0..seen)).filter(|&j| j < want)
            };
            if let Some(j) = slot {
                let v = QuantizedVector::from_bytes(e.values, e.scale).dequantize();
                if let Some(unit) = crate::store::unit(&v) {
                    if j == sample.len() {
                        sample.push(unit);
                    } else {
                        sample[j] = unit;
                    }
                }
            }
        });
        between();
    }
    let train = always_train || seen >= lists.saturating_mul(TRAIN_MIN_PER_LIST);
    let centroids =
        if train { train_centroids(&sample, lists, TRAIN_ITERATIONS) } else { Vec::new() };
    drop(sample);
    let trained_on = if centroids.is_empty() { 0 } else { seen };
    // Pass 2: copy a chunk under the lock, assign it without.
    let mut ann = Ann::seeded(&centroids, lists, probes);
    let mut chunk = Vec::with_capacity(t.chunk);
    let mut scan = Scan::default();
    while !scan.done {
        scan.next(&*read(state)?, t.chunk, |id, e| chunk.push(Owned::of(id, e)));
        let lists = assign(&ann, &chunk, t.threads);
        for (e, list) in chunk.drain(..).zip(lists) {
            ann.insert_into(e.key, e.owner, &e.values, e.scale, (), list);
        }
        between();
    }
    ann.shrink_to_fit();
    Ok(Built { ann, trained_on })
}

/// Installs an index built at open (no rebuild was recording changes: nothing ran).
pub(super) fn install_at_open(st: &mut State, built: Built) {
    drop(st.index.install(built, 0));
}

/// Catches `built` up with the changes recorded since the rebuild started and swaps it in;
/// returns how many ids were caught up.
pub(super) fn catch_up_and_swap(
    state: &RwLock<State>,
    built: Built,
    t: Tuning,
    between: &mut dyn FnMut(),
) -> Result<usize, StoreError> {
    let mut built = built;
    let mut caught_up = 0;
    for round in 0.. {
        let mut st = state.write().map_err(poisoned)?;
        let dirty = st.index.take_dirty()?;
        caught_up += dirty.len();
        if dirty.len() <= t.swap_max_dirty || round >= t.max_rounds {
            for id in &dirty {
                match st.indexed(id) {
                    Some(e) => built.ann.insert(*id, e.owner, &ann::to_i8(e.values), e.scale, ()),
                    None => {
                        built.ann.remove(id);
                    }
                }
            }
            let old = st.index.install(built, caught_up);
            drop(st);
            drop(old);
            return Ok(caught_up);
        }
        drop(st);
        // Read what each dirty id must hold now; a change after this dirties it again.
        let mut puts = Vec::with_capacity(dirty.len());
        {
            let st = read(state)?;
            for id in dirty {
                match st.indexed(&id) {
                    Some(e) => puts.push(Owned::of(id, e)),
                    None => {
                        built.ann.remove(&id);
                    }
                }
            }
        }
        let lists = assign(&built.ann, &puts, t.threads);
        for (e, list) in puts.into_iter().zip(lists) {
            built.ann.insert_into(e.key, e.owner, &e.values, e.scale, (), list);
        }
        between();
    }
    unreachable!("the loop returns by its last round")
}

/// One background rebuild, start to swap.
fn rebuild(state: &RwLock<State>) -> Result<(), StoreError> {
    let started = Instant::now();
    let built = build(state, true, Tuning::BACKGROUND, &mut || {})?;
    let (trained_on, built_secs) = (built.trained_on, started.elapsed().as_secs_f64());
    let caught_up = catch_up_and_swap(state, built, Tuning::BACKGROUND, &mut || {})?;
    let info = read(state)?.index.info();
    tracing::info!(
        indexed = info.indexed,
        lists = info.lists,
        trained_on,
        caught_up,
        build_secs = built_secs,
        secs = started.elapsed().as_secs_f64(),
        "similarity index rebuilt with retrained centroids"
    );
    Ok(())
}

/// Starts the rebuild thread; each message on the returned channel runs one rebuild. The
/// thread ends when the store drops the sender.
pub(super) fn spawn_rebuilder(state: Arc<RwLock<State>>) -> std::io::Result<mpsc::Sender<()>> {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::Builder::new().name("omega-ann-rebuild".into()).spawn(move || {
        while rx.recv().is_ok() {
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rebuild(&state)));
            let error = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the rebuild panicked".to_string(),
            };
            tracing::error!(error, "rebuilding the similarity index failed; keeping the old one");
            if let Ok(mut st) = state.write() {
                st.index.abort();
            }
        }
    })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::super::wal::{self, Kind, Record};
    use super::*;
    use omega_protocol::pb;
    use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize, quantize};

    const DEVICES: usize = 4;

    /// Random changes of every kind the index follows: patterns added (some reusing an
    /// aggregate's id), quality updates across the shareable and stored rates, removals,
    /// updates of another device's pattern (ignored), and rounds of aggregates (some without
    /// a content id, some reusing a pattern's id).
    struct Script {
        rng: StdRng,
        versions: [u64; DEVICES],
        ids: Vec<Vec<Uuid>>,
        aggregates: Vec<Uuid>,
        rounds: u64,
    }

    impl Script {
        fn new(seed: u64) -> Self {
            Script {
                rng: StdRng::seed_from_u64(seed),
                versions: [0; DEVICES],
                ids: vec![Vec::new(); DEVICES],
                aggregates: Vec::new(),
                rounds: 0,
            }
        }

        fn registrations() -> Vec<Record> {
            (0..DEVICES)
                .map(|d| Record {
                    kind: Some(Kind::Register(wal::RegisterRec {
                        device_id: format!("d{d}"),
                        region: "eu".into(),
                        at_ms: 1,
                    })),
                })
                .collect()
        }

        fn embedding(&mut self) -> pb::Embedding {
            let mut v: Vec<f32> =
                (0..EMBEDDING_DIM).map(|_| self.rng.random_range(-1.0f32..1.0)).collect();
            l2_normalize(&mut v);
            let q = quantize(&v);
            pb::Embedding { values: q.to_bytes(), scale: q.scale }
        }

        fn pick(&mut self, ids: &[Uuid]) -> Option<Uuid> {
            (!ids.is_empty()).then(|| ids[self.rng.random_range(0..ids.len())])
        }

        fn next(&mut self) -> Record {
            if self.rng.random_bool(0.15) {
                return self.publish();
            }
            let d = self.rng.random_range(0..DEVICES);
            self.versions[d] += 1;
            let mut added = Vec::new();
            for _ in 0..self.rng.random_range(0..6) {
                let aggregates = self.aggregates.clone();
                let id = match self.pick(&aggregates) {
                    Some(a) if self.rng.random_bool(0.05) => a,
                    _ => Uuid::from_u128(self.rng.random()),
                };
                self.ids[d].push(id);
                added.push(pb::Pattern {
                    id: id.as_bytes().to_vec(),
                    content_id: "c".into(),
                    embedding: Some(self.embedding()),
                    success_rate: self.rng.random_range(0.7f32..=1.0),
                    sample_count: 1,
                    context: None,
                    created_at_ms: 1,
                    updated_at_ms: 1,
                });
            }
            let mut updated = Vec::new();
            let mut removed = Vec::new();
            for _ in 0..self.rng.random_range(0..3) {
                // Mostly its own patterns, sometimes another device's (must be ignored).
                let owner =
                    if self.rng.random_bool(0.8) { d } else { self.rng.random_range(0..DEVICES) };
                let ids = self.ids[owner].clone();
                let Some(id) = self.pick(&ids) else { continue };
                if self.rng.random_bool(0.3) {
                    removed.push(id.as_bytes().to_vec());
                } else {
                    updated.push(pb::PatternUpdate {
                        id: id.as_bytes().to_vec(),
                        success_rate: self.rng.random_range(0.65f32..=1.0),
                        extra_samples: 1,
                    });
                }
            }
            Record {
                kind: Some(Kind::Sync(wal::SyncRec {
                    device_id: format!("d{d}"),
                    local_version: self.versions[d],
                    added,
                    updated,
                    removed,
                    interest_add: Vec::new(),
                    at_ms: 2,
                })),
            }
        }

        fn publish(&mut self) -> Record {
            self.rounds += 1;
            let mut patterns = Vec::new();
            self.aggregates.clear();
            for _ in 0..self.rng.random_range(0..5) {
                let d = self.rng.random_range(0..DEVICES);
                let ids = self.ids[d].clone();
                let id = match self.pick(&ids) {
                    Some(p) if self.rng.random_bool(0.2) => p,
                    _ => Uuid::from_u128(self.rng.random()),
                };
                self.aggregates.push(id);
                patterns.push(pb::AggregatedPattern {
                    id: id.as_bytes().to_vec(),
                    content_id: if self.rng.random_bool(0.8) { "c".into() } else { String::new() },
                    embedding: Some(self.embedding()),
                    quality: self.rng.random_range(0.7f32..=1.0),
                    ..Default::default()
                });
            }
            Record {
                kind: Some(Kind::Publish(wal::PublishRec {
                    round_id: format!("r{}", self.rounds),
                    global_version: self.rounds,
                    patterns,
                    trends: Vec::new(),
                    published_rounds: Vec::new(),
                })),
            }
        }
    }

    /// The index holds exactly what the state says it must, for every id the state knows.
    fn assert_consistent(st: &State) {
        let ids: HashSet<Uuid> = st.patterns.keys().chain(st.aggregates.keys()).copied().collect();
        let mut expected = 0;
        for id in &ids {
            match (st.indexed(id), st.index.ann.get(id)) {
                (None, None) => {}
                (Some(want), Some(got)) => {
                    assert_eq!(got.owner, want.owner, "{id}");
                    assert_eq!(got.values, ann::to_i8(want.values).as_slice(), "{id}");
                    assert_eq!(got.scale, want.scale, "{id}");
                    expected += 1;
                }
                (want, got) => panic!(
                    "{id}: the index holds owner {:?}, the state says {:?}",
                    got.map(|e| e.owner),
                    want.map(|e| e.owner)
                ),
            }
        }
        assert_eq!(st.index.ann.len(), expected, "the index holds ids the state does not know");
    }

    fn apply(state: &RwLock<State>, rec: &Record) {
        state.write().expect("lock").apply(rec);
    }

    /// A store opened on a history, then changed live until a rebuild is due.
    fn opened_and_due(lists: usize, script: &mut Script) -> RwLock<State> {
        let state = RwLock::new(State::new(lists, 2));
        for r in Script::registrations() {
            apply(&state, &r);
        }
        for _ in 0..30 {
            apply(&state, &script.next());
        }
        let built = build(&state, false, Tuning::at_open(), &mut || {}).expect("build");
        install_at_open(&mut state.write().expect("lock"), built);
        assert_consistent(&state.read().expect("lock"));
        loop {
            let mut st = state.write().expect("lock");
            st.apply(&script.next());
            if st.index.start_rebuild_if_due() {
                break;
            }
        }
        assert_consistent(&state.read().expect("lock"));
        state
    }

    /// Changes land between every chunk of both passes and every catch-up round, whether the
    /// catch-up converges (`budget` changes, then none) or is cut by `max_rounds` (unlimited).
    #[test]
    fn changes_made_while_a_rebuild_runs_all_reach_the_new_index() {
        for seed in 1..=24u64 {
            let budget = [40, 120, usize::MAX][seed as usize % 3];
            let mut script = Script::new(seed);
            let state = opened_and_due(2, &mut script);
            let mut left = budget;
            let mut between = || {
                for _ in 0..2 {
                    if left > 0 {
                        left -= 1;
                        apply(&state, &script.next());
                    }
                }
            };
            let t = Tuning { chunk: 5, threads: 2, swap_max_dirty: 3, max_rounds: 4 };
            let built = build(&state, true, t, &mut between).expect("build");
            assert!(built.trained_on > 0, "trained");
            let caught_up = catch_up_and_swap(&state, built, t, &mut between).expect("swap");
            let st = state.read().expect("lock");
            assert_consistent(&st);
            let info = st.index.info();
            assert!(caught_up > 0 && !info.rebuilding, "{info:?}");
            assert_eq!((info.rebuilds, info.caught_up, info.added_since), (1, caught_up as u64, 0));
            assert_eq!(info.lists, 2);
            // Live changes after the swap go to the new index.
            drop(st);
            for _ in 0..20 {
                apply(&state, &script.next());
            }
            assert_consistent(&state.read().expect("lock"));
        }
    }

    #[test]
    fn an_aborted_rebuild_keeps_the_live_index_and_waits_for_the_next_growth_step() {
        let mut script = Script::new(4);
        let state = opened_and_due(2, &mut script);
        for _ in 0..20 {
            apply(&state, &script.next());
        }
        let mut st = state.write().expect("lock");
        st.index.abort();
        assert_consistent(&st);
        assert!(!st.index.info().rebuilding);
        st.apply(&script.next());
        assert!(!st.index.start_rebuild_if_due(), "not retried on the next sync");
        assert!(st.index.take_dirty().is_err(), "nothing records changes any more");
    }

    #[test]
    fn an_index_built_at_open_is_trained_only_when_there_is_enough_to_train_on() {
        for (records, trained) in [(10, false), (400, true)] {
            let mut script = Script::new(5);
            let state = RwLock::new(State::new(2, 2));
            for r in Script::registrations() {
                apply(&state, &r);
            }
            for _ in 0..records {
                apply(&state, &script.next());
            }
            let built = build(&state, false, Tuning::at_open(), &mut || {}).expect("build");
            let mut st = state.write().expect("lock");
            install_at_open(&mut st, built);
            assert_consistent(&st);
            let info = st.index.info();
            assert_eq!(info.trained_on > 0, trained, "{info:?}");
            assert_eq!(info.trained_on, if trained { info.indexed } else { 0 });
            assert_eq!(info.rebuilds, 0);
        }
    }

    #[test]
    fn retraining_is_due_once_enough_vectors_then_at_each_fourfold_growth() {
        let min = 16 * TRAIN_MIN_PER_LIST;
        // (len, trained_on, added since) -> due, at 16 lists.
        let cases = [
            (0, 0, 0, false),
            (min - 1, 0, min - 1, false), // bootstrap, not enough yet
            (min, 0, min, true),          // bootstrap, enough
            (min, 0, 0, true),            // bootstrap: what was added does not matter
            (min, min, 0, false),         // just trained
            (4 * min - 1, min, 3 * min - 1, false),
            (4 * min, min, 3 * min, true), // grown fourfold
            (min, min, 3 * min, true),     // same size, but three quarters replaced
            (min - 1, 0, 10 * min, false), // churn below the minimum: never worth it
            (usize::MAX, usize::MAX, usize::MAX, true),
        ];
        for (len, trained_on, added, due) in cases {
            assert_eq!(retrain_due(len, 16, trained_on, added), due, "{len} {trained_on} {added}");
        }
    }
}
