//! The client side of `Constellation`: register, then trade deltas for global patterns.
//!
//! Every call is zstd-compressed both ways, carries a deadline, and is retried with
//! exponential backoff and full jitter (a random wait in `[0, min(max, base · 2^attempt)]`, so
//! a fleet that lost its shard does not come back in lockstep) on `UNAVAILABLE`,
//! `DEADLINE_EXCEEDED` and `RESOURCE_EXHAUSTED`. Other errors are final. The channel connects
//! lazily: a TV that boots offline still gets a client, and its deltas wait in the brain's
//! outbox until a sync goes through. Endpoints are `https://` (rustls, the `tls` cargo
//! feature, on by default), trusting the platform's CA bundle, the webpki roots, and
//! `ca_cert_path` if given; a plaintext `http://` endpoint carries the bearer token in clear
//! and is refused unless `allow_plaintext` is set.
//!
//! Tokens expire (a shard refuses a device that stayed away past its `DEVICE_EXPIRY_DAYS`) and
//! are renewed while the device syncs: a sync answer may carry `renewed_token`, which the
//! client uses from its next call on and the brain keeps at once.
//!
//! Registration: a shard registers a new device id without credentials, but an id it knows
//! already only when the request carries that id's token. So the token is kept in the brain
//! ([`Brain::save_registration`]) as soon as it arrives and reused after a reboot
//! ([`SyncClient::ensure_registered`]); a refusal for a known id without a token is
//! [`DeviceError::DeviceIdTaken`], final, never retried.

use crate::brain::Brain;
use crate::error::{DeviceError, Result};
use crate::registration::DeviceRegistration;
use omega_protocol::pb::constellation_client::ConstellationClient;
use omega_protocol::{GlobalPatterns, pb, wire};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::{Duration, Instant};
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

/// Version sent at registration.
pub const CLIENT_VERSION: &str = concat!("omega-device/", env!("CARGO_PKG_VERSION"));
/// Shortest pause between syncs anyone (a shard's registration answer, a config) can ask
/// for, s: a shard misconfigured to 1 s must not turn its fleet into a flood.
pub const MIN_SYNC_INTERVAL_SECS: u64 = 60;
/// Longest pause between syncs, s: a TV must not go silent for days because a shard said so.
pub const MAX_SYNC_INTERVAL_SECS: u64 = 3_600;
/// Most deltas one [`SyncClient::sync`] pushes (256 changes each). After a long offline
/// period a TV catches up over a few syncs instead of one unbounded burst.
pub const MAX_PUSHES_PER_SYNC: u32 = 16;

/// Where and how to sync. Every field has a default; as JSON unknown fields are refused.
/// `Debug` does not show the token.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// `https://host:50051` (the `tls` feature), or `http://…` with `allow_plaintext`.
    pub endpoint: String,
    /// Allows a plaintext `http://` endpoint, which sends the bearer token in clear: for a
    /// shard on loopback or a private network only.
    pub allow_plaintext: bool,
    /// Vendor-issued enrolment secret sent at registration, for shards that require one.
    pub enrollment_secret: Option<String>,
    /// Bearer token from an earlier registration; [`SyncClient::register`] sets it, and
    /// [`SyncClient::ensure_registered`] takes the one the brain keeps. One given here wins
    /// over the brain's (and replaces it there once a sync with it succeeds).
    pub token: Option<String>,
    /// Region sent at registration.
    pub region: String,
    /// Deadline of one call, ms.
    pub timeout_ms: u64,
    /// Deadline of connecting, ms.
    pub connect_timeout_ms: u64,
    /// Attempts per call (1 = no retry).
    pub max_attempts: u32,
    /// First backoff ceiling, ms.
    pub backoff_base_ms: u64,
    /// Largest backoff ceiling, ms.
    pub backoff_max_ms: u64,
    /// PEM file of a CA that signed the shard's certificate, trusted besides the platform's
    /// CA bundle and the webpki roots (`tls` feature).
    pub ca_cert_path: Option<std::path::PathBuf>,
    /// Shortest pause between syncs, s (the shard's registration answer overrides it);
    /// clamped to [`MIN_SYNC_INTERVAL_SECS`]..[`MAX_SYNC_INTERVAL_SECS`].
    pub min_interval_secs: u64,
    /// Longest pause between syncs, s; clamped like `min_interval_secs`.
    pub max_interval_secs: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            endpoint: "https://127.0.0.1:50051".into(),
            allow_plaintext: false,
            enrollment_secret: None,
            token: None,
            region: String::new(),
            timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            max_attempts: 4,
            backoff_base_ms: 250,
            backoff_max_ms: 30_000,
            ca_cert_path: None,
            min_interval_secs: 300,
            max_interval_secs: 900,
        }
    }
}

impl std::fmt::Debug for SyncConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncConfig")
            .field("endpoint", &self.endpoint)
            .field("allow_plaintext", &self.allow_plaintext)
            .field("enrollment_secret", &self.enrollment_secret.as_ref().map(|_| "<redacted>"))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("region", &self.region)
            .field("timeout_ms", &self.timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base_ms", &self.backoff_base_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("ca_cert_path", &self.ca_cert_path)
            .field("min_interval_secs", &self.min_interval_secs)
            .field("max_interval_secs", &self.max_interval_secs)
            .finish()
    }
}

/// What the shard answered at registration. `Debug` does not show the token.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Bearer token for every sync.
    pub device_token: String,
    /// The shard.
    pub shard_id: u32,
    /// Its region.
    pub region: String,
    /// Its model; a device with another model must not sync.
    pub model_id: String,
    /// Shortest pause between syncs, s.
    pub sync_interval_min_secs: u32,
    /// Longest pause between syncs, s.
    pub sync_interval_max_secs: u32,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("device_token", &"<redacted>")
            .field("shard_id", &self.shard_id)
            .field("region", &self.region)
            .field("model_id", &self.model_id)
            .field("sync_interval_min_secs", &self.sync_interval_min_secs)
            .field("sync_interval_max_secs", &self.sync_interval_max_secs)
            .finish()
    }
}

/// What [`SyncClient::ensure_registered`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Enrolment {
    /// A `Register` call was made (and succeeded): no token was held for this endpoint.
    pub registered: bool,
    /// The shard knew the device id already and no token was held for it, so the brain took
    /// a fresh id (see [`Brain::can_renew_device_id`]) and registered that.
    pub device_id_renewed: bool,
}

/// What one [`SyncClient::sync`] did.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SyncReport {
    /// `local_version` of the last delta pushed, if one was.
    pub local_version: Option<u64>,
    /// Deltas pushed and acknowledged (more than one after a long offline period).
    pub deltas_pushed: u32,
    /// Patterns added / updated / removed over those deltas.
    pub pushed_added: usize,
    /// See `pushed_added`.
    pub pushed_updated: usize,
    /// See `pushed_added`.
    pub pushed_removed: usize,
    /// The shard stored the last delta (now out of the brain's outbox).
    pub acknowledged: bool,
    /// The shard had already applied the last `local_version` (a retry).
    pub replayed: bool,
    /// Deltas the shard refused as invalid (`INVALID_ARGUMENT`), dropped from the outbox so
    /// that syncing goes on (see [`Brain::quarantine_delta`]).
    pub quarantined_deltas: u32,
    /// Changes (added + updated + removed) in those deltas.
    pub quarantined_changes: usize,
    /// Patterns the shard stored.
    pub patterns_accepted: u32,
    /// Patterns below the shard's quality threshold.
    pub patterns_filtered: u32,
    /// Global version now held.
    pub global_version: u64,
    /// Similar patterns received.
    pub similar_received: usize,
    /// Ids of those patterns, in the order received: what a caller auditing what the shard
    /// serves (the simulator's `served_below_k`) checks against the published aggregates. Not
    /// serialised (the C ABI's report stays small).
    #[serde(skip)]
    pub similar_ids: Vec<uuid::Uuid>,
    /// Trend signals received.
    pub trends_received: usize,
    /// Request bytes on the wire (gRPC frame, zstd), one per exchange that got an answer.
    pub bytes_up: usize,
    /// Response bytes on the wire (gRPC frame, zstd).
    pub bytes_down: usize,
    /// Attempts made, over every exchange.
    pub attempts: u32,
    /// Wall time, ms.
    pub elapsed_ms: u64,
    /// When to sync next: a random pause within the shard's (clamped) interval, ms, so a
    /// fleet's syncs spread out. A C caller sleeps this long before the next
    /// `omega_brain_sync`.
    pub next_sync_in_ms: u64,
    /// This sync registered the device first ([`SyncClient::register_and_sync`]; the token is
    /// now kept in the brain).
    pub registered: bool,
    /// This sync gave the device a fresh id first ([`Enrolment::device_id_renewed`]).
    pub device_id_renewed: bool,
    /// The shard renewed the device token (the brain keeps the new one).
    pub token_renewed: bool,
}

/// Access to the brain during a sync. The network exchange runs between two accesses, so a
/// caller that keeps the brain behind a lock (the C ABI) holds it only to prepare a delta and
/// to take in the answer, never while waiting for the shard.
pub trait BrainAccess {
    /// Runs `f` on the brain.
    fn with_brain<R>(&mut self, f: impl FnOnce(&mut Brain) -> Result<R>) -> Result<R>;
}

impl BrainAccess for &mut Brain {
    fn with_brain<R>(&mut self, f: impl FnOnce(&mut Brain) -> Result<R>) -> Result<R> {
        f(self)
    }
}

/// Clamps a sync interval to [`MIN_SYNC_INTERVAL_SECS`]..[`MAX_SYNC_INTERVAL_SECS`].
pub fn clamp_interval(secs: u64) -> u64 {
    secs.clamp(MIN_SYNC_INTERVAL_SECS, MAX_SYNC_INTERVAL_SECS)
}

/// True when an `INVALID_ARGUMENT` refusal is about the model: every delta of this device
/// would be refused alike, so nothing is quarantined (the message text is
/// `omega_protocol::ValidationError::ModelMismatch`'s, shared by both sides).
fn is_model_refusal(message: &str) -> bool {
    message.contains("does not match this shard's model")
}

/// True for the gRPC codes worth retrying.
pub fn is_retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::ResourceExhausted
    )
}

/// Wait before retry number `attempt` (0-based): uniform in `[0, min(max, base · 2^attempt)]`.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let ceiling =
        base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX)).min(max);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(if ms == 0 { 0 } else { rng.random_range(0..=ms) })
}

/// Pause before the next sync: uniform in `[min, max]` (5-15 minutes by default), so a
/// fleet's syncs spread out.
pub fn next_sync_delay(min: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let (lo, hi) = (min.as_millis() as u64, max.as_millis() as u64);
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    Duration::from_millis(rng.random_range(lo..=hi))
}

/// A `Constellation` client.
#[derive(Debug, Clone)]
pub struct SyncClient {
    client: ConstellationClient<Channel>,
    cfg: SyncConfig,
    /// The registration behind `cfg.token` when it came from [`SyncClient::register`] or from
    /// the brain (`None` for a token of the config): what the brain is to keep.
    issued: Option<DeviceRegistration>,
}

impl SyncClient {
    /// Prepares a client. The connection is made at the first call (and re-made after
    /// failures), so this succeeds offline; a malformed endpoint is an error.
    pub async fn connect(cfg: SyncConfig) -> Result<SyncClient> {
        let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| DeviceError::SyncConfig(format!("endpoint {:?}: {e}", cfg.endpoint)))?
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms.max(1)));
        // Each call carries `grpc-timeout` (the server stops working on it) and a local
        // deadline.
        if cfg.endpoint.starts_with("https://") {
            endpoint = tls(endpoint, &cfg)?;
        } else if !cfg.allow_plaintext {
            return Err(DeviceError::SyncConfig(format!(
                "endpoint {:?} is plaintext and would send the device token in clear: use \
                 https:// or set allow_plaintext",
                cfg.endpoint
            )));
        }
        if let Some(t) = &cfg.token {
            bearer(t)?;
        }
        let client = ConstellationClient::new(endpoint.connect_lazy())
            .send_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Zstd)
            .max_decoding_message_size(omega_protocol::validate::MAX_MESSAGE_BYTES);
        Ok(SyncClient { client, cfg, issued: None })
    }

    /// The configuration (with the token once registered).
    pub fn config(&self) -> &SyncConfig {
        &self.cfg
    }

    /// Registers the device and keeps the token for syncs. A client that holds a token sends
    /// it (`authorization: Bearer …`), as a shard requires to register a known id again;
    /// without one, a shard that knows the id refuses, which is
    /// [`DeviceError::DeviceIdTaken`]. The caller keeps the token: see
    /// [`SyncClient::ensure_registered`], which stores it in the brain.
    pub async fn register(
        &mut self,
        device_id: &str,
        region: &str,
        model_id: &str,
    ) -> Result<Registration> {
        let req = pb::RegisterRequest {
            device_id: device_id.into(),
            region: region.into(),
            model_id: model_id.into(),
            client_version: CLIENT_VERSION.into(),
            enrollment_secret: self.cfg.enrollment_secret.clone().unwrap_or_default(),
        };
        omega_protocol::validate::check_register(&req)?;
        let auth = self.cfg.token.as_deref().map(bearer).transpose()?;
        let answer = self
            .call(|mut c, deadline| {
                let req = req.clone();
                let auth = auth.clone();
                async move { c.register(request(req, deadline, auth)).await }
            })
            .await;
        let (resp, _) = match answer {
            // Without a token the only UNAUTHENTICATED a shard gives is "known id": asking
            // again cannot help, so it is final and says why.
            Err(DeviceError::Rejected { code: tonic::Code::Unauthenticated, .. })
                if auth.is_none() =>
            {
                return Err(DeviceError::DeviceIdTaken { device_id: device_id.into() });
            }
            other => other?,
        };
        if !resp.model_id.is_empty() && resp.model_id != model_id {
            return Err(DeviceError::ModelMismatch {
                expected: model_id.into(),
                got: resp.model_id,
            });
        }
        bearer(&resp.device_token)?;
        let issued = DeviceRegistration {
            device_id: device_id.into(),
            endpoint: self.cfg.endpoint.clone(),
            token: resp.device_token.clone(),
            shard_id: resp.shard_id,
            region: resp.region.clone(),
            sync_interval_min_secs: resp.sync_interval_min_secs,
            sync_interval_max_secs: resp.sync_interval_max_secs,
        };
        if !issued.usable_for(device_id) {
            return Err(DeviceError::Rejected {
                code: tonic::Code::Internal,
                message: "the shard answered with an empty or unprintable device token".into(),
            });
        }
        self.adopt(issued);
        Ok(Registration {
            device_token: resp.device_token,
            shard_id: resp.shard_id,
            region: resp.region,
            model_id: resp.model_id,
            sync_interval_min_secs: resp.sync_interval_min_secs,
            sync_interval_max_secs: resp.sync_interval_max_secs,
        })
    }

    /// Takes `reg`'s token and the sync interval the shard asked for.
    fn adopt(&mut self, reg: DeviceRegistration) {
        self.cfg.token = Some(reg.token.clone());
        let (lo, hi) = (reg.sync_interval_min_secs, reg.sync_interval_max_secs);
        if lo > 0 && hi >= lo {
            self.cfg.min_interval_secs = clamp_interval(u64::from(lo));
            self.cfg.max_interval_secs = clamp_interval(u64::from(hi));
        }
        self.issued = Some(reg);
    }

    /// Takes the token the brain keeps for this endpoint, when the client holds none.
    fn adopt_stored(&mut self, stored: Option<DeviceRegistration>) -> bool {
        match stored {
            Some(reg) if self.cfg.token.is_none() && reg.endpoint == self.cfg.endpoint => {
                self.adopt(reg);
                true
            }
            _ => false,
        }
    }

    /// Makes sure the client holds a token for the brain's device, registering only when
    /// needed, and keeps a new token in the brain before anything else happens:
    ///
    /// - a token of the config, or one the client holds already: nothing to do;
    /// - the brain keeps one from this endpoint (an earlier run): it is used, no call made;
    /// - the brain keeps one from another endpoint: it is presented at a registration (the
    ///   same shard under another name confirms it); a shard that refuses it (another
    ///   secret) is asked to register the id as new;
    /// - none: the id is registered. If the shard knows it already
    ///   ([`DeviceError::DeviceIdTaken`]: an earlier answer was lost, or the database was
    ///   copied to a TV that registered first), a generated id under which nothing was ever
    ///   sent is replaced by a fresh one ([`Brain::renew_device_id`]) and registered;
    ///   otherwise the error is returned and nothing local changes.
    pub async fn ensure_registered(&mut self, brain: &mut impl BrainAccess) -> Result<Enrolment> {
        if self.cfg.token.is_some() {
            return Ok(Enrolment::default());
        }
        let (device, model, stored) = brain.with_brain(|b| {
            let stored = b.registration().filter(|r| r.usable_for(b.device_id())).cloned();
            Ok((b.device_id().to_owned(), b.embedder().model_id().to_owned(), stored))
        })?;
        let region = self.cfg.region.clone();
        let mut enrolment = Enrolment { registered: true, device_id_renewed: false };
        if let Some(reg) = stored {
            if self.adopt_stored(Some(reg.clone())) {
                return Ok(Enrolment::default());
            }
            self.cfg.token = Some(reg.token);
            match self.register(&device, &region, &model).await {
                Ok(_) => {
                    self.keep_issued(brain)?;
                    return Ok(enrolment);
                }
                // Another shard, with another secret: the id is new there (or taken, below).
                Err(DeviceError::Rejected { code: tonic::Code::Unauthenticated, .. }) => {
                    self.cfg.token = None;
                }
                Err(e) => {
                    self.cfg.token = None;
                    return Err(e);
                }
            }
        }
        match self.register(&device, &region, &model).await {
            Ok(_) => {}
            Err(DeviceError::DeviceIdTaken { device_id }) => {
                let fresh = brain.with_brain(|b| {
                    if b.device_id() != device_id || !b.can_renew_device_id() {
                        return Ok(None);
                    }
                    b.renew_device_id().map(|id| Some(id.to_owned()))
                })?;
                let Some(fresh) = fresh else {
                    return Err(DeviceError::DeviceIdTaken { device_id });
                };
                tracing::warn!(
                    old = %device_id,
                    new = %fresh,
                    "the shard knows this device id and no token is held for it (nothing was \
                     ever synced under it); registering a fresh id"
                );
                self.register(&fresh, &region, &model).await?;
                enrolment.device_id_renewed = true;
            }
            Err(e) => return Err(e),
        }
        self.keep_issued(brain)?;
        Ok(enrolment)
    }

    /// Stores the registration just made in the brain (its device id must still be the one
    /// registered; a brain whose id changed meanwhile is left alone).
    fn keep_issued(&self, brain: &mut impl BrainAccess) -> Result<()> {
        let Some(reg) = self.issued.clone() else { return Ok(()) };
        brain.with_brain(|b| {
            if b.device_id() == reg.device_id {
                b.save_registration(reg)?;
            }
            Ok(())
        })
    }

    /// [`SyncClient::ensure_registered`], then [`SyncClient::sync_with`]: what a TV runs every
    /// 5-15 minutes (the C ABI's `omega_brain_sync`).
    pub async fn register_and_sync(&mut self, brain: &mut impl BrainAccess) -> Result<SyncReport> {
        let started = Instant::now();
        let enrolment = self.ensure_registered(brain).await?;
        let mut report = self.sync_with(brain).await?;
        report.registered = enrolment.registered;
        report.device_id_renewed = enrolment.device_id_renewed;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Pushes the brain's pending deltas (if any; several after a long offline period, at
    /// most [`MAX_PUSHES_PER_SYNC`]) and takes in the global patterns. On failure the delta
    /// stays in the brain's outbox, to be sent again, same version.
    ///
    /// A delta the shard refuses as invalid (`INVALID_ARGUMENT`, other than a model mismatch)
    /// would be refused at every retry and block every later change: it is quarantined
    /// (dropped from the outbox, counted, logged) and syncing goes on with the next changes.
    /// A malformed `global` answer is refused whole (nothing of it applied) with
    /// [`DeviceError::Invalid`]; the acknowledgement that came with it still counts.
    pub async fn sync(&mut self, brain: &mut Brain) -> Result<SyncReport> {
        self.sync_with(&mut &mut *brain).await
    }

    /// [`SyncClient::sync`] as of `now_ms` (unix ms): the global patterns that come back are
    /// taken in with [`Brain::apply_global_at`] at that time, so a replay controls it.
    pub async fn sync_at(&mut self, brain: &mut Brain, now_ms: i64) -> Result<SyncReport> {
        self.sync_inner(&mut &mut *brain, Some(now_ms)).await
    }

    /// [`SyncClient::sync`] with the brain reached through `brain` only to prepare and to
    /// take in each answer.
    ///
    /// A client without a token uses the one the brain keeps for this endpoint; without
    /// either, this is [`DeviceError::State`] (see [`SyncClient::register_and_sync`]). Once the
    /// shard has accepted the token, the brain keeps it (if it did not already).
    pub async fn sync_with(&mut self, brain: &mut impl BrainAccess) -> Result<SyncReport> {
        self.sync_inner(brain, None).await
    }

    /// The sync; `now_ms` is the time global patterns are taken in at (`None`: the clock).
    async fn sync_inner(
        &mut self,
        brain: &mut impl BrainAccess,
        now_ms: Option<i64>,
    ) -> Result<SyncReport> {
        let started = Instant::now();
        if self.cfg.token.is_none() {
            let stored = brain.with_brain(|b| {
                Ok(b.registration().filter(|r| r.usable_for(b.device_id())).cloned())
            })?;
            self.adopt_stored(stored);
        }
        let token = self.cfg.token.clone().ok_or_else(|| {
            DeviceError::State("not registered: call register first or set a token".into())
        })?;
        let mut token = token;
        let mut auth = bearer(&token)?;
        let mut report = SyncReport::default();
        let mut answered = false;
        let mut device = String::new();
        for _ in 0..MAX_PUSHES_PER_SYNC {
            let (req, delta) = brain.with_brain(|b| {
                if !answered {
                    device = b.device_id().to_owned();
                }
                let delta = b.prepare_delta()?;
                let req = pb::SyncRequest {
                    device_id: b.device_id().into(),
                    delta: delta.as_ref().map(|d| d.to_wire()),
                    known_global_version: b.global_version(),
                };
                Ok((req, delta))
            })?;
            if answered && delta.is_none() {
                break; // everything pushed, and the last answer already brought the news
            }
            let bytes_up = wire::grpc_zstd_size(&req);
            let answer = self
                .call(|mut c, deadline| {
                    let req = req.clone();
                    let auth = auth.clone();
                    async move { c.sync(request(req, deadline, Some(auth))).await }
                })
                .await;
            let (resp, attempts) = match (answer, &delta) {
                (Ok(a), _) => a,
                (Err(DeviceError::Rejected { code, message }), Some(d))
                    if code == tonic::Code::InvalidArgument && !is_model_refusal(&message) =>
                {
                    let changes = brain.with_brain(|b| b.quarantine_delta(d.local_version))?;
                    tracing::warn!(
                        local_version = d.local_version,
                        changes,
                        reason = %message,
                        "the shard refused a delta as invalid; quarantined it"
                    );
                    report.quarantined_deltas += 1;
                    report.quarantined_changes += changes;
                    continue;
                }
                (Err(e), _) => return Err(e),
            };
            if !answered {
                // The shard accepted the token: the brain keeps it from now on (a record it
                // holds for this token and endpoint already is not replaced by a poorer one
                // made of the config).
                let reg = self.record(&device, &token);
                brain.with_brain(|b| match reg {
                    Some(reg)
                        if b.device_id() == reg.device_id
                            && b.registration().is_none_or(|held| {
                                held.token != reg.token || held.endpoint != reg.endpoint
                            }) =>
                    {
                        b.save_registration(reg)
                    }
                    _ => Ok(()),
                })?;
            }
            answered = true;
            if !resp.renewed_token.is_empty() {
                self.renew(brain, &device, &resp.renewed_token)?;
                token = resp.renewed_token.clone();
                auth = bearer(&token)?;
                report.token_renewed = true;
            }
            report.bytes_up += bytes_up;
            report.bytes_down += wire::grpc_zstd_size(&resp);
            report.attempts += attempts;
            report.replayed = resp.replayed;
            report.patterns_accepted += resp.patterns_accepted;
            report.patterns_filtered += resp.patterns_filtered;
            let acknowledged =
                delta.as_ref().is_some_and(|d| resp.acknowledged_version >= d.local_version);
            if let Some(d) = &delta {
                report.local_version = Some(d.local_version);
                report.acknowledged = acknowledged;
                if acknowledged {
                    report.deltas_pushed += 1;
                    report.pushed_added += d.added.len();
                    report.pushed_updated += d.updated.len();
                    report.pushed_removed += d.removed.len();
                }
            }
            let global = resp.global;
            brain.with_brain(|b| {
                if let Some(d) = &delta
                    && acknowledged
                {
                    b.acknowledge(d.local_version)?;
                }
                if let Some(g) = global {
                    // Validated whole before anything is applied.
                    let global = GlobalPatterns::from_wire(g)?;
                    report.similar_received += global.similar.len();
                    report.similar_ids.extend(global.similar.iter().map(|p| p.id));
                    report.trends_received += global.trending.len();
                    b.apply_global_at(global, now_ms.unwrap_or_else(crate::brain::now_ms))?;
                }
                Ok(())
            })?;
            if delta.is_none() || !acknowledged {
                break;
            }
        }
        report.global_version = brain.with_brain(|b| Ok(b.global_version()))?;
        report.next_sync_in_ms = self.next_sync_delay().as_millis() as u64;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Takes a renewed token: the client presents it from now on and the brain keeps it at
    /// once (the old one may stop working at the shard's next key rotation). A token that is
    /// not valid header text is ignored: the current one still works.
    fn renew(&mut self, brain: &mut impl BrainAccess, device: &str, new: &str) -> Result<()> {
        if bearer(new).is_err() {
            tracing::warn!(
                "the shard renewed the token with unprintable text; keeping the old one"
            );
            return Ok(());
        }
        let old = self.cfg.token.replace(new.to_owned());
        if let Some(issued) = &mut self.issued
            && issued.device_id == device
        {
            issued.token = new.to_owned();
        }
        brain.with_brain(|b| {
            let reg = match b.registration() {
                Some(held) if held.device_id == device && Some(&held.token) == old.as_ref() => {
                    DeviceRegistration { token: new.to_owned(), ..held.clone() }
                }
                _ => match self.record(device, new) {
                    Some(r) => r,
                    None => return Ok(()),
                },
            };
            if b.device_id() == device { b.save_registration(reg) } else { Ok(()) }
        })
    }

    /// The registration to keep for `token` of `device`: the one issued with it, or one made
    /// of the config (a token given there, now accepted by the shard).
    fn record(&self, device: &str, token: &str) -> Option<DeviceRegistration> {
        let reg = match &self.issued {
            Some(r) if r.token == token && r.device_id == device => r.clone(),
            _ => DeviceRegistration {
                device_id: device.into(),
                endpoint: self.cfg.endpoint.clone(),
                token: token.into(),
                shard_id: 0,
                region: self.cfg.region.clone(),
                sync_interval_min_secs: 0,
                sync_interval_max_secs: 0,
            },
        };
        reg.usable_for(device).then_some(reg)
    }

    /// Pause before the next sync, random within the shard's (or configured) interval,
    /// clamped to [`MIN_SYNC_INTERVAL_SECS`]..[`MAX_SYNC_INTERVAL_SECS`].
    pub fn next_sync_delay(&self) -> Duration {
        let lo = clamp_interval(self.cfg.min_interval_secs);
        let hi = clamp_interval(self.cfg.max_interval_secs).max(lo);
        next_sync_delay(Duration::from_secs(lo), Duration::from_secs(hi), &mut rand::rng())
    }

    /// Runs one call with deadline and retries; returns the answer and the attempts made.
    async fn call<T, F, Fut>(&self, mut f: F) -> Result<(T, u32)>
    where
        F: FnMut(ConstellationClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Duration::from_millis(self.cfg.timeout_ms.max(1));
        let attempts = self.cfg.max_attempts.max(1);
        let mut last = String::new();
        for attempt in 0..attempts {
            let outcome = tokio::time::timeout(deadline, f(self.client.clone(), deadline)).await;
            let status = match outcome {
                Ok(Ok(resp)) => return Ok((resp.into_inner(), attempt + 1)),
                Ok(Err(status)) => deadline_as_such(status),
                Err(_) => {
                    tonic::Status::deadline_exceeded(format!("no answer within {deadline:?}"))
                }
            };
            if !is_retryable(status.code()) {
                return Err(DeviceError::Rejected {
                    code: status.code(),
                    message: status.message().into(),
                });
            }
            last = format!("{:?}: {}", status.code(), status.message());
            if attempt + 1 < attempts {
                let wait = backoff_delay(
                    attempt,
                    Duration::from_millis(self.cfg.backoff_base_ms),
                    Duration::from_millis(self.cfg.backoff_max_ms),
                    &mut rand::rng(),
                );
                tracing::debug!(attempt = attempt + 1, error = %last, ?wait, "shard call failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
        Err(DeviceError::Unavailable { attempts, message: last })
    }
}

/// tonic reports the expiry of a call's `grpc-timeout` on the client side as CANCELLED
/// ("Timeout expired"); it is a deadline, and retryable as one.
fn deadline_as_such(status: tonic::Status) -> tonic::Status {
    let expired = tonic::TimeoutExpired(()).to_string();
    if status.code() == tonic::Code::Cancelled && status.message() == expired {
        tonic::Status::deadline_exceeded(expired)
    } else {
        status
    }
}

/// A request with this call's deadline and, when given, the device's bearer token.
fn request<T>(
    msg: T,
    deadline: Duration,
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(deadline);
    if let Some(auth) = auth {
        r.metadata_mut().insert("authorization", auth);
    }
    r
}

fn bearer(token: &str) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| DeviceError::SyncConfig("token is not valid header text".into()))
}

#[cfg(feature = "tls")]
fn tls(endpoint: Endpoint, cfg: &SyncConfig) -> Result<Endpoint> {
    use tonic::transport::{Certificate, ClientTlsConfig};
    // The platform's bundle first (a TV vendor's CA updates reach it); the webpki roots for
    // platforms that ship none.
    let mut tls = ClientTlsConfig::new().with_native_roots().with_webpki_roots();
    if let Some(path) = &cfg.ca_cert_path {
        let pem = std::fs::read(path).map_err(|e| {
            DeviceError::SyncConfig(format!("CA certificate {}: {e}", path.display()))
        })?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    endpoint.tls_config(tls).map_err(|e| DeviceError::SyncConfig(format!("TLS: {e}")))
}

#[cfg(not(feature = "tls"))]
fn tls(_endpoint: Endpoint, cfg: &SyncConfig) -> Result<Endpoint> {
    Err(DeviceError::SyncConfig(format!(
        "{} needs TLS: build omega-device with the `tls` feature",
        cfg.endpoint
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn retryable_codes_table() {
        use tonic::Code::*;
        let cases = [
            (Unavailable, true),
            (DeadlineExceeded, true),
            (ResourceExhausted, true),
            (InvalidArgument, false),
            (Unauthenticated, false),
            (PermissionDenied, false),
            (Internal, false),
            (FailedPrecondition, false),
        ];
        for (code, want) in cases {
            assert_eq!(is_retryable(code), want, "{code:?}");
        }
    }

    #[test]
    fn backoff_is_bounded_by_the_growing_ceiling() {
        let mut rng = StdRng::seed_from_u64(1);
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1_000);
        for (attempt, ceiling) in [(0, 100), (1, 200), (2, 400), (3, 800), (4, 1_000), (40, 1_000)]
        {
            let mut seen_max = Duration::ZERO;
            for _ in 0..200 {
                let d = backoff_delay(attempt, base, max, &mut rng);
                assert!(d <= Duration::from_millis(ceiling), "attempt {attempt}: {d:?}");
                seen_max = seen_max.max(d);
            }
            // Full jitter spreads over the whole range.
            assert!(seen_max > Duration::from_millis(ceiling / 2), "attempt {attempt}");
        }
        assert_eq!(backoff_delay(3, Duration::ZERO, max, &mut rng), Duration::ZERO);
    }

    #[test]
    fn next_sync_is_between_five_and_fifteen_minutes_and_spread() {
        let mut rng = StdRng::seed_from_u64(2);
        let (lo, hi) = (Duration::from_secs(300), Duration::from_secs(900));
        let ds: Vec<Duration> = (0..500).map(|_| next_sync_delay(lo, hi, &mut rng)).collect();
        assert!(ds.iter().all(|d| *d >= lo && *d <= hi));
        assert!(ds.iter().any(|d| *d < Duration::from_secs(400)));
        assert!(ds.iter().any(|d| *d > Duration::from_secs(800)));
        assert_eq!(next_sync_delay(hi, hi, &mut rng), hi);
    }
}
