//! An unauthenticated flood of the device port, as an attacker without a token would send
//! it: `connections` HTTP/2 connections from another loopback address (so the shard's
//! per-address budgets do not confuse it with the good devices), each keeping `streams`
//! `Sync` requests open whose gRPC frame announces 1 MiB, sends up to `body_bytes` of it and
//! never finishes. A request that is answered or cut is sent again at once. Every wait is
//! bounded: a stream gives up on an answer after 30 s, and [`Flood::stop`] ends everything.

use bytes::Bytes;
use http_body_util::channel::Channel as BodyChannel;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint};
use tower::{Service, ServiceExt};

/// How to flood.
#[derive(Debug, Clone)]
pub struct FloodConfig {
    /// `http://host:port` of the shard's device port.
    pub target: String,
    /// Connections.
    pub connections: usize,
    /// Requests kept open per connection.
    pub streams: usize,
    /// Body bytes each request sends before stalling (the frame announces 1 MiB).
    pub body_bytes: usize,
    /// Source address of the flood's connections.
    pub source: IpAddr,
}

/// Counters of a running flood.
#[derive(Debug, Default)]
pub struct FloodStats {
    /// Requests sent.
    pub sent: AtomicU64,
    /// Requests answered (refused) by the server.
    pub answered: AtomicU64,
    /// Requests or connections the server cut or refused at the transport.
    pub cut: AtomicU64,
}

/// A running flood; [`Flood::stop`] ends it.
#[derive(Debug)]
pub struct Flood {
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
    /// Live counters.
    pub stats: Arc<FloodStats>,
}

const ANNOUNCED: u32 = 1 << 20;
const CHUNK: usize = 64 * 1024;

fn endless_sync(
    url: &str,
    body_bytes: usize,
) -> (http::Request<tonic::body::Body>, tokio::task::JoinHandle<()>) {
    let (mut tx, body) = BodyChannel::<Bytes, tonic::Status>::new(2);
    let feeder = tokio::spawn(async move {
        let mut header = vec![0u8];
        header.extend_from_slice(&ANNOUNCED.to_be_bytes());
        if tx.send_data(Bytes::from(header)).await.is_err() {
            return;
        }
        let mut sent = 0;
        while sent < body_bytes.min(ANNOUNCED as usize - 1) {
            let n = CHUNK.min(body_bytes - sent);
            if tx.send_data(Bytes::from(vec![0x0a; n])).await.is_err() {
                return;
            }
            sent += n;
        }
        // Never finishes: the body stays open until this task is aborted (once the server has
        // answered or cut the request).
        std::future::pending::<()>().await;
        drop(tx);
    });
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("{url}/omega.v1.Constellation/Sync"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body));
    match req {
        Ok(r) => (r, feeder),
        Err(_) => unreachable!("a fixed, valid request"),
    }
}

async fn connect(cfg: &FloodConfig) -> Option<Channel> {
    let ep = Endpoint::from_shared(cfg.target.clone()).ok()?.local_address(Some(cfg.source));
    tokio::time::timeout(Duration::from_secs(5), ep.connect()).await.ok()?.ok()
}

impl Flood {
    /// Starts flooding.
    pub fn start(cfg: FloodConfig) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(FloodStats::default());
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..cfg.connections {
            let (cfg, stop, stats) = (cfg.clone(), stop.clone(), stats.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Some(ch) = connect(&cfg).await else {
                        stats.cut.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let mut streams = tokio::task::JoinSet::new();
                    for _ in 0..cfg.streams {
                        let (cfg, stop, stats, mut ch) =
                            (cfg.clone(), stop.clone(), stats.clone(), ch.clone());
                        streams.spawn(async move {
                            while !stop.load(Ordering::Relaxed) {
                                let (req, feeder) = endless_sync(&cfg.target, cfg.body_bytes);
                                stats.sent.fetch_add(1, Ordering::Relaxed);
                                let call = async {
                                    let svc = ch.ready().await?;
                                    svc.call(req).await
                                };
                                let r = tokio::time::timeout(Duration::from_secs(30), call).await;
                                feeder.abort();
                                match r {
                                    Ok(Ok(_)) => stats.answered.fetch_add(1, Ordering::Relaxed),
                                    _ => {
                                        stats.cut.fetch_add(1, Ordering::Relaxed);
                                        // The connection is gone: let the outer loop reconnect.
                                        return;
                                    }
                                };
                            }
                        });
                    }
                    while streams.join_next().await.is_some() {}
                }
            });
        }
        Flood { stop, tasks, stats }
    }

    /// Stops the flood and waits (at most 10 s) for its tasks.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), all).await.is_err() {
            self.tasks.abort_all();
        }
    }
}

/// Resident memory of process `pid`, bytes (Linux), if readable.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}
