//! The flags of `omega-shard federate` (docs/architecture.md); each is also an env var.

use super::FederationError;
use omega_federation::collab::CollabConfig;
use omega_federation::group::DEFAULT_THRESHOLD;
use omega_federation::privacy::{Budget, DpParams, NoiseSeed};
use omega_federation::round::{DEFAULT_DP_MAX_GROUPS, DEFAULT_PROFILE_MIX, RoundConfig};
use omega_protocol::admin::PrivacyLedger;
use std::path::PathBuf;
use std::time::Duration;

/// `omega-shard federate`.
#[derive(Debug, Clone, clap::Args)]
pub struct FederateArgs {
    /// Round id; also the idempotency key of PublishGlobal.
    #[arg(long, env = "ROUND_ID")]
    pub round_id: String,
    /// ShardAdmin endpoints, comma-separated (`http://<shard>-admin.<ns>.svc:50052`).
    #[arg(long, env = "SHARD_ADMIN_ENDPOINTS", value_delimiter = ',', required = true)]
    pub shards: Vec<String>,
    /// Patterns below this success rate are not read.
    #[arg(long, env = "MIN_QUALITY", default_value_t = 0.8)]
    pub min_quality: f32,
    /// k-anonymity: distinct devices a published aggregate needs.
    #[arg(long, env = "MIN_SOURCES", default_value_t = 3)]
    pub min_sources: u32,
    /// Trend decay per hour.
    #[arg(long, env = "TREND_DECAY", default_value_t = 0.95)]
    pub trend_decay: f64,
    /// Differential privacy epsilon per round (with --delta).
    #[arg(long, env = "DP_EPSILON", requires = "delta")]
    pub epsilon: Option<f64>,
    /// Differential privacy delta per round (with --epsilon).
    #[arg(long, env = "DP_DELTA", requires = "epsilon")]
    pub delta: Option<f64>,
    /// Most groups one device contributes to in a DP round.
    #[arg(long, env = "DP_MAX_GROUPS", default_value_t = DEFAULT_DP_MAX_GROUPS)]
    pub dp_max_groups: u32,
    /// DP: most epsilon one device may spend per period, composed over every round of the
    /// period (default: the round's own --epsilon, so one DP round per period).
    #[arg(long, env = "PRIVACY_BUDGET_EPSILON")]
    pub budget_epsilon: Option<f64>,
    /// DP: the period of the budget, whole UTC days.
    #[arg(long, env = "PRIVACY_PERIOD_DAYS", default_value_t = DEFAULT_PERIOD_DAYS)]
    pub period_days: u32,
    /// DP: what earlier rounds of the period spent (the `privacy.ledger` JSON of the last
    /// round's summary); empty: nothing spent yet.
    #[arg(long, env = "PRIVACY_LEDGER", default_value = "")]
    pub privacy_ledger: String,
    /// DP: secret key of the noise (at least 16 bytes), so a rerun of a round id draws the same
    /// noise; unset: fresh noise from the operating system's CSPRNG.
    #[arg(long, env = "FEDERATION_NOISE_KEY", hide_env_values = true)]
    pub noise_key: Option<NoiseKey>,
    /// DP: file holding the noise key (a mounted Secret), instead of --noise-key.
    #[arg(long, env = "FEDERATION_NOISE_KEY_FILE", conflicts_with = "noise_key")]
    pub noise_key_file: Option<PathBuf>,
    /// Complete the round without unreachable shards (outcome `partial`) instead of failing.
    #[arg(long, env = "ALLOW_PARTIAL")]
    pub allow_partial: bool,
    /// Also write the JSON summary here (the Job's termination-message file).
    #[arg(long, env = "SUMMARY_FILE")]
    pub summary_file: Option<PathBuf>,
    /// Keep the round's progress here so a rerun resumes it.
    #[arg(long, env = "FEDERATION_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Write the federation_* metrics here in Prometheus text format.
    #[arg(long, env = "METRICS_FILE")]
    pub metrics_file: Option<PathBuf>,
    /// Cosine at which two embeddings of one content mean the same thing.
    #[arg(long, env = "GROUP_THRESHOLD", default_value_t = DEFAULT_THRESHOLD)]
    pub group_threshold: f32,
    /// Weight of the audience's interest vector in published embeddings, [0, 1].
    #[arg(long, env = "PROFILE_MIX", default_value_t = DEFAULT_PROFILE_MIX)]
    pub profile_mix: f32,
    /// Rank of the collaborative item vectors published as contents' embeddings (0: off,
    /// publish audience profiles instead).
    #[arg(long, env = "COLLAB_DIM", default_value_t = CollabConfig::default().dim)]
    pub collab_dim: usize,
    /// Ridge strength of the collaborative vectors, relative to the mean content popularity.
    #[arg(long, env = "COLLAB_LAMBDA", default_value_t = CollabConfig::default().lambda_rel)]
    pub collab_lambda: f64,
    /// Patterns per export batch asked of each shard.
    #[arg(long, env = "EXPORT_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: u32,
    /// Seconds to wait for a shard to answer one call.
    #[arg(long, env = "SHARD_TIMEOUT_SECS", default_value_t = 30)]
    pub timeout_secs: u64,
    /// Attempts per shard call before the shard counts as unreachable.
    #[arg(long, env = "SHARD_ATTEMPTS", default_value_t = 3)]
    pub attempts: u32,
    /// The shards' `ADMIN_TOKEN`, sent as `authorization: Bearer …` on every ShardAdmin call.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

/// Default `--period-days`.
pub const DEFAULT_PERIOD_DAYS: u32 = 30;

/// A secret noise key; its `Debug` does not print it.
#[derive(Clone)]
pub struct NoiseKey(Vec<u8>);

impl std::fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseKey(..)")
    }
}

impl std::str::FromStr for NoiseKey {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(NoiseKey(s.trim().as_bytes().to_vec()))
    }
}

/// Why the flags are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// `--privacy-ledger` is not a ledger.
    #[error("--privacy-ledger is not a privacy ledger: {0}")]
    Ledger(String),
    /// The noise key file cannot be read.
    #[error("--noise-key-file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A value outside its range.
    #[error("{flag} = {value} is outside {range}")]
    OutOfRange {
        /// Flag name.
        flag: &'static str,
        /// Given value.
        value: String,
        /// Allowed range.
        range: &'static str,
    },
}

fn check(
    ok: bool,
    flag: &'static str,
    value: impl ToString,
    range: &'static str,
) -> Result<(), ConfigError> {
    if ok { Ok(()) } else { Err(ConfigError::OutOfRange { flag, value: value.to_string(), range }) }
}

impl FederateArgs {
    /// Arguments with defaults for `round_id` over `shards` (for programs that run rounds
    /// in-process, like the simulator).
    pub fn new(round_id: &str, shards: Vec<String>) -> Self {
        FederateArgs {
            round_id: round_id.into(),
            shards,
            min_quality: 0.8,
            min_sources: 3,
            trend_decay: 0.95,
            epsilon: None,
            delta: None,
            dp_max_groups: DEFAULT_DP_MAX_GROUPS,
            budget_epsilon: None,
            period_days: DEFAULT_PERIOD_DAYS,
            privacy_ledger: String::new(),
            noise_key: None,
            noise_key_file: None,
            allow_partial: false,
            summary_file: None,
            state_dir: None,
            metrics_file: None,
            group_threshold: DEFAULT_THRESHOLD,
            profile_mix: DEFAULT_PROFILE_MIX,
            collab_dim: CollabConfig::default().dim,
            collab_lambda: CollabConfig::default().lambda_rel,
            batch_size: 1000,
            timeout_secs: 30,
            attempts: 3,
            admin_token: None,
        }
    }

    /// Validates and derives the round's decisions.
    pub fn round_config(&self) -> Result<RoundConfig, ConfigError> {
        check(
            (0.0..=1.0).contains(&self.min_quality),
            "--min-quality",
            self.min_quality,
            "[0, 1]",
        )?;
        check(self.min_sources >= 1, "--min-sources", self.min_sources, ">= 1")?;
        check(
            self.trend_decay > 0.0 && self.trend_decay <= 1.0,
            "--trend-decay",
            self.trend_decay,
            "(0, 1]",
        )?;
        check(
            (-1.0..=1.0).contains(&self.group_threshold),
            "--group-threshold",
            self.group_threshold,
            "[-1, 1]",
        )?;
        check(
            (0.0..=1.0).contains(&self.profile_mix),
            "--profile-mix",
            self.profile_mix,
            "[0, 1]",
        )?;
        check(self.dp_max_groups >= 1, "--dp-max-groups", self.dp_max_groups, ">= 1")?;
        check(self.collab_dim <= 384, "--collab-dim", self.collab_dim, "[0, 384]")?;
        check(
            self.collab_lambda > 0.0 && self.collab_lambda.is_finite(),
            "--collab-lambda",
            self.collab_lambda,
            "(0, inf)",
        )?;
        let dp = match (self.epsilon, self.delta) {
            (Some(epsilon), Some(delta)) => {
                check(epsilon > 0.0 && epsilon.is_finite(), "--epsilon", epsilon, "(0, inf)")?;
                check(delta > 0.0 && delta < 1.0, "--delta", delta, "(0, 1)")?;
                Some(DpParams { epsilon, delta, max_groups_per_device: self.dp_max_groups })
            }
            _ => None,
        };
        Ok(RoundConfig {
            min_quality: self.min_quality,
            min_sources: self.min_sources,
            trend_decay: self.trend_decay,
            group_threshold: self.group_threshold,
            profile_mix: self.profile_mix,
            dp,
            collab: (self.collab_dim > 0).then(|| CollabConfig {
                dim: self.collab_dim,
                lambda_rel: self.collab_lambda,
                ..CollabConfig::default()
            }),
        })
    }

    /// The per-device budget of a DP round with `p`.
    pub fn budget(&self, p: &DpParams) -> Result<Budget, ConfigError> {
        let epsilon = self.budget_epsilon.unwrap_or(p.epsilon);
        check(epsilon > 0.0 && epsilon.is_finite(), "--budget-epsilon", epsilon, "(0, inf)")?;
        check(self.period_days >= 1, "--period-days", self.period_days, ">= 1")?;
        Ok(Budget { epsilon, period_days: self.period_days })
    }

    /// The ledger carried in.
    pub fn ledger(&self) -> Result<PrivacyLedger, ConfigError> {
        if self.privacy_ledger.trim().is_empty() {
            return Ok(PrivacyLedger::default());
        }
        serde_json::from_str(&self.privacy_ledger).map_err(|e| ConfigError::Ledger(e.to_string()))
    }

    /// Where the round's noise comes from: the key when one is given, else the OS.
    pub fn noise_seed(&self) -> Result<NoiseSeed, FederationError> {
        let key = match (&self.noise_key, &self.noise_key_file) {
            (Some(k), _) => Some(k.0.clone()),
            (None, Some(path)) => {
                let bytes = std::fs::read(path).map_err(|e| ConfigError::KeyFile {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                Some(bytes.trim_ascii().to_vec())
            }
            (None, None) => None,
        };
        Ok(match key {
            Some(k) => NoiseSeed::keyed(&k, &self.round_id)?,
            None => NoiseSeed::from_os()?,
        })
    }

    /// Per-call timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FederateArgs,
    }

    #[test]
    fn the_operator_flags_parse_and_validate() {
        let cli = Cli::try_parse_from([
            "federate",
            "--round-id",
            "r1",
            "--shards",
            "http://a:50052,http://b:50052",
            "--min-sources",
            "5",
            "--epsilon",
            "8",
            "--delta",
            "1e-6",
            "--allow-partial",
        ])
        .expect("parse");
        assert_eq!(cli.args.shards.len(), 2);
        let cfg = cli.args.round_config().expect("valid");
        assert_eq!(cfg.min_sources, 5);
        assert_eq!(cfg.dp.map(|d| d.epsilon), Some(8.0));
        assert!(cli.args.allow_partial);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        type Mutate = fn(&mut FederateArgs);
        let cases: Vec<(Mutate, &str)> = vec![
            (|a| a.min_quality = 1.5, "--min-quality"),
            (|a| a.min_sources = 0, "--min-sources"),
            (|a| a.trend_decay = 0.0, "--trend-decay"),
            (
                |a| {
                    a.epsilon = Some(-1.0);
                    a.delta = Some(1e-6)
                },
                "--epsilon",
            ),
            (
                |a| {
                    a.epsilon = Some(1.0);
                    a.delta = Some(1.0)
                },
                "--delta",
            ),
        ];
        for (mutate, flag) in cases {
            let mut a = FederateArgs::new("r", vec!["http://x".into()]);
            mutate(&mut a);
            let err = a.round_config().expect_err(flag);
            assert!(err.to_string().starts_with(flag), "{err}");
        }
        let only_epsilon =
            Cli::try_parse_from(["f", "--round-id", "r", "--shards", "http://x", "--epsilon", "1"]);
        assert!(only_epsilon.is_err());
    }
}
