//! Backup and restore as docs/operations.md ("Backup and restore") describes them, on the real
//! stores: every acknowledged sync is back after a restore (a retry of each device's last
//! acknowledged sync is answered `replayed`, and the stored pattern count is unchanged). The
//! Postgres backup is made by the script the operator's backup CronJob runs.

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
async fn the_backup_cron_jobs_dump_restored_brings_back_every_acknowledged_sync() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("tmp");
    let url = fresh_db().await;
    let mut shard = Shard::start(dir.path(), Some(&url), &[]);
    let tokens = acknowledged(&shard).await;
    wait_for_merge(&url).await;
    let patterns = shard.stats()["patterns"].clone();
    assert_eq!(patterns, serde_json::json!(DEVICES as u64 * SYNCS));

    // Back up the live database with the script the Shard's backup CronJob runs (the
    // operator's `pg_backup.sh`, byte for byte), into a directory that already holds an
    // expired dump and a recent one: retention deletes only the expired one.
    let backups = dir.path().join("backups");
    std::fs::create_dir_all(&backups).expect("backups dir");
    for (name, age) in
        [("omega-20200101T000000Z.dump", "10 days ago"), ("omega-recent.dump", "1 day ago")]
    {
        std::fs::write(backups.join(name), b"older dump").expect("old dump");
        run(Command::new("touch").arg("-d").arg(age).arg(backups.join(name)));
    }
    let script = repo_root().join("operator/src/shard/pg_backup.sh");
    let bin = pg_tool("pg_dump").parent().expect("bin").to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    run(Command::new("sh")
        .arg("-c")
        .arg(std::fs::read_to_string(&script).expect("pg_backup.sh"))
        .env("PATH", path)
        .env("DATABASE_URL", &url)
        .env("BACKUP_DIR", &backups)
        .env("RETENTION_DAYS", "7"));
    let mut left: Vec<String> = std::fs::read_dir(&backups)
        .expect("backups")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left.len(), 2, "expired dump kept or partial file left: {left:?}");
    assert_eq!(left[1], "omega-recent.dump", "{left:?}");
    assert!(left[0].starts_with("omega-2") && left[0] != "omega-20200101T000000Z.dump", "{left:?}");
    let dump = backups.join(&left[0]);

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
