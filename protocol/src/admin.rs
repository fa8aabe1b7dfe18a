//! JSON documents that cross program boundaries outside gRPC.
//!
//! - [`ShardStats`]: what `GET /api/v1/stats` on a shard returns; the operator's autoscaler
//!   reads it from every pod.
//! - [`RoundSummary`]: the one JSON line `omega-shard federate` prints (and writes to its
//!   termination message); the operator copies it into `FederationRound.status`.

use crate::pb;
use serde::{Deserialize, Serialize};

/// A shard server's counters, as `/api/v1/stats` serves them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ShardStats {
    /// `SHARD_ID`.
    pub shard_id: u32,
    /// `REGION`.
    pub region: String,
    /// Devices ever registered.
    pub devices_total: u64,
    /// Devices that synced in the last 15 minutes.
    pub devices_active: u64,
    /// Patterns stored.
    pub patterns: u64,
    /// Successful syncs since start.
    pub syncs_total: u64,
    /// Syncs per second over the last minute.
    pub syncs_per_second: f64,
    /// Open device-facing gRPC connections.
    pub grpc_connections: u64,
    /// Version of the global patterns the shard serves.
    pub global_version: u64,
    /// `embedded` or `postgres`.
    pub store: String,
    /// Model the shard accepts.
    pub model_id: String,
    /// Seconds since the process started.
    pub uptime_seconds: f64,
    /// Store reachable and migrated, and not draining.
    pub ready: bool,
}

impl From<pb::StatsResponse> for ShardStats {
    fn from(s: pb::StatsResponse) -> Self {
        ShardStats {
            shard_id: s.shard_id,
            region: s.region,
            devices_total: s.devices_total,
            devices_active: s.devices_active,
            patterns: s.patterns,
            syncs_total: s.syncs_total,
            syncs_per_second: s.syncs_per_second,
            grpc_connections: s.grpc_connections,
            global_version: s.global_version,
            store: s.store,
            model_id: s.model_id,
            uptime_seconds: s.uptime_seconds,
            ready: true,
        }
    }
}

/// How a federation round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundOutcome {
    /// Every shard exported and received the results.
    Succeeded,
    /// Some shards were unreachable and the round was allowed to go on without them.
    Partial,
    /// The round published nothing.
    Failed,
}

/// A shard a round could not use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardFailure {
    /// Admin endpoint of the shard.
    pub endpoint: String,
    /// What went wrong.
    pub error: String,
}

/// The differential-privacy accounting of a round, when noise was added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyAccounting {
    /// Epsilon of the round alone.
    pub epsilon: f64,
    /// Delta of the round alone.
    pub delta: f64,
    /// Standard deviation of the Gaussian noise added to each released coordinate.
    pub noise_sigma: f64,
    /// L2 sensitivity the noise was calibrated for.
    pub l2_sensitivity: f64,
    /// zCDP ρ of the round alone.
    #[serde(default)]
    pub rho: f64,
    /// Epsilon per device composed over every round of the period, this one included.
    #[serde(default)]
    pub composed_epsilon: f64,
    /// Delta of [`PrivacyAccounting::composed_epsilon`].
    #[serde(default)]
    pub composed_delta: f64,
    /// Rounds composed (this one included).
    #[serde(default)]
    pub rounds_in_period: u32,
    /// Budget: most composed epsilon per device per period.
    #[serde(default)]
    pub budget_epsilon: f64,
    /// Length of the period, days.
    #[serde(default)]
    pub period_days: u32,
    /// What the period has spent, this round included: the next round starts from it.
    #[serde(default)]
    pub ledger: PrivacyLedger,
}

/// What differentially private rounds spent, per UTC day (the composition is by days, so the
/// ledger stays small: one entry per day of the period).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PrivacyLedger {
    /// Days, oldest first.
    pub days: Vec<LedgerDay>,
}

/// The rounds of one UTC day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerDay {
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    /// Total zCDP ρ of the day's rounds.
    pub rho: f64,
    /// Total δ the day's rounds spent on selecting what to release.
    pub delta_select: f64,
    /// Rounds.
    pub rounds: u32,
}

/// The JSON summary `omega-shard federate` prints on one line when a round ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    /// Round id (also the idempotency key of `PublishGlobal`).
    pub round_id: String,
    /// How it ended.
    pub outcome: RoundOutcome,
    /// Shards the round was asked to use.
    pub shards_total: u32,
    /// Shards that exported and received the results.
    pub shards_completed: u32,
    /// Shards that could not be used.
    pub shards_failed: Vec<ShardFailure>,
    /// Quality patterns read from all shards.
    pub patterns_in: u64,
    /// Groups of patterns that mean the same thing.
    pub groups: u64,
    /// Aggregated patterns published (groups with at least `min_sources` devices).
    pub patterns_aggregated: u64,
    /// Collaborative item vectors published next to them (one per content with a vector;
    /// absent in summaries of older versions).
    #[serde(default)]
    pub collaborative_vectors: u64,
    /// Groups withheld for having fewer than `min_sources` distinct devices.
    pub groups_suppressed: u64,
    /// Trend signals published.
    pub trends_detected: u64,
    /// Global version the shards now serve.
    pub global_version: u64,
    /// Present when noise was added.
    pub privacy: Option<PrivacyAccounting>,
    /// True when the shards already had this round (a rerun published nothing new).
    pub already_published: bool,
    /// Wall-clock duration.
    pub duration_ms: u64,
    /// Failure reason, when `outcome` is `failed`.
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_one_json_object_with_snake_case_outcome() {
        let s = RoundSummary {
            round_id: "r1".into(),
            outcome: RoundOutcome::Partial,
            shards_total: 2,
            shards_completed: 1,
            shards_failed: vec![ShardFailure {
                endpoint: "http://s2:50052".into(),
                error: "unavailable".into(),
            }],
            patterns_in: 10,
            groups: 3,
            patterns_aggregated: 2,
            collaborative_vectors: 2,
            groups_suppressed: 1,
            trends_detected: 1,
            global_version: 5,
            privacy: None,
            already_published: false,
            duration_ms: 12,
            message: None,
        };
        let json = serde_json::to_string(&s).expect("serialise");
        assert!(json.contains(r#""outcome":"partial""#));
        assert!(!json.contains('\n'));
        assert_eq!(serde_json::from_str::<RoundSummary>(&json).expect("parse"), s);
    }

    #[test]
    fn stats_convert_from_the_grpc_message() {
        let s = ShardStats::from(pb::StatsResponse {
            shard_id: 3,
            syncs_per_second: 12.5,
            ..Default::default()
        });
        assert_eq!((s.shard_id, s.syncs_per_second, s.ready), (3, 12.5, true));
    }
}
