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
    /// The API server refused an object the operator generated (422/400: a bad quantity in
    /// `resources`, a value the schema could not catch). Retrying unchanged cannot help, so the
    /// object is marked Degraded/ApplyFailed with the server's message.
    #[error("refused by the API server: {0}")]
    Rejected(String),
    /// An object lacks a field the API server always sets (namespace, uid…).
    #[error("object is missing {0}")]
    MissingField(&'static str),
    /// The operator process itself cannot go on (cannot listen, lost its leader Lease).
    #[error("operator runtime: {0}")]
    Runtime(String),
}

impl Error {
    /// The API server's message when it refused a request as invalid (400 Bad Request or
    /// 422 Invalid), which no retry of the same object can fix.
    pub fn rejection(&self) -> Option<String> {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => {
                Some(s.message.clone())
            }
            Error::Rejected(m) => Some(m.clone()),
            _ => None,
        }
    }

    /// Label value for metrics: stable, lowercase, one per variant.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serde(_) => "serde",
            Error::Unsatisfiable(_) => "unsatisfiable",
            Error::Rejected(_) => "rejected",
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
            Error::Rejected("x".into()).metric_label(),
            Error::MissingField("uid").metric_label(),
            Error::Runtime("x".into()).metric_label(),
        ];
        let unique: std::collections::BTreeSet<_> = labels.iter().collect();
        assert_eq!(unique.len(), labels.len());
    }
}
