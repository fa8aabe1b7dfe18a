//! `omega-sim` end to end on a slice of MovieLens-100K: in-process shard servers on loopback
//! gRPC, real brains with the real model and SQLite files, real federation rounds (plain and
//! DP), the evaluation harness.

use omega_e2e::sim::{self, SimConfig};

const METHODS: [&str; 5] =
    ["popularity", "local_only", "centralized_mf", "federated", "federated_dp"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_constellation_learns_syncs_federates_and_is_evaluated() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = SimConfig {
        users: Some(40),
        shards: 2,
        eval_hours: 3.0,
        curve_users: 10,
        data_dir: Some(dir.path().to_path_buf()),
        progress: false,
        mf: omega_e2e::eval::mf::MfConfig { epochs: 10, ..sim::chosen_mf(1) },
        ..SimConfig::default()
    };
    let r = sim::run(cfg).await.expect("simulation runs");
    for m in METHODS {
        for (name, table) in [("hr10", &r.hr10), ("ndcg10", &r.ndcg10), ("full_hr10", &r.full_hr10)]
        {
            let v = *table.get(m).unwrap_or_else(|| panic!("{name} has no {m}: {table:?}"));
            assert!((0.0..=1.0).contains(&v), "{name}[{m}] = {v}");
        }
    }
    assert_eq!(r.users, 40);
    assert!(r.users_evaluated >= 35, "{}", r.users_evaluated);
    // Every TV synced, rounds ran in both passes and each left a point on the curve.
    assert!(r.syncs >= 40 * 3, "{} syncs", r.syncs);
    assert!(r.rounds >= 1 && r.rounds_dp >= 1, "{} / {}", r.rounds, r.rounds_dp);
    assert_eq!(r.curve.len(), r.rounds as usize);
    assert_eq!(r.curve_dp.len(), r.rounds_dp as usize);
    assert!(r.curve.iter().any(|p| p.published > 0), "a round published aggregates");
    // The federation's collaborative vectors reached the TVs through their 5 KB syncs.
    assert!(r.transport.collab_vectors_p50 > 0, "{r:?}");
    assert!(r.transport.globals_p50 >= r.transport.collab_vectors_p50);
    // Wire budgets: no download above 5 KB; the median sync uploads at most 1 KB.
    assert!(r.transport.bytes_down_max <= 5 * 1024, "{}", r.transport.bytes_down_max);
    assert!(r.transport.bytes_down_p50 > 0);
    assert!(r.transport.bytes_up_p50 <= 1024, "{}", r.transport.bytes_up_p50);
    assert!(
        r.transport.bytes_up_push_p50 > r.transport.bytes_up_p50,
        "pushing syncs carry patterns"
    );
    assert!(r.transport.recommend_p99_ms > 0.0);
    assert_eq!(r.dp_epsilon, Some(8.0));
    // The markdown table has a row per method.
    let md = sim::markdown(&r);
    assert!(METHODS.iter().all(|m| md.contains(&format!("| {m} |"))), "{md}");
    // The TVs' own SQLite files are where they were asked to be.
    assert!(dir.path().join("federated").join("tv-0000.sqlite").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_before_anything_starts() {
    for bad in [
        SimConfig { shards: 0, ..SimConfig::default() },
        SimConfig { users: Some(0), ..SimConfig::default() },
        SimConfig { eval_hours: 0.0, ..SimConfig::default() },
        SimConfig { min_sources: 0, ..SimConfig::default() },
        SimConfig {
            shards: 2,
            database_url: Some("postgres://x@127.0.0.1/x".into()),
            ..SimConfig::default()
        },
    ] {
        let err = sim::run(bad.clone()).await.expect_err("refused");
        assert!(matches!(err, sim::SimError::Config(_)), "{bad:?}: {err}");
    }
}

/// A new empty database on the test Postgres (`OMEGA_TEST_DATABASE_URL`, set by
/// `scripts/test.sh`), or `None` when there is none.
async fn fresh_database() -> Option<String> {
    use sqlx::Connection;
    let base = std::env::var("OMEGA_TEST_DATABASE_URL").ok()?;
    let name = format!("omega_sim_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&base).await.expect("connect to test Postgres");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    let (prefix, _) = base.rsplit_once('/').expect("database URL has a path");
    Some(format!("{prefix}/{name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_federated_pass_runs_on_postgres() {
    let Some(url) = fresh_database().await else {
        eprintln!("skipped: OMEGA_TEST_DATABASE_URL is not set (scripts/test.sh sets it)");
        return;
    };
    let cfg = SimConfig {
        users: Some(30),
        database_url: Some(url),
        dp: None,
        eval_hours: 3.0,
        curve_users: 5,
        progress: false,
        mf: omega_e2e::eval::mf::MfConfig { epochs: 5, ..sim::chosen_mf(1) },
        ..SimConfig::default()
    };
    let r = sim::run(cfg).await.expect("simulation runs on Postgres");
    assert!(!r.hr10.contains_key("federated_dp"), "no DP pass was asked for");
    assert!(r.hr10.contains_key("federated") && r.rounds >= 1, "{r:?}");
    assert!(r.curve.iter().any(|p| p.published > 0), "rounds read the Postgres shard");
    assert!(r.transport.collab_vectors_p50 > 0, "vectors reached the TVs from Postgres: {r:?}");
    assert!(r.transport.bytes_down_max <= 5 * 1024, "{}", r.transport.bytes_down_max);
}
