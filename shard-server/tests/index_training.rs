//! Both stores' in-process similarity index: centroids trained on the data at open and
//! retrained as it grows give the recall that first-inserted centroids do not, on clustered
//! data; syncs running while the index is rebuilt lose nothing. The Postgres cases run the
//! real store on a fresh database (merge, follow, retraining on its own session).

mod common;

use omega_protocol::pb;
use omega_protocol::vector::{EMBEDDING_DIM, QuantizedVector, dot_i8, l2_normalize, quantize};
use omega_shard::store::ann::{Ann, IndexInfo, NO_OWNER};
use omega_shard::store::embedded::EmbeddedStore;
use omega_shard::store::postgres::PostgresStore;
use omega_shard::store::{SimilarQuery, Store, StoreOptions, SyncWrite};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

const K: usize = 16;

/// Clustered unit vectors: `centres` random directions, each vector one of them plus uniform
/// noise of `spread` per component (as `similarity_bench --data clustered`, scaled down).
struct Clustered {
    rng: StdRng,
    centres: Vec<Vec<f32>>,
    spread: f32,
}

impl Clustered {
    fn new(seed: u64, centres: usize, spread: f32) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres = (0..centres)
            .map(|_| {
                let mut v: Vec<f32> =
                    (0..EMBEDDING_DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                l2_normalize(&mut v);
                v
            })
            .collect();
        Clustered { rng, centres, spread }
    }

    fn vector(&mut self) -> Vec<f32> {
        let c = self.rng.random_range(0..self.centres.len());
        let s = self.spread;
        let mut v: Vec<f32> =
            self.centres[c].iter().map(|x| x + self.rng.random_range(-s..s)).collect();
        l2_normalize(&mut v);
        v
    }
}

fn pattern(v: &[f32], rate: f32) -> (Uuid, pb::Pattern, QuantizedVector) {
    let id = Uuid::now_v7();
    let q = quantize(v);
    let p = common::pattern_with(id, v, rate);
    (id, p, q)
}

fn opts(dir: &std::path::Path, lists: usize, probes: usize) -> StoreOptions {
    StoreOptions { ann_lists: lists, ann_probes: probes, ..StoreOptions::embedded(dir) }
}

fn pg_opts(url: &str, lists: usize, probes: usize) -> StoreOptions {
    StoreOptions { ann_lists: lists, ann_probes: probes, ..StoreOptions::postgres(url) }
}

/// A store whose similarity index can be watched.
trait Indexed: Store {
    /// What the index does now; `None` while it is not loaded yet.
    fn info(&self) -> Option<IndexInfo>;
}

impl Indexed for EmbeddedStore {
    fn info(&self) -> Option<IndexInfo> {
        Some(self.index_info().expect("index info"))
    }
}

impl Indexed for PostgresStore {
    fn info(&self) -> Option<IndexInfo> {
        self.memory_index_info().expect("index info")
    }
}

/// Syncs `data` in runs of 256 patterns per device over `devices` devices (registered here).
async fn load(s: &impl Store, data: &[(Uuid, pb::Pattern, QuantizedVector)], devices: usize) {
    for d in 0..devices {
        s.register(&format!("d{d}"), "eu", 1_000, 1).await.expect("register");
    }
    s.register("asker", "eu", 1_000, 1).await.expect("register");
    let mut versions = vec![0u64; devices];
    for (i, run) in data.chunks(256).enumerate() {
        let d = i % devices;
        versions[d] += 1;
        let w = SyncWrite {
            device_id: format!("d{d}"),
            local_version: versions[d],
            added: run.iter().map(|(_, p, _)| p.clone()).collect(),
            now_ms: 1,
            ..Default::default()
        };
        assert!(s.apply_sync(w).await.expect("sync").applied);
    }
}

/// Waits until the index holds `n` vectors, no rebuild runs and none is due (the Postgres
/// store indexes a sync after its merge, and starts a due rebuild at its next check).
async fn settled(s: &impl Indexed, lists: usize, n: usize) -> IndexInfo {
    let started = Instant::now();
    loop {
        let info = s.info();
        if let Some(i) = info
            && i.indexed == n
            && !i.rebuild_pending(lists)
        {
            return i;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "never settled at {n}: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn exact(data: &[(Uuid, pb::Pattern, QuantizedVector)], q: &QuantizedVector) -> HashSet<Uuid> {
    let mut scored: Vec<(f32, Uuid)> = data
        .iter()
        .map(|(id, _, v)| (dot_i8(&q.values, &v.values) as f32 * v.scale, *id))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.iter().take(K).map(|s| s.1).collect()
}

/// recall@16 of the store's `similar` and of an index whose centroids are the first vectors
/// inserted (the embedded store before centroid training), fed the same data in the same order.
async fn recalls(
    s: &impl Store,
    data: &[(Uuid, pb::Pattern, QuantizedVector)],
    data_gen: &mut Clustered,
    lists: usize,
    probes: usize,
) -> (f64, f64) {
    let mut bootstrap: Ann = Ann::new(lists, probes);
    for (id, _, v) in data {
        bootstrap.insert(*id, 0, &v.values, v.scale, ());
    }
    let (mut store_hits, mut boot_hits, queries) = (0, 0, 40);
    for _ in 0..queries {
        let interest = data_gen.vector();
        let q = quantize(&interest);
        let truth = exact(data, &q);
        let found = s
            .similar(SimilarQuery {
                device_id: "asker".into(),
                interest,
                limit: K,
                min_quality: 0.8,
            })
            .await
            .expect("similar");
        store_hits += found
            .iter()
            .filter(|p| Uuid::from_slice(&p.pattern.id).is_ok_and(|id| truth.contains(&id)))
            .count();
        boot_hits += bootstrap
            .search(&q.values, NO_OWNER, K)
            .iter()
            .filter(|h| truth.contains(&h.key))
            .count();
    }
    let n = (queries * K) as f64;
    (store_hits as f64 / n, boot_hits as f64 / n)
}

/// Loads `data` into an empty store `s` and checks that its index, which starts from
/// first-inserted centroids, was retrained as it grew and finds far more of the true top 16
/// than first-inserted centroids on the same data.
async fn grows_and_retrains(
    s: &impl Indexed,
    data: &[(Uuid, pb::Pattern, QuantizedVector)],
    data_gen: &mut Clustered,
    lists: usize,
    probes: usize,
) {
    let info = settled(s, lists, 0).await;
    assert_eq!(info.trained_on, 0, "nothing to train on yet: {info:?}");
    load(s, data, 8).await;
    let info = settled(s, lists, data.len()).await;
    assert!(info.rebuilds >= 1 && info.trained_on >= lists * 64, "retrained as it grew: {info:?}");
    let (live, first_inserted) = recalls(s, data, data_gen, lists, probes).await;
    eprintln!("{info:?}: recall@{K} {live:.3}, first-inserted centroids {first_inserted:.3}");
    assert!(live >= 0.9, "recall@{K} {live:.3} after retraining");
    assert!(live >= first_inserted + 0.3, "{live:.3} vs first-inserted {first_inserted:.3}");
}

/// 8,192 vectors around 128 directions in 32 lists, 2 probed: the store's index, retrained
/// once as it grew past 2,048 vectors and trained on everything when reopened, finds far more
/// of the true top 16 than first-inserted centroids on the same data (measured: 0.97 live and
/// 1.00 reopened, against 0.50 and 0.46; 0.91 and 0.95 with the first, 16-per-list sample).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trained_centroids_find_the_neighbours_that_first_inserted_ones_miss() {
    let (lists, probes, n) = (32, 2, 8192);
    let mut data_gen = Clustered::new(1, 128, 0.08);
    let data: Vec<_> = (0..n).map(|_| pattern(&data_gen.vector(), 0.9)).collect();
    let dir = tempfile::tempdir().expect("tmp");
    let s = EmbeddedStore::open(&opts(dir.path(), lists, probes)).expect("open");
    grows_and_retrains(&s, &data, &mut data_gen, lists, probes).await;
    drop(s);

    let s = EmbeddedStore::open(&opts(dir.path(), lists, probes)).expect("reopen");
    let info = s.index_info().expect("info");
    assert_eq!((info.indexed, info.trained_on, info.rebuilding), (n, n, false), "{info:?}");
    let (reopened, first_inserted) = recalls(&s, &data, &mut data_gen, lists, probes).await;
    eprintln!("reopened: recall@{K} {reopened:.3}, first-inserted centroids {first_inserted:.3}");
    assert!(reopened >= 0.9, "recall@{K} {reopened:.3} after reopening");
    assert!(reopened >= first_inserted + 0.2, "{reopened:.3} vs {first_inserted:.3}");
}

/// Eight devices sync at once (adding, lowering below the shareable rate, removing) while the
/// index is retrained: when it settles, it holds exactly the shareable patterns, each found by
/// its own vector, and nothing removed or demoted is served.
async fn syncs_running_during_a_rebuild_lose_nothing<S: Indexed + 'static>(
    s: std::sync::Arc<S>,
    lists: usize,
) {
    let devices = 8usize;
    for d in 0..devices {
        s.register(&format!("d{d}"), "eu", 1_000, 1).await.expect("register");
    }
    s.register("asker", "eu", 1_000, 1).await.expect("register");
    let mut tasks = Vec::new();
    for d in 0..devices {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut vectors = Clustered::new(100 + d as u64, 16, 0.1);
            let mut kept: Vec<(Uuid, Vec<f32>)> = Vec::new();
            let mut gone: Vec<Uuid> = Vec::new();
            for version in 1..=24u64 {
                let added: Vec<_> = (0..64)
                    .map(|_| {
                        let v = vectors.vector();
                        let id = Uuid::now_v7();
                        (id, common::pattern_with(id, &v, 0.9), v)
                    })
                    .collect();
                // Every third sync demotes one kept pattern below the shareable rate and
                // removes another.
                let mut updated = Vec::new();
                let mut removed = Vec::new();
                if version % 3 == 0 && kept.len() >= 2 {
                    let (demoted, _) = kept.swap_remove(0);
                    updated.push(pb::PatternUpdate {
                        id: demoted.as_bytes().to_vec(),
                        success_rate: 0.45,
                        extra_samples: 1,
                    });
                    gone.push(demoted);
                    let (dropped, _) = kept.swap_remove(0);
                    removed.push(dropped);
                    gone.push(dropped);
                }
                let w = SyncWrite {
                    device_id: format!("d{d}"),
                    local_version: version,
                    added: added.iter().map(|(_, p, _)| p.clone()).collect(),
                    updated,
                    removed,
                    now_ms: 1,
                    ..Default::default()
                };
                assert!(s.apply_sync(w).await.expect("sync").applied);
                kept.extend(added.into_iter().map(|(id, _, v)| (id, v)));
            }
            (kept, gone)
        }));
    }
    let (mut kept, mut gone) = (Vec::new(), HashSet::new());
    for t in tasks {
        let (k, g) = t.await.expect("task");
        kept.extend(k);
        gone.extend(g);
    }
    let info = settled(&*s, lists, kept.len()).await;
    eprintln!("{info:?}");
    assert!(info.rebuilds >= 1, "the index was retrained while syncs ran: {info:?}");
    // Every 20th kept pattern (about 600) is looked up by its own vector.
    for (id, v) in kept.iter().step_by(20) {
        let found = s
            .similar(SimilarQuery {
                device_id: "asker".into(),
                interest: v.clone(),
                limit: K,
                min_quality: 0.8,
            })
            .await
            .expect("similar");
        let ids: Vec<Uuid> =
            found.iter().filter_map(|p| Uuid::from_slice(&p.pattern.id).ok()).collect();
        assert!(ids.contains(id), "{id} not found by its own vector");
        assert!(ids.iter().all(|i| !gone.contains(i)), "a removed or demoted pattern was served");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_syncs_running_during_a_rebuild_lose_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = EmbeddedStore::open(&opts(dir.path(), 8, 2)).expect("open");
    syncs_running_during_a_rebuild_lose_nothing(std::sync::Arc::new(s), 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_syncs_running_during_a_rebuild_lose_nothing() {
    let url = common::fresh_db().await;
    let s = PostgresStore::open(&pg_opts(&url, 8, 2)).await.expect("open");
    syncs_running_during_a_rebuild_lose_nothing(std::sync::Arc::new(s), 8).await;
}

/// The Postgres store started on an empty table: its index begins with first-inserted
/// centroids, retrains as syncs fill it (on its own session, while the follower keeps the old
/// one current) and ends with the recall of trained centroids; a second server process
/// opened on the same database trains on everything at its load (measured over six runs:
/// 0.97-1.00 live, 0.97-1.00 for the second process, against 0.50 for first-inserted
/// centroids; with the first, 16-per-list training sample the second process ranged
/// 0.78-0.97, depending on the block sample Postgres drew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_index_started_empty_is_retrained_as_it_grows() {
    let (lists, probes, n) = (32, 2, 8192);
    let mut data_gen = Clustered::new(1, 128, 0.08);
    let data: Vec<_> = (0..n).map(|_| pattern(&data_gen.vector(), 0.9)).collect();
    let url = common::fresh_db().await;
    let s = PostgresStore::open(&pg_opts(&url, lists, probes)).await.expect("open");
    grows_and_retrains(&s, &data, &mut data_gen, lists, probes).await;

    let other = PostgresStore::open(&pg_opts(&url, lists, probes)).await.expect("second");
    let info = settled(&other, lists, n).await;
    assert_eq!((info.trained_on, info.rebuilds), (n, 0), "trained at its load: {info:?}");
    let (loaded, _) = recalls(&other, &data, &mut data_gen, lists, probes).await;
    eprintln!("second process: recall@{K} {loaded:.3}");
    assert!(loaded >= 0.9, "recall@{K} {loaded:.3} of an index trained at load");
}
