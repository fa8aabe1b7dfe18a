//! The crate's one error type, and the integer codes it maps to at the C boundary.

use crate::ffi;
use omega_protocol::ValidationError;
use std::path::PathBuf;

/// Everything that can go wrong in the device library.
///
/// Each variant maps to one stable C error code ([`DeviceError::code`]); the codes are part
/// of the C ABI (`omega.h`) and never change meaning.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An input broke a limit of the contract (size, range, NaN…).
    #[error("invalid input: {0}")]
    Invalid(#[from] ValidationError),
    /// JSON that does not parse, or fields of the wrong type.
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A run-time asset (model, tokenizer, ONNX Runtime library) is missing or unusable.
    #[error("{what} unusable at {path}: {reason} (run `scripts/assets.py fetch` to fetch it)")]
    Asset {
        /// Which asset.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No path was given for a run-time asset: neither the config nor the environment names
    /// it (the library never guesses a location).
    #[error("{what} not configured: {how}")]
    AssetNotConfigured {
        /// Which asset.
        what: &'static str,
        /// The config field and environment variables that can name it.
        how: &'static str,
    },
    /// ONNX Runtime or the tokenizer failed while embedding.
    #[error("embedding failed: {0}")]
    Embedding(String),
    /// The database file is unreadable, corrupt, or a write failed. The file is left as it is.
    #[error("database {path}: {reason}")]
    Database {
        /// The database file (`:memory:` for an in-memory brain).
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The database was written by a newer version of this library; it is left untouched.
    #[error(
        "database {path} has schema version {found}, newer than the {supported} this library \
         supports; upgrade the library (the file was not modified)"
    )]
    SchemaTooNew {
        /// The database file.
        path: String,
        /// Schema version found in the file.
        found: i64,
        /// Newest schema version this library knows.
        supported: i64,
    },
    /// Embeddings of different models never mix.
    #[error("model mismatch: expected {expected:?}, got {got:?}")]
    ModelMismatch {
        /// Model this brain uses.
        expected: String,
        /// Model of the offending data.
        got: String,
    },
    /// An acknowledgement or request that does not fit the brain's state.
    #[error("invalid state: {0}")]
    State(String),
    /// The shard could not be reached (or kept failing) within the retry budget.
    #[error("shard unavailable after {attempts} attempt(s): {message}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// Last error.
        message: String,
    },
    /// The shard answered with a non-retryable gRPC error.
    #[error("shard refused the request: {code:?}: {message}")]
    Rejected {
        /// gRPC status code.
        code: tonic::Code,
        /// Message from the shard.
        message: String,
    },
    /// The shard knows this device id already and the brain holds no token for it, so it
    /// refuses to register the id again. Retrying cannot help; nothing local was changed.
    #[error(
        "device id {device_id:?} is already registered with the shard and this brain holds no \
         token for it: the id belongs to another device, or its token was lost (a database \
         restored without it, or an earlier registration whose answer never arrived). Nothing \
         local was changed. To sync again, the shard's operator must remove the device, or the TV \
         must start over with a new database and device id"
    )]
    DeviceIdTaken {
        /// The device id.
        device_id: String,
    },
    /// The sync endpoint or TLS settings are unusable.
    #[error("sync configuration: {0}")]
    SyncConfig(String),
    /// A required pointer argument of a C call was NULL.
    #[error("{0} is NULL")]
    Null(&'static str),
    /// A bug: a panic caught at the C boundary, a poisoned lock.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result with [`DeviceError`].
pub type Result<T, E = DeviceError> = std::result::Result<T, E>;

impl DeviceError {
    /// The C error code of this error (see `OMEGA_ERR_*` in `omega.h`).
    pub fn code(&self) -> i32 {
        match self {
            DeviceError::Invalid(_) => ffi::OMEGA_ERR_INVALID,
            DeviceError::Json(_) => ffi::OMEGA_ERR_JSON,
            DeviceError::Asset { .. } | DeviceError::AssetNotConfigured { .. } => {
                ffi::OMEGA_ERR_ASSET
            }
            DeviceError::Embedding(_) => ffi::OMEGA_ERR_EMBEDDING,
            DeviceError::Database { .. } => ffi::OMEGA_ERR_DATABASE,
            DeviceError::SchemaTooNew { .. } => ffi::OMEGA_ERR_SCHEMA_TOO_NEW,
            DeviceError::ModelMismatch { .. } => ffi::OMEGA_ERR_MODEL_MISMATCH,
            DeviceError::State(_) => ffi::OMEGA_ERR_STATE,
            DeviceError::Unavailable { .. } => ffi::OMEGA_ERR_UNAVAILABLE,
            DeviceError::Rejected { .. } => ffi::OMEGA_ERR_REJECTED,
            DeviceError::DeviceIdTaken { .. } => ffi::OMEGA_ERR_DEVICE_ID_TAKEN,
            DeviceError::SyncConfig(_) => ffi::OMEGA_ERR_SYNC_CONFIG,
            DeviceError::Null(_) => ffi::OMEGA_ERR_NULL,
            DeviceError::Internal(_) => ffi::OMEGA_ERR_INTERNAL,
        }
    }

    pub(crate) fn db(path: &str, e: impl std::fmt::Display) -> Self {
        DeviceError::Database { path: path.into(), reason: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_has_its_own_c_code() {
        let cases: Vec<(DeviceError, i32)> = vec![
            (ValidationError::Missing { field: "f".into() }.into(), ffi::OMEGA_ERR_INVALID),
            (serde_json::from_str::<u8>("x").expect_err("bad").into(), ffi::OMEGA_ERR_JSON),
            (
                DeviceError::Asset { what: "model", path: "m".into(), reason: "r".into() },
                ffi::OMEGA_ERR_ASSET,
            ),
            (DeviceError::Embedding("e".into()), ffi::OMEGA_ERR_EMBEDDING),
            (DeviceError::db("p", "r"), ffi::OMEGA_ERR_DATABASE),
            (
                DeviceError::SchemaTooNew { path: "p".into(), found: 2, supported: 1 },
                ffi::OMEGA_ERR_SCHEMA_TOO_NEW,
            ),
            (
                DeviceError::ModelMismatch { expected: "a".into(), got: "b".into() },
                ffi::OMEGA_ERR_MODEL_MISMATCH,
            ),
            (DeviceError::State("s".into()), ffi::OMEGA_ERR_STATE),
            (
                DeviceError::Unavailable { attempts: 1, message: "m".into() },
                ffi::OMEGA_ERR_UNAVAILABLE,
            ),
            (
                DeviceError::Rejected { code: tonic::Code::Unauthenticated, message: "m".into() },
                ffi::OMEGA_ERR_REJECTED,
            ),
            (DeviceError::SyncConfig("c".into()), ffi::OMEGA_ERR_SYNC_CONFIG),
            (DeviceError::DeviceIdTaken { device_id: "tv".into() }, ffi::OMEGA_ERR_DEVICE_ID_TAKEN),
            (DeviceError::Null("out"), ffi::OMEGA_ERR_NULL),
            (DeviceError::Internal("i".into()), ffi::OMEGA_ERR_INTERNAL),
        ];
        let mut seen = std::collections::HashSet::new();
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
            assert!(code < 0 && seen.insert(code), "codes are negative and distinct");
            assert!(!err.to_string().is_empty());
        }
    }
}
