//! The sync client against a real tonic `Constellation` server on loopback (a test fixture
//! that validates with omega-protocol, enforces the shard's registration rule, and can be
//! told to fail or stall).

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
    /// Register the next new device, then answer UNAVAILABLE (a lost registration answer).
    pub lose_next_register: bool,
    /// Registered device ids, with their region.
    pub devices: HashMap<String, String>,
    /// Register calls answered with a token.
    pub registrations: u32,
    /// Register calls that carried `authorization`.
    pub registrations_with_token: u32,
    /// Answer the next sync with a renewed token; from then on only that one is accepted
    /// for its device (as after a key rotation that retired the old key).
    pub renew_next: bool,
    /// Devices whose token was renewed.
    pub renewed: HashSet<String>,
    pub applied: HashSet<(String, u64)>,
    pub patterns: HashMap<uuid::Uuid, f32>,
    pub removed: HashSet<uuid::Uuid>,
    pub acked: HashMap<String, u64>,
    pub calls: u32,
    pub zstd_requests: u32,
    pub global: Option<GlobalPatterns>,
    /// Every delta received, as it came off the wire (before any decoding of ours).
    pub wire_deltas: Vec<pb::PatternDelta>,
}

/// A loopback `Constellation` shard (also used by the C ABI tests).
#[derive(Clone, Default)]
pub struct TestShard(Arc<Mutex<ShardState>>);

/// The token the fixture issues for `device` (the real shard's is an HMAC of the id; here a
/// plain function of it, so that one device's token never passes for another's).
pub fn token(device: &str) -> String {
    format!("tok-123.{device}")
}

/// The token the fixture hands out when it renews `device`'s.
pub fn renewed_token(device: &str) -> String {
    format!("tok-456.{device}")
}

/// The bearer token a request carries, if any.
fn presented<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

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
        let presented = presented(&req);
        let r = req.into_inner();
        omega_protocol::validate::check_register(&r)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The shard's rule (shard-server/src/grpc/sync.rs `register`): a token presented must
        // be the id's; a known id gets its token again only when the request carries it.
        if let Some(t) = &presented
            && *t != token(&r.device_id)
        {
            return Err(Status::unauthenticated("the bearer token does not match device_id"));
        }
        let mut s = self.state();
        let created = !s.devices.contains_key(&r.device_id);
        if created {
            let region = if r.region.is_empty() { "eu".to_string() } else { r.region.clone() };
            s.devices.insert(r.device_id.clone(), region);
        }
        if !created && presented.is_none() {
            return Err(Status::unauthenticated(
                "device_id is already registered: registering it again needs its token in \
                 `authorization: Bearer <token>`",
            ));
        }
        if s.lose_next_register {
            s.lose_next_register = false;
            return Err(Status::unavailable("connection reset after register"));
        }
        s.registrations += 1;
        s.registrations_with_token += u32::from(presented.is_some());
        let (lo, hi) = s.interval.unwrap_or((300, 900));
        Ok(Response::new(pb::RegisterResponse {
            device_token: token(&r.device_id),
            shard_id: 1,
            region: s.devices.get(&r.device_id).cloned().unwrap_or_default(),
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
        let auth = presented(&req);
        let r = req.into_inner();
        let mut s = self.state();
        let expected = if s.renewed.contains(&r.device_id) {
            renewed_token(&r.device_id)
        } else {
            token(&r.device_id)
        };
        if auth != Some(expected) {
            return Err(Status::unauthenticated("bad token"));
        }
        let mut resp = pb::SyncResponse::default();
        if s.renew_next {
            s.renew_next = false;
            s.renewed.insert(r.device_id.clone());
            resp.renewed_token = renewed_token(&r.device_id);
        }
        if let Some(d) = r.delta {
            s.wire_deltas.push(d.clone());
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
        // The fixture speaks plaintext on loopback.
        allow_plaintext: true,
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
    assert_eq!((reg.device_token, reg.shard_id), (token(b.device_id()), 1));
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
        SyncClient::connect(SyncConfig { token: Some(token("tv-test")), ..fast(&endpoint) })
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
        token: Some(token("tv-test")),
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
        SyncClient::connect(SyncConfig { token: Some(token("tv-test")), ..fast(&endpoint) })
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
        SyncClient::connect(SyncConfig { token: Some(token("tv-test")), ..fast(&endpoint) })
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
        token: Some(token("tv-test")),
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

/// A config holding the token of `brain()`'s device.
fn registered(endpoint: &str) -> SyncConfig {
    SyncConfig { token: Some(token("tv-test")), ..fast(endpoint) }
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
    assert_eq!(cfg.token, Some(token(b.device_id())));
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

/// A brain in a database file under `dir`, with an id the library generates.
fn brain_in(dir: &std::path::Path) -> omega_device::Brain {
    crate::brain::brain_with(omega_device::BrainConfig {
        db_path: Some(dir.join("brain.sqlite")),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_reopened_brain_syncs_with_its_stored_token_without_registering_again() {
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = brain_in(dir.path());
    let device = b.device_id().to_owned();
    assert!(!b.stats().has_token);
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let mut client = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    let r = client.register_and_sync(&mut &mut b).await.expect("first sync registers");
    assert!(r.registered && !r.device_id_renewed && r.acknowledged, "{r:?}");
    assert!(b.stats().has_token);
    let held = b.registration().expect("kept").clone();
    assert_eq!((held.device_id.as_str(), held.token.clone()), (device.as_str(), token(&device)));
    assert_eq!((held.endpoint.as_str(), held.region.as_str()), (endpoint.as_str(), "eu"));
    assert!(!format!("{held:?} {:?}", client.config()).contains(&token(&device)), "redacted");
    b.close().expect("close");

    // A reboot: new process state, a config without a token.
    let mut b = brain_in(dir.path());
    assert_eq!(b.device_id(), device);
    assert!(b.stats().has_token, "the token survived the reopen");
    b.observe(&event("casino", 0.9, 10)).expect("observe");
    let mut client = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    let r = client.register_and_sync(&mut &mut b).await.expect("sync after the reboot");
    assert!(!r.registered && r.acknowledged, "{r:?}");
    assert_eq!(client.config().token, Some(token(&device)));
    assert_eq!((client.config().min_interval_secs, client.config().max_interval_secs), (300, 900));
    // A plain sync on a fresh client takes the stored token as well.
    b.observe(&event("godfather", 0.9, 20)).expect("observe");
    let mut plain = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    assert!(plain.sync(&mut b).await.expect("plain sync").acknowledged);
    {
        let s = shard.state();
        assert_eq!((s.registrations, s.devices.len(), s.patterns.len()), (1, 1, 3));
    }

    // The same shard at another address: the stored token is presented, not assumed.
    let other_name = serve(shard.clone()).await;
    let mut client = SyncClient::connect(fast(&other_name)).await.expect("connect");
    let r = client.register_and_sync(&mut &mut b).await.expect("sync at another endpoint");
    assert!(r.registered, "{r:?}");
    assert_eq!(b.device_id(), device);
    assert_eq!(b.registration().map(|r| r.endpoint.as_str()), Some(other_name.as_str()));
    let s = shard.state();
    assert_eq!((s.registrations, s.registrations_with_token, s.devices.len()), (2, 1, 1));
}

#[tokio::test]
async fn a_renewed_token_is_used_at_once_and_kept_by_the_brain() {
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = brain_in(dir.path());
    let device = b.device_id().to_owned();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let mut client = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    let r = client.register_and_sync(&mut &mut b).await.expect("first sync");
    assert!(r.registered && !r.token_renewed, "{r:?}");

    // The shard renews during a normal sync; the old token stops working right after.
    shard.state().renew_next = true;
    b.observe(&event("casino", 0.9, 10)).expect("observe");
    let r = client.sync(&mut b).await.expect("sync that renews");
    assert!(r.token_renewed && r.acknowledged, "{r:?}");
    assert_eq!(client.config().token, Some(renewed_token(&device)));
    assert_eq!(b.registration().map(|r| r.token.clone()), Some(renewed_token(&device)));
    b.observe(&event("godfather", 0.9, 20)).expect("observe");
    assert!(client.sync(&mut b).await.expect("next sync").acknowledged);
    b.close().expect("close");

    // After a reboot the brain presents the renewed token, without registering again.
    let mut b = brain_in(dir.path());
    b.observe(&event("alien", 0.9, 30)).expect("observe");
    let mut fresh = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    let r = fresh.register_and_sync(&mut &mut b).await.expect("sync after the reboot");
    assert!(!r.registered && r.acknowledged, "{r:?}");
    let s = shard.state();
    assert_eq!((s.registrations, s.devices.len(), s.patterns.len()), (1, 1, 4));
}

#[cfg(unix)]
#[test]
fn the_brain_database_holding_the_token_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("brain.sqlite");
    let b = brain_in(dir.path());
    drop(b);
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode();
    assert_eq!(mode(&path) & 0o777, 0o600);
    // A file made before (world-readable) is narrowed when the brain opens it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    drop(brain_in(dir.path()));
    assert_eq!(mode(&path) & 0o777, 0o600);
}

#[tokio::test]
async fn a_plaintext_endpoint_needs_the_explicit_flag() {
    let err = SyncClient::connect(SyncConfig {
        endpoint: "http://127.0.0.1:1".into(),
        ..Default::default()
    })
    .await
    .expect_err("plaintext refused by default");
    assert!(matches!(&err, DeviceError::SyncConfig(m) if m.contains("allow_plaintext")), "{err}");
    assert!(SyncConfig::default().endpoint.starts_with("https://"));
    let ok = SyncConfig {
        endpoint: "http://127.0.0.1:1".into(),
        allow_plaintext: true,
        ..Default::default()
    };
    assert!(SyncClient::connect(ok).await.is_ok());
}

#[tokio::test]
async fn a_registration_whose_answer_was_lost_is_retried_and_works() {
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = brain_in(dir.path());
    let first_id = b.device_id().to_owned();
    b.observe(&event("heat", 0.9, 0)).expect("observe");

    // The shard registers the id but the answer is lost; the retry (no token) is refused as
    // a known id. Nothing was ever sent under the id: the brain takes a fresh one.
    shard.state().lose_next_register = true;
    let mut client = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    let r = client.register_and_sync(&mut &mut b).await.expect("the retry works");
    assert!(r.registered && r.device_id_renewed && r.acknowledged, "{r:?}");
    let second_id = b.device_id().to_owned();
    assert_ne!(second_id, first_id);
    assert_eq!(b.stats().patterns, 1, "nothing local lost");
    {
        let s = shard.state();
        assert!(s.devices.contains_key(&first_id) && s.devices.contains_key(&second_id));
        assert_eq!((s.registrations, s.patterns.len()), (1, 1));
    }
    b.close().expect("close");
    let b = brain_in(dir.path());
    assert_eq!((b.device_id(), b.stats().has_token), (second_id.as_str(), true), "kept");
    assert!(!b.can_renew_device_id(), "an id with a token is never replaced");
    b.close().expect("close");

    // The same, with the loss seen by an earlier run (one attempt, no retry within the call).
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = brain_in(dir.path());
    let first_id = b.device_id().to_owned();
    shard.state().lose_next_register = true;
    let mut once =
        SyncClient::connect(SyncConfig { max_attempts: 1, ..fast(&endpoint) }).await.expect("c");
    match once.register_and_sync(&mut &mut b).await {
        Err(DeviceError::Unavailable { .. }) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!((b.device_id(), b.stats().has_token), (first_id.as_str(), false));
    let r = once.register_and_sync(&mut &mut b).await.expect("the next sync works");
    assert!(r.registered && r.device_id_renewed, "{r:?}");
    assert!(b.stats().has_token);
}

#[tokio::test]
async fn a_device_id_registered_elsewhere_gives_a_clear_error_and_changes_nothing() {
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    // Another device registered "tv-test" first.
    let mut other = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    other.register("tv-test", "eu", embedder().model_id()).await.expect("other device");

    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    b.observe(&event("casino", 0.9, 10)).expect("observe");
    let before = b.stats();
    let mut client = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    let calls = shard.state().calls;
    let err = client.register_and_sync(&mut &mut b).await.expect_err("a known id without token");
    match &err {
        DeviceError::DeviceIdTaken { device_id } => assert_eq!(device_id, "tv-test"),
        other => panic!("expected DeviceIdTaken, got {other:?}"),
    }
    assert_eq!(err.code(), omega_device::ErrorCode::DeviceIdTaken);
    let msg = err.to_string();
    assert!(msg.contains("already registered") && msg.contains("no token"), "{msg}");
    assert!(!msg.contains(&token("tv-test")), "{msg}");
    assert_eq!(shard.state().calls, calls + 1, "final: not retried");
    assert_eq!(b.stats(), before, "nothing local changed (id pinned by the config)");
    assert_eq!(client.config().token, None);
    assert!(shard.state().patterns.is_empty());

    // A generated id under which a delta may have gone out is never replaced either.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = brain_in(dir.path());
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    b.prepare_delta().expect("delta").expect("some");
    let id = b.device_id().to_owned();
    let mut fresh = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    fresh.register(&id, "eu", embedder().model_id()).await.expect("someone registers the id");
    let mut client = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    let err = client.register_and_sync(&mut &mut b).await.expect_err("taken");
    assert!(matches!(err, DeviceError::DeviceIdTaken { .. }), "{err:?}");
    let s = b.stats();
    assert_eq!((b.device_id(), s.delta_in_flight, s.has_token), (id.as_str(), true, false));
}

#[tokio::test]
async fn register_presents_the_token_it_holds() {
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let b = brain();
    let model = embedder().model_id().to_owned();
    let mut first = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    first.register(b.device_id(), "eu", &model).await.expect("new id");
    // A re-install that kept its token registers again.
    let mut again = SyncClient::connect(registered(&endpoint)).await.expect("connect");
    let reg = again.register(b.device_id(), "eu", &model).await.expect("own token");
    assert_eq!(reg.device_token, token(b.device_id()));
    assert!(!format!("{reg:?}").contains(&reg.device_token), "Debug redacts the token");
    assert_eq!(shard.state().registrations_with_token, 1);
    // Another device's token is refused as such, not taken for a lost one.
    let mut wrong =
        SyncClient::connect(SyncConfig { token: Some(token("tv-other")), ..fast(&endpoint) })
            .await
            .expect("connect");
    match wrong.register(b.device_id(), "eu", &model).await {
        Err(DeviceError::Rejected { code: tonic::Code::Unauthenticated, message }) => {
            assert!(message.contains("does not match"), "{message}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

/// What leaves the TV, checked on the delta as the shard received it over gRPC: only the
/// federation's fields, timestamps at 00:00 UTC, random ids, no title, no event time, and no
/// embedding for a content whose collaborative vector the TV holds (with
/// `omit_public_embeddings`).
#[tokio::test]
async fn an_upload_carries_only_coarse_fields_and_no_embedding_for_public_contents() {
    const DAY: i64 = 86_400_000;
    let shard = shard();
    let endpoint = serve(shard.clone()).await;
    let mut b = crate::brain::brain_with(omega_device::BrainConfig {
        omit_public_embeddings: true,
        ..Default::default()
    });
    // Heat's collaborative vector is published; casino's is not.
    let mut embedding = vec![0.0f32; omega_protocol::vector::EMBEDDING_DIM];
    embedding[0] = 0.8;
    let heat_vector = omega_protocol::Pattern {
        id: omega_protocol::types::collaborative_vector_id("heat"),
        content_id: "heat".into(),
        embedding,
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        success_rate: 0.9,
        sample_count: 30,
        context: Default::default(),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    b.apply_global(GlobalPatterns {
        similar: vec![heat_vector],
        global_version: 2,
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        ..Default::default()
    })
    .expect("apply");
    let events = [event("heat", 0.9, 0), event("casino", 0.95, 10), event("heat", 1.0, 95)];
    for e in &events {
        b.observe(e).expect("observe");
    }
    let mut client = SyncClient::connect(fast(&endpoint)).await.expect("connect");
    client.register(b.device_id(), "eu", embedder().model_id()).await.expect("register");
    client.sync(&mut b).await.expect("sync");
    // A later change travels as an update: id, rate, samples.
    b.observe(&event("casino", 0.8, 300)).expect("observe");
    client.sync(&mut b).await.expect("sync");

    let sent = shard.state().wire_deltas.clone();
    assert_eq!(sent.len(), 2, "two pushes");
    let added: Vec<&pb::Pattern> = sent.iter().flat_map(|d| &d.added).collect();
    let ids: Vec<&str> = added.iter().map(|p| p.content_id.as_str()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    for p in &added {
        for (field, t) in [("created_at_ms", p.created_at_ms), ("updated_at_ms", p.updated_at_ms)] {
            assert_eq!(t % DAY, 0, "{} {field} = {t} is finer than a UTC day", p.content_id);
        }
        let id = uuid::Uuid::from_slice(&p.id).expect("id");
        assert_ne!(id.get_version_num(), 7, "a v7 id would carry the creation time");
        let public = p.content_id == "heat";
        assert_eq!(p.embedding.is_none(), public, "{}: embedding only if not public", p.content_id);
    }
    assert_eq!(sent[1].updated.len(), 1, "casino again: an update");
    for d in &sent {
        let bytes = prost::Message::encode_to_vec(d);
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        for title in ["Heat", "Casino"] {
            assert!(!contains(title.as_bytes()), "the title {title:?} left the TV");
        }
        for e in &events {
            let mut varint = Vec::new();
            prost::encoding::encode_varint(e.started_at_ms as u64, &mut varint);
            assert!(!contains(&varint), "an event time ({}) left the TV", e.started_at_ms);
        }
        // The shard accepts it under the upload contract.
        omega_protocol::validate::check_delta("delta", d, omega_protocol::DEFAULT_MODEL_ID)
            .expect("valid upload");
    }
}
