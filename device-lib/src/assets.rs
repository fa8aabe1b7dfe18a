//! Where the run-time assets are: environment variables first, then the asset cache.
//!
//! The contract (docs/architecture.md): `ORT_DYLIB_PATH`, `OMEGA_MODEL_PATH`,
//! `OMEGA_TOKENIZER_PATH`; otherwise `$OMEGA_CACHE`, else the first `.omega-cache/` found walking
//! up from the current directory (and from this crate's source folder, so tests and the bench
//! find it from any working directory inside the repository).

use std::path::{Path, PathBuf};

/// ONNX Runtime library file under the cache.
pub const ORT_IN_CACHE: &str = "onnxruntime/libonnxruntime.so.1.31.1";
/// Converted MiniLM model under the cache.
pub const MODEL_IN_CACHE: &str = "minilm/model.onnx";
/// Tokenizer under the cache.
pub const TOKENIZER_IN_CACHE: &str = "minilm/tokenizer.json";

/// The asset cache folder, if one can be found.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = non_empty_env("OMEGA_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let starts = [std::env::current_dir().ok(), Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")))];
    starts
        .into_iter()
        .flatten()
        .find_map(|start| start.ancestors().map(|d| d.join(".omega-cache")).find(|c| c.is_dir()))
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

fn resolve(env: &str, in_cache: &str) -> PathBuf {
    if let Some(p) = non_empty_env(env) {
        return PathBuf::from(p);
    }
    match cache_dir() {
        Some(c) => c.join(in_cache),
        // Nothing found: name the expected place so the error message says where to look.
        None => Path::new(".omega-cache").join(in_cache),
    }
}

/// `ORT_DYLIB_PATH`, else the cache's ONNX Runtime library.
pub fn ort_dylib_path() -> PathBuf {
    resolve("ORT_DYLIB_PATH", ORT_IN_CACHE)
}

/// `OMEGA_MODEL_PATH`, else the cache's converted model.
pub fn model_path() -> PathBuf {
    resolve("OMEGA_MODEL_PATH", MODEL_IN_CACHE)
}

/// `OMEGA_TOKENIZER_PATH`, else the cache's tokenizer.
pub fn tokenizer_path() -> PathBuf {
    resolve("OMEGA_TOKENIZER_PATH", TOKENIZER_IN_CACHE)
}
