//! Ordered deletion behind the Shard's finalizer:
//! 1. delete the constellation StatefulSet and wait until its pods are gone (no server writes
//!    to the database any more);
//! 2. delete the database (StatefulSet or CNPG Cluster) and wait for its pods;
//! 3. `volumePolicy: Delete` deletes the database PVCs; `Retain` keeps them and orphans the
//!    password and device-token Secrets so a re-created Shard finds its data usable;
//! 4. remove the finalizer; owner references garbage-collect the rest.

use super::resources::{self, Ctx};
use super::{CONTROLLER, key};
use crate::apply::{apply, apply_finalizers, apply_status, delete_if_present, dynamic_api, served};
use crate::context::Context;
use crate::crd::{PostgresMode, Shard, ShardPhase, VolumePolicy};
use crate::{Result, SHARD_FINALIZER};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use std::time::Duration;
use tracing::info;

const WAIT: Duration = Duration::from_secs(2);

pub(super) async fn run(shard: &Shard, ctx: &Context) -> Result<Action> {
    if !shard.finalizers().iter().any(|f| f == SHARD_FINALIZER) {
        return Ok(Action::await_change());
    }
    let client = &ctx.client;
    let cx = Ctx::of(shard)?;
    let ns = cx.namespace.clone();
    let reference = shard.object_ref(&());
    let shards: Api<Shard> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    let mut status = shard.status.clone().unwrap_or_default();
    if status.phase != Some(ShardPhase::Terminating) {
        status.phase = Some(ShardPhase::Terminating);
        apply_status(&shards, &shard.name_any(), &status).await?;
    }

    // 1. Servers first.
    if delete_if_present(&sets, &cx.names.shard).await? {
        ctx.event(
            &reference,
            false,
            "DeletingServers",
            "Delete",
            "stopping the constellation StatefulSet",
        )
        .await;
        return Ok(Action::requeue(WAIT));
    }
    let left = pods
        .list(&ListParams::default().labels(&cx.selector_string("constellation")))
        .await?
        .items
        .len();
    if left > 0 {
        info!(shard = %key(shard), left, "waiting for servers to stop");
        return Ok(Action::requeue(WAIT));
    }

    // 2. Then the database.
    let db_selector = match shard.spec.postgres.mode {
        PostgresMode::Managed => {
            if delete_if_present(&sets, &cx.names.postgres).await? {
                ctx.event(
                    &reference,
                    false,
                    "DeletingDatabase",
                    "Delete",
                    "servers stopped; stopping Postgres",
                )
                .await;
                return Ok(Action::requeue(WAIT));
            }
            Some(cx.selector_string("postgres"))
        }
        PostgresMode::Cloudnativepg => {
            if served(client, "postgresql.cnpg.io/v1", "clusters").await? {
                let api =
                    dynamic_api(client, &ns, "postgresql.cnpg.io", "v1", "Cluster", "clusters");
                if delete_if_present(&api, &cx.names.postgres).await? {
                    ctx.event(
                        &reference,
                        false,
                        "DeletingDatabase",
                        "Delete",
                        "servers stopped; deleting the CNPG Cluster",
                    )
                    .await;
                    return Ok(Action::requeue(WAIT));
                }
            }
            Some(format!("cnpg.io/cluster={}", cx.names.postgres))
        }
        PostgresMode::External => None,
    };
    if let Some(sel) = &db_selector
        && !pods.list(&ListParams::default().labels(sel)).await?.items.is_empty()
    {
        return Ok(Action::requeue(WAIT));
    }

    // 3. Volumes and the Secrets their data needs.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let data_secrets = [cx.names.device_token.clone(), cx.names.postgres_secret.clone()];
    match (shard.spec.postgres.volume_policy, &db_selector) {
        (VolumePolicy::Delete, Some(sel)) => {
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
            let n = pvcs.list(&ListParams::default().labels(sel)).await?.items.len();
            if n > 0 {
                pvcs.delete_collection(
                    &DeleteParams::background(),
                    &ListParams::default().labels(sel),
                )
                .await?;
                ctx.event(
                    &reference,
                    false,
                    "VolumesDeleted",
                    "Delete",
                    format!("deleted {n} database volume claim(s)"),
                )
                .await;
            }
        }
        (VolumePolicy::Retain, _) => {
            for name in &data_secrets {
                if let Some(s) = secrets.get_opt(name).await? {
                    let data = s.data.unwrap_or_default();
                    apply(&secrets, &resources::secret(&cx, name, data, false)).await?;
                }
            }
            ctx.event(
                &reference,
                false,
                "VolumesRetained",
                "Delete",
                "database volumes and their Secrets are kept (volumePolicy: Retain)",
            )
            .await;
        }
        (VolumePolicy::Delete, None) => {}
    }

    // 4. Done: let the API server finish the deletion.
    apply_finalizers(&shards, &shard.name_any(), &[]).await?;
    info!(shard = %key(shard), controller = CONTROLLER, "cleanup finished");
    ctx.forget(&key(shard));
    Ok(Action::await_change())
}
