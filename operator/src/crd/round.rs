//! `FederationRound`: one federation round across selected shards, or a schedule of them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired federation round.
// kube's `printcolumn(...)` repeats `type_ = ...` by design; clippy reads that as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "omega.exogenesis.io",
    version = "v1alpha1",
    kind = "FederationRound",
    namespaced,
    shortname = "fr",
    category = "omega",
    status = "FederationRoundStatus",
    derive = "PartialEq",
    doc = "A federation round: a Job running `omega-shard federate` over the selected shards, or, with `schedule`, a parent that spawns such rounds like a CronJob.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Shards", type_ = "integer", json_path = ".status.shardsCompleted"),
    printcolumn(name = "Patterns", type_ = "integer", json_path = ".status.patternsAggregated"),
    printcolumn(name = "Trends", type_ = "integer", json_path = ".status.trendsDetected"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.privacy) || (self.privacy.delta > 0.0 && self.privacy.delta < 1.0)").message("privacy.delta must be below 1 and above 0"))]
pub struct FederationRoundSpec {
    /// Shards (in this namespace) whose patterns are federated; empty selects all.
    #[serde(default)]
    pub shard_selector: LabelSelector,
    /// Patterns below this quality are not exported.
    #[serde(default = "default_min_quality")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_quality: f64,
    /// k-anonymity: an aggregate needs at least this many distinct devices.
    #[serde(default = "default_min_sources")]
    #[schemars(range(min = 1, max = 100_000))]
    pub min_sources: i32,
    /// Decay applied to previous trend scores.
    #[serde(default = "default_trend_decay")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub trend_decay: f64,
    /// Differential privacy of the published means; none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySpec>,
    /// Cron expression (5 fields, UTC, or `@hourly`-style): the round becomes a parent that
    /// spawns child rounds, never two at once. The schema checks the shape; a field out of
    /// range (`0 25 * * *`) is reported as Degraded/InvalidSchedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 6, max = 128))]
    #[x_kube(validation = Rule::new(CRON_SHAPE_RULE).message("schedule must be a cron expression of 5 fields (minute hour day-of-month month day-of-week) or one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly"))]
    pub schedule: Option<String>,
    /// Delete the round this long after it finished; kept when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Finished child rounds a schedule keeps (older ones are deleted).
    #[serde(default = "default_history")]
    #[schemars(range(min = 0, max = 100))]
    pub history_limit: i32,
    /// Publish even when some shards are unreachable (`--allow-partial`).
    #[serde(default)]
    pub allow_partial: bool,
    /// Image running `omega-shard federate`; the first selected shard's image when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Fail a round still pending (no ready shard) or running after this long.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 10, max = 86_400))]
    pub timeout_seconds: i32,
}

/// CEL rule: five space-separated fields, or a nickname. Kept to the shape (croner parses the
/// fields) so that the rule stays cheap for the API server's CEL cost limits.
pub const CRON_SHAPE_RULE: &str =
    "self.matches('^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[^ ]+( +[^ ]+){4})$')";

/// Differential privacy of a round (`docs/privacy.md`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrivacySpec {
    /// Epsilon of one round alone (> 0).
    #[schemars(range(min = 0.001, max = 100.0))]
    pub epsilon: f64,
    /// Delta of one round alone (0 < delta < 1; the spec-level CEL rule excludes both ends).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub delta: f64,
    /// Most epsilon one device may spend per period, composed over every round of the
    /// period; a round that would exceed it releases nothing and fails with reason
    /// `PrivacyBudgetExhausted`. Unset: the round's own epsilon (one DP round per period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001, max = 1000.0))]
    pub budget_epsilon: Option<f64>,
    /// Length of the budget's period in whole UTC days (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub period_days: Option<i32>,
}

/// What differentially private rounds spent, as the last round reported it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PrivacyStatus {
    /// Epsilon per device composed over the rounds of the period (this one included).
    pub composed_epsilon: f64,
    /// Delta of `composedEpsilon`.
    pub composed_delta: f64,
    /// Rounds composed.
    pub rounds_in_period: u32,
    /// The ledger (JSON) the next round of this schedule is given.
    pub ledger: String,
}

/// Phase of a round.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundPhase {
    /// Waiting for a ready shard or for the Job to be created.
    Pending,
    /// The Job runs.
    Running,
    /// The round published (fully, or partially when allowed).
    Succeeded,
    /// The round published nothing.
    Failed,
    /// A parent with a `schedule`: it spawns child rounds.
    Scheduled,
}

impl RoundPhase {
    /// Succeeded or Failed.
    pub fn is_finished(self) -> bool {
        matches!(self, RoundPhase::Succeeded | RoundPhase::Failed)
    }
}

/// Observed state of a round.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FederationRoundStatus {
    /// Where the round is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RoundPhase>,
    /// `Ready` (finished successfully), `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Round id passed to `--round-id` (the shards' idempotency key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_id: Option<String>,
    /// The Job running the round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Admin endpoints the round was given.
    #[serde(default)]
    pub shards: Vec<String>,
    /// When the Job was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the round finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Aggregated patterns published.
    #[serde(default)]
    pub patterns_aggregated: i64,
    /// Trend signals published.
    #[serde(default)]
    pub trends_detected: i64,
    /// Shards that exported and received the results.
    #[serde(default)]
    pub shards_completed: i32,
    /// Human-readable outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Scheduled parents: when the last child was spawned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// Scheduled parents: the next time a child is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// Scheduled parents: the child that has not finished yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_round: Option<String>,
    /// Differential privacy spent (rounds with `privacy`; for a schedule, its latest child's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyStatus>,
}

fn default_min_quality() -> f64 {
    0.8
}
fn default_min_sources() -> i32 {
    3
}
fn default_trend_decay() -> f64 {
    0.95
}
fn default_history() -> i32 {
    3
}
fn default_timeout() -> i32 {
    900
}

impl Default for FederationRoundSpec {
    fn default() -> Self {
        FederationRoundSpec {
            shard_selector: LabelSelector::default(),
            min_quality: default_min_quality(),
            min_sources: default_min_sources(),
            trend_decay: default_trend_decay(),
            privacy: None,
            schedule: None,
            ttl_seconds_after_finished: None,
            history_limit: default_history(),
            allow_partial: false,
            image: None,
            timeout_seconds: default_timeout(),
        }
    }
}
