//! Collaborative serving end to end: a running `omega-shard`, aggregates published through
//! `ShardAdmin.PublishGlobal` as a federation round does, devices syncing over gRPC.
//!
//! The synthetic catalog: 40 contents `c00`..`c39` with collaborative vectors of varying
//! lengths. The device watched `c00` (A, |a| = 0.95) and `c01` (B, |a| = 0.76), both along
//! axis 0, so `q ≈ 1.65·e0 + 0.3·e1` and the best candidates are `c02`..`c06` (largest axis-0
//! parts, in that order). Its own patterns' MiniLM embeddings point along axis 100, like the
//! audience profiles (MiniLM-space main aggregates) of `c30`..`c39`: the interest-based path
//! would serve those first, and never a collaborative vector.

mod common;

use common::{Shard, delta, pattern_with, register, sync_request, unit_near};
use omega_protocol::pb;
use omega_protocol::pb::constellation_client::ConstellationClient;
use omega_protocol::pb::shard_admin_client::ShardAdminClient;
use omega_protocol::types::{aggregate_id, collaborative_vector_id, content_aggregate_id};
use omega_protocol::vector::EMBEDDING_DIM;
use omega_shard::sync::DOWN_BUDGET_BYTES;
use std::collections::HashSet;
use std::time::Duration;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;
use uuid::Uuid;

const CONTENTS: usize = 40;
const SERIES: &str = "shard_collab_served_total{shard_id=\"1\"}";

fn content(i: usize) -> String {
    format!("c{i:02}")
}

fn vector(parts: &[(usize, f32)]) -> Vec<f32> {
    let mut v = vec![0.0f32; EMBEDDING_DIM];
    for &(axis, x) in parts {
        v[axis] += x;
    }
    v
}

/// Collaborative vector of content `i` (never re-normalised: the length is the evidence).
fn collab_vector(i: usize) -> Vec<f32> {
    match i {
        0 => vector(&[(0, 0.95)]),
        1 => vector(&[(0, 0.7), (1, 0.3)]),
        2..=6 => vector(&[(0, 0.8 - 0.1 * (i - 2) as f32), (10 + i, 0.3)]),
        _ => {
            let side = 0.3 + 0.02 * (i - 7) as f32;
            let mut parts = vec![(0, 0.2 - 0.005 * (i - 7) as f32), (50 + i, side)];
            if i >= 30 {
                parts.push((100, 0.9));
            }
            vector(&parts)
        }
    }
}

fn aggregate(id: Uuid, content_id: &str, v: &[f32]) -> pb::AggregatedPattern {
    pb::AggregatedPattern {
        id: id.as_bytes().to_vec(),
        content_id: content_id.into(),
        embedding: Some(common::embedding(v)),
        quality: 0.9,
        source_devices: 5,
        total_samples: 25,
        context: Some(common::evening_drama()),
        region: String::new(),
    }
}

/// Aggregates the catalog must ignore: a secondary group of `c02` and one without a content
/// id, both pointing where the device's query points.
fn ignored() -> Vec<pb::AggregatedPattern> {
    let leader = vec![1i8; EMBEDDING_DIM];
    vec![
        aggregate(aggregate_id("c02", Some(&leader)), "c02", &vector(&[(0, 1.0)])),
        aggregate(Uuid::now_v7(), "", &vector(&[(0, 1.0), (100, 0.5)])),
    ]
}

fn id_of(i: usize) -> Vec<u8> {
    collaborative_vector_id(&content(i)).as_bytes().to_vec()
}

fn profile_id(i: usize) -> Vec<u8> {
    content_aggregate_id(&content(i)).as_bytes().to_vec()
}

/// Audience profile (the content's main aggregate, a unit MiniLM-space vector) of content
/// `i`: `c30`..`c39` near axis 100, where the device's own patterns point, others far away.
fn profile(i: usize) -> pb::AggregatedPattern {
    let axis = if i >= 30 { 100 } else { 200 };
    aggregate(content_aggregate_id(&content(i)), &content(i), &unit_near(axis, 900 + i as u64))
}

async fn publish(shard: &Shard, round: &str, patterns: Vec<pb::AggregatedPattern>) {
    let mut admin =
        ShardAdminClient::new(common::channel(&format!("http://127.0.0.1:{}", shard.admin)).await)
            .send_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Zstd);
    let r = admin
        .publish_global(pb::PublishGlobalRequest {
            round_id: round.into(),
            global_version: 0,
            patterns,
            trends: vec![],
            model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        })
        .await
        .expect("publish")
        .into_inner();
    assert!(r.applied);
}

fn catalog() -> Vec<pb::AggregatedPattern> {
    let mut aggs: Vec<_> = (0..CONTENTS)
        .map(|i| aggregate(collaborative_vector_id(&content(i)), &content(i), &collab_vector(i)))
        .collect();
    aggs.extend((0..CONTENTS).map(profile));
    aggs.extend(ignored());
    aggs
}

/// A watched-content pattern whose MiniLM embedding points along axis 100.
fn watched(i: usize, jitter: u64) -> pb::Pattern {
    let mut p = pattern_with(Uuid::now_v7(), &unit_near(100, jitter), 0.9);
    p.content_id = content(i);
    p
}

async fn pull(c: &mut ConstellationClient<Channel>, device: &str, token: &str) -> pb::SyncResponse {
    let mut r = sync_request(device, Some(token), delta(1, vec![]));
    r.get_mut().delta = None;
    let resp = c.sync(r).await.expect("pull").into_inner();
    let size = omega_protocol::wire::grpc_zstd_size(&resp);
    assert!(size <= DOWN_BUDGET_BYTES, "{size} bytes over the budget");
    let g = resp.global.as_ref().expect("global");
    assert!(omega_protocol::validate::check_global("global", g).is_ok());
    resp
}

fn similar_ids(resp: &pb::SyncResponse) -> Vec<Vec<u8>> {
    resp.global
        .as_ref()
        .map(|g| g.similar.iter().map(|p| p.id.clone()).collect())
        .unwrap_or_default()
}

/// Env every shard of these tests runs with.
const ENV: &[(&str, &str)] =
    &[("SIMILAR_CACHE_SECS", "0"), ("RATE_LIMIT_BURST", "1000"), ("MERGE_INTERVAL_MS", "50")];

/// Registers `tv-a` (watched A and B) and `tv-b` (patterns near axis 100), pushing their
/// patterns before any round: nothing is served then.
async fn devices_before_any_round(shard: &Shard, c: &mut ConstellationClient<Channel>) -> String {
    let tb = register(c, "tv-b").await;
    let theirs = (0..6).map(|j| watched(20 + j, 50 + j as u64)).collect();
    c.sync(sync_request("tv-b", Some(&tb), delta(1, theirs))).await.expect("b");
    let ta = register(c, "tv-a").await;
    let resp = c
        .sync(sync_request("tv-a", Some(&ta), delta(1, vec![watched(0, 1), watched(1, 2)])))
        .await
        .expect("a")
        .into_inner();
    // tv-b's patterns are right where tv-a's interest points, but a device is only ever
    // served published aggregates: before a round, nothing.
    assert!(similar_ids(&resp).is_empty(), "no round yet: nothing, and never tv-b's patterns");
    assert_eq!(shard.metric(SERIES), 0.0, "nothing published: no collaborative serving");
    ta
}

async fn pulls_page_through_distinct_aggregates(shard: Shard) {
    let mut c = shard.client().await;
    let ta = devices_before_any_round(&shard, &mut c).await;
    publish(&shard, "round-1", catalog()).await;
    if shard.database_url.is_some() {
        // Device contents are read from merged patterns (MERGE_INTERVAL_MS = 50 here).
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let mut never: HashSet<Vec<u8>> = ignored().into_iter().map(|a| a.id).collect();
    never.extend((0..CONTENTS).map(profile_id));
    let valid: HashSet<Vec<u8>> = (0..CONTENTS).map(id_of).collect();
    let mut received: Vec<Vec<u8>> = Vec::new();
    let mut responses = Vec::new();
    while received.len() < CONTENTS {
        assert!(responses.len() < 10, "the list did not wrap within 10 syncs");
        let ids = similar_ids(&pull(&mut c, "tv-a", &ta).await);
        assert!(!ids.is_empty(), "sync {}: nothing served", responses.len());
        assert!(ids.iter().all(|id| valid.contains(id) && !never.contains(id)));
        received.extend(ids.iter().cloned());
        responses.push(ids);
    }
    let first = &responses[0];
    assert!(first.contains(&id_of(0)) || first.contains(&id_of(1)), "A or B first");
    assert!(first.contains(&id_of(2)), "the top candidate in the first answer");
    let early: HashSet<_> = responses.iter().take(3).flatten().cloned().collect();
    for i in 0..=6 {
        assert!(early.contains(&id_of(i)), "{} not received within 3 syncs", content(i));
    }
    assert_eq!(received.len(), CONTENTS, "no item repeats before the list wraps");
    assert_eq!(received.iter().collect::<HashSet<_>>().len(), CONTENTS);
    assert_eq!(first[0], id_of(0), "the newest own content leads (ties by content id)");
    let wrapped = similar_ids(&pull(&mut c, "tv-a", &ta).await);
    assert_eq!(wrapped.first(), Some(&id_of(0)), "after the end, the list starts again");
    assert!(shard.metric(SERIES) >= (CONTENTS + wrapped.len()) as f64);

    // A device without patterns keeps the interest-based path (nothing to rank with).
    let tc = register(&mut c, "tv-c").await;
    let before = shard.metric(SERIES);
    let resp = pull(&mut c, "tv-c", &tc).await;
    assert!(similar_ids(&resp).is_empty(), "no interest vector: no similar");
    assert_eq!(shard.metric(SERIES), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_pulls_page_through_distinct_aggregates() {
    let dir = tempfile::tempdir().expect("tmp");
    pulls_page_through_distinct_aggregates(Shard::start(dir.path(), None, ENV)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pulls_page_through_distinct_aggregates() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = common::fresh_db().await;
    pulls_page_through_distinct_aggregates(Shard::start(dir.path(), Some(&url), ENV)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_or_without_main_aggregates_the_interest_path_answers() {
    for (collab, patterns) in [("false", catalog()), ("true", ignored())] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut env = ENV.to_vec();
        env.push(("COLLAB_SERVING", collab));
        let shard = Shard::start(dir.path(), None, &env);
        let mut c = shard.client().await;
        let ta = devices_before_any_round(&shard, &mut c).await;
        publish(&shard, "round-1", patterns).await;
        let ids = similar_ids(&pull(&mut c, "tv-a", &ta).await);
        assert!(!ids.is_empty(), "COLLAB_SERVING={collab}: interest-based similar");
        assert_eq!(shard.metric(SERIES), 0.0, "COLLAB_SERVING={collab}");
        // Collaborative vectors are not MiniLM embeddings: never served by interest.
        let vectors: HashSet<_> = (0..CONTENTS).map(id_of).collect();
        assert!(ids.iter().all(|id| !vectors.contains(id)), "COLLAB_SERVING={collab}");
        if collab == "false" {
            // Nearest to the device's interest (axis 100): the profiles of c30..c39.
            let near: HashSet<_> = (30..CONTENTS).map(profile_id).collect();
            let profiles: HashSet<_> = (0..CONTENTS).map(profile_id).collect();
            let aggs: Vec<_> = ids.iter().filter(|id| profiles.contains(*id)).collect();
            assert!(aggs.first().is_some_and(|id| near.contains(*id)), "interest-based order");
        }
        // The next pull repeats the same nearest answer (no paging on this path).
        assert_eq!(similar_ids(&pull(&mut c, "tv-a", &ta).await), ids);
    }
}
