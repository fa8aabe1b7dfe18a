//! Black-box tests of the built `omega-shard` binary (embedded store): bad input of every
//! kind, a normal exchange between two devices, graceful shutdown, and SIGKILL durability.

mod common;

use bytes::{Buf, BufMut};
use common::{Shard, delta, pattern, register, sync_request};
use omega_protocol::pb;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::Code;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use uuid::Uuid;

/// Sends raw bytes as a `Sync` request body (to test what tonic refuses before decoding).
#[derive(Debug, Clone, Default)]
struct RawCodec;
#[derive(Debug, Clone, Default)]
struct RawEncoder;
#[derive(Debug, Clone, Default)]
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let out = src.chunk().to_vec();
        src.advance(out.len());
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn raw_sync(shard: &Shard, token: &str, body: Vec<u8>, zstd: bool) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(common::channel(&shard.url()).await);
    if zstd {
        grpc = grpc.send_compressed(CompressionEncoding::Zstd);
    }
    grpc.ready().await.expect("ready");
    let mut req = tonic::Request::new(body);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("hdr"));
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/omega.v1.Constellation/Sync");
    grpc.unary(req, path, RawCodec).await.expect_err("refused")
}

/// Sends one hand-made gRPC frame (`flag`, then the bytes as they are) as a Sync body declared
/// `grpc-encoding: zstd`, and returns the status code the server answers.
async fn raw_frame_sync(shard: &Shard, token: &str, compressed: bool, bytes: &[u8]) -> Code {
    use http_body_util::BodyExt;
    use tonic::codegen::http;
    use tower::ServiceExt;
    let mut frame = vec![u8::from(compressed)];
    frame.extend_from_slice(&u32::try_from(bytes.len()).expect("len").to_be_bytes());
    frame.extend_from_slice(bytes);
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("{}/omega.v1.Constellation/Sync", shard.url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", "zstd")
        .header("authorization", format!("Bearer {token}"))
        .body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(frame))))
        .expect("request");
    let resp = common::channel(&shard.url()).await.oneshot(req).await.expect("response");
    let code = |h: &http::HeaderMap| {
        h.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok()).map(Code::from_i32)
    };
    if let Some(c) = code(resp.headers()) {
        return c;
    }
    let body = resp.into_body().collect().await.expect("body");
    body.trailers().and_then(code).expect("grpc-status in trailers")
}

fn status_series(status: &str) -> String {
    format!("constellation_sync_requests_total{{shard_id=\"1\",status=\"{status}\"}}")
}

/// Everything a bad sync could have changed on Postgres: intake rows, stored patterns and the
/// devices' versions and sync counts, as one fingerprint.
async fn pg_fingerprint(url: &str) -> Vec<(String, i64, String)> {
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(url).await.expect("connect");
    let mut out = Vec::new();
    for (table, rows) in [
        ("pattern_intake", "SELECT seq, device_id, op, pattern_id FROM pattern_intake"),
        (
            "patterns",
            "SELECT id, device_id, success_rate, sample_count, updated_at_ms FROM patterns",
        ),
        ("devices", "SELECT device_id, local_version, syncs, last_sync_at FROM devices"),
    ] {
        let (n, digest): (i64, Option<String>) = sqlx::query_as(&format!(
            "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM ({rows}) t"
        ))
        .fetch_one(&mut db)
        .await
        .expect("fingerprint");
        out.push((table.to_owned(), n, digest.unwrap_or_default()));
    }
    out
}

/// Sync outcomes counted since `before`: exactly one more `want`, nothing else.
fn assert_one_more(shard: &Shard, before: &mut BTreeMap<String, f64>, want: &str, case: &str) {
    let now = shard.outcomes("sync");
    let mut expected = before.clone();
    *expected.entry(want.to_owned()).or_default() += 1.0;
    assert_eq!(now, expected, "{case}: the metric must count it once, as {want}");
    *before = now;
}

async fn bad_input_gets_the_right_code_a_metric_and_stores_nothing(shard: Shard, db: Option<&str>) {
    let mut c = shard.client().await;
    let token = register(&mut c, "tv-1").await;
    let other = register(&mut c, "tv-2").await;

    // One good sync, so "nothing stored" below means "still exactly this".
    let good = c
        .sync(sync_request("tv-1", Some(&token), delta(1, vec![pattern(1, 0.9)])))
        .await
        .expect("good sync")
        .into_inner();
    assert_eq!((good.acknowledged_version, good.patterns_accepted), (1, 1));
    let mut seen = shard.outcomes("sync");
    assert_eq!(seen, BTreeMap::from([("ok".to_owned(), 1.0)]));
    if let Some(url) = db {
        common::wait_for_merge(url).await;
    }
    let stored = match db {
        Some(url) => pg_fingerprint(url).await,
        None => Vec::new(),
    };
    if db.is_some() {
        let rows: Vec<i64> = stored.iter().map(|(_, n, _)| *n).collect();
        assert_eq!(rows, vec![0, 1, 2], "intake, patterns, devices: {stored:?}");
    }

    type Mutate = fn(&mut pb::PatternDelta);
    let invalid: Vec<(&str, Mutate, &str)> = vec![
        (
            "wrong dimension",
            |d| d.added[0].embedding.as_mut().expect("e").values.truncate(100),
            "delta.added[0].embedding.values has dimension 100",
        ),
        (
            "NaN",
            |d| d.added[0].embedding.as_mut().expect("e").scale = f32::NAN,
            "delta.added[0].embedding.scale must be finite",
        ),
        ("success_rate 2.0", |d| d.added[0].success_rate = 2.0, "success_rate = 2 is outside"),
        (
            "10,000 patterns",
            |d| {
                d.removed =
                    (0..10_000u128).map(|i| Uuid::from_u128(i + 1).as_bytes().to_vec()).collect()
            },
            "10001 entries, at most 256",
        ),
        ("another model", |d| d.model_id = "other-model".into(), "does not match"),
        (
            "scale 1e30 (ranking poisoning)",
            |d| d.added[0].embedding.as_mut().expect("e").scale = 1e30,
            "delta.added[0].embedding.scale has L2 norm",
        ),
        (
            "NUL in content_id (fails Postgres text)",
            |d| d.added[0].content_id = "movie\u{0}1".into(),
            "delta.added[0].content_id holds a control character",
        ),
        (
            "control character in a genre",
            |d| d.added[0].context.as_mut().expect("c").genres = vec!["dra\u{1b}ma".into()],
            "genres[0] holds a control character",
        ),
        (
            "local_version 2^63 (past what Postgres stores)",
            |d| d.local_version = 1 << 63,
            "delta.local_version",
        ),
        ("local_version u64::MAX", |d| d.local_version = u64::MAX, "delta.local_version"),
    ];
    for (i, (name, mutate, want)) in invalid.iter().enumerate() {
        let mut d = delta(2, vec![pattern(100 + i as u64, 0.9)]);
        mutate(&mut d);
        let err = c.sync(sync_request("tv-1", Some(&token), d)).await.expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(want), "{name}: {}", err.message());
        assert_one_more(&shard, &mut seen, "invalid_argument", name);
    }

    // 10,000 full patterns: ~4.5 MB of incompressible embeddings, over the 1 MiB limit.
    let huge = delta(2, (0..10_000).map(|i| pattern(1000 + i, 0.9)).collect());
    let err = c.sync(sync_request("tv-1", Some(&token), huge)).await.expect_err("huge");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_one_more(&shard, &mut seen, "resource_exhausted", "10,000 full patterns");

    // Refused before decoding: a 5 MB message, a zstd bomb, garbage bytes.
    let five_mb = vec![0x0a; 5 << 20];
    assert_eq!(raw_sync(&shard, &token, five_mb, false).await.code(), Code::ResourceExhausted);
    assert_one_more(&shard, &mut seen, "resource_exhausted", "5 MB message");
    let mut bomb = vec![0x0a, 0x80, 0x80, 0x80, 0x02]; // field 1, length 4 MiB...
    bomb.resize(4 << 20, b'a'); // ...of one byte repeated: a few hundred bytes compressed
    let status = raw_sync(&shard, &token, bomb, true).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_one_more(&shard, &mut seen, "resource_exhausted", "zstd bomb");
    let garbage: Vec<u8> =
        (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let status = raw_sync(&shard, &token, garbage.clone(), false).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_one_more(&shard, &mut seen, "invalid_argument", "garbage bytes");
    // A corrupt zstd frame is the client's fault, not the server's: INVALID_ARGUMENT (INTERNAL
    // would read as a server fault and invite retries).
    let mut corrupt = zstd::encode_all(&garbage[..], 3).expect("zstd");
    let mid = corrupt.len() / 2;
    corrupt[mid..].iter_mut().for_each(|b| *b ^= 0x5a);
    assert_eq!(raw_frame_sync(&shard, &token, true, &corrupt).await, Code::InvalidArgument);
    assert_one_more(&shard, &mut seen, "invalid_argument", "corrupt zstd frame");
    assert_eq!(raw_frame_sync(&shard, &token, true, &garbage).await, Code::InvalidArgument);
    assert_one_more(&shard, &mut seen, "invalid_argument", "not zstd at all");

    // Tokens: missing, forged, another device's.
    let d = || delta(2, vec![pattern(7, 0.9)]);
    let forged = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for (name, tok) in
        [("missing", None), ("forged", Some(forged)), ("other", Some(other.as_str()))]
    {
        let err = c.sync(sync_request("tv-1", tok, d())).await.expect_err(name);
        assert_eq!(err.code(), Code::Unauthenticated, "{name}");
        assert_one_more(&shard, &mut seen, "unauthenticated", name);
    }

    // Replayed local_version: OK, flagged, and nothing changes.
    let replay = c
        .sync(sync_request("tv-1", Some(&token), delta(1, vec![pattern(9, 0.9), pattern(10, 0.9)])))
        .await
        .expect("replay")
        .into_inner();
    assert!(replay.replayed);
    assert_eq!((replay.acknowledged_version, replay.patterns_accepted), (1, 0));
    assert_one_more(&shard, &mut seen, "replayed", "replayed local_version");

    let stats = shard.stats();
    assert_eq!(stats["patterns"], 1, "{stats}");
    assert_eq!(stats["devices_total"], 2);
    if let Some(url) = db {
        // Give a wrongly accepted write time to reach the tables before comparing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        common::wait_for_merge(url).await;
        assert_eq!(pg_fingerprint(url).await, stored, "bad input changed the database");
    }
    assert_eq!(
        seen,
        BTreeMap::from([
            ("invalid_argument".to_owned(), 13.0),
            ("ok".to_owned(), 1.0),
            ("replayed".to_owned(), 1.0),
            ("resource_exhausted".to_owned(), 3.0),
            ("unauthenticated".to_owned(), 3.0),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_code_a_metric_and_stores_nothing_embedded() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(dir.path(), None, &[]);
    bad_input_gets_the_right_code_a_metric_and_stores_nothing(shard, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_code_a_metric_and_stores_nothing_postgres() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = common::fresh_db().await;
    let shard = Shard::start(dir.path(), Some(&url), &[("MERGE_INTERVAL_MS", "100")]);
    bad_input_gets_the_right_code_a_metric_and_stores_nothing(shard, Some(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_receive_only_published_aggregates_with_k_sources_within_budget() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(dir.path(), None, &[("SIMILAR_CACHE_SECS", "0")]);
    let mut c = shard.client().await;
    let ta = register(&mut c, "tv-a").await;
    let tb = register(&mut c, "tv-b").await;
    let mine: Vec<_> = (0..40).map(|i| pattern(i, 0.9)).collect();
    let mine_ids: Vec<Vec<u8>> = mine.iter().map(|p| p.id.clone()).collect();
    c.sync(sync_request("tv-a", Some(&ta), delta(1, mine.clone()))).await.expect("a");
    let resp = c
        .sync(sync_request("tv-b", Some(&tb), delta(1, vec![pattern(7, 0.9)])))
        .await
        .expect("b")
        .into_inner();
    let g = resp.global.as_ref().expect("global");
    assert!(g.similar.is_empty(), "no round yet: tv-a's patterns are never relayed: {g:?}");
    // A round publishes aggregates where tv-a's patterns are: 30 that 5 devices back and 10
    // that only 2 do (below the shard's k = 3).
    let aggregate = |i: usize, sources: u32| pb::AggregatedPattern {
        id: Uuid::now_v7().as_bytes().to_vec(),
        content_id: format!("content-{i}"),
        embedding: mine[i].embedding.clone(),
        quality: 0.9,
        source_devices: sources,
        total_samples: 50,
        context: mine[i].context.clone(),
        region: String::new(),
    };
    let aggs: Vec<_> = (0..40).map(|i| aggregate(i, if i < 30 { 5 } else { 2 })).collect();
    let servable: Vec<Vec<u8>> = aggs.iter().take(30).map(|a| a.id.clone()).collect();
    let mut admin = pb::shard_admin_client::ShardAdminClient::new(
        common::channel(&format!("http://127.0.0.1:{}", shard.admin)).await,
    );
    let round = pb::PublishGlobalRequest {
        round_id: "round-1".into(),
        global_version: 1,
        patterns: aggs,
        trends: vec![],
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
    };
    admin.publish_global(round).await.expect("publish");
    let mut pull = sync_request("tv-b", Some(&tb), delta(1, vec![]));
    pull.get_mut().delta = None;
    let resp = c.sync(pull).await.expect("pull").into_inner();
    let g = resp.global.as_ref().expect("global");
    assert!(g.similar.len() >= 8, "{} similar", g.similar.len());
    assert!(g.similar.iter().all(|p| servable.contains(&p.id)), "only aggregates with k sources");
    assert!(g.similar.iter().all(|p| !mine_ids.contains(&p.id)), "never a device's pattern");
    assert!(g.similar.iter().all(|p| p.created_at_ms % 3_600_000 == 0));
    assert!(omega_protocol::validate::check_global("global", g).is_ok());
    let size = omega_protocol::wire::grpc_zstd_size(&resp);
    assert!(size <= 5 * 1024, "{size} bytes");
    for path in ["/health", "/live", "/ready"] {
        assert_eq!(shard.get(path).expect("get").0, 200, "{path}");
    }
    let stats = shard.stats();
    assert_eq!(stats["store"], "embedded");
    assert_eq!(stats["syncs_total"], 3);
    assert_eq!(stats["ready"], true);
    assert!(shard.metric("constellation_grpc_connections{shard_id=\"1\"}") >= 1.0);
}

/// After SIGTERM, during the drain delay: `/ready` answers 503 (saying it is draining), and a
/// new sync and a new registration are refused with UNAVAILABLE naming the shutdown.
async fn observe_draining(shard: &Shard, c: &mut Client, device: &str, token: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match shard.get("/ready") {
            Ok((503, body)) => {
                assert!(body.contains("\"draining\":true"), "{body}");
                break;
            }
            Ok((200, _)) if std::time::Instant::now() < deadline => {}
            other => panic!("/ready during the drain delay: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = c
        .sync(sync_request(device, Some(token), delta(1, vec![pattern(50, 0.9)])))
        .await
        .expect_err("a new sync while draining");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("shutting down"), "{}", err.message());
    let err = c
        .register(common::register_request("tv-late", None))
        .await
        .expect_err("a new registration while draining");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(shard.stats()["ready"], false);
}

type Client =
    omega_protocol::pb::constellation_client::ConstellationClient<tonic::transport::Channel>;

/// Postgres, where a sync can be held inside the store (its device row locked from another
/// session) for as long as the test likes: that sync is in flight across SIGTERM, the drain
/// delay and the closing of the listeners, and still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().expect("tmp");
    let url = common::fresh_db().await;
    let mut shard = Shard::start(dir.path(), Some(&url), &[("DRAIN_DELAY_SECS", "3")]);
    let mut c = shard.client().await;
    let ta = register(&mut c, "tv-a").await;
    let tb = register(&mut c, "tv-b").await;
    c.sync(sync_request("tv-a", Some(&ta), delta(1, vec![pattern(1, 0.9)]))).await.expect("v1");

    let mut lock = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut lock).await.expect("begin");
    sqlx::query("SELECT 1 FROM devices WHERE device_id = 'tv-a' FOR UPDATE")
        .execute(&mut lock)
        .await
        .expect("lock tv-a");
    let held = {
        let mut c = c.clone();
        let ta = ta.clone();
        tokio::spawn(async move {
            let added = vec![pattern(2, 0.9), pattern(3, 0.9)];
            c.sync(sync_request("tv-a", Some(&ta), delta(2, added))).await
        })
    };
    let mut watch = sqlx::PgConnection::connect(&url).await.expect("connect");
    common::wait_for_lock_waiter(&mut watch, "the sync never reached the row lock").await;

    shard.signal("-TERM");
    observe_draining(&shard, &mut c, "tv-b", &tb).await;
    // After the delay the listeners close; the held sync is still in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while shard.get("/ready").is_ok() {
        assert!(std::time::Instant::now() < deadline, "REST still open after the drain delay");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!held.is_finished(), "the held sync ended before it was released");
    sqlx::query("ROLLBACK").execute(&mut lock).await.expect("release tv-a");
    let done = held.await.expect("task").expect("the in-flight sync completes").into_inner();
    assert_eq!((done.acknowledged_version, done.patterns_accepted), (2, 2));
    let status = shard.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");

    // Restarted, the shard has the in-flight sync's data and nothing of the refused one.
    shard.spawn(&[]);
    let mut c = shard.client().await;
    let again = c
        .sync(sync_request("tv-a", Some(&ta), delta(2, vec![pattern(9, 0.9)])))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!((again.replayed, again.acknowledged_version), (true, 2));
    let b =
        c.sync(sync_request("tv-b", Some(&tb), delta(1, vec![]))).await.expect("tv-b").into_inner();
    assert_eq!((b.replayed, b.acknowledged_version), (false, 1), "the refused sync left nothing");
    common::wait_for_merge(&url).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM patterns WHERE device_id = 'tv-a'")
        .fetch_one(&mut watch)
        .await
        .expect("count");
    assert_eq!(stored, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_embedded_store_drains_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut shard = Shard::start(dir.path(), None, &[("DRAIN_DELAY_SECS", "3")]);
    let mut c = shard.client().await;
    let t = register(&mut c, "tv").await;
    let tb = register(&mut c, "tv-b").await;
    c.sync(sync_request("tv", Some(&t), delta(1, vec![pattern(1, 0.9)]))).await.expect("sync");
    shard.signal("-TERM");
    observe_draining(&shard, &mut c, "tv-b", &tb).await;
    let status = shard.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    shard.spawn(&[]);
    let mut c = shard.client().await;
    let again = c
        .sync(sync_request("tv", Some(&t), delta(1, vec![pattern(2, 0.9)])))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!((again.replayed, again.acknowledged_version), (true, 1));
    let stats = shard.stats();
    assert_eq!((stats["patterns"].as_u64(), stats["devices_total"].as_u64()), (Some(1), Some(2)));
}

/// Shared by the embedded and Postgres SIGKILL tests.
pub async fn acknowledged_syncs_survive_sigkill(mut shard: Shard) {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let devices: Vec<String> = (0..16).map(|i| format!("kill-{i}")).collect();
    let mut tokens = HashMap::new();
    let mut c = shard.client().await;
    for d in &devices {
        tokens.insert(d.clone(), register(&mut c, d).await);
    }
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for d in devices.clone() {
        let url = shard.url();
        let token = tokens[&d].clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = common::client(&url).await;
            for v in 1..=10_000u64 {
                let r =
                    c.sync(sync_request(&d, Some(&token), delta(v, vec![pattern(v, 0.9)]))).await;
                match r {
                    Ok(r) => {
                        acked
                            .lock()
                            .expect("lock")
                            .insert(d.clone(), r.into_inner().acknowledged_version);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    shard.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().expect("lock").clone();
    let total: u64 = acked.values().sum();
    assert!(total > 50, "too few syncs before the kill: {total}");
    shard.spawn(&[]);
    let mut c = shard.client().await;
    for d in &devices {
        let Some(&v) = acked.get(d) else { continue };
        let r = c
            .sync(sync_request(d, Some(&tokens[d]), delta(v, vec![pattern(1, 0.9)])))
            .await
            .expect("replay after restart")
            .into_inner();
        assert!(r.replayed, "{d} v{v} must be a replay after restart");
        assert!(
            r.acknowledged_version >= v,
            "{d}: acknowledged {v}, stored {}",
            r.acknowledged_version
        );
    }
    let stats = shard.stats();
    assert!(stats["patterns"].as_u64().expect("patterns") >= total, "{stats} < {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_acknowledged_syncs_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(
        dir.path(),
        None,
        &[("RATE_LIMIT_PER_MINUTE", "1000000"), ("RATE_LIMIT_BURST", "1000000")],
    );
    acknowledged_syncs_survive_sigkill(shard).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_acknowledged_syncs_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = common::fresh_db().await;
    let shard = Shard::start(
        dir.path(),
        Some(&url),
        &[("RATE_LIMIT_PER_MINUTE", "1000000"), ("RATE_LIMIT_BURST", "1000000")],
    );
    acknowledged_syncs_survive_sigkill(shard).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_exports_in_resumable_batches_and_publishes_once() {
    use omega_protocol::pb::shard_admin_client::ShardAdminClient;
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(dir.path(), None, &[("SHARD_ID", "7")]);
    let mut c = shard.client().await;
    for (d, n) in [("tv-a", 4u64), ("tv-b", 3)] {
        let t = register(&mut c, d).await;
        let added = (0..n).map(|i| pattern(i + n * 100, 0.9)).collect();
        c.sync(sync_request(d, Some(&t), delta(1, added))).await.expect("sync");
    }
    let mut admin =
        ShardAdminClient::new(common::channel(&format!("http://127.0.0.1:{}", shard.admin)).await)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd);
    let export = |after: Vec<u8>| pb::ExportPatternsRequest {
        min_quality: 0.8,
        round_id: "r1".into(),
        batch_size: 3,
        after,
    };
    let mut stream = admin.export_patterns(export(vec![])).await.expect("export").into_inner();
    let mut batches = Vec::new();
    while let Some(b) = stream.message().await.expect("batch") {
        batches.push(b);
    }
    assert_eq!(batches.iter().map(|b| b.patterns.len()).collect::<Vec<_>>(), vec![3, 3, 1]);
    assert!(batches.last().expect("last").last);
    assert!(
        batches.iter().all(|b| b.shard_id == 7 && b.model_id == omega_protocol::DEFAULT_MODEL_ID)
    );
    let sources: std::collections::HashSet<Vec<u8>> =
        batches.iter().flat_map(|b| b.patterns.iter().map(|p| p.source.clone())).collect();
    assert_eq!(sources.len(), 2, "one pseudonym per device");
    assert!(
        sources
            .iter()
            .all(|s| s.len() == 16 && !s.windows(4).any(|w| w == b"tv-a" || w == b"tv-b"))
    );
    // Resume after the first batch: the rest, nothing repeated.
    let mut resumed = admin
        .export_patterns(export(batches[0].cursor.clone()))
        .await
        .expect("resume")
        .into_inner();
    let mut rest = 0;
    while let Some(b) = resumed.message().await.expect("batch") {
        rest += b.patterns.len();
    }
    assert_eq!(rest, 4);
    let bad_cursor = admin.export_patterns(export(vec![1, 2, 3])).await.expect_err("bad cursor");
    assert_eq!(bad_cursor.code(), Code::InvalidArgument);

    let publish = |model: &str| pb::PublishGlobalRequest {
        round_id: "round-1".into(),
        global_version: 4,
        patterns: vec![],
        trends: vec![pb::TrendSignal {
            target: Some(pb::trend_signal::Target::ContentId("hit".into())),
            score: 3.0,
            region: "eu".into(),
        }],
        model_id: model.into(),
    };
    let wrong = admin.publish_global(publish("other")).await.expect_err("model");
    assert_eq!(wrong.code(), Code::InvalidArgument);
    let first = admin
        .publish_global(publish(omega_protocol::DEFAULT_MODEL_ID))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!((first.applied, first.global_version), (true, 4));
    let again = admin
        .publish_global(publish(omega_protocol::DEFAULT_MODEL_ID))
        .await
        .expect("again")
        .into_inner();
    assert_eq!((again.applied, again.global_version), (false, 4));
    // Devices in the round's region receive the trend and the new version.
    let t = register(&mut c, "tv-c").await;
    let resp =
        c.sync(sync_request("tv-c", Some(&t), delta(1, vec![]))).await.expect("sync").into_inner();
    let g = resp.global.expect("global");
    assert_eq!(g.global_version, 4);
    assert_eq!(g.trending.len(), 1);
    let stats = admin.stats(pb::StatsRequest {}).await.expect("stats").into_inner();
    assert_eq!(
        (stats.shard_id, stats.devices_total, stats.patterns, stats.global_version),
        (7, 3, 7, 4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_rate_limit_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(
        dir.path(),
        None,
        &[("RATE_LIMIT_BURST", "2"), ("RATE_LIMIT_PER_MINUTE", "1")],
    );
    let mut c = shard.client().await;
    let t = register(&mut c, "tv").await;
    for v in 1..=2 {
        c.sync(sync_request("tv", Some(&t), delta(v, vec![]))).await.expect("within burst");
    }
    let err = c.sync(sync_request("tv", Some(&t), delta(3, vec![]))).await.expect_err("limited");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(shard.metric(&status_series("resource_exhausted")), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_without_a_delta_pulls_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(dir.path(), None, &[("SIMILAR_CACHE_SECS", "0")]);
    let mut c = shard.client().await;
    let ta = register(&mut c, "tv-a").await;
    let tb = register(&mut c, "tv-b").await;
    c.sync(sync_request("tv-a", Some(&ta), delta(1, (0..20).map(|i| pattern(i, 0.9)).collect())))
        .await
        .expect("push");
    c.sync(sync_request("tv-b", Some(&tb), delta(1, vec![pattern(99, 0.9)]))).await.expect("b");
    let patterns_before = shard.stats()["patterns"].clone();

    let mut pull = sync_request("tv-b", Some(&tb), delta(1, vec![]));
    pull.get_mut().delta = None;
    let resp = c.sync(pull).await.expect("pull").into_inner();
    assert!(!resp.replayed, "a pull is not a replay");
    assert_eq!(resp.acknowledged_version, 1, "the stored version comes back unchanged");
    assert_eq!(resp.patterns_accepted, 0);
    let g = resp.global.expect("global");
    assert!(g.similar.is_empty(), "no round yet: nothing to serve, never tv-a's patterns");
    assert_eq!(shard.stats()["patterns"], patterns_before);
    assert_eq!(shard.metric(&status_series("pull")), 1.0);

    // A pull from an unknown device is refused like any sync of it.
    let mut stranger = sync_request("tv-c", Some(&tb), delta(1, vec![]));
    stranger.get_mut().delta = None;
    assert_eq!(c.sync(stranger).await.expect_err("forged").code(), tonic::Code::Unauthenticated);
}
