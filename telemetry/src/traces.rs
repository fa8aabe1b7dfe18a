//! OpenTelemetry traces: Omega's spans, exported over OTLP/gRPC by a batch processor on the
//! tokio runtime. The exporter reads the standard variables itself
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `…_HEADERS`,
//! `…_TIMEOUT`; `OTEL_BSP_SCHEDULE_DELAY` and the other batch settings).

use opentelemetry::trace::{TraceContextExt as _, TraceId, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing::level_filters::LevelFilter;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::{Layer, Registry};

/// Crates whose INFO spans are exported (whatever `RUST_LOG` says about logs): the request,
/// store, federation and reconcile spans, not the libraries' own.
pub const TRACE_TARGETS: [&str; 3] = ["omega_shard", "omega_operator", "omega_federation"];

/// The span export of this process: off, or a tracer provider to flush at exit.
#[derive(Debug, Default)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// No export.
    pub fn off() -> Self {
        Traces { provider: None }
    }

    /// Export when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-only variable) is set and not
    /// empty; off otherwise.
    pub fn from_env(service: &'static str) -> Result<Self, opentelemetry_otlp::ExporterBuildError> {
        let set = |v: &str| std::env::var(v).is_ok_and(|s| !s.trim().is_empty());
        if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Ok(Self::off());
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        let batch =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build();
        Ok(Traces { provider: Some(provider) })
    }

    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// The `tracing` layer that turns Omega's spans into OpenTelemetry spans (none when off).
    pub fn layer(&self) -> Option<Box<dyn Layer<Registry> + Send + Sync>> {
        let tracer = self.provider.as_ref()?.tracer("omega");
        let targets = TRACE_TARGETS
            .iter()
            .fold(Targets::new(), |t, target| t.with_target(*target, LevelFilter::INFO));
        Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(targets).boxed())
    }

    /// Exports what is still queued and stops (at exit).
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            // The processor's shutdown blocks until its task on this runtime has flushed.
            let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
        }
    }
}

/// Records the span's trace id in its `trace_id` field (declared `tracing::field::Empty`),
/// so the JSON log lines inside it carry the id the trace backend shows. Nothing when traces
/// are off.
pub fn record_trace_id(span: &tracing::Span) {
    let id = span.context().span().span_context().trace_id();
    if id != TraceId::INVALID {
        span.record("trace_id", tracing::field::display(id));
    }
}
