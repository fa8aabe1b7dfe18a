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

/// Looks up an environment variable; empty counts as unset.
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

/// Where the walk up for `.omega-cache/` starts: the working directory, then this crate.
fn starts() -> Vec<PathBuf> {
    [std::env::current_dir().ok(), Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")))]
        .into_iter()
        .flatten()
        .collect()
}

/// The asset cache folder, if one can be found.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(&process_env, &starts())
}

fn cache_dir_from(env: Env<'_>, starts: &[PathBuf]) -> Option<PathBuf> {
    if let Some(dir) = env("OMEGA_CACHE").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    starts
        .iter()
        .find_map(|start| start.ancestors().map(|d| d.join(".omega-cache")).find(|c| c.is_dir()))
}

fn resolve_from(env: Env<'_>, starts: &[PathBuf], var: &str, in_cache: &str) -> PathBuf {
    if let Some(p) = env(var).filter(|s| !s.is_empty()) {
        return PathBuf::from(p);
    }
    match cache_dir_from(env, starts) {
        Some(c) => c.join(in_cache),
        // Nothing found: name the expected place so the error message says where to look.
        None => Path::new(".omega-cache").join(in_cache),
    }
}

fn resolve(var: &str, in_cache: &str) -> PathBuf {
    resolve_from(&process_env, &starts(), var, in_cache)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
        let none: Vec<PathBuf> = Vec::new();
        assert_eq!(
            resolve_from(&env, &none, "ORT_DYLIB_PATH", ORT_IN_CACHE),
            Path::new("/opt/ort.so")
        );
        assert_eq!(
            resolve_from(&env, &none, "OMEGA_MODEL_PATH", MODEL_IN_CACHE),
            Path::new("/m.onnx")
        );
        assert_eq!(
            resolve_from(&env, &none, "OMEGA_TOKENIZER_PATH", TOKENIZER_IN_CACHE),
            Path::new("/t.json")
        );
        // Without the file's own variable: under $OMEGA_CACHE.
        let env = env_of(&[("OMEGA_CACHE", "/cache"), ("OMEGA_MODEL_PATH", "")]);
        assert_eq!(
            resolve_from(&env, &none, "OMEGA_MODEL_PATH", MODEL_IN_CACHE),
            Path::new("/cache/minilm/model.onnx"),
            "an empty variable counts as unset"
        );
    }

    #[test]
    fn the_cache_is_found_by_walking_up_else_named_relative() {
        let root = tempfile::tempdir().expect("tempdir");
        let deep = root.path().join("repo/device-lib/src/deeper");
        std::fs::create_dir_all(&deep).expect("mkdir");
        let no_env = env_of(&[]);
        assert_eq!(cache_dir_from(&no_env, std::slice::from_ref(&deep)), None);
        assert_eq!(
            resolve_from(&no_env, std::slice::from_ref(&deep), "X", TOKENIZER_IN_CACHE),
            Path::new(".omega-cache/minilm/tokenizer.json")
        );
        let cache = root.path().join("repo/.omega-cache");
        std::fs::create_dir_all(&cache).expect("mkdir");
        assert_eq!(cache_dir_from(&no_env, std::slice::from_ref(&deep)), Some(cache.clone()));
        // The first start that finds one wins.
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let starts = [elsewhere.path().to_path_buf(), deep.clone()];
        assert_eq!(cache_dir_from(&no_env, &starts), Some(cache.clone()));
        assert_eq!(
            resolve_from(&no_env, &starts, "ORT_DYLIB_PATH", ORT_IN_CACHE),
            cache.join(ORT_IN_CACHE)
        );
        // $OMEGA_CACHE beats the walk.
        let env = env_of(&[("OMEGA_CACHE", "/elsewhere")]);
        assert_eq!(cache_dir_from(&env, &starts), Some(PathBuf::from("/elsewhere")));
    }
}
