//! The device port's limits against the built binary, as an attacker meets them: a request
//! body that never finishes is cut at `REQUEST_TIMEOUT_SECS`; a connection beyond
//! `MAX_CONNECTIONS` is closed; a client address that keeps sending bad tokens is refused
//! before its bodies are read.

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
