//! The device port's limits against the built binary, as an attacker meets them: a request
//! body that never finishes is cut at `REQUEST_TIMEOUT_SECS`; a connection beyond
//! `MAX_CONNECTIONS` is closed; a client address that keeps sending bad tokens is refused
//! before its bodies are read; silent device connections and REST clients stalling in their
//! headers are closed.

mod common;

use bytes::Bytes;
use common::{Shard, delta, pattern, register, sync_request};
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::codegen::http;
use tower::ServiceExt;

/// A well-formed token that belongs to no device.
const WRONG_TOKEN: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// A Sync whose gRPC frame announces 1 MiB, sends `sent` bytes of it, and never finishes.
/// Returns the sender: the body stays open as long as it lives.
fn endless_sync(
    url: &str,
    token: Option<&str>,
    sent: usize,
) -> (http::Request<tonic::body::Body>, http_body_util::channel::Sender<Bytes, tonic::Status>) {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, tonic::Status>::new(2);
    // The channel has room for this first chunk, so sending it completes at once.
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(1u32 << 20).to_be_bytes());
    frame.resize(5 + sent, 0x0a);
    futures::executor::block_on(tx.send_data(Bytes::from(frame))).expect("first chunk");
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("{url}/omega.v1.Constellation/Sync"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    (req.body(tonic::body::Body::new(body)).expect("request"), tx)
}

/// The gRPC status of a response (trailers-only, or in the trailers).
async fn status_of(resp: http::Response<tonic::body::Body>) -> Code {
    let code = |h: &http::HeaderMap| {
        h.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok()).map(Code::from_i32)
    };
    if let Some(c) = code(resp.headers()) {
        return c;
    }
    let body = resp.into_body().collect().await.expect("body");
    body.trailers().and_then(code).expect("grpc-status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_is_cut_at_the_request_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(dir.path(), None, &[("REQUEST_TIMEOUT_SECS", "2")]);
    let channel = common::channel(&shard.url()).await;
    let (req, _tx) = endless_sync(&shard.url(), Some(WRONG_TOKEN), 1000);
    let start = Instant::now();
    let code = status_of(channel.oneshot(req).await.expect("response")).await;
    let took = start.elapsed();
    assert_eq!(code, Code::Cancelled);
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(dir.path(), None, &[("MAX_CONNECTIONS", "2")]);
    let url = shard.url();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = common::client(&url).await;
        register(&mut c, &format!("tv-{}", held.len())).await;
        held.push(c);
    }
    let mut third = common::client(&url).await;
    let err = third
        .register(omega_protocol::pb::RegisterRequest {
            device_id: "tv-third".into(),
            ..Default::default()
        })
        .await
        .expect_err("a third connection is closed");
    // The server closes it as soon as it is accepted: the client sees a transport error (reset
    // or closed, by timing), never an answer from the server.
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
    assert!(matches!(err.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{err:?}");
    // Closing one frees its place.
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = common::client(&url).await;
    register(&mut again, "tv-again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_sending_bad_tokens_is_refused_before_its_bodies_are_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(
        dir.path(),
        None,
        &[("AUTH_FAILURES_PER_MINUTE", "1"), ("AUTH_FAILURES_BURST", "3")],
    );
    let mut c = shard.client().await;
    let token = register(&mut c, "tv-1").await;
    for i in 0..3 {
        let err = c
            .sync(sync_request("tv-1", Some(WRONG_TOKEN), delta(1, vec![pattern(i, 0.9)])))
            .await
            .expect_err("wrong token");
        assert_eq!(err.code(), Code::Unauthenticated, "attempt {i}");
    }
    // The budget is spent: even the right token is refused now, on the headers.
    let err = c
        .sync(sync_request("tv-1", Some(&token), delta(1, vec![pattern(9, 0.9)])))
        .await
        .expect_err("address over its budget");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("bad token"), "{err:?}");
    let (req, _tx) = endless_sync(&shard.url(), Some(&token), 1000);
    let start = Instant::now();
    let code = status_of(common::channel(&shard.url()).await.oneshot(req).await.expect("r")).await;
    assert_eq!(code, Code::ResourceExhausted);
    assert!(start.elapsed() < Duration::from_secs(2), "refused before the body");
}

/// Opens `n` sockets to `addr`, each sending `prefix` and then nothing.
fn silent_sockets(addr: &str, n: usize, prefix: &[u8]) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.write_all(prefix).expect("write");
            s
        })
        .collect()
}

/// True when the server closed `s` (end of stream or reset) before `deadline`.
fn closed_by(s: &mut std::net::TcpStream, deadline: Instant) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            // Bytes the server sent before closing (its HTTP/2 settings, a 408): read on.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// The device port's open connections.
const OPEN: &str = "constellation_grpc_connections{shard_id=\"1\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_device_connections_and_half_sent_rest_headers_are_closed() {
    let dir = tempfile::tempdir().expect("tmp");
    let env = [
        ("IDLE_TIMEOUT_SECS", "3"),
        ("HTTP2_KEEPALIVE_SECS", "1"),
        ("HTTP2_KEEPALIVE_TIMEOUT_SECS", "1"),
        ("REST_HEADER_TIMEOUT_SECS", "2"),
    ];
    let shard = Shard::start(dir.path(), None, &env);
    // A live client that stays connected and quiet between two syncs: it answers the
    // keepalive pings, so it is not cut.
    let mut live = shard.client().await;
    let token = register(&mut live, "tv-live").await;
    live.sync(sync_request("tv-live", Some(&token), delta(1, vec![pattern(1, 0.9)])))
        .await
        .expect("first sync");

    let grpc = format!("127.0.0.1:{}", shard.grpc);
    let rest = format!("127.0.0.1:{}", shard.rest);
    let started = Instant::now();
    let mut idle = silent_sockets(&grpc, 100, b"");
    let mut half =
        silent_sockets(&rest, 100, b"GET /api/v1/stats HTTP/1.1\r\nHost: shard\r\nX-Slow: ");
    let deadline = started + Duration::from_secs(15);
    let idle_closed = idle.iter_mut().map(|s| closed_by(s, deadline)).filter(|c| *c).count();
    let half_closed = half.iter_mut().map(|s| closed_by(s, deadline)).filter(|c| *c).count();
    assert_eq!((idle_closed, half_closed), (100, 100), "after {:?}", started.elapsed());

    // The live connection outlived the idle ones and still carries a sync.
    let open = shard.metric(OPEN);
    assert_eq!(open, 1.0, "connections open after the idle ones were cut");
    tokio::time::sleep(Duration::from_secs(4)).await;
    live.sync(sync_request("tv-live", Some(&token), delta(2, vec![pattern(2, 0.9)])))
        .await
        .expect("sync on the long-lived connection");
    assert_eq!(shard.metric(OPEN), 1.0, "no reconnect was needed");
}
