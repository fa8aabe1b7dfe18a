//! Whole flows against a stateful fake API server on loopback: the operator's real
//! controllers (in process and as the real binary) and the real `kubectl`.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod fake;
mod flows;
mod live;
mod manifests;
mod rbac;
mod support;
