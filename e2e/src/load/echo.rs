//! The baseline a shard's throughput is measured against: a bare tonic `Constellation` in
//! this process whose `Sync` does no work and answers a fixed ~5 KB response (random
//! similar patterns, which zstd cannot shrink), zstd both ways. Driven by the same load
//! loop, connections and concurrency as the shard, it measures what gRPC, HTTP/2, zstd and
//! protobuf cost on this machine; `syncs_per_sec / echo_calls_per_sec` is the share of that
//! ceiling the shard keeps.

use super::random_pattern;
use omega_protocol::pb;
use omega_protocol::pb::constellation_server::{Constellation, ConstellationServer};
use omega_protocol::wire::grpc_zstd_size;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

/// Down budget of a real sync answer.
pub const ECHO_DOWN_BYTES: usize = 5 * 1024;

/// The echo service.
#[derive(Debug, Clone)]
pub struct Echo {
    response: pb::SyncResponse,
}

impl Echo {
    /// An echo answering a response of just under [`ECHO_DOWN_BYTES`] on the wire.
    pub fn new(model_id: &str) -> Self {
        let mut rng = StdRng::seed_from_u64(7);
        let mut response = pb::SyncResponse {
            global: Some(pb::GlobalPatterns {
                global_version: 1,
                model_id: model_id.into(),
                ..Default::default()
            }),
            acknowledged_version: 1,
            ..Default::default()
        };
        loop {
            let mut next = response.clone();
            if let Some(g) = next.global.as_mut() {
                g.similar.push(random_pattern(&mut rng, model_id, 0).to_wire());
            }
            if grpc_zstd_size(&next) > ECHO_DOWN_BYTES {
                break;
            }
            response = next;
        }
        Echo { response }
    }

    /// Bytes of the answer on the wire.
    pub fn response_bytes(&self) -> usize {
        grpc_zstd_size(&self.response)
    }
}

#[tonic::async_trait]
impl Constellation for Echo {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        Ok(Response::new(pb::RegisterResponse {
            device_token: format!("echo.{}", req.get_ref().device_id),
            ..Default::default()
        }))
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let mut r = self.response.clone();
        r.acknowledged_version = req.get_ref().delta.as_ref().map_or(0, |d| d.local_version);
        Ok(Response::new(r))
    }
}

/// Serves `echo` on a free loopback port until the process ends; returns its `http://` URL.
pub async fn serve(echo: Echo) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let svc = ConstellationServer::new(echo)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(omega_protocol::validate::MAX_MESSAGE_BYTES);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    Ok(url)
}
