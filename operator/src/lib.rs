//! Omega Kubernetes operator.
