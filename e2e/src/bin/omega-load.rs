//! `omega-load`: drives one shard server with simulated devices and reports throughput,
//! latency percentiles and bytes on the wire.

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use omega_e2e::load::{self, LoadConfig, Progress, spawn};
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
    let report = load::run(&cfg, progress).await.context("load run failed")?;
    ticker.abort();
    bar.finish_and_clear();
    drop(spawned);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
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
    }
    Ok(())
}
