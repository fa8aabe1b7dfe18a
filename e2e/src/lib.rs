//! Omega fleet simulator, load generator and end-to-end tests.

pub mod eval;
pub mod movielens;
