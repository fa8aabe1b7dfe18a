//! `ShardAdmin`: what federation rounds and the operator call, on the internal port.
//!
//! - `ExportPatterns` streams quality patterns in id order, `batch_size` per message (capped
//!   at [`MAX_EXPORT_BATCH`]); each batch carries the id of its last pattern as the cursor, so
//!   a broken stream resumes with `after = cursor`. Owners appear only as a keyed hash
//!   (`source`, 16 bytes), stable within this shard.
//! - `PublishGlobal` validates and installs a round's aggregates and trends atomically;
//!   republishing a round id changes nothing (`applied = false`).
//! - `Stats` is `/api/v1/stats` over gRPC.

use super::{invalid, store_status};
use crate::service::Service;
use crate::state::AppState;
use crate::store::{MAX_GLOBAL_VERSION, Publish};
use omega_protocol::ValidationError;
use omega_protocol::pb;
use omega_protocol::pb::shard_admin_server::ShardAdmin;
use omega_protocol::validate;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Most patterns in one export batch.
pub const MAX_EXPORT_BATCH: u32 = 1000;
/// Batch size when the request leaves it 0.
pub const DEFAULT_EXPORT_BATCH: u32 = 500;
/// Most aggregates one publish may carry.
pub const MAX_PUBLISHED_PATTERNS: usize = 1_000_000;
/// Most trends one publish may carry.
pub const MAX_PUBLISHED_TRENDS: usize = 10_000;

/// The internal admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: Arc<AppState>,
    service: Service,
}

impl AdminService {
    /// A service over the use cases' state.
    pub fn new(service: Service) -> Self {
        AdminService { state: service.state().clone(), service }
    }
}

fn check_publish(r: &pb::PublishGlobalRequest, model_id: &str) -> Result<(), ValidationError> {
    validate::check_required_string("round_id", &r.round_id)?;
    if r.model_id != model_id {
        return Err(ValidationError::ModelMismatch {
            got: r.model_id.clone(),
            expected: model_id.into(),
        });
    }
    if r.global_version > MAX_GLOBAL_VERSION {
        return Err(ValidationError::OutOfRange {
            field: "global_version".into(),
            value: r.global_version as f64,
            min: 0.0,
            max: MAX_GLOBAL_VERSION as f64,
        });
    }
    if r.patterns.len() > MAX_PUBLISHED_PATTERNS {
        return Err(ValidationError::TooMany {
            field: "patterns".into(),
            got: r.patterns.len(),
            max: MAX_PUBLISHED_PATTERNS,
        });
    }
    if r.trends.len() > MAX_PUBLISHED_TRENDS {
        return Err(ValidationError::TooMany {
            field: "trends".into(),
            got: r.trends.len(),
            max: MAX_PUBLISHED_TRENDS,
        });
    }
    for (i, a) in r.patterns.iter().enumerate() {
        // k is the round's decision (FederationRound.minSources); a shard only refuses an
        // aggregate that claims no source at all.
        validate::check_aggregated(&format!("patterns[{i}]"), a, 1)?;
    }
    for (i, t) in r.trends.iter().enumerate() {
        validate::check_trend(&format!("trends[{i}]"), t)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl ShardAdmin for AdminService {
    type ExportPatternsStream = ReceiverStream<Result<pb::ExportBatch, Status>>;

    async fn export_patterns(
        &self,
        req: Request<pb::ExportPatternsRequest>,
    ) -> Result<Response<Self::ExportPatternsStream>, Status> {
        let r = req.into_inner();
        validate::check_rate("min_quality", r.min_quality).map_err(invalid)?;
        validate::check_string("round_id", &r.round_id).map_err(invalid)?;
        let mut cursor = match r.after.len() {
            0 => None,
            _ => Some(Uuid::from_slice(&r.after).map_err(|_| {
                invalid(ValidationError::BadId { field: "after".into(), got: r.after.len() })
            })?),
        };
        let batch = match r.batch_size {
            0 => DEFAULT_EXPORT_BATCH,
            n => n.min(MAX_EXPORT_BATCH),
        } as usize;
        let st = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            loop {
                let page = match st.store.export(cursor, batch, r.min_quality).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(store_status(e))).await;
                        return;
                    }
                };
                if let Some(last) = page.items.last() {
                    cursor = Uuid::from_slice(&last.pattern.id).ok();
                }
                let msg = pb::ExportBatch {
                    patterns: page
                        .items
                        .into_iter()
                        .map(|i| pb::ExportedPattern {
                            source: st.keys.source(&i.device_id),
                            pattern: Some(i.pattern),
                            region: i.region,
                        })
                        .collect(),
                    cursor: cursor.map(|c| c.as_bytes().to_vec()).unwrap_or_default(),
                    shard_id: st.settings.shard_id,
                    model_id: st.settings.model_id.clone(),
                    last: page.last,
                };
                if tx.send(Ok(msg)).await.is_err() || page.last {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn publish_global(
        &self,
        req: Request<pb::PublishGlobalRequest>,
    ) -> Result<Response<pb::PublishGlobalResponse>, Status> {
        let r = req.into_inner();
        check_publish(&r, &self.state.settings.model_id).map_err(invalid)?;
        let published = self
            .state
            .store
            .publish(Publish {
                round_id: r.round_id.clone(),
                global_version: r.global_version,
                patterns: r.patterns,
                trends: r.trends,
            })
            .await
            .map_err(store_status)?;
        tracing::info!(
            round_id = %r.round_id,
            applied = published.applied,
            global_version = published.global_version,
            "global patterns published"
        );
        Ok(Response::new(pb::PublishGlobalResponse {
            applied: published.applied,
            global_version: published.global_version,
        }))
    }

    async fn stats(
        &self,
        _req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let s = self.service.stats().await;
        Ok(Response::new(pb::StatsResponse {
            shard_id: s.shard_id,
            region: s.region,
            devices_total: s.devices_total,
            devices_active: s.devices_active,
            patterns: s.patterns,
            syncs_total: s.syncs_total,
            syncs_per_second: s.syncs_per_second,
            grpc_connections: s.grpc_connections,
            global_version: s.global_version,
            store: s.store,
            model_id: s.model_id,
            uptime_seconds: s.uptime_seconds,
        }))
    }
}
