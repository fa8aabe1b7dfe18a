//! The checks a device request passes on its headers alone, before tonic reads (and
//! decompresses) its body: what costs memory is spent only on requests that may succeed.
//!
//! - a draining shard answers UNAVAILABLE;
//! - a client address past its budget of bad tokens (`AUTH_FAILURES_PER_MINUTE`) gets
//!   RESOURCE_EXHAUSTED;
//! - a Sync without a well-formed bearer token ([`crate::tokens::well_formed`]) gets
//!   UNAUTHENTICATED, and counts against that budget.
//!
//! The token itself is verified by the service: it is keyed on the device id, which only the
//! body carries.

use super::{BoxFuture, SYNC_PATH};
use crate::auth;
use crate::service::peer_key;
use crate::state::AppState;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::TcpConnectInfo;

/// Tower layer applying the checks above.
#[derive(Debug, Clone)]
pub struct DeviceGateLayer {
    state: Arc<AppState>,
}

impl DeviceGateLayer {
    /// A gate over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        DeviceGateLayer { state }
    }
}

impl<S> tower::Layer<S> for DeviceGateLayer {
    type Service = DeviceGate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DeviceGate { inner, state: self.state.clone() }
    }
}

/// See [`DeviceGateLayer`].
#[derive(Debug, Clone)]
pub struct DeviceGate<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S> DeviceGate<S> {
    fn refusal<B>(&self, req: &http::Request<B>) -> Option<Status> {
        let st = &self.state;
        if st.draining.load(Ordering::Acquire) {
            return Some(Status::unavailable("shard is shutting down; retry on another replica"));
        }
        let peer = req.extensions().get::<TcpConnectInfo>().and_then(|i| i.remote_addr());
        let key = peer_key(peer);
        let now = Instant::now();
        if !st.auth_failures.has_tokens(&key, now) {
            return Some(Status::resource_exhausted(
                "too many requests with a bad token from this client address; retry later",
            ));
        }
        if req.uri().path() == SYNC_PATH {
            let well_formed = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(auth::bearer)
                .is_some_and(crate::tokens::well_formed);
            if !well_formed {
                st.auth_failures.allow(&key, now);
                return Some(Status::unauthenticated(
                    "missing or malformed `authorization: Bearer <token>`",
                ));
            }
        }
        None
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for DeviceGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.refusal(&req) {
            // The body is dropped unread: the client's stream is reset after the answer.
            Some(status) => Box::pin(async move { Ok(status.into_http()) }),
            None => Box::pin(self.inner.call(req)),
        }
    }
}
