//! Omega fleet simulator, load generator and end-to-end tests.
//!
//! - [`sim`]: `omega-sim`, the fleet simulator on MovieLens-100K (the project's main job).
//! - [`load`]: `omega-load`, a gRPC load generator for one shard server.
//! - [`movielens`] and [`eval`]: the MovieLens-100K loader and the NCF / PFedRec evaluation
//!   harness (baselines, the federation's offline quality, report writers).

pub mod eval;
pub mod load;
pub mod movielens;
pub mod sim;
