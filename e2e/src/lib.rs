//! Omega fleet simulator, load generator and end-to-end tests.
