//! Structured logs: JSON lines (default) or text, filtered by `RUST_LOG` (default
//! `info,kube=warn`), and the reconcile spans to an OTLP collector when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; set up as the shard server's are (`omega-telemetry`).

pub use omega_telemetry::Traces;

/// Installs the global subscriber; `json` selects JSON lines. Call inside the tokio runtime.
pub fn init(json: bool) -> Traces {
    omega_telemetry::init(json, "info,kube=warn", "omega-operator")
}

/// Logs only (start-up errors before the runtime runs).
pub fn init_logs(json: bool) {
    omega_telemetry::init_logs(json, "info,kube=warn");
}
