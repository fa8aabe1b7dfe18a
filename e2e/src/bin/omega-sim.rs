//! `omega-sim`: a local constellation on MovieLens-100K — shard servers, one simulated TV per
//! user, federation rounds every simulated hour — and the quality of every method.

use anyhow::Context;
use clap::Parser;
use omega_e2e::eval::report::{self, Series};
use omega_e2e::sim::{self, SimConfig};
use std::path::PathBuf;

/// Runs the fleet simulation and prints the quality report.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Only the first N users (a quick run); all 943 by default.
    #[arg(long)]
    users: Option<usize>,
    /// Shard servers, in-process on loopback gRPC.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Postgres (with pgvector) for the shard instead of the embedded store.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Seed of the negative draw, sync jitter and MF.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Hours a TV stays on after a viewing event.
    #[arg(long, default_value_t = 2.0)]
    session_hours: f64,
    /// Hours every TV is on after the replay before it is evaluated.
    #[arg(long, default_value_t = 6.0)]
    eval_hours: f64,
    /// Simulated hours between federation rounds.
    #[arg(long, default_value_t = 1.0)]
    round_every_hours: f64,
    /// Growth of pushed patterns since the last round below which an hour is idle.
    #[arg(long, default_value_t = 0.02)]
    round_min_growth: f64,
    /// k of k-anonymity (distinct devices per published group).
    #[arg(long, default_value_t = 3)]
    min_sources: u32,
    /// ε of the DP pass.
    #[arg(long, default_value_t = 8.0)]
    epsilon: f64,
    /// δ of the DP pass.
    #[arg(long, default_value_t = 1e-6)]
    delta: f64,
    /// Skip the DP pass.
    #[arg(long)]
    no_dp: bool,
    /// Users sampled after every round for the quality-per-round curve.
    #[arg(long, default_value_t = 200)]
    curve_users: usize,
    /// Keep the TVs' SQLite files here (a temporary directory otherwise).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Report directory (JSON, markdown, SVG plot).
    #[arg(long, default_value = "e2e/out")]
    out: PathBuf,
    /// Print only the JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// TVs also rank candidates whose collaborative vector came from an older round than the
    /// one they hold (off by default; see docs/quality.md).
    #[arg(long)]
    mix_rounds: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // ~3 files per TV (SQLite, its WAL and index) plus sockets: lift the soft limit.
    if let Err(e) = rlimit::increase_nofile_limit(65_536) {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let cfg = SimConfig {
        users: args.users,
        shards: args.shards,
        database_url: args.database_url.filter(|u| !u.is_empty()),
        seed: args.seed,
        session_hours: args.session_hours,
        eval_hours: args.eval_hours,
        round_every_hours: args.round_every_hours,
        round_min_growth: args.round_min_growth,
        min_sources: args.min_sources,
        dp: (!args.no_dp).then_some((args.epsilon, args.delta)),
        mf: sim::chosen_mf(args.seed),
        data_dir: args.data_dir,
        curve_users: args.curve_users,
        progress: true,
        ranking: omega_device::RankingParams {
            collaborative_current_round_only: !args.mix_rounds,
            ..Default::default()
        },
    };
    let r = sim::run(cfg).await.context("simulation failed")?;
    let md = sim::markdown(&r);
    report::write_json(&args.out.join("sim.json"), &r)?;
    report::write_text(&args.out.join("sim.md"), &md)?;
    let series: Vec<Series> = [("federated", &r.curve), ("federated_dp", &r.curve_dp)]
        .into_iter()
        .filter(|(_, c)| !c.is_empty())
        .map(|(name, c)| Series {
            name: name.into(),
            points: c.iter().map(|p| (f64::from(p.round), p.hr10)).collect(),
        })
        .collect();
    let refs: Vec<(String, f64)> = ["popularity", "local_only", "centralized_mf"]
        .iter()
        .filter_map(|m| r.hr10.get(*m).map(|v| (format!("{m} (end)"), *v)))
        .collect();
    report::plot_rounds(
        &args.out.join("sim-quality.svg"),
        "HR@10 of a user sample after each federation round",
        "HR@10 (sampled)",
        &series,
        &refs,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{md}");
        eprintln!("omega-sim: wrote {}/sim.json, sim.md and sim-quality.svg", args.out.display());
    }
    Ok(())
}
