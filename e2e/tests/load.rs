//! `omega-load` against an in-process shard server (embedded store): real gRPC, real deltas.

use clap::Parser;
use omega_e2e::load::{self, LoadConfig, Progress, spawn::free_port};
use std::sync::Arc;
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
    assert!(report.similar_p50 > 0, "devices get each other's patterns: {report:?}");
}
