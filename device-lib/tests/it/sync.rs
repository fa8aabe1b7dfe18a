//! The sync client against a real tonic `Constellation` server on loopback (a test fixture
//! that validates with omega-protocol and can be told to fail or stall).

use crate::brain::brain;
use crate::common::{embedder, event};
use omega_device::{DeviceError, SyncClient, SyncConfig};
use omega_protocol::pb::constellation_server::{Constellation, ConstellationServer};
use omega_protocol::{GlobalPatterns, PatternDelta, pb, wire};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct ShardState {
    /// Fail this many calls with UNAVAILABLE before answering.
    fail_next: u32,
    /// Apply the next sync, then answer UNAVAILABLE (a lost response).
    lose_next_response: bool,
    /// Sleep this long in every call.
    stall: Option<Duration>,
    /// Model the shard announces.
    model_id: String,
    applied: HashSet<(String, u64)>,
    patterns: HashMap<uuid::Uuid, f32>,
    removed: HashSet<uuid::Uuid>,
    acked: HashMap<String, u64>,
    calls: u32,
    zstd_requests: u32,
    global: Option<GlobalPatterns>,
}

#[derive(Clone, Default)]
struct TestShard(Arc<Mutex<ShardState>>);

const TOKEN: &str = "tok-123";

impl TestShard {
    fn state(&self) -> std::sync::MutexGuard<'_, ShardState> {
        self.0.lock().expect("state")
    }

    async fn gate<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let stall = {
            let mut s = self.state();
            s.calls += 1;
            if req.metadata().get("grpc-encoding").is_some_and(|v| v == "zstd") {
                s.zstd_requests += 1;
            }
            s.stall
        };
        if let Some(d) = stall {
            tokio::time::sleep(d).await;
        }
        let mut s = self.state();
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return Err(Status::unavailable("shard is restarting"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Constellation for TestShard {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.gate(&req).await?;
        let r = req.into_inner();
        omega_protocol::validate::check_register(&r)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let s = self.state();
        Ok(Response::new(pb::RegisterResponse {
            device_token: TOKEN.into(),
            shard_id: 1,
            region: "eu".into(),
            model_id: s.model_id.clone(),
            sync_interval_min_secs: 300,
            sync_interval_max_secs: 900,
        }))
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        self.gate(&req).await?;
        let auth = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        if auth != format!("Bearer {TOKEN}") {
            return Err(Status::unauthenticated("bad token"));
        }
        let r = req.into_inner();
        let mut s = self.state();
        let mut resp = pb::SyncResponse::default();
        if let Some(d) = r.delta {
            let model = s.model_id.clone();
            let d = PatternDelta::from_wire(d, &model)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let key = (r.device_id.clone(), d.local_version);
            if s.applied.contains(&key) {
                resp.replayed = true;
            } else {
                for p in &d.added {
                    s.patterns.insert(p.id, p.success_rate);
                }
                for u in &d.updated {
                    s.patterns.insert(u.id, u.success_rate);
                }
                for id in &d.removed {
                    s.patterns.remove(id);
                    s.removed.insert(*id);
                }
                resp.patterns_accepted = (d.added.len() + d.updated.len()) as u32;
                s.applied.insert(key);
                s.acked.insert(r.device_id.clone(), d.local_version);
            }
            resp.acknowledged_version = d.local_version;
            if s.lose_next_response {
                s.lose_next_response = false;
                return Err(Status::unavailable("connection reset after apply"));
            }
        }
        if let Some(g) = &s.global
            && g.global_version > r.known_global_version
        {
            resp.global = Some(g.to_wire());
        }
        Ok(Response::new(resp))
    }
}

/// Serves `shard` on a free loopback port; returns the endpoint.
async fn serve(shard: TestShard) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let svc = ConstellationServer::new(shard)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

fn shard() -> TestShard {
    let s = TestShard::default();
    s.state().model_id = omega_protocol::DEFAULT_MODEL_ID.into();
    s
}

fn fast(endpoint: &str) -> SyncConfig {
    SyncConfig {
        endpoint: endpoint.into(),
        timeout_ms: 2_000,
        connect_timeout_ms: 1_000,
        backoff_base_ms: 10,
        backoff_max_ms: 50,
        max_attempts: 4,
        ..Default::default()
    }
}

#[tokio::test]
async fn register_then_sync_pushes_the_delta_and_pulls_global_patterns() {
    let shard = shard();
    shard.state().global = Some(crate::brain::global(4));
    let endpoint = serve(shard.clone()).await;
    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    b.observe(&event("casino", 0.95, 10)).expect("observe");
    let mut client = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    let reg = client.register(b.device_id(), "eu", embedder().model_id()).await.expect("register");
    assert_eq!((reg.device_token.as_str(), reg.shard_id), (TOKEN, 1));
    let delay = client.next_sync_delay();
    assert!(delay >= Duration::from_secs(300) && delay <= Duration::from_secs(900));

    let delta = b.prepare_delta().expect("delta").expect("some");
    fn assert_send<T: Send>(t: T) -> T {
        t
    }
    // The sync future is Send: it can run on a multi-threaded runtime (tokio::spawn).
    let report = assert_send(client.sync(&mut b)).await.expect("sync");
    assert_eq!(report.local_version, Some(1));
    assert_eq!((report.pushed_added, report.acknowledged, report.attempts), (2, true, 1));
    assert_eq!((report.similar_received, report.trends_received, report.global_version), (1, 1, 4));
    let expected_up = wire::grpc_zstd_size(&pb::SyncRequest {
        device_id: b.device_id().into(),
        delta: Some(delta.to_wire()),
        known_global_version: 0,
    });
    assert_eq!(report.bytes_up, expected_up);
    assert!(report.bytes_up < 1_200, "two patterns cost {} bytes", report.bytes_up);
    assert!(report.bytes_down > 100);
    let s = b.stats();
    assert_eq!((s.acked_version, s.delta_in_flight, s.global_patterns), (1, false, 1));
    assert_eq!(shard.state().patterns.len(), 2);
    assert!(shard.state().zstd_requests >= 2, "requests are zstd-compressed");

    // Nothing new: a pull-only sync, and the global version is already known.
    let report = client.sync(&mut b).await.expect("sync");
    assert_eq!((report.local_version, report.similar_received), (None, 0));
}

#[tokio::test]
async fn transient_failures_are_retried_with_backoff() {
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let mut client =
        SyncClient::connect(SyncConfig { token: Some(TOKEN.into()), ..fast(&endpoint) })
            .await
            .expect("connect");
    shard.state().fail_next = 2;
    let report = client.sync(&mut b).await.expect("third attempt succeeds");
    assert_eq!(report.attempts, 3);
    assert!(report.acknowledged);
}

#[tokio::test]
async fn an_unreachable_shard_keeps_every_change_for_later() {
    // Reserve a port, then close it: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let mut offline = SyncClient::connect(SyncConfig {
        token: Some(TOKEN.into()),
        max_attempts: 2,
        ..fast(&dead)
    })
    .await
    .expect("connect works offline");
    match offline.sync(&mut b).await {
        Err(DeviceError::Unavailable { attempts: 2, .. }) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let first = b.prepare_delta().expect("delta").expect("kept");
    // More viewing while offline.
    b.observe(&event("casino", 0.9, 10)).expect("observe");
    b.observe(&event("heat", 0.4, 20)).expect("observe");
    assert!(offline.sync(&mut b).await.is_err());
    assert_eq!(b.prepare_delta().expect("delta").expect("same"), first);

    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let mut online =
        SyncClient::connect(SyncConfig { token: Some(TOKEN.into()), ..fast(&endpoint) })
            .await
            .expect("connect");
    let r1 = online.sync(&mut b).await.expect("sync");
    assert_eq!(r1.local_version, Some(first.local_version));
    let r2 = online.sync(&mut b).await.expect("sync");
    assert_eq!((r2.local_version, r2.pushed_added, r2.pushed_updated), (Some(2), 1, 1));
    let s = shard.state();
    assert_eq!(s.patterns.len(), 2, "nothing lost");
    let heat = s.patterns.get(&first.added[0].id).expect("heat on the shard");
    assert!((heat - 0.65).abs() < 1e-6, "the update arrived: {heat}");
}

#[tokio::test]
async fn a_lost_response_is_replayed_idempotently() {
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let mut client =
        SyncClient::connect(SyncConfig { token: Some(TOKEN.into()), ..fast(&endpoint) })
            .await
            .expect("connect");
    shard.state().lose_next_response = true;
    let report = client.sync(&mut b).await.expect("retried");
    assert_eq!(report.attempts, 2);
    assert!(report.replayed, "the retry carried the same local_version");
    assert!(report.acknowledged);
    assert_eq!(shard.state().applied.len(), 1);
}

#[tokio::test]
async fn a_stalled_shard_hits_the_deadline_and_errors_are_classified() {
    let shard = shard();
    shard.state().stall = Some(Duration::from_millis(800));
    let endpoint = serve(shard.clone()).await;
    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let cfg = SyncConfig {
        token: Some(TOKEN.into()),
        timeout_ms: 150,
        max_attempts: 2,
        ..fast(&endpoint)
    };
    let mut client = SyncClient::connect(cfg).await.expect("connect");
    let started = std::time::Instant::now();
    match client.sync(&mut b).await {
        Err(DeviceError::Unavailable { attempts: 2, .. }) => {}
        other => panic!("expected Unavailable after 2 attempts, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "deadline per call: {:?}",
        started.elapsed()
    );
    assert!(b.stats().delta_in_flight, "kept for the next sync");

    shard.state().stall = None;
    let mut wrong =
        SyncClient::connect(SyncConfig { token: Some("wrong".into()), ..fast(&endpoint) })
            .await
            .expect("connect");
    let calls = shard.state().calls;
    match wrong.sync(&mut b).await {
        Err(DeviceError::Rejected { code: tonic::Code::Unauthenticated, .. }) => {}
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(shard.state().calls, calls + 1, "not retried");

    let mut unregistered = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    assert!(matches!(unregistered.sync(&mut b).await, Err(DeviceError::State(_))));
    shard.state().model_id = "another-model".into();
    let err = unregistered.register(b.device_id(), "eu", embedder().model_id()).await;
    assert!(matches!(err, Err(DeviceError::ModelMismatch { .. })));
    assert!(matches!(
        SyncClient::connect(SyncConfig { endpoint: "not a url".into(), ..Default::default() })
            .await,
        Err(DeviceError::SyncConfig(_))
    ));
    if cfg!(not(feature = "tls")) {
        let https = SyncConfig { endpoint: "https://127.0.0.1:1".into(), ..Default::default() };
        assert!(matches!(SyncClient::connect(https).await, Err(DeviceError::SyncConfig(_))));
    }
}
