//! The domain vocabulary of DESIGN.md and its conversions to and from the wire.
//!
//! Domain types hold f32 embeddings and typed ids; wire types ([`crate::pb`]) hold int8
//! embeddings and bytes. Encoding quantises; decoding validates first ([`crate::validate`])
//! and only then builds the domain value, so a value of these types is always within the
//! contract's limits. The same types serialise to JSON (serde) for the C SDK.
//!
//! JSON policy: every struct here refuses unknown fields, like the device's configuration
//! types. The JSON documents are an in-process API (the C SDK and the library ship together),
//! not a wire format between versions (protobuf is that, and it does skip unknown fields): a
//! misspelt `"genre"` must be an error, not a silently ignored hint.

use crate::pb;
use crate::validate::{self, ValidationError};
use crate::vector::{self, QuantizedVector};
use chrono::{DateTime, Datelike, Timelike, Utc, Weekday};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Part of the day, in the TV's local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSlot {
    /// Not known.
    #[default]
    Unspecified,
    /// 05:00-11:59.
    Morning,
    /// 12:00-16:59.
    Afternoon,
    /// 17:00-21:59.
    Evening,
    /// 22:00-04:59.
    Night,
}

impl TimeSlot {
    /// The slot an hour of the day (0-23) falls in.
    pub fn from_hour(hour: u32) -> Self {
        match hour {
            5..=11 => TimeSlot::Morning,
            12..=16 => TimeSlot::Afternoon,
            17..=21 => TimeSlot::Evening,
            _ => TimeSlot::Night,
        }
    }

    /// A lowercase word, as used in embedding texts.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeSlot::Unspecified => "",
            TimeSlot::Morning => "morning",
            TimeSlot::Afternoon => "afternoon",
            TimeSlot::Evening => "evening",
            TimeSlot::Night => "night",
        }
    }
}

/// Weekday or weekend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DayType {
    /// Not known.
    #[default]
    Unspecified,
    /// Monday to Friday.
    Weekday,
    /// Saturday and Sunday.
    Weekend,
}

impl DayType {
    /// A lowercase word, as used in embedding texts.
    pub fn as_str(self) -> &'static str {
        match self {
            DayType::Unspecified => "",
            DayType::Weekday => "weekday",
            DayType::Weekend => "weekend",
        }
    }
}

/// Kind of content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentType {
    /// Not known.
    #[default]
    Unspecified,
    /// A film.
    Movie,
    /// A series or one of its episodes.
    Series,
    /// A documentary.
    Documentary,
    /// Sports.
    Sports,
    /// News.
    News,
    /// Children's programming.
    Kids,
    /// Music.
    Music,
    /// Live broadcast.
    Live,
    /// Anything else.
    Other,
}

impl ContentType {
    /// A lowercase word, as used in embedding texts.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Unspecified => "",
            ContentType::Movie => "movie",
            ContentType::Series => "series",
            ContentType::Documentary => "documentary",
            ContentType::Sports => "sports",
            ContentType::News => "news",
            ContentType::Kids => "kids",
            ContentType::Music => "music",
            ContentType::Live => "live",
            ContentType::Other => "other",
        }
    }
}

macro_rules! wire_enum {
    ($domain:ident, $wire:ident, $($v:ident),+) => {
        impl From<$domain> for pb::$wire {
            fn from(v: $domain) -> Self {
                match v { $($domain::$v => pb::$wire::$v),+ }
            }
        }
        impl From<pb::$wire> for $domain {
            fn from(v: pb::$wire) -> Self {
                match v { $(pb::$wire::$v => $domain::$v),+ }
            }
        }
        impl $domain {
            /// Decodes the wire integer; unknown values are an error.
            pub fn from_wire(field: &str, v: i32) -> Result<Self, ValidationError> {
                pb::$wire::try_from(v)
                    .map(Into::into)
                    .map_err(|_| ValidationError::UnknownEnum { field: field.into(), value: v })
            }
        }
    };
}
wire_enum!(TimeSlot, TimeSlot, Unspecified, Morning, Afternoon, Evening, Night);
wire_enum!(DayType, DayType, Unspecified, Weekday, Weekend);
wire_enum!(
    ContentType,
    ContentType,
    Unspecified,
    Movie,
    Series,
    Documentary,
    Sports,
    News,
    Kids,
    Music,
    Live,
    Other
);

/// When something was watched: the part of the day and the kind of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewingContext {
    /// Part of the day.
    #[serde(default)]
    pub time_slot: TimeSlot,
    /// Weekday or weekend.
    #[serde(default)]
    pub day_type: DayType,
}

impl ViewingContext {
    /// The context of a moment, given the TV's offset from UTC in minutes.
    pub fn at(unix_ms: i64, utc_offset_minutes: i32) -> Self {
        let local = unix_ms.saturating_add(i64::from(utc_offset_minutes) * 60_000);
        let t = DateTime::<Utc>::from_timestamp_millis(local).unwrap_or_default();
        let day_type = match t.weekday() {
            Weekday::Sat | Weekday::Sun => DayType::Weekend,
            _ => DayType::Weekday,
        };
        ViewingContext { time_slot: TimeSlot::from_hour(t.hour()), day_type }
    }
}

/// One thing watched on the TV. Never leaves the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewingEvent {
    /// Catalogue id of the content.
    pub content_id: String,
    /// Human-readable title (used to embed the content).
    #[serde(default)]
    pub title: String,
    /// Genre words, at most 16.
    #[serde(default)]
    pub genres: Vec<String>,
    /// Kind of content.
    #[serde(default)]
    pub content_type: ContentType,
    /// When watching started, unix epoch milliseconds.
    pub started_at_ms: i64,
    /// Fraction of the content watched, `[0, 1]`.
    pub watch_fraction: f32,
    /// When it was watched; derived from `started_at_ms` when absent.
    #[serde(default)]
    pub context: Option<ViewingContext>,
}

impl ViewingEvent {
    /// Checks every field against the contract's limits.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::check_required_string("content_id", &self.content_id)?;
        validate::check_string("title", &self.title)?;
        validate::check_genres("genres", &self.genres)?;
        validate::check_rate("watch_fraction", self.watch_fraction)?;
        // The same bound as a pattern's timestamps: an event becomes a pattern that a shard
        // must accept.
        validate::check_timestamp("started_at_ms", self.started_at_ms)
    }
}

/// The context a pattern was learned in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternContext {
    /// Part of the day.
    #[serde(default)]
    pub time_slot: TimeSlot,
    /// Weekday or weekend.
    #[serde(default)]
    pub day_type: DayType,
    /// Kind of content.
    #[serde(default)]
    pub content_type: ContentType,
    /// Genre hints.
    #[serde(default)]
    pub genres: Vec<String>,
}

impl PatternContext {
    /// Encodes for the wire.
    pub fn to_wire(&self) -> pb::PatternContext {
        pb::PatternContext {
            time_slot: pb::TimeSlot::from(self.time_slot) as i32,
            day_type: pb::DayType::from(self.day_type) as i32,
            content_type: pb::ContentType::from(self.content_type) as i32,
            genres: self.genres.clone(),
        }
    }

    /// Decodes and validates.
    pub fn from_wire(field: &str, c: Option<pb::PatternContext>) -> Result<Self, ValidationError> {
        let Some(c) = c else { return Ok(PatternContext::default()) };
        validate::check_genres(&format!("{field}.genres"), &c.genres)?;
        Ok(PatternContext {
            time_slot: TimeSlot::from_wire(&format!("{field}.time_slot"), c.time_slot)?,
            day_type: DayType::from_wire(&format!("{field}.day_type"), c.day_type)?,
            content_type: ContentType::from_wire(&format!("{field}.content_type"), c.content_type)?,
            genres: c.genres,
        })
    }
}

/// Milliseconds in a day.
pub const MS_PER_DAY: i64 = 86_400_000;

/// The start (00:00 UTC) of the UTC day of `ms`, unix ms: how coarse a time a TV uploads.
pub fn utc_day_start(ms: i64) -> i64 {
    ms - ms.rem_euclid(MS_PER_DAY)
}

/// Quantises an f32 embedding for the wire.
pub fn embedding_to_wire(v: &[f32]) -> pb::Embedding {
    let q = vector::quantize(v);
    pb::Embedding { values: q.to_bytes(), scale: q.scale }
}

/// Validates and dequantises a wire embedding.
pub fn embedding_from_wire(
    field: &str,
    e: Option<&pb::Embedding>,
) -> Result<Vec<f32>, ValidationError> {
    validate::check_embedding(field, e)?;
    let e = e.ok_or_else(|| ValidationError::Missing { field: field.into() })?;
    Ok(QuantizedVector::from_bytes(&e.values, e.scale).dequantize())
}

fn uuid_from_wire(field: &str, b: &[u8]) -> Result<Uuid, ValidationError> {
    Uuid::from_slice(b).map_err(|_| ValidationError::BadId { field: field.into(), got: b.len() })
}

/// A learned pattern: what worked, in which context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pattern {
    /// UUID v7.
    pub id: Uuid,
    /// Catalogue id of the content the pattern is about.
    pub content_id: String,
    /// L2-normalised embedding (384 f32) of the context + content text. Empty only in an
    /// uploaded pattern (`PatternDelta.added`) whose content's collaborative vector is public:
    /// the TV leaves the embedding of its title text out (see
    /// [`validate::check_uploaded_pattern`]).
    pub embedding: Vec<f32>,
    /// The model that produced `embedding`.
    pub model_id: String,
    /// How well this worked, `[0, 1]`, smoothed over samples.
    pub success_rate: f32,
    /// Observations behind `success_rate`.
    pub sample_count: u32,
    /// Context it was learned in.
    pub context: PatternContext,
    /// Unix epoch milliseconds.
    pub created_at_ms: i64,
    /// Unix epoch milliseconds.
    pub updated_at_ms: i64,
}

impl Pattern {
    /// Encodes for the wire (quantises the embedding; the model id travels on the envelope).
    pub fn to_wire(&self) -> pb::Pattern {
        pb::Pattern {
            id: self.id.as_bytes().to_vec(),
            content_id: self.content_id.clone(),
            embedding: (!self.embedding.is_empty()).then(|| embedding_to_wire(&self.embedding)),
            success_rate: self.success_rate,
            sample_count: self.sample_count,
            context: Some(self.context.to_wire()),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        }
    }

    /// Validates and decodes a wire pattern whose envelope carried `model_id`; it must carry
    /// its embedding.
    pub fn from_wire(field: &str, p: pb::Pattern, model_id: &str) -> Result<Self, ValidationError> {
        validate::check_pattern(field, &p)?;
        Self::decode(field, p, model_id)
    }

    /// Validates and decodes a pattern a device uploaded: its embedding may be absent (then
    /// `embedding` is empty), see [`validate::check_uploaded_pattern`].
    pub fn from_uploaded_wire(
        field: &str,
        p: pb::Pattern,
        model_id: &str,
    ) -> Result<Self, ValidationError> {
        validate::check_uploaded_pattern(field, &p)?;
        Self::decode(field, p, model_id)
    }

    fn decode(field: &str, p: pb::Pattern, model_id: &str) -> Result<Self, ValidationError> {
        let embedding = match &p.embedding {
            Some(e) => embedding_from_wire(&format!("{field}.embedding"), Some(e))?,
            None => Vec::new(),
        };
        Ok(Pattern {
            id: uuid_from_wire(&format!("{field}.id"), &p.id)?,
            embedding,
            context: PatternContext::from_wire(&format!("{field}.context"), p.context)?,
            content_id: p.content_id,
            model_id: model_id.into(),
            success_rate: p.success_rate,
            sample_count: p.sample_count,
            created_at_ms: p.created_at_ms,
            updated_at_ms: p.updated_at_ms,
        })
    }
}

/// A change to a pattern the server already has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternUpdate {
    /// Pattern id.
    pub id: Uuid,
    /// New success rate.
    pub success_rate: f32,
    /// Observations added since the last sync.
    pub extra_samples: u32,
}

/// What a device pushes at a sync.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternDelta {
    /// New patterns.
    pub added: Vec<Pattern>,
    /// Changed patterns.
    pub updated: Vec<PatternUpdate>,
    /// Forgotten patterns.
    pub removed: Vec<Uuid>,
    /// Strictly increasing per device; a sync is idempotent on `(device_id, local_version)`.
    pub local_version: u64,
    /// Model of every embedding in the delta.
    pub model_id: String,
}

impl PatternDelta {
    /// True when there is nothing to push.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }

    /// Encodes for the wire.
    pub fn to_wire(&self) -> pb::PatternDelta {
        pb::PatternDelta {
            added: self.added.iter().map(Pattern::to_wire).collect(),
            updated: self
                .updated
                .iter()
                .map(|u| pb::PatternUpdate {
                    id: u.id.as_bytes().to_vec(),
                    success_rate: u.success_rate,
                    extra_samples: u.extra_samples,
                })
                .collect(),
            removed: self.removed.iter().map(|id| id.as_bytes().to_vec()).collect(),
            local_version: self.local_version,
            model_id: self.model_id.clone(),
        }
    }

    /// Validates the whole delta against the receiver's model, then decodes it.
    pub fn from_wire(d: pb::PatternDelta, expected_model: &str) -> Result<Self, ValidationError> {
        validate::check_delta("delta", &d, expected_model)?;
        let model = d.model_id.clone();
        let added = d
            .added
            .into_iter()
            .enumerate()
            .map(|(i, p)| Pattern::from_uploaded_wire(&format!("delta.added[{i}]"), p, &model))
            .collect::<Result<_, _>>()?;
        let updated = d
            .updated
            .into_iter()
            .enumerate()
            .map(|(i, u)| {
                Ok(PatternUpdate {
                    id: uuid_from_wire(&format!("delta.updated[{i}].id"), &u.id)?,
                    success_rate: u.success_rate,
                    extra_samples: u.extra_samples,
                })
            })
            .collect::<Result<_, ValidationError>>()?;
        let removed = d
            .removed
            .iter()
            .enumerate()
            .map(|(i, id)| uuid_from_wire(&format!("delta.removed[{i}]"), id))
            .collect::<Result<_, _>>()?;
        Ok(PatternDelta {
            added,
            updated,
            removed,
            local_version: d.local_version,
            model_id: model,
        })
    }
}

/// What a trend signal points at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrendTarget {
    /// A specific content that is rising.
    ContentId(String),
    /// A rising region of embedding space (unit vector).
    Centroid(Vec<f32>),
}

/// Something rising in a region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrendSignal {
    /// What is rising.
    pub target: TrendTarget,
    /// Decayed popularity score, >= 0.
    pub score: f32,
    /// Region it was detected in.
    pub region: String,
}

impl TrendSignal {
    /// Encodes for the wire.
    pub fn to_wire(&self) -> pb::TrendSignal {
        let target = match &self.target {
            TrendTarget::ContentId(c) => pb::trend_signal::Target::ContentId(c.clone()),
            TrendTarget::Centroid(v) => pb::trend_signal::Target::Centroid(embedding_to_wire(v)),
        };
        pb::TrendSignal { target: Some(target), score: self.score, region: self.region.clone() }
    }

    /// Validates and decodes.
    pub fn from_wire(field: &str, t: pb::TrendSignal) -> Result<Self, ValidationError> {
        validate::check_trend(field, &t)?;
        let target = match t.target {
            Some(pb::trend_signal::Target::ContentId(c)) => TrendTarget::ContentId(c),
            Some(pb::trend_signal::Target::Centroid(e)) => {
                TrendTarget::Centroid(embedding_from_wire(&format!("{field}.centroid"), Some(&e))?)
            }
            None => return Err(ValidationError::Missing { field: format!("{field}.target") }),
        };
        Ok(TrendSignal { target, score: t.score, region: t.region })
    }
}

/// What a device pulls at a sync.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalPatterns {
    /// Patterns of other devices (or federated aggregates) near this device's interests.
    pub similar: Vec<Pattern>,
    /// Rising content and regions of the embedding space.
    pub trending: Vec<TrendSignal>,
    /// Version of the shard's global state these came from.
    pub global_version: u64,
    /// Model of every embedding here.
    pub model_id: String,
}

impl GlobalPatterns {
    /// Encodes for the wire.
    pub fn to_wire(&self) -> pb::GlobalPatterns {
        pb::GlobalPatterns {
            similar: self.similar.iter().map(Pattern::to_wire).collect(),
            trending: self.trending.iter().map(TrendSignal::to_wire).collect(),
            global_version: self.global_version,
            model_id: self.model_id.clone(),
        }
    }

    /// Validates and decodes.
    pub fn from_wire(g: pb::GlobalPatterns) -> Result<Self, ValidationError> {
        validate::check_global("global", &g)?;
        let model = g.model_id.clone();
        Ok(GlobalPatterns {
            similar: g
                .similar
                .into_iter()
                .enumerate()
                .map(|(i, p)| Pattern::from_wire(&format!("global.similar[{i}]"), p, &model))
                .collect::<Result<_, _>>()?,
            trending: g
                .trending
                .into_iter()
                .enumerate()
                .map(|(i, t)| TrendSignal::from_wire(&format!("global.trending[{i}]"), t))
                .collect::<Result<_, _>>()?,
            global_version: g.global_version,
            model_id: model,
        })
    }
}

/// Id of a federated aggregate: deterministic, so a content's main group keeps the same id
/// round after round (a TV replaces it rather than piling up copies); further groups of the
/// content add their leader's int8 embedding to the key. Aggregate ids are UUID version 8
/// (custom, SHA-256 based); device pattern ids are v7 and a shard re-keys other devices'
/// patterns to v4, so [`is_aggregate_id`] tells them apart.
///
/// The content id is length-prefixed: without the prefix, content `"a"` with a leader and a
/// content id that spells `"a\0"` followed by the leader's bytes would hash alike.
pub fn aggregate_id(content_id: &str, leader: Option<&[i8]>) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"omega/aggregate/v2\0");
    h.update((content_id.len() as u64).to_le_bytes());
    h.update(content_id.as_bytes());
    if let Some(l) = leader {
        h.update([0u8]);
        h.update(l.iter().map(|&x| x.to_ne_bytes()[0]).collect::<Vec<u8>>());
    }
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(b).into_uuid()
}

/// The id of `content_id`'s main aggregate (its main group's audience profile, a MiniLM
/// embedding).
pub fn content_aggregate_id(content_id: &str) -> Uuid {
    aggregate_id(content_id, None)
}

/// The id of `content_id`'s collaborative item vector: an aggregate of its own, next to the
/// content's main aggregate, because its embedding is not a MiniLM embedding — the round's
/// item model's coordinates sit in the first dimensions and the rest are zero (so it
/// compresses to a fraction of a MiniLM vector on the wire), see `docs/quality.md`.
/// Consumers must keep these out of MiniLM similarity search and must not re-normalise them.
pub fn collaborative_vector_id(content_id: &str) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"omega/collaborative/v1\0");
    h.update((content_id.len() as u64).to_le_bytes());
    h.update(content_id.as_bytes());
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(b).into_uuid()
}

/// True when `id` is `content_id`'s collaborative item vector.
pub fn is_collaborative_vector(id: &Uuid, content_id: &str) -> bool {
    !content_id.is_empty() && *id == collaborative_vector_id(content_id)
}

/// True for ids made by [`aggregate_id`] or [`collaborative_vector_id`] (UUID version 8).
pub fn is_aggregate_id(id: &Uuid) -> bool {
    id.get_version_num() == 8
}

/// A federated average over patterns from at least k distinct devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatedPattern {
    /// Deterministic per group, so reruns of a round publish the same ids.
    pub id: Uuid,
    /// The content, when the whole group is about one content.
    pub content_id: Option<String>,
    /// Weighted mean embedding, re-normalised.
    pub embedding: Vec<f32>,
    /// Weighted success rate, `[0, 1]`.
    pub quality: f32,
    /// Distinct devices behind it.
    pub source_devices: u32,
    /// Observations behind it.
    pub total_samples: u64,
    /// Dominant context of the group.
    pub context: PatternContext,
    /// Region, empty when global.
    pub region: String,
}

impl AggregatedPattern {
    /// Encodes for the wire.
    pub fn to_wire(&self) -> pb::AggregatedPattern {
        pb::AggregatedPattern {
            id: self.id.as_bytes().to_vec(),
            content_id: self.content_id.clone().unwrap_or_default(),
            embedding: Some(embedding_to_wire(&self.embedding)),
            quality: self.quality,
            source_devices: self.source_devices,
            total_samples: self.total_samples,
            context: Some(self.context.to_wire()),
            region: self.region.clone(),
        }
    }

    /// Validates (including `source_devices >= min_sources`) and decodes.
    pub fn from_wire(
        field: &str,
        a: pb::AggregatedPattern,
        min_sources: u32,
    ) -> Result<Self, ValidationError> {
        validate::check_aggregated(field, &a, min_sources)?;
        Ok(AggregatedPattern {
            id: uuid_from_wire(&format!("{field}.id"), &a.id)?,
            content_id: (!a.content_id.is_empty()).then_some(a.content_id),
            embedding: embedding_from_wire(&format!("{field}.embedding"), a.embedding.as_ref())?,
            quality: a.quality,
            source_devices: a.source_devices,
            total_samples: a.total_samples,
            context: PatternContext::from_wire(&format!("{field}.context"), a.context)?,
            region: a.region,
        })
    }

    /// The aggregate as a pattern a device can use (`sample_count` saturates at u32::MAX).
    pub fn to_pattern(&self, model_id: &str, now_ms: i64) -> Pattern {
        Pattern {
            id: self.id,
            content_id: self.content_id.clone().unwrap_or_default(),
            embedding: self.embedding.clone(),
            model_id: model_id.into(),
            success_rate: self.quality,
            sample_count: u32::try_from(self.total_samples).unwrap_or(u32::MAX).max(1),
            context: self.context.clone(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::{EMBEDDING_DIM, cosine, l2_normalize};

    fn unit(seed: u32) -> Vec<f32> {
        let mut v: Vec<f32> = (0..EMBEDDING_DIM)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000)
            .map(|x| x as f32 - 500.0)
            .collect();
        l2_normalize(&mut v);
        v
    }

    fn pattern(seed: u32) -> Pattern {
        Pattern {
            id: Uuid::now_v7(),
            content_id: format!("c{seed}"),
            embedding: unit(seed),
            model_id: "m".into(),
            success_rate: 0.8,
            sample_count: 2,
            context: PatternContext {
                time_slot: TimeSlot::Night,
                day_type: DayType::Weekday,
                content_type: ContentType::Series,
                genres: vec!["crime".into()],
            },
            created_at_ms: 10,
            updated_at_ms: 20,
        }
    }

    #[test]
    fn delta_round_trips_through_the_wire_within_quantisation_error() {
        let d = PatternDelta {
            added: vec![pattern(1), pattern(2)],
            updated: vec![PatternUpdate {
                id: Uuid::now_v7(),
                success_rate: 0.5,
                extra_samples: 3,
            }],
            removed: vec![Uuid::now_v7()],
            local_version: 7,
            model_id: "m".into(),
        };
        let back = PatternDelta::from_wire(d.to_wire(), "m").expect("valid");
        assert_eq!(back.local_version, 7);
        assert_eq!(back.updated, d.updated);
        assert_eq!(back.removed, d.removed);
        for (a, b) in d.added.iter().zip(&back.added) {
            assert_eq!((a.id, &a.content_id, &a.context), (b.id, &b.content_id, &b.context));
            assert!(cosine(&a.embedding, &b.embedding) >= 0.99);
        }
    }

    #[test]
    fn utc_day_start_truncates_to_midnight_utc() {
        let cases = [
            (0, 0),
            (1, 0),
            (MS_PER_DAY - 1, 0),
            (MS_PER_DAY, MS_PER_DAY),
            // 2024-01-06 20:30 UTC -> 2024-01-06 00:00 UTC.
            (1_704_573_000_000, 1_704_499_200_000),
            (-1, -MS_PER_DAY),
        ];
        for (ms, want) in cases {
            assert_eq!(utc_day_start(ms), want, "{ms}");
        }
    }

    #[test]
    fn an_uploaded_pattern_without_embedding_round_trips_and_a_global_one_is_refused() {
        let mut bare = pattern(1);
        bare.embedding.clear();
        let d =
            PatternDelta { added: vec![bare.clone()], model_id: "m".into(), ..Default::default() };
        assert!(d.to_wire().added[0].embedding.is_none());
        let back = PatternDelta::from_wire(d.to_wire(), "m").expect("valid");
        assert_eq!(back.added, vec![bare.clone()]);
        let g = GlobalPatterns { similar: vec![bare], model_id: "m".into(), ..Default::default() };
        assert!(matches!(
            GlobalPatterns::from_wire(g.to_wire()),
            Err(ValidationError::Missing { .. })
        ));
    }

    #[test]
    fn decoding_refuses_another_model() {
        let d =
            PatternDelta { added: vec![pattern(1)], model_id: "m".into(), ..Default::default() };
        assert!(matches!(
            PatternDelta::from_wire(d.to_wire(), "other"),
            Err(ValidationError::ModelMismatch { .. })
        ));
    }

    #[test]
    fn global_and_trends_round_trip() {
        let g = GlobalPatterns {
            similar: vec![pattern(3)],
            trending: vec![
                TrendSignal {
                    target: TrendTarget::ContentId("c9".into()),
                    score: 2.5,
                    region: "eu".into(),
                },
                TrendSignal {
                    target: TrendTarget::Centroid(unit(4)),
                    score: 1.0,
                    region: "eu".into(),
                },
            ],
            global_version: 12,
            model_id: "m".into(),
        };
        let back = GlobalPatterns::from_wire(g.to_wire()).expect("valid");
        assert_eq!(back.global_version, 12);
        assert_eq!(back.trending[0], g.trending[0]);
        match &back.trending[1].target {
            TrendTarget::Centroid(v) => assert!(cosine(v, &unit(4)) >= 0.99),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn aggregated_round_trip_keeps_k_and_optional_content() {
        let a = AggregatedPattern {
            id: Uuid::now_v7(),
            content_id: None,
            embedding: unit(5),
            quality: 0.9,
            source_devices: 4,
            total_samples: 40,
            context: PatternContext::default(),
            region: String::new(),
        };
        let back = AggregatedPattern::from_wire("a", a.to_wire(), 3).expect("valid");
        assert_eq!(back.content_id, None);
        assert_eq!(back.source_devices, 4);
        assert!(AggregatedPattern::from_wire("a", a.to_wire(), 5).is_err());
        assert_eq!(a.to_pattern("m", 1).sample_count, 40);
    }

    #[test]
    fn time_slots_and_day_types_follow_the_clock() {
        // 2024-01-06 was a Saturday. 20:30 UTC.
        let sat_evening = 1_704_573_000_000;
        assert_eq!(
            ViewingContext::at(sat_evening, 0),
            ViewingContext { time_slot: TimeSlot::Evening, day_type: DayType::Weekend }
        );
        // Same instant at UTC+5: 01:30 on Sunday.
        assert_eq!(ViewingContext::at(sat_evening, 300).time_slot, TimeSlot::Night);
        let table = [
            (0, TimeSlot::Night),
            (4, TimeSlot::Night),
            (5, TimeSlot::Morning),
            (11, TimeSlot::Morning),
            (12, TimeSlot::Afternoon),
            (16, TimeSlot::Afternoon),
            (17, TimeSlot::Evening),
            (21, TimeSlot::Evening),
            (22, TimeSlot::Night),
        ];
        for (h, want) in table {
            assert_eq!(TimeSlot::from_hour(h), want, "hour {h}");
        }
    }

    #[test]
    fn viewing_events_parse_from_json_and_are_validated() {
        let ok: ViewingEvent = serde_json::from_str(
            r#"{"content_id":"tt1","title":"Heat","genres":["crime"],"content_type":"movie","started_at_ms":1,"watch_fraction":0.9}"#,
        )
        .expect("json");
        assert_eq!(ok.validate(), Ok(()));
        let wrong_type = serde_json::from_str::<ViewingEvent>(
            r#"{"content_id":5,"started_at_ms":1,"watch_fraction":0.5}"#,
        );
        assert!(wrong_type.is_err());
        let mut bad = ok.clone();
        bad.watch_fraction = f32::NAN;
        assert!(bad.validate().is_err());
        bad = ok.clone();
        bad.title = "t".repeat(300);
        assert!(bad.validate().is_err());
        bad = ok;
        bad.content_id.clear();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn unknown_json_fields_are_refused() {
        let misspelt =
            r#"{"content_id":"tt1","genre":["crime"],"started_at_ms":1,"watch_fraction":0.9}"#;
        let err = serde_json::from_str::<ViewingEvent>(misspelt).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `genre`"), "{err}");
        let g = r#"{"similar":[],"trending":[],"global_version":1,"model_id":"m","extra":true}"#;
        assert!(serde_json::from_str::<GlobalPatterns>(g).is_err());
        let ok = r#"{"similar":[],"trending":[],"global_version":1,"model_id":"m"}"#;
        assert!(serde_json::from_str::<GlobalPatterns>(ok).is_ok());
        let ctx = r#"{"time_slot":"evening","day_type":"weekend","mood":"happy"}"#;
        assert!(serde_json::from_str::<ViewingContext>(ctx).is_err());
    }

    #[test]
    fn aggregate_ids_are_stable_v8_and_distinct_from_device_ids() {
        let a = content_aggregate_id("ml-item-1");
        assert_eq!(a, aggregate_id("ml-item-1", None));
        assert_ne!(a, content_aggregate_id("ml-item-2"));
        assert_ne!(a, aggregate_id("ml-item-1", Some(&[1, 2, 3])));
        assert!(is_aggregate_id(&a));
        assert!(!is_aggregate_id(&Uuid::now_v7()));
        assert!(!is_aggregate_id(&Uuid::from_bytes([7; 16])));
        // Content id and leader bytes cannot be confused.
        let spelled = String::from_utf8(vec![b'a', 0, 1, 2]).expect("utf-8");
        assert_ne!(aggregate_id("a", Some(&[1, 2])), aggregate_id(&spelled, None));
        // A content's collaborative vector has an id of its own, told apart by content.
        let c = collaborative_vector_id("ml-item-1");
        assert!(is_aggregate_id(&c));
        assert_ne!(c, a);
        assert_eq!(c, collaborative_vector_id("ml-item-1"));
        assert!(is_collaborative_vector(&c, "ml-item-1"));
        assert!(!is_collaborative_vector(&c, "ml-item-2"));
        assert!(!is_collaborative_vector(&a, "ml-item-1"));
        assert!(!is_collaborative_vector(&collaborative_vector_id(""), ""));
    }
}
