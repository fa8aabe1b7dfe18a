//! `omega-load` against an in-process shard server (embedded store): real gRPC, real deltas;
//! and the `omega-load` binary itself, spawning the built `omega-shard` (embedded and
//! Postgres) and printing its JSON report.

use clap::Parser;
use omega_e2e::load::{self, LoadConfig, Progress, spawn::free_port};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    serve: omega_shard::ServeArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_run_reports_syncs_latency_and_bytes() {
    let dir = tempfile::tempdir().expect("tmp");
    let grpc = free_port().expect("port");
    let args = Wrapper::parse_from([
        "omega-shard".to_string(),
        format!("--grpc-addr=127.0.0.1:{grpc}"),
        format!("--admin-grpc-addr=127.0.0.1:{}", free_port().expect("port")),
        format!("--rest-addr=127.0.0.1:{}", free_port().expect("port")),
        format!("--metrics-addr=127.0.0.1:{}", free_port().expect("port")),
        format!("--data-dir={}", dir.path().display()),
        "--device-secret=load-test-secret-0123456789".into(),
        "--rate-limit-per-minute=1000000".into(),
        "--rate-limit-burst=1000000".into(),
        "--database-url=".into(),
    ])
    .serve;
    tokio::spawn(omega_shard::server::serve(args, Default::default()));
    let target = format!("http://127.0.0.1:{grpc}");
    let mut ready = false;
    for _ in 0..100 {
        if load::connect(&target, 1).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "server did not start");
    let cfg = LoadConfig {
        target,
        devices: 50,
        concurrency: 8,
        connections: 2,
        duration: Duration::from_secs(3),
        patterns_per_sync: 2,
        region: "local".into(),
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        device_prefix: "load-test".into(),
        seed: 1,
    };
    let report = load::run(&cfg, Arc::new(Progress::default())).await.expect("run");
    assert!(report.syncs > 50, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    assert!(report.p50_ms > 0.0 && report.p99_ms >= report.p50_ms);
    assert!(report.bytes_up_p50 > 500, "two patterns are ~900 B: {report:?}");
    assert!(report.bytes_down_p50 <= 5 * 1024, "{report:?}");
    // No round runs here, and devices never receive each other's patterns: nothing to serve.
    assert_eq!(report.similar_p50, 0, "devices got each other's patterns: {report:?}");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// The `omega-shard` binary of this build. Cargo builds only this package's binaries for its
/// tests, so build that one (same profile, same target folder: usually a no-op or a link).
fn omega_shard_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test exe");
        let profile = exe.parent().and_then(Path::parent).expect("target/<profile>").to_owned();
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "omega-shard", "--bin", "omega-shard"]);
        build.args(["--message-format", "short"]);
        if profile.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        if let Some(target) = profile.parent() {
            build.env("CARGO_TARGET_DIR", target);
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p omega-shard failed");
        let bin = profile.join("omega-shard");
        assert!(bin.is_file(), "{} not built", bin.display());
        bin
    })
}

/// Runs the `omega-load` binary with `--spawn-server --json` for a few seconds; returns its
/// report.
fn run_omega_load(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_omega-load"))
        .arg("--spawn-server")
        .arg("--server-bin")
        .arg(omega_shard_bin())
        .args(["--json", "--devices", "60", "--duration-secs", "3"])
        .args(["--concurrency", "8", "--connections", "2"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run omega-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "omega-load failed: {}\n{stdout}\n{stderr}", out.status);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn check_report(r: &serde_json::Value) {
    let num = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing or not a number: {r}"));
    assert_eq!(r["errors"].as_u64(), Some(0), "{r}");
    assert!(num("syncs_per_sec") > 20.0, "{r}");
    assert!(num("p50_ms") > 0.0 && num("p99_ms") >= num("p50_ms"), "{r}");
    // Two random patterns per sync: ~440 B each, int8 embeddings do not compress.
    assert!(num("bytes_up_p50") > 800.0 && num("bytes_up_p50") < 1_500.0, "{r}");
    assert!(num("bytes_down_p50") > 0.0 && num("bytes_down_p50") <= 5.0 * 1024.0, "{r}");
}

#[test]
fn omega_load_binary_spawns_an_embedded_shard_and_prints_json() {
    check_report(&run_omega_load(&[]));
}

/// The flood and echo modes. Every wait is bounded: the run is killed after 180 s (its own
/// flood stops within 10 s of the sync run, and each flood request gives up after 30 s).
#[test]
fn a_flood_of_unauthenticated_bodies_leaves_good_devices_unharmed_and_the_echo_baseline_runs() {
    let dir = tempfile::tempdir().expect("tmp");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_omega-load"))
        .arg("--spawn-server")
        .arg("--server-bin")
        .arg(omega_shard_bin())
        .args(["--json", "--devices", "40", "--duration-secs", "4", "--concurrency", "4"])
        .args(["--connections", "2", "--baseline-echo", "--settle-secs", "1"])
        .args(["--flood-connections", "2", "--flood-streams", "16", "--flood-body-kib", "256"])
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&out_path).expect("out"))
        .stderr(std::fs::File::create(&err_path).expect("err"))
        .spawn()
        .expect("run omega-load");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("omega-load --flood did not finish in 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(status.success(), "omega-load failed: {status}\n{stdout}\n{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("JSON report");
    check_report(&r);
    let num = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {r}"));
    assert!(num("flood_requests_sent") >= 32.0, "the flood ran: {r}");
    assert!(num("echo_calls_per_sec") > 20.0 && num("ratio") > 0.0, "{r}");
    assert!(num("echo_response_bytes") > 4_000.0 && num("echo_response_bytes") <= 5_120.0, "{r}");
    let growth = num("server_rss_peak_mib") - num("server_rss_start_mib");
    assert!(growth < 64.0, "the flood grew the server by {growth} MiB: {r}");
}

/// A new empty database on the test Postgres: `OMEGA_TEST_DATABASE_URL` (scripts/test.sh
/// sets it), else a server started here with scripts/pg.sh and destroyed after.
struct TestDatabase {
    url: String,
    own: Option<tempfile::TempDir>,
}

impl TestDatabase {
    async fn new() -> TestDatabase {
        use sqlx::Connection;
        let script = repo_root().join("scripts/pg.sh");
        let (base, own) = match std::env::var("OMEGA_TEST_DATABASE_URL") {
            Ok(u) if !u.is_empty() => (u, None),
            _ => {
                let dir = tempfile::tempdir().expect("tmp");
                let out = Command::new(&script)
                    .arg("start")
                    .arg(dir.path())
                    .output()
                    .expect("run scripts/pg.sh");
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                (String::from_utf8_lossy(&out.stdout).trim().to_owned(), Some(dir))
            }
        };
        let name = format!("omega_load_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&base).await.expect("connect");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create");
        let (prefix, _) = base.rsplit_once('/').expect("URL with a database");
        TestDatabase { url: format!("{prefix}/{name}"), own }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(dir) = &self.own {
            let _ = Command::new(repo_root().join("scripts/pg.sh"))
                .arg("destroy")
                .arg(dir.path())
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omega_load_binary_spawns_a_postgres_shard_and_prints_json() {
    use sqlx::Connection;
    let db = TestDatabase::new().await;
    let report = tokio::task::spawn_blocking({
        let url = db.url.clone();
        move || run_omega_load(&["--database-url", &url])
    })
    .await
    .expect("omega-load");
    check_report(&report);
    // The syncs went to that database.
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let (devices, syncs): (i64, i64) =
        sqlx::query_as("SELECT count(*), sum(syncs)::int8 FROM devices")
            .fetch_one(&mut conn)
            .await
            .expect("devices");
    assert_eq!(devices, 60);
    let reported = report["syncs"].as_u64().expect("syncs") as i64;
    assert!(syncs >= reported, "{syncs} stored syncs < {reported} reported");
}
