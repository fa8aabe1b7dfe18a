//! The sync decisions, free of transport and storage: what a delta stores, how a device's
//! interest vector moves, how served patterns are anonymised, and how an answer is fitted
//! into the 5 KB download budget.
//!
//! Budget policy (the issue leaves it open). A response is measured as gRPC sends it: zstd,
//! plus the 5-byte frame prefix ([`omega_protocol::wire::grpc_zstd_size`]). Filling order:
//! 1. the envelope (`global_version`, `model_id`, acknowledgement fields) always goes;
//! 2. trends, highest score first, up to a quarter of the budget (a content-id trend costs
//!    ~30 B, a centroid trend ~400 B), so trends cannot crowd out personal patterns;
//! 3. similar patterns, nearest first, until the budget is full (~440 B each: int8 embeddings
//!    do not compress, so ~10 fit in 5 KB);
//! 4. lower-scored trends, in whatever room is left.
//!
//! What is trimmed, therefore: the farthest similar patterns first, then the lowest-scored
//! trends. Sizes are planned with the uncompressed encoding (an upper bound, as zstd never
//! grows these messages by more than its frame header); then the real message is compressed:
//! if it is over (rare), the farthest similar pattern (then the weakest trend) is dropped until
//! it fits; if compression left room, the next similar pattern (else trend) is tried once.
//! At most two or three compressions per answer, with a reused zstd context.

use crate::store::SyncWrite;
use omega_protocol::ValidationError;
use omega_protocol::pb;
use omega_protocol::types::utc_day_start;
use omega_protocol::validate::{self, MIN_STORED_QUALITY};
use omega_protocol::vector::QuantizedVector;
use prost::Message;
use uuid::Uuid;

/// Largest sync response on the wire (zstd + gRPC prefix), bytes.
pub const DOWN_BUDGET_BYTES: usize = 5 * 1024;

/// Similar patterns asked of the store: more than the budget can hold (~10 fit in 5 KB).
pub const SIMILAR_CANDIDATES: usize = 16;

/// Share of the budget trends may take before similar patterns are placed.
const TREND_SHARE: usize = 4;

/// Slack for zstd's frame header on incompressible data.
const ZSTD_SLACK: usize = 32;

/// A validated, filtered delta ready for the store.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// What the store writes.
    pub write: SyncWrite,
    /// Added patterns kept plus updates and removals applied.
    pub accepted: u32,
    /// Added patterns dropped for low quality (or an all-zero embedding).
    pub filtered: u32,
}

impl Prepared {
    /// A pull-only sync (the device has nothing to push): a write of version 0, which every
    /// store treats as "not above the stored version", so nothing changes and the device's
    /// state (region, interest, acknowledged version) comes back for the answer.
    pub fn pull(device_id: &str, now_ms: i64) -> Self {
        Prepared {
            write: SyncWrite {
                device_id: device_id.to_owned(),
                local_version: 0,
                now_ms,
                ..Default::default()
            },
            accepted: 0,
            filtered: 0,
        }
    }
}

/// At or above the stored-quality floor, and either with a non-zero embedding or without
/// one: a TV leaves the embedding out when the content's collaborative vector is public, and
/// the federation groups such a pattern by its content id (validation has checked that the
/// content id is set).
fn storable(p: &pb::Pattern) -> bool {
    p.success_rate >= MIN_STORED_QUALITY
        && p.embedding.as_ref().is_none_or(|e| e.scale > 0.0 && e.values.iter().any(|&b| b != 0))
}

/// `p` with its timestamps truncated to 00:00 UTC of their day: a TV of this version sends
/// them so already, an older or modified one may not, and the shard stores no finer time.
fn day_coarse(mut p: pb::Pattern) -> pb::Pattern {
    p.created_at_ms = utc_day_start(p.created_at_ms);
    p.updated_at_ms = utc_day_start(p.updated_at_ms);
    p
}

/// Validates `delta` against the contract and the shard's model, keeps the patterns worth
/// storing, and computes the interest-vector addition.
pub fn prepare(
    device_id: &str,
    delta: pb::PatternDelta,
    model_id: &str,
    now_ms: i64,
) -> Result<Prepared, ValidationError> {
    validate::check_delta("delta", &delta, model_id)?;
    if delta.local_version == 0 {
        return Err(ValidationError::OutOfRange {
            field: "delta.local_version".into(),
            value: 0.0,
            min: 1.0,
            max: u64::MAX as f64,
        });
    }
    let total = delta.added.len();
    let added: Vec<pb::Pattern> =
        delta.added.into_iter().filter(storable).map(day_coarse).collect();
    let filtered = (total - added.len()) as u32;
    let mut interest: Option<Vec<f32>> = None;
    for p in &added {
        let Some(e) = &p.embedding else { continue };
        let v = QuantizedVector::from_bytes(&e.values, e.scale).dequantize();
        let Some(u) = crate::store::unit(&v) else { continue };
        let acc = interest.get_or_insert_with(|| vec![0.0; u.len()]);
        acc.iter_mut().zip(&u).for_each(|(a, x)| *a += p.success_rate * x);
    }
    let removed: Vec<Uuid> =
        delta.removed.iter().filter_map(|b| Uuid::from_slice(b).ok()).collect();
    let accepted = (added.len() + delta.updated.len() + removed.len()) as u32;
    Ok(Prepared {
        write: SyncWrite {
            device_id: device_id.to_owned(),
            local_version: delta.local_version,
            added,
            updated: delta.updated,
            removed,
            interest_add: interest,
            now_ms,
        },
        accepted,
        filtered,
    })
}

const HOUR_MS: i64 = 3_600_000;

/// A published aggregate as a device receives it: timestamps rounded down to the hour, so
/// the moment of publication is no finer than that. (Devices only ever receive aggregates.)
pub fn coarse_times(mut p: pb::Pattern) -> pb::Pattern {
    p.created_at_ms -= p.created_at_ms.rem_euclid(HOUR_MS);
    p.updated_at_ms -= p.updated_at_ms.rem_euclid(HOUR_MS);
    p
}

/// What [`fit`] left out, and the size it arrived at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trimmed {
    /// Similar patterns dropped.
    pub similar: usize,
    /// Trends dropped.
    pub trends: usize,
    /// Wire size of the response (zstd + gRPC prefix).
    pub wire_bytes: usize,
}

fn item_len(encoded: usize) -> usize {
    // field tag + length varint + body
    1 + prost::length_delimiter_len(encoded) + encoded
}

/// Bytes a zero run costs once compressed, at most (a zstd match, generously).
const ZERO_RUN_COST: usize = 8;

/// What a pattern is planned to cost: its encoded length, except that a run of zero bytes
/// at the end of its embedding (a collaborative vector uses only its first dimensions)
/// counts as [`ZERO_RUN_COST`], since compression all but removes it. The real compressed
/// size is checked after planning, so an optimistic plan is only trimmed, never sent.
fn planned_len(p: &pb::Pattern) -> usize {
    let plain = item_len(p.encoded_len());
    let zeros =
        p.embedding.as_ref().map_or(0, |e| e.values.iter().rev().take_while(|&&b| b == 0).count());
    if zeros > ZERO_RUN_COST { plain - zeros + ZERO_RUN_COST } else { plain }
}

/// Fills `resp.global` with as many `similar` (nearest first) and `trends` (highest first)
/// as fit in `budget` wire bytes, following the module's policy.
pub fn fit(
    resp: &mut pb::SyncResponse,
    similar: Vec<pb::Pattern>,
    trends: Vec<pb::TrendSignal>,
    budget: usize,
) -> Trimmed {
    {
        let global = resp.global.get_or_insert_with(Default::default);
        global.similar.clear();
        global.trending.clear();
    }
    let (n_similar, n_trends) = (similar.len(), trends.len());
    // The GlobalPatterns length prefix may grow by up to 2 bytes as items are added.
    let base = omega_protocol::wire::grpc_plain_size(resp) + 2 + ZSTD_SLACK;
    let global = resp.global.get_or_insert_with(Default::default);
    let mut room = budget.saturating_sub(base);
    let trend_room = room / TREND_SHARE;
    let mut used_by_trends = 0;
    let mut rest_trends = Vec::new();
    for t in trends.into_iter().take(validate::MAX_TRENDS) {
        let l = item_len(t.encoded_len());
        if used_by_trends + l <= trend_room {
            used_by_trends += l;
            global.trending.push(t);
        } else {
            rest_trends.push(t);
        }
    }
    room -= used_by_trends;
    let mut similar = similar.into_iter().take(validate::MAX_SIMILAR).peekable();
    while let Some(p) = similar.next_if(|p| planned_len(p) <= room) {
        room -= planned_len(&p);
        global.similar.push(p);
    }
    let mut rest_trends = rest_trends.into_iter().peekable();
    while global.trending.len() < validate::MAX_TRENDS {
        match rest_trends.next_if(|t| item_len(t.encoded_len()) <= room) {
            Some(t) => {
                room -= item_len(t.encoded_len());
                global.trending.push(t);
            }
            None => break,
        }
    }
    // Planned with uncompressed sizes: check the real size, then use what compression saved
    // (trend ids and genres compress well; embeddings do not).
    let mut size = omega_protocol::wire::grpc_zstd_size(resp);
    while size > budget {
        let g = resp.global.get_or_insert_with(Default::default);
        if g.similar.pop().is_none() && g.trending.pop().is_none() {
            break;
        }
        size = omega_protocol::wire::grpc_zstd_size(resp);
    }
    let mut leftovers = similar
        .map(Item::Similar)
        .chain(rest_trends.map(Item::Trend))
        .filter(|i| i.plain_len() + size <= budget + budget / 2);
    // Only worth trying when an item could plausibly fit once compressed.
    if let Some(item) = leftovers.next() {
        let g = resp.global.get_or_insert_with(Default::default);
        let is_similar = matches!(item, Item::Similar(_));
        match item {
            Item::Similar(p) => g.similar.push(p),
            Item::Trend(t) if g.trending.len() < validate::MAX_TRENDS => g.trending.push(t),
            Item::Trend(_) => {}
        }
        let with = omega_protocol::wire::grpc_zstd_size(resp);
        if with <= budget {
            size = with;
        } else {
            let g = resp.global.get_or_insert_with(Default::default);
            if is_similar {
                g.similar.pop();
            } else {
                g.trending.pop();
            }
        }
    }
    let g = resp.global.get_or_insert_with(Default::default);
    Trimmed {
        similar: n_similar - g.similar.len(),
        trends: n_trends - g.trending.len(),
        wire_bytes: size,
    }
}

enum Item {
    Similar(pb::Pattern),
    Trend(pb::TrendSignal),
}

impl Item {
    fn plain_len(&self) -> usize {
        match self {
            Item::Similar(p) => planned_len(p),
            Item::Trend(t) => item_len(t.encoded_len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega_protocol::vector::{EMBEDDING_DIM, quantize};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random_pattern(rng: &mut StdRng, rate: f32) -> pb::Pattern {
        let mut v: Vec<f32> = (0..EMBEDDING_DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        omega_protocol::vector::l2_normalize(&mut v);
        let q = quantize(&v);
        pb::Pattern {
            id: Uuid::now_v7().as_bytes().to_vec(),
            content_id: format!("movie-{}", rng.random_range(0..10_000)),
            embedding: Some(pb::Embedding { values: q.to_bytes(), scale: q.scale }),
            success_rate: rate,
            sample_count: 3,
            context: Some(pb::PatternContext {
                time_slot: 3,
                day_type: 1,
                content_type: 1,
                genres: vec!["drama".into(), "crime".into()],
            }),
            created_at_ms: 1_700_000_123_456,
            updated_at_ms: 1_700_000_999_999,
        }
    }

    fn delta(added: Vec<pb::Pattern>) -> pb::PatternDelta {
        pb::PatternDelta { added, local_version: 3, model_id: "m".into(), ..Default::default() }
    }

    #[test]
    fn prepare_filters_low_quality_and_builds_interest() {
        let mut rng = StdRng::seed_from_u64(1);
        let good = random_pattern(&mut rng, 0.9);
        let low = random_pattern(&mut rng, 0.69);
        let mut zero = random_pattern(&mut rng, 0.95);
        zero.embedding = Some(pb::Embedding { values: vec![0; EMBEDDING_DIM], scale: 0.0 });
        let p = prepare("d", delta(vec![good.clone(), low, zero]), "m", 5).expect("valid");
        assert_eq!((p.accepted, p.filtered), (1, 2));
        // Stored with its times at 00:00 UTC of their day (1_700_000_123_456 is
        // 2023-11-14 22:15 UTC).
        let day = 1_699_920_000_000;
        let stored = pb::Pattern { created_at_ms: day, updated_at_ms: day, ..good };
        assert_eq!(p.write.added, vec![stored]);
        let interest = p.write.interest_add.expect("interest");
        assert_eq!(interest.len(), EMBEDDING_DIM);
        let none = prepare("d", delta(vec![]), "m", 5).expect("valid");
        assert!(none.write.interest_add.is_none());
    }

    #[test]
    fn a_pattern_without_embedding_is_stored_by_content_id_with_day_times() {
        let mut rng = StdRng::seed_from_u64(4);
        let with = random_pattern(&mut rng, 0.9);
        let mut without = random_pattern(&mut rng, 0.8);
        without.embedding = None;
        let p = prepare("d", delta(vec![with.clone(), without.clone()]), "m", 5).expect("valid");
        assert_eq!((p.accepted, p.filtered), (2, 0));
        let kept = &p.write.added[1];
        assert_eq!((kept.id.clone(), kept.content_id.clone()), (without.id, without.content_id));
        assert!(kept.embedding.is_none());
        assert!(
            p.write
                .added
                .iter()
                .all(|a| a.created_at_ms % 86_400_000 == 0 && a.updated_at_ms % 86_400_000 == 0)
        );
        // The interest vector moves by the embedded pattern only.
        let alone = prepare("d", delta(vec![with]), "m", 5).expect("valid");
        assert_eq!(p.write.interest_add, alone.write.interest_add);
        // Below the quality floor it is filtered like any other; without a content id it is
        // refused whole.
        let mut low = random_pattern(&mut rng, 0.5);
        low.embedding = None;
        let p = prepare("d", delta(vec![low]), "m", 5).expect("valid");
        assert_eq!((p.accepted, p.filtered), (0, 1));
        let mut anonymous = random_pattern(&mut rng, 0.9);
        anonymous.embedding = None;
        anonymous.content_id.clear();
        let err = prepare("d", delta(vec![anonymous]), "m", 5).expect_err("no content id");
        assert!(err.to_string().contains("delta.added[0]"), "{err}");
    }

    #[test]
    fn prepare_refuses_invalid_deltas_with_a_field_path() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut bad = random_pattern(&mut rng, 2.0);
        let err = prepare("d", delta(vec![bad.clone()]), "m", 0).expect_err("2.0");
        assert!(err.to_string().contains("delta.added[0].success_rate"), "{err}");
        bad.success_rate = 0.9;
        let mut d = delta(vec![bad]);
        d.local_version = 0;
        assert!(prepare("d", d, "m", 0).expect_err("v0").to_string().contains("local_version"));
    }

    #[test]
    fn served_aggregates_have_hour_times() {
        let mut rng = StdRng::seed_from_u64(3);
        let p = random_pattern(&mut rng, 0.9);
        let a = coarse_times(p.clone());
        assert_eq!((a.created_at_ms % HOUR_MS, a.updated_at_ms % HOUR_MS), (0, 0));
        assert!(p.created_at_ms - a.created_at_ms < HOUR_MS);
        assert_eq!(a.id, p.id, "an aggregate keeps its group id");
    }

    #[test]
    fn fit_keeps_the_answer_within_budget_and_trims_farthest_first() {
        let mut rng = StdRng::seed_from_u64(4);
        let similar: Vec<_> = (0..100).map(|_| random_pattern(&mut rng, 0.9)).collect();
        let trends: Vec<_> = (0..64)
            .map(|i| pb::TrendSignal {
                target: Some(pb::trend_signal::Target::ContentId(format!("content-{i}"))),
                score: 100.0 - i as f32,
                region: "eu-west".into(),
            })
            .collect();
        let mut resp = pb::SyncResponse {
            global: Some(pb::GlobalPatterns {
                global_version: 9,
                model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
                ..Default::default()
            }),
            acknowledged_version: 3,
            patterns_accepted: 2,
            ..Default::default()
        };
        let trimmed = fit(&mut resp, similar.clone(), trends.clone(), DOWN_BUDGET_BYTES);
        let size = omega_protocol::wire::grpc_zstd_size(&resp);
        assert_eq!(size, trimmed.wire_bytes);
        assert!(size <= DOWN_BUDGET_BYTES, "{size}");
        assert!(size > DOWN_BUDGET_BYTES * 2 / 3, "budget used: {size}");
        let g = resp.global.as_ref().expect("global");
        assert!(g.similar.len() >= 8, "{} similar", g.similar.len());
        assert_eq!(g.similar[..], similar[..g.similar.len()], "nearest kept, in order");
        assert!(!g.trending.is_empty());
        assert_eq!(g.trending[0].score, 100.0, "highest trend kept");
        assert_eq!(trimmed.similar, 100 - g.similar.len());
        assert_eq!(trimmed.trends, 64 - g.trending.len());
        assert_eq!((g.global_version, resp.acknowledged_version), (9, 3));
        assert!(validate::check_global("global", g).is_ok());
    }

    #[test]
    fn fit_packs_zero_tailed_vectors_by_their_compressed_size() {
        let mut rng = StdRng::seed_from_u64(6);
        // Collaborative vectors: 32 coordinates, the rest zero.
        let compact: Vec<_> = (0..100)
            .map(|_| {
                let mut p = random_pattern(&mut rng, 0.9);
                let mut v = vec![0.0f32; EMBEDDING_DIM];
                v[..32].iter_mut().for_each(|x| *x = rng.random_range(-0.2f32..0.2));
                let q = quantize(&v);
                p.embedding = Some(pb::Embedding { values: q.to_bytes(), scale: q.scale });
                p
            })
            .collect();
        let dense: Vec<_> = (0..100).map(|_| random_pattern(&mut rng, 0.9)).collect();
        let mut sizes = Vec::new();
        for similar in [dense, compact.clone()] {
            let mut resp = pb::SyncResponse::default();
            let t = fit(&mut resp, similar, vec![], DOWN_BUDGET_BYTES);
            assert!(t.wire_bytes <= DOWN_BUDGET_BYTES, "{}", t.wire_bytes);
            assert_eq!(t.wire_bytes, omega_protocol::wire::grpc_zstd_size(&resp));
            sizes.push(resp.global.expect("global").similar.len());
        }
        assert!(sizes[1] >= 3 * sizes[0], "compact {} vs dense {}", sizes[1], sizes[0]);
        let mut resp = pb::SyncResponse::default();
        fit(&mut resp, compact.clone(), vec![], DOWN_BUDGET_BYTES);
        let g = resp.global.expect("global");
        assert_eq!(g.similar[..], compact[..g.similar.len()], "a prefix, in order");
    }

    #[test]
    fn fit_with_little_to_send_keeps_everything() {
        let mut rng = StdRng::seed_from_u64(5);
        let similar: Vec<_> = (0..3).map(|_| random_pattern(&mut rng, 0.9)).collect();
        let mut resp = pb::SyncResponse::default();
        let t = fit(&mut resp, similar, vec![], DOWN_BUDGET_BYTES);
        assert_eq!((t.similar, t.trends), (0, 0));
        assert_eq!(resp.global.expect("global").similar.len(), 3);
    }
}
