//! Backup and restore as docs/operations.md ("Backup and restore") describes them, on the real
//! stores: every acknowledged sync is back after a restore (a retry of each device's last
//! acknowledged sync is answered `replayed`, and the stored pattern count is unchanged).

mod common;

use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const DEVICES: usize = 12;
const SYNCS: u64 = 3;

/// Registers the devices and syncs each `SYNCS` times; returns their tokens.
async fn acknowledged(shard: &Shard) -> HashMap<String, String> {
    let mut c = shard.client().await;
    let mut tokens = HashMap::new();
    for i in 0..DEVICES {
        let d = format!("backup-{i}");
        let token = register(&mut c, &d).await;
        for v in 1..=SYNCS {
            let seed = i as u64 * 100 + v;
            let r = c
                .sync(sync_request(&d, Some(&token), delta(v, vec![pattern(seed, 0.9)])))
                .await
                .expect("sync")
                .into_inner();
            assert_eq!(r.acknowledged_version, v);
        }
        tokens.insert(d, token);
    }
    tokens
}

/// Every device's last acknowledged sync is known to the restored shard.
async fn all_back(shard: &Shard, tokens: &HashMap<String, String>) {
    let mut c = shard.client().await;
    for (d, token) in tokens {
        let r = c
            .sync(sync_request(d, Some(token), delta(SYNCS, vec![pattern(1, 0.9)])))
            .await
            .expect("retry after restore")
            .into_inner();
        assert!(r.replayed, "{d}: its last acknowledged sync is missing after the restore");
    }
}

fn pg_tool(name: &str) -> PathBuf {
    let out = Command::new("python3")
        .arg(repo_root().join("scripts/assets.py"))
        .args(["path", "postgres"])
        .output()
        .expect("scripts/assets.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("bin").join(name)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pg_dump_and_pg_restore_bring_back_every_acknowledged_sync() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("tmp");
    let url = fresh_db().await;
    let mut shard = Shard::start(dir.path(), Some(&url), &[]);
    let tokens = acknowledged(&shard).await;
    wait_for_merge(&url).await;
    let patterns = shard.stats()["patterns"].clone();
    assert_eq!(patterns, serde_json::json!(DEVICES as u64 * SYNCS));

    // Back up the live database, as the scheduled pg_dump does.
    let dump = dir.path().join("shard.dump");
    run(Command::new(pg_tool("pg_dump")).args(["--format=custom", "--file"]).arg(&dump).arg(&url));

    // Lose it: stop the shard, drop the database, create it empty.
    shard.signal("-TERM");
    assert!(shard.wait_exit(Duration::from_secs(30)).await.success());
    let (_, name) = url.rsplit_once('/').expect("url");
    let mut admin = sqlx::PgConnection::connect(&pg_base_url()).await.expect("connect");
    for sql in [format!("DROP DATABASE {name} WITH (FORCE)"), format!("CREATE DATABASE {name}")] {
        sqlx::query(&sql).execute(&mut admin).await.expect("wipe");
    }

    // Restore, start the shard on it: everything acknowledged is there.
    run(Command::new(pg_tool("pg_restore"))
        .args(["--no-owner", "--exit-on-error", "--dbname"])
        .arg(&url)
        .arg(&dump));
    shard.spawn(&[]);
    all_back(&shard, &tokens).await;
    wait_for_merge(&url).await;
    assert_eq!(shard.stats()["patterns"], patterns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_data_dir_copy_brings_back_every_acknowledged_sync() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let mut shard = Shard::start(&data, None, &[]);
    let tokens = acknowledged(&shard).await;
    let patterns = shard.stats()["patterns"].clone();
    assert_eq!(patterns, serde_json::json!(DEVICES as u64 * SYNCS));

    // Back up: stop the shard (SIGTERM flushes the store), copy DATA_DIR.
    shard.signal("-TERM");
    assert!(shard.wait_exit(Duration::from_secs(30)).await.success());
    let backup = dir.path().join("backup");
    run(Command::new("cp").arg("-a").arg(&data).arg(&backup));

    // Lose it, restore the copy, start: everything acknowledged is there.
    std::fs::remove_dir_all(&data).expect("wipe");
    run(Command::new("cp").arg("-a").arg(&backup).arg(&data));
    shard.spawn(&[]);
    all_back(&shard, &tokens).await;
    assert_eq!(shard.stats()["patterns"], patterns);
}
