//! Prometheus metrics of the operator, served on `/metrics`: its own `omega_operator_*`
//! series, `omega_build_info`, the `process_*` series, and the `federation_*` series of the
//! rounds it runs, recorded from each round's status (the round is a one-shot Job that nothing
//! scrapes).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// Labels of per-controller series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `shard` or `federationround`.
    pub controller: String,
}

/// Labels of failures: controller and error kind ([`crate::Error::metric_label`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `shard` or `federationround`.
    pub controller: String,
    /// Error kind.
    pub error: String,
}

/// Labels of `omega_operator_degraded`: controller and the Degraded condition's reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DegradedLabels {
    /// `shard` or `federationround`.
    pub controller: String,
    /// Reason of the Degraded condition (`SecretNotFound`, `ApplyFailed`…).
    pub reason: String,
}

/// Lists the Degraded reasons of the objects a controller currently knows (one per object).
pub type DegradedSource = Box<dyn Fn() -> Vec<String> + Send + Sync>;

/// Lists `(round, finished at in Unix seconds)` of the succeeded rounds the controller
/// currently knows, `round` as in [`RoundLabels`].
pub type SucceededSource = Box<dyn Fn() -> Vec<(String, f64)> + Send + Sync>;

/// Labels of the `federation_*` series: the round, as `NAMESPACE/NAME` of its scheduled
/// parent (all children of one schedule are one series) or of the round itself.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoundLabels {
    /// `NAMESPACE/NAME`.
    pub round: String,
}

/// Labels of `federation_rounds_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoundStatusLabels {
    /// `NAMESPACE/NAME`, as in [`RoundLabels`].
    pub round: String,
    /// `succeeded`, `partial` or `failed`.
    pub status: String,
}

/// Labels of `omega_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// `operator` (the shard server's is `shard`).
    pub component: &'static str,
    /// The crate version.
    pub version: &'static str,
}

/// A finished round, as [`Metrics::round_finished`] records it.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedRound<'a> {
    /// `NAMESPACE/NAME`, as in [`RoundLabels`].
    pub round: String,
    /// `succeeded`, `partial` or `failed`.
    pub status: &'static str,
    /// The summary the round's Job left, when it left one.
    pub summary: Option<&'a omega_protocol::admin::RoundSummary>,
    /// Seconds from the Job's start to the round's end.
    pub seconds: Option<f64>,
    /// When it finished, in Unix seconds.
    pub finished_at: f64,
}

/// The federation series.
struct Federation {
    rounds: Family<RoundStatusLabels, Counter>,
    patterns_aggregated: Family<RoundLabels, Counter>,
    trends_detected: Family<RoundLabels, Counter>,
    duration: Family<RoundLabels, Histogram>,
    last_success: Family<RoundLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    // Successes seen finishing (kept after their children are deleted) and the controller's
    // cache (successes from before this replica led): the gauge is the latest of both.
    succeeded: Mutex<BTreeMap<String, f64>>,
    sources: Mutex<Vec<SucceededSource>>,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
    degraded: Family<DegradedLabels, Gauge>,
    // Counted from the controllers' caches at scrape time, so an object deleted while
    // Degraded stops being counted without the operator having to see its deletion.
    degraded_sources: Mutex<Vec<(&'static str, DegradedSource)>>,
    federation: Federation,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "operator",
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        root.register("omega_build_info", "Always 1; the labels name the build", build);
        root.register_collector(Box::new(omega_telemetry::ProcessCollector));
        let federation = Federation {
            rounds: Family::default(),
            patterns_aggregated: Family::default(),
            trends_detected: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 14))
            }),
            last_success: Family::default(),
            succeeded: Mutex::default(),
            sources: Mutex::default(),
        };
        root.register(
            "federation_rounds",
            "Federation rounds finished, by round and outcome",
            federation.rounds.clone(),
        );
        root.register(
            "federation_patterns_aggregated",
            "Aggregated patterns published by federation rounds",
            federation.patterns_aggregated.clone(),
        );
        root.register(
            "federation_trends_detected",
            "Trend signals published by federation rounds",
            federation.trends_detected.clone(),
        );
        root.register(
            "federation_round_duration_seconds",
            "Wall-clock duration of a federation round",
            federation.duration.clone(),
        );
        root.register(
            "federation_last_success_timestamp_seconds",
            "When the round's latest successful run finished (Unix seconds)",
            federation.last_success.clone(),
        );
        let registry = root.sub_registry_with_prefix("omega_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let leader = Gauge::default();
        let degraded = Family::<DegradedLabels, Gauge>::default();
        registry.register("reconciliations", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        registry.register("leader", "1 while this replica leads", leader.clone());
        registry.register(
            "degraded",
            "Objects whose Degraded condition is true, by reason",
            degraded.clone(),
        );
        Metrics {
            registry: root,
            reconciles,
            failures,
            duration,
            degraded,
            degraded_sources: Mutex::new(vec![]),
            federation,
            leader,
        }
    }
}

/// Times one reconcile; the duration is recorded when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let labels = ControllerLabels { controller: self.controller.into() };
        self.metrics.duration.get_or_create(&labels).observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a reconcile and starts its timer.
    pub fn reconcile(&self, controller: &'static str) -> ReconcileTimer<'_> {
        self.reconciles.get_or_create(&ControllerLabels { controller: controller.into() }).inc();
        ReconcileTimer { metrics: self, controller, start: Instant::now() }
    }

    /// Counts a failed reconcile.
    pub fn failure(&self, controller: &'static str, error: &crate::Error) {
        let labels =
            FailureLabels { controller: controller.into(), error: error.metric_label().into() };
        self.failures.get_or_create(&labels).inc();
    }

    /// Counts, at every scrape, the Degraded reasons `source` lists for `controller`.
    pub fn watch_degraded(&self, controller: &'static str, source: DegradedSource) {
        self.degraded_sources.lock().unwrap_or_else(|p| p.into_inner()).push((controller, source));
    }

    fn refresh_degraded(&self) {
        self.degraded.clear();
        let sources = self.degraded_sources.lock().unwrap_or_else(|p| p.into_inner());
        for (controller, source) in sources.iter() {
            for reason in source() {
                let labels = DegradedLabels { controller: (*controller).into(), reason };
                self.degraded.get_or_create(&labels).inc();
            }
        }
    }

    /// Records a round that just finished (once per round: on its transition to Succeeded
    /// or Failed).
    pub fn round_finished(&self, r: &FinishedRound<'_>) {
        let f = &self.federation;
        let labels = RoundLabels { round: r.round.clone() };
        let status = RoundStatusLabels { round: r.round.clone(), status: r.status.into() };
        f.rounds.get_or_create(&status).inc();
        if let Some(s) = r.summary.filter(|s| !s.already_published) {
            f.patterns_aggregated.get_or_create(&labels).inc_by(s.patterns_aggregated);
            f.trends_detected.get_or_create(&labels).inc_by(s.trends_detected);
        }
        let seconds = r.summary.map(|s| s.duration_ms as f64 / 1000.0).or(r.seconds);
        if let Some(seconds) = seconds {
            f.duration.get_or_create(&labels).observe(seconds);
        }
        if r.status != "failed" {
            let mut seen = f.succeeded.lock().unwrap_or_else(|p| p.into_inner());
            let at = seen.entry(r.round.clone()).or_insert(r.finished_at);
            *at = at.max(r.finished_at);
        }
    }

    /// Reads, at every scrape, the succeeded rounds `source` lists (the controller's cache).
    pub fn watch_succeeded(&self, source: SucceededSource) {
        self.federation.sources.lock().unwrap_or_else(|p| p.into_inner()).push(source);
    }

    fn refresh_last_success(&self) {
        let f = &self.federation;
        let mut latest = f.succeeded.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for source in f.sources.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            for (round, at) in source() {
                let e = latest.entry(round).or_insert(at);
                *e = e.max(at);
            }
        }
        for (round, at) in latest {
            f.last_success.get_or_create(&RoundLabels { round }).set(at);
        }
    }

    /// Text exposition format.
    pub fn render(&self) -> String {
        self.refresh_degraded();
        self.refresh_last_success();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_kind() {
        let m = Metrics::default();
        drop(m.reconcile("shard"));
        m.failure("shard", &crate::Error::Unsatisfiable("x".into()));
        let text = m.render();
        assert!(
            text.contains(r#"omega_operator_reconciliations_total{controller="shard"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"omega_operator_reconcile_failures_total{controller="shard",error="unsatisfiable"} 1"#), "{text}");
        assert!(text.contains("omega_operator_reconcile_duration_seconds_count"), "{text}");
    }

    fn summary(
        outcome: omega_protocol::admin::RoundOutcome,
    ) -> omega_protocol::admin::RoundSummary {
        serde_json::from_value(serde_json::json!({
            "round_id": "r", "outcome": outcome, "shards_total": 2, "shards_completed": 2,
            "shards_failed": [], "patterns_in": 40, "groups": 9, "patterns_aggregated": 7,
            "groups_suppressed": 2, "trends_detected": 3, "global_version": 4, "privacy": null,
            "already_published": false, "duration_ms": 1500
        }))
        .unwrap()
    }

    #[test]
    fn finished_rounds_become_federation_series() {
        use omega_protocol::admin::RoundOutcome;
        let m = Metrics::default();
        let ok = summary(RoundOutcome::Succeeded);
        let again = omega_protocol::admin::RoundSummary { already_published: true, ..ok.clone() };
        let round = |status, summary, finished_at| FinishedRound {
            round: "tv/hourly".into(),
            status,
            summary,
            seconds: Some(9.0),
            finished_at,
        };
        m.round_finished(&round("succeeded", Some(&ok), 1_000.0));
        // A rerun that published nothing new counts as a round, not as new patterns.
        m.round_finished(&round("succeeded", Some(&again), 4_000.0));
        m.round_finished(&round("failed", None, 9_000.0));
        // A success the cache still holds, older than the one seen finishing.
        m.watch_succeeded(Box::new(|| {
            vec![("tv/hourly".into(), 2_000.0), ("eu/daily".into(), 500.0)]
        }));
        let text = m.render();
        for line in [
            r#"federation_rounds_total{round="tv/hourly",status="succeeded"} 2"#,
            r#"federation_rounds_total{round="tv/hourly",status="failed"} 1"#,
            r#"federation_patterns_aggregated_total{round="tv/hourly"} 7"#,
            r#"federation_trends_detected_total{round="tv/hourly"} 3"#,
            r#"federation_round_duration_seconds_count{round="tv/hourly"} 3"#,
            r#"federation_round_duration_seconds_sum{round="tv/hourly"} 12.0"#,
            r#"federation_last_success_timestamp_seconds{round="tv/hourly"} 4000.0"#,
            r#"federation_last_success_timestamp_seconds{round="eu/daily"} 500.0"#,
            r#"omega_build_info{component="operator",version=""#,
            "# HELP process_resident_memory_bytes Resident memory size in bytes",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn degraded_objects_are_counted_by_reason_at_each_scrape() {
        let m = Metrics::default();
        let now = std::sync::Arc::new(Mutex::new(vec!["SecretNotFound", "SecretNotFound"]));
        let seen = now.clone();
        m.watch_degraded(
            "shard",
            Box::new(move || seen.lock().unwrap().iter().map(|r| r.to_string()).collect()),
        );
        let text = m.render();
        assert!(
            text.contains(
                r#"omega_operator_degraded{controller="shard",reason="SecretNotFound"} 2"#
            ),
            "{text}"
        );
        // One object recovered, the other is now refused by the API server.
        *now.lock().unwrap() = vec!["ApplyFailed"];
        let text = m.render();
        assert!(!text.contains("SecretNotFound"), "{text}");
        assert!(
            text.contains(r#"omega_operator_degraded{controller="shard",reason="ApplyFailed"} 1"#),
            "{text}"
        );
    }
}
