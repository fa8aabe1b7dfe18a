//! Postgres stopped mid-load: devices keep syncing concurrently while `scripts/pg.sh stop`
//! shuts the database down under them. `/ready` turns false, every failed sync is UNAVAILABLE,
//! every acknowledged version is stored and no sync is half-written; when Postgres is back
//! the shard recovers without a restart. Runs its own Postgres instance (scripts/pg.sh in a
//! private directory) so it can stop and start it.

mod common;

use common::{Shard, delta, pattern, pg_sh, register, sync_request};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;

struct OwnPostgres {
    dir: String,
}

impl OwnPostgres {
    fn start() -> (OwnPostgres, String) {
        let dir = tempfile::Builder::new()
            .prefix("omega-pg-fault-")
            .tempdir_in("/tmp")
            .expect("tmp")
            .keep()
            .to_string_lossy()
            .into_owned();
        let url = pg_sh(&["start", &dir]);
        (OwnPostgres { dir }, url)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new(common::repo_root().join("scripts/pg.sh"))
            .args(["destroy", &self.dir])
            .output();
    }
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

type Client =
    omega_protocol::pb::constellation_client::ConstellationClient<tonic::transport::Channel>;

/// What one device's sync loop saw.
#[derive(Debug, Default)]
struct Seen {
    /// Highest acknowledged version.
    acked: u64,
    /// Successful syncs.
    ok: u64,
    /// Failed syncs, by code (with one message per code, for the assertion text).
    failures: Vec<(Code, String)>,
    /// Successful syncs after the first failure.
    ok_after_failure: u64,
}

/// One device syncing back to back until `stop`: each version adds two patterns that pass
/// the filter; a failed version is retried unchanged (as a device keeps its outbox).
async fn device_loop(mut c: Client, device: String, token: String, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut v = 1u64;
    let mut added = vec![pattern(v * 2, 0.9), pattern(v * 2 + 1, 0.9)];
    while !stop.load(Ordering::Relaxed) {
        match c.sync(sync_request(&device, Some(&token), delta(v, added.clone()))).await {
            Ok(r) => {
                let r = r.into_inner();
                assert!(r.acknowledged_version >= v, "{device}: v{v} answered {r:?}");
                seen.acked = seen.acked.max(r.acknowledged_version);
                seen.ok += 1;
                if !seen.failures.is_empty() {
                    seen.ok_after_failure += 1;
                }
                v += 1;
                added = vec![pattern(v * 2, 0.9), pattern(v * 2 + 1, 0.9)];
            }
            Err(e) => {
                seen.failures.push((e.code(), e.message().to_owned()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_cleanly_and_recovers_without_restart() {
    let (pg, url) = OwnPostgres::start();
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(
        dir.path(),
        Some(&url),
        &[
            ("RATE_LIMIT_PER_MINUTE", "1000000"),
            ("RATE_LIMIT_BURST", "1000000"),
            ("MERGE_INTERVAL_MS", "100"),
        ],
    );
    let mut c: Client = shard.client().await;
    let devices: Vec<String> = (0..8).map(|i| format!("fault-{i}")).collect();
    let mut tokens = HashMap::new();
    for d in &devices {
        tokens.insert(d.clone(), register(&mut c, d).await);
    }

    // The load runs, concurrently, across the whole outage.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = devices
        .iter()
        .map(|d| tokio::spawn(device_loop(c.clone(), d.clone(), tokens[d].clone(), stop.clone())))
        .collect();
    let ok_total =
        || shard.metric("constellation_sync_requests_total{shard_id=\"1\",status=\"ok\"}");
    wait_for("syncs before the outage", Duration::from_secs(30), || ok_total() >= 100.0).await;

    pg_sh(&["stop", &pg.dir]);
    wait_for("/ready to turn false", Duration::from_secs(15), || {
        shard.get("/ready").is_ok_and(|(code, _)| code == 503)
    })
    .await;
    let unavailable =
        || shard.metric("constellation_sync_requests_total{shard_id=\"1\",status=\"unavailable\"}");
    let before = unavailable();
    // While the database is down a sync waits for a connection (up to the pool's 3 s) before
    // it fails: one failure per device takes a few seconds.
    wait_for("syncs to fail during the outage", Duration::from_secs(30), || {
        unavailable() >= before + devices.len() as f64
    })
    .await;
    let ok_during = ok_total();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ok_total(), ok_during, "syncs succeeded while Postgres was down");

    pg_sh(&["start", &pg.dir]);
    wait_for("/ready to turn true", Duration::from_secs(30), || {
        shard.get("/ready").is_ok_and(|(code, _)| code == 200)
    })
    .await;
    wait_for("syncs to recover", Duration::from_secs(30), || ok_total() >= ok_during + 100.0).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = HashMap::new();
    for (d, t) in devices.iter().zip(tasks) {
        seen.insert(d.clone(), t.await.expect("device task"));
    }

    // Every failure, whenever it happened in the outage, is UNAVAILABLE (clients retry),
    // and the metric counted each one.
    let failures: Vec<&(Code, String)> = seen.values().flat_map(|s| &s.failures).collect();
    assert!(failures.len() >= devices.len(), "{} failures", failures.len());
    for (code, msg) in &failures {
        assert_eq!(*code, Code::Unavailable, "{msg}");
    }
    assert_eq!(unavailable(), failures.len() as f64);
    for (d, s) in &seen {
        assert!(s.ok_after_failure > 0, "{d} never synced again after the outage: {s:?}");
    }

    // Every acknowledged version is stored, and nothing was half-written: each applied
    // version holds exactly its two patterns.
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    common::wait_for_merge(&url).await;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT d.device_id, d.local_version, count(p.id)
         FROM devices d LEFT JOIN patterns p ON p.device_id = d.device_id
         GROUP BY d.device_id, d.local_version",
    )
    .fetch_all(&mut db)
    .await
    .expect("counts");
    assert_eq!(rows.len(), devices.len());
    for (d, stored, patterns) in rows {
        let acked = seen[&d].acked;
        assert!(stored as u64 >= acked, "{d}: acknowledged v{acked}, stored v{stored}");
        // A version that failed with UNAVAILABLE after its commit was retried and answered
        // as a replay: the device advanced past it, so it may be at most one ahead.
        assert!(stored as u64 <= acked + 1, "{d}: stored v{stored}, acknowledged v{acked}");
        assert_eq!(patterns, stored * 2, "{d}: version {stored} but {patterns} patterns");
    }
}
