//! The round state machine: Pending → Running → Succeeded / Failed, then TTL deletion.
//!
//! A pure function of what the reconciler observed (the selected shards, the Job and its
//! pod's termination message, the clock); the reconciler carries out the returned action.

use crate::crd::RoundPhase;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use omega_protocol::admin::{RoundOutcome, RoundSummary};

/// Pod waiting reasons that mean the image cannot be run (Degraded, not just slow).
pub const IMAGE_FAILURES: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
];

/// The round's Job, as observed.
#[derive(Debug, Clone, PartialEq)]
pub enum JobView {
    /// No Job exists.
    Missing,
    /// Running; `waiting` is a container waiting reason if one is stuck (`ImagePullBackOff`…).
    Active {
        /// Waiting reason of the federate container, if any.
        waiting: Option<String>,
    },
    /// Completed; the summary from the pod's termination message when it parsed.
    Succeeded {
        /// Parsed `RoundSummary`.
        summary: Option<RoundSummary>,
    },
    /// Failed (exit code, deadline or backoff limit).
    Failed {
        /// Parsed `RoundSummary`, when the program got far enough to write one.
        summary: Option<RoundSummary>,
        /// The Job's failure reason (`BackoffLimitExceeded`, `DeadlineExceeded`…).
        reason: String,
    },
}

/// Everything the decision depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Now.
    pub now: Timestamp,
    /// When the round was created.
    pub created: Timestamp,
    /// Phase recorded in status (None before the first reconcile).
    pub phase: Option<RoundPhase>,
    /// When the round finished, if it did.
    pub finished_at: Option<Timestamp>,
    /// `timeoutSeconds` of the spec.
    pub timeout: SignedDuration,
    /// `ttlSecondsAfterFinished` of the spec.
    pub ttl: Option<SignedDuration>,
    /// Shards matching the selector.
    pub shards_selected: usize,
    /// Of those, shards whose Ready condition is true.
    pub shards_ready: usize,
    /// `allowPartial` of the spec.
    pub allow_partial: bool,
    /// The Job.
    pub job: JobView,
}

/// What to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond writing status.
    None,
    /// Create the federate Job (with the ready shards' admin endpoints).
    CreateJob,
    /// Delete the round (TTL after finishing); its Job goes with it by owner reference.
    DeleteRound,
}

/// The decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Phase to record.
    pub phase: RoundPhase,
    /// Action to take.
    pub action: Action,
    /// Status message (also the Event note on a transition).
    pub message: String,
    /// Reason of the transition or of waiting (`Created`, `WaitingForShards`, `Succeeded`…).
    pub reason: &'static str,
    /// Set when something needs a human: the Degraded condition's reason.
    pub degraded: Option<&'static str>,
    /// Summary to copy into status.
    pub summary: Option<RoundSummary>,
    /// Check again after this long (None: wait for a watch event).
    pub requeue: Option<SignedDuration>,
}

/// How often a waiting round looks again.
pub const POLL: SignedDuration = SignedDuration::from_secs(10);

/// Decides the next step.
pub fn step(o: &Observed) -> Step {
    let phase = o.phase.unwrap_or(RoundPhase::Pending);
    if phase.is_finished() {
        return finished(o, phase);
    }
    match (&o.job, phase) {
        (JobView::Missing, RoundPhase::Running) => Step {
            phase: RoundPhase::Failed,
            action: Action::None,
            message: "the round's Job disappeared before it finished".into(),
            reason: "JobMissing",
            degraded: None,
            summary: None,
            requeue: ttl_requeue(o, o.now),
        },
        (JobView::Missing, _) => pending(o),
        (JobView::Active { waiting }, _) => {
            let stuck = waiting.as_deref().filter(|w| IMAGE_FAILURES.contains(w));
            Step {
                phase: RoundPhase::Running,
                action: Action::None,
                message: match stuck {
                    Some(w) => format!("the federate container cannot start: {w}"),
                    None => "the federate Job is running".into(),
                },
                reason: if stuck.is_some() { "ImagePullBackOff" } else { "Running" },
                degraded: stuck.map(|_| "ImagePullBackOff"),
                summary: None,
                requeue: Some(POLL),
            }
        }
        (JobView::Succeeded { summary }, _) => {
            let failed = summary.as_ref().is_some_and(|s| s.outcome == RoundOutcome::Failed);
            Step {
                phase: if failed { RoundPhase::Failed } else { RoundPhase::Succeeded },
                action: Action::None,
                message: summary
                    .as_ref()
                    .map_or_else(|| "the Job succeeded but left no summary".to_string(), describe),
                reason: if failed { failure_reason(summary.as_ref()) } else { "RoundSucceeded" },
                degraded: None,
                summary: summary.clone(),
                requeue: ttl_requeue(o, o.now),
            }
        }
        (JobView::Failed { summary, reason }, _) => Step {
            phase: RoundPhase::Failed,
            action: Action::None,
            message: match summary {
                Some(s) => describe(s),
                None => format!("the federate Job failed: {reason}"),
            },
            reason: failure_reason(summary.as_ref()),
            degraded: None,
            summary: summary.clone(),
            requeue: ttl_requeue(o, o.now),
        },
    }
}

fn pending(o: &Observed) -> Step {
    let enough = o.shards_ready > 0 && (o.allow_partial || o.shards_ready == o.shards_selected);
    if enough {
        return Step {
            phase: RoundPhase::Running,
            action: Action::CreateJob,
            message: format!("federating {} shard(s)", o.shards_ready),
            reason: "JobCreated",
            degraded: None,
            summary: None,
            requeue: Some(POLL),
        };
    }
    let waiting = if o.shards_selected == 0 {
        "no Shard matches shardSelector".to_string()
    } else {
        format!("waiting for shards: {}/{} ready", o.shards_ready, o.shards_selected)
    };
    if o.now.duration_since(o.created) >= o.timeout {
        return Step {
            phase: RoundPhase::Failed,
            action: Action::None,
            message: format!("timed out: {waiting}"),
            reason: "Timeout",
            degraded: None,
            summary: None,
            requeue: ttl_requeue(o, o.now),
        };
    }
    Step {
        phase: RoundPhase::Pending,
        action: Action::None,
        message: waiting,
        reason: if o.shards_selected == 0 { "NoShardsSelected" } else { "WaitingForShards" },
        degraded: (o.shards_selected == 0).then_some("NoShardsSelected"),
        summary: None,
        requeue: Some(POLL),
    }
}

fn finished(o: &Observed, phase: RoundPhase) -> Step {
    let finished_at = o.finished_at.unwrap_or(o.now);
    let expired = o.ttl.is_some_and(|ttl| o.now >= finished_at + ttl);
    Step {
        phase,
        action: if expired { Action::DeleteRound } else { Action::None },
        message: String::new(),
        reason: if expired { "TTLExpired" } else { "Finished" },
        degraded: None,
        summary: None,
        requeue: if expired { None } else { ttl_requeue(o, finished_at) },
    }
}

fn ttl_requeue(o: &Observed, finished_at: Timestamp) -> Option<SignedDuration> {
    o.ttl.map(|ttl| (finished_at + ttl).duration_since(o.now).max(SignedDuration::from_secs(1)))
}

/// The condition reason of a failed round: the privacy refusals by name, else `RoundFailed`.
pub fn failure_reason(s: Option<&RoundSummary>) -> &'static str {
    match s.and_then(|s| s.message.as_deref()) {
        Some(m) if m.starts_with("privacy budget exhausted") => "PrivacyBudgetExhausted",
        Some(m) if m.starts_with("--privacy-ledger") => "MalformedPrivacyLedger",
        _ => "RoundFailed",
    }
}

/// One line for status and Events.
pub fn describe(s: &RoundSummary) -> String {
    let what = match s.outcome {
        RoundOutcome::Succeeded => "succeeded",
        RoundOutcome::Partial => "partially succeeded",
        RoundOutcome::Failed => "failed",
    };
    let mut line = format!(
        "{what}: {} pattern(s) aggregated, {} trend(s), {}/{} shard(s)",
        s.patterns_aggregated, s.trends_detected, s.shards_completed, s.shards_total
    );
    if s.already_published {
        line.push_str(", already published");
    }
    for f in &s.shards_failed {
        line.push_str(&format!("; {}: {}", f.endpoint, f.error));
    }
    if let Some(m) = &s.message {
        line.push_str(&format!("; {m}"));
    }
    line
}

/// Parses the termination message (`RoundSummary` JSON; the last JSON line wins when the
/// kubelet fell back to logs).
pub fn parse_summary(message: &str) -> Option<RoundSummary> {
    message.lines().rev().find_map(|l| serde_json::from_str(l.trim()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega_protocol::admin::ShardFailure;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn summary(outcome: RoundOutcome) -> RoundSummary {
        RoundSummary {
            round_id: "ns.r.1".into(),
            outcome,
            shards_total: 2,
            shards_completed: if outcome == RoundOutcome::Succeeded { 2 } else { 1 },
            shards_failed: if outcome == RoundOutcome::Succeeded {
                vec![]
            } else {
                vec![ShardFailure {
                    endpoint: "http://b-admin.ns.svc:50052".into(),
                    error: "unavailable".into(),
                }]
            },
            patterns_in: 40,
            groups: 12,
            patterns_aggregated: 9,
            collaborative_vectors: 0,
            groups_suppressed: 3,
            trends_detected: 4,
            global_version: 7,
            privacy: None,
            already_published: false,
            duration_ms: 120,
            message: (outcome == RoundOutcome::Failed).then(|| "no shard reachable".into()),
        }
    }

    fn obs(phase: Option<RoundPhase>, job: JobView) -> Observed {
        Observed {
            now: at(100),
            created: at(0),
            phase,
            finished_at: None,
            timeout: SignedDuration::from_secs(900),
            ttl: None,
            shards_selected: 2,
            shards_ready: 2,
            allow_partial: false,
            job,
        }
    }

    #[test]
    fn transitions() {
        use RoundPhase::*;
        let active = JobView::Active { waiting: None };
        let cases: Vec<(&str, Observed, RoundPhase, Action, &str)> = vec![
            (
                "new round with ready shards starts a Job",
                obs(None, JobView::Missing),
                Running,
                Action::CreateJob,
                "JobCreated",
            ),
            (
                "no shards selected waits",
                Observed { shards_selected: 0, shards_ready: 0, ..obs(None, JobView::Missing) },
                Pending,
                Action::None,
                "NoShardsSelected",
            ),
            (
                "some shards not ready waits",
                Observed { shards_ready: 1, ..obs(Some(Pending), JobView::Missing) },
                Pending,
                Action::None,
                "WaitingForShards",
            ),
            (
                "partial allowed starts with the ready ones",
                Observed {
                    shards_ready: 1,
                    allow_partial: true,
                    ..obs(Some(Pending), JobView::Missing)
                },
                Running,
                Action::CreateJob,
                "JobCreated",
            ),
            (
                "pending past the timeout fails",
                Observed { shards_ready: 0, now: at(901), ..obs(Some(Pending), JobView::Missing) },
                Failed,
                Action::None,
                "Timeout",
            ),
            (
                "pending with a Job already there runs",
                obs(Some(Pending), active.clone()),
                Running,
                Action::None,
                "Running",
            ),
            (
                "running Job stays running",
                obs(Some(Running), active),
                Running,
                Action::None,
                "Running",
            ),
            (
                "image pull failure is degraded, not failed",
                obs(Some(Running), JobView::Active { waiting: Some("ImagePullBackOff".into()) }),
                Running,
                Action::None,
                "ImagePullBackOff",
            ),
            (
                "Job succeeded",
                obs(
                    Some(Running),
                    JobView::Succeeded { summary: Some(summary(RoundOutcome::Succeeded)) },
                ),
                Succeeded,
                Action::None,
                "RoundSucceeded",
            ),
            (
                "partial round succeeded",
                obs(
                    Some(Running),
                    JobView::Succeeded { summary: Some(summary(RoundOutcome::Partial)) },
                ),
                Succeeded,
                Action::None,
                "RoundSucceeded",
            ),
            (
                "summary says failed",
                obs(
                    Some(Running),
                    JobView::Succeeded { summary: Some(summary(RoundOutcome::Failed)) },
                ),
                Failed,
                Action::None,
                "RoundFailed",
            ),
            (
                "Job succeeded without summary",
                obs(Some(Running), JobView::Succeeded { summary: None }),
                Succeeded,
                Action::None,
                "RoundSucceeded",
            ),
            (
                "Job failed",
                obs(
                    Some(Running),
                    JobView::Failed { summary: None, reason: "BackoffLimitExceeded".into() },
                ),
                Failed,
                Action::None,
                "RoundFailed",
            ),
            (
                "Job vanished",
                obs(Some(Running), JobView::Missing),
                Failed,
                Action::None,
                "JobMissing",
            ),
            (
                "finished without TTL stays",
                obs(Some(Succeeded), JobView::Missing),
                Succeeded,
                Action::None,
                "Finished",
            ),
            (
                "finished before TTL stays",
                Observed {
                    ttl: Some(SignedDuration::from_secs(60)),
                    finished_at: Some(at(50)),
                    ..obs(Some(Failed), JobView::Missing)
                },
                Failed,
                Action::None,
                "Finished",
            ),
            (
                "finished past TTL is deleted",
                Observed {
                    ttl: Some(SignedDuration::from_secs(60)),
                    finished_at: Some(at(40)),
                    ..obs(Some(Succeeded), JobView::Missing)
                },
                Succeeded,
                Action::DeleteRound,
                "TTLExpired",
            ),
        ];
        for (name, o, phase, action, reason) in cases {
            let s = step(&o);
            assert_eq!(
                (s.phase, s.action, s.reason),
                (phase, action, reason),
                "{name}: {}",
                s.message
            );
        }
    }

    #[test]
    fn summary_is_carried_and_described() {
        let s = step(&obs(
            Some(RoundPhase::Running),
            JobView::Succeeded { summary: Some(summary(RoundOutcome::Partial)) },
        ));
        assert_eq!(s.summary.as_ref().map(|s| s.patterns_aggregated), Some(9));
        assert!(
            s.message.starts_with("partially succeeded: 9 pattern(s) aggregated, 4 trend(s), 1/2"),
            "{}",
            s.message
        );
        assert!(s.message.contains("b-admin.ns.svc:50052: unavailable"));
    }

    #[test]
    fn ttl_requeues_until_expiry() {
        let o = Observed {
            ttl: Some(SignedDuration::from_secs(60)),
            finished_at: Some(at(70)),
            ..obs(Some(RoundPhase::Succeeded), JobView::Missing)
        };
        assert_eq!(step(&o).requeue, Some(SignedDuration::from_secs(30)));
    }

    #[test]
    fn privacy_refusals_are_named_in_the_condition_reason() {
        let with =
            |m: &str| RoundSummary { message: Some(m.into()), ..summary(RoundOutcome::Failed) };
        // (summary message, reason)
        for (m, want) in [
            ("privacy budget exhausted: this round would bring ...", "PrivacyBudgetExhausted"),
            ("--privacy-ledger is not a privacy ledger: eof", "MalformedPrivacyLedger"),
            ("round failed: shard(s) a unreachable", "RoundFailed"),
        ] {
            let s = step(&obs(
                Some(RoundPhase::Running),
                JobView::Failed { summary: Some(with(m)), reason: "BackoffLimitExceeded".into() },
            ));
            assert_eq!((s.phase, s.reason), (RoundPhase::Failed, want), "{m}");
            assert!(s.message.contains(m), "{}", s.message);
        }
        assert_eq!(failure_reason(None), "RoundFailed");
    }

    #[test]
    fn termination_message_parses_last_json_line() {
        let json = serde_json::to_string(&summary(RoundOutcome::Succeeded)).unwrap();
        assert_eq!(parse_summary(&json).map(|s| s.trends_detected), Some(4));
        assert_eq!(parse_summary(&format!("log line\n{json}\n")).map(|s| s.groups), Some(12));
        assert_eq!(parse_summary("panic: boom"), None);
    }
}
