//! The chart's RBAC against what the operator really does.
//!
//! [`USED`] lists every (API group, resource, verb) the operator needs, each with the flow test
//! that exercises it. Every flow calls [`check`]: whatever the operator asked the fake API
//! server for must be listed, and every entry naming that flow must have been asked for. The
//! chart test then requires the chart to grant exactly [`USED`] plus [`JUSTIFIED`], so a
//! permission nobody uses, or a use nobody granted, fails a test.

use crate::fake::Fake;
use std::collections::BTreeSet;

/// (group, resource, verb, flow that exercises it). `leases` live in the operator's own
/// namespace (the chart's leader-election Role); everything else is in the watched scope.
pub const USED: &[(&str, &str, &str, &str)] = &[
    ("omega.exogenesis.io", "shards", "list", "lifecycle"),
    ("omega.exogenesis.io", "shards", "watch", "lifecycle"),
    ("omega.exogenesis.io", "shards", "patch", "lifecycle"),
    ("omega.exogenesis.io", "shards/status", "patch", "lifecycle"),
    ("omega.exogenesis.io", "federationrounds", "list", "lifecycle"),
    ("omega.exogenesis.io", "federationrounds", "watch", "lifecycle"),
    ("omega.exogenesis.io", "federationrounds", "create", "scheduled"),
    ("omega.exogenesis.io", "federationrounds", "patch", "scheduled"),
    ("omega.exogenesis.io", "federationrounds", "delete", "round"),
    ("omega.exogenesis.io", "federationrounds/status", "patch", "round"),
    ("apps", "statefulsets", "get", "lifecycle"),
    ("apps", "statefulsets", "list", "lifecycle"),
    ("apps", "statefulsets", "watch", "lifecycle"),
    ("apps", "statefulsets", "create", "lifecycle"),
    ("apps", "statefulsets", "patch", "lifecycle"),
    ("apps", "statefulsets", "delete", "lifecycle"),
    ("", "secrets", "get", "lifecycle"),
    ("", "secrets", "create", "lifecycle"),
    ("", "secrets", "patch", "lifecycle"),
    ("", "services", "create", "lifecycle"),
    ("", "services", "patch", "lifecycle"),
    ("", "pods", "list", "lifecycle"),
    ("", "persistentvolumeclaims", "list", "delete_policy"),
    ("", "persistentvolumeclaims", "create", "backup"),
    ("", "persistentvolumeclaims", "patch", "backup"),
    ("", "persistentvolumeclaims", "deletecollection", "delete_policy"),
    ("policy", "poddisruptionbudgets", "create", "lifecycle"),
    ("policy", "poddisruptionbudgets", "patch", "lifecycle"),
    ("networking.k8s.io", "networkpolicies", "create", "lifecycle"),
    ("networking.k8s.io", "networkpolicies", "patch", "lifecycle"),
    ("batch", "jobs", "list", "lifecycle"),
    ("batch", "jobs", "watch", "lifecycle"),
    ("batch", "jobs", "get", "round"),
    ("batch", "jobs", "create", "round"),
    ("batch", "jobs", "patch", "round"),
    ("batch", "cronjobs", "get", "backup"),
    ("batch", "cronjobs", "create", "backup"),
    ("batch", "cronjobs", "patch", "backup"),
    ("batch", "cronjobs", "delete", "backup"),
    ("events.k8s.io", "events", "create", "lifecycle"),
    // kube's Recorder patches the series of an Event that repeats.
    ("events.k8s.io", "events", "patch", "lifecycle"),
    ("postgresql.cnpg.io", "clusters", "create", "unsatisfiable"),
    ("postgresql.cnpg.io", "clusters", "patch", "unsatisfiable"),
    ("postgresql.cnpg.io", "clusters", "delete", "unsatisfiable"),
    ("postgresql.cnpg.io", "scheduledbackups", "get", "backup"),
    ("postgresql.cnpg.io", "scheduledbackups", "create", "backup"),
    ("postgresql.cnpg.io", "scheduledbackups", "patch", "backup"),
    ("postgresql.cnpg.io", "scheduledbackups", "delete", "backup"),
    ("monitoring.coreos.com", "servicemonitors", "create", "lifecycle"),
    ("monitoring.coreos.com", "servicemonitors", "patch", "lifecycle"),
    ("coordination.k8s.io", "leases", "get", "lifecycle"),
    ("coordination.k8s.io", "leases", "create", "lifecycle"),
    ("coordination.k8s.io", "leases", "patch", "lifecycle"),
];

/// Granted although no flow shows it, with the reason (none so far).
pub const JUSTIFIED: &[(&str, &str, &str, &str)] = &[];

/// Asserts what `flow` made the operator do against [`USED`] (see the module docs).
pub fn check(fake: &Fake, flow: &str) {
    let observed: BTreeSet<(String, String, String)> =
        fake.operator_requests().into_iter().map(|r| (r.group, r.resource, r.verb)).collect();
    for (g, r, v) in &observed {
        assert!(
            USED.iter().any(|u| (u.0, u.1, u.2) == (g.as_str(), r.as_str(), v.as_str())),
            "{flow}: the operator did `{v} {r}.{g}`, which rbac::USED (and so the chart) lacks"
        );
    }
    for u in USED.iter().filter(|u| u.3 == flow) {
        assert!(
            observed.contains(&(u.0.to_string(), u.1.to_string(), u.2.to_string())),
            "{flow}: never did `{} {}.{}` although rbac::USED says this flow shows it; observed {observed:?}",
            u.2,
            u.1,
            u.0
        );
    }
}
