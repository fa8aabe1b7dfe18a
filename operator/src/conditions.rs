//! Status conditions (`Ready`, `Progressing`, `Degraded`) shared by both resources.
//!
//! A condition's `lastTransitionTime` moves only when its `status` changes, so writing the
//! same status twice is a no-op for the API server (no new resourceVersion, no watch event,
//! no reconcile loop).

use crate::metrics::DegradedSource;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Resource;
use kube::runtime::reflector::Store;
use std::hash::Hash;

/// Condition type: the resource does what it is for.
pub const READY: &str = "Ready";
/// Condition type: the operator is moving the resource towards its spec.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: the spec cannot be satisfied as it stands.
pub const DEGRADED: &str = "Degraded";

/// One condition as a decision function wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// `Ready`, `Progressing` or `Degraded`.
    pub type_: &'static str,
    /// True or false.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl Want {
    /// A condition that holds.
    pub fn yes(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Want { type_, status: true, reason: reason.into(), message: message.into() }
    }
    /// A condition that does not hold.
    pub fn no(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Want { type_, status: false, reason: reason.into(), message: message.into() }
    }
}

/// Merges wanted conditions into the previous ones: keeps `lastTransitionTime` when the
/// status did not change, stamps `now` when it did; conditions not wanted are kept as they were.
pub fn merge(
    previous: &[Condition],
    wanted: &[Want],
    generation: i64,
    now: &Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = previous.to_vec();
    for w in wanted {
        let status = if w.status { "True" } else { "False" }.to_string();
        let next = |last: Time| Condition {
            type_: w.type_.to_string(),
            status: status.clone(),
            reason: w.reason.clone(),
            message: w.message.clone(),
            observed_generation: Some(generation),
            last_transition_time: last,
        };
        match out.iter_mut().find(|c| c.type_ == w.type_) {
            Some(c) if c.status == status => *c = next(c.last_transition_time.clone()),
            Some(c) => *c = next(now.clone()),
            None => out.push(next(now.clone())),
        }
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Whether a condition of that type is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Reason of a true Degraded condition, if any (what `omega_operator_degraded` counts).
pub fn degraded_reason(conditions: &[Condition]) -> Option<String> {
    conditions.iter().find(|c| c.type_ == DEGRADED && c.status == "True").map(|c| c.reason.clone())
}

/// What the degraded gauge counts for one controller: the Degraded reason of every object in
/// its cache that is not being deleted (read at each scrape, so deleted objects stop counting).
pub fn degraded_source<K>(
    cache: Store<K>,
    conditions: fn(&K) -> Option<&[Condition]>,
) -> DegradedSource
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    Box::new(move || {
        cache
            .state()
            .iter()
            .filter(|o| o.meta().deletion_timestamp.is_none())
            .filter_map(|o| degraded_reason(conditions(o)?))
            .collect()
    })
}

/// The condition of that type, if any.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = merge(&[], &[Want::no(READY, "Provisioning", "0/1 ready")], 1, &t(10));
        assert_eq!(first[0].last_transition_time, t(10));
        // Same status, new reason and message: time kept.
        let same = merge(&first, &[Want::no(READY, "Provisioning", "0/2 ready")], 2, &t(20));
        assert_eq!(same[0].last_transition_time, t(10));
        assert_eq!((same[0].message.as_str(), same[0].observed_generation), ("0/2 ready", Some(2)));
        // Status flips: time moves.
        let flipped = merge(&same, &[Want::yes(READY, "AllReplicasReady", "2/2 ready")], 2, &t(30));
        assert_eq!(flipped[0].last_transition_time, t(30));
        assert!(is_true(&flipped, READY));
    }

    #[test]
    fn degraded_reason_only_when_true() {
        let ok = merge(&[], &[Want::no(DEGRADED, "AsExpected", "")], 1, &t(1));
        assert_eq!(degraded_reason(&ok), None);
        let bad = merge(&ok, &[Want::yes(DEGRADED, "ApplyFailed", "refused")], 1, &t(2));
        assert_eq!(degraded_reason(&bad).as_deref(), Some("ApplyFailed"));
    }

    #[test]
    fn merging_twice_is_idempotent_and_sorted() {
        let wanted = [Want::no(DEGRADED, "AsExpected", ""), Want::yes(READY, "Ok", "")];
        let once = merge(&[], &wanted, 1, &t(1));
        let twice = merge(&once, &wanted, 1, &t(2));
        assert_eq!(once, twice);
        assert_eq!(once.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(), [DEGRADED, READY]);
    }
}
