//! Omega shard server: the device-facing sync service (`Constellation`), the internal
//! `ShardAdmin` service, the REST admin API, Prometheus metrics, and the stores behind them.
//!
//! Layers, outermost first:
//! - [`server`] wires listeners, background tasks and graceful shutdown for `omega-shard serve`;
//! - [`grpc`] and [`rest`] are thin transports: they decode, call [`service`] and convert its
//!   error to their own status codes;
//! - [`service`] holds the use cases (register, sync, stats) with one error type and no
//!   transport types;
//! - [`collab`] pages collaborative item vectors to devices (catalog, ranking, cursors);
//! - [`sync`] holds the transport-free sync decisions (quality filter, interest vector,
//!   anonymisation, the 5 KB response budget);
//! - [`store`] is the storage trait with its `postgres` and `embedded` implementations.

pub mod auth;
pub mod clock;
pub mod collab;
pub mod config;
pub mod conn;
pub mod federation;
pub mod grpc;
pub mod metrics;
pub mod ratelimit;
pub mod reload;
pub mod rest;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod sync;
pub mod tls;
pub mod tokens;

pub use config::{ConfigError, ServeArgs, StoreArgs};
pub use store::{Store, StoreError};
