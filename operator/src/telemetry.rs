//! Structured logs: JSON lines (default) or text, filtered by `RUST_LOG`.

use std::io::IsTerminal as _;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `json` selects JSON lines; text has colours only when
/// stderr is a terminal (a file or a log collector gets no escape codes). In JSON mode a
/// panic is logged as one JSON line too.
pub fn init(json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests) keeps the first subscriber.
    let first =
        if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
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
}
