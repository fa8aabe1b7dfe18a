//! Omega's wire contract, shared by the TV (`omega-device`), the shard server (`omega-shard`),
//! the federation job and the operator.
//!
//! - [`pb`]: the `omega.v1` protobuf messages and gRPC stubs (client and server).
//! - [`types`]: the domain vocabulary (ViewingEvent, Pattern, PatternDelta, …) and its
//!   conversions to and from the wire. Decoding always validates.
//! - [`vector`]: int8 quantisation with one scale per vector, and the dot products both
//!   sides use to search embeddings.
//! - [`validate`]: every hard limit of the contract, in one place.
//! - [`wire`]: measuring what a message costs on the wire (encoded, zstd-compressed).
//! - [`collab`]: the collaborative scoring rule (a viewer's query against federated item
//!   vectors), shared by TVs, shards and the evaluation harness.
//! - [`admin`]: JSON documents other programs read (shard stats, federation round summary).

pub mod admin;
pub mod collab;
pub mod types;
pub mod validate;
pub mod vector;
pub mod wire;

/// Generated `omega.v1` messages and services.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("omega.v1");
}

pub use types::{
    AggregatedPattern, ContentType, DayType, GlobalPatterns, Pattern, PatternContext, PatternDelta,
    PatternUpdate, TimeSlot, TrendSignal, TrendTarget, ViewingContext, ViewingEvent,
};
pub use validate::ValidationError;

/// Identifier of the embedding model every Omega component uses by default: all-MiniLM-L6-v2,
/// int8 weights, converted by `scripts/convert_model.py` (the suffix is the start of the
/// converted file's sha256). Embeddings from different models never mix.
pub const DEFAULT_MODEL_ID: &str = "all-minilm-l6-v2-int8dq-c5925319";
