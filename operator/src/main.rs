//! `omega-operator`: `run` the controllers, or `crdgen` the CRD YAML.

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use omega_operator::context::Settings;
use omega_operator::leader::LeaseConfig;
use omega_operator::run::{LeaseOptions, Options};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "omega-operator",
    version,
    about = "Omega Kubernetes operator: Shard and FederationRound controllers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers.
    Run(RunArgs),
    /// Write the CRD YAML files (or check that they are up to date).
    Crdgen {
        /// Directories to write to (the repository's `crds/` and the chart's).
        #[arg(long, default_values = ["crds", "charts/omega/files/crds"])]
        out: Vec<PathBuf>,
        /// Fail if the files on disk differ instead of writing them.
        #[arg(long)]
        check: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (all namespaces when empty).
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    namespace: String,
    /// Elect a leader on a Lease (run several replicas safely).
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "omega-operator")]
    lease_name: String,
    /// The operator's own namespace: where the leader Lease lives, and the only namespace
    /// from which the shards' NetworkPolicies admit the operator's pods.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Identity of this replica (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of /metrics, /health and /ready.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Log format: json or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    log_format: String,
    /// Seconds between reads of the shard servers' load (autoscaling period).
    #[arg(long, env = "STATS_INTERVAL_SECONDS", default_value_t = 15)]
    stats_interval_seconds: u64,
    /// First retry delay in seconds after an error or an unsatisfiable spec (doubles up to 300).
    #[arg(long, env = "BACKOFF_BASE_SECONDS", default_value_t = 5)]
    backoff_base_seconds: u64,
}

fn crdgen(outs: Vec<PathBuf>, check: bool) -> anyhow::Result<()> {
    let mut stale = vec![];
    for (out, (file, crd)) in
        outs.iter().flat_map(|o| omega_operator::crd::all().into_iter().map(move |c| (o, c)))
    {
        let yaml = omega_operator::crd::to_yaml(&crd).context("serialise CRD")?;
        let path = out.join(file);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                stale.push(path.display().to_string());
            }
        } else {
            std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
            std::fs::write(&path, yaml).with_context(|| format!("write {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        bail!("CRDs out of date (run `omega-operator crdgen`): {}", stale.join(", "));
    }
    Ok(())
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let identity =
        a.identity.clone().unwrap_or_else(|| format!("omega-operator-{}", std::process::id()));
    let settings = Settings {
        namespace: (!a.namespace.is_empty()).then(|| a.namespace.clone()),
        operator_namespace: a.lease_namespace.clone(),
        stats_interval: Duration::from_secs(a.stats_interval_seconds.max(1)),
        backoff_base: Duration::from_secs(a.backoff_base_seconds.max(1)),
        ..Settings::default()
    };
    let lease_duration = Duration::from_secs(a.lease_duration_seconds.max(3));
    let leader_election = a.leader_elect.then(|| LeaseOptions {
        namespace: a.lease_namespace.clone(),
        lease: LeaseConfig::new(a.lease_name.clone(), identity.clone(), lease_duration),
    });
    let client = kube::Client::try_default()
        .await
        .context("kubernetes client (kubeconfig or in-cluster)")?;
    tracing::info!(namespace = ?settings.namespace, leader_election = a.leader_elect, %identity, "starting");
    omega_operator::run::run(
        client,
        Options { settings, leader_election, listen: a.listen, identity },
    )
    .await?;
    Ok(())
}

/// Parses the command line. Unless `LOG_FORMAT=text`, a bad flag or variable is reported as
/// one JSON log line (exit code 2, as clap's own), so a log collector never sees raw text.
fn parse_cli() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && std::env::var("LOG_FORMAT").map_or(true, |f| f != "text") => {
            omega_operator::telemetry::init_logs(true);
            tracing::error!(error = e.to_string().trim_end(), "invalid command line");
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}

fn main() -> anyhow::Result<()> {
    match parse_cli().command {
        Command::Crdgen { out, check } => crdgen(out, check),
        Command::Run(a) => {
            let json = a.log_format != "text";
            let started = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")
                .and_then(|rt| {
                    rt.block_on(async {
                        let traces = omega_operator::telemetry::init(json);
                        let result = run(a).await;
                        traces.shutdown().await;
                        result
                    })
                });
            if let Err(e) = started {
                // One line, the context chain outermost first ("kubernetes client (kubeconfig
                // or in-cluster): …"), in the configured format.
                omega_operator::telemetry::init_logs(json);
                tracing::error!(error = format!("{e:#}"), "omega-operator stopped");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
