//! Postgres stopped mid-load: `/ready` turns false, syncs fail with UNAVAILABLE and leave no
//! partial writes; when Postgres is back the shard recovers without a restart. Runs its own
//! Postgres instance (scripts/pg.sh in a private directory) so it can stop and start it.

mod common;

use common::{Shard, delta, pattern, pg_sh, register, sync_request};
use std::collections::HashMap;
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

/// One sync per device, each adding two patterns that pass the filter.
async fn sync_round(
    c: &Client,
    devices: &[String],
    tokens: &HashMap<String, String>,
    version: &HashMap<String, u64>,
) -> Vec<(String, u64, Result<u64, tonic::Status>)> {
    let mut c = c.clone();
    let mut out = Vec::new();
    for d in devices {
        let v = version[d] + 1;
        let added = vec![pattern(v * 2, 0.9), pattern(v * 2 + 1, 0.9)];
        let r = c.sync(sync_request(d, Some(&tokens[d]), delta(v, added))).await;
        out.push((d.clone(), v, r.map(|r| r.into_inner().acknowledged_version)));
    }
    out
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
    // Each sync adds two patterns that pass the filter; versions only advance on success.
    let mut version: HashMap<String, u64> = devices.iter().map(|d| (d.clone(), 0)).collect();
    for _ in 0..5 {
        for (d, v, r) in sync_round(&c, &devices, &tokens, &version).await {
            r.expect("sync before the outage");
            version.insert(d, v);
        }
    }

    pg_sh(&["stop", &pg.dir]);
    wait_for("/ready to turn false", Duration::from_secs(15), || {
        shard.get("/ready").is_ok_and(|(code, _)| code == 503)
    })
    .await;
    let mut unavailable = 0;
    for (d, _, r) in sync_round(&c, &devices, &tokens, &version).await {
        let err = r.expect_err("sync during the outage");
        assert_eq!(err.code(), Code::Unavailable, "{d}: {err:?}");
        unavailable += 1;
    }
    assert!(
        shard.metric("constellation_sync_requests_total{shard_id=\"1\",status=\"unavailable\"}")
            >= unavailable as f64
    );

    pg_sh(&["start", &pg.dir]);
    wait_for("/ready to turn true", Duration::from_secs(30), || {
        shard.get("/ready").is_ok_and(|(code, _)| code == 200)
    })
    .await;
    // The first syncs may meet pooled connections that died with the old server.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let results = sync_round(&c, &devices, &tokens, &version).await;
        let ok = results.iter().all(|(_, _, r)| r.is_ok());
        for (d, v, r) in results {
            if r.is_ok() {
                version.insert(d, v);
            }
        }
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "syncs did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // No partial writes: every stored version has exactly its two patterns.
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pattern_intake")
            .fetch_one(&mut db)
            .await
            .expect("intake");
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "intake never drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
        assert_eq!(patterns, stored * 2, "{d}: version {stored} but {patterns} patterns");
        assert!(
            stored as u64 >= version[&d],
            "{d}: acknowledged {} > stored {stored}",
            version[&d]
        );
    }
}
