//! The C ABI: an opaque brain handle, JSON in and out, integer error codes.
//!
//! Conventions (see `include/omega.h` and docs/c-sdk.md):
//! - Functions returning `int32_t` give `OMEGA_OK` (0) or a negative `OMEGA_ERR_*` code.
//! - Functions producing JSON return `int64_t`: the length of the JSON in bytes (without the
//!   terminating NUL), or a negative error code. Like `snprintf`, the output was written in
//!   full only when that length is `< out_cap`; otherwise `out` holds an empty string, the
//!   length is what is needed, `omega_last_error_message` says "buffer too small", and
//!   `omega_brain_last_result` fetches the same JSON again (so calls with effects, like
//!   `observe` and `sync`, are never repeated for a bigger buffer).
//! - After an error, `omega_last_error_message` gives a message (per thread); each call
//!   clears it first.
//! - Input strings longer than the protocol's largest message (1 MiB) are refused with
//!   `OMEGA_ERR_INVALID` before parsing.
//! - No panic crosses the boundary: each function runs under `catch_unwind` and turns a
//!   panic into `OMEGA_ERR_INTERNAL`. A handle may be used from several threads: calls are
//!   serialised by a mutex, except that `omega_brain_sync` holds it only to prepare a delta
//!   and to take in the answer, not while it waits for the shard (syncs are serialised among
//!   themselves by a second mutex). `omega_brain_close` must be the last call on a handle.

// The C boundary needs raw pointers and exported symbols; `unsafe` is confined to this module.
#![allow(unsafe_code)]

use crate::brain::{Brain, BrainConfig, MAX_K, RecommendContext};
use crate::error::{DeviceError, ErrorCode, Result};
use crate::sync::{BrainAccess, SyncClient, SyncConfig};
use omega_protocol::validate::{MAX_MESSAGE_BYTES, ValidationError, check_range};
use omega_protocol::{GlobalPatterns, ViewingEvent};
use serde::Serialize;
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, MutexGuard};

/// ABI major version: changes when a change breaks existing callers (a removed or changed
/// function, a changed meaning). It is the shared library's SONAME
/// (`libomega_device.so.<major>`); build.rs reads it from here.
pub const OMEGA_ABI_VERSION_MAJOR: u32 = 1;
/// ABI minor version: changes when functions or error codes are added.
pub const OMEGA_ABI_VERSION_MINOR: u32 = 0;
/// `(major << 16) | minor`, what `omega_abi_version()` returns for this header: a caller
/// compares the two majors at start-up to catch a mismatched library.
pub const OMEGA_ABI_VERSION: u32 = (OMEGA_ABI_VERSION_MAJOR << 16) | OMEGA_ABI_VERSION_MINOR;

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
/// The shard knows this device id already and the brain holds no token for it (the id
/// belongs to another device, or its token was lost). Final: retrying cannot help; nothing
/// local was changed.
pub const OMEGA_ERR_DEVICE_ID_TAKEN: i32 = -13;
/// A bug (a caught panic).
pub const OMEGA_ERR_INTERNAL: i32 = -99;

/// The integer a C caller sees for an error code.
pub fn c_code(code: ErrorCode) -> i32 {
    match code {
        ErrorCode::Null => OMEGA_ERR_NULL,
        ErrorCode::Invalid => OMEGA_ERR_INVALID,
        ErrorCode::Json => OMEGA_ERR_JSON,
        ErrorCode::Asset => OMEGA_ERR_ASSET,
        ErrorCode::Embedding => OMEGA_ERR_EMBEDDING,
        ErrorCode::Database => OMEGA_ERR_DATABASE,
        ErrorCode::SchemaTooNew => OMEGA_ERR_SCHEMA_TOO_NEW,
        ErrorCode::ModelMismatch => OMEGA_ERR_MODEL_MISMATCH,
        ErrorCode::State => OMEGA_ERR_STATE,
        ErrorCode::Unavailable => OMEGA_ERR_UNAVAILABLE,
        ErrorCode::Rejected => OMEGA_ERR_REJECTED,
        ErrorCode::SyncConfig => OMEGA_ERR_SYNC_CONFIG,
        ErrorCode::DeviceIdTaken => OMEGA_ERR_DEVICE_ID_TAKEN,
        ErrorCode::Internal => OMEGA_ERR_INTERNAL,
    }
}

/// An open brain. Opaque to C.
pub struct OmegaBrain {
    inner: Mutex<Handle>,
    /// Sync state, locked for a whole sync; `inner` is locked only inside it, never the other
    /// way round (no lock-order inversion).
    net: Mutex<Net>,
}

struct Handle {
    brain: Brain,
    last_result: CString,
}

#[derive(Default)]
struct Net {
    /// The client, with the config JSON it was made from.
    client: Option<(String, SyncClient)>,
    runtime: Option<tokio::runtime::Runtime>,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning errors and panics into codes (and the thread's last error message).
/// The message is cleared first, so after a success it is empty unless the call left a note
/// (an output buffer too small).
fn guard<T: From<i32>>(f: impl FnOnce() -> Result<T>) -> T {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            T::from(c_code(e.code()))
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

/// Borrows a C string as UTF-8; `None` for NULL. Strings longer than the protocol's largest
/// message are refused before anything parses them.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn text<'a>(p: *const c_char, name: &'static str) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(
            ValidationError::MessageTooLarge { got: bytes.len(), max: MAX_MESSAGE_BYTES }.into()
        );
    }
    std::str::from_utf8(bytes).map(Some).map_err(|e| {
        DeviceError::Json(serde::de::Error::custom(format!("{name} is not UTF-8: {e}")))
    })
}

/// Like [`text`], for a string that must be given.
///
/// # Safety
/// As [`text`].
unsafe fn required<'a>(p: *const c_char, name: &'static str) -> Result<&'a str> {
    // SAFETY: forwarded from the caller.
    unsafe { text(p, name) }?.ok_or(DeviceError::Null(name))
}

/// Runs `f` on a handle under [`guard`].
fn with_brain<T: From<i32>>(brain: *mut OmegaBrain, f: impl FnOnce(&OmegaBrain) -> Result<T>) -> T {
    guard(|| {
        if brain.is_null() {
            return Err(DeviceError::Null("brain"));
        }
        // SAFETY: non-null handles come from `omega_brain_open` and stay valid until
        // `omega_brain_close`, which the caller calls last.
        f(unsafe { &*brain })
    })
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| DeviceError::Internal("brain lock poisoned by an earlier panic".into()))
}

/// Runs `f` on a handle's brain, under its lock.
fn with_handle<T: From<i32>>(
    brain: *mut OmegaBrain,
    f: impl FnOnce(&mut Handle) -> Result<T>,
) -> T {
    with_brain(brain, |b| f(&mut *lock(&b.inner)?))
}

/// The brain behind its lock, taken only for each step of a sync.
struct Locked<'a>(&'a Mutex<Handle>);

impl BrainAccess for Locked<'_> {
    fn with_brain<R>(&mut self, f: impl FnOnce(&mut Brain) -> Result<R>) -> Result<R> {
        f(&mut lock(self.0)?.brain)
    }
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
    Ok(unsafe { copy_result(h.last_result.as_bytes(), out, out_cap) })
}

/// [`copy_out`], leaving a "buffer too small" note when a given buffer was too small.
///
/// # Safety
/// `out` is NULL or valid for `out_cap` bytes.
unsafe fn copy_result(bytes: &[u8], out: *mut c_char, out_cap: usize) -> i64 {
    // SAFETY: forwarded from the caller.
    let (len, fitted) = unsafe { copy_out(bytes, out, out_cap) };
    if !fitted && !out.is_null() {
        set_last_error(&format!(
            "buffer too small: the JSON is {len} bytes, out_cap must be at least {} (JSON + NUL), \
             was {out_cap}; omega_brain_last_result copies it again",
            len + 1
        ));
    }
    len
}

/// `snprintf`-style copy: writes `bytes` + NUL when they fit (`true`), else an empty string
/// when there is room for one; returns `bytes.len()` either way. No side effect.
///
/// # Safety
/// `out` is NULL or valid for `out_cap` bytes.
unsafe fn copy_out(bytes: &[u8], out: *mut c_char, out_cap: usize) -> (i64, bool) {
    let len = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
    if out.is_null() {
        return (len, false);
    }
    if bytes.len() < out_cap {
        // SAFETY: `out` has room for `bytes.len() + 1` bytes (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast::<u8>(), bytes.len());
            *out.add(bytes.len()) = 0;
        }
        return (len, true);
    }
    if out_cap > 0 {
        // SAFETY: at least one byte is writable.
        unsafe { *out = 0 };
    }
    (len, false)
}

fn parse<T: serde::de::DeserializeOwned>(json: Option<&str>) -> Result<Option<T>> {
    match json {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => Ok(Some(serde_json::from_str(s)?)),
    }
}

/// Opens a brain. `config_json` is a `BrainConfig` object (NULL or "" = defaults). On success
/// `*out_brain` receives the handle; on failure it is set to NULL.
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string; `out_brain` is a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_brain_open(
    config_json: *const c_char,
    out_brain: *mut *mut OmegaBrain,
) -> i32 {
    guard(|| {
        if out_brain.is_null() {
            return Err(DeviceError::Null("out_brain"));
        }
        // SAFETY: checked non-null; the caller promises a valid pointer.
        unsafe { *out_brain = std::ptr::null_mut() };
        // SAFETY: forwarded from the caller.
        let cfg: BrainConfig =
            parse(unsafe { text(config_json, "config_json") }?)?.unwrap_or_default();
        let brain = Brain::open(cfg)?;
        let handle = Box::new(OmegaBrain {
            inner: Mutex::new(Handle { brain, last_result: CString::default() }),
            net: Mutex::new(Net::default()),
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
    with_brain(brain, |b| {
        // SAFETY: forwarded from the caller.
        let json = unsafe { required(event_json, "event_json") }?;
        // Parsed before the handle is locked: other threads wait only for the brain itself.
        let event: ViewingEvent = serde_json::from_str(json)?;
        let mut h = lock(&b.inner)?;
        let outcome = h.brain.observe(&event)?;
        // SAFETY: forwarded from the caller.
        unsafe { emit(&mut h, &outcome, out, out_cap) }
    })
}

/// Recommends up to `k` contents for a `RecommendContext` (NULL or "" = now). Writes a JSON
/// array of `{content_id, score, reason, source}`. `k` above `OMEGA_MAX_K` is refused
/// (`OMEGA_ERR_INVALID`). The array is empty while the brain knows no content to propose: a
/// catalogue (`BrainConfig.catalogue_path`) or global patterns from a sync are the sources.
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
    with_brain(brain, |b| {
        // SAFETY: forwarded from the caller.
        let ctx: RecommendContext =
            parse(unsafe { text(context_json, "context_json") }?)?.unwrap_or_default();
        check_range("k", f64::from(k), 0.0, MAX_K as f64)?;
        let mut h = lock(&b.inner)?;
        let recs = h.brain.recommend(&ctx, k as usize)?;
        // SAFETY: forwarded from the caller.
        unsafe { emit(&mut h, &recs, out, out_cap) }
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
    with_brain(brain, |b| {
        // SAFETY: forwarded from the caller.
        let (ctx, ids) = unsafe {
            (text(context_json, "context_json")?, text(content_ids_json, "content_ids_json")?)
        };
        let ctx: RecommendContext = parse(ctx)?.unwrap_or_default();
        let ids: Vec<String> = parse(ids)?.unwrap_or_default();
        let mut h = lock(&b.inner)?;
        let scores = h.brain.score(&ctx, &ids)?;
        // SAFETY: forwarded from the caller.
        unsafe { emit(&mut h, &scores, out, out_cap) }
    })
}

/// Syncs with a shard. `sync_config_json` is a `SyncConfig` (endpoint, deadlines, retries…).
/// The device registers at its first sync and the brain keeps the token in its database, so
/// later syncs (after a reopen too) use it without registering again; a `token` in the config
/// overrides it. Writes a `SyncReport` JSON, whose `next_sync_in_ms` says when to sync next
/// (5-15 minutes, jittered). When the shard is unreachable, returns `OMEGA_ERR_UNAVAILABLE`
/// and keeps every pending change; when the shard knows the device id and the brain holds no
/// token for it, `OMEGA_ERR_DEVICE_ID_TAKEN`. Other calls on the handle (recommend,
/// observe…) are not blocked while the shard is being waited for.
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
    with_brain(brain, |b| {
        // SAFETY: forwarded from the caller.
        let cfg_json = unsafe { text(sync_config_json, "sync_config_json") }?.unwrap_or("");
        let cfg: SyncConfig = parse(Some(cfg_json))?.unwrap_or_default();
        check_endpoint_scheme(&cfg.endpoint)?;
        let mut net = lock(&b.net)?;
        if net.runtime.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| DeviceError::Internal(format!("tokio runtime: {e}")))?;
            net.runtime = Some(rt);
        }
        let Net { client, runtime } = &mut *net;
        let rt = runtime.as_ref().ok_or_else(|| DeviceError::Internal("no runtime".into()))?;
        let report = rt.block_on(async {
            if client.as_ref().is_none_or(|(json, _)| json != cfg_json) {
                *client = Some((cfg_json.to_owned(), SyncClient::connect(cfg).await?));
            }
            let (_, c) =
                client.as_mut().ok_or_else(|| DeviceError::Internal("no client".into()))?;
            c.register_and_sync(&mut Locked(&b.inner)).await
        })?;
        let mut h = lock(&b.inner)?;
        // SAFETY: forwarded from the caller.
        unsafe { emit(&mut h, &report, out, out_cap) }
    })
}

/// The sync client speaks gRPC over HTTP/2: an endpoint without an `http://` or `https://`
/// scheme is a configuration mistake, not a transport failure worth retrying.
fn check_endpoint_scheme(endpoint: &str) -> Result<()> {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        return Ok(());
    }
    Err(DeviceError::SyncConfig(format!(
        "endpoint {endpoint:?} must start with http:// or https://"
    )))
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
    with_brain(brain, |b| {
        // SAFETY: forwarded from the caller.
        let json = unsafe { required(global_json, "global_json") }?;
        let g: GlobalPatterns = serde_json::from_str(json)?;
        lock(&b.inner)?.brain.apply_global(g)?;
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
        Ok(unsafe { copy_result(h.last_result.as_bytes(), out, out_cap) })
    })
}

/// Closes the brain and frees the handle (NULL is a no-op). The background pre-warm thread
/// is stopped and joined first, so no thread of the library is left running. The handle is invalid afterwards,
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
        // No thread of the library outlives the handle (the caller may unload the library or
        // exit right after this call).
        inner.brain.embedder().stop_prewarm();
        inner.brain.close()?;
        Ok(OMEGA_OK)
    })
}

/// Copies the calling thread's last error message (empty after a success), `snprintf`-style.
/// Reading it never changes it: after "buffer too small", call again with a bigger buffer.
///
/// # Safety
/// `out` is NULL or valid for `out_cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn omega_last_error_message(out: *mut c_char, out_cap: usize) -> i64 {
    let msg = LAST_ERROR.with(|e| e.borrow().clone());
    // SAFETY: forwarded from the caller.
    unsafe { copy_out(msg.as_bytes(), out, out_cap) }.0
}

/// The ABI version of the loaded library, `(major << 16) | minor` (`OMEGA_ABI_VERSION` is
/// the header's). A program built against major M works with a library of major M and a
/// minor at least its header's.
#[unsafe(no_mangle)]
pub extern "C" fn omega_abi_version() -> u32 {
    OMEGA_ABI_VERSION
}

/// The library version, a static NUL-terminated string.
#[unsafe(no_mangle)]
pub extern "C" fn omega_version() -> *const c_char {
    static VERSION: &[u8] = concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes();
    VERSION.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { omega_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(usize::try_from(n).expect("length"));
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn a_panic_inside_becomes_internal_with_a_message() {
        let code: i32 = guard(|| -> Result<i32> { panic!("boom in the brain") });
        assert_eq!(code, OMEGA_ERR_INTERNAL);
        assert_eq!(last_error(), "internal error: boom in the brain");
        let code: i64 = guard(|| -> Result<i64> { std::panic::panic_any(42u8) });
        assert_eq!(code, i64::from(OMEGA_ERR_INTERNAL));
        assert_eq!(last_error(), "internal error: panic");
        // A later success clears the message.
        assert_eq!(guard(|| Ok(OMEGA_OK)), OMEGA_OK);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn every_error_code_has_its_own_negative_integer() {
        use ErrorCode::*;
        let all = [
            Null,
            Invalid,
            Json,
            Asset,
            Embedding,
            Database,
            SchemaTooNew,
            ModelMismatch,
            State,
            Unavailable,
            Rejected,
            SyncConfig,
            DeviceIdTaken,
            Internal,
        ];
        let ints: std::collections::HashSet<i32> = all.iter().map(|&c| c_code(c)).collect();
        assert_eq!(ints.len(), all.len(), "distinct");
        assert!(ints.iter().all(|&i| i < OMEGA_OK), "{ints:?}");
    }

    #[test]
    fn errors_map_to_their_code_and_message() {
        let code: i32 = guard(|| Err(DeviceError::State("nope".into())));
        assert_eq!(code, OMEGA_ERR_STATE);
        assert_eq!(last_error(), "invalid state: nope");
        let code: i32 = with_handle(std::ptr::null_mut(), |_| Ok(OMEGA_OK));
        assert_eq!(code, OMEGA_ERR_NULL);
        assert_eq!(last_error(), "brain is NULL");
    }

    #[test]
    fn a_small_buffer_never_overwrites_the_stored_message() {
        let _: i32 = guard(|| Err(DeviceError::State("a rather long message".into())));
        let mut small = [b'x' as c_char; 4];
        // SAFETY: `small` is valid for 4 bytes.
        let n = unsafe { omega_last_error_message(small.as_mut_ptr(), small.len()) };
        assert_eq!(n, "invalid state: a rather long message".len() as i64);
        assert_eq!(small[0], 0, "an empty string when it does not fit");
        // SAFETY: NULL is allowed: a length query.
        assert_eq!(unsafe { omega_last_error_message(std::ptr::null_mut(), 0) }, n);
        assert_eq!(last_error(), "invalid state: a rather long message", "unchanged");
    }

    #[test]
    fn a_result_that_does_not_fit_leaves_a_note_that_survives_the_success() {
        let mut small = [0 as c_char; 8];
        let json = b"[1,2,3,4,5,6,7,8,9]";
        let n: i64 = guard(|| {
            // SAFETY: `small` is valid for its length.
            Ok(unsafe { copy_result(json, small.as_mut_ptr(), small.len()) })
        });
        assert_eq!(n, json.len() as i64);
        let msg = last_error();
        assert!(msg.starts_with("buffer too small") && msg.contains("at least 20"), "{msg}");
        // A length query (NULL buffer) is no error and leaves no note.
        let n: i64 = guard(|| {
            // SAFETY: NULL is allowed.
            Ok(unsafe { copy_result(json, std::ptr::null_mut(), 0) })
        });
        assert_eq!((n, last_error().as_str()), (json.len() as i64, ""));
        // Exactly enough room: written, NUL-terminated.
        let mut exact = [b'x' as c_char; 20];
        // SAFETY: `exact` is valid for its length.
        let (n, fitted) = unsafe { copy_out(json, exact.as_mut_ptr(), exact.len()) };
        assert!(fitted && n == 19 && exact[19] == 0);
        // SAFETY: NUL-terminated just above.
        assert_eq!(unsafe { CStr::from_ptr(exact.as_ptr()) }.to_bytes(), json);
    }

    #[test]
    fn input_strings_are_capped_and_checked() {
        let big = CString::new(vec![b' '; MAX_MESSAGE_BYTES + 1]).expect("no NUL");
        // SAFETY: NUL-terminated.
        let err = unsafe { text(big.as_ptr(), "event_json") }.expect_err("too large");
        assert_eq!(c_code(err.code()), OMEGA_ERR_INVALID, "{err}");
        let ok = CString::new(vec![b' '; MAX_MESSAGE_BYTES]).expect("no NUL");
        // SAFETY: NUL-terminated.
        assert!(unsafe { text(ok.as_ptr(), "event_json") }.is_ok());
        let latin1 = CString::new(vec![0xE9u8, b'a']).expect("no NUL");
        // SAFETY: NUL-terminated.
        let err = unsafe { text(latin1.as_ptr(), "event_json") }.expect_err("not UTF-8");
        assert_eq!(c_code(err.code()), OMEGA_ERR_JSON);
        assert!(err.to_string().contains("event_json is not UTF-8"), "{err}");
        // SAFETY: NULL is allowed.
        let err = unsafe { required(std::ptr::null(), "global_json") }.expect_err("NULL");
        assert_eq!(
            (c_code(err.code()), err.to_string().as_str()),
            (OMEGA_ERR_NULL, "global_json is NULL")
        );
    }

    #[test]
    fn open_sets_the_handle_to_null_on_failure() {
        let mut handle = std::ptr::dangling_mut::<OmegaBrain>();
        let bad = CString::new("{not json").expect("no NUL");
        // SAFETY: valid string and out pointer.
        let code = unsafe { omega_brain_open(bad.as_ptr(), &mut handle) };
        assert_eq!(code, OMEGA_ERR_JSON);
        assert!(handle.is_null(), "no stale pointer left for the caller");
        // SAFETY: a NULL out pointer is checked.
        assert_eq!(
            unsafe { omega_brain_open(std::ptr::null(), std::ptr::null_mut()) },
            OMEGA_ERR_NULL
        );
        assert_eq!(last_error(), "out_brain is NULL");
    }
}
