//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
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
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("omega_operator");
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
            registry,
            reconciles,
            failures,
            duration,
            degraded,
            degraded_sources: Mutex::new(vec![]),
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

    /// Text exposition format.
    pub fn render(&self) -> String {
        self.refresh_degraded();
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
