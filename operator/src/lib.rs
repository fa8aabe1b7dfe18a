//! Omega's Kubernetes operator: the `Shard` and `FederationRound` custom resources and the
//! controllers that turn them into running shards and federation Jobs.
//!
//! Decisions are pure functions (desired objects, the autoscaling decision, the round state
//! machine, the cron schedule) with table tests; the reconcilers only read the cluster, call
//! them, and write the results by server-side apply under one field manager ([`FIELD_MANAGER`]).

pub mod apply;
pub mod conditions;
pub mod context;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod round;
pub mod run;
pub mod shard;
pub mod telemetry;

/// The one field manager every server-side apply of the operator uses.
pub const FIELD_MANAGER: &str = "omega-operator";

/// Finalizer that orders a Shard's deletion (constellation first, then the database).
pub const SHARD_FINALIZER: &str = "omega.exogenesis.io/ordered-cleanup";

/// Everything that can go wrong in a reconcile. Each variant is one `error` label value of
/// `omega_operator_reconcile_failures_total`, so failures are counted by kind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object could not be (de)serialised.
    #[error("serialisation: {0}")]
    Serde(#[from] serde_json::Error),
    /// A spec passed the schema but cannot be satisfied (missing Secret, missing CRD, bad cron).
    #[error("unsatisfiable spec: {0}")]
    Unsatisfiable(String),
    /// An object lacks a field the API server always sets (namespace, uid…).
    #[error("object is missing {0}")]
    MissingField(&'static str),
    /// The operator process itself cannot go on (cannot listen, lost its leader Lease).
    #[error("operator runtime: {0}")]
    Runtime(String),
}

impl Error {
    /// Label value for metrics: stable, lowercase, one per variant.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serde(_) => "serde",
            Error::Unsatisfiable(_) => "unsatisfiable",
            Error::MissingField(_) => "missing_field",
            Error::Runtime(_) => "runtime",
        }
    }
}

/// Result of the operator's fallible functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_has_its_own_metric_label() {
        let labels = [
            Error::Serde(serde_json::from_str::<u8>("x").unwrap_err()).metric_label(),
            Error::Unsatisfiable("x".into()).metric_label(),
            Error::MissingField("uid").metric_label(),
            Error::Runtime("x".into()).metric_label(),
        ];
        let unique: std::collections::BTreeSet<_> = labels.iter().collect();
        assert_eq!(unique.len(), labels.len());
    }
}
