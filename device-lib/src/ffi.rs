//! The C ABI: an opaque brain handle, JSON in and out, integer error codes.
//!
//! Conventions (see `include/omega.h` and docs/c-sdk.md):
//! - Functions returning `int32_t` give `OMEGA_OK` (0) or a negative `OMEGA_ERR_*` code.
//! - Functions producing JSON return `int64_t`: the length of the JSON in bytes (without the
//!   terminating NUL), or a negative error code. Like `snprintf`, the output was written in
//!   full only when that length is `< out_cap`; otherwise nothing was written, the length is
//!   what is needed, and `omega_brain_last_result` fetches the same JSON again (so calls with
//!   effects, like `observe` and `sync`, are never repeated for a bigger buffer).
//! - After an error, `omega_last_error_message` gives a message (per thread).
//! - No panic crosses the boundary: each function runs under `catch_unwind` and turns a
//!   panic into `OMEGA_ERR_INTERNAL`. A handle may be used from several threads (calls are
//!   serialised by a mutex); `omega_brain_close` must be the last call on it.

// The C boundary needs raw pointers and exported symbols; `unsafe` is confined to this module.
#![allow(unsafe_code)]

use crate::brain::{Brain, BrainConfig, RecommendContext};
use crate::error::{DeviceError, Result};
use crate::sync::{SyncClient, SyncConfig};
use omega_protocol::{GlobalPatterns, ViewingEvent};
use serde::Serialize;
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

/// Success.
pub const OMEGA_OK: i32 = 0;
/// A required pointer argument was NULL.
pub const OMEGA_ERR_NULL: i32 = -1;
/// An input broke a limit (size, range, NaN…).
pub const OMEGA_ERR_INVALID: i32 = -2;
/// Malformed JSON or a field of the wrong type; also text that is not UTF-8.
pub const OMEGA_ERR_JSON: i32 = -3;
/// Model, tokenizer, ONNX Runtime library or catalogue missing or unusable.
pub const OMEGA_ERR_ASSET: i32 = -4;
/// Embedding failed.
pub const OMEGA_ERR_EMBEDDING: i32 = -5;
/// Database unreadable, corrupt or not writable (the file is left untouched).
pub const OMEGA_ERR_DATABASE: i32 = -6;
/// Database written by a newer library (left untouched).
pub const OMEGA_ERR_SCHEMA_TOO_NEW: i32 = -7;
/// Embeddings of another model.
pub const OMEGA_ERR_MODEL_MISMATCH: i32 = -8;
/// A call that does not fit the brain's state.
pub const OMEGA_ERR_STATE: i32 = -9;
/// The shard could not be reached; pending changes are kept for the next sync.
pub const OMEGA_ERR_UNAVAILABLE: i32 = -10;
/// The shard refused the request.
pub const OMEGA_ERR_REJECTED: i32 = -11;
/// Unusable sync configuration.
pub const OMEGA_ERR_SYNC_CONFIG: i32 = -12;
/// A bug (a caught panic).
pub const OMEGA_ERR_INTERNAL: i32 = -99;

/// An open brain. Opaque to C.
pub struct OmegaBrain {
    inner: Mutex<Handle>,
}

struct Handle {
    brain: Brain,
    sync: Option<(String, SyncClient)>,
    runtime: Option<tokio::runtime::Runtime>,
    last_result: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning errors and panics into codes (and the thread's last error message).
fn guard<T: From<i32>>(f: impl FnOnce() -> Result<T>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => {
            set_last_error("");
            v
        }
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            T::from(e.code())
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            set_last_error(&format!("internal error: {what}"));
            T::from(OMEGA_ERR_INTERNAL)
        }
    }
}

/// Borrows a C string as UTF-8. `None` for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn text<'a>(p: *const c_char) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(Some).map_err(|e| {
        DeviceError::Json(serde::de::Error::custom(format!("input is not UTF-8: {e}")))
    })
}

/// Error for a NULL argument, with its own code.
fn null_error(name: &str) -> i32 {
    set_last_error(&format!("{name} is NULL"));
    OMEGA_ERR_NULL
}

fn with_handle<T: From<i32>>(
    brain: *mut OmegaBrain,
    f: impl FnOnce(&mut Handle) -> Result<T>,
) -> T {
    if brain.is_null() {
        return T::from(null_error("brain"));
    }
    // SAFETY: non-null handles come from `omega_brain_open` and stay valid until
    // `omega_brain_close`, which the caller calls last.
    let handle = unsafe { &*brain };
    guard(|| {
        let mut h = handle
            .inner
            .lock()
            .map_err(|_| DeviceError::Internal("brain lock poisoned by an earlier panic".into()))?;
        f(&mut h)
    })
}

/// Serialises `value`, keeps it as the handle's last result and copies it out.
///
/// # Safety
/// `out` is NULL or valid for `out_cap` bytes.
unsafe fn emit(
    h: &mut Handle,
    value: &impl Serialize,
    out: *mut c_char,
    out_cap: usize,
) -> Result<i64> {
    let json = serde_json::to_string(value)?;
    h.last_result = CString::new(json).map_err(|e| DeviceError::Internal(e.to_string()))?;
    // SAFETY: forwarded from the caller.
    Ok(unsafe { copy_out(h.last_result.as_bytes(), out, out_cap) })
}

/// `snprintf`-style copy: writes `bytes` + NUL when they fit, returns `bytes.len()`.
///
/// # Safety
/// `out` is NULL or valid for `out_cap` bytes.
unsafe fn copy_out(bytes: &[u8], out: *mut c_char, out_cap: usize) -> i64 {
    if !out.is_null() && bytes.len() < out_cap {
        // SAFETY: `out` has room for `bytes.len() + 1` bytes (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast::<u8>(), bytes.len());
            *out.add(bytes.len()) = 0;
        }
    } else if !out.is_null() && out_cap > 0 {
        // SAFETY: at least one byte is writable.
        unsafe { *out = 0 };
        set_last_error(&format!("buffer too small: {} bytes needed (plus NUL)", bytes.len()));
    }
    bytes.len() as i64
}

fn parse<T: serde::de::DeserializeOwned>(json: Option<&str>) -> Result<Option<T>> {
    match json {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => Ok(Some(serde_json::from_str(s)?)),
    }
}

/// Opens a brain. `config_json` is a `BrainConfig` object (NULL or "" = defaults). On success
/// `*out_brain` receives the handle.
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string; `out_brain` is a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_open(
    config_json: *const c_char,
    out_brain: *mut *mut OmegaBrain,
) -> i32 {
    if out_brain.is_null() {
        return null_error("out_brain");
    }
    guard(|| {
        // SAFETY: forwarded from the caller.
        let cfg: BrainConfig = parse(unsafe { text(config_json) }?)?.unwrap_or_default();
        let brain = Brain::open(cfg)?;
        let handle = Box::new(OmegaBrain {
            inner: Mutex::new(Handle {
                brain,
                sync: None,
                runtime: None,
                last_result: CString::default(),
            }),
        });
        // SAFETY: checked non-null above.
        unsafe { *out_brain = Box::into_raw(handle) };
        Ok(OMEGA_OK)
    })
}

/// Learns from one viewing event (`ViewingEvent` JSON). Writes an `ObserveOutcome` JSON.
///
/// # Safety
/// `brain` comes from `omega_brain_open`; `event_json` is a NUL-terminated string; `out` is
/// NULL or valid for `out_cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_observe(
    brain: *mut OmegaBrain,
    event_json: *const c_char,
    out: *mut c_char,
    out_cap: usize,
) -> i64 {
    // SAFETY: forwarded from the caller.
    let Some(json) = (unsafe { text(event_json) }).ok().flatten() else {
        return i64::from(input_error(event_json, "event_json"));
    };
    with_handle(brain, |h| {
        let event: ViewingEvent = serde_json::from_str(json)?;
        let outcome = h.brain.observe(&event)?;
        // SAFETY: forwarded from the caller.
        unsafe { emit(h, &outcome, out, out_cap) }
    })
}

/// Recommends up to `k` contents for a `RecommendContext` (NULL or "" = now). Writes a JSON
/// array of `{content_id, score, reason, source}`.
///
/// # Safety
/// As `omega_brain_observe`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_recommend(
    brain: *mut OmegaBrain,
    context_json: *const c_char,
    k: u32,
    out: *mut c_char,
    out_cap: usize,
) -> i64 {
    // SAFETY: forwarded from the caller.
    let ctx = unsafe { text(context_json) };
    with_handle(brain, |h| {
        let ctx: RecommendContext = parse(ctx?)?.unwrap_or_default();
        let recs = h.brain.recommend(&ctx, k as usize)?;
        // SAFETY: forwarded from the caller.
        unsafe { emit(h, &recs, out, out_cap) }
    })
}

/// Scores candidate contents: `content_ids_json` is a JSON array of ids. Writes a JSON array
/// of numbers, one per id (-1 for a content the brain knows nothing about).
///
/// # Safety
/// As `omega_brain_observe`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_score(
    brain: *mut OmegaBrain,
    context_json: *const c_char,
    content_ids_json: *const c_char,
    out: *mut c_char,
    out_cap: usize,
) -> i64 {
    // SAFETY: forwarded from the caller.
    let (ctx, ids) = unsafe { (text(context_json), text(content_ids_json)) };
    with_handle(brain, |h| {
        let ctx: RecommendContext = parse(ctx?)?.unwrap_or_default();
        let ids: Vec<String> = parse(ids?)?.unwrap_or_default();
        let scores = h.brain.score(&ctx, &ids)?;
        // SAFETY: forwarded from the caller.
        unsafe { emit(h, &scores, out, out_cap) }
    })
}

/// Syncs with a shard. `sync_config_json` is a `SyncConfig` (endpoint, token, deadlines,
/// retries…); without a token the device registers first. Writes a `SyncReport` JSON. When
/// the shard is unreachable, returns `OMEGA_ERR_UNAVAILABLE` and keeps every pending change.
///
/// # Safety
/// As `omega_brain_observe`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_sync(
    brain: *mut OmegaBrain,
    sync_config_json: *const c_char,
    out: *mut c_char,
    out_cap: usize,
) -> i64 {
    // SAFETY: forwarded from the caller.
    let cfg_json = unsafe { text(sync_config_json) };
    with_handle(brain, |h| {
        let cfg_json = cfg_json?.unwrap_or("").to_owned();
        let cfg: SyncConfig = parse(Some(&cfg_json))?.unwrap_or_default();
        if h.runtime.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| DeviceError::Internal(format!("tokio runtime: {e}")))?;
            h.runtime = Some(rt);
        }
        let Handle { brain, sync, runtime, .. } = h;
        let rt = runtime.as_ref().ok_or_else(|| DeviceError::Internal("no runtime".into()))?;
        let report = rt.block_on(async {
            if sync.as_ref().is_none_or(|(json, _)| *json != cfg_json) {
                *sync = Some((cfg_json.clone(), SyncClient::connect(cfg.clone()).await?));
            }
            let (_, client) =
                sync.as_mut().ok_or_else(|| DeviceError::Internal("no client".into()))?;
            if client.config().token.is_none() {
                let model = brain.embedder().model_id().to_owned();
                let device = brain.device_id().to_owned();
                client.register(&device, &cfg.region, &model).await?;
            }
            client.sync(brain).await
        })?;
        // SAFETY: forwarded from the caller.
        unsafe { emit(h, &report, out, out_cap) }
    })
}

/// Takes in global patterns given as `GlobalPatterns` JSON (for a transport other than
/// gRPC). Validated whole; a bad document changes nothing.
///
/// # Safety
/// `brain` comes from `omega_brain_open`; `global_json` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_apply_global(
    brain: *mut OmegaBrain,
    global_json: *const c_char,
) -> i32 {
    // SAFETY: forwarded from the caller.
    let Some(json) = (unsafe { text(global_json) }).ok().flatten() else {
        return input_error(global_json, "global_json");
    };
    with_handle(brain, |h| {
        let g: GlobalPatterns = serde_json::from_str(json)?;
        h.brain.apply_global(g)?;
        Ok(OMEGA_OK)
    })
}

/// Writes the brain's `BrainStats` JSON.
///
/// # Safety
/// `brain` comes from `omega_brain_open`; `out` is NULL or valid for `out_cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_stats(
    brain: *mut OmegaBrain,
    out: *mut c_char,
    out_cap: usize,
) -> i64 {
    with_handle(brain, |h| {
        let stats = h.brain.stats();
        // SAFETY: forwarded from the caller.
        unsafe { emit(h, &stats, out, out_cap) }
    })
}

/// Copies the JSON of the last successful call on this handle again (after "buffer too
/// small").
///
/// # Safety
/// `brain` comes from `omega_brain_open`; `out` is NULL or valid for `out_cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_last_result(
    brain: *mut OmegaBrain,
    out: *mut c_char,
    out_cap: usize,
) -> i64 {
    with_handle(brain, |h| {
        // SAFETY: forwarded from the caller.
        Ok(unsafe { copy_out(h.last_result.as_bytes(), out, out_cap) })
    })
}

/// Closes the brain and frees the handle (NULL is a no-op). The handle is invalid afterwards,
/// even when an error is returned (the database could not be checkpointed; it stays
/// consistent).
///
/// # Safety
/// `brain` is NULL or comes from `omega_brain_open` and is not used by any other thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_close(brain: *mut OmegaBrain) -> i32 {
    if brain.is_null() {
        return OMEGA_OK;
    }
    // SAFETY: the pointer came from `Box::into_raw` in `omega_brain_open`, and the caller
    // gives it up here.
    let handle = unsafe { Box::from_raw(brain) };
    guard(|| {
        let inner = handle
            .inner
            .into_inner()
            .map_err(|_| DeviceError::Internal("brain lock poisoned".into()))?;
        inner.brain.close()?;
        Ok(OMEGA_OK)
    })
}

/// Copies the calling thread's last error message (empty after a success), `snprintf`-style.
///
/// # Safety
/// `out` is NULL or valid for `out_cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_last_error_message(out: *mut c_char, out_cap: usize) -> i64 {
    let msg = LAST_ERROR.with(|e| e.borrow().clone());
    // SAFETY: forwarded from the caller.
    unsafe { copy_out(msg.as_bytes(), out, out_cap) }
}

/// The library version, a static NUL-terminated string.
#[unsafe(no_mangle)]
pub extern "C" fn omega_version() -> *const c_char {
    static VERSION: &[u8] = concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes();
    VERSION.as_ptr().cast()
}

/// Code for a NULL or non-UTF-8 required string.
fn input_error(p: *const c_char, name: &'static str) -> i32 {
    if p.is_null() {
        null_error(name)
    } else {
        set_last_error(&format!("malformed JSON: {name} is not UTF-8"));
        OMEGA_ERR_JSON
    }
}
