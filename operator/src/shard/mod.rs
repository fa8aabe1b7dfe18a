//! The Shard controller: database, constellation StatefulSet, Services, PDB, NetworkPolicies,
//! Secrets and ServiceMonitor from a `Shard`, plus status, Events, autoscaling and ordered
//! deletion behind a finalizer.

pub mod autoscale;
pub mod backup;
mod cleanup;
pub mod postgres;
pub mod resources;
pub mod stats;
pub mod status;

use crate::apply::{apply, apply_finalizers, apply_status, apply_value, dynamic_api, served};
use crate::conditions;
use crate::context::Context;
use crate::crd::{PostgresMode, Shard, ShardEndpoints, ShardPhase, ShardStatus};
use crate::{Error, Result, SHARD_FINALIZER};
use autoscale::PodLoad;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use rand::Rng;
use rand::distr::Alphanumeric;
use resources::Ctx;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Controller name in metrics.
pub const CONTROLLER: &str = "shard";
const TOKEN_KEY: &str = "OMEGA_DEVICE_SECRET";

/// Runs the Shard controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (shards, sets): (Api<Shard>, Api<StatefulSet>) = match &ctx.settings.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let controller = Controller::new(shards, watcher::Config::default().any_semantic()).owns(
        sets,
        watcher::Config::default()
            .labels("app.kubernetes.io/managed-by=omega-operator")
            .any_semantic(),
    );
    ctx.metrics.watch_degraded(
        CONTROLLER,
        conditions::degraded_source(controller.store(), |s: &Shard| {
            s.status.as_ref().map(|s| s.conditions.as_slice())
        }),
    );
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "shard controller");
            }
        })
        .await;
}

fn key(shard: &Shard) -> String {
    format!("shard/{}/{}", shard.namespace().unwrap_or_default(), shard.name_any())
}

/// Backoff after a failed reconcile, counted per object.
pub fn error_policy(shard: Arc<Shard>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(CONTROLLER, error);
    let delay = ctx.backoff(&key(&shard));
    warn!(shard = %key(&shard), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// One reconcile of one Shard.
#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(controller = CONTROLLER, object = %key(&shard), trace_id = tracing::field::Empty)
)]
pub async fn reconcile(shard: Arc<Shard>, ctx: Arc<Context>) -> Result<Action> {
    omega_telemetry::record_trace_id(&tracing::Span::current());
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let ns = shard.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let shards: Api<Shard> = Api::namespaced(ctx.client.clone(), &ns);
    if shard.meta().deletion_timestamp.is_some() {
        return cleanup::run(&shard, &ctx).await;
    }
    let result = async {
        if !shard.finalizers().iter().any(|f| f == SHARD_FINALIZER) {
            apply_finalizers(&shards, &shard.name_any(), &[SHARD_FINALIZER]).await?;
        }
        converge(&shard, &ctx, &ns).await
    }
    .await;
    match result.as_ref().err().and_then(Error::rejection) {
        // Retrying the same object cannot help: say so in status and an Event, and let the
        // error policy back off until the spec changes.
        Some(message) => {
            refused(&shard, &ctx, &shards, &message).await?;
            Err(Error::Rejected(message))
        }
        None => result,
    }
}

/// Records that the API server refused an object generated from the spec.
async fn refused(shard: &Shard, ctx: &Context, shards: &Api<Shard>, message: &str) -> Result<()> {
    let previous = shard.status.clone().unwrap_or_default();
    let (phase, wants) = status::refused(message);
    let generation = shard.meta().generation.unwrap_or(0);
    let next = ShardStatus {
        phase: Some(phase),
        conditions: conditions::merge(
            &previous.conditions,
            &wants,
            generation,
            &Time(Timestamp::now()),
        ),
        observed_generation: Some(generation),
        ..previous.clone()
    };
    publish_transitions(ctx, &shard.object_ref(&()), &previous, &next).await;
    if next != previous {
        apply_status(shards, &shard.name_any(), &next).await?;
    }
    Ok(())
}

/// Applies everything and writes status; returns when to look again.
async fn converge(shard: &Shard, ctx: &Context, ns: &str) -> Result<Action> {
    let client = &ctx.client;
    let cx = Ctx::of(shard)?;
    let now = Timestamp::now();
    let reference = shard.object_ref(&());
    let previous = shard.status.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);

    // Secrets whose values must survive reconciles: keep what exists, generate once.
    let token = existing_or_new(&secrets, &cx.names.device_token, TOKEN_KEY).await?;
    apply(
        &secrets,
        &resources::secret(
            &cx,
            &cx.names.device_token,
            BTreeMap::from([(TOKEN_KEY.into(), token)]),
            true,
        ),
    )
    .await?;

    let admin =
        existing_or_new(&secrets, resources::ADMIN_SECRET, resources::ADMIN_TOKEN_KEY).await?;
    apply(&secrets, &resources::admin_secret(ns, admin)).await?;

    let db = database(shard, ctx, &cx, ns, &secrets).await?;
    let blocked = db.blocked.clone();
    let backup = backup::plan(shard, &cx);

    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let existing = sets.get_opt(&cx.names.shard).await?;
    let current = existing
        .as_ref()
        .and_then(|s| s.spec.as_ref()?.replicas)
        .unwrap_or(shard.spec.replicas.min);
    let server_pods =
        pods.list(&ListParams::default().labels(&cx.selector_string("constellation"))).await?.items;

    // Load is read every `stats_interval`; reconciles in between (watch events) reuse it.
    let state = previous.autoscaler.clone().unwrap_or_default();
    let (mut syncs, mut active_devices) = (previous.syncs_per_second, previous.active_devices);
    let (replicas, autoscaler) = if blocked.is_some() {
        (current, state)
    } else if ctx.evaluation_due(&key(shard)) {
        let (stats, errors) = stats::collect(ctx, &server_pods).await;
        for e in &errors {
            warn!(shard = %key(shard), error = %e, "stats");
        }
        syncs = stats.iter().map(|s| s.syncs_per_second).sum();
        active_devices =
            i64::try_from(stats.iter().map(|s| s.devices_active).sum::<u64>()).unwrap_or(i64::MAX);
        let loads: Vec<PodLoad> = stats
            .iter()
            .map(|s| PodLoad {
                syncs_per_second: s.syncs_per_second,
                connections: s.grpc_connections,
            })
            .collect();
        let d = autoscale::decide(
            now,
            current,
            Some(&loads),
            errors.len(),
            &shard.spec.replicas,
            &shard.spec.autoscaling,
            &state,
        );
        if d.replicas != current && existing.is_some() {
            info!(shard = %key(shard), from = current, to = d.replicas, "{}", d.message);
            ctx.event(&reference, false, d.reason.as_str(), "Scale", d.message.clone()).await;
        }
        (d.replicas, d.state)
    } else {
        (
            current.clamp(
                shard.spec.replicas.min,
                shard.spec.replicas.max.max(shard.spec.replicas.min),
            ),
            state,
        )
    };

    if blocked.is_none() {
        let db = postgres::database(shard, &cx);
        let sts = resources::constellation(shard, &cx, replicas, &db, &cx.names.device_token);
        apply(&sets, &sts).await?;
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        for svc in resources::services(shard, &cx) {
            apply(&services, &svc).await?;
        }
        apply(
            &Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
            &resources::disruption_budget(&cx),
        )
        .await?;
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
        for p in resources::network_policies(shard, &cx, &ctx.settings.operator_namespace) {
            apply(&policies, &p).await?;
        }
        let had_backup = conditions::is_true(&previous.conditions, backup::BACKUP_SCHEDULED);
        backups(&backup, had_backup, ctx, &cx, ns).await?;
        if shard.spec.service_monitor
            && served(client, "monitoring.coreos.com/v1", "servicemonitors").await?
        {
            let api = dynamic_api(
                client,
                ns,
                "monitoring.coreos.com",
                "v1",
                "ServiceMonitor",
                "servicemonitors",
            );
            apply_value(&api, &resources::service_monitor(&cx)).await?;
        }
    }

    let ready = existing.as_ref().and_then(|s| s.status.as_ref()?.ready_replicas).unwrap_or(0);
    let facts = status::Facts {
        blocked: blocked.clone(),
        // A database that cannot start is as stuck as servers that cannot.
        stuck: db.stuck.clone().or_else(|| stats::stuck_reason(&server_pods)),
        database_ready: db.ready,
        wanted: replicas,
        ready: ready.min(replicas),
        note: db.note.clone(),
    };
    let (phase, mut wants) = status::assess(&facts);
    wants.extend(status::backup(
        &backup,
        shard.spec.backup.as_ref(),
        conditions::find(&previous.conditions, backup::BACKUP_SCHEDULED).is_some(),
    ));
    let generation = shard.meta().generation.unwrap_or(0);
    let next = ShardStatus {
        phase: Some(phase),
        conditions: conditions::merge(&previous.conditions, &wants, generation, &Time(now)),
        observed_generation: Some(generation),
        replicas,
        ready_replicas: facts.ready,
        active_devices,
        syncs_per_second: (syncs * 100.0).round() / 100.0,
        endpoints: Some(ShardEndpoints {
            grpc: cx.grpc_endpoint(),
            admin: cx.admin_endpoint(),
            rest: cx.rest_endpoint(),
        }),
        selector: Some(cx.selector_string("constellation")),
        autoscaler: Some(autoscaler),
    };
    publish_transitions(ctx, &reference, &previous, &next).await;
    if next != previous {
        apply_status(&Api::<Shard>::namespaced(client.clone(), ns), &shard.name_any(), &next)
            .await?;
    }

    if let Some((reason, message)) = blocked.or(facts.stuck) {
        let delay = ctx.backoff(&key(shard));
        warn!(shard = %key(shard), reason, message, retry_in = ?delay, "shard degraded");
        return Ok(Action::requeue(delay));
    }
    ctx.reset_backoff(&key(shard));
    let wait = if phase == ShardPhase::Running {
        ctx.settings.stats_interval
    } else {
        Duration::from_secs(5)
    };
    Ok(Action::requeue(wait.min(ctx.settings.stats_interval)))
}

/// Events for condition changes (one per transition, not per reconcile).
async fn publish_transitions(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    previous: &ShardStatus,
    next: &ShardStatus,
) {
    for c in &next.conditions {
        let before = conditions::find(&previous.conditions, &c.type_);
        let changed = before.is_none_or(|b| b.status != c.status || b.reason != c.reason);
        let interesting = match c.type_.as_str() {
            conditions::DEGRADED => c.status == "True",
            backup::BACKUP_SCHEDULED => c.status == "False" && c.reason != status::NO_BACKUP,
            conditions::READY => true,
            _ => false,
        };
        if changed
            && interesting
            && !(c.type_ == conditions::READY && before.is_none() && c.status == "False")
        {
            let warning = c.type_ == conditions::DEGRADED || c.status == "False";
            let note = if c.message.is_empty() { c.reason.clone() } else { c.message.clone() };
            ctx.event(reference, warning, &c.reason, "Reconcile", note).await;
        }
    }
}

/// Applies the backup objects of the plan. Without a plan (none wanted, or an invalid spec)
/// after backups were scheduled (`had_backup`), removes the schedule, never the volume holding
/// earlier dumps. A Shard that never asked for backups costs no API call here.
async fn backups(
    plan: &std::result::Result<Option<backup::Plan>, backup::Invalid>,
    had_backup: bool,
    ctx: &Context,
    cx: &Ctx,
    ns: &str,
) -> Result<()> {
    let client = &ctx.client;
    let cron_jobs: Api<CronJob> = Api::namespaced(client.clone(), ns);
    let scheduled = || {
        dynamic_api(client, ns, "postgresql.cnpg.io", "v1", "ScheduledBackup", "scheduledbackups")
    };
    let name = backup::name(cx);
    match plan {
        Ok(Some(backup::Plan::Managed { volume, cron_job })) => {
            apply(&Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns), volume).await?;
            apply(&cron_jobs, cron_job).await?;
        }
        // Without CloudNativePG the Shard is Degraded (CloudNativePGNotInstalled) already.
        Ok(Some(backup::Plan::Cnpg { scheduled: s, .. })) => {
            if served(client, "postgresql.cnpg.io/v1", "scheduledbackups").await? {
                apply_value(&scheduled(), s).await?;
            }
        }
        Ok(None) | Err(_) if had_backup => {
            if cron_jobs.get_opt(&name).await?.is_some() {
                cron_jobs.delete(&name, &DeleteParams::background()).await?;
            }
            if served(client, "postgresql.cnpg.io/v1", "scheduledbackups").await? {
                let api = scheduled();
                if api.get_opt(&name).await?.is_some() {
                    api.delete(&name, &DeleteParams::background()).await?;
                }
            }
        }
        Ok(None) | Err(_) => {}
    }
    Ok(())
}

/// What [`database`] found.
#[derive(Debug, Default)]
struct DbState {
    /// The spec cannot be satisfied (reason, message): no servers are started.
    blocked: Option<(String, String)>,
    /// A database pod cannot start (reason, message): image pull failure, crash loop.
    stuck: Option<(String, String)>,
    /// The database reports ready.
    ready: bool,
    /// Extra note for the Ready condition.
    note: Option<String>,
}

/// Why the database pods matching `selector` cannot start, if they cannot.
async fn database_stuck(pods: &Api<Pod>, selector: &str) -> Result<Option<(String, String)>> {
    let list = pods.list(&ListParams::default().labels(selector)).await?.items;
    Ok(stats::stuck_reason(&list).map(|(reason, message)| (reason, format!("database: {message}"))))
}

/// Ensures the database of the spec's mode.
async fn database(
    shard: &Shard,
    ctx: &Context,
    cx: &Ctx,
    ns: &str,
    secrets: &Api<Secret>,
) -> Result<DbState> {
    let client = &ctx.client;
    let pg = &shard.spec.postgres;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    match pg.mode {
        PostgresMode::Managed => {
            let existing = secrets.get_opt(&cx.names.postgres_secret).await?;
            let password = existing
                .as_ref()
                .and_then(|s| s.data.as_ref()?.get("password").cloned())
                .and_then(|b| String::from_utf8(b.0).ok())
                .unwrap_or_else(|| random(32));
            apply(
                secrets,
                &resources::secret(
                    cx,
                    &cx.names.postgres_secret,
                    postgres::postgres_secret_data(cx, &password),
                    true,
                ),
            )
            .await?;
            apply(&Api::<Service>::namespaced(client.clone(), ns), &postgres::postgres_service(cx))
                .await?;
            let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
            let sts = apply(&sets, &postgres::postgres_statefulset(shard, cx)).await?;
            let ready = sts.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0) >= 1;
            let note = (pg.instances > 1).then(|| {
                format!("managed Postgres runs 1 instance ({} requested: use mode cloudnativepg for replicas)", pg.instances)
            });
            let stuck = database_stuck(&pods, &cx.selector_string("postgres")).await?;
            Ok(DbState { blocked: None, stuck, ready, note })
        }
        PostgresMode::Cloudnativepg => {
            if !served(client, "postgresql.cnpg.io/v1", "clusters").await? {
                return Ok(DbState {
                    blocked: Some((
                        "CloudNativePGNotInstalled".into(),
                        "postgres.mode is cloudnativepg but the postgresql.cnpg.io/v1 Cluster CRD is not installed".into(),
                    )),
                    ..DbState::default()
                });
            }
            let api = dynamic_api(client, ns, "postgresql.cnpg.io", "v1", "Cluster", "clusters");
            let cluster = apply_value(&api, &postgres::cnpg_cluster(shard, cx)).await?;
            let ready = cluster.data["status"]["readyInstances"].as_i64().unwrap_or(0) >= 1;
            let stuck =
                database_stuck(&pods, &format!("cnpg.io/cluster={}", cx.names.postgres)).await?;
            Ok(DbState { blocked: None, stuck, ready, note: None })
        }
        PostgresMode::External => {
            let Some(r) = &pg.external_secret_ref else {
                return Ok(DbState {
                    blocked: Some((
                        "SecretNotFound".into(),
                        "postgres.externalSecretRef is not set".into(),
                    )),
                    ..DbState::default()
                });
            };
            let blocked = match secrets.get_opt(&r.name).await? {
                None => Some((
                    "SecretNotFound".to_string(),
                    format!("Secret {ns}/{} not found", r.name),
                )),
                Some(s) if !s.data.as_ref().is_some_and(|d| d.contains_key(&r.key)) => Some((
                    "SecretKeyNotFound".to_string(),
                    format!("Secret {ns}/{} has no key {:?}", r.name, r.key),
                )),
                Some(_) => None,
            };
            let ready = blocked.is_none();
            Ok(DbState { blocked, stuck: None, ready, note: None })
        }
    }
}

/// The value under `key` of an existing Secret, or a fresh random one.
async fn existing_or_new(secrets: &Api<Secret>, name: &str, key: &str) -> Result<ByteString> {
    let existing = secrets.get_opt(name).await?.and_then(|s| s.data?.get(key).cloned());
    Ok(existing.unwrap_or_else(|| ByteString(random(48).into_bytes())))
}

fn random(len: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}
