//! Omega shard server.

pub mod federation;
