//! Whole flows against a stateful fake API server on loopback: the operator's real
// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! controllers (in process and as the real binary) and the real `kubectl`.

mod cli;
mod fake;
mod flows;
mod manifests;
mod support;
