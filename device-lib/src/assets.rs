//! Where the run-time assets are: the config first, then explicit environment variables.
//!
//! The contract (docs/architecture.md, docs/c-sdk.md): a path in the embedder config wins;
//! otherwise `ORT_DYLIB_PATH`, `OMEGA_MODEL_PATH`, `OMEGA_TOKENIZER_PATH`
//! (`OMEGA_TRACT_MODEL_PATH` for the pure-Rust backend's model); otherwise the file's place
//! under `$OMEGA_CACHE`. Nothing else: no search of the working directory and no path of the
//! build machine, so a library on a TV never picks up a file by accident, and a missing
//! setting is an error naming what to set ([`crate::DeviceError::AssetNotConfigured`]).

use std::path::PathBuf;

/// ONNX Runtime library file under the cache.
pub const ORT_IN_CACHE: &str = "onnxruntime/libonnxruntime.so.1.31.1";
/// Converted MiniLM model (for ONNX Runtime) under the cache.
pub const MODEL_IN_CACHE: &str = "minilm/model.onnx";
/// MiniLM model in standard ONNX operators (for the pure-Rust backend) under the cache.
pub const TRACT_MODEL_IN_CACHE: &str = "minilm/model-tract.onnx";
/// Tokenizer under the cache.
pub const TOKENIZER_IN_CACHE: &str = "minilm/tokenizer.json";

/// Looks up an environment variable; empty counts as unset.
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

/// `$OMEGA_CACHE`, the folder `scripts/assets.py` fills, when it is set.
pub fn cache_dir() -> Option<PathBuf> {
    process_env("OMEGA_CACHE").map(PathBuf::from)
}

fn resolve_from(env: Env<'_>, var: &str, in_cache: &str) -> Option<PathBuf> {
    if let Some(p) = env(var).filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p));
    }
    env("OMEGA_CACHE").filter(|s| !s.is_empty()).map(|c| PathBuf::from(c).join(in_cache))
}

/// `ORT_DYLIB_PATH`, else the ONNX Runtime library under `$OMEGA_CACHE`.
pub fn ort_dylib_path() -> Option<PathBuf> {
    resolve_from(&process_env, "ORT_DYLIB_PATH", ORT_IN_CACHE)
}

/// `OMEGA_MODEL_PATH`, else the model under `$OMEGA_CACHE`.
pub fn model_path() -> Option<PathBuf> {
    resolve_from(&process_env, "OMEGA_MODEL_PATH", MODEL_IN_CACHE)
}

/// `OMEGA_TRACT_MODEL_PATH`, else the pure-Rust backend's model under `$OMEGA_CACHE`.
pub fn tract_model_path() -> Option<PathBuf> {
    resolve_from(&process_env, "OMEGA_TRACT_MODEL_PATH", TRACT_MODEL_IN_CACHE)
}

/// `OMEGA_TOKENIZER_PATH`, else the tokenizer under `$OMEGA_CACHE`.
pub fn tokenizer_path() -> Option<PathBuf> {
    resolve_from(&process_env, "OMEGA_TOKENIZER_PATH", TOKENIZER_IN_CACHE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn each_variable_overrides_the_cache() {
        let env = env_of(&[
            ("ORT_DYLIB_PATH", "/opt/ort.so"),
            ("OMEGA_MODEL_PATH", "/m.onnx"),
            ("OMEGA_TOKENIZER_PATH", "/t.json"),
            ("OMEGA_CACHE", "/cache"),
        ]);
        assert_eq!(
            resolve_from(&env, "ORT_DYLIB_PATH", ORT_IN_CACHE).as_deref(),
            Some(Path::new("/opt/ort.so"))
        );
        assert_eq!(
            resolve_from(&env, "OMEGA_MODEL_PATH", MODEL_IN_CACHE).as_deref(),
            Some(Path::new("/m.onnx"))
        );
        assert_eq!(
            resolve_from(&env, "OMEGA_TOKENIZER_PATH", TOKENIZER_IN_CACHE).as_deref(),
            Some(Path::new("/t.json"))
        );
        // Without the file's own variable: under $OMEGA_CACHE.
        let env = env_of(&[("OMEGA_CACHE", "/cache"), ("OMEGA_MODEL_PATH", "")]);
        assert_eq!(
            resolve_from(&env, "OMEGA_MODEL_PATH", MODEL_IN_CACHE).as_deref(),
            Some(Path::new("/cache/minilm/model.onnx")),
            "an empty variable counts as unset"
        );
    }

    #[test]
    fn nothing_is_guessed_without_a_variable() {
        // Run from inside the repository (which has an asset cache), with nothing set: no
        // path at all, rather than one found by looking around.
        let none = env_of(&[("OMEGA_CACHE", "")]);
        for (var, in_cache) in [
            ("ORT_DYLIB_PATH", ORT_IN_CACHE),
            ("OMEGA_MODEL_PATH", MODEL_IN_CACHE),
            ("OMEGA_TRACT_MODEL_PATH", TRACT_MODEL_IN_CACHE),
            ("OMEGA_TOKENIZER_PATH", TOKENIZER_IN_CACHE),
        ] {
            assert_eq!(resolve_from(&none, var, in_cache), None, "{var}");
        }
    }
}
