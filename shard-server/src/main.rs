//! `omega-shard`: the shard server's command line.
//!
//! Subcommands are variants of [`Command`]; adding one (e.g. `federate`) is one variant and
//! one match arm.

use anyhow::Context;
use clap::{Parser, Subcommand};
use omega_shard::config::{LogFormat, ServeArgs, StoreArgs};
use tracing_subscriber::EnvFilter;

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
    /// Apply the database schema (also done by `serve` at start) and exit.
    Migrate(StoreArgs),
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command {
        Command::Serve(args) => omega_shard::server::serve(*args, Default::default())
            .await
            .context("omega-shard serve failed")?,
        Command::Migrate(args) => {
            let kind = omega_shard::server::migrate(&args).await.context("migration failed")?;
            tracing::info!(store = kind, "schema is current");
        }
    }
    Ok(())
}
