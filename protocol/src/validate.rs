//! Every hard limit of the wire contract (DESIGN.md), enforced by whoever receives data.
//!
//! The checks run on the decoded protobuf messages before anything is stored, so a bad
//! message is refused whole: nothing of it is half-written. Each error names the offending
//! field path (`delta.added[3].embedding.values`) so a client can fix its input.

use crate::pb;
use crate::vector::EMBEDDING_DIM;

/// At most this many patterns (added + updated + removed) in one delta.
pub const MAX_PATTERNS_PER_DELTA: usize = 256;
/// Largest decoded message a receiver accepts, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Longest string field, in bytes (UTF-8).
pub const MAX_STRING_BYTES: usize = 256;
/// Most genres on one pattern or event.
pub const MAX_GENRES: usize = 16;
/// Length of a binary UUID.
pub const ID_BYTES: usize = 16;
/// Patterns below this success rate are not stored by a shard.
pub const MIN_STORED_QUALITY: f32 = 0.7;
/// Patterns served to other devices have at least this success rate.
pub const MIN_SHARED_QUALITY: f32 = 0.8;
/// Most patterns in `GlobalPatterns.similar`.
pub const MAX_SIMILAR: usize = 100;
/// Most trend signals in one `GlobalPatterns`.
pub const MAX_TRENDS: usize = 64;
/// Largest `local_version` a device may send: `i64::MAX`, so that every store (Postgres keeps
/// it in a `bigint`) orders versions the same way, and a device far below it can always move up.
pub const MAX_LOCAL_VERSION: u64 = i64::MAX as u64;
/// How far a decoded device embedding's L2 norm may be from 1. MiniLM embeddings are unit
/// vectors and int8 quantisation moves the norm by well under 1%; the bound keeps anyone from
/// inflating a pattern's similarity score with a large `scale`.
pub const UNIT_NORM_TOLERANCE: f32 = 0.05;

/// Latest timestamp accepted anywhere, unix epoch ms: 2200-01-01T00:00:00Z. Timestamps are
/// never negative either. A TV clock can be wrong by years, but not by centuries; the bound
/// keeps every difference of two timestamps (freshness, ages) far from `i64` overflow and
/// refuses values that can only be garbage (a seconds/microseconds mix-up, `i64::MAX`).
pub const MAX_TIMESTAMP_MS: i64 = 7_258_118_400_000;

/// Why an input was refused. Field paths use the message's field names.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// A required field is absent or empty.
    #[error("{field} is required")]
    Missing {
        /// Field path.
        field: String,
    },
    /// An embedding does not have exactly [`EMBEDDING_DIM`] components.
    #[error("{field} has dimension {got}, expected exactly {expected}")]
    Dimension {
        /// Field path.
        field: String,
        /// Dimension received.
        got: usize,
        /// Dimension required.
        expected: usize,
    },
    /// NaN or infinity.
    #[error("{field} must be finite")]
    NonFinite {
        /// Field path.
        field: String,
    },
    /// A number outside its allowed range.
    #[error("{field} = {value} is outside [{min}, {max}]")]
    OutOfRange {
        /// Field path.
        field: String,
        /// Value received.
        value: f64,
        /// Smallest allowed value.
        min: f64,
        /// Largest allowed value.
        max: f64,
    },
    /// A list longer than its limit.
    #[error("{field} has {got} entries, at most {max} allowed")]
    TooMany {
        /// Field path.
        field: String,
        /// Entries received.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// A string longer than [`MAX_STRING_BYTES`].
    #[error("{field} is {got} bytes long, at most {max} allowed")]
    TooLong {
        /// Field path.
        field: String,
        /// Length received, in bytes.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// An id that is not a 16-byte UUID.
    #[error("{field} must be a 16-byte UUID, got {got} bytes")]
    BadId {
        /// Field path.
        field: String,
        /// Length received.
        got: usize,
    },
    /// An enum value this version does not know.
    #[error("{field} has unknown enum value {value}")]
    UnknownEnum {
        /// Field path.
        field: String,
        /// Value received.
        value: i32,
    },
    /// The same id appears twice where ids must be unique.
    #[error("{field} repeats id {id}")]
    Duplicate {
        /// Field path.
        field: String,
        /// The repeated id.
        id: String,
    },
    /// The embeddings come from another model than the receiver's.
    #[error("model_id {got:?} does not match this shard's model {expected:?}")]
    ModelMismatch {
        /// Model id received.
        got: String,
        /// Model id required.
        expected: String,
    },
    /// A string holding a NUL or another control character.
    #[error("{field} holds a control character at byte {at}")]
    ControlCharacter {
        /// Field path.
        field: String,
        /// Byte offset of the first one.
        at: usize,
    },
    /// A device embedding that is not unit length (nor all zero).
    #[error("{field} has L2 norm {norm}, expected 1 within {UNIT_NORM_TOLERANCE} (or all zero)")]
    NotUnit {
        /// Field path.
        field: String,
        /// Norm of the decoded vector.
        norm: f32,
    },
    /// A message larger than [`MAX_MESSAGE_BYTES`].
    #[error("message is {got} bytes, at most {max} allowed")]
    MessageTooLarge {
        /// Size received.
        got: usize,
        /// Limit.
        max: usize,
    },
}

/// Checks a string field: its length, and no NUL or other control character (a NUL fails
/// Postgres `text`, and no id, region or genre has a reason to hold one).
pub fn check_string(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.len() > MAX_STRING_BYTES {
        return Err(ValidationError::TooLong {
            field: field.into(),
            got: s.len(),
            max: MAX_STRING_BYTES,
        });
    }
    if let Some((at, _)) = s.char_indices().find(|(_, c)| c.is_control()) {
        return Err(ValidationError::ControlCharacter { field: field.into(), at });
    }
    Ok(())
}

/// Checks a non-empty string field.
pub fn check_required_string(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::Missing { field: field.into() });
    }
    check_string(field, s)
}

/// Checks a finite number in `[min, max]`.
pub fn check_range(field: &str, value: f64, min: f64, max: f64) -> Result<(), ValidationError> {
    if !value.is_finite() {
        return Err(ValidationError::NonFinite { field: field.into() });
    }
    if value < min || value > max {
        return Err(ValidationError::OutOfRange { field: field.into(), value, min, max });
    }
    Ok(())
}

/// Checks a timestamp (unix epoch ms): in `[0, MAX_TIMESTAMP_MS]`.
pub fn check_timestamp(field: &str, ms: i64) -> Result<(), ValidationError> {
    if !(0..=MAX_TIMESTAMP_MS).contains(&ms) {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            value: ms as f64,
            min: 0.0,
            max: MAX_TIMESTAMP_MS as f64,
        });
    }
    Ok(())
}

/// Checks a success rate or quality: finite, in `[0, 1]`.
pub fn check_rate(field: &str, value: f32) -> Result<(), ValidationError> {
    check_range(field, f64::from(value), 0.0, 1.0)
}

/// Checks a genre list: count and each string.
pub fn check_genres(field: &str, genres: &[String]) -> Result<(), ValidationError> {
    if genres.len() > MAX_GENRES {
        return Err(ValidationError::TooMany {
            field: field.into(),
            got: genres.len(),
            max: MAX_GENRES,
        });
    }
    for (i, g) in genres.iter().enumerate() {
        check_string(&format!("{field}[{i}]"), g)?;
    }
    Ok(())
}

/// Checks an f32 embedding: dimension and finiteness.
pub fn check_f32_embedding(field: &str, v: &[f32]) -> Result<(), ValidationError> {
    if v.len() != EMBEDDING_DIM {
        return Err(ValidationError::Dimension {
            field: field.into(),
            got: v.len(),
            expected: EMBEDDING_DIM,
        });
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(ValidationError::NonFinite { field: field.into() });
    }
    Ok(())
}

/// Checks a wire embedding: present, 384 int8 values, finite non-negative scale.
pub fn check_embedding(field: &str, e: Option<&pb::Embedding>) -> Result<(), ValidationError> {
    let e = e.ok_or_else(|| ValidationError::Missing { field: field.into() })?;
    if e.values.len() != EMBEDDING_DIM {
        return Err(ValidationError::Dimension {
            field: format!("{field}.values"),
            got: e.values.len(),
            expected: EMBEDDING_DIM,
        });
    }
    let scale = format!("{field}.scale");
    if !e.scale.is_finite() {
        return Err(ValidationError::NonFinite { field: scale });
    }
    if e.scale < 0.0 {
        return Err(ValidationError::OutOfRange {
            field: scale,
            value: f64::from(e.scale),
            min: 0.0,
            max: f64::from(f32::MAX),
        });
    }
    Ok(())
}

/// Checks that a device's wire embedding decodes to a unit vector within
/// [`UNIT_NORM_TOLERANCE`], or to all zeros (stored nowhere: the shard filters it). Call after
/// [`check_embedding`].
pub fn check_unit_embedding(field: &str, e: &pb::Embedding) -> Result<(), ValidationError> {
    let sum: f64 = e
        .values
        .iter()
        .map(|&b| {
            let q = f64::from(i8::from_ne_bytes([b]));
            q * q
        })
        .sum();
    let norm = (sum.sqrt() * f64::from(e.scale)) as f32;
    if sum == 0.0 || e.scale == 0.0 || (norm - 1.0).abs() <= UNIT_NORM_TOLERANCE {
        return Ok(());
    }
    Err(ValidationError::NotUnit { field: format!("{field}.scale"), norm })
}

/// Checks a 16-byte id.
pub fn check_id(field: &str, id: &[u8]) -> Result<(), ValidationError> {
    if id.len() != ID_BYTES {
        return Err(ValidationError::BadId { field: field.into(), got: id.len() });
    }
    Ok(())
}

fn check_enum<E: TryFrom<i32>>(field: &str, value: i32) -> Result<(), ValidationError> {
    E::try_from(value)
        .map(|_| ())
        .map_err(|_| ValidationError::UnknownEnum { field: field.into(), value })
}

/// Checks a pattern context.
pub fn check_context(field: &str, c: Option<&pb::PatternContext>) -> Result<(), ValidationError> {
    let Some(c) = c else { return Ok(()) };
    check_enum::<pb::TimeSlot>(&format!("{field}.time_slot"), c.time_slot)?;
    check_enum::<pb::DayType>(&format!("{field}.day_type"), c.day_type)?;
    check_enum::<pb::ContentType>(&format!("{field}.content_type"), c.content_type)?;
    check_genres(&format!("{field}.genres"), &c.genres)
}

/// Checks one pattern with its embedding: what a shard sends down (`similar`) and what it
/// stores.
pub fn check_pattern(field: &str, p: &pb::Pattern) -> Result<(), ValidationError> {
    check_pattern_as(field, p, false)
}

/// Checks one pattern as a device uploads it (`PatternDelta.added`): as strict as
/// [`check_pattern`], except that the embedding may be absent when `content_id` is set. A TV
/// leaves it out for a content whose collaborative vector the federation published (the
/// content id says all the federation needs), so no embedding of the title text leaves it.
/// An embedding that is present is checked in full.
pub fn check_uploaded_pattern(field: &str, p: &pb::Pattern) -> Result<(), ValidationError> {
    check_pattern_as(field, p, true)
}

fn check_pattern_as(
    field: &str,
    p: &pb::Pattern,
    embedding_optional: bool,
) -> Result<(), ValidationError> {
    check_id(&format!("{field}.id"), &p.id)?;
    let embedding = format!("{field}.embedding");
    if p.embedding.is_none() && (!embedding_optional || p.content_id.is_empty()) {
        return Err(ValidationError::Missing { field: embedding });
    }
    check_required_string(&format!("{field}.content_id"), &p.content_id)?;
    if p.embedding.is_some() {
        check_embedding(&embedding, p.embedding.as_ref())?;
    }
    check_rate(&format!("{field}.success_rate"), p.success_rate)?;
    if p.sample_count == 0 {
        return Err(ValidationError::OutOfRange {
            field: format!("{field}.sample_count"),
            value: 0.0,
            min: 1.0,
            max: f64::from(u32::MAX),
        });
    }
    check_context(&format!("{field}.context"), p.context.as_ref())?;
    check_timestamp(&format!("{field}.created_at_ms"), p.created_at_ms)?;
    check_timestamp(&format!("{field}.updated_at_ms"), p.updated_at_ms)
}

/// Checks one pattern update.
pub fn check_update(field: &str, u: &pb::PatternUpdate) -> Result<(), ValidationError> {
    check_id(&format!("{field}.id"), &u.id)?;
    check_rate(&format!("{field}.success_rate"), u.success_rate)
}

/// Checks a whole delta: the count limit first (cheap), then every entry, then id uniqueness.
/// `expected_model` is the receiver's model id.
pub fn check_delta(
    field: &str,
    d: &pb::PatternDelta,
    expected_model: &str,
) -> Result<(), ValidationError> {
    let total = d.added.len() + d.updated.len() + d.removed.len();
    if total > MAX_PATTERNS_PER_DELTA {
        return Err(ValidationError::TooMany {
            field: format!("{field}.added+updated+removed"),
            got: total,
            max: MAX_PATTERNS_PER_DELTA,
        });
    }
    if d.local_version > MAX_LOCAL_VERSION {
        return Err(ValidationError::OutOfRange {
            field: format!("{field}.local_version"),
            value: d.local_version as f64,
            min: 0.0,
            max: MAX_LOCAL_VERSION as f64,
        });
    }
    if d.model_id != expected_model {
        return Err(ValidationError::ModelMismatch {
            got: d.model_id.clone(),
            expected: expected_model.into(),
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(total);
    for (i, p) in d.added.iter().enumerate() {
        let f = format!("{field}.added[{i}]");
        check_uploaded_pattern(&f, p)?;
        if let Some(e) = &p.embedding {
            check_unit_embedding(&format!("{f}.embedding"), e)?;
        }
        unique(&mut seen, &f, &p.id)?;
    }
    for (i, u) in d.updated.iter().enumerate() {
        let f = format!("{field}.updated[{i}]");
        check_update(&f, u)?;
        unique(&mut seen, &f, &u.id)?;
    }
    for (i, id) in d.removed.iter().enumerate() {
        let f = format!("{field}.removed[{i}]");
        check_id(&f, id)?;
        unique(&mut seen, &f, id)?;
    }
    Ok(())
}

fn unique<'a>(
    seen: &mut std::collections::HashSet<&'a [u8]>,
    field: &str,
    id: &'a [u8],
) -> Result<(), ValidationError> {
    if !seen.insert(id) {
        return Err(ValidationError::Duplicate { field: field.into(), id: hex(id) });
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks a registration request.
pub fn check_register(r: &pb::RegisterRequest) -> Result<(), ValidationError> {
    check_required_string("device_id", &r.device_id)?;
    check_string("region", &r.region)?;
    check_string("model_id", &r.model_id)?;
    check_string("client_version", &r.client_version)?;
    check_string("enrollment_secret", &r.enrollment_secret)
}

/// Checks a trend signal.
pub fn check_trend(field: &str, t: &pb::TrendSignal) -> Result<(), ValidationError> {
    match &t.target {
        None => return Err(ValidationError::Missing { field: format!("{field}.target") }),
        Some(pb::trend_signal::Target::ContentId(c)) => {
            check_required_string(&format!("{field}.content_id"), c)?
        }
        Some(pb::trend_signal::Target::Centroid(e)) => {
            check_embedding(&format!("{field}.centroid"), Some(e))?
        }
    }
    check_range(&format!("{field}.score"), f64::from(t.score), 0.0, f64::from(f32::MAX))?;
    check_string(&format!("{field}.region"), &t.region)
}

/// Checks what a shard sends down to a device (the device validates too).
pub fn check_global(field: &str, g: &pb::GlobalPatterns) -> Result<(), ValidationError> {
    if g.similar.len() > MAX_SIMILAR {
        return Err(ValidationError::TooMany {
            field: format!("{field}.similar"),
            got: g.similar.len(),
            max: MAX_SIMILAR,
        });
    }
    if g.trending.len() > MAX_TRENDS {
        return Err(ValidationError::TooMany {
            field: format!("{field}.trending"),
            got: g.trending.len(),
            max: MAX_TRENDS,
        });
    }
    for (i, p) in g.similar.iter().enumerate() {
        check_pattern(&format!("{field}.similar[{i}]"), p)?;
    }
    for (i, t) in g.trending.iter().enumerate() {
        check_trend(&format!("{field}.trending[{i}]"), t)?;
    }
    Ok(())
}

/// Checks one aggregated pattern a federation round publishes, against the round's k.
pub fn check_aggregated(
    field: &str,
    a: &pb::AggregatedPattern,
    min_sources: u32,
) -> Result<(), ValidationError> {
    check_id(&format!("{field}.id"), &a.id)?;
    check_string(&format!("{field}.content_id"), &a.content_id)?;
    check_embedding(&format!("{field}.embedding"), a.embedding.as_ref())?;
    check_rate(&format!("{field}.quality"), a.quality)?;
    if a.source_devices < min_sources {
        return Err(ValidationError::OutOfRange {
            field: format!("{field}.source_devices"),
            value: f64::from(a.source_devices),
            min: f64::from(min_sources),
            max: f64::from(u32::MAX),
        });
    }
    check_context(&format!("{field}.context"), a.context.as_ref())?;
    check_string(&format!("{field}.region"), &a.region)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unit vector: 384 ones at scale 1/sqrt(384).
    fn emb() -> pb::Embedding {
        pb::Embedding {
            values: vec![1u8; EMBEDDING_DIM],
            scale: 1.0 / (EMBEDDING_DIM as f32).sqrt(),
        }
    }

    fn pattern(id: u8) -> pb::Pattern {
        pb::Pattern {
            id: vec![id; 16],
            content_id: "tt0111161".into(),
            embedding: Some(emb()),
            success_rate: 0.9,
            sample_count: 3,
            context: Some(pb::PatternContext {
                time_slot: pb::TimeSlot::Evening as i32,
                day_type: pb::DayType::Weekend as i32,
                content_type: pb::ContentType::Movie as i32,
                genres: vec!["drama".into()],
            }),
            created_at_ms: 1,
            updated_at_ms: 2,
        }
    }

    fn delta(added: Vec<pb::Pattern>) -> pb::PatternDelta {
        pb::PatternDelta {
            added,
            updated: vec![],
            removed: vec![],
            local_version: 1,
            model_id: "m".into(),
        }
    }

    #[test]
    fn a_device_embedding_must_be_unit_length_so_its_scale_cannot_inflate_scores() {
        let mut d = delta(vec![pattern(1)]);
        d.added[0].embedding.as_mut().unwrap().scale = 1e30;
        let err = check_delta("delta", &d, "m").unwrap_err();
        assert!(
            matches!(&err, ValidationError::NotUnit { field, .. } if field == "delta.added[0].embedding.scale"),
            "{err}"
        );
        for factor in [0.5, 0.9, 1.1, 2.0] {
            let mut d = delta(vec![pattern(1)]);
            d.added[0].embedding.as_mut().unwrap().scale *= factor;
            assert!(check_delta("delta", &d, "m").is_err(), "norm {factor} accepted");
        }
        for factor in [0.97, 1.03] {
            let mut d = delta(vec![pattern(1)]);
            d.added[0].embedding.as_mut().unwrap().scale *= factor;
            assert_eq!(check_delta("delta", &d, "m"), Ok(()), "norm {factor} refused");
        }
        // All zeros is no direction at all: accepted here, filtered by the shard.
        let mut d = delta(vec![pattern(1)]);
        d.added[0].embedding.as_mut().unwrap().values = vec![0; EMBEDDING_DIM];
        assert_eq!(check_delta("delta", &d, "m"), Ok(()));
        // A real quantised unit vector passes.
        let v: Vec<f32> = (0..EMBEDDING_DIM).map(|i| (i as f32 * 0.37).sin()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let q = crate::vector::quantize(&v.iter().map(|x| x / n).collect::<Vec<_>>());
        let e = pb::Embedding { values: q.to_bytes(), scale: q.scale };
        assert_eq!(check_unit_embedding("e", &e), Ok(()));
    }

    #[test]
    fn control_characters_are_refused_in_every_string() {
        for bad in ["a\0b", "\u{1}", "tab\there", "new\nline", "\u{7f}", "\u{9f}"] {
            let err = check_string("device_id", bad).unwrap_err();
            assert!(matches!(err, ValidationError::ControlCharacter { .. }), "{bad:?}: {err}");
        }
        assert_eq!(check_string("device_id", "tv-42 é ü 日本"), Ok(()));
        let r = pb::RegisterRequest { device_id: "tv\0".into(), ..Default::default() };
        assert!(check_register(&r).unwrap_err().to_string().contains("device_id holds a control"));
        let mut d = delta(vec![pattern(1)]);
        d.added[0].context.as_mut().unwrap().genres = vec!["dra\0ma".into()];
        assert!(check_delta("delta", &d, "m").unwrap_err().to_string().contains("genres[0]"));
        let mut d = delta(vec![pattern(1)]);
        d.added[0].content_id = "movie:\u{0}1".into();
        assert!(check_delta("delta", &d, "m").unwrap_err().to_string().contains("content_id"));
    }

    #[test]
    fn local_version_is_bounded_so_every_store_orders_it_alike() {
        let mut d = delta(vec![pattern(1)]);
        d.local_version = MAX_LOCAL_VERSION;
        assert_eq!(check_delta("delta", &d, "m"), Ok(()));
        for v in [MAX_LOCAL_VERSION + 1, 1 << 63, u64::MAX] {
            d.local_version = v;
            let err = check_delta("delta", &d, "m").unwrap_err();
            assert!(err.to_string().contains("delta.local_version"), "{v}: {err}");
        }
    }

    #[test]
    fn a_good_delta_passes() {
        assert_eq!(check_delta("delta", &delta(vec![pattern(1), pattern(2)]), "m"), Ok(()));
    }

    /// One row per limit of DESIGN.md: the mutation and the error it must produce.
    #[test]
    fn each_limit_is_enforced_with_a_named_field() {
        type Mutate = fn(&mut pb::PatternDelta);
        let cases: Vec<(&str, Mutate, &str)> = vec![
            (
                "dimension 383",
                |d| d.added[0].embedding.as_mut().unwrap().values.pop().map(|_| ()).unwrap(),
                "delta.added[0].embedding.values has dimension 383",
            ),
            (
                "dimension 385",
                |d| d.added[0].embedding.as_mut().unwrap().values.push(0),
                "dimension 385",
            ),
            (
                "missing embedding and content id",
                |d| {
                    d.added[0].embedding = None;
                    d.added[0].content_id.clear();
                },
                "delta.added[0].embedding is required",
            ),
            (
                "NaN scale",
                |d| d.added[0].embedding.as_mut().unwrap().scale = f32::NAN,
                "embedding.scale must be finite",
            ),
            (
                "inf scale",
                |d| d.added[0].embedding.as_mut().unwrap().scale = f32::INFINITY,
                "must be finite",
            ),
            ("negative scale", |d| d.added[0].embedding.as_mut().unwrap().scale = -1.0, "outside"),
            (
                "success 2.0",
                |d| d.added[0].success_rate = 2.0,
                "success_rate = 2 is outside [0, 1]",
            ),
            ("success -0.1", |d| d.added[0].success_rate = -0.1, "outside [0, 1]"),
            ("success NaN", |d| d.added[0].success_rate = f32::NAN, "success_rate must be finite"),
            ("zero samples", |d| d.added[0].sample_count = 0, "sample_count"),
            ("short id", |d| d.added[0].id = vec![1, 2, 3], "16-byte UUID, got 3"),
            ("empty content id", |d| d.added[0].content_id.clear(), "content_id is required"),
            (
                "long content id",
                |d| d.added[0].content_id = "x".repeat(257),
                "257 bytes long, at most 256",
            ),
            (
                "17 genres",
                |d| d.added[0].context.as_mut().unwrap().genres = vec!["g".into(); 17],
                "17 entries, at most 16",
            ),
            (
                "long genre",
                |d| d.added[0].context.as_mut().unwrap().genres = vec!["g".repeat(300)],
                "genres[0] is 300 bytes",
            ),
            (
                "unknown time slot",
                |d| d.added[0].context.as_mut().unwrap().time_slot = 42,
                "unknown enum value 42",
            ),
            (
                "257 patterns",
                |d| {
                    d.removed = (0..256u32)
                        .map(|i| {
                            let mut v = vec![0u8; 16];
                            v[..4].copy_from_slice(&i.to_le_bytes());
                            v
                        })
                        .collect()
                },
                "257 entries, at most 256",
            ),
            ("duplicate id", |d| d.removed = vec![vec![1u8; 16]], "repeats id"),
            ("other model", |d| d.model_id = "other".into(), "does not match this shard's model"),
            (
                "negative created_at",
                |d| d.added[0].created_at_ms = -1,
                "delta.added[0].created_at_ms = -1 is outside",
            ),
            (
                "updated_at in year 2200+",
                |d| d.added[0].updated_at_ms = MAX_TIMESTAMP_MS + 1,
                "delta.added[0].updated_at_ms = 7258118400001 is outside",
            ),
            ("updated_at i64::MAX", |d| d.added[0].updated_at_ms = i64::MAX, "updated_at_ms"),
            ("created_at i64::MIN", |d| d.added[0].created_at_ms = i64::MIN, "created_at_ms"),
            (
                "update NaN",
                |d| {
                    d.updated = vec![pb::PatternUpdate {
                        id: vec![9; 16],
                        success_rate: f32::NAN,
                        extra_samples: 1,
                    }]
                },
                "updated[0].success_rate must be finite",
            ),
        ];
        for (name, mutate, want) in cases {
            let mut d = delta(vec![pattern(1)]);
            mutate(&mut d);
            let err = check_delta("delta", &d, "m").expect_err(name);
            assert!(err.to_string().contains(want), "{name}: got {err}");
        }
    }

    #[test]
    fn an_uploaded_pattern_may_leave_out_the_embedding_only_with_a_content_id() {
        let mut bare = pattern(1);
        bare.embedding = None;
        assert_eq!(check_uploaded_pattern("p", &bare), Ok(()));
        assert_eq!(check_delta("delta", &delta(vec![bare.clone(), pattern(2)]), "m"), Ok(()));
        // Without a content id there is nothing to go by: refused, naming the embedding.
        let mut anonymous = bare.clone();
        anonymous.content_id.clear();
        let err = check_delta("delta", &delta(vec![anonymous]), "m").expect_err("no content id");
        assert_eq!(err, ValidationError::Missing { field: "delta.added[0].embedding".into() });
        // Everything else stays as strict.
        let mut bad = bare.clone();
        bad.sample_count = 0;
        assert!(check_uploaded_pattern("p", &bad).is_err());
        let mut bad = bare.clone();
        bad.created_at_ms = -1;
        assert!(check_uploaded_pattern("p", &bad).is_err());
        let mut short = pattern(1);
        short.embedding.as_mut().map(|e| e.values.pop());
        assert!(matches!(
            check_uploaded_pattern("p", &short),
            Err(ValidationError::Dimension { .. })
        ));
        // What a shard sends down and stores always carries the embedding.
        assert_eq!(
            check_pattern("p", &bare),
            Err(ValidationError::Missing { field: "p.embedding".into() })
        );
        let g = pb::GlobalPatterns { similar: vec![bare], ..Default::default() };
        assert!(matches!(check_global("g", &g), Err(ValidationError::Missing { .. })));
    }

    #[test]
    fn timestamps_are_bounded_on_both_sides() {
        for ok in [0, 1, 1_704_573_000_000, MAX_TIMESTAMP_MS] {
            assert_eq!(check_timestamp("t", ok), Ok(()), "{ok}");
        }
        for bad in [-1, i64::MIN, MAX_TIMESTAMP_MS + 1, i64::MAX] {
            assert!(matches!(check_timestamp("t", bad), Err(ValidationError::OutOfRange { .. })));
        }
    }

    #[test]
    fn register_needs_a_device_id_of_bounded_length() {
        let mut r = pb::RegisterRequest { device_id: "tv-1".into(), ..Default::default() };
        assert_eq!(check_register(&r), Ok(()));
        r.device_id.clear();
        assert!(matches!(check_register(&r), Err(ValidationError::Missing { .. })));
        r.device_id = "d".repeat(MAX_STRING_BYTES + 1);
        assert!(matches!(check_register(&r), Err(ValidationError::TooLong { .. })));
    }

    #[test]
    fn aggregated_patterns_below_k_are_refused() {
        let a = pb::AggregatedPattern {
            id: vec![1; 16],
            embedding: Some(emb()),
            quality: 0.9,
            source_devices: 2,
            ..Default::default()
        };
        assert!(check_aggregated("p", &a, 3).is_err());
        assert_eq!(check_aggregated("p", &a, 2), Ok(()));
    }

    #[test]
    fn global_patterns_are_bounded_and_trends_need_a_target() {
        let mut g =
            pb::GlobalPatterns { similar: vec![pattern(1); MAX_SIMILAR + 1], ..Default::default() };
        assert!(matches!(check_global("g", &g), Err(ValidationError::TooMany { .. })));
        g.similar.clear();
        g.trending.push(pb::TrendSignal { target: None, score: 1.0, region: "eu".into() });
        assert!(matches!(check_global("g", &g), Err(ValidationError::Missing { .. })));
        g.trending[0].target = Some(pb::trend_signal::Target::ContentId("c".into()));
        g.trending[0].score = f32::NAN;
        assert!(matches!(check_global("g", &g), Err(ValidationError::NonFinite { .. })));
    }

    #[test]
    fn f32_embeddings_are_checked_for_dimension_and_finiteness() {
        assert!(check_f32_embedding("e", &[0.0; EMBEDDING_DIM]).is_ok());
        assert!(check_f32_embedding("e", &[0.0; 10]).is_err());
        let mut v = vec![0.0; EMBEDDING_DIM];
        v[5] = f32::NEG_INFINITY;
        assert!(matches!(check_f32_embedding("e", &v), Err(ValidationError::NonFinite { .. })));
    }
}
