//! Federation rounds as pure computation (what `omega-shard federate` runs between reading
//! the shards and publishing to them).
//!
//! A round takes every shard's quality patterns with their pseudonymous sources, groups the
//! patterns that mean the same thing, weighs them, keeps only groups that at least
//! `min_sources` distinct devices back (k-anonymity), optionally adds Gaussian noise for
//! (ε, δ)-differential privacy, and detects rising content and embedding regions per region.
//!
//! Every step is a function with table tests — [`intake`] (what is read), [`group`] (what
//! means the same thing), [`aggregate`] (weighting, k-anonymity, collaborative profiles),
//! [`collab`] (collaborative item vectors), [`privacy`] (noise and its accounting),
//! [`trends`], and [`round::federate`] tying them together. No I/O: streaming from shards,
//! publishing, checkpoints and metrics live in `omega-shard`'s federation runner.

pub mod aggregate;
pub mod collab;
pub mod group;
pub mod intake;
pub mod privacy;
pub mod round;
pub mod trends;

pub use round::{RoundConfig, RoundOutput, federate};
