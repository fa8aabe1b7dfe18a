//! Black-box: two `omega-shard` processes on one Postgres database, the in-memory similarity
//! index in each (`SIMILAR_INDEX=memory`, the default). The second never merges (its merge
//! interval is an hour), so what its devices are offered comes from following the first one's
//! merges; killed with SIGKILL and restarted, it rebuilds its index from the database.

mod common;

use common::{Shard, delta, pattern_with, register, sync_request, unit_near};
use omega_protocol::pb;
use omega_protocol::pb::constellation_client::ConstellationClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use uuid::Uuid;

type Client = ConstellationClient<Channel>;

fn near(axis: usize, i: u64, content: String) -> pb::Pattern {
    let mut p = pattern_with(Uuid::now_v7(), &unit_near(axis, i), 0.9);
    p.content_id = content;
    p
}

/// The content ids `device` is offered by a pull (a sync without a delta).
async fn offered(c: &mut Client, device: &str, token: &str) -> Vec<String> {
    let mut pull = sync_request(device, Some(token), delta(1, vec![]));
    pull.get_mut().delta = None;
    let resp = c.sync(pull).await.expect("pull").into_inner();
    resp.global.map(|g| g.similar.into_iter().map(|p| p.content_id).collect()).unwrap_or_default()
}

/// Pulls until `done` holds, for at most `within`; returns how long it took.
async fn wait_offered(
    c: &mut Client,
    device: &str,
    token: &str,
    within: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let got = offered(c, device, token).await;
        if done(&got) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "not within {within:?}: offered {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_prefix(got: &[String], prefix: &str) -> bool {
    got.iter().any(|c| c.starts_with(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_never_merges_serves_the_others_merges_and_rebuilds_after_sigkill() {
    let url = common::fresh_db().await;
    let (d1, d2) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let common_env = [("SIMILAR_CACHE_SECS", "0"), ("RATE_LIMIT_BURST", "10000")];
    let one = Shard::start(
        d1.path(),
        Some(&url),
        &[&common_env[..], &[("MERGE_INTERVAL_MS", "100")]].concat(),
    );
    let two_env = [&common_env[..], &[("MERGE_INTERVAL_MS", "3600000")]].concat();
    let mut two = Shard::start(d2.path(), Some(&url), &two_env);
    let (mut c1, mut c2) = (one.client().await, two.client().await);
    let ta = register(&mut c1, "tv-a").await;
    let tb = register(&mut c2, "tv-b").await;

    // tv-b's interest (stored through `two`, merged by `one`) and tv-a's patterns near it.
    c2.sync(sync_request("tv-b", Some(&tb), delta(1, vec![near(0, 1, "b-0".into())])))
        .await
        .expect("b");
    let mine: Vec<pb::Pattern> = (0..12).map(|i| near(0, 10 + i, format!("a-{i}"))).collect();
    c1.sync(sync_request("tv-a", Some(&ta), delta(1, mine.clone()))).await.expect("a");
    let bound = Duration::from_secs(5);
    let took = wait_offered(&mut c2, "tv-b", &tb, bound, |got| has_prefix(got, "a-")).await;
    eprintln!("tv-a's patterns offered through the other replica after {took:?}");
    assert!(!has_prefix(&offered(&mut c2, "tv-b", &tb).await, "b-"), "own pattern offered");
    assert!(!has_prefix(&offered(&mut c1, "tv-a", &ta).await, "a-"), "own pattern offered");

    // Removed through `one`: gone from what `two` offers.
    let mut removal = delta(2, vec![]);
    removal.removed = mine.iter().map(|p| p.id.clone()).collect();
    c1.sync(sync_request("tv-a", Some(&ta), removal)).await.expect("remove");
    wait_offered(&mut c2, "tv-b", &tb, bound, |got| !has_prefix(got, "a-")).await;

    // New patterns while `two` is down are there after its rebuild; the removed stay gone.
    two.kill9();
    let tc = register(&mut c1, "tv-c").await;
    let theirs: Vec<pb::Pattern> = (0..5).map(|i| near(0, 40 + i, format!("c-{i}"))).collect();
    c1.sync(sync_request("tv-c", Some(&tc), delta(1, theirs))).await.expect("c");
    two.spawn(&two_env);
    let mut c2 = two.client().await;
    let got = offered(&mut c2, "tv-b", &tb).await;
    // Ready means loaded, but the merge of tv-c's sync may have committed after the load's
    // snapshot: then it arrives by following.
    if !has_prefix(&got, "c-") {
        wait_offered(&mut c2, "tv-b", &tb, bound, |got| has_prefix(got, "c-")).await;
    }
    let got = offered(&mut c2, "tv-b", &tb).await;
    assert!(!has_prefix(&got, "a-") && !has_prefix(&got, "b-"), "{got:?}");
    assert_eq!(two.stats()["store"], "postgres");
}
