//! `Constellation`: device registration and sync over gRPC. Each method reads the bearer
//! token and peer address from the request, calls [`crate::service::Service`] and maps its
//! error to a status ([`super::service_status`]).

use super::service_status;
use crate::auth;
use crate::service::{RegisterInput, Service};
use omega_protocol::pb;
use omega_protocol::pb::constellation_server::Constellation;
use tonic::{Request, Response, Status};

/// The device-facing gRPC service.
#[derive(Debug, Clone)]
pub struct ConstellationService {
    service: Service,
}

impl ConstellationService {
    /// A gRPC adapter over `service`.
    pub fn new(service: Service) -> Self {
        ConstellationService { service }
    }
}

/// The bearer token a request carries, if any.
fn presented_token<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
        .map(str::to_owned)
}

#[tonic::async_trait]
impl Constellation for ConstellationService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let token = presented_token(&req);
        let peer = req.remote_addr();
        let input = RegisterInput { request: req.into_inner(), token, peer };
        self.service.register(input).await.map(Response::new).map_err(service_status)
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let token = presented_token(&req);
        let peer = req.remote_addr();
        let answer = self
            .service
            .sync(token.as_deref(), peer, req.into_inner())
            .await
            .map_err(service_status)?;
        let mut out = Response::new(answer.response);
        out.extensions_mut().insert(answer.outcome);
        Ok(out)
    }
}
