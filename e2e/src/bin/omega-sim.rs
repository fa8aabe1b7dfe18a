//! `omega-sim`: a local constellation on MovieLens-100K — shard servers, one simulated TV per
//! user, federation rounds every simulated hour — and the quality of every method.
//!
//! Without arguments, the quick main job: the first [`QUICK_USERS`] users, one seed, the
//! recorded baseline settings, no DP pass (a few minutes on 2 cores). `--full` is the whole
//! evaluation: every user, 5 seeds, the baselines searched on the validation item, the DP pass.

use anyhow::Context;
use clap::Parser;
use omega_e2e::eval::report::{self, Series};
use omega_e2e::eval::{Stage, Ties};
use omega_e2e::sim::{self, SimConfig};
use std::path::PathBuf;

/// Users of the quick run (the first ones of the data set, a fixed subset).
const QUICK_USERS: usize = 100;

/// The held-out item a run ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Holdout {
    /// The latest interaction (reported numbers).
    Test,
    /// The second latest, models fitted on train only (choosing settings).
    Validation,
}

/// Runs the fleet simulation and prints the quality report.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The whole evaluation: all users, `--seeds 5`, baselines searched on the validation
    /// item, the DP pass.
    #[arg(long)]
    full: bool,
    /// Only the first N users (100 by default, all 943 with `--full`).
    #[arg(long)]
    users: Option<usize>,
    /// Seeds every method runs with (1 by default, 5 with `--full`).
    #[arg(long)]
    seeds: Option<usize>,
    /// Seeds whose fleets run at the same time (each uses about one core).
    #[arg(long, default_value_t = 2)]
    parallel_seeds: usize,
    /// How equal timestamps are ordered in the leave-one-out split.
    #[arg(long, value_enum, default_value_t = Ties::FileOrder)]
    ties: Ties,
    /// The held-out item ranked (`validation` to choose a setting without touching the test
    /// item).
    #[arg(long, value_enum, default_value_t = Holdout::Test)]
    holdout: Holdout,
    /// Search the baselines' hyper-parameters on the validation item (on with `--full`).
    #[arg(long)]
    tune: bool,
    /// Use the recorded baseline settings even with `--full`.
    #[arg(long, conflicts_with = "tune")]
    no_tune: bool,
    /// Shard servers, in-process on loopback gRPC.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Postgres (with pgvector) for the shard instead of the embedded store.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// First seed of the negative draw, sync jitter and MF (seed i is seed + i).
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
    /// ε per device the DP pass spends in total over the whole simulated period (zCDP
    /// composition of its releases).
    #[arg(long, default_value_t = 8.0)]
    epsilon: f64,
    /// δ of the DP pass, in total likewise.
    #[arg(long, default_value_t = 1e-6)]
    delta: f64,
    /// Releases (rounds) the DP pass splits its budget between, evenly spaced over the replay.
    #[arg(long, default_value_t = 1)]
    dp_releases: u32,
    /// Run the DP pass (on with `--full`).
    #[arg(long)]
    dp: bool,
    /// Skip the DP pass even with `--full`.
    #[arg(long, conflicts_with = "dp")]
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
    let command = std::iter::once("omega-sim".to_string())
        .chain(std::env::args().skip(1).filter(|a| !a.contains("://")))
        .collect::<Vec<_>>()
        .join(" ");
    let cfg = SimConfig {
        users: match (args.users, args.full) {
            (Some(n), _) => Some(n),
            (None, true) => None,
            (None, false) => Some(QUICK_USERS),
        },
        seeds: args.seeds.unwrap_or(if args.full { 5 } else { 1 }),
        parallel_seeds: args.parallel_seeds,
        ties: args.ties,
        holdout: match args.holdout {
            Holdout::Test => Stage::Test,
            Holdout::Validation => Stage::Validation,
        },
        tune: args.tune || (args.full && !args.no_tune),
        command,
        shards: args.shards,
        database_url: args.database_url.filter(|u| !u.is_empty()),
        seed: args.seed,
        session_hours: args.session_hours,
        eval_hours: args.eval_hours,
        round_every_hours: args.round_every_hours,
        round_min_growth: args.round_min_growth,
        min_sources: args.min_sources,
        dp: ((args.full || args.dp) && !args.no_dp).then_some((args.epsilon, args.delta)),
        dp_releases: args.dp_releases,
        chosen: omega_e2e::eval::suite::recorded().0,
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
            points: c.iter().map(|p| (p.round, p.hr10)).collect(),
        })
        .collect();
    let refs: Vec<(String, f64)> =
        ["popularity", "local_only", "mf_bpr", "central_reference", "federated"]
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
