//! `omega-shard`: the shard server's command line.
//!
//! Subcommands are variants of [`Command`]; adding one (e.g. `federate`) is one variant and
//! one match arm.

use anyhow::Context;
use clap::{Parser, Subcommand};
use omega_shard::config::{LogFormat, MigrateArgs, ServeArgs};

#[derive(Debug, Parser)]
#[command(name = "omega-shard", version, about = "Omega shard server")]
struct Cli {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve devices (gRPC 50051), admin gRPC (50052), REST (8080) and metrics (9090).
    Serve(Box<ServeArgs>),
    /// Apply the database schema (also done by `serve` at start), or check the embedded
    /// store's log (`--repair` truncates a damaged one after a backup), and exit.
    Migrate(MigrateArgs),
    /// Run one federation round over the shards' admin endpoints and print its JSON summary.
    Federate(Box<omega_shard::federation::FederateArgs>),
}

fn init_logs(format: LogFormat) {
    omega_telemetry::init_logs(format == LogFormat::Json, "info");
}

/// Runs the command; `Ok` holds the exit code.
async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => omega_shard::server::serve(*args, Default::default())
            .await
            .context("omega-shard serve failed")?,
        Command::Migrate(args) => {
            let kind = omega_shard::server::migrate(&args).await.context("migration failed")?;
            tracing::info!(store = kind, "schema is current");
        }
        Command::Federate(args) => return Ok(omega_shard::federation::main(*args).await),
    }
    Ok(0)
}

/// Parses the command line. With `LOG_FORMAT=json`, a bad flag or variable is reported as a
/// JSON log line too (exit code 2, as clap's own), so a log collector never sees raw text.
fn parse_cli() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") => {
            init_logs(LogFormat::Json);
            tracing::error!(error = e.to_string().trim_end(), "invalid command line");
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}

#[tokio::main]
async fn main() {
    let cli = parse_cli();
    // Spans go to an OTLP collector when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let traces = omega_telemetry::init(cli.log_format == LogFormat::Json, "info", "omega-shard");
    let result = run(cli).await;
    // Before any exit: the last spans (a failed round's too) reach the collector.
    traces.shutdown().await;
    match result {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the context chain, outermost first ("serve failed: invalid
            // configuration: OMEGA_DEVICE_SECRET: …").
            tracing::error!(error = format!("{e:#}"), "omega-shard stopped");
            std::process::exit(1);
        }
    }
}
