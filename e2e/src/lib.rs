//! Omega fleet simulator, load generator and end-to-end tests.
//!
//! - [`load`]: `omega-load`, a gRPC load generator for one shard server.

pub mod load;
