//! The cluster side of `charts/omega/ci/dashboard_live.py`: the real `omega-operator` binary
//! against the fake API server, its shard pods' stats answered by a real shard server and its
//! federation Job run as a real `omega-shard federate` over that shard, so a real Prometheus
//! can scrape the operator's `/metrics` (operator and federation panels).
//!
//! Ignored in the test suite: the script runs it with, in the environment, `OMEGA_LIVE_DIR`
//! (where this test writes `ready` and the script then writes `stop`), `OMEGA_LIVE_SHARD_BIN`
//! (the `omega-shard` binary), `OMEGA_LIVE_SHARD_ADMIN` and `OMEGA_LIVE_SHARD_REST` (the
//! running shard's admin gRPC and REST ports) and `OMEGA_LIVE_OPERATOR_PORT` (where the
//! operator serves `/metrics`).

use crate::fake::Fake;
use crate::fake::controllers::JobRun;
use crate::support::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (see the module doc)"))
}

/// The Job's container args with the shards' addresses and the summary file redirected to
/// the live shard and a local file: runs the round, returns what its pod would report.
fn federate(shard_bin: &str, admin_port: &str, dir: &std::path::Path, args: &[String]) -> JobRun {
    let summary = dir.join("summary.json");
    let mut args = args.to_vec();
    for (flag, value) in [
        ("--shards", format!("http://127.0.0.1:{admin_port}")),
        ("--summary-file", summary.display().to_string()),
    ] {
        let at = args.iter().position(|a| a == flag).expect(flag) + 1;
        args[at] = value;
    }
    let status = std::process::Command::new(shard_bin)
        .args(&args)
        .env("LOG_FORMAT", "json")
        .status()
        .expect("omega-shard federate");
    JobRun {
        exit_code: status.code().unwrap_or(1),
        message: std::fs::read_to_string(&summary).unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by charts/omega/ci/dashboard_live.py against a live shard"]
async fn fake_cluster_for_the_live_dashboard() {
    let dir = PathBuf::from(var("OMEGA_LIVE_DIR"));
    let (shard_bin, admin) = (var("OMEGA_LIVE_SHARD_BIN"), var("OMEGA_LIVE_SHARD_ADMIN"));
    let rest: u16 = var("OMEGA_LIVE_SHARD_REST").parse().expect("OMEGA_LIVE_SHARD_REST");
    let port: u16 = var("OMEGA_LIVE_OPERATOR_PORT").parse().expect("OMEGA_LIVE_OPERATOR_PORT");

    let fake = Fake::start().await;
    install_crds(&fake);
    {
        let mut b = fake.behaviour.lock().unwrap();
        b.stats_port = Some(rest);
        let job_dir = dir.clone();
        b.job = Box::new(move |args| federate(&shard_bin, &admin, &job_dir, args));
    }
    let _operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_omega-operator"))
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--lease-namespace", "default"])
        .args(["--stats-interval-seconds", "1", "--backoff-base-seconds", "1"])
        .env("KUBECONFIG", fake.kubeconfig_as(&dir, crate::fake::OPERATOR))
        .env("LOG_FORMAT", "json")
        // The refused Shard's retries are expected here.
        .env("RUST_LOG", "error")
        .env("POD_NAME", "operator-live")
        .kill_on_drop(true)
        .spawn()
        .expect("omega-operator binary");

    let shard = |name: &str, id: u32, extra: serde_json::Value| {
        let mut spec = json!({"shardId": id, "replicas": {"min": 1, "max": 1}});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "Shard",
            "metadata": {"name": name, "labels": {"tier": name}}, "spec": spec})
    };
    fake.create("omega.exogenesis.io", "shards", "default", shard("live", 1, json!({})));
    // A Shard the API server refuses to run (a CPU limit that is no quantity): a failing
    // reconcile and a Degraded object, as the operator panels show them.
    let broken = shard("broken", 2, json!({"resources": {"limits": {"cpu": "lots"}}}));
    fake.create("omega.exogenesis.io", "shards", "default", broken);
    fake.wait_for(60, "the live Shard Running", |f| {
        let s = f.get("omega.exogenesis.io", "shards", "default", "live")?;
        (s["status"]["phase"] == json!("Running")).then_some(())
    })
    .await;
    let round = json!({"apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "FederationRound",
        "metadata": {"name": "live"},
        "spec": {"shardSelector": {"matchLabels": {"tier": "live"}}, "minSources": 3}});
    fake.create("omega.exogenesis.io", "federationrounds", "default", round);
    let phase = fake
        .wait_for(120, "the round finished", |f| {
            let r = f.get("omega.exogenesis.io", "federationrounds", "default", "live")?;
            let phase = r["status"]["phase"].as_str()?.to_string();
            ["Succeeded", "Failed"].contains(&phase.as_str()).then_some((phase, r))
        })
        .await;
    assert_eq!(phase.0, "Succeeded", "{}", phase.1);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = http_get(port, "/metrics").await.unwrap_or_default();
        if m.contains(r#"federation_rounds_total{round="default/live",status="succeeded"} 1"#)
            && m.contains(r#"omega_operator_degraded{controller="shard",reason="ApplyFailed"} 1"#)
            && m.contains(r#"omega_operator_reconcile_failures_total{controller="shard""#)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "operator metrics incomplete:\n{m}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    std::fs::write(dir.join("ready"), port.to_string()).expect("ready file");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !dir.join("stop").exists() {
        assert!(tokio::time::Instant::now() < deadline, "the script never wrote `stop`");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
