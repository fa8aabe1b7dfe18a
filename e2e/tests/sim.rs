//! `omega-sim` end to end on a slice of MovieLens-100K: in-process shard servers on loopback
//! gRPC, real brains with the real model and SQLite files, real federation rounds (plain and
//! DP), the evaluation harness.

use omega_e2e::eval::suite::{self, Chosen};
use omega_e2e::eval::{Stage, Ties};
use omega_e2e::sim::{self, SimConfig};

const METHODS: [&str; 10] = [
    "popularity",
    "popularity_dp",
    "local_only",
    "mf_bpr",
    "mf_bce",
    "ease",
    "central_reference",
    "federated_offline",
    "federated",
    "federated_dp",
];

/// The recorded settings with short MF training (the tests check plumbing, not quality).
fn quick_chosen() -> Chosen {
    let c = suite::recorded().0;
    Chosen {
        mf_bpr: omega_e2e::eval::mf::MfConfig { epochs: 5, ..c.mf_bpr },
        mf_bce: omega_e2e::eval::mf::MfConfig { epochs: 5, ..c.mf_bce },
        ..c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_constellation_learns_syncs_federates_and_is_evaluated() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = SimConfig {
        users: Some(40),
        shards: 2,
        seeds: 2,
        eval_hours: 3.0,
        curve_users: 10,
        dp_releases: 2,
        data_dir: Some(dir.path().to_path_buf()),
        progress: false,
        chosen: quick_chosen(),
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
    // Every method ran once per seed, with an interval around its mean.
    assert_eq!(r.seeds, vec![42, 43]);
    assert_eq!(r.ties, Ties::FileOrder);
    for m in &r.methods {
        assert_eq!(m.hr10_per_seed.len(), 2, "{}", m.method);
        assert!(m.hr10.half_width >= 0.0 && m.hr10.low() <= m.hr10.mean, "{m:?}");
        let mean = m.hr10_per_seed.iter().sum::<f64>() / 2.0;
        assert!((mean - m.hr10.mean).abs() < 1e-12, "{m:?}");
    }
    // The paired comparisons of the issue: federated against its central reference and MF.
    // The MF of the pair is the loss that did better on the validation item.
    let mf = match suite::recorded().0.mf_best {
        omega_e2e::eval::mf::Loss::Bpr => "mf_bpr",
        omega_e2e::eval::mf::Loss::Bce => "mf_bce",
    };
    let pairs: Vec<(&str, &str)> = r.paired.iter().map(|p| (p.a.as_str(), p.b.as_str())).collect();
    assert_eq!(pairs, vec![("federated", "central_reference"), ("federated", mf)]);
    assert!(r.paired.iter().all(|p| p.hr10.seeds == 2 && p.hr10.users == r.users_evaluated));
    // The report says how each setting was chosen, and the checker accepts it.
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(sim::check_selection(&json), Ok(r.selection.len()));
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
    // The DP pass ran its two releases and reports what a device spent over the whole pass,
    // composed (zCDP) from the rounds' ledger: the pass's budget, ε = 8 at δ = 1e-6, exactly.
    assert_eq!(r.rounds_dp, 2, "{:?}", r.curve_dp);
    let composed = r.dp_epsilon.expect("the DP pass reports its epsilon");
    let delta = r.dp_delta.expect("the DP pass reports its delta");
    assert!((composed - 8.0).abs() < 1e-6, "{composed}");
    assert!((delta - 1e-6).abs() < 1e-12, "{delta}");
    // Everything the TVs received was a published aggregate with at least k sources, in
    // both passes, and the federated pass's TVs did receive some (40 devices are too few for
    // the DP selection's threshold at this budget, so the DP pass may serve nothing).
    assert!(r.served > 0, "{r:?}");
    assert_eq!((r.served_below_k, r.served_below_k_dp), (0, 0), "{r:?}");
    // The markdown table has a row per method.
    let md = sim::markdown(&r);
    assert!(METHODS.iter().all(|m| md.contains(&format!("| {m} |"))), "{md}");
    assert!(md.contains("| federated − central_reference |"), "{md}");
    // The TVs' own SQLite files are where they were asked to be.
    assert!(dir.path().join("seed-42/federated/tv-0000.sqlite").is_file());
    assert!(dir.path().join("seed-43/federated_dp/tv-0000.sqlite").is_file());
}

/// The selection checker fails a report whose selection names the test split, or that has
/// none.
#[test]
fn a_selection_made_on_the_test_split_fails_the_check() {
    let ok = serde_json::json!({"selection": [
        {"what": "mf_bpr", "split": "validation"},
        {"what": "ease", "split": "validation"},
    ]});
    assert_eq!(sim::check_selection(&ok), Ok(2));
    let bad = serde_json::json!({"selection": [
        {"what": "mf_bpr", "split": "validation"},
        {"what": "ease", "split": "test"},
    ]});
    let err = sim::check_selection(&bad).expect_err("test split named");
    assert!(err.contains("ease") && err.contains("test"), "{err}");
    assert!(sim::check_selection(&serde_json::json!({"selection": []})).is_err());
    assert!(sim::check_selection(&serde_json::json!({"hr10": {}})).is_err());
    // The selections the code records itself are all on validation.
    let (_, recorded) = suite::recorded();
    assert!(recorded.iter().all(|s| s.split == Stage::Validation));
    let json = serde_json::json!({ "selection": recorded });
    assert_eq!(sim::check_selection(&json), Ok(recorded.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_before_anything_starts() {
    for bad in [
        SimConfig { shards: 0, ..SimConfig::default() },
        SimConfig { users: Some(0), ..SimConfig::default() },
        SimConfig { eval_hours: 0.0, ..SimConfig::default() },
        SimConfig { min_sources: 0, ..SimConfig::default() },
        SimConfig { seeds: 0, ..SimConfig::default() },
        SimConfig { dp_releases: 0, ..SimConfig::default() },
        SimConfig { dp: Some((0.0, 1e-6)), ..SimConfig::default() },
        SimConfig { dp: Some((8.0, 1.0)), ..SimConfig::default() },
        SimConfig { tune: true, holdout: Stage::Validation, ..SimConfig::default() },
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
        chosen: quick_chosen(),
        ..SimConfig::default()
    };
    let r = sim::run(cfg).await.expect("simulation runs on Postgres");
    assert!(!r.hr10.contains_key("federated_dp"), "no DP pass was asked for");
    assert!(r.hr10.contains_key("federated") && r.rounds >= 1, "{r:?}");
    assert!(r.curve.iter().any(|p| p.published > 0), "rounds read the Postgres shard");
    assert!(r.transport.collab_vectors_p50 > 0, "vectors reached the TVs from Postgres: {r:?}");
    assert!(r.transport.bytes_down_max <= 5 * 1024, "{}", r.transport.bytes_down_max);
    assert!(r.served > 0, "{r:?}");
    assert_eq!(r.served_below_k, 0, "{r:?}");
}
