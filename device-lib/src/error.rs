//! The crate's one error type and its stable codes; the C ABI maps each code to its integer
//! (`OMEGA_ERR_*`, see `ffi`).

use omega_protocol::ValidationError;
use std::path::PathBuf;

/// Everything that can go wrong in the device library.
///
/// Each variant has one stable [`ErrorCode`] ([`DeviceError::code`]); the C ABI gives each
/// code its integer (`omega.h`), and neither ever changes meaning.
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

/// What kind of failure a [`DeviceError`] is: stable across versions, one per variant, so
/// callers (and the C ABI) branch on it, never on a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// [`DeviceError::Invalid`].
    Invalid,
    /// [`DeviceError::Json`].
    Json,
    /// [`DeviceError::Asset`].
    Asset,
    /// [`DeviceError::Embedding`].
    Embedding,
    /// [`DeviceError::Database`].
    Database,
    /// [`DeviceError::SchemaTooNew`].
    SchemaTooNew,
    /// [`DeviceError::ModelMismatch`].
    ModelMismatch,
    /// [`DeviceError::State`].
    State,
    /// [`DeviceError::Unavailable`].
    Unavailable,
    /// [`DeviceError::Rejected`].
    Rejected,
    /// [`DeviceError::DeviceIdTaken`].
    DeviceIdTaken,
    /// [`DeviceError::SyncConfig`].
    SyncConfig,
    /// [`DeviceError::Null`].
    Null,
    /// [`DeviceError::Internal`].
    Internal,
}

impl DeviceError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DeviceError::Invalid(_) => ErrorCode::Invalid,
            DeviceError::Json(_) => ErrorCode::Json,
            DeviceError::Asset { .. } | DeviceError::AssetNotConfigured { .. } => ErrorCode::Asset,
            DeviceError::Embedding(_) => ErrorCode::Embedding,
            DeviceError::Database { .. } => ErrorCode::Database,
            DeviceError::SchemaTooNew { .. } => ErrorCode::SchemaTooNew,
            DeviceError::ModelMismatch { .. } => ErrorCode::ModelMismatch,
            DeviceError::State(_) => ErrorCode::State,
            DeviceError::Unavailable { .. } => ErrorCode::Unavailable,
            DeviceError::Rejected { .. } => ErrorCode::Rejected,
            DeviceError::DeviceIdTaken { .. } => ErrorCode::DeviceIdTaken,
            DeviceError::SyncConfig(_) => ErrorCode::SyncConfig,
            DeviceError::Null(_) => ErrorCode::Null,
            DeviceError::Internal(_) => ErrorCode::Internal,
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
    fn each_variant_has_its_own_code() {
        let cases: Vec<(DeviceError, ErrorCode)> = vec![
            (ValidationError::Missing { field: "f".into() }.into(), ErrorCode::Invalid),
            (serde_json::from_str::<u8>("x").expect_err("bad").into(), ErrorCode::Json),
            (
                DeviceError::Asset { what: "model", path: "m".into(), reason: "r".into() },
                ErrorCode::Asset,
            ),
            (DeviceError::Embedding("e".into()), ErrorCode::Embedding),
            (DeviceError::db("p", "r"), ErrorCode::Database),
            (
                DeviceError::SchemaTooNew { path: "p".into(), found: 2, supported: 1 },
                ErrorCode::SchemaTooNew,
            ),
            (
                DeviceError::ModelMismatch { expected: "a".into(), got: "b".into() },
                ErrorCode::ModelMismatch,
            ),
            (DeviceError::State("s".into()), ErrorCode::State),
            (DeviceError::Unavailable { attempts: 1, message: "m".into() }, ErrorCode::Unavailable),
            (
                DeviceError::Rejected { code: tonic::Code::Unauthenticated, message: "m".into() },
                ErrorCode::Rejected,
            ),
            (DeviceError::SyncConfig("c".into()), ErrorCode::SyncConfig),
            (DeviceError::DeviceIdTaken { device_id: "tv".into() }, ErrorCode::DeviceIdTaken),
            (DeviceError::Null("out"), ErrorCode::Null),
            (DeviceError::Internal("i".into()), ErrorCode::Internal),
        ];
        let mut seen = std::collections::HashSet::new();
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
            assert!(seen.insert(code), "codes are distinct");
            assert!(!err.to_string().is_empty());
        }
    }
}
