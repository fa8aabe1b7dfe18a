//! The autoscaling decision: a pure function of the load the shard's servers report, the
//! spec's bounds and targets, and what the autoscaler remembered (kept in `Shard.status`).
//!
//! It behaves like the seeds' HorizontalPodAutoscaler:
//! - recommendation = the larger of ceil(total syncs/s ÷ target per pod) and
//!   ceil(total connections ÷ target per pod), ignoring changes within a 10 % tolerance;
//! - stabilisation: scale up only to the *lowest* recommendation of the last
//!   `scaleUpStabilizationSeconds`, down only to the *highest* of the last
//!   `scaleDownStabilizationSeconds`, so a brief spike or dip changes nothing;
//! - rate limits: up by at most max(100 %, 4 pods) per 30 s, down by at most
//!   max(50 %, 2 pods) per 60 s (HPA's `selectPolicy: Max`: the policy allowing more change wins);
//! - the result always lies in `[min, max]`;
//! - servers that are ready but did not answer (stats timed out) count conservatively, as the
//!   HPA counts pods with missing metrics: at the target when the others ask for fewer
//!   servers, at zero load when they ask for more, so a slow pod never causes a scale-down.

use crate::crd::{AutoscalerState, AutoscalingSpec, ReplicaRange, TimedReplicas};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// Scale-up rate-limit period.
pub const UP_PERIOD: SignedDuration = SignedDuration::from_secs(30);
/// At most this percentage of the pods at the period's start may be added per period…
pub const UP_MAX_PERCENT: i32 = 100;
/// …or this many pods, whichever is more.
pub const UP_MAX_PODS: i32 = 4;
/// Scale-down rate-limit period.
pub const DOWN_PERIOD: SignedDuration = SignedDuration::from_secs(60);
/// At most this percentage of the pods at the period's start may be removed per period…
pub const DOWN_MAX_PERCENT: i32 = 50;
/// …or this many pods, whichever is more.
pub const DOWN_MAX_PODS: i32 = 2;
/// Usage within this fraction of the target leaves the replica count alone.
pub const TOLERANCE: f64 = 0.1;

/// Load one ready server reports (from its `/api/v1/stats`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodLoad {
    /// Syncs per second over the last minute.
    pub syncs_per_second: f64,
    /// Open device-facing gRPC connections.
    pub connections: u64,
}

/// Why the autoscaler chose what it chose; each is also an Event reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Autoscaling is off: replicas = `min`.
    Disabled,
    /// No server reported load: nothing to decide on.
    NoMetrics,
    /// The current count is what the load asks for (or a change is not stable yet).
    Stable,
    /// More servers.
    ScaledUp,
    /// Fewer servers.
    ScaledDown,
    /// Moved into `[min, max]` after the bounds changed.
    Bounds,
}

impl Reason {
    /// The Event reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Disabled => "AutoscalingDisabled",
            Reason::NoMetrics => "NoMetrics",
            Reason::Stable => "Stable",
            Reason::ScaledUp => "ScaledUp",
            Reason::ScaledDown => "ScaledDown",
            Reason::Bounds => "ReplicaBounds",
        }
    }
}

/// What the autoscaler decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas to run.
    pub replicas: i32,
    /// What the current load alone asks for (before stabilisation and rate limits).
    pub recommendation: Option<i32>,
    /// Why.
    pub reason: Reason,
    /// Human-readable explanation (the Event note).
    pub message: String,
    /// Memory to keep in status.
    pub state: AutoscalerState,
}

/// Decides the replica count.
///
/// `loads` is `None` when no server could be read (nothing is recommended then, and the count
/// only moves into the bounds); `missing` counts ready servers whose load could not be read.
pub fn decide(
    now: Timestamp,
    current: i32,
    loads: Option<&[PodLoad]>,
    missing: usize,
    bounds: &ReplicaRange,
    spec: &AutoscalingSpec,
    previous: &AutoscalerState,
) -> Decision {
    let (min, max) = (bounds.min.max(1), bounds.max.max(bounds.min.max(1)));
    let mut state = previous.clone();
    let clamp = |r: i32| r.clamp(min, max);
    if !spec.enabled {
        return finish(
            now,
            current,
            min,
            None,
            Reason::Disabled,
            "autoscaling disabled".into(),
            state,
        );
    }
    let Some(loads) = loads.filter(|l| !l.is_empty()) else {
        let r = clamp(current);
        let reason = if r == current { Reason::NoMetrics } else { Reason::Bounds };
        return finish(now, current, r, None, reason, "no server reported load".into(), state);
    };

    let total_sps: f64 = loads.iter().map(|l| l.syncs_per_second.max(0.0)).sum();
    let total_conns: u64 = loads.iter().map(|l| l.connections).sum();
    let base = current.max(1);
    let want = |usage: f64, target: i32| -> i32 {
        let target = f64::from(target.max(1));
        let ratio = usage / (target * f64::from(base));
        if (ratio - 1.0).abs() <= TOLERANCE {
            base
        } else {
            // Saturating float-to-int conversion; the value is clamped right after.
            (usage / target).ceil() as i32
        }
    };
    let recommend = |sps: f64, conns: f64| {
        clamp(
            want(sps, spec.target_syncs_per_second_per_pod)
                .max(want(conns, spec.target_connections_per_pod))
                .max(1),
        )
    };
    // Unread servers add nothing (zero load), which is conservative for a scale-up…
    let mut recommendation = recommend(total_sps, total_conns as f64);
    if recommendation < current && missing > 0 {
        // …but not for a scale-down: assume they run at the target, and hold if that
        // removes the reason to scale down.
        let m = missing as f64;
        let with_missing = recommend(
            total_sps + m * f64::from(spec.target_syncs_per_second_per_pod),
            total_conns as f64 + m * f64::from(spec.target_connections_per_pod),
        );
        recommendation = with_missing.min(current);
    }
    record(&mut state.recommendations, now, recommendation);

    let up_window = SignedDuration::from_secs(i64::from(spec.scale_up_stabilization_seconds));
    let down_window = SignedDuration::from_secs(i64::from(spec.scale_down_stabilization_seconds));
    let up_rec = window(&state.recommendations, now, up_window).min().unwrap_or(recommendation);
    let down_rec = window(&state.recommendations, now, down_window).max().unwrap_or(recommendation);
    let mut target = current;
    if up_rec > current {
        target = up_rec;
    } else if down_rec < current {
        target = down_rec;
    }

    // Rate limits, counted from the replica count at the start of each period.
    let added: i32 = changes_since(&state.scale_events, now - UP_PERIOD).filter(|d| *d > 0).sum();
    let up_start = (current - added).max(1);
    let up_limit = up_start + (up_start * UP_MAX_PERCENT / 100).max(UP_MAX_PODS);
    let removed: i32 =
        -changes_since(&state.scale_events, now - DOWN_PERIOD).filter(|d| *d < 0).sum::<i32>();
    let down_start = current + removed;
    let down_limit = down_start - (down_start * DOWN_MAX_PERCENT / 100).max(DOWN_MAX_PODS);
    target = clamp(target.min(up_limit).max(down_limit));

    let unread =
        if missing > 0 { format!(" ({missing} more did not answer)") } else { String::new() };
    let load = format!(
        "{total_sps:.1} syncs/s and {total_conns} connections over {} servers{unread} ask for {recommendation}",
        loads.len()
    );
    let (reason, message) = match target.cmp(&current) {
        std::cmp::Ordering::Greater => {
            (Reason::ScaledUp, format!("{load}; scaling {current} -> {target}"))
        }
        std::cmp::Ordering::Less => {
            (Reason::ScaledDown, format!("{load}; scaling {current} -> {target}"))
        }
        std::cmp::Ordering::Equal if recommendation != current => {
            (Reason::Stable, format!("{load}; holding {current} (stabilising or rate-limited)"))
        }
        std::cmp::Ordering::Equal => (Reason::Stable, format!("{load}; holding {current}")),
    };
    let keep = up_window.max(down_window);
    prune(&mut state.recommendations, now, keep);
    finish(now, current, target, Some(recommendation), reason, message, state)
}

fn finish(
    now: Timestamp,
    current: i32,
    replicas: i32,
    recommendation: Option<i32>,
    reason: Reason,
    message: String,
    mut state: AutoscalerState,
) -> Decision {
    if replicas != current {
        state.scale_events.push(TimedReplicas { at: Time(now), replicas: replicas - current });
    }
    let horizon = now - UP_PERIOD.max(DOWN_PERIOD);
    state.scale_events.retain(|e| e.at.0 > horizon);
    Decision { replicas, recommendation, reason, message, state }
}

/// Appends a recommendation when it differs from the last one (run-length history: an entry
/// holds from its time until the next entry's), so a steady load never rewrites status.
fn record(history: &mut Vec<TimedReplicas>, now: Timestamp, replicas: i32) {
    if history.last().map(|l| l.replicas) != Some(replicas) {
        history.push(TimedReplicas { at: Time(now), replicas });
    }
}

/// Recommendations in force at some time during `[now - w, now]`.
fn window(
    history: &[TimedReplicas],
    now: Timestamp,
    w: SignedDuration,
) -> impl Iterator<Item = i32> + '_ {
    let start = now - w;
    history.iter().enumerate().filter_map(move |(i, e)| {
        let end = history.get(i + 1).map(|n| n.at.0);
        let in_force = match end {
            Some(end) => end > start,
            None => true,
        };
        in_force.then_some(e.replicas)
    })
}

/// Drops entries that ended before `now - keep`, keeping the one in force then.
fn prune(history: &mut Vec<TimedReplicas>, now: Timestamp, keep: SignedDuration) {
    let start = now - keep;
    while history.len() > 1 && history[1].at.0 <= start {
        history.remove(0);
    }
}

fn changes_since(events: &[TimedReplicas], since: Timestamp) -> impl Iterator<Item = i32> + '_ {
    events.iter().filter(move |e| e.at.0 > since).map(|e| e.replicas)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }
    fn rec(s: i64, r: i32) -> TimedReplicas {
        TimedReplicas { at: Time(at(s)), replicas: r }
    }
    fn pods(n: usize, sps: f64, conns: u64) -> Vec<PodLoad> {
        vec![PodLoad { syncs_per_second: sps, connections: conns }; n]
    }
    fn spec(up: i32, down: i32) -> AutoscalingSpec {
        AutoscalingSpec {
            scale_up_stabilization_seconds: up,
            scale_down_stabilization_seconds: down,
            ..AutoscalingSpec::default()
        }
    }

    struct Case {
        name: &'static str,
        now: i64,
        current: i32,
        loads: Option<Vec<PodLoad>>,
        bounds: (i32, i32),
        spec: AutoscalingSpec,
        recommendations: Vec<TimedReplicas>,
        scale_events: Vec<TimedReplicas>,
        missing: usize,
        want: i32,
        reason: Reason,
    }

    fn case(
        name: &'static str,
        current: i32,
        loads: Option<Vec<PodLoad>>,
        want: i32,
        reason: Reason,
    ) -> Case {
        Case {
            name,
            now: 1000,
            current,
            loads,
            bounds: (1, 20),
            spec: spec(0, 0),
            recommendations: vec![],
            scale_events: vec![],
            missing: 0,
            want,
            reason,
        }
    }

    #[test]
    fn decisions() {
        let cases = vec![
            case("steady load at target holds", 2, Some(pods(2, 100.0, 10)), 2, Reason::Stable),
            case("within 10% tolerance holds", 2, Some(pods(2, 108.0, 10)), 2, Reason::Stable),
            case("syncs drive scale-up", 2, Some(pods(2, 200.0, 10)), 4, Reason::ScaledUp),
            case("connections drive scale-up", 2, Some(pods(2, 10.0, 7500)), 3, Reason::ScaledUp),
            case("the larger metric wins", 2, Some(pods(2, 150.0, 10_000)), 4, Reason::ScaledUp),
            case("no metrics holds", 3, None, 3, Reason::NoMetrics),
            case("empty metrics holds", 3, Some(vec![]), 3, Reason::NoMetrics),
            case("idle scales down to 1", 2, Some(pods(2, 0.0, 0)), 1, Reason::ScaledDown),
            Case {
                bounds: (2, 5),
                ..case("clamped to max", 2, Some(pods(2, 1000.0, 0)), 5, Reason::ScaledUp)
            },
            Case {
                bounds: (3, 5),
                ..case("raised min applies at once", 1, None, 3, Reason::Bounds)
            },
            Case {
                bounds: (1, 2),
                ..case("lowered max applies at once", 6, None, 2, Reason::Bounds)
            },
            Case {
                bounds: (2, 8),
                ..case("idle never below min", 4, Some(pods(4, 0.0, 0)), 2, Reason::ScaledDown)
            },
            Case {
                spec: AutoscalingSpec { enabled: false, ..spec(0, 0) },
                bounds: (2, 8),
                ..case("disabled keeps min", 5, Some(pods(5, 900.0, 0)), 2, Reason::Disabled)
            },
            // Rate limits.
            case("up at most 4 pods from 1", 1, Some(pods(1, 2000.0, 0)), 5, Reason::ScaledUp),
            case("up at most 100% from 10", 10, Some(pods(10, 500.0, 0)), 20, Reason::ScaledUp),
            Case {
                scale_events: vec![rec(990, 4)],
                ..case(
                    "recent scale-up counts against the period",
                    5,
                    Some(pods(5, 400.0, 0)),
                    5,
                    Reason::Stable,
                )
            },
            Case {
                scale_events: vec![rec(960, 4)],
                ..case(
                    "scale-up older than 30 s does not count",
                    5,
                    Some(pods(5, 400.0, 0)),
                    10,
                    Reason::ScaledUp,
                )
            },
            case("down at most 50% from 10", 10, Some(pods(10, 1.0, 0)), 5, Reason::ScaledDown),
            case("down at most 2 pods from 3", 3, Some(pods(3, 0.0, 0)), 1, Reason::ScaledDown),
            Case {
                scale_events: vec![rec(970, -5)],
                ..case(
                    "recent scale-down counts against the period",
                    5,
                    Some(pods(5, 1.0, 0)),
                    5,
                    Reason::Stable,
                )
            },
            // Servers that did not answer (stats timed out), like the HPA's missing metrics.
            Case {
                missing: 2,
                ..case(
                    "unread servers count at target: no scale-down",
                    4,
                    Some(pods(2, 100.0, 0)),
                    4,
                    Reason::Stable,
                )
            },
            Case {
                missing: 3,
                ..case(
                    "unread servers at target limit the scale-down",
                    4,
                    Some(pods(1, 0.0, 0)),
                    3,
                    Reason::ScaledDown,
                )
            },
            Case {
                missing: 1,
                ..case(
                    "unread servers count as idle for a scale-up",
                    3,
                    Some(pods(2, 300.0, 0)),
                    6,
                    Reason::ScaledUp,
                )
            },
            // Stabilisation.
            Case {
                spec: spec(60, 300),
                recommendations: vec![rec(900, 2)],
                ..case(
                    "up waits for a stable recommendation",
                    2,
                    Some(pods(2, 300.0, 0)),
                    2,
                    Reason::Stable,
                )
            },
            Case {
                spec: spec(60, 300),
                recommendations: vec![rec(900, 2), rec(930, 6)],
                ..case("up after the window", 2, Some(pods(2, 300.0, 0)), 6, Reason::ScaledUp)
            },
            Case {
                spec: spec(60, 300),
                recommendations: vec![rec(800, 6), rec(900, 4)],
                ..case(
                    "up to the lowest of the window",
                    2,
                    Some(pods(2, 300.0, 0)),
                    4,
                    Reason::ScaledUp,
                )
            },
            Case {
                spec: spec(60, 300),
                recommendations: vec![rec(600, 4), rec(900, 1)],
                ..case("down waits 300 s", 4, Some(pods(4, 10.0, 0)), 4, Reason::Stable)
            },
            Case {
                spec: spec(60, 300),
                recommendations: vec![rec(600, 4), rec(690, 1)],
                ..case("down after 300 s", 4, Some(pods(4, 10.0, 0)), 2, Reason::ScaledDown)
            },
            Case {
                spec: spec(60, 300),
                recommendations: vec![rec(600, 4), rec(650, 3), rec(800, 1)],
                ..case(
                    "down to the highest of the window",
                    4,
                    Some(pods(4, 10.0, 0)),
                    3,
                    Reason::ScaledDown,
                )
            },
        ];
        for c in cases {
            let state = AutoscalerState {
                recommendations: c.recommendations.clone(),
                scale_events: c.scale_events.clone(),
            };
            let bounds = ReplicaRange { min: c.bounds.0, max: c.bounds.1 };
            let d = decide(
                at(c.now),
                c.current,
                c.loads.as_deref(),
                c.missing,
                &bounds,
                &c.spec,
                &state,
            );
            assert_eq!((d.replicas, d.reason), (c.want, c.reason), "{}: {}", c.name, d.message);
            assert!(d.replicas >= bounds.min && d.replicas <= bounds.max, "{}", c.name);
        }
    }

    #[test]
    fn history_is_run_length_so_steady_load_changes_nothing() {
        let bounds = ReplicaRange { min: 1, max: 10 };
        let s = spec(60, 300);
        let load = pods(2, 100.0, 0);
        let first = decide(at(0), 2, Some(&load), 0, &bounds, &s, &AutoscalerState::default());
        let second = decide(at(15), 2, Some(&load), 0, &bounds, &s, &first.state);
        assert_eq!(first.state.recommendations, second.state.recommendations);
        assert_eq!(second.state.recommendations.len(), 1);
        assert!(second.state.scale_events.is_empty());
    }

    #[test]
    fn scale_events_are_recorded_and_expire() {
        let bounds = ReplicaRange { min: 1, max: 10 };
        let s = spec(0, 0);
        let up =
            decide(at(0), 1, Some(&pods(1, 400.0, 0)), 0, &bounds, &s, &AutoscalerState::default());
        assert_eq!(
            up.state.scale_events,
            vec![rec(-1000, 3)]
                .into_iter()
                .map(|mut e| {
                    e.at = Time(at(0));
                    e
                })
                .collect::<Vec<_>>()
        );
        let later = decide(at(120), 4, Some(&pods(4, 100.0, 0)), 0, &bounds, &s, &up.state);
        assert!(later.state.scale_events.is_empty(), "events older than both periods are dropped");
    }

    #[test]
    fn a_spike_then_sustained_load_scales_up_after_the_window() {
        // Simulate the reconcile loop every 15 s with the seeds' windows.
        let bounds = ReplicaRange { min: 1, max: 10 };
        let s = AutoscalingSpec::default();
        let mut state = AutoscalerState::default();
        let mut replicas = 1;
        let mut history = vec![];
        for step in 0..12 {
            let t = step * 15;
            let load = if t < 30 { 50.0 } else { 350.0 };
            let d = decide(
                at(t),
                replicas,
                Some(&pods(replicas as usize, load / replicas as f64, 0)),
                0,
                &bounds,
                &s,
                &state,
            );
            replicas = d.replicas;
            state = d.state;
            history.push(replicas);
        }
        // Load rises at t=30; the up window (60 s) passes at t=90.
        assert_eq!(history, vec![1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4]);
    }
}
