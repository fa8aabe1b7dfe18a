//! The FederationRound controller: a Job running `omega-shard federate` per round, the round's
//! status from the Job and its termination message, TTL cleanup, and scheduled parents that
//! spawn child rounds.
//!
//! Rounds only read Shards; a failed or stuck round never touches them, so it cannot block
//! Shard reconciliation (the two controllers also run as separate tasks).

pub mod job;
pub mod schedule;
pub mod state;

use crate::apply::{apply, apply_status};
use crate::conditions::{self, DEGRADED, PROGRESSING, READY, Want};
use crate::context::Context;
use crate::crd::{
    FederationRound, FederationRoundSpec, FederationRoundStatus, PrivacyStatus, RoundPhase, Shard,
};
use crate::metrics::FinishedRound;
use crate::{Error, Result};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use omega_protocol::admin::RoundOutcome;
use state::{JobView, Observed};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Controller name in metrics.
pub const CONTROLLER: &str = "federationround";
/// Label a child round carries: the scheduled parent's name.
pub const PARENT_LABEL: &str = "omega.exogenesis.io/parent";

/// Runs the FederationRound controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (rounds, children, jobs): (Api<FederationRound>, Api<FederationRound>, Api<Job>) =
        match &ctx.settings.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client, ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client)),
        };
    let controller = Controller::new(rounds, watcher::Config::default().any_semantic())
        .owns(jobs, watcher::Config::default().labels(job::ROUND_LABEL).any_semantic())
        .owns(children, watcher::Config::default().labels(PARENT_LABEL).any_semantic());
    ctx.metrics.watch_degraded(
        CONTROLLER,
        conditions::degraded_source(controller.store(), |r: &FederationRound| {
            r.status.as_ref().map(|s| s.conditions.as_slice())
        }),
    );
    let cache = controller.store();
    ctx.metrics.watch_succeeded(Box::new(move || {
        cache
            .state()
            .iter()
            .filter_map(|r| {
                let s = r.status.as_ref()?;
                let finished = s.finished_at.as_ref()?;
                (s.phase == Some(RoundPhase::Succeeded))
                    .then(|| (series(r), finished.0.as_second() as f64))
            })
            .collect()
    }));
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "federationround controller");
            }
        })
        .await;
}

/// The `round` label of the `federation_*` series: `NAMESPACE/NAME` of the scheduled parent
/// (one series per schedule, not per child) or of the round itself.
fn series(fr: &FederationRound) -> String {
    let name = fr.labels().get(PARENT_LABEL).cloned().unwrap_or_else(|| fr.name_any());
    format!("{}/{name}", fr.namespace().unwrap_or_default())
}

fn key(fr: &FederationRound) -> String {
    format!("federationround/{}/{}", fr.namespace().unwrap_or_default(), fr.name_any())
}

/// Backoff after a failed reconcile, counted per object.
pub fn error_policy(fr: Arc<FederationRound>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(CONTROLLER, error);
    let delay = ctx.backoff(&key(&fr));
    warn!(round = %key(&fr), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// One reconcile of one FederationRound.
#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(controller = CONTROLLER, object = %key(&fr), trace_id = tracing::field::Empty)
)]
pub async fn reconcile(fr: Arc<FederationRound>, ctx: Arc<Context>) -> Result<Action> {
    omega_telemetry::record_trace_id(&tracing::Span::current());
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    if fr.meta().deletion_timestamp.is_some() {
        ctx.forget(&key(&fr));
        return Ok(Action::await_change());
    }
    let result = match &fr.spec.schedule {
        Some(cron) => scheduled(&fr, &ctx, cron).await,
        None => one_round(&fr, &ctx).await,
    };
    match result.as_ref().err().and_then(Error::rejection) {
        // The generated Job or child round was refused: only a spec change can help.
        Some(message) => {
            let note = format!("the API server refused a generated object: {message}");
            degrade(&fr, &ctx, "ApplyFailed", &note).await?;
            Err(Error::Rejected(message))
        }
        None => result,
    }
}

/// Marks a round Degraded for `reason` (Warning Event on the transition); the caller backs off.
async fn degrade(fr: &FederationRound, ctx: &Context, reason: &str, message: &str) -> Result<()> {
    let ns = fr.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let rounds: Api<FederationRound> = Api::namespaced(ctx.client.clone(), &ns);
    let previous = fr.status.clone().unwrap_or_default();
    let generation = fr.meta().generation.unwrap_or(0);
    let wants = [
        Want::no(READY, reason, message),
        Want::no(PROGRESSING, reason, message),
        Want::yes(DEGRADED, reason, message),
    ];
    let mut next = previous.clone();
    next.conditions =
        conditions::merge(&previous.conditions, &wants, generation, &Time(Timestamp::now()));
    next.observed_generation = Some(generation);
    next.message = Some(message.to_string());
    if next.phase.is_none() {
        next.phase = Some(if fr.spec.schedule.is_some() {
            RoundPhase::Scheduled
        } else {
            RoundPhase::Pending
        });
    }
    let already = conditions::degraded_reason(&previous.conditions).as_deref() == Some(reason);
    if !already {
        ctx.event(&fr.object_ref(&()), true, reason, "Reconcile", message).await;
    }
    if next != previous {
        apply_status(&rounds, &fr.name_any(), &next).await?;
    }
    Ok(())
}

fn to_std(d: SignedDuration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::from_secs(1)).max(Duration::from_secs(1))
}

fn secs(n: i32) -> SignedDuration {
    SignedDuration::from_secs(i64::from(n))
}

fn created(fr: &FederationRound) -> Timestamp {
    fr.meta().creation_timestamp.as_ref().map_or_else(Timestamp::now, |t| t.0)
}

/// A single round.
async fn one_round(fr: &FederationRound, ctx: &Context) -> Result<Action> {
    let ns = fr.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let client = &ctx.client;
    let rounds: Api<FederationRound> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let reference = fr.object_ref(&());
    let now = Timestamp::now();
    let previous = fr.status.clone().unwrap_or_default();
    let phase = previous.phase;

    // Shards are only resolved while the round has not started.
    let (selected, ready): (Vec<Shard>, Vec<Shard>) =
        if phase.is_none() || phase == Some(RoundPhase::Pending) {
            let shards: Api<Shard> = Api::namespaced(client.clone(), &ns);
            let selector = match Selector::try_from(fr.spec.shard_selector.clone()) {
                Ok(s) => s,
                Err(e) => {
                    // The schema cannot check operators and values; tell the user and back
                    // off until the spec changes.
                    let message = format!("shardSelector cannot be parsed: {e}");
                    degrade(fr, ctx, "InvalidSelector", &message).await?;
                    return Err(Error::Unsatisfiable(message));
                }
            };
            let mut selected = shards.list(&ListParams::default()).await?.items;
            selected.retain(|s| selector.matches(s.labels()));
            selected.sort_by_key(|s| s.name_any());
            let ready = selected
                .iter()
                .filter(|s| {
                    s.status.as_ref().is_some_and(|st| conditions::is_true(&st.conditions, READY))
                })
                .cloned()
                .collect();
            (selected, ready)
        } else {
            (vec![], vec![])
        };

    let job_name = job::job_name(&fr.name_any());
    let view = observe_job(client, &ns, &jobs, &job_name).await?;
    let observed = Observed {
        now,
        created: created(fr),
        phase,
        finished_at: previous.finished_at.as_ref().map(|t| t.0),
        timeout: secs(fr.spec.timeout_seconds),
        ttl: fr.spec.ttl_seconds_after_finished.map(secs),
        shards_selected: selected.len(),
        shards_ready: ready.len(),
        allow_partial: fr.spec.allow_partial,
        job: view,
    };
    let step = state::step(&observed);

    let mut next = previous.clone();
    match step.action {
        state::Action::DeleteRound => {
            info!(round = %key(fr), "ttlSecondsAfterFinished expired; deleting");
            ctx.event(&reference, false, "TTLExpired", "Delete", "ttlSecondsAfterFinished expired")
                .await;
            crate::apply::delete_if_present(&rounds, &fr.name_any()).await?;
            ctx.forget(&key(fr));
            return Ok(Action::await_change());
        }
        state::Action::CreateJob => {
            let id = job::round_id(fr);
            let endpoints: Vec<String> = ready
                .iter()
                .filter_map(|s| s.status.as_ref()?.endpoints.as_ref().map(|e| e.admin.clone()))
                .collect();
            let image = fr
                .spec
                .image
                .clone()
                .or_else(|| ready.first().map(|s| s.spec.image.clone()))
                .ok_or_else(|| {
                    Error::Unsatisfiable("no ready shard to take the image from".into())
                })?;
            apply(&jobs, &job::job(fr, &id, &endpoints, &image)?).await?;
            next.round_id = Some(id);
            next.job_name = Some(job_name);
            next.shards = endpoints;
            next.started_at = Some(Time(now));
        }
        // A Job found without a record of it (status write lost): record what is known.
        state::Action::None if step.phase == RoundPhase::Running && next.job_name.is_none() => {
            next.round_id = Some(job::round_id(fr));
            next.job_name = Some(job_name);
            next.started_at = Some(Time(now));
        }
        state::Action::None => {}
    }

    if !step.message.is_empty() {
        next.message = Some(step.message.clone());
    }
    next.phase = Some(step.phase);
    if let Some(s) = &step.summary {
        next.patterns_aggregated = i64::try_from(s.patterns_aggregated).unwrap_or(i64::MAX);
        next.trends_detected = i64::try_from(s.trends_detected).unwrap_or(i64::MAX);
        next.shards_completed = i32::try_from(s.shards_completed).unwrap_or(i32::MAX);
        if let Some(p) = &s.privacy {
            next.privacy = Some(PrivacyStatus {
                composed_epsilon: p.composed_epsilon,
                composed_delta: p.composed_delta,
                rounds_in_period: p.rounds_in_period,
                ledger: serde_json::to_string(&p.ledger).unwrap_or_default(),
            });
        }
    }
    if step.phase.is_finished() && next.finished_at.is_none() {
        next.finished_at = Some(Time(now));
    }
    let message = next.message.clone().unwrap_or_default();
    let wants = match step.phase {
        RoundPhase::Succeeded => vec![
            Want::yes(READY, "RoundSucceeded", message.clone()),
            Want::no(PROGRESSING, "Finished", ""),
            Want::no(DEGRADED, "AsExpected", ""),
        ],
        RoundPhase::Failed => vec![
            Want::no(READY, step.reason, message.clone()),
            Want::no(PROGRESSING, "Finished", ""),
            Want::yes(DEGRADED, step.reason, message.clone()),
        ],
        _ => vec![
            Want::no(READY, step.reason, message.clone()),
            Want::yes(PROGRESSING, step.reason, message.clone()),
            match step.degraded {
                Some(r) => Want::yes(DEGRADED, r, message.clone()),
                None => Want::no(DEGRADED, "AsExpected", ""),
            },
        ],
    };
    let generation = fr.meta().generation.unwrap_or(0);
    next.conditions = conditions::merge(&previous.conditions, &wants, generation, &Time(now));
    next.observed_generation = Some(generation);

    if next.phase != previous.phase || (step.degraded.is_some() && !step_was_degraded(&previous)) {
        let warning = step.phase == RoundPhase::Failed || step.degraded.is_some();
        ctx.event(&reference, warning, step.reason, "Federate", message).await;
    }
    if next != previous {
        apply_status(&rounds, &fr.name_any(), &next).await?;
    }
    // Recorded once the status says so: a status write that failed is retried, and recorded then.
    if step.phase.is_finished() && !previous.phase.is_some_and(RoundPhase::is_finished) {
        let seconds = match (&next.started_at, &next.finished_at) {
            (Some(a), Some(b)) => Some(b.0.duration_since(a.0).as_secs_f64()),
            _ => None,
        };
        ctx.metrics.round_finished(&FinishedRound {
            round: series(fr),
            status: match (step.phase, step.summary.as_ref().map(|s| s.outcome)) {
                (RoundPhase::Failed, _) => "failed",
                (_, Some(RoundOutcome::Partial)) => "partial",
                _ => "succeeded",
            },
            summary: step.summary.as_ref(),
            seconds,
            finished_at: next.finished_at.as_ref().map_or(0.0, |t| t.0.as_second() as f64),
        });
    }
    if step.degraded.is_some() {
        // Stuck (image pull, no shard selected): look again with backoff, not at a fixed rate.
        return Ok(Action::requeue(ctx.backoff(&key(fr))));
    }
    ctx.reset_backoff(&key(fr));
    Ok(match step.requeue {
        Some(d) => Action::requeue(to_std(d)),
        None => Action::await_change(),
    })
}

fn step_was_degraded(s: &FederationRoundStatus) -> bool {
    conditions::is_true(&s.conditions, DEGRADED)
}

/// The Job and, once it finished, the summary its pod left in the termination message.
async fn observe_job(
    client: &kube::Client,
    ns: &str,
    jobs: &Api<Job>,
    name: &str,
) -> Result<JobView> {
    let Some(j) = jobs.get_opt(name).await? else {
        return Ok(JobView::Missing);
    };
    let status = j.status.unwrap_or_default();
    let cond = |t: &str| {
        status.conditions.iter().flatten().find(|c| c.type_ == t && c.status == "True").cloned()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod_list =
        pods.list(&ListParams::default().labels(&format!("job-name={name}"))).await?.items;
    let container_states =
        || pod_list.iter().filter_map(|p| p.status.as_ref()?.container_statuses.clone()).flatten();
    let summary = || {
        container_states()
            .filter_map(|c| c.state?.terminated?.message)
            .find_map(|m| state::parse_summary(&m))
    };
    if cond("Complete").is_some() || status.succeeded.unwrap_or(0) > 0 {
        return Ok(JobView::Succeeded { summary: summary() });
    }
    if let Some(c) = cond("Failed") {
        return Ok(JobView::Failed {
            summary: summary(),
            reason: c.reason.unwrap_or_else(|| "Failed".into()),
        });
    }
    let waiting = container_states().filter_map(|c| c.state?.waiting?.reason).next();
    Ok(JobView::Active { waiting })
}

/// A parent with a schedule: spawn children, keep history, never two at once.
async fn scheduled(fr: &FederationRound, ctx: &Context, cron: &str) -> Result<Action> {
    let ns = fr.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let rounds: Api<FederationRound> = Api::namespaced(ctx.client.clone(), &ns);
    let reference = fr.object_ref(&());
    let now = Timestamp::now();
    let previous = fr.status.clone().unwrap_or_default();
    let mut next = previous.clone();
    let generation = fr.meta().generation.unwrap_or(0);
    next.observed_generation = Some(generation);
    next.phase = Some(RoundPhase::Scheduled);

    let parsed = match schedule::parse(cron) {
        Ok(c) => c,
        Err(message) => {
            let wants = [
                Want::no(READY, "InvalidSchedule", message.clone()),
                Want::no(PROGRESSING, "InvalidSchedule", message.clone()),
                Want::yes(DEGRADED, "InvalidSchedule", message.clone()),
            ];
            next.conditions =
                conditions::merge(&previous.conditions, &wants, generation, &Time(now));
            next.message = Some(message.clone());
            if next != previous {
                ctx.event(&reference, true, "InvalidSchedule", "Schedule", message).await;
                apply_status(&rounds, &fr.name_any(), &next).await?;
            }
            // Fixed only by a spec change, which triggers a reconcile; look again slowly.
            return Ok(Action::requeue(ctx.backoff(&key(fr))));
        }
    };

    let mut children: Vec<FederationRound> = rounds
        .list(&ListParams::default().labels(&format!("{PARENT_LABEL}={}", fr.name_any())))
        .await?
        .items;
    children.retain(|c| c.owner_references().iter().any(|o| Some(&o.uid) == fr.uid().as_ref()));
    children.sort_by_key(|c| c.meta().creation_timestamp.as_ref().map(|t| t.0));
    let finished = |c: &FederationRound| {
        c.status.as_ref().and_then(|s| s.phase).is_some_and(RoundPhase::is_finished)
    };
    let active = children.iter().find(|c| !finished(c)).map(|c| c.name_any());

    let last = previous.last_schedule_time.as_ref().map_or_else(|| created(fr), |t| t.0);
    let step = schedule::step(&parsed, last, now, active.is_some());
    let mut active_round = active.clone();
    // The newest finished child's spending is the schedule's (read before history is pruned).
    if let Some(p) = children
        .iter()
        .rev()
        .filter(|c| finished(c))
        .find_map(|c| c.status.as_ref().and_then(|s| s.privacy.clone()))
    {
        next.privacy = Some(p);
    }
    if let Some(due) = step.spawn {
        let ledger = next.privacy.as_ref().map(|p| p.ledger.clone());
        let child = child_round(fr, due, ledger)?;
        let name = child.name_any();
        apply(&rounds, &child).await?;
        info!(round = %key(fr), child = %name, "spawned scheduled round");
        ctx.event(
            &reference,
            false,
            "RoundSpawned",
            "Schedule",
            format!("spawned {name} for {due}"),
        )
        .await;
        next.last_schedule_time = Some(Time(due));
        active_round = Some(name);
    }
    if let Some(due) = step.skipped {
        let note = format!(
            "run due {due} skipped: {} has not finished",
            active.clone().unwrap_or_default()
        );
        ctx.event(&reference, true, "RunSkipped", "Schedule", note).await;
        next.last_schedule_time = Some(Time(due));
    }

    // History: keep the newest `historyLimit` finished children.
    let done: Vec<&FederationRound> = children.iter().filter(|c| finished(c)).collect();
    let excess = done.len().saturating_sub(usize::try_from(fr.spec.history_limit).unwrap_or(0));
    for old in done.iter().take(excess) {
        crate::apply::delete_if_present(&rounds, &old.name_any()).await?;
    }
    if let Some(last_done) = done.last().and_then(|c| c.status.clone()) {
        next.message = Some(format!(
            "last round {}: {}",
            last_done.phase.map_or("?".into(), |p| format!("{p:?}")),
            last_done.message.unwrap_or_default()
        ));
    }

    next.active_round = active_round;
    next.next_schedule_time = step.next.map(Time);
    let wants = [
        Want::yes(READY, "Scheduled", format!("schedule {cron:?}")),
        Want::no(PROGRESSING, "Scheduled", ""),
        Want::no(DEGRADED, "AsExpected", ""),
    ];
    next.conditions = conditions::merge(&previous.conditions, &wants, generation, &Time(now));
    if next != previous {
        apply_status(&rounds, &fr.name_any(), &next).await?;
    }
    ctx.reset_backoff(&key(fr));
    let wait = step.next.map_or(SignedDuration::from_secs(3600), |n| n.duration_since(now));
    Ok(Action::requeue(to_std(wait)))
}

/// A child round of a scheduled parent for the run due at `due` (named after it, so a retried
/// spawn applies the same object instead of making a second one).
fn child_round(
    parent: &FederationRound,
    due: Timestamp,
    ledger: Option<String>,
) -> Result<FederationRound> {
    let owner = parent.controller_owner_ref(&()).ok_or(Error::MissingField("metadata.uid"))?;
    let suffix = format!("-{}", due.as_second() / 60);
    let mut base = parent.name_any();
    base.truncate(63 - suffix.len());
    let spec = FederationRoundSpec { schedule: None, ..parent.spec.clone() };
    Ok(FederationRound {
        metadata: ObjectMeta {
            name: Some(format!("{}{suffix}", base.trim_end_matches('-'))),
            namespace: parent.namespace(),
            labels: Some(BTreeMap::from([
                (PARENT_LABEL.to_string(), parent.name_any()),
                ("app.kubernetes.io/managed-by".to_string(), "omega-operator".to_string()),
            ])),
            owner_references: Some(vec![owner]),
            annotations: ledger
                .filter(|_| parent.spec.privacy.is_some())
                .map(|l| BTreeMap::from([(job::PRIVACY_LEDGER_ANNOTATION.to_string(), l)])),
            ..Default::default()
        },
        spec,
        status: None,
    })
}
