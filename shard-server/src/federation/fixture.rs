//! An in-memory `ShardAdmin` over real loopback gRPC, for tests and benchmarks of rounds
//! without a store: it exports the patterns it was given in cursor-ordered batches and
//! records what rounds published to it (idempotent on round id, like a real shard).

use omega_protocol::pb::{
    self,
    shard_admin_server::{ShardAdmin, ShardAdminServer},
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

/// Largest batch the fixture sends, like a real shard's cap.
pub const MAX_BATCH: usize = 2_000;

/// A fake shard.
#[derive(Debug)]
pub struct MemoryShard {
    /// `SHARD_ID`.
    pub shard_id: u32,
    /// Model it serves.
    pub model_id: String,
    patterns: Vec<pb::ExportedPattern>,
    /// Round id -> global version, for every round applied.
    rounds: Mutex<HashMap<String, u64>>,
    /// Every publish request that changed something, in order.
    pub published: Mutex<Vec<pb::PublishGlobalRequest>>,
    global_version: AtomicU64,
    /// After this many more batches, the export stream fails with UNAVAILABLE (< 0: never).
    pub fail_after_batches: AtomicI64,
    /// Export requests served.
    pub exports: AtomicU64,
}

impl MemoryShard {
    /// A shard holding `patterns`.
    pub fn new(shard_id: u32, model_id: &str, patterns: Vec<pb::ExportedPattern>) -> Arc<Self> {
        Arc::new(MemoryShard {
            shard_id,
            model_id: model_id.into(),
            patterns,
            rounds: Mutex::new(HashMap::new()),
            published: Mutex::new(Vec::new()),
            global_version: AtomicU64::new(0),
            fail_after_batches: AtomicI64::new(-1),
            exports: AtomicU64::new(0),
        })
    }

    /// Publish requests applied so far.
    pub fn published(&self) -> Vec<pb::PublishGlobalRequest> {
        self.published.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// A running fixture server; dropping the handle leaves it running, [`Running::stop`] ends it.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// The endpoint URL for `--shards`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts the server down and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Serves `shard` on `addr` (port 0 picks a free one).
pub async fn serve_on(shard: Arc<MemoryShard>, addr: SocketAddr) -> std::io::Result<Running> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let svc = ShardAdminServer::from_arc(shard)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
    });
    Ok(Running { addr, stop: Some(tx), task })
}

/// Serves `shard` on a free loopback port.
pub async fn serve(shard: Arc<MemoryShard>) -> std::io::Result<Running> {
    serve_on(shard, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<pb::ExportBatch, Status>> + Send>>;

#[tonic::async_trait]
impl ShardAdmin for MemoryShard {
    type ExportPatternsStream = BatchStream;

    async fn export_patterns(
        &self,
        request: Request<pb::ExportPatternsRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        self.exports.fetch_add(1, Ordering::Relaxed);
        let r = request.into_inner();
        let start = match r.after.len() {
            0 => 0,
            8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&r.after);
                u64::from_le_bytes(b) as usize
            }
            _ => return Err(Status::invalid_argument("bad cursor")),
        };
        let size = (r.batch_size as usize).clamp(1, MAX_BATCH);
        let selected: Vec<(usize, pb::ExportedPattern)> = self
            .patterns
            .iter()
            .enumerate()
            .skip(start)
            .filter(|(_, p)| p.pattern.as_ref().is_some_and(|p| p.success_rate >= r.min_quality))
            .map(|(i, p)| (i, p.clone()))
            .collect();
        let mut batches = Vec::new();
        let chunks: Vec<&[(usize, pb::ExportedPattern)]> = selected.chunks(size).collect();
        let n = chunks.len();
        let mut fail_after = self.fail_after_batches.load(Ordering::Relaxed);
        for (k, chunk) in chunks.into_iter().enumerate() {
            if fail_after == 0 {
                batches.push(Err(Status::unavailable("shard went away")));
                fail_after = -1;
                break;
            }
            fail_after = (fail_after - 1).max(-1);
            let next = chunk.last().map(|(i, _)| *i + 1).unwrap_or(start);
            batches.push(Ok(pb::ExportBatch {
                patterns: chunk.iter().map(|(_, p)| p.clone()).collect(),
                cursor: (next as u64).to_le_bytes().to_vec(),
                shard_id: self.shard_id,
                model_id: self.model_id.clone(),
                last: k + 1 == n,
            }));
        }
        if n == 0 {
            batches.push(Ok(pb::ExportBatch {
                patterns: vec![],
                cursor: (self.patterns.len() as u64).to_le_bytes().to_vec(),
                shard_id: self.shard_id,
                model_id: self.model_id.clone(),
                last: true,
            }));
        }
        self.fail_after_batches.store(fail_after, Ordering::Relaxed);
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn publish_global(
        &self,
        request: Request<pb::PublishGlobalRequest>,
    ) -> Result<Response<pb::PublishGlobalResponse>, Status> {
        let r = request.into_inner();
        if r.model_id != self.model_id {
            return Err(Status::invalid_argument("model mismatch"));
        }
        let mut rounds = self.rounds.lock().map_err(|_| Status::internal("poisoned"))?;
        if let Some(&v) = rounds.get(&r.round_id) {
            return Ok(Response::new(pb::PublishGlobalResponse {
                applied: false,
                global_version: v,
            }));
        }
        let v = self.global_version.load(Ordering::Relaxed).max(r.global_version);
        self.global_version.store(v, Ordering::Relaxed);
        rounds.insert(r.round_id.clone(), v);
        self.published.lock().map_err(|_| Status::internal("poisoned"))?.push(r);
        Ok(Response::new(pb::PublishGlobalResponse { applied: true, global_version: v }))
    }

    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        Ok(Response::new(pb::StatsResponse {
            shard_id: self.shard_id,
            patterns: self.patterns.len() as u64,
            global_version: self.global_version.load(Ordering::Relaxed),
            store: "memory".into(),
            model_id: self.model_id.clone(),
            ..Default::default()
        }))
    }
}
