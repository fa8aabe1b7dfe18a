//! Sync.
//!
//! A sync is checked in this order, cheapest first, so bad requests cost little: draining,
//! bearer token (revocation, HMAC in constant time, expiry: [`crate::tokens`]), rate limit, delta validation (`omega-protocol`), then
//! the store write. The response is assembled by [`crate::sync`].
//!
//! `similar` comes from one of two paths. With `COLLAB_SERVING` on, a published catalog of
//! collaborative item vectors, and at least one of the device's contents in it, the device
//! gets the next page of its collaborative list ([`crate::collab`]); otherwise, the nearest
//! patterns and aggregates to its interest vector (cached per device and global version).

use super::{Service, ServiceError};
use crate::collab::Page;
use crate::store::SimilarQuery;
use crate::sync::{self as logic, DOWN_BUDGET_BYTES, SIMILAR_CANDIDATES};
use omega_protocol::pb;
use omega_protocol::types::is_collaborative_vector;
use omega_protocol::validate::MIN_SHARED_QUALITY;
use omega_protocol::wire::grpc_zstd_size;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument as _;
use uuid::Uuid;

/// How a successful sync went, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOutcome(pub &'static str);

/// A sync's answer and how it went.
#[derive(Debug, Clone)]
pub struct SyncAnswer {
    /// The response message.
    pub response: pb::SyncResponse,
    /// `ok`, `replayed` or `pull`.
    pub outcome: SyncOutcome,
}

impl Service {
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
            interest,
            limit: SIMILAR_CANDIDATES,
            min_quality: MIN_SHARED_QUALITY,
            min_sources: st.settings.min_sources,
        };
        match st.store.similar(q).await {
            Ok(found) => {
                // Collaborative vectors are not MiniLM embeddings: their distance to an
                // interest vector means nothing, and they reach devices by collaborative
                // serving instead.
                let served: Arc<Vec<pb::Pattern>> = Arc::new(
                    found
                        .into_iter()
                        .filter(|s| !is_collaborative(&s.pattern))
                        .map(|s| logic::coarse_times(s.pattern))
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
        let catalog = match st
            .collab
            .catalog(st.store.as_ref(), version, st.settings.min_sources, now_ms)
            .await
        {
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

    /// Stores a device's delta and answers with global patterns, within the 5 KB budget.
    /// `token` is the bearer token the request carried, `peer` the client's address: a bad
    /// token counts against the peer's budget of failures ([`super::peer_key`]). Traced as
    /// `sync` with the children `validate`, `store.apply_sync`, `store.global`, `collab` and
    /// `similar` (docs/operations.md, "Tracing").
    #[tracing::instrument(
        name = "sync",
        skip_all,
        fields(trace_id = tracing::field::Empty, outcome = tracing::field::Empty)
    )]
    pub async fn sync(
        &self,
        token: Option<&str>,
        peer: Option<SocketAddr>,
        msg: pb::SyncRequest,
    ) -> Result<SyncAnswer, ServiceError> {
        omega_telemetry::record_trace_id(&tracing::Span::current());
        let st = &self.state;
        self.check_draining()?;
        let checked = match token {
            None => Err("missing `authorization: Bearer <token>`".to_owned()),
            Some(t) => st
                .tokens
                .check(&msg.device_id, t, crate::clock::now_secs())
                .map_err(|e| e.to_string()),
        };
        let accepted = match checked {
            Ok(a) => a,
            Err(why) => {
                st.auth_failures.allow(&super::peer_key(peer), Instant::now());
                return Err(ServiceError::Unauthenticated(why));
            }
        };
        st.metrics.observe_bytes("up", grpc_zstd_size(&msg));
        if !st.limiter.allow(&msg.device_id, Instant::now()) {
            return Err(ServiceError::RateLimited("per-device sync rate limit exceeded"));
        }
        let now_ms = crate::clock::now_ms();
        // No delta: the device has nothing to push and only pulls global patterns.
        let pull_only = msg.delta.is_none();
        let prepared = tracing::info_span!("validate").in_scope(|| match msg.delta {
            Some(delta) => logic::prepare(&msg.device_id, delta, &st.settings.model_id, now_ms),
            None => Ok(logic::Prepared::pull(&msg.device_id, now_ms)),
        })?;
        let added = prepared.write.added.len() as u64;
        let pushed: Vec<(i64, String)> = prepared
            .write
            .added
            .iter()
            .filter(|p| !p.content_id.is_empty())
            .map(|p| (p.updated_at_ms, p.content_id.clone()))
            .collect();
        let applied = st
            .store
            .apply_sync(prepared.write)
            .instrument(tracing::info_span!("store.apply_sync"))
            .await?;
        if applied.applied {
            st.metrics.patterns_stored.inc_by(added);
            st.metrics.patterns_filtered.inc_by(u64::from(prepared.filtered));
        }
        let global = st.store.global().instrument(tracing::info_span!("store.global")).await?;
        let page = self
            .collab_page(&msg.device_id, pushed, global.version, now_ms)
            .instrument(tracing::info_span!("collab"))
            .await;
        let similar = match &page {
            Some(p) => p.patterns.clone(),
            None => self
                .similar(&msg.device_id, applied.interest, global.version)
                .instrument(tracing::info_span!("similar"))
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
            renewed_token: if accepted.renew {
                st.tokens.issue(&msg.device_id, crate::clock::now_secs())
            } else {
                String::new()
            },
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
        let outcome = match (pull_only, applied.applied) {
            (true, _) => "pull",
            (false, true) => "ok",
            (false, false) => "replayed",
        };
        tracing::Span::current().record("outcome", outcome);
        tracing::debug!(outcome, bytes = fitted.wire_bytes, "sync answered");
        Ok(SyncAnswer { response: resp, outcome: SyncOutcome(outcome) })
    }
}

fn is_collaborative(p: &pb::Pattern) -> bool {
    Uuid::from_slice(&p.id).is_ok_and(|id| is_collaborative_vector(&id, &p.content_id))
}
