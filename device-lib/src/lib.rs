//! The on-device brain of Omega.
//!
//! - [`Embedder`]: all-MiniLM-L6-v2 (int8 ONNX) through ONNX Runtime; share as `Arc`.
//! - [`Catalogue`]: known contents with precomputed embeddings; share as `Arc`.
//! - [`Brain`]: learns patterns from viewing events, recommends offline, prepares deltas,
//!   takes in global patterns; persisted in SQLite ([`store`]).
//! - [`index`]: exact int8 scan and HNSW vector search; [`ranking`]: the scoring rules.
//! - [`SyncClient`]: the gRPC client that trades deltas for global patterns; the device token
//!   it registers for is kept in the brain ([`registration`]).
//! - [`ffi`]: the C ABI (`include/omega.h`).

pub mod assets;
pub mod brain;
pub mod catalogue;
pub mod embedder;
pub mod error;
pub mod ffi;
mod global_cache;
pub mod index;
mod local;
mod outbox;
mod ranker;
pub mod ranking;
pub mod registration;
pub mod store;
pub mod sync;

pub use brain::{Brain, BrainConfig, BrainStats, ObserveOutcome, RecommendContext};
pub use catalogue::{Catalogue, CatalogueItem};
pub use embedder::{Embedder, EmbedderConfig};
pub use error::{DeviceError, ErrorCode, Result};
pub use ranking::{RankingParams, Recommendation, Source, UNKNOWN_SCORE};
pub use registration::DeviceRegistration;
pub use sync::{Registration, SyncClient, SyncConfig, SyncReport};
