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
pub struct ShardState {
    /// Fail this many calls with UNAVAILABLE before answering.
    pub fail_next: u32,
    /// Apply the next sync, then answer UNAVAILABLE (a lost response).
    pub lose_next_response: bool,
    /// Sleep this long in every call.
    pub stall: Option<Duration>,
    /// Refuse this many deltas as INVALID_ARGUMENT, as a stricter shard would.
    pub refuse_deltas: u32,
    /// Answer with this (raw, possibly malformed) global instead of `global`.
    pub raw_global: Option<pb::GlobalPatterns>,
    /// Sync interval announced at registration, s (default 300-900).
    pub interval: Option<(u32, u32)>,
    /// Model the shard announces.
    pub model_id: String,
    pub applied: HashSet<(String, u64)>,
    pub patterns: HashMap<uuid::Uuid, f32>,
    pub removed: HashSet<uuid::Uuid>,
    pub acked: HashMap<String, u64>,
    pub calls: u32,
    pub zstd_requests: u32,
    pub global: Option<GlobalPatterns>,
}

/// A loopback `Constellation` shard (also used by the C ABI tests).
#[derive(Clone, Default)]
pub struct TestShard(Arc<Mutex<ShardState>>);

pub const TOKEN: &str = "tok-123";

impl TestShard {
    pub fn state(&self) -> std::sync::MutexGuard<'_, ShardState> {
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
        let (lo, hi) = s.interval.unwrap_or((300, 900));
        Ok(Response::new(pb::RegisterResponse {
            device_token: TOKEN.into(),
            shard_id: 1,
            region: "eu".into(),
            model_id: s.model_id.clone(),
            sync_interval_min_secs: lo,
            sync_interval_max_secs: hi,
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
            if s.refuse_deltas > 0 {
                s.refuse_deltas -= 1;
                return Err(Status::invalid_argument(
                    "delta.added[0].content_id is refused by this shard's rules",
                ));
            }
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
        if let Some(g) = &s.raw_global {
            resp.global = Some(g.clone());
        } else if let Some(g) = &s.global
            && g.global_version > r.known_global_version
        {
            resp.global = Some(g.to_wire());
        }
        Ok(Response::new(resp))
    }
}

/// Serves `shard` on a free loopback port; returns the endpoint.
pub async fn serve(shard: TestShard) -> String {
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

pub fn shard() -> TestShard {
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
    // One sync pushes the kept delta, then the changes made meanwhile.
    let r1 = online.sync(&mut b).await.expect("sync");
    assert_eq!((r1.deltas_pushed, r1.local_version), (2, Some(first.local_version + 1)));
    assert_eq!((r1.pushed_added, r1.pushed_updated), (2, 1));
    let r2 = online.sync(&mut b).await.expect("sync");
    assert_eq!((r2.deltas_pushed, r2.local_version), (0, None), "nothing left");
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

fn registered(endpoint: &str) -> SyncConfig {
    SyncConfig { token: Some(TOKEN.into()), ..fast(endpoint) }
}

#[tokio::test]
async fn a_delta_the_shard_refuses_as_invalid_is_quarantined_and_syncing_goes_on() {
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let mut client = SyncClient::connect(registered(&endpoint)).await.expect("connect");
    shard.state().refuse_deltas = 1;
    let calls = shard.state().calls;
    let r = client.sync(&mut b).await.expect("the refusal does not fail the sync");
    assert_eq!((r.quarantined_deltas, r.quarantined_changes), (1, 1));
    assert_eq!((r.deltas_pushed, r.acknowledged), (0, false));
    assert_eq!(shard.state().calls, calls + 2, "refused once (not retried), then a pull");
    let s = b.stats();
    assert_eq!((s.quarantined_deltas, s.delta_in_flight, s.acked_version), (1, false, 0));
    // Later changes go through; the quarantined pattern is not offered again as new.
    b.observe(&event("casino", 0.9, 10)).expect("observe");
    let r = client.sync(&mut b).await.expect("sync");
    assert_eq!((r.deltas_pushed, r.pushed_added, r.local_version), (1, 1, Some(2)));
    assert_eq!(shard.state().patterns.len(), 1);
    // A model mismatch would refuse every delta alike: no quarantine, the outbox is kept.
    b.observe(&event("godfather", 0.9, 20)).expect("observe");
    shard.state().model_id = "another-model".into();
    match client.sync(&mut b).await {
        Err(DeviceError::Rejected { code: tonic::Code::InvalidArgument, message }) => {
            assert!(message.contains("does not match this shard's model"), "{message}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(b.stats().delta_in_flight, "kept for a shard of the right model");
    assert_eq!(b.stats().quarantined_deltas, 1);
}

#[tokio::test]
async fn after_a_long_offline_period_one_sync_pushes_every_delta() {
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let mut b = brain();
    // More changes than one delta carries (256).
    let n = omega_protocol::validate::MAX_PATTERNS_PER_DELTA + 44;
    for i in 0..n {
        b.observe(&event(&format!("offline-{i}"), 0.9, i as i64)).expect("observe");
    }
    let mut client = SyncClient::connect(registered(&endpoint)).await.expect("connect");
    let r = client.sync(&mut b).await.expect("sync");
    assert_eq!((r.deltas_pushed, r.pushed_added, r.local_version), (2, n, Some(2)));
    assert_eq!(shard.state().patterns.len(), n);
    let s = b.stats();
    assert_eq!((s.unsynced_changes, s.delta_in_flight, s.acked_version), (0, false, 2));
}

#[tokio::test]
async fn a_malformed_global_answer_is_refused_whole_and_the_ack_still_counts() {
    let shard = shard();
    let mut bad = crate::brain::global(7).to_wire();
    bad.similar[0].embedding.as_mut().expect("embedding").values.truncate(10);
    shard.state().raw_global = Some(bad);
    let endpoint = serve(shard.clone()).await;
    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let mut client = SyncClient::connect(registered(&endpoint)).await.expect("connect");
    match client.sync(&mut b).await {
        Err(e @ DeviceError::Invalid(_)) => {
            assert!(e.to_string().contains("global.similar[0].embedding.values"), "{e}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let s = b.stats();
    assert_eq!((s.acked_version, s.delta_in_flight), (1, false), "the shard stored the delta");
    assert_eq!((s.global_patterns, s.global_version, s.trends), (0, 0, 0), "nothing applied");
    // A NaN score in a trend: refused alike.
    let mut nan = crate::brain::global(8).to_wire();
    nan.trending[0].score = f32::NAN;
    shard.state().raw_global = Some(nan);
    assert!(matches!(client.sync(&mut b).await, Err(DeviceError::Invalid(_))));
    assert_eq!(b.stats().trends, 0);
}

#[tokio::test]
async fn sync_intervals_from_the_shard_are_clamped_and_reported() {
    use omega_device::sync::{MAX_SYNC_INTERVAL_SECS, MIN_SYNC_INTERVAL_SECS, clamp_interval};
    let shard = shard();
    shard.state().interval = Some((1, 10 * 86_400));
    let endpoint = serve(shard.clone()).await;
    let mut b = brain();
    let mut client = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    assert_eq!(client.config().token, None);
    let reg = client.register(b.device_id(), "eu", embedder().model_id()).await.expect("register");
    assert_eq!((reg.sync_interval_min_secs, reg.sync_interval_max_secs), (1, 864_000));
    let cfg = client.config();
    assert_eq!(cfg.token.as_deref(), Some(TOKEN));
    assert_eq!((cfg.min_interval_secs, cfg.max_interval_secs), (60, 3_600));
    for _ in 0..50 {
        let d = client.next_sync_delay();
        assert!(d >= Duration::from_secs(60) && d <= Duration::from_secs(3_600), "{d:?}");
    }
    let r = client.sync(&mut b).await.expect("pull");
    assert!((60_000..=3_600_000).contains(&r.next_sync_in_ms), "{}", r.next_sync_in_ms);
    assert_eq!(clamp_interval(0), MIN_SYNC_INTERVAL_SECS);
    assert_eq!(clamp_interval(u64::MAX), MAX_SYNC_INTERVAL_SECS);
    assert_eq!(clamp_interval(600), 600);
    // A configured interval below the floor is clamped as well.
    let tight = SyncClient::connect(SyncConfig {
        min_interval_secs: 0,
        max_interval_secs: 1,
        ..registered(&endpoint)
    })
    .await
    .expect("connect");
    assert_eq!(tight.next_sync_delay(), Duration::from_secs(60));
}

/// A self-signed CA and a certificate for 127.0.0.1 signed by it: (CA PEM, cert PEM, key PEM).
fn private_ca() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Omega test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// The sync client over TLS (rustls), trusting a private CA through `ca_cert_path`.
#[tokio::test]
async fn tls_with_a_private_ca_works_and_an_unknown_ca_is_refused() {
    use tonic::transport::{Identity, Server, ServerTlsConfig};
    let (ca_pem, cert_pem, key_pem) = private_ca();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca_pem).expect("write CA");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shard = shard();
    let svc = ConstellationServer::new(shard.clone())
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd);
    let mut server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
        .expect("server TLS");
    tokio::spawn(
        server
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("https://{addr}");

    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let trusted = SyncConfig { ca_cert_path: Some(ca_path), ..registered(&endpoint) };
    let mut client = SyncClient::connect(trusted).await.expect("connect");
    let r = client.sync(&mut b).await.expect("sync over TLS");
    assert!(r.acknowledged);
    assert_eq!(shard.state().patterns.len(), 1);

    // Another CA (and the public roots alone) must not be trusted for this certificate.
    let (other_ca, _, _) = private_ca();
    let other_path = dir.path().join("other-ca.pem");
    std::fs::write(&other_path, other_ca).expect("write CA");
    for ca in [Some(other_path), None] {
        let cfg = SyncConfig { ca_cert_path: ca.clone(), max_attempts: 1, ..registered(&endpoint) };
        let mut client = SyncClient::connect(cfg).await.expect("connect is lazy");
        b.observe(&event("casino", 0.9, 10)).expect("observe");
        match client.sync(&mut b).await {
            Err(DeviceError::Unavailable { .. }) => {}
            other => panic!("CA {ca:?}: expected the handshake to fail, got {other:?}"),
        }
    }
    assert_eq!(shard.state().patterns.len(), 1, "nothing went through an untrusted channel");
    let missing =
        SyncConfig { ca_cert_path: Some(dir.path().join("none.pem")), ..registered(&endpoint) };
    match SyncClient::connect(missing).await {
        Err(e @ DeviceError::SyncConfig(_)) => assert!(e.to_string().contains("none.pem"), "{e}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}
