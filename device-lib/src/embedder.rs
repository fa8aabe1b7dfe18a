//! Text → 384-dim unit vector with all-MiniLM-L6-v2 (int8 ONNX) through ONNX Runtime.
//!
//! One [`Embedder`] holds one ONNX Runtime session (~23 MB of int8 weights) and is shared by
//! every brain of a process (`Arc<Embedder>`): the fleet simulator runs ~943 brains on one.
//! The session is run under a mutex; one intra-op thread by default, because a TV has other
//! work to do and a single 10-token text does not parallelise well.
//!
//! Memory: ONNX Runtime's CPU arena and memory-pattern planner keep freed buffers for reuse;
//! for one short sequence at a time they only add resident memory, so both are off. Weight
//! prepacking is off as well: it copies every `MatMul` weight into a second, packed layout.
//! `omega-device-bench` reports the resulting peak RSS.

use crate::assets;
use crate::error::{DeviceError, Result};
use lru::LruCache;
use omega_protocol::validate::{self, ValidationError};
use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use serde::{Deserialize, Serialize};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tokenizers::Tokenizer;

/// Longest text the tokenizer sees, in bytes: 128 tokens never need more, and it bounds the
/// work an oversized input can cause.
const MAX_TEXT_BYTES: usize = 4096;

/// How to load the model. Every path defaults to the environment / asset cache
/// ([`crate::assets`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbedderConfig {
    /// The ONNX model (`OMEGA_MODEL_PATH`, else `.omega-cache/minilm/model.onnx`).
    pub model_path: Option<PathBuf>,
    /// `tokenizer.json` (`OMEGA_TOKENIZER_PATH`, else the cache).
    pub tokenizer_path: Option<PathBuf>,
    /// `libonnxruntime.so` (`ORT_DYLIB_PATH`, else the cache). Only the first successful
    /// load of a process counts: ONNX Runtime is a process-wide singleton.
    pub ort_dylib_path: Option<PathBuf>,
    /// Intra-op threads of the session, 1-64.
    pub intra_threads: usize,
    /// Texts whose embeddings are kept (LRU), 1-1,000,000.
    pub cache_capacity: usize,
    /// Token limit, 2-512 (longer texts are truncated).
    pub max_tokens: usize,
    /// Identifier of the model, put on every delta.
    pub model_id: String,
    /// Memory-lean session: no CPU arena, no memory-pattern planning, no weight prepacking
    /// (`omega-device-bench` measures both settings).
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
    session: Mutex<Session>,
    tokenizer: Tokenizer,
    wants_token_types: bool,
    cache: Mutex<LruCache<String, Arc<[f32]>>>,
    model_id: String,
    warming: std::sync::atomic::AtomicBool,
    warmed: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("model_id", &self.model_id).finish_non_exhaustive()
    }
}

static ORT_ENV: Mutex<Option<ort::environment::Environment>> = Mutex::new(None);

/// The process's ONNX Runtime environment, loading the library on first use. A failed load
/// leaves nothing behind, so a later call with a correct path still works.
fn ort_environment(dylib: &Path) -> Result<ort::environment::Environment> {
    let asset = |reason: String| DeviceError::Asset {
        what: "ONNX Runtime library",
        path: dylib.to_path_buf(),
        reason,
    };
    if !dylib.is_file() {
        return Err(asset("no such file".into()));
    }
    let mut env = ORT_ENV.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    let built = ort::init_from(dylib)
        .map_err(|e| asset(e.to_string()))?
        .with_name("omega")
        .with_telemetry(false)
        .build()
        .map_err(|e| asset(e.to_string()))?;
    *env = Some(built.clone());
    Ok(built)
}

fn check_file(what: &'static str, path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(DeviceError::Asset { what, path: path.to_path_buf(), reason: "no such file".into() })
    }
}

impl Embedder {
    /// Loads ONNX Runtime (once per process), the tokenizer and the model.
    pub fn new(config: EmbedderConfig) -> Result<Self> {
        config.check("")?;
        let model_path = config.model_path.clone().unwrap_or_else(assets::model_path);
        let tokenizer_path = config.tokenizer_path.clone().unwrap_or_else(assets::tokenizer_path);
        let dylib = config.ort_dylib_path.clone().unwrap_or_else(assets::ort_dylib_path);
        check_file("tokenizer", &tokenizer_path)?;
        check_file("model", &model_path)?;
        let tokenizer = load_tokenizer(&tokenizer_path, config.max_tokens)?;
        let env = ort_environment(&dylib)?;
        let model_err = |e: ort::Error| DeviceError::Asset {
            what: "model",
            path: model_path.clone(),
            reason: e.to_string(),
        };
        let opt = |e: ort::Error<ort::session::builder::SessionBuilder>| model_err(e.into());
        let lean = config.lean_memory;
        let cpu = ort::ep::CPU::default().with_arena_allocator(!lean).build();
        let session = Session::builder(&env)
            .map_err(model_err)?
            .with_execution_providers([cpu])
            .map_err(opt)?
            .with_intra_threads(config.intra_threads)
            .map_err(opt)?
            .with_inter_threads(1)
            .map_err(opt)?
            .with_memory_pattern(!lean)
            .map_err(opt)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(opt)?
            .with_config_entry("session.disable_prepacking", if lean { "1" } else { "0" })
            .map_err(opt)?
            .commit_from_file(&model_path)
            .map_err(model_err)?;
        let names: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        for needed in ["input_ids", "attention_mask"] {
            if !names.contains(&needed) {
                return Err(DeviceError::Asset {
                    what: "model",
                    path: model_path,
                    reason: format!("no input {needed:?} (inputs: {names:?})"),
                });
            }
        }
        let wants_token_types = names.contains(&"token_type_ids");
        let capacity = NonZeroUsize::new(config.cache_capacity).unwrap_or(NonZeroUsize::MIN);
        Ok(Embedder {
            session: Mutex::new(session),
            tokenizer,
            wants_token_types,
            cache: Mutex::new(LruCache::new(capacity)),
            model_id: config.model_id,
            warming: std::sync::atomic::AtomicBool::new(false),
            warmed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
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
    pub fn prewarm_in_background(self: &Arc<Self>, texts: Vec<String>) {
        if self.warming.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("omega-prewarm".into()).spawn(move || {
            for t in texts {
                let _ = me.embed_shared(&t);
            }
            me.warmed.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        if spawned.is_err() {
            self.warming.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// True once a background pre-warm has finished.
    pub fn is_warm(&self) -> bool {
        self.warmed.load(std::sync::atomic::Ordering::SeqCst)
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
        let ort_err = |e: ort::Error| DeviceError::Embedding(e.to_string());
        let t_ids = Tensor::from_array(([1usize, n], ids)).map_err(ort_err)?;
        let t_mask = Tensor::from_array(([1usize, n], mask.clone())).map_err(ort_err)?;
        let mut session = lock(&self.session)?;
        let outputs = if self.wants_token_types {
            let types: Vec<i64> = enc.get_type_ids().iter().map(|&x| i64::from(x)).collect();
            let t_types = Tensor::from_array(([1usize, n], types)).map_err(ort_err)?;
            session.run(ort::inputs![
                "input_ids" => t_ids,
                "attention_mask" => t_mask,
                "token_type_ids" => t_types,
            ])
        } else {
            session.run(ort::inputs!["input_ids" => t_ids, "attention_mask" => t_mask])
        }
        .map_err(ort_err)?;
        let (shape, hidden) = outputs[0].try_extract_tensor::<f32>().map_err(ort_err)?;
        if shape.len() != 3 || shape[2] as usize != EMBEDDING_DIM || shape[1] as usize != n {
            return Err(DeviceError::Embedding(format!(
                "unexpected output shape {shape:?}, expected [1, {n}, {EMBEDDING_DIM}]"
            )));
        }
        mean_pool_normalised(hidden, &mask)
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
