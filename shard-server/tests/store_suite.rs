//! One test suite, run against both stores: the embedded store in a temporary directory and
//! Postgres + pgvector (a fresh database per test on the test server), the latter in both
//! similarity modes (`SIMILAR_INDEX=memory`, the default, and `pgvector`).

mod common;

use common::{pattern, pattern_with, unit_near};
use omega_protocol::pb;
use omega_shard::store::{Publish, SimilarIndex, SimilarQuery, Store, StoreError, SyncWrite};
use std::time::{Duration, Instant};
use uuid::Uuid;

fn write(device: &str, version: u64, added: Vec<pb::Pattern>) -> SyncWrite {
    let interest = added.first().and_then(|p| {
        let e = p.embedding.as_ref()?;
        Some(omega_protocol::vector::QuantizedVector::from_bytes(&e.values, e.scale).dequantize())
    });
    SyncWrite {
        device_id: device.into(),
        local_version: version,
        added,
        interest_add: interest,
        now_ms: 1_700_000_000_000,
        ..Default::default()
    }
}

async fn register_all(s: &dyn Store, ids: &[&str]) {
    for id in ids {
        s.register(id, "eu", 100, 1).await.expect("register");
    }
}

async fn ids_of(s: &dyn Store, min_quality: f32) -> Vec<(Uuid, String, f32, u32)> {
    s.settle().await.expect("settle");
    let page = s.export(None, 10_000, min_quality).await.expect("export");
    page.items
        .iter()
        .map(|i| {
            (
                Uuid::from_slice(&i.pattern.id).expect("id"),
                i.device_id.clone(),
                i.pattern.success_rate,
                i.pattern.sample_count,
            )
        })
        .collect()
}

async fn register_is_idempotent_and_capacity_is_enforced(s: &dyn Store) {
    let r = s.register("a", "eu", 2, 1).await.expect("a");
    assert!(r.created);
    let again = s.register("a", "us", 2, 1).await.expect("a again");
    assert_eq!((again.created, again.region.as_str()), (false, "eu"));
    s.register("b", "eu", 2, 1).await.expect("b");
    assert!(matches!(s.register("c", "eu", 2, 1).await, Err(StoreError::Capacity { max: 2 })));
    assert!(!s.register("b", "eu", 2, 1).await.expect("existing").created);
    assert_eq!(s.counts(0).await.expect("counts").devices_total, 2);
    // A limit beyond what the database's integers hold is no limit (it once wrapped to -1
    // in the Postgres store and refused every new device).
    assert!(s.register("d", "eu", u64::MAX, 1).await.expect("no limit").created);
}

async fn sync_applies_once_per_local_version(s: &dyn Store) {
    register_all(s, &["a"]).await;
    let first = s.apply_sync(write("a", 1, vec![pattern(1, 0.9), pattern(2, 0.9)])).await;
    let first = first.expect("v1");
    assert!(first.applied);
    assert_eq!(first.acknowledged_version, 1);
    assert!(first.interest.is_some());
    let replay = s.apply_sync(write("a", 1, vec![pattern(3, 0.9)])).await.expect("replay");
    assert!(!replay.applied);
    assert_eq!(replay.acknowledged_version, 1);
    assert_eq!(ids_of(s, 0.0).await.len(), 2, "a replay stores nothing");
    let jump = s.apply_sync(write("a", 5, vec![])).await.expect("v5");
    assert_eq!((jump.applied, jump.acknowledged_version), (true, 5));
    let stale = s.apply_sync(write("a", 4, vec![pattern(4, 0.9)])).await.expect("v4");
    assert_eq!((stale.applied, stale.acknowledged_version), (false, 5));
    assert_eq!(s.counts(0).await.expect("counts").patterns, 2);
}

async fn unknown_devices_are_refused(s: &dyn Store) {
    let r = s.apply_sync(write("ghost", 1, vec![pattern(1, 0.9)])).await;
    assert!(matches!(r, Err(StoreError::UnknownDevice)), "{r:?}");
}

/// Device a puts three patterns; device b removes and updates two of a's ids; then a removes
/// the first, lowers the second below the stored threshold and raises the third to 0.95.
/// `settle_after_puts` merges a's puts on their own first, so that b's and a's operations
/// land in one batch. Returns the third pattern's id, the only one that must be left.
async fn foreign_then_own_operations(s: &dyn Store, settle_after_puts: bool) -> Uuid {
    register_all(s, &["a", "b"]).await;
    let (p1, p2, p3) = (pattern(1, 0.9), pattern(2, 0.9), pattern(3, 0.9));
    let id = |p: &pb::Pattern| Uuid::from_slice(&p.id).expect("id");
    s.apply_sync(write("a", 1, vec![p1.clone(), p2.clone(), p3.clone()])).await.expect("a1");
    if settle_after_puts {
        s.settle().await.expect("settle a1 on its own");
    }
    let mut hostile = write("b", 1, vec![]);
    hostile.removed = vec![id(&p1)];
    hostile.updated =
        vec![pb::PatternUpdate { id: p2.id.clone(), success_rate: 0.1, extra_samples: 9 }];
    s.apply_sync(hostile).await.expect("b1");
    let mut own = write("a", 2, vec![]);
    own.removed = vec![id(&p1)];
    own.updated = vec![
        pb::PatternUpdate { id: p2.id.clone(), success_rate: 0.5, extra_samples: 1 },
        pb::PatternUpdate { id: p3.id.clone(), success_rate: 0.95, extra_samples: 2 },
    ];
    s.apply_sync(own).await.expect("a2");
    id(&p3)
}

async fn updates_and_removals_touch_only_own_patterns(s: &dyn Store) {
    let p3 = foreign_then_own_operations(s, false).await;
    let left = ids_of(s, 0.0).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, p3);
    assert_eq!(left[0].1, "a");
    assert!((left[0].2 - 0.95).abs() < 1e-6);
    assert_eq!(left[0].3, 3);
}

/// The stored-pattern count (Postgres keeps it as a counter in the merge) follows puts,
/// re-puts of an id, removals, drops below the stored quality, and ignores another device's id.
async fn pattern_count_follows_every_kind_of_change(s: &dyn Store) {
    register_all(s, &["a", "b"]).await;
    let count = || async { s.counts(0).await.expect("counts").patterns };
    let (p1, p2, p3) = (pattern(1, 0.9), pattern(2, 0.9), pattern(3, 0.9));
    let id = |p: &pb::Pattern| Uuid::from_slice(&p.id).expect("id");
    s.apply_sync(write("a", 1, vec![p1.clone(), p2.clone()])).await.expect("a1");
    s.settle().await.expect("settle");
    assert_eq!(count().await, 2);
    let mut again = p1.clone();
    again.success_rate = 0.95;
    s.apply_sync(write("a", 2, vec![again, p3.clone()])).await.expect("a2");
    s.settle().await.expect("settle");
    assert_eq!(count().await, 3, "a re-put id is not a new pattern");
    let mut w = write("a", 3, vec![]);
    w.removed = vec![id(&p2)];
    w.updated = vec![pb::PatternUpdate { id: p3.id.clone(), success_rate: 0.5, extra_samples: 1 }];
    s.apply_sync(w).await.expect("a3");
    s.settle().await.expect("settle");
    assert_eq!(count().await, 1, "a removal and a drop below 0.7");
    let mut stolen = pattern(4, 0.9);
    stolen.id = p1.id.clone();
    s.apply_sync(write("b", 1, vec![stolen, pattern(5, 0.9)])).await.expect("b1");
    s.settle().await.expect("settle");
    assert_eq!(count().await, 2, "another device's id is not stored");
    assert_eq!(ids_of(s, 0.0).await.len(), 2);
}

/// The invariant of what a TV receives: `similar` returns published aggregates that at least
/// k devices back, and never a device's pattern, however close and good it is.
async fn similar_serves_only_aggregates_with_k_sources(s: &dyn Store) {
    register_all(s, &["a", "b", "c"]).await;
    // Devices' patterns right on the query, of the best quality.
    let mut device_ids = Vec::new();
    for (i, d) in ["a", "b", "c"].iter().enumerate() {
        let p = pattern_with(Uuid::now_v7(), &unit_near(0, i as u64), 0.99);
        device_ids.push(p.id.clone());
        s.apply_sync(write(d, 1, vec![p])).await.expect("sync");
    }
    // Aggregates near the query backed by 1, 2, 3 and 5 devices, and one of low quality.
    let with = |sources: u32, quality: f32| pb::AggregatedPattern {
        source_devices: sources,
        quality,
        ..aggregate(0, &format!("content-{sources}-{quality}"))
    };
    let published = vec![with(1, 0.95), with(2, 0.95), with(3, 0.9), with(5, 0.92), with(9, 0.5)];
    s.publish(round_one(published.clone())).await.expect("publish");
    s.settle().await.expect("settle");
    let k = 3;
    let q =
        || SimilarQuery { interest: unit_near(0, 9), limit: 10, min_quality: 0.8, min_sources: k };
    let served = wait_similar(s, q, Duration::from_secs(5), |ids| ids.len() == 2).await;
    eprintln!("aggregates servable after {served:?}");
    let found = s.similar(q()).await.expect("similar");
    let below_k = found.iter().filter(|p| p.sources < k).count();
    assert_eq!(below_k, 0, "served patterns with fewer than k sources: {found:?}");
    let k_or_more: Vec<&Vec<u8>> = published
        .iter()
        .filter(|a| a.source_devices >= k && a.quality >= 0.8)
        .map(|a| &a.id)
        .collect();
    for p in &found {
        assert!(k_or_more.contains(&&p.pattern.id), "not a servable aggregate: {p:?}");
        assert!(!device_ids.contains(&p.pattern.id), "a device's pattern was served");
        let a = published.iter().find(|a| a.id == p.pattern.id).expect("published");
        assert_eq!(p.sources, a.source_devices);
    }
    assert_eq!(found.len(), 2, "both aggregates with k or more sources: {found:?}");
    // With k = 1 the smaller aggregates are servable, and still no device pattern.
    let all = s.similar(SimilarQuery { min_sources: 1, ..q() }).await.expect("similar");
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(all.iter().all(|p| !device_ids.contains(&p.pattern.id)));
}

/// Before any round, nothing is served, whatever the devices uploaded.
async fn device_patterns_are_never_served_before_a_round(s: &dyn Store) {
    register_all(s, &["a", "b"]).await;
    let p = pattern_with(Uuid::now_v7(), &unit_near(0, 1), 0.95);
    s.apply_sync(write("a", 1, vec![p.clone()])).await.expect("a1");
    s.settle().await.expect("settle");
    let q = SimilarQuery { interest: unit_near(0, 9), limit: 10, min_quality: 0.0, min_sources: 1 };
    assert!(similar_ids(s, q).await.is_empty());
    assert_eq!(ids_of(s, 0.0).await.len(), 1, "stored for the federation, not served");
}

async fn export_pages_in_id_order_with_a_cursor(s: &dyn Store) {
    register_all(s, &["a", "b"]).await;
    for v in 1..=5u64 {
        let added: Vec<_> =
            (0..6).map(|i| pattern(v * 10 + i, if i == 0 { 0.75 } else { 0.9 })).collect();
        let device = if v % 2 == 0 { "a" } else { "b" };
        s.apply_sync(write(device, v, added)).await.expect("sync");
    }
    s.settle().await.expect("settle");
    let mut cursor = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = s.export(cursor, 10, 0.8).await.expect("export");
        pages += 1;
        for i in &page.items {
            assert!(i.pattern.success_rate >= 0.8);
            assert_eq!(i.region, "eu");
            assert!(i.device_id == "a" || i.device_id == "b");
            seen.push(Uuid::from_slice(&i.pattern.id).expect("id"));
        }
        cursor = seen.last().copied();
        if page.last {
            break;
        }
        assert!(pages < 10, "export does not end");
    }
    assert_eq!(seen.len(), 25);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "strictly increasing ids");
    assert_eq!(s.export(None, 100, 0.0).await.expect("all").items.len(), 30);
}

/// A pattern uploaded without its embedding (its content's vector is public) is stored,
/// updated, exported with its content id and no embedding, and never indexed; its device's
/// contents list it. One with an embedding beside it is unaffected.
async fn patterns_without_embedding_are_stored_and_exported(s: &dyn Store) {
    register_all(s, &["a"]).await;
    let with = pattern_with(Uuid::now_v7(), &unit_near(0, 1), 0.9);
    let mut without = pattern_with(Uuid::now_v7(), &unit_near(0, 2), 0.85);
    without.embedding = None;
    without.content_id = "public-content".into();
    s.apply_sync(write("a", 1, vec![with.clone(), without.clone()])).await.expect("a1");
    let update = pb::PatternUpdate { id: without.id.clone(), success_rate: 0.95, extra_samples: 2 };
    let w = SyncWrite { updated: vec![update], ..write("a", 2, vec![]) };
    s.apply_sync(w).await.expect("a2");
    s.settle().await.expect("settle");
    let page = s.export(None, 100, 0.8).await.expect("export");
    assert_eq!(page.items.len(), 2, "{:?}", page.items);
    let got = page.items.iter().find(|i| i.pattern.id == without.id).expect("exported");
    assert!(got.pattern.embedding.is_none());
    assert_eq!(got.pattern.content_id, "public-content");
    assert_eq!((got.pattern.success_rate, got.pattern.sample_count), (0.95, 3));
    let other = page.items.iter().find(|i| i.pattern.id == with.id).expect("exported");
    assert_eq!(other.pattern.embedding, with.embedding);
    assert!(s.device_contents("a").await.expect("contents").contains(&"public-content".into()));
    let q = SimilarQuery { interest: unit_near(0, 2), limit: 10, min_quality: 0.0, min_sources: 1 };
    assert!(similar_ids(s, q).await.is_empty(), "device patterns are never served");
    assert_eq!(s.counts(0).await.expect("counts").patterns, 2);
}

/// The first round (`r1`, version 1, no trends) publishing `patterns`.
fn round_one(patterns: Vec<pb::AggregatedPattern>) -> Publish {
    Publish { round_id: "r1".into(), global_version: 1, patterns, trends: vec![] }
}

fn aggregate(axis: usize, content: &str) -> pb::AggregatedPattern {
    pb::AggregatedPattern {
        id: Uuid::now_v7().as_bytes().to_vec(),
        content_id: content.into(),
        embedding: Some(common::embedding(&unit_near(axis, 5))),
        quality: 0.92,
        source_devices: 4,
        total_samples: 40,
        context: Some(pb::PatternContext {
            time_slot: 3,
            genres: vec!["drama".into()],
            ..Default::default()
        }),
        region: "eu".into(),
    }
}

async fn publish_is_idempotent_and_serves_aggregates_and_trends(s: &dyn Store) {
    assert_eq!(s.global().await.expect("global").version, 0);
    let trends = vec![
        pb::TrendSignal {
            target: Some(pb::trend_signal::Target::Centroid(common::embedding(&unit_near(3, 1)))),
            score: 1.0,
            region: String::new(),
        },
        pb::TrendSignal {
            target: Some(pb::trend_signal::Target::ContentId("hit".into())),
            score: 2.0,
            region: "eu".into(),
        },
    ];
    let publish = |round: &str, version: u64| Publish {
        round_id: round.into(),
        global_version: version,
        patterns: vec![aggregate(0, "agg-content"), aggregate(5, "")],
        trends: trends.clone(),
    };
    let p = s.publish(publish("r1", 5)).await.expect("r1");
    assert_eq!((p.applied, p.global_version), (true, 5));
    let again = s.publish(publish("r1", 9)).await.expect("r1 again");
    assert_eq!((again.applied, again.global_version), (false, 5));
    let p2 = s.publish(publish("r2", 0)).await.expect("r2");
    assert_eq!((p2.applied, p2.global_version), (true, 6));
    let g = s.global().await.expect("global");
    assert_eq!((g.version, g.round_id.as_str()), (6, "r2"));
    assert_eq!(g.trends.len(), 2);
    assert_eq!(g.trends[0].score, 2.0, "highest first");
    register_all(s, &["a"]).await;
    let found = s
        .similar(SimilarQuery {
            interest: unit_near(0, 8),
            limit: 5,
            min_quality: 0.8,
            min_sources: 3,
        })
        .await
        .expect("similar");
    assert_eq!(found.len(), 1, "only the aggregate with a content id is servable: {found:?}");
    assert_eq!(found[0].sources, 4);
    assert_eq!(found[0].pattern.content_id, "agg-content");
    assert!(omega_protocol::validate::check_pattern("p", &found[0].pattern).is_ok());
}

async fn device_contents_lists_each_content_once(s: &dyn Store) {
    register_all(s, &["a", "b"]).await;
    assert!(s.device_contents("a").await.expect("none yet").is_empty());
    assert!(s.device_contents("ghost").await.expect("unknown device").is_empty());
    let with = |seed: u64, content: &str| {
        let mut p = pattern(seed, 0.9);
        p.content_id = content.into();
        p
    };
    let (x1, x2, y, gone) = (with(1, "x"), with(2, "x"), with(3, "y"), with(4, "gone"));
    let gone_id = gone.id.clone();
    s.apply_sync(write("a", 1, vec![x1, x2, y, gone])).await.expect("a");
    s.apply_sync(write("b", 1, vec![with(5, "z")])).await.expect("b");
    let removal = SyncWrite {
        removed: vec![Uuid::from_slice(&gone_id).expect("id")],
        ..write("a", 2, vec![])
    };
    s.apply_sync(removal).await.expect("remove");
    s.settle().await.expect("settle");
    let mut got = s.device_contents("a").await.expect("a");
    got.sort();
    assert_eq!(got, vec!["x".to_owned(), "y".to_owned()]);
    assert_eq!(s.device_contents("b").await.expect("b"), vec!["z".to_owned()]);
}

async fn aggregates_are_what_the_last_publish_installed(s: &dyn Store) {
    assert!(s.aggregates().await.expect("before any round").is_empty());
    let first = vec![aggregate(0, "one"), aggregate(1, "two"), aggregate(2, "")];
    s.publish(round_one(first.clone())).await.expect("r1");
    let by_id = |mut v: Vec<pb::AggregatedPattern>| {
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    let got = by_id(s.aggregates().await.expect("r1 aggregates"));
    let want = by_id(first);
    assert_eq!(got.len(), 3, "an aggregate without a content id is still published");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.id, &g.content_id, g.quality), (&w.id, &w.content_id, w.quality));
        assert_eq!((g.source_devices, g.total_samples), (w.source_devices, w.total_samples));
        assert_eq!((&g.context, &g.region), (&w.context, &w.region));
        let (ge, we) = (g.embedding.as_ref().expect("e"), w.embedding.as_ref().expect("e"));
        let diff = ge.values.iter().zip(&we.values).map(|(a, b)| (*a as i8 - *b as i8).abs());
        assert!(diff.max().unwrap_or(0) <= 1, "int8 values survive");
        assert!((ge.scale - we.scale).abs() <= we.scale * 0.01);
    }
    let second = vec![aggregate(3, "three")];
    s.publish(Publish {
        round_id: "r2".into(),
        global_version: 2,
        patterns: second.clone(),
        trends: vec![],
    })
    .await
    .expect("r2");
    let got = s.aggregates().await.expect("r2 aggregates");
    assert_eq!(got.len(), 1, "a round replaces the previous aggregates");
    assert_eq!(got[0].id, second[0].id);
}

fn query_for(axis: usize) -> SimilarQuery {
    SimilarQuery { interest: unit_near(axis, 9), limit: 10, min_quality: 0.8, min_sources: 3 }
}

async fn similar_ids(s: &dyn Store, q: SimilarQuery) -> Vec<Vec<u8>> {
    match s.similar(q).await {
        Ok(found) => found.into_iter().map(|p| p.pattern.id).collect(),
        // The in-memory index answers UNAVAILABLE until its first load is done.
        Err(StoreError::Unavailable(_)) => Vec::new(),
        Err(e) => panic!("similar: {e}"),
    }
}

/// Polls `similar` until `done` holds, for at most `within`; returns how long it took.
async fn wait_similar(
    s: &dyn Store,
    q: impl Fn() -> SimilarQuery,
    within: Duration,
    done: impl Fn(&[Vec<u8>]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let ids = similar_ids(s, q()).await;
        if done(&ids) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "not within {within:?}; similar = {ids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Without `settle()`: what the background steps give. A published round is offered to devices
/// within a bounded time; devices' own patterns never are, however long one waits.
async fn a_published_round_reaches_devices_promptly_and_patterns_never_do(s: &dyn Store) {
    register_all(s, &["a", "b"]).await;
    let p = pattern_with(Uuid::now_v7(), &unit_near(0, 1), 0.9);
    s.apply_sync(write("a", 1, vec![p.clone()])).await.expect("a1");
    let agg = aggregate(0, "agg-content");
    s.publish(round_one(vec![agg.clone()])).await.expect("publish");
    let bound = Duration::from_secs(3);
    let took = wait_similar(s, || query_for(0), bound, |ids| ids.contains(&agg.id)).await;
    eprintln!("servable after {took:?}");
    s.settle().await.expect("settle");
    assert_eq!(similar_ids(s, query_for(0)).await, vec![agg.id.clone()], "never the pattern");
}

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            use omega_shard::store::{StoreOptions, embedded::EmbeddedStore};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let dir = tempfile::tempdir().expect("tmp");
                    let s = EmbeddedStore::open(&StoreOptions::embedded(dir.path())).expect("open");
                    super::$case(&s).await;
                }
            )*
        }
        mod postgres {
            use omega_shard::store::{StoreOptions, postgres::PostgresStore};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let url = super::common::fresh_db().await;
                    let s = PostgresStore::open(&StoreOptions::postgres(&url)).await.expect("open");
                    super::$case(&s).await;
                }
            )*
        }
        mod postgres_pgvector {
            use omega_shard::store::{SimilarIndex, StoreOptions, postgres::PostgresStore};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let url = super::common::fresh_db().await;
                    let opts = StoreOptions {
                        similar_index: SimilarIndex::Pgvector,
                        ..StoreOptions::postgres(&url)
                    };
                    let s = PostgresStore::open(&opts).await.expect("open");
                    super::$case(&s).await;
                }
            )*
        }
    };
}

suite!(
    register_is_idempotent_and_capacity_is_enforced,
    sync_applies_once_per_local_version,
    unknown_devices_are_refused,
    updates_and_removals_touch_only_own_patterns,
    pattern_count_follows_every_kind_of_change,
    similar_serves_only_aggregates_with_k_sources,
    device_patterns_are_never_served_before_a_round,
    export_pages_in_id_order_with_a_cursor,
    publish_is_idempotent_and_serves_aggregates_and_trends,
    device_contents_lists_each_content_once,
    aggregates_are_what_the_last_publish_installed,
    a_published_round_reaches_devices_promptly_and_patterns_never_do,
    patterns_without_embedding_are_stored_and_exported,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_state_survives_reopen() {
    use omega_shard::store::{StoreOptions, embedded::EmbeddedStore};
    let dir = tempfile::tempdir().expect("tmp");
    let opts = StoreOptions::embedded(dir.path());
    {
        let s = EmbeddedStore::open(&opts).expect("open");
        register_all(&s, &["a"]).await;
        s.apply_sync(write("a", 1, vec![pattern(1, 0.9)])).await.expect("sync");
        s.publish(Publish {
            round_id: "r".into(),
            global_version: 3,
            patterns: vec![],
            trends: vec![],
        })
        .await
        .expect("publish");
    }
    let s = EmbeddedStore::open(&opts).expect("reopen");
    assert_eq!(s.counts(0).await.expect("counts").patterns, 1);
    assert_eq!(s.device_contents("a").await.expect("contents").len(), 1, "index rebuilt");
    assert_eq!(s.global().await.expect("global").version, 3);
    assert!(
        !s.publish(Publish {
            round_id: "r".into(),
            global_version: 9,
            patterns: vec![],
            trends: vec![]
        })
        .await
        .expect("again")
        .applied
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_go_to_the_read_replicas() {
    use omega_shard::store::{StoreOptions, postgres::PostgresStore};
    let url = common::fresh_db().await;
    // Similarity queries read the replicas on the SQL path; the in-memory one: next test.
    let pgvector = |url: &str| StoreOptions {
        similar_index: SimilarIndex::Pgvector,
        ..StoreOptions::postgres(url)
    };
    let primary = PostgresStore::open(&pgvector(&url)).await.expect("open");
    register_all(&primary, &["a", "b"]).await;
    let p = pattern_with(Uuid::now_v7(), &unit_near(0, 1), 0.9);
    primary.apply_sync(write("a", 1, vec![p.clone()])).await.expect("sync");
    let round = round_one(vec![aggregate(0, "agg-content")]);
    primary.publish(round).await.expect("publish");
    primary.settle().await.expect("settle");
    // A "replica" that is the same database: reads work through it.
    let mut opts = pgvector(&url);
    opts.read_urls = vec![url.clone(), url.clone()];
    let s = PostgresStore::open(&opts).await.expect("open with replicas");
    for _ in 0..3 {
        let found = s
            .similar(SimilarQuery {
                interest: unit_near(0, 2),
                limit: 5,
                min_quality: 0.8,
                min_sources: 3,
            })
            .await
            .expect("similar via a replica");
        assert_eq!(found.len(), 1);
    }
    // A replica that cannot be reached fails the reads it serves with UNAVAILABLE, not a
    // panic or a hang (exports read the primary: next test).
    let mut opts = pgvector(&url);
    opts.read_urls = vec![format!("postgres://omega@127.0.0.1:{}/x", common::free_port())];
    let s = PostgresStore::open(&opts).await.expect("open");
    let r = s
        .similar(SimilarQuery {
            interest: unit_near(0, 2),
            limit: 5,
            min_quality: 0.8,
            min_sources: 3,
        })
        .await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    let r = s.device_contents("a").await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}

/// A replica that lags (here: one that never received anything, the extreme case) must not
/// make an export miss acknowledged syncs or the global version go stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_exports_and_global_version_read_the_primary_not_a_lagging_replica() {
    use omega_shard::store::{StoreOptions, postgres::PostgresStore};
    let url = common::fresh_db().await;
    let stale = common::fresh_db().await;
    // Migrated, so every query works there, but it will never see the writes below.
    drop(PostgresStore::open(&StoreOptions::postgres(&stale)).await.expect("migrate replica"));
    // The SQL similarity path, which reads the replicas (shown at the end).
    let mut opts = StoreOptions::postgres(&url);
    opts.similar_index = SimilarIndex::Pgvector;
    opts.read_urls = vec![stale];
    let s = PostgresStore::open(&opts).await.expect("open");
    register_all(&s, &["a", "b"]).await;
    let p = pattern_with(Uuid::now_v7(), &unit_near(0, 1), 0.9);
    s.apply_sync(write("a", 1, vec![p.clone(), pattern(2, 0.95)])).await.expect("sync");
    let published = s
        .publish(Publish {
            round_id: "r1".into(),
            global_version: 7,
            patterns: vec![],
            trends: vec![],
        })
        .await
        .expect("publish");
    assert_eq!(published.global_version, 7);

    // No settle(): the export itself must bring in everything acknowledged.
    let page = s.export(None, 100, 0.8).await.expect("export");
    assert_eq!(page.items.len(), 2, "the export missed acknowledged patterns");
    assert!(page.items.iter().any(|i| i.pattern.id == p.id));
    assert_eq!(s.global().await.expect("global").version, 7);
    // The replica really is in use: similarity reads it, and it has nothing.
    s.settle().await.expect("settle");
    let found = s
        .similar(SimilarQuery {
            interest: unit_near(0, 2),
            limit: 5,
            min_quality: 0.8,
            min_sources: 3,
        })
        .await
        .expect("similar via the replica");
    assert!(found.is_empty(), "similar should have read the (empty) replica: {found:?}");
}

/// Intake sequence numbers are taken at insert time but become visible at commit, so a row
/// with a lower seq can commit while a merge is working on higher ones. The merge must not
/// delete it unmerged. The interleaving is forced: another session inserts such a row and,
/// in the same transaction, a `patterns` row the merge will conflict with (so the merge waits
/// for that transaction between reading the intake and deleting what it read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_merge_keeps_intake_rows_that_commit_out_of_seq_order() {
    use omega_shard::store::{StoreOptions, postgres::PostgresStore};
    use sqlx::Connection;
    use std::time::Duration;
    let url = common::fresh_db().await;
    let mut opts = StoreOptions::postgres(&url);
    opts.merge_interval = Duration::from_secs(3600); // only settle() merges
    let s = PostgresStore::open(&opts).await.expect("open");
    register_all(&s, &["a", "b"]).await;
    let late = Uuid::now_v7();
    let q = pattern(2, 0.9);
    let q_id = Uuid::from_slice(&q.id).expect("id");

    let mut x = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut x).await.expect("begin");
    let row = "$2, 'late-content', array_fill(0.05, ARRAY[384])::vector, 0.9, 1, 3, 1, 1,";
    sqlx::query(&format!(
        "INSERT INTO pattern_intake (device_id, op, pattern_id, content_id, embedding,
             success_rate, sample_count, time_slot, day_type, content_type, genres,
             created_at_ms, updated_at_ms)
         VALUES ($1, 1, {row} ARRAY['drama'], 0, 0)"
    ))
    .bind("a")
    .bind(late)
    .execute(&mut x)
    .await
    .expect("intake row with the lower seq, not committed");
    s.apply_sync(write("b", 1, vec![q])).await.expect("b's sync commits a higher seq");
    sqlx::query(&format!(
        "INSERT INTO patterns (device_id, id, content_id, embedding, success_rate, sample_count,
             time_slot, day_type, content_type, genres, created_at_ms, updated_at_ms, index_seq)
         VALUES ($1, {row} ARRAY['drama'], 0, 0, 0)"
    ))
    .bind("b")
    .bind(q_id)
    .execute(&mut x)
    .await
    .expect("a patterns row the merge will wait for");

    let merging = tokio::spawn(async move {
        s.settle().await.expect("settle");
        s
    });
    let mut watch = sqlx::PgConnection::connect(&url).await.expect("connect");
    common::wait_for_lock_waiter(&mut watch, "the merge never waited on the open transaction")
        .await;
    sqlx::query("COMMIT").execute(&mut x).await.expect("commit");
    let _s = merging.await.expect("merge task");
    let merged: i64 = sqlx::query_scalar("SELECT count(*) FROM patterns WHERE id = $1")
        .bind(late)
        .fetch_one(&mut watch)
        .await
        .expect("count");
    assert_eq!(merged, 1, "the late-committed intake row was deleted without being merged");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pattern_intake")
        .fetch_one(&mut watch)
        .await
        .expect("intake");
    assert_eq!(left, 0);
}

/// The indexer pauses between batches while syncs flow; once they stop for a second it
/// catches up batch after batch. With a pause far longer than the test, a backlog of ten
/// batches drains only through that catch-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_indexer_catches_up_without_pauses_when_syncs_stop() {
    use omega_shard::store::{StoreOptions, postgres::PostgresStore};
    use sqlx::Connection;
    use std::time::{Duration, Instant};
    let url = common::fresh_db().await;
    let mut opts = StoreOptions::postgres(&url);
    opts.similar_index = SimilarIndex::Pgvector; // the indexer runs only in this mode
    opts.merge_interval = Duration::from_millis(50);
    opts.index_interval = Duration::from_secs(3);
    opts.index_batch = 20;
    let s = PostgresStore::open(&opts).await.expect("open");
    register_all(&s, &["a"]).await;
    for v in 0..2u64 {
        let added = (0..100).map(|i| pattern(v * 100 + i, 0.9)).collect();
        s.apply_sync(write("a", v + 1, added)).await.expect("sync");
    }
    let started = Instant::now();
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    loop {
        let indexed: i64 = sqlx::query_scalar("SELECT count(*) FROM pattern_vectors")
            .fetch_one(&mut db)
            .await
            .expect("count");
        if indexed == 200 {
            break;
        }
        // Paused between batches, 10 batches would take 30 s.
        assert!(started.elapsed() < Duration::from_secs(15), "{indexed} of 200 indexed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Another device's removal and update of ids it does not own, merged in the same batch as
/// the owner's own removal and update of them (the owner's puts merged earlier), must not
/// hide the owner's operations.
async fn foreign_operations_do_not_hide_the_owners_in_one_batch(s: &dyn Store) {
    let p3 = foreign_then_own_operations(s, true).await;
    let left = ids_of(s, 0.0).await; // one settle: b1 and a2 in one merge
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!((left[0].0, left[0].1.as_str(), left[0].3), (p3, "a", 3));
    assert_eq!(s.counts(0).await.expect("counts").patterns, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_foreign_operations_do_not_hide_the_owners_in_one_batch() {
    use omega_shard::store::{StoreOptions, embedded::EmbeddedStore};
    let dir = tempfile::tempdir().expect("tmp");
    let s = EmbeddedStore::open(&StoreOptions::embedded(dir.path())).expect("open");
    foreign_operations_do_not_hide_the_owners_in_one_batch(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_foreign_operations_do_not_hide_the_owners_in_one_batch() {
    use omega_shard::store::{StoreOptions, postgres::PostgresStore};
    let url = common::fresh_db().await;
    let mut opts = StoreOptions::postgres(&url);
    opts.merge_interval = std::time::Duration::from_secs(3600); // only settle() merges
    let s = PostgresStore::open(&opts).await.expect("open");
    foreign_operations_do_not_hide_the_owners_in_one_batch(&s).await;
}

/// With the in-memory index, similarity queries never touch the database: an unreachable read
/// replica fails only the reads that still go there (device contents).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_memory_index_serves_similar_without_the_read_replicas() {
    use omega_shard::store::{StoreOptions, postgres::PostgresStore};
    let url = common::fresh_db().await;
    let mut opts = StoreOptions::postgres(&url);
    opts.read_urls = vec![format!("postgres://omega@127.0.0.1:{}/x", common::free_port())];
    let s = PostgresStore::open(&opts).await.expect("open");
    register_all(&s, &["a", "b"]).await;
    let p = pattern_with(Uuid::now_v7(), &unit_near(0, 1), 0.9);
    s.apply_sync(write("a", 1, vec![p.clone()])).await.expect("sync");
    let agg = aggregate(0, "agg-content");
    let round = round_one(vec![agg.clone()]);
    s.publish(round).await.expect("publish");
    s.settle().await.expect("settle");
    assert_eq!(similar_ids(&s, query_for(0)).await, vec![agg.id.clone()]);
    let r = s.device_contents("a").await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}

/// Two server processes on one database: `b` never merges (its merge interval is an hour), so
/// everything it serves it learnt by following the generations `a`'s merges committed, and
/// the removal tombstones they left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_second_process_follows_merges_it_did_not_run() {
    use omega_shard::store::{StoreOptions, postgres::PostgresStore};
    let url = common::fresh_db().await;
    let a = PostgresStore::open(&StoreOptions::postgres(&url)).await.expect("open a");
    let mut opts = StoreOptions::postgres(&url);
    opts.merge_interval = Duration::from_secs(3600);
    let b = PostgresStore::open(&opts).await.expect("open b");
    register_all(&a, &["tv1", "tv2"]).await;
    let p = pattern_with(Uuid::now_v7(), &unit_near(0, 1), 0.9);
    let q = pattern_with(Uuid::now_v7(), &unit_near(0, 2), 0.9);
    let low = pattern_with(Uuid::now_v7(), &unit_near(0, 3), 0.75);
    a.apply_sync(write("tv1", 1, vec![p.clone(), q.clone(), low.clone()])).await.expect("sync");
    let bound = Duration::from_secs(4);
    let indexed = |n: usize| {
        let b = &b;
        async move {
            let started = Instant::now();
            while b.memory_index_info().ok().flatten().map(|i| i.indexed) != Some(n) {
                assert!(started.elapsed() < bound, "not {n} indexed within {bound:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            started.elapsed()
        }
    };
    eprintln!("followed on the other process after {:?}", indexed(2).await);
    assert!(similar_ids(&b, query_for(0)).await.is_empty(), "a device pattern was served");
    // A removal (a tombstone), a drop below 0.8 (a row with a new generation) and a rise
    // above it.
    let mut w = write("tv1", 2, vec![]);
    w.removed = vec![Uuid::from_slice(&p.id).expect("id")];
    w.updated = vec![
        pb::PatternUpdate { id: q.id.clone(), success_rate: 0.75, extra_samples: 1 },
        pb::PatternUpdate { id: low.id.clone(), success_rate: 0.95, extra_samples: 1 },
    ];
    a.apply_sync(w).await.expect("sync 2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    indexed(1).await;
    assert!(similar_ids(&b, query_for(0)).await.is_empty(), "a device pattern was served");
    // A round published through `a` reaches `b`: at once through `aggregates()` (which catches
    // up first), and in `similar`.
    let agg = aggregate(0, "agg-content");
    a.publish(round_one(vec![agg.clone()])).await.expect("publish");
    let got = b.aggregates().await.expect("aggregates");
    assert_eq!(got.iter().map(|x| &x.id).collect::<Vec<_>>(), vec![&agg.id]);
    wait_similar(&b, || query_for(0), bound, |ids| ids == [agg.id.clone()]).await;
    assert_eq!(b.memory_index_info().expect("index info").map(|i| i.indexed), Some(1));
}

/// A restarted process rebuilds its index from the database: the same answers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_rebuilds_the_memory_index() {
    use omega_shard::store::{StoreOptions, postgres::PostgresStore};
    let url = common::fresh_db().await;
    let opts = StoreOptions::postgres(&url);
    let kept = pattern_with(Uuid::now_v7(), &unit_near(0, 1), 0.9);
    let before = {
        let s = PostgresStore::open(&opts).await.expect("open");
        register_all(&s, &["a", "b"]).await;
        let gone = pattern_with(Uuid::now_v7(), &unit_near(0, 2), 0.9);
        let added: Vec<_> = (0..300).map(|i| pattern(i, 0.9)).collect();
        s.apply_sync(write("a", 1, [vec![kept.clone(), gone.clone()], added].concat()))
            .await
            .expect("sync");
        let mut w = write("a", 2, vec![]);
        w.removed = vec![Uuid::from_slice(&gone.id).expect("id")];
        s.apply_sync(w).await.expect("remove");
        let round = round_one(vec![aggregate(0, "near"), aggregate(7, "far")]);
        s.publish(round).await.expect("publish");
        s.settle().await.expect("settle");
        assert_eq!(s.memory_index_info().expect("index info").map(|i| i.indexed), Some(301));
        let found = similar_ids(&s, query_for(0)).await;
        s.flush().await.expect("flush");
        found
    };
    assert_eq!(before.len(), 2, "the two aggregates, nearest first: {before:?}");
    assert!(!before.contains(&kept.id));
    let s = PostgresStore::open(&opts).await.expect("reopen");
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.check_ready().await.is_err() {
        assert!(Instant::now() < deadline, "not ready: {:?}", s.check_ready().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.memory_index_info().expect("index info").map(|i| i.indexed), Some(301));
    assert_eq!(similar_ids(&s, query_for(0)).await, before);
}

/// A process whose cursor is below pruned tombstones cannot know what was removed: it reloads.
/// The pruning itself records the highest generation it deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_follower_behind_pruned_tombstones_reloads() {
    use omega_shard::store::{StoreOptions, postgres::PostgresStore};
    use sqlx::Connection;
    let url = common::fresh_db().await;
    let s = PostgresStore::open(&StoreOptions::postgres(&url)).await.expect("open");
    register_all(&s, &["a", "b"]).await;
    let p = pattern_with(Uuid::now_v7(), &unit_near(0, 1), 0.9);
    let q = pattern_with(Uuid::now_v7(), &unit_near(0, 2), 0.9);
    s.apply_sync(write("a", 1, vec![p.clone(), q.clone()])).await.expect("sync");
    s.settle().await.expect("settle");
    assert_eq!(s.memory_index_info().expect("index info").map(|i| i.indexed), Some(2));
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");

    // Pruning: an old tombstone goes, and the generation it had is recorded.
    let mut w = write("a", 2, vec![]);
    w.removed = vec![Uuid::from_slice(&p.id).expect("id")];
    s.apply_sync(w).await.expect("remove");
    s.settle().await.expect("settle");
    let g: i64 = sqlx::query_scalar("SELECT index_seq FROM pattern_removals")
        .fetch_one(&mut db)
        .await
        .expect("one tombstone");
    sqlx::query("UPDATE pattern_removals SET removed_at = now() - interval '2 hours'")
        .execute(&mut db)
        .await
        .expect("age it");
    s.prune_tombstones().await.expect("prune");
    let (left, pruned_to): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pattern_removals), removals_pruned_to FROM merge_state",
    )
    .fetch_one(&mut db)
    .await
    .expect("state");
    assert_eq!((left, pruned_to), (0, g));

    // A merge this process never followed, whose tombstone is already pruned (written as the
    // merge and a later prune would leave it).
    sqlx::query(
        "WITH gone AS (DELETE FROM patterns WHERE id = $1 RETURNING 1),
              g AS (SELECT nextval('pattern_index_gen') AS g FROM gone)
         UPDATE merge_state SET generation = g.g, removals_pruned_to = g.g, patterns = patterns - 1
         FROM g",
    )
    .bind(Uuid::from_slice(&q.id).expect("id"))
    .execute(&mut db)
    .await
    .expect("unfollowable merge");
    s.settle().await.expect("settle reloads");
    assert_eq!(s.memory_index_info().expect("index info").map(|i| i.indexed), Some(0));
}
