//! Federation rounds over real loopback gRPC against in-memory shards: success, idempotent
//! reruns, a shard lost mid-round (fail or go on without it, as configured), resuming.

use omega_protocol::admin::RoundOutcome;
use omega_protocol::pb;
use omega_protocol::types::embedding_to_wire;
use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize};
use omega_shard::federation::fixture::{self, MemoryShard};
use omega_shard::federation::{FederateArgs, FederationMetrics, run};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::sync::Arc;
use std::sync::atomic::Ordering;

const MODEL: &str = "test-model";

/// `devices` devices on shard `shard`, each liking `per_device` of 40 contents.
fn patterns(shard: u32, devices: u32, per_device: u32, seed: u64) -> Vec<pb::ExportedPattern> {
    let mut rng = StdRng::seed_from_u64(seed);
    let bases: Vec<Vec<f32>> = (0..40)
        .map(|c| {
            let mut r = StdRng::seed_from_u64(c);
            let mut v: Vec<f32> =
                (0..EMBEDDING_DIM).map(|_| r.random_range(-1.0f32..1.0)).collect();
            l2_normalize(&mut v);
            v
        })
        .collect();
    let mut out = Vec::new();
    for d in 0..devices {
        for k in 0..per_device {
            let c = ((d * 7 + k * 3) % 40) as usize;
            let mut id = vec![0u8; 16];
            id[..4].copy_from_slice(&shard.to_le_bytes());
            id[4..8].copy_from_slice(&d.to_le_bytes());
            id[8..12].copy_from_slice(&k.to_le_bytes());
            out.push(pb::ExportedPattern {
                pattern: Some(pb::Pattern {
                    id,
                    content_id: format!("c{c}"),
                    embedding: Some(embedding_to_wire(&bases[c])),
                    success_rate: rng.random_range(0.8f32..1.0),
                    sample_count: rng.random_range(1..10),
                    context: None,
                    created_at_ms: 0,
                    updated_at_ms: 3_600_000 * i64::from(k),
                }),
                source: format!("dev-{d}").into_bytes(),
                region: if d % 2 == 0 { "eu".into() } else { "us".into() },
            });
        }
    }
    out
}

async fn shards(n: u32) -> (Vec<Arc<MemoryShard>>, Vec<fixture::Running>) {
    let mut shards = Vec::new();
    let mut running = Vec::new();
    for s in 0..n {
        let shard = MemoryShard::new(s + 1, MODEL, patterns(s + 1, 30, 8, u64::from(s)));
        running.push(fixture::serve(shard.clone()).await.expect("serve"));
        shards.push(shard);
    }
    (shards, running)
}

fn args(id: &str, running: &[fixture::Running]) -> FederateArgs {
    let mut a = FederateArgs::new(id, running.iter().map(|r| r.url()).collect());
    a.batch_size = 50;
    a.timeout_secs = 5;
    a.attempts = 1;
    a
}

#[tokio::test]
async fn a_round_publishes_the_same_result_to_every_shard_once() {
    let (shards, running) = shards(3).await;
    let metrics = FederationMetrics::new();
    let s = run(&args("round-1", &running), &metrics).await;
    assert_eq!(s.outcome, RoundOutcome::Succeeded, "{s:?}");
    assert_eq!((s.shards_total, s.shards_completed), (3, 3));
    assert_eq!(s.patterns_in, 3 * 30 * 8);
    assert!(s.patterns_aggregated > 0 && s.patterns_aggregated <= 40);
    assert!(s.trends_detected > 0);
    assert!(!s.already_published);
    let first = shards[0].published();
    assert_eq!(first.len(), 1);
    for sh in &shards {
        assert_eq!(sh.published(), first, "every shard gets the same request");
    }
    let req = &first[0];
    assert_eq!((req.round_id.as_str(), req.model_id.as_str()), ("round-1", MODEL));
    assert!(req.patterns.iter().all(|p| p.source_devices >= 3));

    // Rerunning the same round publishes nothing new.
    let again = run(&args("round-1", &running), &metrics).await;
    assert_eq!(again.outcome, RoundOutcome::Succeeded);
    assert!(again.already_published);
    assert_eq!(again.patterns_aggregated, s.patterns_aggregated);
    assert!(shards.iter().all(|sh| sh.published().len() == 1));

    let text = metrics.encode();
    assert!(text.contains("federation_rounds_total{status=\"succeeded\"} 2"), "{text}");
    assert!(
        text.contains(&format!("federation_patterns_aggregated_total {}", s.patterns_aggregated))
    );
    assert!(text.contains("federation_round_duration_seconds_count 2"));
    assert!(text.contains("federation_trends_detected_total"));
    for r in running {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_shard_lost_mid_round_fails_the_round_and_a_rerun_resumes_and_completes_it() {
    let (shards, running) = shards(2).await;
    let state = tempfile::tempdir().expect("tmp");
    let mut a = args("round-2", &running);
    a.state_dir = Some(state.path().to_path_buf());
    // Shard 2 breaks off after 2 of its 5 batches.
    shards[1].fail_after_batches.store(2, Ordering::Relaxed);
    let metrics = FederationMetrics::new();
    let s = run(&a, &metrics).await;
    assert_eq!(s.outcome, RoundOutcome::Failed, "{s:?}");
    assert_eq!(s.shards_failed.len(), 1);
    assert_eq!(s.shards_failed[0].endpoint, running[1].url());
    assert!(
        s.message.as_deref().is_some_and(|m| m.contains("rerun with the same --round-id")),
        "{s:?}"
    );
    assert!(shards.iter().all(|sh| sh.published().is_empty()), "a failed round publishes nothing");

    // The rerun resumes shard 2 from its cursor (shard 1 is not asked again) and completes.
    let exports_before = shards[0].exports.load(Ordering::Relaxed);
    let s2 = run(&a, &metrics).await;
    assert_eq!(s2.outcome, RoundOutcome::Succeeded, "{s2:?}");
    assert_eq!(shards[0].exports.load(Ordering::Relaxed), exports_before);
    assert_eq!(s2.patterns_in, 2 * 30 * 8, "nothing lost, nothing read twice");
    assert!(shards.iter().all(|sh| sh.published().len() == 1));
    assert!(metrics.encode().contains("federation_rounds_total{status=\"failed\"} 1"));
    for r in running {
        r.stop().await;
    }
}

#[tokio::test]
async fn allow_partial_completes_without_an_unreachable_shard_and_says_so() {
    let (shards, mut running) = shards(3).await;
    let down = running.remove(2);
    let down_url = down.url();
    let down_addr = down.addr;
    down.stop().await;
    let mut a = args("round-3", &running);
    a.shards.push(down_url.clone());
    let state = tempfile::tempdir().expect("tmp");
    a.state_dir = Some(state.path().to_path_buf());

    // Without --allow-partial the round fails.
    let strict = run(
        &FederateArgs { round_id: "round-3-strict".into(), ..a.clone() },
        &FederationMetrics::new(),
    )
    .await;
    assert_eq!(strict.outcome, RoundOutcome::Failed);

    a.allow_partial = true;
    let s = run(&a, &FederationMetrics::new()).await;
    assert_eq!(s.outcome, RoundOutcome::Partial, "{s:?}");
    assert_eq!((s.shards_total, s.shards_completed), (3, 2));
    assert_eq!(
        s.shards_failed.iter().map(|f| f.endpoint.as_str()).collect::<Vec<_>>(),
        vec![down_url.as_str()]
    );
    assert!(s.message.as_deref().is_some_and(|m| m.contains("without 1 shard")));
    assert_eq!(s.patterns_in, 2 * 30 * 8);
    assert_eq!(shards[0].published().len(), 1);

    // The shard comes back: the rerun delivers the round to it too.
    let back = fixture::serve_on(shards[2].clone(), down_addr).await.expect("rebind");
    let s2 = run(&a, &FederationMetrics::new()).await;
    assert_eq!(s2.outcome, RoundOutcome::Succeeded, "{s2:?}");
    assert_eq!(s2.shards_completed, 3);
    assert!(s2.message.as_deref().is_some_and(|m| m.contains("without contributing")), "{s2:?}");
    assert_eq!(shards[2].published(), shards[0].published());
    back.stop().await;
    for r in running {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_round_with_no_quality_pattern_publishes_an_empty_set_under_the_shards_model() {
    let shard = MemoryShard::new(1, MODEL, Vec::new());
    let running = vec![fixture::serve(shard.clone()).await.expect("serve")];
    let s = run(&args("round-empty", &running), &FederationMetrics::new()).await;
    assert_eq!(s.outcome, RoundOutcome::Succeeded, "{s:?}");
    assert_eq!((s.patterns_in, s.patterns_aggregated), (0, 0));
    assert_eq!(shard.published()[0].model_id, MODEL);
    for r in running {
        r.stop().await;
    }
}

#[tokio::test]
async fn no_reachable_shard_is_a_failed_round_with_a_reason() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let mut a = FederateArgs::new("round-4", vec![url]);
    a.allow_partial = true;
    a.timeout_secs = 2;
    a.attempts = 1;
    let s = run(&a, &FederationMetrics::new()).await;
    assert_eq!(s.outcome, RoundOutcome::Failed);
    assert!(s.message.is_some() && s.shards_failed.len() == 1, "{s:?}");
}

#[tokio::test]
async fn dp_rounds_compose_over_the_ledger_and_a_round_over_the_budget_releases_nothing() {
    let (shards, running) = shards(2).await;
    let metrics = FederationMetrics::new();
    let dp = |id: &str, ledger: &str| {
        let mut a = args(id, &running);
        a.epsilon = Some(1.0);
        a.delta = Some(1e-7);
        a.budget_epsilon = Some(1.3);
        a.period_days = 7;
        a.privacy_ledger = ledger.to_string();
        a
    };
    let first = run(&dp("dp-1", ""), &metrics).await;
    assert_eq!(first.outcome, RoundOutcome::Succeeded, "{first:?}");
    let acc = first.privacy.clone().expect("accounting");
    assert_eq!(acc.rounds_in_period, 1);
    assert!((acc.composed_epsilon - 1.0).abs() < 1e-9, "{acc:?}");
    assert_eq!((acc.budget_epsilon, acc.period_days), (1.3, 7));
    // The next round carries the first one's ledger in: two rounds of ε = 1 compose to more
    // than 1.3 (about 1.41), so it is refused before anything is drawn or published.
    let ledger = serde_json::to_string(&acc.ledger).expect("json");
    let published_before: Vec<usize> = shards.iter().map(|s| s.published().len()).collect();
    let second = run(&dp("dp-2", &ledger), &metrics).await;
    assert_eq!(second.outcome, RoundOutcome::Failed);
    let msg = second.message.clone().unwrap_or_default();
    assert!(msg.starts_with("privacy budget exhausted"), "{msg}");
    assert!(second.privacy.is_none());
    let published_after: Vec<usize> = shards.iter().map(|s| s.published().len()).collect();
    assert_eq!(published_before, published_after, "nothing released");
    // Without the ledger the same round would fit: the refusal came from the ledger.
    assert_eq!(run(&dp("dp-3", ""), &metrics).await.outcome, RoundOutcome::Succeeded);
    let bad = run(&dp("dp-4", "{\"days\": 3}"), &metrics).await;
    assert_eq!(bad.outcome, RoundOutcome::Failed);
    assert!(bad.message.unwrap_or_default().starts_with("--privacy-ledger"));
}
