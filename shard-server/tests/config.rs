//! Configuration of the built binary as an operator meets it: bad settings stop the start with
//! exit code 1 and a message naming the variable (in JSON when `LOG_FORMAT=json`), and
//! `POSTGRES_URL` works as `DATABASE_URL`'s alias.

mod common;

use common::{Shard, delta, pattern, register, run_to_exit, sync_request};
use std::time::Duration;

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Every line of `stderr` as a JSON object; panics on a line that is not one.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {l}"));
            assert!(v.is_object(), "not a JSON object: {l}");
            v
        })
        .collect();
    assert!(!lines.is_empty(), "nothing on stderr");
    lines
}

#[test]
fn json_logs_report_a_bad_setting_on_every_line_and_exit_1() {
    let (status, stderr) =
        run_to_exit(&["serve"], &[("LOG_FORMAT", "json"), ("MAX_DEVICES", "0")], EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    for line in json_lines(&stderr) {
        assert_eq!(line["level"], "ERROR", "{line}");
        assert!(line.to_string().contains("MAX_DEVICES"), "{line}");
    }
    // A value clap itself refuses (not a number) is JSON too, with clap's exit code 2.
    let (status, stderr) =
        run_to_exit(&["serve"], &[("LOG_FORMAT", "json"), ("MAX_DEVICES", "many")], EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(2), "{stderr}");
    for line in json_lines(&stderr) {
        assert!(line.to_string().contains("MAX_DEVICES"), "{line}");
    }
}

#[test]
fn postgres_url_without_a_device_secret_exits_1_naming_it() {
    let url = "postgres://omega@127.0.0.1:1/never-reached";
    let (status, stderr) = run_to_exit(&["serve"], &[("POSTGRES_URL", url)], EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("OMEGA_DEVICE_SECRET"), "{stderr}");
    assert!(!stderr.contains("never-reached"), "the URL is a secret: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_url_alone_selects_postgres() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("tmp");
    let url = common::fresh_db().await;
    // Shard::start sets OMEGA_DEVICE_SECRET and removes DATABASE_URL and POSTGRES_URL.
    let shard = Shard::start(dir.path(), None, &[("POSTGRES_URL", &url)]);
    let stats = shard.stats();
    assert_eq!(stats["store"], "postgres", "{stats}");
    let mut c = shard.client().await;
    let t = register(&mut c, "tv").await;
    c.sync(sync_request("tv", Some(&t), delta(1, vec![pattern(1, 0.9)]))).await.expect("sync");
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    let version: i64 =
        sqlx::query_scalar("SELECT local_version FROM devices WHERE device_id = 'tv'")
            .fetch_one(&mut db)
            .await
            .expect("the device is in the POSTGRES_URL database");
    assert_eq!(version, 1);
    assert!(!dir.path().join("embedded").exists(), "no embedded store was created under DATA_DIR");
}

#[test]
fn an_unknown_similar_index_exits_2_naming_the_choices() {
    let (status, stderr) = run_to_exit(&["serve"], &[("SIMILAR_INDEX", "hnsw")], EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("hnsw") && stderr.contains("memory") && stderr.contains("pgvector"));
}

/// `omega-shard migrate` applies the schema and exits without loading the similarity index
/// (which would make it wait for a database-sized load, or report "not ready").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_schema_and_exits_0() {
    use sqlx::Connection;
    let url = common::fresh_db().await;
    let (status, stderr) = run_to_exit(&["migrate"], &[("DATABASE_URL", &url)], EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    let generation: i64 = sqlx::query_scalar("SELECT generation FROM merge_state")
        .fetch_one(&mut db)
        .await
        .expect("migration 0003 applied");
    assert_eq!(generation, 0);
}
