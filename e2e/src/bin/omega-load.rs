//! `omega-load`: drives one shard server with simulated devices and reports throughput,
//! latency percentiles and bytes on the wire.
//!
//! `--baseline-echo` then drives a bare tonic echo of the sync's payload shape with the same
//! devices, connections and concurrency (`echo_calls_per_sec`, `ratio`). `--flood-connections`
//! runs an unauthenticated flood of never-finishing bodies during the sync run and reports
//! the server's resident memory before, at its peak, and after the flood (with
//! `--spawn-server`).

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use omega_e2e::load::flood::{Flood, FloodConfig, rss_bytes};
use omega_e2e::load::{self, LoadConfig, Progress, echo, spawn};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(name = "omega-load", version, about = "Load generator for an Omega shard server")]
struct Args {
    /// `Constellation` endpoint of a running shard.
    #[arg(long, env = "OMEGA_LOAD_TARGET", default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Start a throwaway `omega-shard` instead of using --target.
    #[arg(long)]
    spawn_server: bool,
    /// With --spawn-server: use this Postgres instead of the embedded store.
    #[arg(long, requires = "spawn_server")]
    database_url: Option<String>,
    /// With --spawn-server: the `omega-shard` binary (default: next to omega-load).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Simulated devices.
    #[arg(long, default_value_t = 2000)]
    devices: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Seconds of syncing after registration.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Patterns added per sync (~440 B each on the wire).
    #[arg(long, default_value_t = 2)]
    patterns: usize,
    /// Region the devices register with.
    #[arg(long, default_value = "local")]
    region: String,
    /// Model id on the deltas.
    #[arg(long, default_value = omega_protocol::DEFAULT_MODEL_ID)]
    model_id: String,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// After the shard run, run the same load against a bare tonic echo of the sync's payload
    /// shape in this process, and report `echo_calls_per_sec` and `ratio`.
    #[arg(long)]
    baseline_echo: bool,
    /// Unauthenticated flood during the sync run: connections (0 = none).
    #[arg(long, default_value_t = 0)]
    flood_connections: usize,
    /// Flood: never-finishing requests kept open per connection.
    #[arg(long, default_value_t = 50)]
    flood_streams: usize,
    /// Flood: KiB of body each request sends before stalling (its frame announces 1 MiB).
    #[arg(long, default_value_t = 1023)]
    flood_body_kib: usize,
    /// Flood: source address of its connections (another loopback address than the devices').
    #[arg(long, default_value = "127.0.0.2")]
    flood_source: std::net::IpAddr,
    /// Seconds to wait after the flood before measuring the server's memory again.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spawned = if args.spawn_server {
        let bin = match &args.server_bin {
            Some(b) => b.clone(),
            None => spawn::sibling_binary()
                .context("omega-shard not found next to omega-load; pass --server-bin")?,
        };
        Some(spawn::spawn(&bin, args.database_url.as_deref()).context("starting omega-shard")?)
    } else {
        None
    };
    let target = spawned.as_ref().map_or(args.target.clone(), |s| s.grpc_url.clone());
    let cfg = LoadConfig {
        target,
        devices: args.devices,
        concurrency: args.concurrency,
        connections: args.connections,
        duration: Duration::from_secs(args.duration_secs),
        patterns_per_sync: args.patterns,
        region: args.region,
        model_id: args.model_id,
        device_prefix: format!("load-{:08x}", rand::random::<u32>()),
        seed: args.seed,
    };
    let progress = Arc::new(Progress::default());
    let bar = ProgressBar::new(args.duration_secs);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("registering {} devices", args.devices));
    let ticker = {
        let bar = bar.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            let mut started: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let ok = progress.ok.load(Ordering::Relaxed);
                if ok > 0 && started.is_none() {
                    started = Some(Instant::now());
                }
                let now = Instant::now();
                let rate = (ok - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, ok);
                if let Some(s) = started {
                    bar.set_position(s.elapsed().as_secs());
                    bar.set_message(format!(
                        "{ok} syncs, {rate:.0}/s, {} errors",
                        progress.errors.load(Ordering::Relaxed)
                    ));
                }
            }
        })
    };
    let pid = spawned.as_ref().map(spawn::SpawnedShard::pid);
    let rss_start = pid.and_then(rss_bytes);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_start.unwrap_or(0)));
    let sampler = pid.map(|pid| {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(r) = rss_bytes(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let flood = (args.flood_connections > 0).then(|| {
        Flood::start(FloodConfig {
            target: cfg.target.clone(),
            connections: args.flood_connections,
            streams: args.flood_streams,
            body_bytes: args.flood_body_kib * 1024,
            source: args.flood_source,
        })
    });
    let report = load::run(&cfg, progress).await.context("load run failed");
    let mut extra = serde_json::Map::new();
    if let Some(f) = flood {
        let s = f.stats.clone();
        f.stop().await;
        tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
        extra.insert("flood_requests_sent".into(), s.sent.load(Ordering::Relaxed).into());
        extra.insert("flood_requests_answered".into(), s.answered.load(Ordering::Relaxed).into());
        extra.insert("flood_cut".into(), s.cut.load(Ordering::Relaxed).into());
    }
    if let Some(t) = sampler {
        t.abort();
    }
    if let (Some(pid), Some(start)) = (pid, rss_start) {
        let mib = |b: u64| (b as f64 / 1_048_576.0 * 10.0).round() / 10.0;
        extra.insert("server_rss_start_mib".into(), mib(start).into());
        extra.insert("server_rss_peak_mib".into(), mib(peak.load(Ordering::Relaxed)).into());
        if let Some(end) = rss_bytes(pid) {
            extra.insert("server_rss_end_mib".into(), mib(end).into());
        }
    }
    let report = report?;
    ticker.abort();
    bar.finish_and_clear();
    drop(spawned);
    if args.baseline_echo {
        let e = echo::Echo::new(&cfg.model_id);
        extra.insert("echo_response_bytes".into(), e.response_bytes().into());
        let url = echo::serve(e).await.context("starting the echo server")?;
        let echo_cfg = LoadConfig { target: url, ..cfg.clone() };
        let echo_report =
            load::run(&echo_cfg, Arc::new(Progress::default())).await.context("echo run failed")?;
        let ratio = report.syncs_per_sec / echo_report.syncs_per_sec.max(f64::MIN_POSITIVE);
        extra.insert("echo_calls_per_sec".into(), echo_report.syncs_per_sec.into());
        extra.insert("echo_p99_ms".into(), echo_report.p99_ms.into());
        extra.insert("echo_errors".into(), echo_report.errors.into());
        extra.insert("ratio".into(), ((ratio * 1000.0).round() / 1000.0).into());
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            o.extend(extra);
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "{} syncs in {:.1} s: {:.0} syncs/s, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors {:?}\nbytes up p50 {} B, down p50 {} B (max {} B), similar p50 {}",
            report.syncs,
            report.duration_secs,
            report.syncs_per_sec,
            report.p50_ms,
            report.p90_ms,
            report.p99_ms,
            report.max_ms,
            report.errors,
            report.error_kinds,
            report.bytes_up_p50,
            report.bytes_down_p50,
            report.bytes_down_max,
            report.similar_p50,
        );
        for (k, v) in &extra {
            println!("{k}: {v}");
        }
    }
    Ok(())
}
