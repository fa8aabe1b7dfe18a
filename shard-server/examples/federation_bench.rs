//! Benchmark: one federation round over 1,000,000 patterns from 4 in-memory shards, over real
//! loopback gRPC with zstd. `cargo run --release -p omega-shard --example federation_bench
//! [-- PATTERNS SHARDS]`. Prints the round summary and the time of each phase.

use omega_federation::federate;
use omega_federation::intake::Intake;
use omega_federation::privacy::NoiseSeed;
use omega_protocol::pb;
use omega_protocol::types::embedding_to_wire;
use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize};
use omega_shard::federation::fixture::{self, MemoryShard};
use omega_shard::federation::{FederateArgs, FederationMetrics, run};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::time::Instant;

fn unit(rng: &mut StdRng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..EMBEDDING_DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    l2_normalize(&mut v);
    v
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let argv: Vec<String> = std::env::args().collect();
    let total: usize = argv.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let n_shards: usize = argv.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let (contents, variants, per_device) = (20_000usize, 5usize, 5usize);
    let t = Instant::now();
    let mut rng = StdRng::seed_from_u64(1);
    // Context variants of each content: the base text's embedding, slightly moved.
    let embeddings: Vec<pb::Embedding> = (0..contents)
        .flat_map(|_| {
            let base = unit(&mut rng);
            (0..variants)
                .map(|_| {
                    let mut v: Vec<f32> =
                        base.iter().map(|x| x + rng.random_range(-0.02f32..0.02)).collect();
                    l2_normalize(&mut v);
                    embedding_to_wire(&v)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mut running = Vec::new();
    let mut intake = Intake::default();
    for s in 0..n_shards {
        let n = total / n_shards;
        let mut patterns = Vec::with_capacity(n);
        for i in 0..n {
            let device = i / per_device;
            // Zipf-like popularity: squaring a uniform draw favours low content indices.
            let u: f64 = rng.random();
            let c = ((u * u) * contents as f64) as usize % contents;
            let mut id = vec![0u8; 16];
            id[..8].copy_from_slice(&((s * n + i) as u64).to_le_bytes());
            patterns.push(pb::ExportedPattern {
                pattern: Some(pb::Pattern {
                    id,
                    content_id: format!("content-{c}"),
                    embedding: Some(
                        embeddings[c * variants + rng.random_range(0..variants)].clone(),
                    ),
                    success_rate: rng.random_range(0.8f32..1.0),
                    sample_count: rng.random_range(1..20),
                    context: None,
                    created_at_ms: 0,
                    updated_at_ms: rng.random_range(0..48 * 3_600_000),
                }),
                source: format!("device-{device}").into_bytes(),
                region: ["eu", "us", "apac"][device % 3].into(),
            });
        }
        // The same patterns, read directly, to time the computation without transport.
        let batch = pb::ExportBatch {
            patterns: patterns.clone(),
            shard_id: s as u32 + 1,
            model_id: "bench-model".into(),
            ..Default::default()
        };
        intake.add_batch(&batch, 0.8)?;
        let shard = MemoryShard::new(s as u32 + 1, "bench-model", patterns);
        running.push(fixture::serve(shard).await?);
    }
    eprintln!("seeded {total} patterns on {n_shards} shards in {:?}", t.elapsed());
    let mut args = FederateArgs::new("bench-round", running.iter().map(|r| r.url()).collect());
    args.batch_size = 2_000;
    args.timeout_secs = 120;
    let metrics = FederationMetrics::new();
    let t = Instant::now();
    let summary = run(&args, &metrics).await;
    let secs = t.elapsed().as_secs_f64();
    println!("{}", serde_json::to_string(&summary)?);
    eprintln!(
        "round over {} patterns: {secs:.2} s ({:.0} patterns/s)",
        summary.patterns_in,
        summary.patterns_in as f64 / secs
    );
    for r in running {
        r.stop().await;
    }
    let t = Instant::now();
    let out = federate(&intake, &args.round_config()?, &NoiseSeed::from_os()?);
    eprintln!(
        "of which computation (grouping, aggregation, collaborative vectors, trends): {:.2} s for {} aggregates",
        t.elapsed().as_secs_f64(),
        out.patterns.len()
    );
    Ok(())
}
