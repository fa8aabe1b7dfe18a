//! The device-facing use cases, free of any transport: registration ([`register`]), sync
//! ([`sync`]) and the shard's statistics ([`stats`]).
//!
//! A transport (gRPC today, a browser JSON transport later) decodes its request into the
//! protocol messages, calls [`Service`], and maps [`ServiceError`] to its own status codes;
//! nothing here knows about HTTP, gRPC metadata or status codes.

mod register;
mod stats;
mod sync;

pub use register::{RegisterInput, SYNC_INTERVAL_SECS, peer_key};
pub use sync::{SyncAnswer, SyncOutcome};

use crate::state::AppState;
use crate::store::StoreError;
use omega_protocol::ValidationError;
use std::sync::Arc;

/// Why a use case refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The shard is draining (SIGTERM): the client should retry on another replica.
    #[error("shard is shutting down; retry on another replica")]
    Draining,
    /// A rate limit refused the request.
    #[error("{0}")]
    RateLimited(&'static str),
    /// The request carries no token, or one that does not match its device.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is authenticated (or needs no authentication) but may not do this: a new
    /// registration without a valid enrolment secret.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The request is malformed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The use cases over the shared state.
#[derive(Debug, Clone)]
pub struct Service {
    state: Arc<AppState>,
}

impl Service {
    /// The use cases over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Service { state }
    }

    /// The shared state (transports read settings and metrics from it).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    fn check_draining(&self) -> Result<(), ServiceError> {
        if self.state.draining.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ServiceError::Draining);
        }
        Ok(())
    }
}
