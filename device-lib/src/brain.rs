//! The brain of one TV: learns patterns from what is watched, recommends offline, and keeps
//! the delta for the shard.
//!
//! State lives in memory for speed (patterns as an int8 matrix, scanned in well under a
//! millisecond) and in the SQLite file for durability ([`crate::store`]): every change is
//! written in one transaction first and applied in memory only once committed, so a failed
//! write leaves both as they were.
//!
//! Sync bookkeeping: a pattern not yet sent is `added` in the next delta, one changed since is
//! `updated`, an evicted one that the shard knows is `removed`. [`Brain::prepare_delta`]
//! persists the delta it builds (the outbox) and returns that very delta, same
//! `local_version`, until [`Brain::acknowledge`]: retries are idempotent, and whatever happens
//! meanwhile waits for the next delta, so nothing is lost while the shard is away.

use crate::catalogue::{Catalogue, CatalogueItem};
use crate::embedder::{Embedder, EmbedderConfig};
use crate::error::{DeviceError, Result};
use crate::index::{IndexKind, QuantMatrix, VectorIndex};
use crate::ranking::{self, RankingParams, Recommendation, Source};
use crate::registration::DeviceRegistration;
use crate::store::{Store, StoredGlobal, StoredPattern};
use omega_protocol::validate::{self, MAX_PATTERNS_PER_DELTA, ValidationError};
use omega_protocol::vector::{QuantizedVector, quantize};
use omega_protocol::{
    ContentType, DayType, GlobalPatterns, Pattern, PatternContext, PatternDelta, PatternUpdate,
    TimeSlot, TrendSignal, TrendTarget, ViewingContext, ViewingEvent, pb,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use uuid::Uuid;

/// Score [`Brain::score`] gives a content it knows nothing about (below every real score,
/// which are `>= 0`).
pub const UNKNOWN_SCORE: f32 = -1.0;
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
/// Largest memory budget (1 TiB: far beyond a TV, still far from overflow).
const MAX_BUDGET: usize = 1 << 40;

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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PatternKey(String, TimeSlot, DayType);

/// Boosts by content id (with the trend's region), and centroid trends with their boost.
type TrendBoosts<'a> = (HashMap<&'a str, (f32, &'a str)>, Vec<(QuantizedVector, f32)>);

/// A strong local pattern, standing for the taste in the asked context.
struct Seed {
    vector: QuantizedVector,
    weight: f32,
    reason: String,
}

/// The on-device brain. `Send`; one per TV (or per simulated TV).
pub struct Brain {
    cfg: BrainConfig,
    max_patterns: usize,
    embedder: Arc<Embedder>,
    catalogue: Option<Arc<Catalogue>>,
    store: Store,
    device_id: String,
    local: Vec<StoredPattern>,
    local_vecs: QuantMatrix,
    local_by_key: HashMap<PatternKey, usize>,
    removed: Vec<Uuid>,
    outbox: Option<PatternDelta>,
    local_version: u64,
    acked_version: u64,
    watched: HashMap<String, i64>,
    globals: Vec<StoredGlobal>,
    global_index: VectorIndex,
    /// Contents whose main federated aggregate is held (its collaborative item vector), by
    /// position in `globals`.
    collab: HashMap<String, usize>,
    /// Per global: true for a collaborative vector (any round). Those are not MiniLM
    /// embeddings, so content similarity never uses them.
    collab_flags: Vec<bool>,
    /// Global version at which each aggregate was last received (this session only).
    received_in: HashMap<Uuid, u64>,
    /// The collaborative query over what was watched, kept current by
    /// [`Brain::refresh_collab_query`]; `None` without any vector of a watched content.
    collab_query: Option<QuantizedVector>,
    global_version: u64,
    trends: Vec<TrendSignal>,
    evictions: u64,
    quarantined_deltas: u64,
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

fn now_ms() -> i64 {
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
        let mut local = Vec::new();
        let mut local_vecs = QuantMatrix::new();
        let mut local_by_key = HashMap::new();
        let loaded = store.patterns()?;
        let loaded_globals = store.globals()?;
        // A row edited behind the library's back (NaN, out of range) is left in the file and
        // kept out of memory, so it can never poison a delta; counted and logged.
        let skipped_rows =
            loaded.skipped.len() + loaded_globals.skipped.len() + usize::from(bad_registration);
        for why in loaded.skipped.iter().chain(&loaded_globals.skipped) {
            tracing::warn!(db = store.path(), row = %why, "skipping an unusable database row");
        }
        for (p, v) in loaded.rows {
            local_by_key
                .insert(PatternKey(p.content_id.clone(), p.time_slot, p.day_type), local.len());
            local_vecs.push(&v);
            local.push(p);
        }
        let outbox = match store.outbox()? {
            Some((_, bytes)) => {
                let wire = pb::PatternDelta::decode(bytes.as_slice())
                    .map_err(|e| DeviceError::db(store.path(), format!("outbox: {e}")))?;
                Some(PatternDelta::from_wire(wire, &model)?)
            }
            None => None,
        };
        let (globals, global_vecs): (Vec<_>, Vec<_>) = loaded_globals.rows.into_iter().unzip();
        let mut gm = QuantMatrix::new();
        global_vecs.iter().for_each(|v| gm.push(v));
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
            local_version: version(META_LOCAL_VERSION)?,
            acked_version: version(META_ACKED)?,
            global_version: version(META_GLOBAL_VERSION)?,
            removed: store.removed()?,
            watched: store.watched()?.into_iter().collect(),
            cfg,
            embedder,
            catalogue,
            device_id,
            local,
            local_vecs,
            local_by_key,
            outbox,
            collab: collab_index(&globals, &HashMap::new(), None),
            collab_flags: globals.iter().map(StoredGlobal::is_collaborative).collect(),
            received_in: HashMap::new(),
            collab_query: None,
            globals,
            global_index: VectorIndex::build(gm, IndexKind::Auto),
            trends,
            evictions: 0,
            quarantined_deltas: version(META_QUARANTINED)?,
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
        self.global_version
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
        self.id_generated && self.registration.is_none() && self.local_version == 0
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

    /// Learns from one viewing event.
    pub fn observe(&mut self, event: &ViewingEvent) -> Result<ObserveOutcome> {
        event.validate()?;
        let ctx = event.context.unwrap_or_else(|| {
            ViewingContext::at(event.started_at_ms, self.cfg.utc_offset_minutes)
        });
        let key = PatternKey(event.content_id.clone(), ctx.time_slot, ctx.day_type);
        let window = self.cfg.ranking.success_window;
        let (pattern, vector, index, evict) = match self.local_by_key.get(&key) {
            Some(&i) => {
                let mut p = self.local[i].clone();
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
                (p, self.local_vecs.get(i), Some(i), None)
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
                    id: Uuid::now_v7(),
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
                    .then(|| self.eviction_victim(event.started_at_ms))
                    .flatten();
                (p, vector, None, evict)
            }
        };
        let forget_watched = (!self.watched.contains_key(&event.content_id)
            && self.watched.len() >= self.cfg.max_watched)
            .then(|| {
                self.watched
                    .iter()
                    .min_by_key(|(id, t)| (**t, (*id).clone()))
                    .map(|(id, _)| id.clone())
            })
            .flatten();
        let evicted = evict.map(|i| (self.local[i].id, self.local[i].synced));
        let stored_vec = vector;
        self.store.write(|tx| {
            if let Some((id, synced)) = evicted {
                tx.delete_pattern(id, synced)?;
            }
            tx.put_pattern(&pattern, &stored_vec)?;
            if let Some(old) = &forget_watched {
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
        if let Some(old) = forget_watched {
            self.watched.remove(&old);
        }
        let seen = self.watched.entry(event.content_id.clone()).or_insert(event.started_at_ms);
        *seen = (*seen).max(event.started_at_ms);
        if let Some(i) = evict {
            self.remove_local(i);
            self.evictions += 1;
        }
        match index {
            Some(i) => self.local[i] = pattern,
            None => {
                self.local_by_key.insert(key, self.local.len());
                self.local_vecs.push(&stored_vec);
                self.local.push(pattern);
            }
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

    fn eviction_victim(&self, now: i64) -> Option<usize> {
        let p = &self.cfg.ranking;
        self.local
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                let ra = ranking::retention(
                    a.success_rate,
                    ranking::freshness(now.saturating_sub(a.updated_at_ms), p),
                );
                let rb = ranking::retention(
                    b.success_rate,
                    ranking::freshness(now.saturating_sub(b.updated_at_ms), p),
                );
                ra.total_cmp(&rb).then(a.updated_at_ms.cmp(&b.updated_at_ms))
            })
            .map(|(i, _)| i)
    }

    fn remove_local(&mut self, i: usize) {
        let gone = self.local.swap_remove(i);
        self.local_vecs.swap_remove(i);
        self.local_by_key.remove(&PatternKey(gone.content_id, gone.time_slot, gone.day_type));
        if i < self.local.len() {
            let moved = &self.local[i];
            self.local_by_key
                .insert(PatternKey(moved.content_id.clone(), moved.time_slot, moved.day_type), i);
        }
        if gone.synced {
            self.removed.push(gone.id);
        }
    }

    fn resolve_context(&self, ctx: &RecommendContext) -> (i64, TimeSlot, DayType) {
        let now = ctx.now_ms.unwrap_or_else(now_ms);
        let at = ViewingContext::at(now, self.cfg.utc_offset_minutes);
        (now, ctx.time_slot.unwrap_or(at.time_slot), ctx.day_type.unwrap_or(at.day_type))
    }

    /// The strongest local patterns for the context (or the context itself when none).
    fn seeds(&self, ctx: &RecommendContext) -> Result<(Vec<Seed>, i64)> {
        let (now, slot, day) = self.resolve_context(ctx);
        let p = &self.cfg.ranking;
        // The slot/day/type part has a few hundred possible texts and genre hints are single
        // words: embedded separately, both stay in the embedder's cache, so a recommendation
        // almost never waits for the model.
        let base =
            self.embedder.embed_shared(&ranking::context_text(slot, day, ctx.content_type, &[]))?;
        let hints =
            ctx.genres.iter().map(|g| self.embedder.embed_shared(g)).collect::<Result<Vec<_>>>()?;
        let hint_refs: Vec<&[f32]> = hints.iter().map(|h| &h[..]).collect();
        let q = quantize(&ranking::compose_context(&base, &hint_refs, p.genre_hint_weight));
        let text = ranking::context_text(slot, day, ctx.content_type, &ctx.genres);
        let sims = self.local_vecs.scan(&q);
        let weights = self.local.iter().zip(&sims).enumerate().map(|(i, (pat, sim))| {
            let fresh = ranking::freshness(now.saturating_sub(pat.updated_at_ms), p);
            (i as u32, ranking::seed_weight(*sim, pat.success_rate, fresh))
        });
        let top = crate::index::top_k(weights.filter(|(_, w)| *w > 0.0), p.seeds);
        let mut seeds: Vec<Seed> = top
            .into_iter()
            .map(|(i, w)| {
                let pat = &self.local[i as usize];
                Seed {
                    vector: self.local_vecs.get(i as usize),
                    weight: w,
                    reason: format!("because you watched {}", pat.title),
                }
            })
            .collect();
        if seeds.is_empty() {
            let label = if text.is_empty() { "for now".to_string() } else { format!("for {text}") };
            seeds.push(Seed { vector: q, weight: p.cold_start_weight, reason: label });
        }
        Ok((seeds, now))
    }

    fn trend_boosts(&self) -> TrendBoosts<'_> {
        let max = self.trends.iter().map(|t| t.score).fold(0.0f32, f32::max);
        let p = &self.cfg.ranking;
        let mut by_content: HashMap<&str, (f32, &str)> = HashMap::new();
        let mut centroids = Vec::new();
        for t in &self.trends {
            let b = ranking::trend_boost(t.score, max, p);
            match &t.target {
                TrendTarget::ContentId(c) => {
                    let e = by_content.entry(c.as_str()).or_insert((0.0, t.region.as_str()));
                    e.0 = e.0.max(b);
                }
                TrendTarget::Centroid(v) => centroids.push((quantize(v), b)),
            }
        }
        (by_content, centroids)
    }

    /// Recomputes the collaborative query (`omega_protocol::collab::query`) over the watched
    /// contents, newest first, with the item vectors this TV holds. Called whenever what was
    /// watched or which vectors are held changes, so ranking never sorts the history.
    fn refresh_collab_query(&mut self) {
        self.collab_query = None;
        if self.collab.is_empty() || self.cfg.ranking.collaborative_weight <= 0.0 {
            return;
        }
        let mut order: Vec<(i64, &str)> =
            self.watched.iter().map(|(c, &t)| (t, c.as_str())).collect();
        // Newest first; equal times by content id, so the sum is the same on every run.
        order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let m = self.global_index.matrix();
        let vectors: Vec<Option<Vec<f32>>> = order
            .iter()
            .map(|(_, c)| self.collab.get(*c).map(|&gi| m.get(gi).dequantize()))
            .collect();
        self.collab_query = omega_protocol::collab::query(
            vectors.iter().map(Option::as_deref),
            &self.cfg.ranking.collaborative_query,
        )
        .map(|q| quantize(&q));
    }

    /// Up to `k` contents to watch now, best first, never one already watched.
    pub fn recommend(&self, ctx: &RecommendContext, k: usize) -> Result<Vec<Recommendation>> {
        ctx.check()?;
        let k = k.min(MAX_K);
        if k == 0 {
            return Ok(Vec::new());
        }
        let (seeds, now) = self.seeds(ctx)?;
        let p = &self.cfg.ranking;
        let n = p.neighbours_per_seed.max(k);
        // Candidates with the position of their vector, for centroid trends.
        let mut cands: Vec<(Recommendation, Option<QuantizedVector>)> = Vec::new();
        for seed in &seeds {
            if let Some(cat) = &self.catalogue {
                for (pos, sim) in cat.search(&seed.vector, n) {
                    let item = cat.item(pos as usize);
                    if self.watched.contains_key(&item.content_id) {
                        continue;
                    }
                    let score =
                        ranking::candidate_score(seed.weight, sim, 1.0, 1.0, p.catalogue_weight);
                    cands.push((
                        Recommendation {
                            content_id: item.content_id.clone(),
                            score,
                            reason: seed.reason.clone(),
                            source: Source::Catalogue,
                        },
                        None,
                    ));
                }
            }
            for (gi, sim) in self.global_index.search(&seed.vector, n) {
                let g = &self.globals[gi as usize];
                if self.collab_flags[gi as usize] || self.watched.contains_key(&g.content_id) {
                    continue;
                }
                let fresh = ranking::freshness(now.saturating_sub(g.updated_at_ms), p);
                let score = ranking::candidate_score(
                    seed.weight,
                    sim,
                    g.success_rate,
                    fresh,
                    p.global_weight,
                );
                cands.push((
                    Recommendation {
                        content_id: g.content_id.clone(),
                        score,
                        reason: "liked by viewers like you".into(),
                        source: Source::Global,
                    },
                    None,
                ));
            }
        }
        if let Some(profile) = &self.collab_query {
            let m = self.global_index.matrix();
            for (content, &gi) in &self.collab {
                if self.watched.contains_key(content) {
                    continue;
                }
                let dot = m.get(gi).dot(profile);
                cands.push((
                    Recommendation {
                        content_id: content.clone(),
                        score: ranking::collaborative_score(dot, p),
                        reason: "watched by viewers who share your taste".into(),
                        source: Source::Global,
                    },
                    None,
                ));
            }
        }
        let (by_content, centroids) = self.trend_boosts();
        // Vectors for centroid boosts, looked up only when there are centroids.
        for (rec, vec) in &mut cands {
            if !centroids.is_empty() {
                *vec = self.content_vector(&rec.content_id);
            }
        }
        let mut merged: HashMap<String, Recommendation> = HashMap::new();
        for (mut rec, vec) in cands {
            if let Some(v) = vec {
                rec.score += centroids.iter().map(|(c, b)| b * c.dot(&v).max(0.0)).sum::<f32>();
            }
            match merged.get(&rec.content_id) {
                Some(b) if b.score >= rec.score => {}
                _ => {
                    merged.insert(rec.content_id.clone(), rec);
                }
            }
        }
        for (content, (boost, region)) in by_content {
            if self.watched.contains_key(content) {
                continue;
            }
            match merged.get_mut(content) {
                Some(rec) => rec.score += boost,
                None => {
                    let reason = if region.is_empty() {
                        "trending".to_string()
                    } else {
                        format!("trending in {region}")
                    };
                    merged.insert(
                        content.to_owned(),
                        Recommendation {
                            content_id: content.to_owned(),
                            score: boost,
                            reason,
                            source: Source::Trending,
                        },
                    );
                }
            }
        }
        Ok(ranking::merge(merged.into_values(), |id| self.watched.contains_key(id), k))
    }

    /// The vector that stands for a content: catalogue item, else best global pattern, else a
    /// local pattern.
    fn content_vector(&self, content_id: &str) -> Option<QuantizedVector> {
        if let Some(cat) = &self.catalogue
            && let Some(pos) = cat.position(content_id)
        {
            return Some(cat.embedding(pos));
        }
        self.globals
            .iter()
            .zip(&self.collab_flags)
            .position(|(g, &collab)| !collab && g.content_id == content_id)
            .map(|i| self.global_index.matrix().get(i))
            .or_else(|| {
                self.local
                    .iter()
                    .position(|p| p.content_id == content_id)
                    .map(|i| self.local_vecs.get(i))
            })
    }

    /// One score per candidate content, in order, on the same scale as
    /// [`Brain::recommend`] (for evaluation harnesses that rank held-out items). Watched
    /// contents are scored like any other; a content known neither to the catalogue, the
    /// global patterns, the trends nor the local patterns gets [`UNKNOWN_SCORE`].
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
        let (seeds, now) = self.seeds(ctx)?;
        let p = &self.cfg.ranking;
        let (by_content, centroids) = self.trend_boosts();
        let mut global_by_content: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, g) in self.globals.iter().enumerate().filter(|(i, _)| !self.collab_flags[*i]) {
            global_by_content.entry(g.content_id.as_str()).or_default().push(i);
        }
        let best_over_seeds = |v: &QuantizedVector, success: f32, fresh: f32, w: f32| {
            seeds
                .iter()
                .map(|s| ranking::candidate_score(s.weight, s.vector.dot(v), success, fresh, w))
                .fold(0.0f32, f32::max)
        };
        let mut out = Vec::with_capacity(content_ids.len());
        for id in content_ids {
            validate::check_string("content_ids[]", id)?;
            let mut known = false;
            let mut score = 0.0f32;
            let mut vector = None;
            if let Some(q) = &self.collab_query
                && let Some(&gi) = self.collab.get(id.as_str())
            {
                let v = self.global_index.matrix().get(gi);
                score = ranking::collaborative_score(v.dot(q), p);
                vector = Some(v);
                known = true;
            } else if let Some(cat) = &self.catalogue
                && let Some(pos) = cat.position(id)
            {
                let v = cat.embedding(pos);
                score = score.max(best_over_seeds(&v, 1.0, 1.0, p.catalogue_weight));
                vector = Some(v);
                known = true;
            }
            for &gi in global_by_content.get(id.as_str()).map(Vec::as_slice).unwrap_or(&[]) {
                let g = &self.globals[gi];
                let v = self.global_index.matrix().get(gi);
                let fresh = ranking::freshness(now.saturating_sub(g.updated_at_ms), p);
                score = score.max(best_over_seeds(&v, g.success_rate, fresh, p.global_weight));
                vector.get_or_insert(v);
                known = true;
            }
            if !known && let Some(i) = self.local.iter().position(|l| &l.content_id == id) {
                let v = self.local_vecs.get(i);
                score = best_over_seeds(&v, 1.0, 1.0, p.catalogue_weight);
                vector = Some(v);
                known = true;
            }
            if let Some(v) = &vector {
                score += centroids.iter().map(|(c, b)| b * c.dot(v).max(0.0)).sum::<f32>();
            }
            if let Some((boost, _)) = by_content.get(id.as_str()) {
                score += boost;
                known = true;
            }
            out.push(if known { score } else { UNKNOWN_SCORE });
        }
        Ok(out)
    }

    /// The changes the shard has not acknowledged, or `None` when there are none. The same
    /// delta (same `local_version`) comes back until [`Brain::acknowledge`].
    pub fn prepare_delta(&mut self) -> Result<Option<PatternDelta>> {
        if let Some(d) = &self.outbox {
            return Ok(Some(d.clone()));
        }
        let mut budget = MAX_PATTERNS_PER_DELTA;
        let removed: Vec<Uuid> = self.removed.iter().take(budget).copied().collect();
        budget -= removed.len();
        let mut updated = Vec::new();
        let mut added_idx = Vec::new();
        let mut updated_idx = Vec::new();
        for (i, p) in self.local.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if p.synced && (p.dirty || p.pending_samples > 0) {
                updated.push(PatternUpdate {
                    id: p.id,
                    success_rate: p.success_rate,
                    extra_samples: p.pending_samples,
                });
                updated_idx.push(i);
                budget -= 1;
            }
        }
        for (i, p) in self.local.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if !p.synced && p.success_rate >= self.cfg.share_min_success {
                added_idx.push(i);
                budget -= 1;
            }
        }
        if removed.is_empty() && updated.is_empty() && added_idx.is_empty() {
            return Ok(None);
        }
        let added: Vec<Pattern> = added_idx.iter().map(|&i| self.to_pattern(i)).collect();
        let version = self.local_version + 1;
        let delta = PatternDelta {
            added,
            updated,
            removed,
            local_version: version,
            model_id: self.embedder.model_id().into(),
        };
        let wire = delta.to_wire();
        validate::check_delta("delta", &wire, self.embedder.model_id())?;
        let encoded = wire.encode_to_vec();
        let ids: Vec<Uuid> =
            added_idx.iter().chain(&updated_idx).map(|&i| self.local[i].id).collect();
        self.store.write(|tx| {
            tx.put_outbox(version, &encoded)?;
            for id in &ids {
                tx.mark_sent(*id)?;
            }
            tx.clear_removed(&delta.removed)?;
            tx.set_meta(META_LOCAL_VERSION, version as i64)
        })?;
        for &i in added_idx.iter().chain(&updated_idx) {
            let p = &mut self.local[i];
            p.synced = true;
            p.pending_samples = 0;
            p.dirty = false;
        }
        self.removed.retain(|id| !delta.removed.contains(id));
        self.local_version = version;
        self.outbox = Some(delta.clone());
        Ok(Some(delta))
    }

    fn to_pattern(&self, i: usize) -> Pattern {
        let p = &self.local[i];
        Pattern {
            id: p.id,
            content_id: p.content_id.clone(),
            embedding: self.local_vecs.get(i).dequantize(),
            model_id: self.embedder.model_id().into(),
            success_rate: p.success_rate,
            sample_count: p.sample_count.max(1),
            context: PatternContext {
                time_slot: p.time_slot,
                day_type: p.day_type,
                content_type: p.content_type,
                genres: p.genres.clone(),
            },
            created_at_ms: p.created_at_ms,
            updated_at_ms: p.updated_at_ms,
        }
    }

    /// The shard stored the delta `local_version`: drop it from the outbox. Acknowledging an
    /// older version again is a no-op; one never handed out is an error.
    pub fn acknowledge(&mut self, local_version: u64) -> Result<()> {
        if local_version > self.local_version {
            return Err(DeviceError::State(format!(
                "acknowledged version {local_version} was never prepared (latest is {})",
                self.local_version
            )));
        }
        let clears = self.outbox.as_ref().is_some_and(|d| d.local_version <= local_version);
        if !clears && local_version <= self.acked_version {
            return Ok(());
        }
        self.store.write(|tx| {
            tx.clear_outbox(local_version)?;
            tx.set_meta(META_ACKED, local_version as i64)
        })?;
        if clears {
            self.outbox = None;
        }
        self.acked_version = self.acked_version.max(local_version);
        Ok(())
    }

    /// Drops the delta `local_version` from the outbox without an acknowledgement: the shard
    /// refused it as invalid and would refuse every retry, which would hold back every later
    /// change. Returns how many changes it carried. Its patterns stay on the TV (they still
    /// serve recommendations) and are not offered again as new; their later changes travel
    /// as updates, which a shard ignores for ids it does not hold. Counted in
    /// [`BrainStats::quarantined_deltas`].
    pub fn quarantine_delta(&mut self, local_version: u64) -> Result<usize> {
        let changes = match &self.outbox {
            Some(d) if d.local_version == local_version => {
                d.added.len() + d.updated.len() + d.removed.len()
            }
            _ => {
                return Err(DeviceError::State(format!(
                    "delta {local_version} is not the one awaiting acknowledgement"
                )));
            }
        };
        let count = self.quarantined_deltas + 1;
        self.store.write(|tx| {
            tx.clear_outbox(local_version)?;
            tx.set_meta(META_QUARANTINED, count as i64)
        })?;
        self.outbox = None;
        self.quarantined_deltas = count;
        Ok(changes)
    }

    /// Takes in what the shard sent: similar patterns of other devices (merged, capped) and
    /// trends (replaced). Validated whole first; a bad message changes nothing.
    pub fn apply_global(&mut self, global: GlobalPatterns) -> Result<()> {
        check_global(&global)?;
        let carries_vectors = !global.similar.is_empty()
            || global.trending.iter().any(|t| matches!(t.target, TrendTarget::Centroid(_)));
        if carries_vectors && global.model_id != self.embedder.model_id() {
            return Err(DeviceError::ModelMismatch {
                expected: self.embedder.model_id().into(),
                got: global.model_id,
            });
        }
        if global.global_version < self.global_version {
            return Ok(()); // out of order: what we hold is newer
        }
        let now = now_ms();
        let p = &self.cfg.ranking;
        let mut merged: HashMap<Uuid, (StoredGlobal, QuantizedVector)> = self
            .globals
            .iter()
            .enumerate()
            .map(|(i, g)| (g.id, (g.clone(), self.global_index.matrix().get(i))))
            .collect();
        let mut written = Vec::new();
        for s in &global.similar {
            let g = StoredGlobal {
                id: s.id,
                content_id: s.content_id.clone(),
                success_rate: s.success_rate,
                sample_count: s.sample_count,
                time_slot: s.context.time_slot,
                day_type: s.context.day_type,
                content_type: s.context.content_type,
                genres: s.context.genres.clone(),
                updated_at_ms: s.updated_at_ms,
            };
            let v = quantize(&s.embedding);
            written.push(s.id);
            merged.insert(s.id, (g, v));
        }
        let mut all: Vec<(StoredGlobal, QuantizedVector)> = merged.into_values().collect();
        all.sort_by(|a, b| {
            let ra = ranking::retention(
                a.0.success_rate,
                ranking::freshness(now.saturating_sub(a.0.updated_at_ms), p),
            );
            let rb = ranking::retention(
                b.0.success_rate,
                ranking::freshness(now.saturating_sub(b.0.updated_at_ms), p),
            );
            rb.total_cmp(&ra).then(a.0.id.cmp(&b.0.id))
        });
        let dropped: Vec<Uuid> =
            all.iter().skip(self.cfg.max_global_patterns).map(|(g, _)| g.id).collect();
        all.truncate(self.cfg.max_global_patterns);
        let replace_trends =
            global.global_version > self.global_version || !global.trending.is_empty();
        let trends_blob = GlobalPatterns {
            similar: Vec::new(),
            trending: global.trending.clone(),
            global_version: global.global_version,
            model_id: global.model_id.clone(),
        }
        .to_wire()
        .encode_to_vec();
        self.store.write(|tx| {
            for id in &dropped {
                tx.delete_global(*id)?;
            }
            for (g, v) in all.iter().filter(|(g, _)| written.contains(&g.id)) {
                tx.put_global(g, v)?;
            }
            if replace_trends {
                tx.set_meta(META_TRENDS, &trends_blob)?;
            }
            tx.set_meta(META_GLOBAL_VERSION, global.global_version as i64)
        })?;
        let mut matrix = QuantMatrix::new();
        all.iter().for_each(|(_, v)| matrix.push(v));
        self.globals = all.into_iter().map(|(g, _)| g).collect();
        self.collab_flags = self.globals.iter().map(StoredGlobal::is_collaborative).collect();
        self.global_index = VectorIndex::build(matrix, IndexKind::Auto);
        for s in &global.similar {
            self.received_in.insert(s.id, global.global_version);
        }
        for id in &dropped {
            self.received_in.remove(id);
        }
        let current =
            self.cfg.ranking.collaborative_current_round_only.then_some(global.global_version);
        self.collab = collab_index(&self.globals, &self.received_in, current);
        self.refresh_collab_query();
        if replace_trends {
            self.trends = global.trending;
        }
        self.global_version = global.global_version;
        Ok(())
    }

    /// Counters and sizes.
    pub fn stats(&self) -> BrainStats {
        let unsynced = self.removed.len()
            + self
                .local
                .iter()
                .filter(|p| {
                    (p.synced && (p.dirty || p.pending_samples > 0))
                        || (!p.synced && p.success_rate >= self.cfg.share_min_success)
                })
                .count();
        BrainStats {
            device_id: self.device_id.clone(),
            model_id: self.embedder.model_id().into(),
            patterns: self.local.len(),
            max_patterns: self.max_patterns,
            global_patterns: self.globals.len(),
            global_index_hnsw: self.global_index.is_hnsw(),
            collaborative_vectors: self.collab.len(),
            trends: self.trends.len(),
            watched: self.watched.len(),
            catalogue_items: self.catalogue.as_ref().map_or(0, |c| c.len()),
            local_version: self.local_version,
            acked_version: self.acked_version,
            delta_in_flight: self.outbox.is_some(),
            unsynced_changes: unsynced,
            global_version: self.global_version,
            evictions: self.evictions,
            quarantined_deltas: self.quarantined_deltas,
            skipped_rows: self.skipped_rows,
            has_token: self.registration.is_some(),
            memory_bytes: self.memory_bytes(),
            memory_budget_bytes: self.cfg.memory_budget_bytes,
        }
    }

    fn memory_bytes(&self) -> usize {
        let strings: usize = self
            .local
            .iter()
            .map(|p| {
                p.content_id.len()
                    + p.title.len()
                    + p.genres.iter().map(|g| g.len() + 24).sum::<usize>()
            })
            .sum();
        self.local.capacity() * std::mem::size_of::<StoredPattern>()
            + strings
            + self.local_vecs.heap_bytes()
            + self.local_by_key.capacity() * (std::mem::size_of::<PatternKey>() + 8)
            + self.globals.capacity() * std::mem::size_of::<StoredGlobal>()
            + self.global_index.heap_bytes()
            + self.watched.keys().map(|k| k.len() + 48).sum::<usize>()
    }

    /// Writes everything out and closes the database.
    pub fn close(self) -> Result<()> {
        self.store.close()
    }
}

/// Positions of the globals that are a content's collaborative vector; with `current`, only
/// those received at that global version (or loaded from the database: unknown).
fn collab_index(
    globals: &[StoredGlobal],
    received_in: &HashMap<Uuid, u64>,
    current: Option<u64>,
) -> HashMap<String, usize> {
    globals
        .iter()
        .enumerate()
        .filter(|(_, g)| {
            g.is_collaborative()
                && current.is_none_or(|v| received_in.get(&g.id).is_none_or(|&r| r == v))
        })
        .map(|(i, g)| (g.content_id.clone(), i))
        .collect()
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
