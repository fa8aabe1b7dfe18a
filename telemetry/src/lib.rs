//! What the shard server and the operator set up the same way: structured logs (JSON lines or
//! text, filtered by `RUST_LOG`), OpenTelemetry traces (off unless
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set), the `process_*` metrics of Prometheus' client
//! libraries, and the exposition format a scraper asks for.

pub mod exposition;
mod process;
mod traces;

pub use process::ProcessCollector;
use std::io::IsTerminal as _;
pub use traces::{TRACE_TARGETS, Traces, record_trace_id};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Installs the global subscriber: logs on stderr, filtered by `RUST_LOG` (`default_filter`
/// when unset), and the spans of Omega's crates to an OTLP collector when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`service` is their `service.name`). Text has colours
/// only when stderr is a terminal (a file or a log collector gets no escape codes). With
/// `json`, a panic is logged as one JSON line too, and so is a collector that cannot be set
/// up (the process runs on without traces). A second call (tests) keeps the first
/// subscriber. Call it inside the tokio runtime (the span exporter runs on it); keep the
/// returned [`Traces`] until exit and shut it down to flush the last spans.
pub fn init(json: bool, default_filter: &str, service: &'static str) -> Traces {
    let logs = log_layer(json, default_filter);
    let (traces, failed) = match Traces::from_env(service) {
        Ok(t) => (t, None),
        Err(e) => (Traces::off(), Some(e)),
    };
    let layers: Vec<_> = std::iter::once(logs).chain(traces.layer()).collect();
    let first = tracing_subscriber::registry().with(layers).try_init();
    if let Some(e) = failed {
        tracing::error!(error = %e, "OpenTelemetry export is off");
    }
    if json && first.is_ok() {
        std::panic::set_hook(Box::new(|info| {
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = message, location, "panicked");
        }));
    }
    traces
}

/// [`init`] for the logs alone (no traces): for start-up errors reported before the runtime
/// runs, and tools.
pub fn init_logs(json: bool, default_filter: &str) {
    let logs = log_layer(json, default_filter);
    let _ = tracing_subscriber::registry().with(logs).try_init();
}

/// The stderr log layer both set-ups install: JSON lines or text (colours only on a terminal),
/// filtered by `RUST_LOG`, else `default_filter`.
fn log_layer(
    json: bool,
    default_filter: &str,
) -> Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        fmt.json().flatten_event(true).with_filter(filter).boxed()
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal()).with_filter(filter).boxed()
    }
}
