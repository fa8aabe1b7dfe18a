//! The `federation_*` metrics of DESIGN.md in a prometheus-client registry. A round is a
//! one-shot Job, so the registry is printed to `--metrics-file` in text format at the end
//! (a Pushgateway or the operator can pick it up); a long-running caller (the simulator)
//! keeps one registry over many rounds.

use omega_protocol::admin::{RoundOutcome, RoundSummary};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of `federation_rounds_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// `succeeded`, `partial` or `failed`.
    pub status: String,
}

/// Federation metrics and their registry.
#[derive(Debug)]
pub struct FederationMetrics {
    registry: Registry,
    rounds: Family<StatusLabel, Counter>,
    patterns_aggregated: Counter,
    trends_detected: Counter,
    duration: Histogram,
}

impl Default for FederationMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl FederationMetrics {
    /// A fresh registry with the four metrics.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rounds = Family::<StatusLabel, Counter>::default();
        let patterns_aggregated = Counter::default();
        let trends_detected = Counter::default();
        let duration = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register("federation_rounds", "Federation rounds by outcome", rounds.clone());
        registry.register(
            "federation_patterns_aggregated",
            "Aggregated patterns published",
            patterns_aggregated.clone(),
        );
        registry.register(
            "federation_trends_detected",
            "Trend signals published",
            trends_detected.clone(),
        );
        registry.register(
            "federation_round_duration_seconds",
            "Wall-clock duration of a round",
            duration.clone(),
        );
        FederationMetrics { registry, rounds, patterns_aggregated, trends_detected, duration }
    }

    /// Records a finished round.
    pub fn record(&self, s: &RoundSummary) {
        let status = match s.outcome {
            RoundOutcome::Succeeded => "succeeded",
            RoundOutcome::Partial => "partial",
            RoundOutcome::Failed => "failed",
        };
        self.rounds.get_or_create(&StatusLabel { status: status.into() }).inc();
        if !s.already_published {
            self.patterns_aggregated.inc_by(s.patterns_aggregated);
            self.trends_detected.inc_by(s.trends_detected);
        }
        self.duration.observe(s.duration_ms as f64 / 1000.0);
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
