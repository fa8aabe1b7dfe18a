//! Prometheus metrics with DESIGN.md's names.
//!
//! [`Metrics::register`] adds the shard's metrics to a [`Registry`] that the caller owns, all
//! under one `shard_id` label: `constellation_*`, `shard_collab_served_total`,
//! `omega_build_info` and the `process_*` metrics. Every series is listed with its labels in
//! docs/operations.md ("Metrics").

pub use omega_telemetry::ProcessCollector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Labels of `constellation_sync_requests_total` and `constellation_register_requests_total`
/// (besides `shard_id`, which every shard series carries).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// `ok`, `replayed`, `pull`, or the gRPC code in snake case (`invalid_argument`, …).
    pub status: String,
}

/// Labels of `constellation_sync_latency_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// [`outcome`] of the request's status: `ok`, `refused` or `error`.
    pub outcome: &'static str,
}

/// Labels of `constellation_sync_bytes`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `up` (device to shard) or `down`.
    pub direction: String,
}

/// Labels of `omega_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// `shard` (the operator's is `operator`).
    pub component: &'static str,
    /// The crate version.
    pub version: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~4 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

/// Edges of `constellation_sync_bytes`: 1 KiB (the upload a sync aims at) and 5 KiB (the
/// download budget) are edges, so "down <= 5 KiB" is read off a bucket, not interpolated.
pub const BYTES_BUCKETS: [f64; 14] = [
    128.0,
    256.0,
    512.0,
    1024.0,
    2048.0,
    3072.0,
    4096.0,
    5120.0,
    6144.0,
    8192.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
];

fn bytes_histogram() -> Histogram {
    Histogram::new(BYTES_BUCKETS)
}

/// How a request's status counts for latency and error ratios: `ok` (answered: `ok`,
/// `replayed`, `pull`), `refused` (the client's fault or a limit: bad input, credentials,
/// rate limits, a cancelled call) or `error` (the shard failed: `internal`, `unavailable`,
/// `unknown`, `deadline_exceeded`, `data_loss`, `aborted`, `unimplemented`).
pub fn outcome(status: &str) -> &'static str {
    match status {
        "ok" | "replayed" | "pull" => "ok",
        "invalid_argument"
        | "unauthenticated"
        | "permission_denied"
        | "resource_exhausted"
        | "failed_precondition"
        | "out_of_range"
        | "not_found"
        | "already_exists"
        | "cancelled" => "refused",
        _ => "error",
    }
}

/// The shard's metrics. Cheap to share (`Arc`); every field is itself atomic.
#[derive(Debug)]
pub struct Metrics {
    sync_requests: Family<StatusLabels, Counter>,
    register_requests: Family<StatusLabels, Counter>,
    sync_latency: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
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
    /// 1 while `/ready` answers 200.
    pub ready: Gauge,
    /// 1 while the store answers its queries (the database is reachable).
    pub store_up: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`, labelled `shard_id`.
    pub fn register(registry: &mut Registry, shard_id: u32) -> Self {
        let registry =
            registry.sub_registry_with_label(("shard_id".into(), shard_id.to_string().into()));
        let m = Metrics {
            sync_requests: Family::default(),
            register_requests: Family::default(),
            sync_latency: Family::new_with_constructor(latency_histogram),
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
            ready: Gauge::default(),
            store_up: Gauge::default(),
        };
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels { component: "shard", version: env!("CARGO_PKG_VERSION") })
            .set(1);
        registry.register("omega_build_info", "Always 1; the labels name the build", build);
        registry.register_collector(Box::new(ProcessCollector));
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
            "Sync handling time, from request to response, by outcome (ok, refused, error)",
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
        registry.register("constellation_ready", "1 while /ready answers 200", m.ready.clone());
        registry.register(
            "constellation_store_up",
            "1 while the store answers its queries (checked every 2 s)",
            m.store_up.clone(),
        );
        m
    }

    /// Counts one sync request and its latency.
    pub fn observe_sync(&self, status: &str, elapsed: Duration) {
        self.sync_requests.get_or_create(&StatusLabels { status: status.into() }).inc();
        self.sync_latency
            .get_or_create(&OutcomeLabels { outcome: outcome(status) })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one register request.
    pub fn observe_register(&self, status: &str) {
        self.register_requests.get_or_create(&StatusLabels { status: status.into() }).inc();
    }

    /// Records a message size, `direction` = `up` or `down`.
    pub fn observe_bytes(&self, direction: &str, bytes: usize) {
        self.sync_bytes
            .get_or_create(&DirectionLabels { direction: direction.into() })
            .observe(bytes as f64);
    }

    /// Syncs counted with `status` so far (tests and the stats endpoint).
    pub fn sync_count(&self, status: &str) -> u64 {
        self.sync_requests.get_or_create(&StatusLabels { status: status.into() }).get()
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
    fn design_names_are_exported_with_shard_id_and_help() {
        let mut r = Registry::default();
        let m = Metrics::register(&mut r, 7);
        m.observe_sync("ok", Duration::from_millis(3));
        m.observe_sync("resource_exhausted", Duration::from_micros(100));
        m.observe_sync("internal", Duration::from_millis(40));
        m.observe_bytes("up", 900);
        m.observe_bytes("down", 5_000);
        m.observe_register("unauthenticated");
        m.grpc_connections.inc();
        let text = render(&r);
        for name in [
            "constellation_sync_requests_total{shard_id=\"7\",status=\"ok\"} 1",
            "constellation_sync_latency_seconds_count{shard_id=\"7\",outcome=\"ok\"} 1",
            "constellation_sync_latency_seconds_count{shard_id=\"7\",outcome=\"refused\"} 1",
            "constellation_sync_latency_seconds_count{shard_id=\"7\",outcome=\"error\"} 1",
            "constellation_active_devices{shard_id=\"7\"}",
            "constellation_total_devices{shard_id=\"7\"}",
            "constellation_patterns_stored_total{shard_id=\"7\"}",
            "constellation_grpc_connections{shard_id=\"7\"} 1",
            "constellation_sync_bytes_bucket{shard_id=\"7\",le=\"1024.0\",direction=\"up\"} 1",
            "constellation_sync_bytes_bucket{shard_id=\"7\",le=\"4096.0\",direction=\"down\"} 0",
            "constellation_sync_bytes_bucket{shard_id=\"7\",le=\"5120.0\",direction=\"down\"} 1",
            "shard_collab_served_total{shard_id=\"7\"} 0",
            "constellation_register_requests_total{shard_id=\"7\",status=\"unauthenticated\"} 1",
            "constellation_ready{shard_id=\"7\"} 0",
            "constellation_store_up{shard_id=\"7\"} 0",
            "omega_build_info{shard_id=\"7\",component=\"shard\",version=\"",
            "process_cpu_seconds_total{shard_id=\"7\"}",
            "process_resident_memory_bytes{shard_id=\"7\"}",
            "process_open_fds{shard_id=\"7\"}",
            "process_start_time_seconds{shard_id=\"7\"}",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert_eq!(m.sync_count("ok"), 1);
        // Every family has its HELP and TYPE, and every sample line carries shard_id.
        let families: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        assert!(families.len() >= 20, "{families:?}");
        for f in families {
            let name = f.split(' ').next().unwrap_or_default();
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains("shard_id=\"7\""), "{line}");
        }
    }

    #[test]
    fn outcomes_split_refusals_from_errors() {
        for (status, want) in [
            ("ok", "ok"),
            ("replayed", "ok"),
            ("pull", "ok"),
            ("invalid_argument", "refused"),
            ("unauthenticated", "refused"),
            ("resource_exhausted", "refused"),
            ("cancelled", "refused"),
            ("internal", "error"),
            ("unavailable", "error"),
            ("unknown", "error"),
            ("deadline_exceeded", "error"),
        ] {
            assert_eq!(outcome(status), want, "{status}");
        }
    }
}
