//! Federation rounds (`omega-shard federate`, the program a FederationRound Job runs).
//!
//! A round reads every shard's quality patterns over `ShardAdmin.ExportPatterns`, groups the
//! patterns that mean the same thing, weighs them, keeps only groups that at least
//! `min_sources` distinct devices back (k-anonymity), optionally adds Gaussian noise for
//! (ε, δ)-differential privacy, detects rising content and embedding regions per region,
//! and publishes the result to every shard with `PublishGlobal` (idempotent on the round id),
//! so the next `Sync` of every TV carries it.
//!
//! Decisions are pure functions with table tests in the `omega-federation` crate (intake,
//! grouping, weighting, collaborative vectors, privacy, trends, the round); this module is the
//! I/O around them: [`runner`] (gRPC, retries, partial rounds), [`checkpoint`] (resuming),
//! [`metrics`] and the flags ([`config`]). [`fixture`] is an in-memory `ShardAdmin` for tests
//! and benchmarks.

pub mod checkpoint;
pub mod config;
pub mod fixture;
pub mod metrics;
pub mod runner;

pub use config::FederateArgs;
pub use metrics::FederationMetrics;
pub use runner::run;

use omega_protocol::admin::{RoundOutcome, RoundSummary};

/// Why a round could not complete.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// Bad flags.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// `--shards` is empty.
    #[error("no shards to federate (--shards / SHARD_ADMIN_ENDPOINTS)")]
    NoShards,
    /// A shard could not be reached or broke off.
    #[error("shard {endpoint} unreachable: {reason}")]
    Unreachable {
        /// Admin endpoint.
        endpoint: String,
        /// What happened.
        reason: String,
    },
    /// Shards failed and the round may not go on without them.
    #[error("round failed: shard(s) {shards} unreachable{}", if *resumable { "; rerun with the same --round-id to resume" } else { " (without --allow-partial)" })]
    ShardsFailed {
        /// Their endpoints.
        shards: String,
        /// Whether a checkpoint keeps the progress.
        resumable: bool,
    },
    /// Shards serve different models.
    #[error(transparent)]
    Intake(#[from] omega_federation::intake::IntakeError),
    /// The checkpoint could not be used.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// No noise could be had, or the privacy budget refuses the round (nothing released).
    #[error(transparent)]
    Privacy(#[from] omega_federation::privacy::PrivacyError),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What `omega-shard federate` does: runs the round, prints the summary as one JSON line,
/// writes the summary and metrics files, and returns the exit code (0 for succeeded or
/// partial, 1 for failed).
pub async fn main(args: FederateArgs) -> i32 {
    let metrics = FederationMetrics::new();
    let summary = run(&args, &metrics).await;
    let json = serde_json::to_string(&summary).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    println!("{json}");
    let mut code = exit_code(&summary);
    if let Some(p) = &args.summary_file
        && let Err(e) = std::fs::write(p, &json)
    {
        eprintln!("cannot write summary file {}: {e}", p.display());
        code = 1;
    }
    if let Some(p) = &args.metrics_file
        && let Err(e) = std::fs::write(p, metrics.encode())
    {
        eprintln!("cannot write metrics file {}: {e}", p.display());
    }
    code
}

/// 0 for succeeded or partial, 1 for failed.
pub fn exit_code(s: &RoundSummary) -> i32 {
    match s.outcome {
        RoundOutcome::Succeeded | RoundOutcome::Partial => 0,
        RoundOutcome::Failed => 1,
    }
}
