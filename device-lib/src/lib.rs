//! The on-device brain of Omega.
