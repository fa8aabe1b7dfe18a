//! The brain of one TV: learns patterns from what is watched, recommends offline, and keeps
//! the delta for the shard.
//!
//! State lives in memory for speed (patterns as an int8 matrix, scanned in well under a
//! millisecond) and in the SQLite file for durability ([`crate::store`]): every change is
//! written in one transaction first and applied in memory only once committed, so a failed
//! write leaves both as they were.
//!
//! The brain coordinates its parts and owns no rule itself: [`crate::local`] (what this TV
//! learned and watched), [`crate::global_cache`] (what the federation sent),
//! [`crate::outbox`] (sync bookkeeping: [`Brain::prepare_delta`] persists the delta it builds
//! and returns that very delta until [`Brain::acknowledge`]) and [`crate::ranker`] (the one
//! scoring rule of `recommend` and `score`). Time is an input: events carry theirs,
//! [`RecommendContext::now_ms`] and [`Brain::apply_global_at`] take one, and only the
//! entry points that take none read the clock.

use crate::catalogue::{Catalogue, CatalogueItem};
use crate::embedder::{Embedder, EmbedderConfig};
use crate::error::{DeviceError, Result};
use crate::global_cache::GlobalCache;
use crate::local::{LocalPatterns, PatternKey, Watched};
use crate::outbox::{self, Outbox};
use crate::ranker::{Moment, Parts, Ranker};
use crate::ranking::{self, RankingParams, Recommendation};
use crate::registration::DeviceRegistration;
use crate::store::{Store, StoredPattern};
use omega_protocol::validate::{self, ValidationError};
use omega_protocol::vector::{QuantizedVector, quantize};
use omega_protocol::{
    ContentType, DayType, GlobalPatterns, Pattern, PatternDelta, TimeSlot, TrendTarget,
    ViewingContext, ViewingEvent, pb,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use uuid::Uuid;

/// Most recommendations one call returns.
pub const MAX_K: usize = 200;
/// Most candidates one [`Brain::score`] call takes.
pub const MAX_SCORE_CANDIDATES: usize = 10_000;
/// Rough bytes one local pattern costs in memory (vector, fields, strings, map entry).
const BYTES_PER_PATTERN: usize = 768;
/// Rough bytes one watched entry costs.
const BYTES_PER_WATCHED: usize = 96;
/// Largest `max_patterns`, `max_global_patterns`, `max_watched`.
const MAX_ITEMS: usize = 10_000_000;
/// Smallest memory budget (64 KiB: a handful of patterns).
const MIN_BUDGET: usize = 1 << 16;
/// Largest memory budget: 1 TiB (far beyond a TV, still far from overflow), or all a 32-bit
/// `usize` holds (4 GiB - 1 B, on 32-bit ARM TVs).
const MAX_BUDGET: usize = if usize::BITS > 40 { (1u64 << 40) as usize } else { usize::MAX };

/// How a brain runs. Every field has a default; as JSON (C SDK) unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrainConfig {
    /// The SQLite file; `None` keeps everything in memory (nothing survives `close`).
    pub db_path: Option<PathBuf>,
    /// Pseudonymous device id; generated (UUID v7) and stored on first open when absent.
    pub device_id: Option<String>,
    /// The model ([`Brain::open`] only; [`Brain::open_shared`] takes an embedder).
    pub embedder: EmbedderConfig,
    /// A JSON array of [`CatalogueItem`] ([`Brain::open`] only). Item embeddings are cached in
    /// the database, so only new items are embedded at the next open.
    pub catalogue_path: Option<PathBuf>,
    /// Most local patterns kept; beyond, the least valuable is evicted (see [`ranking::retention`]).
    pub max_patterns: usize,
    /// Most global patterns kept.
    pub max_global_patterns: usize,
    /// Most watched contents remembered (for exclusion); the oldest are forgotten first.
    pub max_watched: usize,
    /// Memory the brain's own data may use (patterns, globals, watched), in bytes; lowers
    /// `max_patterns` when it would not fit. The model and the catalogue are shared and not
    /// counted.
    pub memory_budget_bytes: usize,
    /// Patterns below this success rate are not pushed (a shard stores only >= 0.7); once
    /// pushed, every change is.
    pub share_min_success: f32,
    /// Offset of the TV's local time from UTC, minutes (for the time slot of an event).
    pub utc_offset_minutes: i32,
    /// `true`: every commit reaches the disk (`synchronous=FULL`); `false`: faster, still
    /// consistent after a crash, may lose the last changes on power loss.
    pub durable: bool,
    /// Learning and ranking parameters.
    pub ranking: RankingParams,
    /// `true` (the default): a pattern whose content has a published collaborative vector is
    /// uploaded without its title embedding (content id and coarse context only); shards
    /// store it and the federation groups it by its content id. `false` sends every
    /// embedding (for shards older than that).
    pub omit_public_embeddings: bool,
}

impl Default for BrainConfig {
    fn default() -> Self {
        BrainConfig {
            db_path: None,
            device_id: None,
            embedder: EmbedderConfig::default(),
            catalogue_path: None,
            max_patterns: 10_000,
            max_global_patterns: 2_000,
            max_watched: 50_000,
            memory_budget_bytes: 32 << 20,
            share_min_success: validate::MIN_STORED_QUALITY,
            utc_offset_minutes: 0,
            durable: true,
            ranking: RankingParams::default(),
            omit_public_embeddings: true,
        }
    }
}

impl BrainConfig {
    fn check(&self) -> Result<()> {
        if let Some(id) = &self.device_id {
            validate::check_required_string("device_id", id)?;
        }
        validate::check_rate("share_min_success", self.share_min_success)?;
        validate::check_range(
            "utc_offset_minutes",
            f64::from(self.utc_offset_minutes),
            -1440.0,
            1440.0,
        )?;
        // Every size is bounded: these values size allocations and arithmetic, and a C caller
        // can pass anything JSON can spell.
        for (field, v, min, max) in [
            ("max_patterns", self.max_patterns, 1, MAX_ITEMS),
            ("max_global_patterns", self.max_global_patterns, 1, MAX_ITEMS),
            ("max_watched", self.max_watched, 1, MAX_ITEMS),
            ("memory_budget_bytes", self.memory_budget_bytes, MIN_BUDGET, MAX_BUDGET),
            ("ranking.seeds", self.ranking.seeds, 1, 1_000),
            ("ranking.neighbours_per_seed", self.ranking.neighbours_per_seed, 1, 10_000),
            ("ranking.success_window", self.ranking.success_window as usize, 1, 1_000_000),
        ] {
            validate::check_range(field, v as f64, min as f64, max as f64)?;
        }
        let r = &self.ranking;
        for (field, v) in [
            ("ranking.freshness_half_life_days", r.freshness_half_life_days),
            ("ranking.freshness_floor", r.freshness_floor),
            ("ranking.catalogue_weight", r.catalogue_weight),
            ("ranking.global_weight", r.global_weight),
            ("ranking.trend_weight", r.trend_weight),
            ("ranking.cold_start_weight", r.cold_start_weight),
            ("ranking.genre_hint_weight", r.genre_hint_weight),
            ("ranking.collaborative_weight", r.collaborative_weight),
        ] {
            validate::check_range(field, f64::from(v), 0.0, 1e6)?;
        }
        Ok(())
    }

    /// Patterns that fit both `max_patterns` and the memory budget.
    pub fn effective_max_patterns(&self) -> usize {
        // Saturating: callers may ask before `check` (or with absurd values); never overflow.
        let global = self.max_global_patterns.saturating_mul(BYTES_PER_PATTERN);
        let watched = self.max_watched.saturating_mul(BYTES_PER_WATCHED);
        let left = self.memory_budget_bytes.saturating_sub(global.saturating_add(watched));
        self.max_patterns.min(left / BYTES_PER_PATTERN).max(1)
    }
}

/// What [`Brain::observe`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObserveOutcome {
    /// The pattern the event was learned into.
    pub pattern_id: Uuid,
    /// True when the pattern is new.
    pub created: bool,
    /// Its success rate now.
    pub success_rate: f32,
    /// Its observations now.
    pub sample_count: u32,
    /// A pattern evicted to make room, if any.
    pub evicted: Option<Uuid>,
}

/// The moment and mood to recommend for. Everything is optional: the time slot and day type
/// default to those of `now_ms` (itself defaulting to the clock).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecommendContext {
    /// "Now", unix ms (replays and tests pass it; freshness is measured from it).
    pub now_ms: Option<i64>,
    /// Part of the day.
    pub time_slot: Option<TimeSlot>,
    /// Weekday or weekend.
    pub day_type: Option<DayType>,
    /// Kind of content wanted.
    pub content_type: Option<ContentType>,
    /// Genre hints.
    pub genres: Vec<String>,
}

impl RecommendContext {
    fn check(&self) -> Result<(), ValidationError> {
        if let Some(now) = self.now_ms {
            validate::check_timestamp("now_ms", now)?;
        }
        validate::check_genres("genres", &self.genres)
    }
}

/// Counters of a brain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrainStats {
    /// Pseudonymous device id.
    pub device_id: String,
    /// Model of every embedding.
    pub model_id: String,
    /// Local patterns.
    pub patterns: usize,
    /// Local patterns allowed (config and memory budget).
    pub max_patterns: usize,
    /// Global patterns held.
    pub global_patterns: usize,
    /// True when global patterns are searched through HNSW.
    pub global_index_hnsw: bool,
    /// Of the global patterns, contents' collaborative item vectors (main aggregates).
    pub collaborative_vectors: usize,
    /// Trend signals held.
    pub trends: usize,
    /// Contents watched (excluded from recommendations).
    pub watched: usize,
    /// Catalogue items.
    pub catalogue_items: usize,
    /// Last `local_version` handed out.
    pub local_version: u64,
    /// Last `local_version` acknowledged by the shard.
    pub acked_version: u64,
    /// A delta awaits acknowledgement.
    pub delta_in_flight: bool,
    /// Changes waiting for the next delta (patterns to add or update, removals).
    pub unsynced_changes: usize,
    /// Version of the global patterns held.
    pub global_version: u64,
    /// Patterns evicted since open.
    pub evictions: u64,
    /// Deltas the shard refused as invalid and that were dropped (ever, on this database).
    pub quarantined_deltas: u64,
    /// Database rows found unusable at open (tampered or corrupt values): left in the file,
    /// kept out of memory.
    pub skipped_rows: usize,
    /// The brain holds a device token (kept from a registration, never shown): a sync after
    /// a reboot goes on without registering again.
    pub has_token: bool,
    /// Estimated bytes of the brain's own data.
    pub memory_bytes: usize,
    /// The configured budget.
    pub memory_budget_bytes: usize,
}

/// The on-device brain. `Send`; one per TV (or per simulated TV).
///
/// It coordinates its parts and holds no rule of its own: what it learned
/// ([`LocalPatterns`], [`Watched`]), what the federation sent ([`GlobalCache`]), what awaits
/// the shard ([`Outbox`]), and the one [`Ranker`] behind `recommend` and `score`. Each
/// change is written to the database first and applied to the parts once committed.
pub struct Brain {
    cfg: BrainConfig,
    max_patterns: usize,
    embedder: Arc<Embedder>,
    catalogue: Option<Arc<Catalogue>>,
    store: Store,
    device_id: String,
    local: LocalPatterns,
    watched: Watched,
    global: GlobalCache,
    outbox: Outbox,
    /// The collaborative query over what was watched, kept current by
    /// [`Brain::refresh_collab_query`]; `None` without any vector of a watched content.
    collab_query: Option<QuantizedVector>,
    skipped_rows: usize,
    /// The shard registration held for `device_id` (its token is a credential: never logged).
    registration: Option<DeviceRegistration>,
    /// `device_id` was generated by this library and the config does not pin it, so it may be
    /// replaced ([`Brain::renew_device_id`]).
    id_generated: bool,
}

impl std::fmt::Debug for Brain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Brain")
            .field("device_id", &self.device_id)
            .field("store", &self.store)
            .field("patterns", &self.local.len())
            .finish_non_exhaustive()
    }
}

/// The wall clock, unix ms: read only at the public entry points that do not take a time
/// (replays and tests pass theirs).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const META_MODEL: &str = "model_id";
const META_DEVICE: &str = "device_id";
const META_LOCAL_VERSION: &str = "local_version";
const META_ACKED: &str = "acked_version";
const META_GLOBAL_VERSION: &str = "global_version";
const META_TRENDS: &str = "trends";
const META_QUARANTINED: &str = "quarantined_deltas";
const META_REGISTRATION: &str = "registration";
const META_ID_GENERATED: &str = "device_id_generated";

impl Brain {
    /// Opens a brain with its own embedder (and catalogue, from `catalogue_path`).
    pub fn open(cfg: BrainConfig) -> Result<Brain> {
        cfg.check()?;
        cfg.embedder.check("embedder.")?;
        let embedder = Arc::new(Embedder::new(cfg.embedder.clone())?);
        let mut store = Store::open(cfg.db_path.as_deref(), cfg.durable)?;
        check_model(&store, embedder.model_id())?;
        let catalogue = match &cfg.catalogue_path {
            Some(path) => Some(Arc::new(load_catalogue(path, &embedder, &mut store)?)),
            None => None,
        };
        Self::assemble(cfg, store, embedder, catalogue)
    }

    /// Opens a brain on a shared embedder and catalogue (the simulator's ~943 brains share
    /// one of each). `cfg.embedder` and `cfg.catalogue_path` are ignored.
    pub fn open_shared(
        cfg: BrainConfig,
        embedder: Arc<Embedder>,
        catalogue: Option<Arc<Catalogue>>,
    ) -> Result<Brain> {
        cfg.check()?;
        if let Some(c) = &catalogue
            && c.model_id() != embedder.model_id()
        {
            return Err(DeviceError::ModelMismatch {
                expected: embedder.model_id().into(),
                got: c.model_id().into(),
            });
        }
        let store = Store::open(cfg.db_path.as_deref(), cfg.durable)?;
        check_model(&store, embedder.model_id())?;
        Self::assemble(cfg, store, embedder, catalogue)
    }

    fn assemble(
        cfg: BrainConfig,
        mut store: Store,
        embedder: Arc<Embedder>,
        catalogue: Option<Arc<Catalogue>>,
    ) -> Result<Brain> {
        let model = embedder.model_id().to_owned();
        let stored_device: Option<String> = store.meta(META_DEVICE)?;
        let generated_now = cfg.device_id.is_none() && stored_device.is_none();
        let device_id = match (&cfg.device_id, stored_device) {
            (Some(want), Some(have)) if *want != have => {
                return Err(DeviceError::State(format!(
                    "database {} belongs to device {have:?}, not {want:?}",
                    store.path()
                )));
            }
            (_, Some(have)) => have,
            (Some(want), None) => want.clone(),
            (None, None) => Uuid::now_v7().to_string(),
        };
        // Only an id this library made up may ever be replaced: one the caller chose (now or
        // in a database from before this marker) stays as it is.
        let id_generated = cfg.device_id.is_none()
            && (generated_now
                || matches!(
                    store.meta(META_ID_GENERATED)?,
                    Some(rusqlite::types::Value::Integer(1))
                ));
        store.write(|tx| {
            tx.set_meta(META_MODEL, &model)?;
            tx.set_meta(META_DEVICE, &device_id)?;
            if generated_now {
                tx.set_meta(META_ID_GENERATED, 1i64)?;
            }
            Ok(())
        })?;
        let (registration, bad_registration) = load_registration(&store, &device_id)?;
        let loaded = store.patterns()?;
        let loaded_globals = store.globals()?;
        // A row edited behind the library's back (NaN, out of range) is left in the file and
        // kept out of memory, so it can never poison a delta; counted and logged.
        let skipped_rows =
            loaded.skipped.len() + loaded_globals.skipped.len() + usize::from(bad_registration);
        for why in loaded.skipped.iter().chain(&loaded_globals.skipped) {
            tracing::warn!(db = store.path(), row = %why, "skipping an unusable database row");
        }
        let pending = match store.outbox()? {
            Some((_, bytes)) => {
                let wire = pb::PatternDelta::decode(bytes.as_slice())
                    .map_err(|e| DeviceError::db(store.path(), format!("outbox: {e}")))?;
                Some(PatternDelta::from_wire(wire, &model)?)
            }
            None => None,
        };
        let trends = match store.meta::<Vec<u8>>(META_TRENDS)? {
            Some(bytes) => {
                let wire = pb::GlobalPatterns::decode(bytes.as_slice())
                    .map_err(|e| DeviceError::db(store.path(), format!("trends: {e}")))?;
                GlobalPatterns::from_wire(wire)?.trending
            }
            None => Vec::new(),
        };
        let version =
            |key: &str| -> Result<u64> { Ok(store.meta::<i64>(key)?.unwrap_or(0).max(0) as u64) };
        // Last, so the background warm-up does not compete with loading the file.
        let genres = catalogue
            .iter()
            .flat_map(|c| c.items())
            .flat_map(|i| i.genres.iter().map(String::as_str));
        embedder.prewarm_in_background(ranking::context_vocabulary(genres));
        let mut brain = Brain {
            max_patterns: cfg.effective_max_patterns(),
            local: LocalPatterns::load(loaded.rows, store.removed()?),
            watched: Watched::load(store.watched()?),
            global: GlobalCache::load(loaded_globals.rows, version(META_GLOBAL_VERSION)?, trends),
            outbox: Outbox::load(
                pending,
                version(META_LOCAL_VERSION)?,
                version(META_ACKED)?,
                version(META_QUARANTINED)?,
            ),
            cfg,
            embedder,
            catalogue,
            device_id,
            collab_query: None,
            skipped_rows,
            registration,
            id_generated,
            store,
        };
        brain.refresh_collab_query();
        Ok(brain)
    }

    /// The pseudonymous device id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The shared embedder.
    pub fn embedder(&self) -> &Arc<Embedder> {
        &self.embedder
    }

    /// The catalogue, if any.
    pub fn catalogue(&self) -> Option<&Arc<Catalogue>> {
        self.catalogue.as_ref()
    }

    /// Version of the global patterns held (sent as `known_global_version`).
    pub fn global_version(&self) -> u64 {
        self.global.version()
    }

    /// The shard registration held for this device, if any (kept across reopens).
    pub fn registration(&self) -> Option<&DeviceRegistration> {
        self.registration.as_ref()
    }

    /// Keeps `reg` (the token a shard issued for this device) in the database, replacing the
    /// one held. Written before it is used, so a TV that reboots right after registering
    /// does not have to register again (which the shard would refuse without the token).
    pub fn save_registration(&mut self, reg: DeviceRegistration) -> Result<()> {
        if !reg.usable_for(&self.device_id) {
            return Err(DeviceError::State(format!(
                "a registration for device {:?} with a usable token cannot be kept by device {:?}",
                reg.device_id, self.device_id
            )));
        }
        if self.registration.as_ref() == Some(&reg) {
            return Ok(());
        }
        let json = serde_json::to_string(&reg)?;
        self.store.write(|tx| tx.set_meta(META_REGISTRATION, &json))?;
        self.registration = Some(reg);
        Ok(())
    }

    /// True when the device id may be replaced by a fresh one: this library generated it
    /// (the config does not pin it), no token is held for it, and no delta was ever prepared
    /// under it, so no shard holds anything of this TV under the old id. A TV must never
    /// count twice among the distinct devices behind an aggregate (k-anonymity), which is why
    /// an id that may have carried patterns is never replaced.
    pub fn can_renew_device_id(&self) -> bool {
        self.id_generated && self.registration.is_none() && self.outbox.local_version() == 0
    }

    /// Replaces the device id with a fresh UUID v7 (see [`Brain::can_renew_device_id`]) and
    /// returns it. Used when a shard already knows the id and this brain holds no token for
    /// it: its first registration went through but the answer was lost, or the database was
    /// copied to another TV that registered first. Patterns, watch history and global
    /// patterns are kept.
    pub fn renew_device_id(&mut self) -> Result<&str> {
        if !self.can_renew_device_id() {
            return Err(DeviceError::State(format!(
                "device id {:?} cannot be replaced: it was chosen by the caller, a token is held \
                 for it, or patterns may have been synced under it",
                self.device_id
            )));
        }
        let id = Uuid::now_v7().to_string();
        self.store.write(|tx| {
            tx.set_meta(META_DEVICE, &id)?;
            tx.set_meta(META_ID_GENERATED, 1i64)
        })?;
        self.device_id = id;
        Ok(&self.device_id)
    }

    /// Learns from one viewing event (its own `started_at_ms` is the time of every decision).
    pub fn observe(&mut self, event: &ViewingEvent) -> Result<ObserveOutcome> {
        event.validate()?;
        let ctx = event.context.unwrap_or_else(|| {
            ViewingContext::at(event.started_at_ms, self.cfg.utc_offset_minutes)
        });
        let key = PatternKey::new(&event.content_id, ctx.time_slot, ctx.day_type);
        let window = self.cfg.ranking.success_window;
        let (pattern, vector, index, evict) = match self.local.find(&key) {
            Some(i) => {
                let mut p = self.local.get(i).clone();
                p.success_rate = ranking::smoothed_success(
                    p.success_rate,
                    p.sample_count,
                    event.watch_fraction,
                    window,
                );
                p.sample_count = p.sample_count.saturating_add(1);
                p.updated_at_ms = p.updated_at_ms.max(event.started_at_ms);
                p.pending_samples = p.pending_samples.saturating_add(1);
                p.dirty = true;
                (p, self.local.vector(i), Some(i), None)
            }
            None => {
                let (title, genres, content_type) = self.describe(event);
                let text = ranking::pattern_text(
                    ctx.time_slot,
                    ctx.day_type,
                    content_type,
                    &title,
                    &genres,
                );
                let vector = quantize(&self.embedder.embed_shared(&text)?);
                let p = StoredPattern {
                    id: new_pattern_id(),
                    content_id: event.content_id.clone(),
                    title,
                    time_slot: ctx.time_slot,
                    day_type: ctx.day_type,
                    content_type,
                    genres,
                    success_rate: event.watch_fraction.clamp(0.0, 1.0),
                    sample_count: 1,
                    created_at_ms: event.started_at_ms,
                    updated_at_ms: event.started_at_ms,
                    synced: false,
                    pending_samples: 0,
                    dirty: false,
                };
                let evict = (self.local.len() >= self.max_patterns)
                    .then(|| self.local.eviction_victim(event.started_at_ms, &self.cfg.ranking))
                    .flatten();
                (p, vector, None, evict)
            }
        };
        let forget = self.watched.to_forget(&event.content_id, self.cfg.max_watched);
        let evicted = evict.map(|i| (self.local.get(i).id, self.local.get(i).synced));
        self.store.write(|tx| {
            if let Some((id, synced)) = evicted {
                tx.delete_pattern(id, synced)?;
            }
            tx.put_pattern(&pattern, &vector)?;
            if let Some(old) = &forget {
                tx.delete_watched(old)?;
            }
            tx.put_watched(&event.content_id, event.started_at_ms)
        })?;
        // Committed: now the same change in memory.
        let outcome = ObserveOutcome {
            pattern_id: pattern.id,
            created: index.is_none(),
            success_rate: pattern.success_rate,
            sample_count: pattern.sample_count,
            evicted: evicted.map(|e| e.0),
        };
        self.watched.record(&event.content_id, event.started_at_ms, forget.as_deref());
        if let Some(i) = evict {
            self.local.evict(i);
        }
        match index {
            Some(i) => self.local.replace(i, pattern),
            None => self.local.insert(pattern, &vector),
        }
        self.refresh_collab_query();
        Ok(outcome)
    }

    /// Title, genres and type of an event, completed from the catalogue when missing.
    fn describe(&self, event: &ViewingEvent) -> (String, Vec<String>, ContentType) {
        let item = self.catalogue.as_ref().and_then(|c| c.get(&event.content_id));
        let title = match (&event.title, item) {
            (t, Some(i)) if t.is_empty() => i.title.clone(),
            (t, _) if t.is_empty() => event.content_id.clone(),
            (t, _) => t.clone(),
        };
        let genres = match item {
            Some(i) if event.genres.is_empty() => i.genres.clone(),
            _ => event.genres.clone(),
        };
        let content_type = match (event.content_type, item) {
            (ContentType::Unspecified, Some(i)) => i.content_type,
            (t, _) => t,
        };
        (title, genres, content_type)
    }

    /// Recomputes the collaborative query (`omega_protocol::collab::query`) over the watched
    /// contents, newest first, with the item vectors this TV holds. Called whenever what was
    /// watched or which vectors are held changes, so ranking never sorts the history.
    fn refresh_collab_query(&mut self) {
        self.collab_query = None;
        if self.global.collab_count() == 0 || self.cfg.ranking.collaborative_weight <= 0.0 {
            return;
        }
        let vectors: Vec<Option<Vec<f32>>> = self
            .watched
            .newest_first()
            .into_iter()
            .map(|c| self.global.collab_vector(c).map(|v| v.dequantize()))
            .collect();
        self.collab_query = omega_protocol::collab::query(
            vectors.iter().map(Option::as_deref),
            &self.cfg.ranking.collaborative_query,
        )
        .map(|q| quantize(&q));
    }

    /// The ranker for `ctx`: the context embedded (slot/day/type and genre hints separately,
    /// so both stay in the embedder's cache and a recommendation almost never waits for the
    /// model), "now" from `ctx.now_ms`, else the clock.
    fn ranker(&self, ctx: &RecommendContext) -> Result<Ranker<'_>> {
        ctx.check()?;
        let now = ctx.now_ms.unwrap_or_else(now_ms);
        let at = ViewingContext::at(now, self.cfg.utc_offset_minutes);
        let (slot, day) =
            (ctx.time_slot.unwrap_or(at.time_slot), ctx.day_type.unwrap_or(at.day_type));
        let p = &self.cfg.ranking;
        let base =
            self.embedder.embed_shared(&ranking::context_text(slot, day, ctx.content_type, &[]))?;
        let hints =
            ctx.genres.iter().map(|g| self.embedder.embed_shared(g)).collect::<Result<Vec<_>>>()?;
        let hint_refs: Vec<&[f32]> = hints.iter().map(|h| &h[..]).collect();
        let vector = quantize(&ranking::compose_context(&base, &hint_refs, p.genre_hint_weight));
        let text = ranking::context_text(slot, day, ctx.content_type, &ctx.genres);
        let parts = Parts {
            params: p,
            catalogue: self.catalogue.as_deref(),
            local: &self.local,
            global: &self.global,
            watched: &self.watched,
            collab_query: self.collab_query.as_ref(),
        };
        Ok(Ranker::new(parts, Moment { vector, text: &text, now_ms: now }))
    }

    /// Up to `k` contents to watch now, best first, never one already watched. Each score is
    /// the one [`Brain::score`] gives the content for the same context.
    pub fn recommend(&self, ctx: &RecommendContext, k: usize) -> Result<Vec<Recommendation>> {
        ctx.check()?;
        let k = k.min(MAX_K);
        if k == 0 {
            return Ok(Vec::new());
        }
        Ok(self.ranker(ctx)?.recommend(k))
    }

    /// One score per candidate content, in order, by the rule [`Brain::recommend`] ranks with
    /// (for evaluation harnesses that rank held-out items). Watched contents are scored like
    /// any other; a content known neither to the catalogue, the global patterns, the trends
    /// nor the local patterns gets [`crate::UNKNOWN_SCORE`].
    pub fn score(&self, ctx: &RecommendContext, content_ids: &[String]) -> Result<Vec<f32>> {
        ctx.check()?;
        if content_ids.len() > MAX_SCORE_CANDIDATES {
            return Err(ValidationError::TooMany {
                field: "content_ids".into(),
                got: content_ids.len(),
                max: MAX_SCORE_CANDIDATES,
            }
            .into());
        }
        for id in content_ids {
            validate::check_string("content_ids[]", id)?;
        }
        Ok(self.ranker(ctx)?.scores(content_ids))
    }

    /// The changes the shard has not acknowledged, or `None` when there are none. The same
    /// delta (same `local_version`) comes back until [`Brain::acknowledge`].
    pub fn prepare_delta(&mut self) -> Result<Option<PatternDelta>> {
        if let Some(d) = self.outbox.pending() {
            return Ok(Some(d.clone()));
        }
        let Some(sel) = outbox::select(&self.local, self.cfg.share_min_success) else {
            return Ok(None);
        };
        let model = self.embedder.model_id();
        let added: Vec<Pattern> = sel
            .added_idx
            .iter()
            .map(|&i| {
                let p = self.local.get(i);
                let public =
                    self.cfg.omit_public_embeddings && self.global.is_public(&p.content_id);
                outbox::upload(p, &self.local.vector(i), public, model)
            })
            .collect();
        let version = self.outbox.next_version();
        let delta = PatternDelta {
            added,
            updated: sel.updated.clone(),
            removed: sel.removed.clone(),
            local_version: version,
            model_id: model.into(),
        };
        let wire = delta.to_wire();
        validate::check_delta("delta", &wire, model)?;
        let encoded = wire.encode_to_vec();
        let sent = sel.sent_idx();
        let ids: Vec<Uuid> = sent.iter().map(|&i| self.local.get(i).id).collect();
        self.store.write(|tx| {
            tx.put_outbox(version, &encoded)?;
            for id in &ids {
                tx.mark_sent(*id)?;
            }
            tx.clear_removed(&delta.removed)?;
            tx.set_meta(META_LOCAL_VERSION, version as i64)
        })?;
        self.local.mark_sent(&sent, &delta.removed);
        self.outbox.prepared(delta.clone());
        Ok(Some(delta))
    }

    /// The shard stored the delta `local_version`: drop it from the outbox. Acknowledging an
    /// older version again is a no-op; one never handed out is an error.
    pub fn acknowledge(&mut self, local_version: u64) -> Result<()> {
        let Some(clears) = self.outbox.plan_ack(local_version)? else {
            return Ok(());
        };
        self.store.write(|tx| {
            tx.clear_outbox(local_version)?;
            tx.set_meta(META_ACKED, local_version as i64)
        })?;
        self.outbox.acked(local_version, clears);
        Ok(())
    }

    /// Drops the delta `local_version` from the outbox without an acknowledgement: the shard
    /// refused it as invalid and would refuse every retry, which would hold back every later
    /// change. Returns how many changes it carried. Its patterns stay on the TV (they still
    /// serve recommendations) and are not offered again as new; their later changes travel
    /// as updates, which a shard ignores for ids it does not hold. Counted in
    /// [`BrainStats::quarantined_deltas`].
    pub fn quarantine_delta(&mut self, local_version: u64) -> Result<usize> {
        let changes = self.outbox.plan_quarantine(local_version)?;
        let count = self.outbox.quarantined() + 1;
        self.store.write(|tx| {
            tx.clear_outbox(local_version)?;
            tx.set_meta(META_QUARANTINED, count as i64)
        })?;
        self.outbox.quarantined_now(count);
        Ok(changes)
    }

    /// [`Brain::apply_global_at`] at the wall clock's time.
    pub fn apply_global(&mut self, global: GlobalPatterns) -> Result<()> {
        self.apply_global_at(global, now_ms())
    }

    /// Takes in what the shard sent, as of `now_ms` (unix ms; the freshness that decides
    /// which global patterns the cap keeps is measured from it): published aggregates
    /// (merged, capped) and trends (replaced). Validated whole first; a bad message changes
    /// nothing, and one older than what is held is ignored.
    pub fn apply_global_at(&mut self, global: GlobalPatterns, now_ms: i64) -> Result<()> {
        check_global(&global)?;
        let carries_vectors = !global.similar.is_empty()
            || global.trending.iter().any(|t| matches!(t.target, TrendTarget::Centroid(_)));
        if carries_vectors && global.model_id != self.embedder.model_id() {
            return Err(DeviceError::ModelMismatch {
                expected: self.embedder.model_id().into(),
                got: global.model_id,
            });
        }
        let Some(merge) =
            self.global.plan(&global, now_ms, &self.cfg.ranking, self.cfg.max_global_patterns)
        else {
            return Ok(());
        };
        let trends_blob = merge.trends.as_ref().map(|trending| {
            GlobalPatterns {
                similar: Vec::new(),
                trending: trending.clone(),
                global_version: global.global_version,
                model_id: global.model_id.clone(),
            }
            .to_wire()
            .encode_to_vec()
        });
        self.store.write(|tx| {
            for id in &merge.dropped {
                tx.delete_global(*id)?;
            }
            for (g, v) in merge.rows.iter().filter(|(g, _)| merge.written.contains(&g.id)) {
                tx.put_global(g, v)?;
            }
            if let Some(blob) = &trends_blob {
                tx.set_meta(META_TRENDS, blob)?;
            }
            tx.set_meta(META_GLOBAL_VERSION, merge.version as i64)
        })?;
        self.global.commit(merge, self.cfg.ranking.collaborative_current_round_only);
        self.refresh_collab_query();
        Ok(())
    }

    /// Counters and sizes.
    pub fn stats(&self) -> BrainStats {
        BrainStats {
            device_id: self.device_id.clone(),
            model_id: self.embedder.model_id().into(),
            patterns: self.local.len(),
            max_patterns: self.max_patterns,
            global_patterns: self.global.len(),
            global_index_hnsw: self.global.is_hnsw(),
            collaborative_vectors: self.global.collab_count(),
            trends: self.global.trends().len(),
            watched: self.watched.len(),
            catalogue_items: self.catalogue.as_ref().map_or(0, |c| c.len()),
            local_version: self.outbox.local_version(),
            acked_version: self.outbox.acked_version(),
            delta_in_flight: self.outbox.pending().is_some(),
            unsynced_changes: outbox::unsynced_changes(&self.local, self.cfg.share_min_success),
            global_version: self.global.version(),
            evictions: self.local.evictions(),
            quarantined_deltas: self.outbox.quarantined(),
            skipped_rows: self.skipped_rows,
            has_token: self.registration.is_some(),
            memory_bytes: self.local.memory_bytes()
                + self.global.memory_bytes()
                + self.watched.memory_bytes(),
            memory_budget_bytes: self.cfg.memory_budget_bytes,
        }
    }

    /// Writes everything out and closes the database.
    pub fn close(self) -> Result<()> {
        self.store.close()
    }
}

/// A new pattern's id: random (UUID version 4 bits), so that uploading it reveals no time,
/// which a version 7 id (its first 48 bits are the creation time in ms) would.
fn new_pattern_id() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// The registration held for `device_id`, and whether an unusable one (tampered, or from an
/// unknown format) was found: that one is left in the file, not used, and counted among the
/// skipped rows. Its value is never logged (it holds a token).
fn load_registration(store: &Store, device_id: &str) -> Result<(Option<DeviceRegistration>, bool)> {
    let Some(value) = store.meta::<rusqlite::types::Value>(META_REGISTRATION)? else {
        return Ok((None, false));
    };
    let parsed = match value {
        rusqlite::types::Value::Text(json) => serde_json::from_str::<DeviceRegistration>(&json)
            // The category only: serde's message may quote the value, a token.
            .map_err(|e| format!("not a registration ({:?} error)", e.classify())),
        other => Err(format!("a {:?} value, not text", other.data_type())),
    };
    match parsed {
        Ok(reg) if reg.usable_for(device_id) => Ok((Some(reg), false)),
        Ok(reg) if reg.device_id != device_id => {
            // Left behind by an id that was replaced: harmless, and not this device's.
            Ok((None, false))
        }
        Ok(_) => {
            tracing::warn!(db = store.path(), "the stored device token is unusable; ignoring it");
            Ok((None, true))
        }
        Err(why) => {
            tracing::warn!(db = store.path(), %why, "the stored registration is unusable; ignoring it");
            Ok((None, true))
        }
    }
}

fn check_model(store: &Store, model: &str) -> Result<()> {
    match store.meta::<String>(META_MODEL)? {
        Some(m) if m != model => Err(DeviceError::ModelMismatch { expected: model.into(), got: m }),
        _ => Ok(()),
    }
}

/// Validates a domain `GlobalPatterns` (it may come from JSON, with NaN and all).
fn check_global(g: &GlobalPatterns) -> Result<()> {
    for (i, s) in g.similar.iter().enumerate() {
        validate::check_f32_embedding(&format!("global.similar[{i}].embedding"), &s.embedding)?;
    }
    for (i, t) in g.trending.iter().enumerate() {
        if let TrendTarget::Centroid(v) = &t.target {
            validate::check_f32_embedding(&format!("global.trending[{i}].centroid"), v)?;
        }
    }
    validate::check_global("global", &g.to_wire())?;
    validate::check_string("global.model_id", &g.model_id)?;
    Ok(())
}

fn load_catalogue(
    path: &std::path::Path,
    embedder: &Embedder,
    store: &mut Store,
) -> Result<Catalogue> {
    let bytes = std::fs::read(path).map_err(|e| DeviceError::Asset {
        what: "catalogue",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let items: Vec<CatalogueItem> = serde_json::from_slice(&bytes)?;
    let mut fresh = Vec::new();
    let catalogue = Catalogue::build_with(items, embedder.model_id(), |text| {
        if let Some(v) = store.catalogue_embedding(text)? {
            return Ok(v.dequantize());
        }
        let v = embedder.embed_uncached(text)?;
        fresh.push((text.to_owned(), quantize(&v)));
        Ok(v)
    })?;
    store.write(|tx| {
        for (text, v) in &fresh {
            tx.put_catalogue_embedding(text, v)?;
        }
        Ok(())
    })?;
    Ok(catalogue)
}
