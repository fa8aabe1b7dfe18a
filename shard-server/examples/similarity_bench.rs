//! Similarity-query benchmark with many stored patterns.
//!
//! ```sh
//! cargo run --release -p omega-shard --example similarity_bench -- --store embedded --patterns 1000000
//! cargo run --release -p omega-shard --example similarity_bench -- --store postgres \
//!     --database-url postgres://omega@127.0.0.1:PORT/omega --patterns 1000000 [--similar-index pgvector]
//! ```
//!
//! Loads `--patterns` unit embeddings (`--data random`: uniformly random directions, the worst
//! case for approximate search; `--data clustered`: around 1,000 centres, closer to what MiniLM
//! embeddings of viewing contexts look like) with success rates uniform in [0.8, 1], so every
//! one is shareable, owned by `--devices` devices (256 consecutive patterns per device), then
//! times `--queries` similarity queries through the store's own `similar` (the 16 nearest a
//! sync asks for, success >= 0.8, excluding the asking device) and measures recall@16 of
//! `--recall-queries` of them against an exact scan. Prints one JSON line.
//!
//! Postgres is loaded straight into `patterns` (and, for `--similar-index pgvector`, into
//! `pattern_vectors` with the HNSW index dropped, which is then built: the time is reported):
//! that is how a large shard is bulk-loaded; the sync path (intake, merge, indexer) is not what
//! this measures. The store is opened after the load, so with `--similar-index memory` the
//! time to readiness is the index rebuild every server process does at start. RSS is the
//! whole bench process (it keeps no copy of the data).

use clap::Parser;
use omega_protocol::pb;
use omega_protocol::vector::{EMBEDDING_DIM, QuantizedVector, dot_i8, l2_normalize, quantize};
use omega_shard::store::{SimilarIndex, SimilarQuery, Store, StoreOptions, SyncWrite};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BinaryHeap, HashSet};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Data {
    Random,
    Clustered,
}

#[derive(Debug, Parser)]
struct Args {
    /// `embedded` or `postgres`.
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Postgres URL (with --store postgres).
    #[arg(long)]
    database_url: Option<String>,
    /// Postgres: what serves similarity queries.
    #[arg(long, value_enum, default_value_t = SimilarIndex::Memory)]
    similar_index: SimilarIndex,
    /// Embedded store directory (default: a temporary one).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Patterns to store.
    #[arg(long, default_value_t = 1_000_000)]
    patterns: usize,
    /// Devices owning them.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Embedding distribution.
    #[arg(long, value_enum, default_value_t = Data::Random)]
    data: Data,
    /// Queries to time.
    #[arg(long, default_value_t = 2000)]
    queries: usize,
    /// Of those, how many are checked against an exact scan (recall@16).
    #[arg(long, default_value_t = 100)]
    recall_queries: usize,
    /// HNSW ef_construction for the Postgres index build.
    #[arg(long, default_value_t = 64)]
    ef_construction: u32,
    /// HNSW m.
    #[arg(long, default_value_t = 16)]
    m: u32,
    /// HNSW ef_search.
    #[arg(long, default_value_t = 40)]
    ef_search: u32,
    /// In-process ANN lists.
    #[arg(long, default_value_t = 256)]
    ann_lists: usize,
    /// In-process ANN probes.
    #[arg(long, default_value_t = 8)]
    ann_probes: usize,
    /// Skip loading (the database already holds the patterns of the same arguments).
    #[arg(long)]
    no_load: bool,
    /// Postgres: load through the store's sync path (intake, merge, the index following and
    /// retraining as it grows) into an empty database, instead of bulk-loading and opening.
    #[arg(long)]
    through_store: bool,
}

const PER_DEVICE_RUN: usize = 256;
const CENTRES: usize = 1000;

/// The data, generated the same way every time from its seed (the recall check regenerates
/// it instead of keeping a copy).
struct Generator {
    rng: StdRng,
    data: Data,
    centres: Vec<Vec<f32>>,
}

fn random_unit(rng: &mut StdRng) -> Vec<f32> {
    let mut v: Vec<f32> =
        (0..EMBEDDING_DIM).map(|_| (0..3).map(|_| rng.random_range(-1.0f32..1.0)).sum()).collect();
    l2_normalize(&mut v);
    v
}

fn near(rng: &mut StdRng, centre: &[f32]) -> Vec<f32> {
    // Per-component noise of 0.08: cosine ~0.75 to the centre.
    let mut v: Vec<f32> = centre.iter().map(|x| x + rng.random_range(-0.08f32..0.08)).collect();
    l2_normalize(&mut v);
    v
}

impl Generator {
    fn new(seed: u64, data: Data) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres = match data {
            Data::Random => Vec::new(),
            Data::Clustered => (0..CENTRES).map(|_| random_unit(&mut rng)).collect(),
        };
        Generator { rng, data, centres }
    }

    fn vector(&mut self) -> Vec<f32> {
        match self.data {
            Data::Random => random_unit(&mut self.rng),
            Data::Clustered => {
                let c = self.rng.random_range(0..self.centres.len());
                near(&mut self.rng, &self.centres[c])
            }
        }
    }

    fn pattern(&mut self) -> pb::Pattern {
        let q = quantize(&self.vector());
        pb::Pattern {
            id: Uuid::from_u128(self.rng.random()).as_bytes().to_vec(),
            content_id: format!("content-{}", self.rng.random_range(0..100_000)),
            embedding: Some(pb::Embedding { values: q.to_bytes(), scale: q.scale }),
            success_rate: self.rng.random_range(0.8f32..=1.0),
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
}

fn owner(i: usize, devices: usize) -> usize {
    (i / PER_DEVICE_RUN) % devices
}

async fn load_through_store(
    store: &dyn Store,
    args: &Args,
    g: &mut Generator,
) -> anyhow::Result<()> {
    for d in 0..args.devices {
        store.register(&format!("dev-{d}"), "local", u64::MAX, 0).await?;
    }
    let mut version = vec![0u64; args.devices];
    let mut done = 0;
    while done < args.patterns {
        let n = PER_DEVICE_RUN.min(args.patterns - done);
        let d = owner(done, args.devices);
        let added: Vec<_> = (0..n).map(|_| g.pattern()).collect();
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
        done += n;
    }
    Ok(())
}

/// Bulk-loads Postgres; returns the HNSW build time (0 without it).
async fn load_postgres(url: &str, args: &Args, g: &mut Generator) -> anyhow::Result<f64> {
    use sqlx::Connection;
    let pgvector = args.similar_index == SimilarIndex::Pgvector;
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
        let (mut pid, mut dev, mut emb, mut rate, mut content) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let p = g.pattern();
            let e = p.embedding.as_ref().ok_or_else(|| anyhow::anyhow!("no embedding"))?;
            pid.push(Uuid::from_slice(&p.id)?);
            dev.push(ids[owner(done + i, args.devices)].clone());
            emb.push(pgvector::Vector::from(
                QuantizedVector::from_bytes(&e.values, e.scale).dequantize(),
            ));
            rate.push(p.success_rate);
            content.push(p.content_id);
        }
        let vectors = if pgvector {
            "v AS (INSERT INTO pattern_vectors (id, device_id, success_rate, embedding)
                   SELECT id, d, r, e FROM x WHERE r >= 0.8),"
        } else {
            ""
        };
        sqlx::query(&format!(
            "WITH x AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::vector[], $4::real[],
                                             $5::text[]) AS x(id, d, e, r, c)),
                  {vectors}
                  done AS (SELECT 1)
             INSERT INTO patterns (id, device_id, content_id, embedding, success_rate, sample_count,
                 time_slot, day_type, content_type, genres, created_at_ms, updated_at_ms, index_seq)
             SELECT id, d, c, e, r, 3, 3, 1, 1, ARRAY['drama'], 1700000000000, 1700000000000, 0
             FROM x"
        ))
        .bind(&pid)
        .bind(&dev)
        .bind(&emb)
        .bind(&rate)
        .bind(&content)
        .execute(&mut conn)
        .await?;
        done += n;
        if done % 100_000 == 0 {
            eprintln!("loaded {done}");
        }
    }
    // The load bypassed the merge, which keeps the stored-pattern count: recount once.
    sqlx::query("UPDATE merge_state SET patterns = (SELECT count(*) FROM patterns)")
        .execute(&mut conn)
        .await?;
    sqlx::query("ANALYZE patterns").execute(&mut conn).await?;
    if !pgvector {
        return Ok(0.0);
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
    sqlx::query("ANALYZE pattern_vectors").execute(&mut conn).await?;
    // The rows were loaded indexed already: move the indexer's cursor past them.
    sqlx::query("UPDATE indexer_state SET last_seq = 1").execute(&mut conn).await?;
    Ok(t.elapsed().as_secs_f64())
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(PartialEq)]
struct Scored(f32, u128);
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    // Reversed: the heap's top is the worst kept.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.total_cmp(&self.0)
    }
}

/// Exact top-`k` ids for each `(device, query)`, by regenerating the data.
fn exact(args: &Args, queries: &[(usize, QuantizedVector)], k: usize) -> Vec<HashSet<Uuid>> {
    let mut g = Generator::new(7, args.data);
    let mut heaps: Vec<BinaryHeap<Scored>> = queries.iter().map(|_| BinaryHeap::new()).collect();
    for i in 0..args.patterns {
        let p = g.pattern();
        let Some(e) = p.embedding.as_ref() else { continue };
        let values: Vec<i8> = e.values.iter().map(|&b| i8::from_ne_bytes([b])).collect();
        let id = u128::from_be_bytes(p.id.as_slice().try_into().unwrap_or([0; 16]));
        let own = owner(i, args.devices);
        for ((device, q), heap) in queries.iter().zip(heaps.iter_mut()) {
            if *device == own {
                continue;
            }
            let s = dot_i8(&q.values, &values) as f32 * e.scale;
            if heap.len() < k {
                heap.push(Scored(s, id));
            } else if heap.peek().is_some_and(|w| s > w.0) {
                heap.pop();
                heap.push(Scored(s, id));
            }
        }
    }
    heaps.into_iter().map(|h| h.into_iter().map(|s| Uuid::from_u128(s.1)).collect()).collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The store's own log lines (the index load reports its time) on stderr.
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let mut data = Generator::new(7, args.data);
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
    opts.similar_index = args.similar_index;
    opts.ann_lists = args.ann_lists;
    opts.ann_probes = args.ann_probes;
    opts.wal_compact_bytes = u64::MAX;
    let t = Instant::now();
    let mut index_secs = 0.0;
    let mut load_secs = 0.0;
    let postgres = args.store == "postgres";
    let through_store = !args.no_load && (!postgres || args.through_store);
    if postgres {
        omega_shard::store::postgres::migrate_database(&opts).await?;
        if !args.no_load && !args.through_store {
            let url = args.database_url.as_deref().unwrap_or_default();
            index_secs = load_postgres(url, &args, &mut data).await?;
            load_secs = t.elapsed().as_secs_f64() - index_secs;
        }
    }
    let rss_before = rss_mib().0;
    let opened = Instant::now();
    let pg = if postgres {
        Some(std::sync::Arc::new(omega_shard::store::postgres::PostgresStore::open(&opts).await?))
    } else {
        None
    };
    let store: omega_shard::store::SharedStore = match &pg {
        Some(p) => p.clone(),
        None => omega_shard::store::open(&opts).await?,
    };
    // With the in-memory index, the store is ready once it is loaded.
    while let Err(e) = store.check_ready().await {
        anyhow::ensure!(opened.elapsed() < Duration::from_secs(3600), "never ready: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_secs = opened.elapsed().as_secs_f64();
    let mut indexed_secs = 0.0;
    let mut index_info = None;
    if through_store {
        load_through_store(store.as_ref(), &args, &mut data).await?;
        load_secs = t.elapsed().as_secs_f64();
        // Postgres indexes a sync after its merge: wait until every pattern is searchable and
        // no rebuild is due or running.
        if let Some(p) = &pg {
            loop {
                let info = p.memory_index_info()?;
                if let Some(i) = info
                    && i.indexed >= args.patterns
                    && !i.rebuild_pending(args.ann_lists)
                {
                    index_info = Some(i);
                    break;
                }
                anyhow::ensure!(t.elapsed() < Duration::from_secs(3600), "never indexed: {info:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            indexed_secs = t.elapsed().as_secs_f64();
        }
    }
    let (rss_after, rss_peak) = rss_mib();
    let stored = store.counts(0).await?.patterns;

    let mut qrng = StdRng::seed_from_u64(8);
    let mut queries = Vec::with_capacity(args.queries + 50);
    for _ in 0..args.queries + 50 {
        let device = qrng.random_range(0..args.devices);
        let interest = match args.data {
            Data::Random => random_unit(&mut qrng),
            Data::Clustered => {
                let c = qrng.random_range(0..CENTRES);
                near(&mut qrng, &data.centres[c])
            }
        };
        queries.push((device, interest));
    }
    let mut lat = Vec::with_capacity(args.queries);
    let mut results = 0usize;
    let mut answers: Vec<Vec<Uuid>> = Vec::new();
    for (n, (device, interest)) in queries.iter().enumerate() {
        let query = SimilarQuery {
            device_id: format!("dev-{device}"),
            interest: interest.clone(),
            limit: omega_shard::sync::SIMILAR_CANDIDATES,
            min_quality: 0.8,
        };
        let t = Instant::now();
        let found = store.similar(query).await?;
        if n >= 50 {
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            results += found.len();
            if answers.len() < args.recall_queries {
                answers.push(
                    found.iter().filter_map(|s| Uuid::from_slice(&s.pattern.id).ok()).collect(),
                );
            }
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let k = omega_shard::sync::SIMILAR_CANDIDATES;
    let checked: Vec<(usize, QuantizedVector)> =
        queries[50..50 + answers.len()].iter().map(|(d, v)| (*d, quantize(v))).collect();
    let recall = if answers.is_empty() {
        0.0
    } else {
        let truth = exact(&args, &checked, k);
        let hits: usize = answers
            .iter()
            .zip(&truth)
            .map(|(a, t)| a.iter().filter(|id| t.contains(id)).count())
            .sum();
        hits as f64 / (answers.len() * k) as f64
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({
            "store": args.store,
            "similar_index": if postgres { format!("{:?}", args.similar_index).to_lowercase() } else { "ivf".into() },
            "data": args.data,
            "patterns": stored,
            "ann": [args.ann_lists, args.ann_probes],
            "load_secs": load_secs,
            "all_searchable_secs": indexed_secs,
            "index": index_info.map(|i| format!("{i:?}")),
            "index_build_secs": index_secs,
            "ready_after_open_secs": ready_secs,
            "rss_mib_before_open": rss_before,
            "rss_mib_loaded": rss_after,
            "rss_mib_peak": rss_peak,
            "queries": args.queries,
            "results_per_query": results as f64 / args.queries as f64,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": lat.last().copied().unwrap_or(0.0),
            "recall_at_16": recall,
            "recall_queries": answers.len(),
            "loadavg": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        })
    );
    store.flush().await?;
    Ok(())
}
