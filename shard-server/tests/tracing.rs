//! OpenTelemetry traces through the real exporter: the real `omega-shard` binary with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP/gRPC trace receiver in this test (the
//! collector's own protocol, from `opentelemetry-proto`). A register and a sync must arrive
//! as a `register` span and a `sync` span whose children are the validation, store and
//! similar steps, all of one trace, and the JSON log line inside the sync carries that
//! trace's id; a federation round (`omega-shard federate`) as a `federation.round` span over
//! its `collect`, `aggregate` and `publish` phases.

mod common;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Keeps every span it is sent, with its resource's `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("spans");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_is_one_trace_of_validation_store_and_similar_spans() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("test setup");
    let port = listener.local_addr().expect("addr").port();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("shard.log");
    let endpoint = format!("http://127.0.0.1:{port}");
    let shard_endpoint = endpoint.clone();
    let mut shard = Shard::start_logging_to(
        dir.path(),
        &log,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", shard_endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "warn,omega_shard::service=debug"),
        ],
    );
    let mut c = shard.client().await;
    let token = register(&mut c, "traced").await;
    let r = c
        .sync(sync_request("traced", Some(&token), delta(1, vec![pattern(1, 0.9)])))
        .await
        .expect("sync")
        .into_inner();
    assert_eq!(r.acknowledged_version, 1);
    // A federation round over the shard, traced by its own process.
    let admin = format!("http://127.0.0.1:{}", shard.admin);
    let round = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_omega-shard"))
            .args(["federate", "--shards", &admin, "--round-id", "traced-round"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("RUST_LOG", "warn")
            .output()
            .expect("omega-shard federate")
    })
    .await
    .expect("federate");
    assert!(round.status.success(), "{}", String::from_utf8_lossy(&round.stderr));
    // SIGTERM flushes the spans still queued.
    shard.signal("-TERM");
    assert!(shard.wait_exit(Duration::from_secs(30)).await.success());

    let spans = collector.spans.lock().expect("spans").clone();
    let named = |name: &str| spans.iter().filter(|(_, s)| s.name == name).collect::<Vec<_>>();
    let [(service, sync)] = named("sync")[..] else { panic!("one sync span: {spans:#?}") };
    assert!(service.contains("omega-shard"), "{service}");
    assert!(sync.parent_span_id.is_empty(), "sync is a root span");
    let [(_, register)] = named("register")[..] else { panic!("one register span: {spans:#?}") };
    assert_ne!(register.trace_id, sync.trace_id, "register and sync are separate requests");
    let under_register: Vec<&str> = spans
        .iter()
        .filter(|(_, s)| s.parent_span_id == register.span_id)
        .map(|(_, s)| s.name.as_str())
        .collect();
    assert_eq!(under_register, ["validate", "store.register"], "{spans:#?}");
    let children: Vec<&str> = spans
        .iter()
        .filter(|(_, s)| s.parent_span_id == sync.span_id)
        .map(|(_, s)| s.name.as_str())
        .collect();
    for step in ["validate", "store.apply_sync", "store.global", "collab", "similar"] {
        assert!(children.contains(&step), "no {step} under sync: {children:?}");
    }
    for (_, s) in spans.iter().filter(|(_, s)| s.parent_span_id == sync.span_id) {
        assert_eq!(s.trace_id, sync.trace_id, "{} is in another trace", s.name);
        assert!(s.start_time_unix_nano >= sync.start_time_unix_nano);
        assert!(s.end_time_unix_nano <= sync.end_time_unix_nano);
    }
    let outcome = sync.attributes.iter().find(|kv| kv.key == "outcome").expect("outcome");
    assert!(format!("{:?}", outcome.value).contains("\"ok\""), "{outcome:?}");

    // The round's phases, in one trace of its own.
    let [(_, round)] = named("federation.round")[..] else { panic!("one round span: {spans:#?}") };
    let phases: Vec<&str> = spans
        .iter()
        .filter(|(_, s)| s.parent_span_id == round.span_id && s.trace_id == round.trace_id)
        .map(|(_, s)| s.name.as_str())
        .collect();
    assert_eq!(phases, ["collect", "aggregate", "publish"], "{spans:#?}");

    // The log line of the sync names its trace.
    let logs = std::fs::read_to_string(&log).expect("log");
    let line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "sync answered")
        .unwrap_or_else(|| panic!("no `sync answered` line in:\n{logs}"));
    assert_eq!(line["span"]["trace_id"], serde_json::json!(hex(&sync.trace_id)), "{line}");
}
