//! `omega-shard federate` against real `omega-shard serve` processes (embedded store):
//! devices sync patterns through `Constellation`, the round reads them over `ShardAdmin`,
//! publishes, and the shards then serve the round; a rerun changes nothing; a killed shard
//! fails the round, or, with `--allow-partial`, the round completes without it and says so.

mod common;

use common::{Shard, delta, pattern_with, register, sync_request, unit_near};
use omega_protocol::admin::{RoundOutcome, RoundSummary};
use std::path::Path;
use std::process::Command;
use uuid::Uuid;

fn admin_url(s: &Shard) -> String {
    format!("http://127.0.0.1:{}", s.admin)
}

/// Runs `omega-shard federate`; returns the exit code and the parsed summary line.
fn federate(round: &str, shards: &[String], state: &Path, extra: &[&str]) -> (i32, RoundSummary) {
    let out = Command::new(env!("CARGO_BIN_EXE_omega-shard"))
        .args(["federate", "--round-id", round, "--shards", &shards.join(",")])
        .args(["--timeout-secs", "5", "--attempts", "1"])
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run omega-shard federate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let summary: RoundSummary = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("summary line {line:?}: {e}; stderr {}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), summary)
}

/// `devices` devices on `shard` each sync one pattern per content of `contents` (the same
/// embedding per content, as real TVs embedding the same text would).
async fn seed(shard: &Shard, prefix: &str, devices: usize, contents: &[usize]) {
    let mut c = shard.client().await;
    for d in 0..devices {
        let id = format!("{prefix}-{d}");
        let token = register(&mut c, &id).await;
        let added = contents
            .iter()
            .map(|&k| {
                let mut p = pattern_with(Uuid::now_v7(), &unit_near(k, 0), 0.9);
                p.content_id = format!("film-{k}");
                p
            })
            .collect();
        c.sync(sync_request(&id, Some(&token), delta(1, added))).await.expect("sync");
    }
}

#[tokio::test]
async fn a_round_over_real_shards_publishes_once_and_copes_with_a_lost_shard() {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut shards: Vec<Shard> = dirs.iter().map(|d| Shard::start(d.path(), None, &[])).collect();
    // Films 0-2: two devices on each shard (4 in all, k = 3 needs both shards); film 9: one
    // device sending a poisoned pattern (success 1.0, random embedding).
    seed(&shards[0], "a", 2, &[0, 1, 2]).await;
    seed(&shards[1], "b", 2, &[0, 1, 2]).await;
    {
        let mut c = shards[0].client().await;
        let token = register(&mut c, "poison").await;
        let mut p = pattern_with(Uuid::now_v7(), &common::random_unit(77), 1.0);
        p.content_id = "film-9".into();
        c.sync(sync_request("poison", Some(&token), delta(1, vec![p]))).await.expect("sync");
    }
    let urls: Vec<String> = shards.iter().map(admin_url).collect();
    let state = tempfile::tempdir().expect("state");
    let metrics = state.path().join("metrics.txt");
    let summary_file = state.path().join("summary.json");
    let (code, s) = federate(
        "round-bb-1",
        &urls,
        state.path(),
        &[
            "--metrics-file",
            metrics.to_str().unwrap_or_default(),
            "--summary-file",
            summary_file.to_str().unwrap_or_default(),
        ],
    );
    assert_eq!((code, s.outcome), (0, RoundOutcome::Succeeded), "{s:?}");
    assert_eq!(s.patterns_in, 13);
    assert_eq!(s.patterns_aggregated, 3, "films 0-2 (4 devices each), never the poisoned film 9");
    assert_eq!(s.groups_suppressed, 1);
    assert!(
        std::fs::read_to_string(&metrics)
            .expect("metrics")
            .contains("federation_rounds_total{status=\"succeeded\"} 1")
    );
    assert_eq!(
        serde_json::from_str::<RoundSummary>(
            &std::fs::read_to_string(&summary_file).expect("summary")
        )
        .expect("json"),
        s
    );
    for sh in &shards {
        assert_eq!(sh.stats()["global_version"].as_u64(), Some(s.global_version));
    }

    // Rerunning the round (fresh state: the shards themselves remember it) changes nothing.
    let state2 = tempfile::tempdir().expect("state");
    let (code, again) = federate("round-bb-1", &urls, state2.path(), &[]);
    assert_eq!(
        (code, again.outcome, again.already_published),
        (0, RoundOutcome::Succeeded, true),
        "{again:?}"
    );

    // Shard 2 dies: the next round fails without --allow-partial, completes without it with.
    shards[1].kill9();
    let (code, failed) = federate("round-bb-2", &urls, state.path(), &[]);
    assert_ne!(code, 0);
    assert_eq!(failed.outcome, RoundOutcome::Failed);
    assert_eq!(failed.shards_failed.len(), 1);
    let (code, partial) = federate("round-bb-3", &urls, state.path(), &["--allow-partial"]);
    assert_eq!((code, partial.outcome), (0, RoundOutcome::Partial), "{partial:?}");
    assert_eq!(partial.shards_failed[0].endpoint, urls[1]);
    assert!(partial.message.as_deref().is_some_and(|m| m.contains("without 1 shard")));
    // Only 2 devices per film remain visible: below k, nothing is published.
    assert_eq!(partial.patterns_aggregated, 0);
}
