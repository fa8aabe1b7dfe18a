//! Similarity-query benchmark with many stored patterns.
//!
//! ```sh
//! cargo run --release -p omega-shard --example similarity_bench -- --store embedded --patterns 1000000
//! cargo run --release -p omega-shard --example similarity_bench -- --store postgres \
//!     --database-url postgres://omega@127.0.0.1:PORT/omega --patterns 1000000
//! ```
//!
//! Loads `--patterns` random unit embeddings (success rates uniform in [0.8, 1], so every one
//! is shareable and in the search index) owned by
//! `--devices` devices, then times `--queries` similarity queries through the store's own
//! `similar` (the 16 nearest a sync asks for, success >= 0.8, excluding the asking device),
//! and prints one JSON
//! line. Postgres is loaded straight into `patterns` and `pattern_vectors` with the HNSW index
//! dropped, then the index is built (the time is reported): that is how a large shard is
//! bulk-loaded; the sync path (intake, merge, indexer) is not what this measures.

use clap::Parser;
use omega_protocol::pb;
use omega_protocol::vector::{EMBEDDING_DIM, QuantizedVector, l2_normalize, quantize};
use omega_shard::store::{SimilarQuery, Store, StoreOptions, SyncWrite};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;
use uuid::Uuid;

#[derive(Debug, Parser)]
struct Args {
    /// `embedded` or `postgres`.
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Postgres URL (with --store postgres).
    #[arg(long)]
    database_url: Option<String>,
    /// Embedded store directory (default: a temporary one).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Patterns to store.
    #[arg(long, default_value_t = 1_000_000)]
    patterns: usize,
    /// Devices owning them.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Queries to time.
    #[arg(long, default_value_t = 2000)]
    queries: usize,
    /// HNSW ef_construction for the Postgres index build.
    #[arg(long, default_value_t = 64)]
    ef_construction: u32,
    /// HNSW m.
    #[arg(long, default_value_t = 16)]
    m: u32,
    /// HNSW ef_search.
    #[arg(long, default_value_t = 40)]
    ef_search: u32,
    /// Skip loading (the database already holds the patterns).
    #[arg(long)]
    no_load: bool,
}

fn unit(rng: &mut StdRng) -> Vec<f32> {
    let mut v: Vec<f32> =
        (0..EMBEDDING_DIM).map(|_| (0..3).map(|_| rng.random_range(-1.0f32..1.0)).sum()).collect();
    l2_normalize(&mut v);
    v
}

fn pattern(rng: &mut StdRng) -> pb::Pattern {
    let q = quantize(&unit(rng));
    pb::Pattern {
        id: Uuid::now_v7().as_bytes().to_vec(),
        content_id: format!("content-{}", rng.random_range(0..100_000)),
        embedding: Some(pb::Embedding { values: q.to_bytes(), scale: q.scale }),
        success_rate: rng.random_range(0.8f32..=1.0),
        sample_count: 3,
        context: Some(pb::PatternContext {
            time_slot: 3,
            day_type: 1,
            content_type: 1,
            genres: vec!["drama".into()],
        }),
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
    }
}

async fn load_embedded(store: &dyn Store, args: &Args, rng: &mut StdRng) -> anyhow::Result<()> {
    for d in 0..args.devices {
        store.register(&format!("dev-{d}"), "local", u64::MAX, 0).await?;
    }
    let per = 256;
    let mut version = vec![0u64; args.devices];
    let mut left = args.patterns;
    let mut d = 0;
    while left > 0 {
        let n = per.min(left);
        let added: Vec<_> = (0..n).map(|_| pattern(rng)).collect();
        version[d] += 1;
        store
            .apply_sync(SyncWrite {
                device_id: format!("dev-{d}"),
                local_version: version[d],
                added,
                now_ms: 1,
                ..Default::default()
            })
            .await?;
        left -= n;
        d = (d + 1) % args.devices;
    }
    Ok(())
}

async fn load_postgres(url: &str, args: &Args, rng: &mut StdRng) -> anyhow::Result<f64> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query("DROP INDEX IF EXISTS pattern_vectors_embedding_hnsw").execute(&mut conn).await?;
    let ids: Vec<String> = (0..args.devices).map(|d| format!("dev-{d}")).collect();
    sqlx::query("INSERT INTO devices (device_id, region) SELECT unnest($1::text[]), 'local' ON CONFLICT DO NOTHING")
        .bind(&ids)
        .execute(&mut conn)
        .await?;
    let batch = 2000;
    let mut done = 0;
    while done < args.patterns {
        let n = batch.min(args.patterns - done);
        let mut pid = Vec::with_capacity(n);
        let mut dev = Vec::with_capacity(n);
        let mut emb = Vec::with_capacity(n);
        let mut rate = Vec::with_capacity(n);
        for i in 0..n {
            let p = pattern(rng);
            let e = p.embedding.as_ref().expect("embedding");
            pid.push(Uuid::from_slice(&p.id)?);
            dev.push(ids[(done + i) % ids.len()].clone());
            emb.push(pgvector::Vector::from(
                QuantizedVector::from_bytes(&e.values, e.scale).dequantize(),
            ));
            rate.push(p.success_rate);
        }
        sqlx::query(
            "WITH x AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::vector[], $4::real[])
                          AS x(id, d, e, r)),
                  v AS (INSERT INTO pattern_vectors (id, device_id, success_rate, embedding)
                        SELECT id, d, r, e FROM x WHERE r >= 0.8)
             INSERT INTO patterns (id, device_id, content_id, embedding, success_rate, sample_count,
                 time_slot, day_type, content_type, genres, created_at_ms, updated_at_ms, index_seq)
             SELECT id, d, 'content-' || (random() * 100000)::int, e, r, 3, 3, 1, 1, ARRAY['drama'], 0, 0, 0
             FROM x",
        )
        .bind(&pid)
        .bind(&dev)
        .bind(&emb)
        .bind(&rate)
        .execute(&mut conn)
        .await?;
        done += n;
        if done % 100_000 == 0 {
            eprintln!("loaded {done}");
        }
    }
    eprintln!(
        "building the HNSW index (m = {}, ef_construction = {})",
        args.m, args.ef_construction
    );
    let t = Instant::now();
    sqlx::query("SET maintenance_work_mem = '8GB'").execute(&mut conn).await?;
    sqlx::query("SET max_parallel_maintenance_workers = 1").execute(&mut conn).await?;
    sqlx::query(&format!(
        "CREATE INDEX pattern_vectors_embedding_hnsw ON pattern_vectors USING hnsw (embedding vector_cosine_ops) WITH (m = {}, ef_construction = {})",
        args.m, args.ef_construction
    ))
    .execute(&mut conn)
    .await?;
    sqlx::query("ANALYZE patterns").execute(&mut conn).await?;
    sqlx::query("ANALYZE pattern_vectors").execute(&mut conn).await?;
    // The rows were loaded indexed already: move the indexer's cursor past them.
    sqlx::query("UPDATE indexer_state SET last_seq = 1").execute(&mut conn).await?;
    // The load bypassed the merge, which keeps the stored-pattern count: recount once.
    sqlx::query("UPDATE merge_state SET patterns = (SELECT count(*) FROM patterns)")
        .execute(&mut conn)
        .await?;
    Ok(t.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rng = StdRng::seed_from_u64(7);
    let tmp = tempfile::tempdir()?;
    let mut opts = match args.store.as_str() {
        "postgres" => StoreOptions::postgres(
            args.database_url.as_deref().ok_or_else(|| anyhow::anyhow!("--database-url"))?,
        ),
        _ => StoreOptions::embedded(args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf())),
    };
    opts.hnsw_m = args.m;
    opts.hnsw_ef_construction = args.ef_construction;
    opts.hnsw_ef_search = args.ef_search;
    opts.wal_compact_bytes = u64::MAX;
    let store = omega_shard::store::open(&opts).await?;
    let t = Instant::now();
    let mut index_secs = 0.0;
    if !args.no_load {
        match args.store.as_str() {
            "postgres" => {
                index_secs =
                    load_postgres(args.database_url.as_deref().unwrap_or_default(), &args, &mut rng)
                        .await?
            }
            _ => load_embedded(store.as_ref(), &args, &mut rng).await?,
        }
    }
    let load_secs = t.elapsed().as_secs_f64();
    let stored = store.counts(0).await?.patterns;
    let mut lat = Vec::with_capacity(args.queries);
    let mut results = 0usize;
    for q in 0..args.queries + 50 {
        let query = SimilarQuery {
            device_id: format!("dev-{}", rng.random_range(0..args.devices)),
            interest: unit(&mut rng),
            limit: omega_shard::sync::SIMILAR_CANDIDATES,
            min_quality: 0.8,
        };
        let t = Instant::now();
        let found = store.similar(query).await?;
        if q >= 50 {
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            results += found.len();
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "store": args.store,
            "patterns": stored,
            "load_secs": load_secs,
            "index_build_secs": index_secs,
            "queries": args.queries,
            "results_per_query": results as f64 / args.queries as f64,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": lat.last().copied().unwrap_or(0.0),
        })
    );
    store.flush().await?;
    Ok(())
}
