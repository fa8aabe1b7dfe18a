//! Omega shard server.
