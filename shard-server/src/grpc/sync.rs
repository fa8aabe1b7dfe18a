//! `Constellation`: device registration and sync.
//!
//! A registration is checked per client address against `REGISTER_RATE_*` first. A new
//! device id gets its token; an id that is registered already gets it only when the request
//! carries that token (`authorization: Bearer …`), since the token is derived from the id
//! alone and would otherwise be handed to anyone who names the id.
//!
//! A sync is checked in this order, cheapest first, so bad requests cost little: draining,
//! bearer token (HMAC, constant time), rate limit, delta validation (`omega-protocol`), then
//! the store write. The response is assembled by [`crate::sync`].
//!
//! `similar` comes from one of two paths. With `COLLAB_SERVING` on, a published catalog of
//! collaborative item vectors, and at least one of the device's contents in it, the device
//! gets the next page of its collaborative list ([`crate::collab`]); otherwise, the nearest
//! patterns and aggregates to its interest vector (cached per device and global version).

use super::{SyncOutcome, invalid, store_status};
use crate::auth;
use crate::collab::Page;
use crate::state::AppState;
use crate::store::SimilarQuery;
use crate::sync::{self as logic, DOWN_BUDGET_BYTES, SIMILAR_CANDIDATES};
use omega_protocol::pb;
use omega_protocol::pb::constellation_server::Constellation;
use omega_protocol::types::is_collaborative_vector;
use omega_protocol::validate::{self, MIN_SHARED_QUALITY};
use omega_protocol::wire::grpc_zstd_size;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Default sync interval bounds handed to devices at registration.
pub const SYNC_INTERVAL_SECS: (u32, u32) = (300, 900);

/// The device-facing service.
#[derive(Debug, Clone)]
pub struct ConstellationService {
    state: Arc<AppState>,
}

impl ConstellationService {
    /// A service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        ConstellationService { state }
    }

    async fn similar(
        &self,
        device_id: &str,
        interest: Option<Vec<f32>>,
        version: u64,
    ) -> Arc<Vec<pb::Pattern>> {
        let st = &self.state;
        let now = Instant::now();
        if let Some(hit) = st.similar.get(device_id, version, now) {
            st.metrics.similar_cache_hits.inc();
            return hit;
        }
        let Some(interest) = interest else { return Arc::default() };
        let q = SimilarQuery {
            device_id: device_id.to_owned(),
            interest,
            limit: SIMILAR_CANDIDATES,
            min_quality: MIN_SHARED_QUALITY,
        };
        match st.store.similar(q).await {
            Ok(found) => {
                // Collaborative vectors are not MiniLM embeddings: their distance to an
                // interest vector means nothing, and they reach devices by collaborative
                // serving instead.
                let served: Arc<Vec<pb::Pattern>> = Arc::new(
                    found
                        .into_iter()
                        .filter(|s| !(s.aggregate && is_collaborative(&s.pattern)))
                        .map(|s| logic::anonymize(s.pattern, &st.keys, s.aggregate))
                        .collect(),
                );
                // An empty answer is not cached: on a young shard (or before the Postgres
                // merge has indexed anything) the next sync should look again.
                if !served.is_empty() {
                    st.similar.put(device_id, version, now, served.clone());
                }
                served
            }
            Err(e) => {
                // The write is durable already; an answer without `similar` beats a retry.
                tracing::warn!(error = %e, "similarity query failed; answering without similar");
                Arc::default()
            }
        }
    }

    /// The collaborative page for `device_id`, or `None` when that path does not apply
    /// (switched off, nothing published, no content of the device in the catalog) or a store
    /// read failed (logged; the interest-based path answers instead).
    async fn collab_page(
        &self,
        device_id: &str,
        pushed: Vec<(i64, String)>,
        version: u64,
        now_ms: i64,
    ) -> Option<Page> {
        let st = &self.state;
        if !st.settings.collab_serving {
            return None;
        }
        let catalog = match st.collab.catalog(st.store.as_ref(), version, &st.keys, now_ms).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading aggregates failed; serving by interest");
                return None;
            }
        };
        if catalog.is_empty() {
            return None;
        }
        let stored = match st.store.device_contents(device_id).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading device contents failed; serving by interest");
                return None;
            }
        };
        // This sync's own patterns count at once (Postgres shows them after the merge), and
        // they are the newest: they lead the order the query weighs contents in.
        let mut pushed = pushed;
        pushed.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut contents: Vec<String> = pushed.into_iter().map(|(_, c)| c).collect();
        contents.extend(stored);
        st.collab.page(&catalog, device_id, &contents)
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

/// The key registrations are rate-limited by: the client's IPv4 address, or its IPv6 /64
/// (one subscriber usually holds a whole /64, so single addresses would cost nothing to vary).
pub fn peer_key(addr: Option<SocketAddr>) -> String {
    match addr.map(|a| a.ip().to_canonical()) {
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Some(IpAddr::V4(v4)) => v4.to_string(),
        None => "unknown".into(),
    }
}

fn is_collaborative(p: &pb::Pattern) -> bool {
    Uuid::from_slice(&p.id).is_ok_and(|id| is_collaborative_vector(&id, &p.content_id))
}

fn check_draining(st: &AppState) -> Result<(), Status> {
    if st.draining.load(Ordering::Acquire) {
        return Err(Status::unavailable("shard is shutting down; retry on another replica"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Constellation for ConstellationService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let st = &self.state;
        check_draining(st)?;
        if !st.register_limiter.allow(&peer_key(req.remote_addr()), Instant::now()) {
            return Err(Status::resource_exhausted(
                "registration rate limit exceeded for this client address; retry later",
            ));
        }
        let token = presented_token(&req);
        let r = req.into_inner();
        validate::check_register(&r).map_err(invalid)?;
        if let Some(t) = &token
            && !st.keys.verify(&r.device_id, t)
        {
            return Err(Status::unauthenticated("the bearer token does not match device_id"));
        }
        let region = if r.region.is_empty() { st.settings.region.clone() } else { r.region };
        let reg = st
            .store
            .register(&r.device_id, &region, st.settings.max_devices, crate::server::now_ms())
            .await
            .map_err(store_status)?;
        // The token is a function of the id alone: handing it out again for an existing id
        // would let anyone who knows (or guesses) a device id act as that device.
        if !reg.created && token.is_none() {
            return Err(Status::unauthenticated(
                "device_id is already registered: registering it again needs its token in \
                 `authorization: Bearer <token>`",
            ));
        }
        if reg.created {
            tracing::debug!(region = %reg.region, "device registered");
        }
        Ok(Response::new(pb::RegisterResponse {
            device_token: st.keys.token(&r.device_id),
            shard_id: st.settings.shard_id,
            region: reg.region,
            model_id: st.settings.model_id.clone(),
            sync_interval_min_secs: SYNC_INTERVAL_SECS.0,
            sync_interval_max_secs: SYNC_INTERVAL_SECS.1,
        }))
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let st = &self.state;
        check_draining(st)?;
        let token = presented_token(&req)
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
        let msg = req.into_inner();
        if !st.keys.verify(&msg.device_id, &token) {
            return Err(Status::unauthenticated("the device token does not match device_id"));
        }
        st.metrics.observe_bytes("up", grpc_zstd_size(&msg));
        if !st.limiter.allow(&msg.device_id, Instant::now()) {
            return Err(Status::resource_exhausted("per-device sync rate limit exceeded"));
        }
        let now_ms = crate::server::now_ms();
        // No delta: the device has nothing to push and only pulls global patterns.
        let pull_only = msg.delta.is_none();
        let prepared = match msg.delta {
            Some(delta) => logic::prepare(&msg.device_id, delta, &st.settings.model_id, now_ms)
                .map_err(invalid)?,
            None => logic::Prepared::pull(&msg.device_id, now_ms),
        };
        let added = prepared.write.added.len() as u64;
        let pushed: Vec<(i64, String)> = prepared
            .write
            .added
            .iter()
            .filter(|p| !p.content_id.is_empty())
            .map(|p| (p.updated_at_ms, p.content_id.clone()))
            .collect();
        let applied = st.store.apply_sync(prepared.write).await.map_err(store_status)?;
        if applied.applied {
            st.metrics.patterns_stored.inc_by(added);
            st.metrics.patterns_filtered.inc_by(u64::from(prepared.filtered));
        }
        let global = st.store.global().await.map_err(store_status)?;
        let page = self.collab_page(&msg.device_id, pushed, global.version, now_ms).await;
        let similar = match &page {
            Some(p) => p.patterns.clone(),
            None => self
                .similar(&msg.device_id, applied.interest, global.version)
                .await
                .as_ref()
                .clone(),
        };
        let trends: Vec<pb::TrendSignal> = global
            .trends
            .into_iter()
            .filter(|t| t.region.is_empty() || t.region == applied.region)
            .collect();
        let mut resp = pb::SyncResponse {
            global: Some(pb::GlobalPatterns {
                similar: Vec::new(),
                trending: Vec::new(),
                global_version: global.version,
                model_id: st.settings.model_id.clone(),
            }),
            acknowledged_version: applied.acknowledged_version,
            patterns_accepted: if applied.applied { prepared.accepted } else { 0 },
            patterns_filtered: if applied.applied { prepared.filtered } else { 0 },
            replayed: !applied.applied && !pull_only,
        };
        let fitted = logic::fit(&mut resp, similar, trends, DOWN_BUDGET_BYTES);
        if let Some(page) = &page {
            // `fit` keeps a prefix of the candidates (it may add one later item when
            // compression left room): the cursor moves past the prefix that was sent.
            let (sent, prefix) = resp.global.as_ref().map_or((0, 0), |g| {
                let prefix =
                    g.similar.iter().zip(&page.patterns).take_while(|(a, b)| a == b).count();
                (g.similar.len(), prefix)
            });
            st.collab.served(&msg.device_id, page, prefix);
            st.metrics.collab_served.inc_by(sent as u64);
        }
        st.metrics.observe_bytes("down", fitted.wire_bytes);
        st.count_sync();
        let mut out = Response::new(resp);
        let outcome = match (pull_only, applied.applied) {
            (true, _) => "pull",
            (false, true) => "ok",
            (false, false) => "replayed",
        };
        out.extensions_mut().insert(SyncOutcome(outcome));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::peer_key;

    #[test]
    fn registrations_are_limited_per_ipv4_address_and_per_ipv6_64() {
        let key = |a: &str| peer_key(Some(a.parse().expect("addr")));
        assert_eq!(key("203.0.113.7:4000"), "203.0.113.7");
        assert_eq!(key("203.0.113.7:4000"), key("203.0.113.7:5000"), "ports do not matter");
        assert_ne!(key("203.0.113.7:1"), key("203.0.113.8:1"));
        assert_eq!(key("[2001:db8:1:2:aaaa::1]:1"), "2001:db8:1:2::/64");
        assert_eq!(key("[2001:db8:1:2:aaaa::1]:1"), key("[2001:db8:1:2:ffff::9]:1"));
        assert_ne!(key("[2001:db8:1:2::1]:1"), key("[2001:db8:1:3::1]:1"));
        assert_eq!(key("[::ffff:198.51.100.4]:1"), "198.51.100.4", "IPv4-mapped is IPv4");
        assert_eq!(peer_key(None), "unknown");
    }
}
