//! Prometheus metrics with DESIGN.md's names.
//!
//! [`Metrics::register`] adds the `constellation_*` metrics to a [`Registry`] that the caller
//! owns; other parts of the server (the federation code's `federation_*` metrics) register
//! theirs into the same registry before it is frozen and served on `METRICS_ADDR`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Labels of `constellation_sync_requests_total` and `constellation_register_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// `SHARD_ID`.
    pub shard_id: String,
    /// `ok`, `replayed`, or the gRPC code in snake case (`invalid_argument`, …).
    pub status: String,
}

/// Labels of `constellation_sync_bytes`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `up` (device to shard) or `down`.
    pub direction: String,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~4 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

fn bytes_histogram() -> Histogram {
    // 64 B .. 2 MiB
    Histogram::new(exponential_buckets(64.0, 2.0, 16))
}

/// The shard's metrics. Cheap to share (`Arc`); every field is itself atomic.
#[derive(Debug)]
pub struct Metrics {
    shard_id: String,
    sync_requests: Family<SyncLabels, Counter>,
    register_requests: Family<SyncLabels, Counter>,
    sync_latency: Histogram,
    sync_bytes: Family<DirectionLabels, Histogram, fn() -> Histogram>,
    /// Devices that synced in the last 15 minutes.
    pub active_devices: Gauge,
    /// Devices registered.
    pub total_devices: Gauge,
    /// Patterns accepted into the store since start.
    pub patterns_stored: Counter,
    /// Patterns currently stored.
    pub patterns: Gauge,
    /// Open device-facing gRPC connections.
    pub grpc_connections: Gauge,
    /// Patterns below the quality threshold that were not stored.
    pub patterns_filtered: Counter,
    /// Similar-pattern answers served from the per-device cache.
    pub similar_cache_hits: Counter,
    /// Rows waiting in the Postgres intake table (0 for the embedded store).
    pub intake_backlog: Gauge,
    /// Patterns served through collaborative serving (`shard_collab_served_total`).
    pub collab_served: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry, shard_id: u32) -> Self {
        let m = Metrics {
            shard_id: shard_id.to_string(),
            sync_requests: Family::default(),
            register_requests: Family::default(),
            sync_latency: latency_histogram(),
            sync_bytes: Family::new_with_constructor(bytes_histogram),
            active_devices: Gauge::default(),
            total_devices: Gauge::default(),
            patterns_stored: Counter::default(),
            patterns: Gauge::default(),
            grpc_connections: Gauge::default(),
            patterns_filtered: Counter::default(),
            similar_cache_hits: Counter::default(),
            intake_backlog: Gauge::default(),
            collab_served: Counter::default(),
        };
        registry.register(
            "constellation_sync_requests",
            "Sync requests by outcome",
            m.sync_requests.clone(),
        );
        registry.register(
            "constellation_register_requests",
            "Register requests by outcome",
            m.register_requests.clone(),
        );
        registry.register(
            "constellation_sync_latency_seconds",
            "Sync handling time, from request to response",
            m.sync_latency.clone(),
        );
        registry.register(
            "constellation_sync_bytes",
            "Sync message size on the wire (zstd), by direction",
            m.sync_bytes.clone(),
        );
        registry.register(
            "constellation_active_devices",
            "Devices that synced in the last 15 minutes",
            m.active_devices.clone(),
        );
        registry.register(
            "constellation_total_devices",
            "Devices registered",
            m.total_devices.clone(),
        );
        registry.register(
            "constellation_patterns_stored",
            "Patterns accepted into the store",
            m.patterns_stored.clone(),
        );
        registry.register(
            "constellation_patterns",
            "Patterns currently stored",
            m.patterns.clone(),
        );
        registry.register(
            "constellation_grpc_connections",
            "Open device-facing gRPC connections",
            m.grpc_connections.clone(),
        );
        registry.register(
            "constellation_patterns_filtered",
            "Patterns below the quality threshold, not stored",
            m.patterns_filtered.clone(),
        );
        registry.register(
            "constellation_similar_cache_hits",
            "Similar-pattern answers served from the per-device cache",
            m.similar_cache_hits.clone(),
        );
        registry.register(
            "constellation_intake_backlog",
            "Postgres intake rows not yet merged into the indexed table",
            m.intake_backlog.clone(),
        );
        registry.register(
            "shard_collab_served",
            "Aggregates served through collaborative serving (watched contents and candidates)",
            m.collab_served.clone(),
        );
        m
    }

    /// Counts one sync request and its latency.
    pub fn observe_sync(&self, status: &str, elapsed: Duration) {
        self.sync_requests
            .get_or_create(&SyncLabels { shard_id: self.shard_id.clone(), status: status.into() })
            .inc();
        self.sync_latency.observe(elapsed.as_secs_f64());
    }

    /// Counts one register request.
    pub fn observe_register(&self, status: &str) {
        self.register_requests
            .get_or_create(&SyncLabels { shard_id: self.shard_id.clone(), status: status.into() })
            .inc();
    }

    /// Records a message size, `direction` = `up` or `down`.
    pub fn observe_bytes(&self, direction: &str, bytes: usize) {
        self.sync_bytes
            .get_or_create(&DirectionLabels { direction: direction.into() })
            .observe(bytes as f64);
    }

    /// Syncs counted with `status` so far (tests and the stats endpoint).
    pub fn sync_count(&self, status: &str) -> u64 {
        self.sync_requests
            .get_or_create(&SyncLabels { shard_id: self.shard_id.clone(), status: status.into() })
            .get()
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The `status` label of a gRPC outcome: `ok`, or the code in snake case.
pub fn status_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_names_are_exported() {
        let mut r = Registry::default();
        let m = Metrics::register(&mut r, 7);
        m.observe_sync("ok", Duration::from_millis(3));
        m.observe_bytes("up", 900);
        m.observe_register("unauthenticated");
        m.grpc_connections.inc();
        let text = render(&r);
        for name in [
            "constellation_sync_requests_total{shard_id=\"7\",status=\"ok\"} 1",
            "constellation_sync_latency_seconds_bucket",
            "constellation_active_devices",
            "constellation_total_devices",
            "constellation_patterns_stored_total",
            "constellation_grpc_connections 1",
            "constellation_sync_bytes_bucket{le=",
            "direction=\"up\"",
            "shard_collab_served_total 0",
            "constellation_register_requests_total{shard_id=\"7\",status=\"unauthenticated\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert_eq!(m.sync_count("ok"), 1);
    }
}
