//! Text → 384-dim unit vector with all-MiniLM-L6-v2 (int8 ONNX).
//!
//! Two backends run the model, chosen by cargo feature and [`EmbedderConfig::backend`]:
//! - `onnxruntime` (feature `onnxruntime`, the default): ONNX Runtime, loaded at run time
//!   from `libonnxruntime.so` ([`onnxruntime`]);
//! - `tract` (feature `tract`): pure Rust, no native library, for targets ONNX Runtime does
//!   not ship for (32-bit ARM, WebAssembly) ([`tract`]). Same weights and arithmetic in
//!   standard operators: its embeddings are within cosine 0.99 of ONNX Runtime's (a test).
//!
//! One [`Embedder`] holds one loaded model (~23 MB of int8 weights) and is shared by every
//! brain of a process (`Arc<Embedder>`): the fleet simulator runs ~943 brains on one. The
//! model is run under a mutex; one intra-op thread by default, because a TV has other work
//! to do and a single 10-token text does not parallelise well.

#[cfg(not(any(feature = "onnxruntime", feature = "tract")))]
compile_error!("omega-device needs an embedder backend: enable feature `onnxruntime` or `tract`");

#[cfg(feature = "onnxruntime")]
mod onnxruntime;
#[cfg(feature = "tract")]
mod tract;

use crate::assets;
use crate::error::{DeviceError, Result};
use lru::LruCache;
use omega_protocol::validate::{self, ValidationError};
use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize};
use serde::{Deserialize, Serialize};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use tokenizers::Tokenizer;

/// Longest text the tokenizer sees, in bytes: 128 tokens never need more, and it bounds the
/// work an oversized input can cause.
const MAX_TEXT_BYTES: usize = 4096;

/// Which engine runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbedderBackend {
    /// ONNX Runtime (`libonnxruntime.so`, feature `onnxruntime`).
    Onnxruntime,
    /// tract, pure Rust (feature `tract`).
    Tract,
}

impl EmbedderBackend {
    /// `OMEGA_EMBEDDER_BACKEND` (`onnxruntime` or `tract`) when set, else ONNX Runtime when
    /// it is compiled in, else tract.
    pub fn from_env_or_build() -> Self {
        match std::env::var("OMEGA_EMBEDDER_BACKEND").as_deref() {
            Ok("tract") => EmbedderBackend::Tract,
            Ok("onnxruntime") => EmbedderBackend::Onnxruntime,
            _ if cfg!(feature = "onnxruntime") => EmbedderBackend::Onnxruntime,
            _ => EmbedderBackend::Tract,
        }
    }

    /// The backends compiled into this library.
    pub fn compiled() -> Vec<EmbedderBackend> {
        let mut v = Vec::new();
        if cfg!(feature = "onnxruntime") {
            v.push(EmbedderBackend::Onnxruntime);
        }
        if cfg!(feature = "tract") {
            v.push(EmbedderBackend::Tract);
        }
        v
    }
}

/// How to load the model. A path left out comes from its environment variable
/// ([`crate::assets`]); there is no other fallback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbedderConfig {
    /// Which engine runs the model (default: [`EmbedderBackend::from_env_or_build`]).
    pub backend: EmbedderBackend,
    /// The ONNX model: `minilm/model.onnx` for ONNX Runtime (`OMEGA_MODEL_PATH`),
    /// `minilm/model-tract.onnx` for tract (`OMEGA_TRACT_MODEL_PATH`); else under
    /// `$OMEGA_CACHE`.
    pub model_path: Option<PathBuf>,
    /// `tokenizer.json` (`OMEGA_TOKENIZER_PATH`, else under `$OMEGA_CACHE`).
    pub tokenizer_path: Option<PathBuf>,
    /// `libonnxruntime.so` (`ORT_DYLIB_PATH`, else under `$OMEGA_CACHE`; ONNX Runtime
    /// backend only). Only the first successful load of a process counts: ONNX Runtime is a
    /// process-wide singleton.
    pub ort_dylib_path: Option<PathBuf>,
    /// Intra-op threads of the ONNX Runtime session, 1-64 (tract always uses the calling
    /// thread).
    pub intra_threads: usize,
    /// Texts whose embeddings are kept (LRU), 1-1,000,000.
    pub cache_capacity: usize,
    /// Token limit, 2-512 (longer texts are truncated).
    pub max_tokens: usize,
    /// Identifier of the model, put on every delta.
    pub model_id: String,
    /// Memory-lean session: no CPU arena, no memory-pattern planning, no weight prepacking
    /// (`omega-device-bench` measures both settings). ONNX Runtime backend only.
    pub lean_memory: bool,
}

/// Largest `cache_capacity`: the LRU cache allocates its table up front.
const MAX_CACHE_CAPACITY: usize = 1_000_000;
/// Largest `max_tokens`: MiniLM has 512 positions.
const MAX_TOKENS_LIMIT: usize = 512;
/// Largest `intra_threads`.
const MAX_INTRA_THREADS: usize = 64;

impl EmbedderConfig {
    /// Checks every number against its range; `prefix` (e.g. `"embedder."`) names the fields
    /// as the caller's document spells them.
    pub fn check(&self, prefix: &str) -> Result<(), ValidationError> {
        for (field, v, min, max) in [
            ("intra_threads", self.intra_threads, 1, MAX_INTRA_THREADS),
            ("cache_capacity", self.cache_capacity, 1, MAX_CACHE_CAPACITY),
            ("max_tokens", self.max_tokens, 2, MAX_TOKENS_LIMIT),
        ] {
            validate::check_range(&format!("{prefix}{field}"), v as f64, min as f64, max as f64)?;
        }
        validate::check_required_string(&format!("{prefix}model_id"), &self.model_id)
    }
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        EmbedderConfig {
            backend: EmbedderBackend::from_env_or_build(),
            model_path: None,
            tokenizer_path: None,
            ort_dylib_path: None,
            intra_threads: 1,
            cache_capacity: 1024,
            max_tokens: 128,
            model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
            lean_memory: true,
        }
    }
}

/// The sentence embedder. `Send + Sync`; share it as `Arc<Embedder>`.
pub struct Embedder {
    model: Mutex<Model>,
    tokenizer: Tokenizer,
    cache: Mutex<LruCache<String, Arc<[f32]>>>,
    model_id: String,
    warming: AtomicBool,
    warmed: AtomicBool,
    /// Asks the pre-warm thread to stop after its current text.
    stop_warming: AtomicBool,
    prewarm: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("model_id", &self.model_id).finish_non_exhaustive()
    }
}

/// A loaded model, on one of the compiled backends.
enum Model {
    #[cfg(feature = "onnxruntime")]
    Onnxruntime(onnxruntime::OrtModel),
    #[cfg(feature = "tract")]
    Tract(tract::TractModel),
}

impl Model {
    fn hidden(
        &mut self,
        ids: Vec<i64>,
        mask: Vec<i64>,
        types: Vec<i64>,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        match self {
            #[cfg(feature = "onnxruntime")]
            Model::Onnxruntime(m) => m.hidden(ids, mask, types),
            #[cfg(feature = "tract")]
            Model::Tract(m) => m.hidden(ids, mask, types),
        }
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(DeviceError::Asset { what, path: path.to_path_buf(), reason: "no such file".into() })
    }
}

/// The configured path, else its environment variable, else an error saying what to set.
fn configured(
    given: Option<&PathBuf>,
    from_env: fn() -> Option<PathBuf>,
    what: &'static str,
    how: &'static str,
) -> Result<PathBuf> {
    given.cloned().or_else(from_env).ok_or(DeviceError::AssetNotConfigured { what, how })
}

/// Both backends need these inputs (`token_type_ids` is optional).
fn check_inputs(model_path: &Path, names: &[&str]) -> Result<()> {
    for needed in ["input_ids", "attention_mask"] {
        if !names.contains(&needed) {
            return Err(DeviceError::Asset {
                what: "model",
                path: model_path.to_path_buf(),
                reason: format!("no input {needed:?} (inputs: {names:?})"),
            });
        }
    }
    Ok(())
}

impl Embedder {
    /// Loads the tokenizer and the model on the configured backend (ONNX Runtime itself
    /// once per process).
    pub fn new(config: EmbedderConfig) -> Result<Self> {
        config.check("")?;
        let tokenizer_path = configured(
            config.tokenizer_path.as_ref(),
            assets::tokenizer_path,
            "tokenizer",
            "set embedder.tokenizer_path in the config, or OMEGA_TOKENIZER_PATH (or \
             OMEGA_CACHE, the asset folder)",
        )?;
        check_file("tokenizer", &tokenizer_path)?;
        let tokenizer = load_tokenizer(&tokenizer_path, config.max_tokens)?;
        let model = match config.backend {
            #[cfg(feature = "onnxruntime")]
            EmbedderBackend::Onnxruntime => {
                let model_path = configured(
                    config.model_path.as_ref(),
                    assets::model_path,
                    "model",
                    "set embedder.model_path in the config, or OMEGA_MODEL_PATH (or \
                     OMEGA_CACHE, the asset folder)",
                )?;
                let dylib = configured(
                    config.ort_dylib_path.as_ref(),
                    assets::ort_dylib_path,
                    "ONNX Runtime library",
                    "set embedder.ort_dylib_path in the config, or ORT_DYLIB_PATH (or \
                     OMEGA_CACHE, the asset folder)",
                )?;
                check_file("model", &model_path)?;
                Model::Onnxruntime(onnxruntime::OrtModel::load(
                    &model_path,
                    &dylib,
                    config.intra_threads,
                    config.lean_memory,
                )?)
            }
            #[cfg(feature = "tract")]
            EmbedderBackend::Tract => {
                let model_path = configured(
                    config.model_path.as_ref(),
                    assets::tract_model_path,
                    "model",
                    "set embedder.model_path in the config, or OMEGA_TRACT_MODEL_PATH (or \
                     OMEGA_CACHE, the asset folder)",
                )?;
                check_file("model", &model_path)?;
                Model::Tract(tract::TractModel::load(&model_path)?)
            }
            #[allow(unreachable_patterns)]
            other => {
                return Err(DeviceError::AssetNotConfigured {
                    what: "embedder backend",
                    how: match other {
                        EmbedderBackend::Onnxruntime => {
                            "this library was built without the onnxruntime feature: use \
                             backend \"tract\""
                        }
                        EmbedderBackend::Tract => {
                            "this library was built without the tract feature: use backend \
                             \"onnxruntime\""
                        }
                    },
                });
            }
        };
        let capacity = NonZeroUsize::new(config.cache_capacity).unwrap_or(NonZeroUsize::MIN);
        Ok(Embedder {
            model: Mutex::new(model),
            tokenizer,
            cache: Mutex::new(LruCache::new(capacity)),
            model_id: config.model_id,
            warming: AtomicBool::new(false),
            warmed: AtomicBool::new(false),
            stop_warming: AtomicBool::new(false),
            prewarm: Mutex::new(None),
        })
    }

    /// The model identifier put on every delta.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The L2-normalised embedding of `text` (384 f32). Repeated texts come from the cache.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        Ok(self.embed_shared(text)?.to_vec())
    }

    /// Like [`Embedder::embed`], without copying a cached vector.
    pub fn embed_shared(&self, text: &str) -> Result<Arc<[f32]>> {
        let text = clip(text, MAX_TEXT_BYTES);
        if let Some(hit) = lock(&self.cache)?.get(text) {
            return Ok(hit.clone());
        }
        let v: Arc<[f32]> = self.run(text)?.into();
        lock(&self.cache)?.put(text.to_owned(), v.clone());
        Ok(v)
    }

    /// Embeds `texts` into the cache on a background thread, once per embedder (later calls
    /// do nothing), so the first recommendations in each context do not wait for the model.
    /// Failures are ignored: the texts are simply embedded on first use.
    /// [`Embedder::stop_prewarm`] ends the thread early.
    pub fn prewarm_in_background(self: &Arc<Self>, texts: Vec<String>) {
        if self.warming.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("omega-prewarm".into()).spawn(move || {
            for t in texts {
                if me.stop_warming.load(Ordering::SeqCst) {
                    return;
                }
                let _ = me.embed_shared(&t);
            }
            me.warmed.store(true, Ordering::SeqCst);
        });
        match spawned {
            Ok(handle) => {
                *self.prewarm.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(handle);
            }
            Err(_) => self.warming.store(false, Ordering::SeqCst),
        }
    }

    /// Stops the background pre-warm after the text it is embedding and waits for its thread
    /// to end (no-op without one). A library must not leave a thread running inside the
    /// model runtime once its caller is done with it: at process exit, ONNX Runtime tears
    /// its state down under such a thread and reports errors. Texts not yet warmed are
    /// embedded on first use; a stopped embedder never pre-warms again.
    pub fn stop_prewarm(&self) {
        self.stop_warming.store(true, Ordering::SeqCst);
        let handle = self.prewarm.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(h) = handle {
            // A panic on the thread was already reported by the panic hook; nothing to add.
            let _ = h.join();
        }
    }

    /// True once a background pre-warm has finished.
    pub fn is_warm(&self) -> bool {
        self.warmed.load(Ordering::SeqCst)
    }

    /// Embeds without the cache (for one-off texts such as catalogue items).
    pub fn embed_uncached(&self, text: &str) -> Result<Vec<f32>> {
        self.run(clip(text, MAX_TEXT_BYTES))
    }

    fn run(&self, text: &str) -> Result<Vec<f32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| DeviceError::Embedding(format!("tokenizer: {e}")))?;
        let n = enc.get_ids().len();
        let ids: Vec<i64> = enc.get_ids().iter().map(|&x| i64::from(x)).collect();
        let mask: Vec<i64> = enc.get_attention_mask().iter().map(|&x| i64::from(x)).collect();
        let types: Vec<i64> = enc.get_type_ids().iter().map(|&x| i64::from(x)).collect();
        let (shape, hidden) = lock(&self.model)?.hidden(ids, mask.clone(), types)?;
        if shape != [1, n, EMBEDDING_DIM] {
            return Err(DeviceError::Embedding(format!(
                "unexpected output shape {shape:?}, expected [1, {n}, {EMBEDDING_DIM}]"
            )));
        }
        mean_pool_normalised(&hidden, &mask)
    }
}

/// Mean of the token vectors the mask keeps, scaled to unit length.
fn mean_pool_normalised(hidden: &[f32], mask: &[i64]) -> Result<Vec<f32>> {
    let mut acc = vec![0.0f32; EMBEDDING_DIM];
    let mut kept = 0usize;
    for (token, &m) in hidden.chunks_exact(EMBEDDING_DIM).zip(mask) {
        if m != 0 {
            acc.iter_mut().zip(token).for_each(|(a, x)| *a += x);
            kept += 1;
        }
    }
    if kept == 0 || !l2_normalize(&mut acc) || acc.iter().any(|x| !x.is_finite()) {
        return Err(DeviceError::Embedding(
            "the model produced a zero or non-finite vector".into(),
        ));
    }
    Ok(acc)
}

fn load_tokenizer(path: &Path, max_tokens: usize) -> Result<Tokenizer> {
    let asset =
        |reason: String| DeviceError::Asset { what: "tokenizer", path: path.to_path_buf(), reason };
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| asset(e.to_string()))?;
    // The shipped tokenizer.json pads to 128: padding costs ~60x the time of a short text.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_tokens,
            ..Default::default()
        }))
        .map_err(|e| asset(e.to_string()))?;
    Ok(tokenizer)
}

fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| DeviceError::Internal("embedder lock poisoned".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("abc", 10), "abc");
    }

    #[test]
    fn mean_pool_ignores_masked_tokens_and_normalises() {
        let mut hidden = vec![0.0f32; 2 * EMBEDDING_DIM];
        hidden[0] = 3.0;
        hidden[EMBEDDING_DIM + 1] = 100.0;
        let v = mean_pool_normalised(&hidden, &[1, 0]).expect("pooled");
        assert!((v[0] - 1.0).abs() < 1e-6 && v[1] == 0.0);
        assert!(mean_pool_normalised(&hidden, &[0, 0]).is_err());
    }
}
