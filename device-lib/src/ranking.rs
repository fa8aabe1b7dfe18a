//! The decisions of learning and ranking, as pure functions with their parameters in one place.
//!
//! The brain gathers numbers (similarities, success rates, ages) and calls these; nothing here
//! does I/O or touches the model, so every rule has a table test and [`RankingParams`] can be
//! tuned against measured recommendation quality without touching the brain.
//!
//! The rule, in words: the context is embedded and compared with each local pattern; a
//! pattern's *seed weight* is `similarity × success × freshness`. The strongest seeds stand for
//! what this TV likes in this context. Candidates are catalogue items and global patterns near
//! a seed: `seed weight × similarity × success × freshness × source weight`. Trending content
//! adds a boost. Content already watched is excluded; each content keeps its best candidate.

use omega_protocol::collab::QueryParams;
use omega_protocol::{ContentType, DayType, TimeSlot};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

const MS_PER_DAY: f32 = 86_400_000.0;

/// Score `Brain::score` (`omega_brain_score` in C) gives a content it knows nothing about
/// (below every real score, which are `>= 0`).
pub const UNKNOWN_SCORE: f32 = -1.0;

/// Every knob of learning and ranking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RankingParams {
    /// Half-life of freshness, in days.
    pub freshness_half_life_days: f32,
    /// Freshness never drops below this (old favourites still count a little).
    pub freshness_floor: f32,
    /// Local patterns that stand for the taste in a context.
    pub seeds: usize,
    /// Neighbours fetched per seed from the catalogue and from the global patterns.
    pub neighbours_per_seed: usize,
    /// Multiplier of catalogue candidates.
    pub catalogue_weight: f32,
    /// Multiplier of global-pattern candidates (other devices' experience).
    pub global_weight: f32,
    /// Weight of the strongest trend; others scale with their score.
    pub trend_weight: f32,
    /// Seed weight of the context itself when the TV has learned nothing yet.
    pub cold_start_weight: f32,
    /// Samples after which the success rate becomes an exponential moving average.
    pub success_window: u32,
    /// Weight of the genre hints, together, against the slot/day/type part of a context.
    pub genre_hint_weight: f32,
    /// Multiplier of collaborative scores (federated item vectors); 0 turns them off and
    /// leaves content similarity alone.
    pub collaborative_weight: f32,
    /// Use only the collaborative vectors received for the global version held, for the
    /// query and the candidates alike: each round's vectors come out of their own
    /// eigendecomposition, so an older round's vector sits on a slightly different scale and
    /// basis. On by default: measured better with `omega-sim` (`docs/quality.md`). Vectors
    /// loaded from the database count as current.
    pub collaborative_current_round_only: bool,
    /// How watched contents become the collaborative query (recency half-life, whole-history
    /// weight): the rule of `omega_protocol::collab`, shared with the shard's serving order.
    pub collaborative_query: QueryParams,
}

impl Default for RankingParams {
    fn default() -> Self {
        RankingParams {
            freshness_half_life_days: 30.0,
            freshness_floor: 0.05,
            seeds: 8,
            neighbours_per_seed: 24,
            catalogue_weight: 1.0,
            global_weight: 0.9,
            trend_weight: 0.15,
            cold_start_weight: 0.5,
            success_window: 20,
            genre_hint_weight: 0.5,
            collaborative_weight: 1.0,
            collaborative_current_round_only: true,
            collaborative_query: QueryParams::default(),
        }
    }
}

/// Where a recommendation comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The known catalogue, near what this TV liked.
    Catalogue,
    /// Patterns of other devices, pulled at sync.
    Global,
    /// A trend signal.
    Trending,
}

/// One recommended content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    /// Catalogue id.
    pub content_id: String,
    /// Higher is better; comparable within one call.
    pub score: f32,
    /// A short human-readable reason.
    pub reason: String,
    /// Where it came from.
    pub source: Source,
}

/// Freshness of something last updated `age_ms` ago: exponential decay with the configured
/// half-life, floored. Future timestamps count as fresh.
pub fn freshness(age_ms: i64, p: &RankingParams) -> f32 {
    let days = age_ms.max(0) as f32 / MS_PER_DAY;
    let half_life = p.freshness_half_life_days.max(f32::MIN_POSITIVE);
    (0.5f32).powf(days / half_life).max(p.freshness_floor)
}

/// Success rate after one more observation: the running mean of watch fractions for the first
/// `window` samples, then an exponential moving average with weight `1 / window`, so old
/// habits fade.
pub fn smoothed_success(
    prev_rate: f32,
    prev_samples: u32,
    watch_fraction: f32,
    window: u32,
) -> f32 {
    let n = prev_samples.saturating_add(1).min(window.max(1)) as f32;
    let next = prev_rate + (watch_fraction - prev_rate) / n;
    next.clamp(0.0, 1.0)
}

/// How strongly a local pattern speaks for the taste in the current context.
pub fn seed_weight(context_similarity: f32, success: f32, freshness: f32) -> f32 {
    context_similarity.max(0.0) * success * freshness
}

/// Score of a candidate found near a seed.
pub fn candidate_score(
    seed_weight: f32,
    similarity: f32,
    success: f32,
    freshness: f32,
    source_weight: f32,
) -> f32 {
    seed_weight * similarity.max(0.0) * success * freshness * source_weight
}

/// Offset that ranks every candidate with a collaborative score above every candidate scored
/// by content similarity alone (those stay below `catalogue_weight + trend_weight`, ~1.2 by
/// default), so federated knowledge decides wherever it exists.
pub const COLLABORATIVE_TIER: f32 = 10.0;

/// Score of a candidate whose collaborative item vector `a_i` the TV holds, for the TV's
/// collaborative query `q` (`omega_protocol::collab::query`): `COLLABORATIVE_TIER + weight ×
/// (a_i · q)`. Vectors are at most unit length and `|q| <= 1 + mix`, so the second term stays
/// within `±weight × (1 + mix)`; the weight is capped so it never leaves the tier.
pub fn collaborative_score(dot: f32, p: &RankingParams) -> f32 {
    if !dot.is_finite() {
        return COLLABORATIVE_TIER;
    }
    let bound = omega_protocol::collab::score_bound(&p.collaborative_query).max(1.0);
    let w = p.collaborative_weight.clamp(0.0, COLLABORATIVE_TIER / 2.0);
    COLLABORATIVE_TIER + w * dot.clamp(-bound, bound) / bound
}

/// Boost of a trending content: proportional to its score among the current trends.
pub fn trend_boost(score: f32, max_score: f32, p: &RankingParams) -> f32 {
    if max_score <= 0.0 || !score.is_finite() {
        return 0.0;
    }
    p.trend_weight * (score / max_score).clamp(0.0, 1.0)
}

/// What keeping a pattern is worth; the lowest is evicted first when the brain is full.
/// Recent and successful patterns stay; a fresh failure outlives a stale success only briefly.
pub fn retention(success: f32, freshness: f32) -> f32 {
    (0.25 + success) * freshness
}

/// The context vector: the slot/day/type embedding plus the mean of the genre-hint
/// embeddings weighted by `hint_weight`, re-normalised. Without hints, the base itself.
pub fn compose_context(base: &[f32], hints: &[&[f32]], hint_weight: f32) -> Vec<f32> {
    let mut v = base.to_vec();
    if !hints.is_empty() {
        let w = hint_weight / hints.len() as f32;
        for h in hints {
            v.iter_mut().zip(h.iter()).for_each(|(a, x)| *a += w * x);
        }
        if !omega_protocol::vector::l2_normalize(&mut v) {
            return base.to_vec();
        }
    }
    v
}

/// Keeps the best candidate per content, drops excluded contents, returns the `k` best
/// (ties broken by content id, so results are deterministic).
pub fn merge(
    candidates: impl IntoIterator<Item = Recommendation>,
    exclude: impl Fn(&str) -> bool,
    k: usize,
) -> Vec<Recommendation> {
    let mut best: HashMap<String, Recommendation> = HashMap::new();
    for c in candidates {
        if exclude(&c.content_id) || !c.score.is_finite() {
            continue;
        }
        match best.get(&c.content_id) {
            Some(b) if b.score >= c.score => {}
            _ => {
                best.insert(c.content_id.clone(), c);
            }
        }
    }
    let mut v: Vec<Recommendation> = best.into_values().collect();
    v.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.content_id.cmp(&b.content_id)));
    v.truncate(k);
    v
}

fn join_words<'a>(words: impl IntoIterator<Item = &'a str>) -> String {
    words.into_iter().filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// The text a context is embedded from, e.g. `"evening weekend movie crime"`.
pub fn context_text(
    time_slot: TimeSlot,
    day_type: DayType,
    content_type: Option<ContentType>,
    genres: &[String],
) -> String {
    let mut words = vec![time_slot.as_str(), day_type.as_str()];
    words.push(content_type.map_or("", ContentType::as_str));
    words.extend(genres.iter().map(String::as_str));
    join_words(words)
}

/// Every slot/day/type context text, the likeliest first (evenings, then the rest), plus the
/// given genre words: what a brain pre-embeds so recommendations hit the cache.
pub fn context_vocabulary<'a>(genres: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    use ContentType::*;
    let slots = [TimeSlot::Evening, TimeSlot::Night, TimeSlot::Afternoon, TimeSlot::Morning];
    let days = [DayType::Weekday, DayType::Weekend];
    let types = [
        None,
        Some(Movie),
        Some(Series),
        Some(Documentary),
        Some(Sports),
        Some(News),
        Some(Kids),
        Some(Music),
        Some(Live),
        Some(Other),
    ];
    let mut out = Vec::new();
    for t in types {
        for s in slots {
            for d in days {
                out.push(context_text(s, d, t, &[]));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    // Bounded: a catalogue with free-form genre tags must not queue thousands of texts.
    out.extend(genres.into_iter().filter(|g| seen.insert(*g)).take(256).map(str::to_owned));
    out
}

/// The text a content is embedded from, e.g. `"movie: Heat. crime, drama"`.
pub fn item_text(content_type: ContentType, title: &str, genres: &[String]) -> String {
    let head = join_words([content_type.as_str()]);
    let mut s = if head.is_empty() { title.to_owned() } else { format!("{head}: {title}") };
    if !genres.is_empty() {
        s.push_str(". ");
        s.push_str(&genres.join(", "));
    }
    s
}

/// The text a pattern is embedded from: context + content,
/// e.g. `"evening weekend movie: Heat. crime, drama"`.
pub fn pattern_text(
    time_slot: TimeSlot,
    day_type: DayType,
    content_type: ContentType,
    title: &str,
    genres: &[String],
) -> String {
    let ctx = join_words([time_slot.as_str(), day_type.as_str()]);
    let item = item_text(content_type, title, genres);
    if ctx.is_empty() { item } else { format!("{ctx} {item}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn freshness_table() {
        let p = RankingParams::default();
        let cases = [
            (0, 1.0),
            (-5 * DAY, 1.0),
            (30 * DAY, 0.5),
            (60 * DAY, 0.25),
            (3650 * DAY, 0.05),
            (i64::MAX, 0.05),
        ];
        for (age, want) in cases {
            let got = freshness(age, &p);
            assert!((got - want).abs() < 1e-4, "age {age}: got {got}, want {want}");
        }
    }

    #[test]
    fn smoothed_success_table() {
        // (previous rate, previous samples, watch fraction, window, expected)
        let cases = [
            (0.0, 0, 0.9, 20, 0.9), // first sample is the watch fraction
            (0.9, 1, 0.5, 20, 0.7), // running mean of 0.9 and 0.5
            (0.5, 3, 1.0, 20, 0.625),
            (0.8, 100, 0.0, 20, 0.76), // EMA with weight 1/20 after the window
            (1.0, 0, 1.0, 0, 1.0),     // a zero window behaves like 1
            (0.2, 5, 0.2, 20, 0.2),
        ];
        for (rate, n, wf, window, want) in cases {
            let got = smoothed_success(rate, n, wf, window);
            assert!((got - want).abs() < 1e-5, "{rate} {n} {wf} {window}: got {got}");
        }
    }

    #[test]
    fn seed_and_candidate_scores_multiply_and_ignore_negative_similarity() {
        let cases = [
            (0.8, 1.0, 1.0, 0.8),
            (0.8, 0.5, 0.5, 0.2),
            (-0.3, 1.0, 1.0, 0.0),
            (0.5, 0.0, 1.0, 0.0),
        ];
        for (sim, success, fresh, want) in cases {
            assert!((seed_weight(sim, success, fresh) - want).abs() < 1e-6);
        }
        assert!((candidate_score(0.5, 0.8, 0.9, 1.0, 0.9) - 0.324).abs() < 1e-6);
        assert_eq!(candidate_score(0.5, -0.8, 0.9, 1.0, 1.0), 0.0);
    }

    #[test]
    fn trend_boost_table() {
        let p = RankingParams::default();
        let cases = [(10.0, 10.0, 0.15), (5.0, 10.0, 0.075), (1.0, 0.0, 0.0), (f32::NAN, 1.0, 0.0)];
        for (score, max, want) in cases {
            assert!((trend_boost(score, max, &p) - want).abs() < 1e-6, "{score} {max}");
        }
    }

    #[test]
    fn retention_prefers_recent_successes() {
        assert!(retention(0.9, 1.0) > retention(0.1, 1.0));
        assert!(retention(0.9, 1.0) > retention(0.9, 0.5));
        assert!(retention(0.0, 1.0) > retention(1.0, 0.1));
    }

    fn rec(id: &str, score: f32, source: Source) -> Recommendation {
        Recommendation { content_id: id.into(), score, reason: String::new(), source }
    }

    #[test]
    fn merge_keeps_best_per_content_excludes_watched_and_orders() {
        let exclude = |id: &str| id == "watched";
        let got = merge(
            vec![
                rec("a", 0.5, Source::Catalogue),
                rec("b", 0.7, Source::Global),
                rec("a", 0.9, Source::Global),
                rec("watched", 5.0, Source::Catalogue),
                rec("c", 0.7, Source::Trending),
                rec("nan", f32::NAN, Source::Catalogue),
            ],
            exclude,
            3,
        );
        let ids: Vec<(&str, Source)> =
            got.iter().map(|r| (r.content_id.as_str(), r.source)).collect();
        assert_eq!(
            ids,
            vec![("a", Source::Global), ("b", Source::Global), ("c", Source::Trending)]
        );
        assert!(merge(vec![rec("a", 1.0, Source::Catalogue)], exclude, 0).is_empty());
    }

    #[test]
    fn compose_context_table() {
        let base = [1.0f32, 0.0, 0.0];
        let (x, y) = ([0.0f32, 1.0, 0.0], [0.0f32, 0.0, 1.0]);
        let r = |v: Vec<f32>| v.iter().map(|c| (c * 1000.0).round() / 1000.0).collect::<Vec<_>>();
        assert_eq!(r(compose_context(&base, &[], 0.5)), vec![1.0, 0.0, 0.0]);
        assert_eq!(r(compose_context(&base, &[&x], 1.0)), vec![0.707, 0.707, 0.0]);
        assert_eq!(r(compose_context(&base, &[&x, &y], 0.5)), vec![0.943, 0.236, 0.236]);
        let neg = [-1.0f32, 0.0, 0.0];
        assert_eq!(r(compose_context(&base, &[&neg], 1.0)), vec![1.0, 0.0, 0.0], "vanishing sum");
    }

    #[test]
    fn context_vocabulary_covers_every_slot_day_and_type_once() {
        let v = context_vocabulary(["crime", "drama", "crime"]);
        assert_eq!(v.len(), 4 * 2 * 10 + 2);
        assert_eq!(v[0], "evening weekday");
        assert!(v.contains(&"morning weekend kids".to_string()));
        assert_eq!(&v[v.len() - 2..], ["crime", "drama"]);
    }

    #[test]
    fn texts_table() {
        let g = vec!["crime".to_string(), "drama".to_string()];
        assert_eq!(
            pattern_text(TimeSlot::Evening, DayType::Weekend, ContentType::Movie, "Heat", &g),
            "evening weekend movie: Heat. crime, drama"
        );
        assert_eq!(
            pattern_text(
                TimeSlot::Unspecified,
                DayType::Unspecified,
                ContentType::Unspecified,
                "Heat",
                &[]
            ),
            "Heat"
        );
        assert_eq!(item_text(ContentType::Series, "Dark", &[]), "series: Dark");
        assert_eq!(
            context_text(TimeSlot::Night, DayType::Weekday, Some(ContentType::News), &g),
            "night weekday news crime drama"
        );
        assert_eq!(context_text(TimeSlot::Unspecified, DayType::Unspecified, None, &[]), "");
    }

    #[test]
    fn collaborative_scores_outrank_content_scores_and_keep_order() {
        let p = RankingParams::default();
        let best_content = candidate_score(1.0, 1.0, 1.0, 1.0, p.catalogue_weight) + p.trend_weight;
        let dots = [1.5, 0.7, 0.0, -0.4, -1.5];
        let scores: Vec<f32> = dots.iter().map(|&d| collaborative_score(d, &p)).collect();
        assert!(scores.iter().all(|&s| s > best_content), "{scores:?}");
        assert!(scores.windows(2).all(|w| w[0] > w[1]), "{scores:?}");
        // Degenerate inputs do not escape the tier.
        assert_eq!(collaborative_score(f32::NAN, &p), COLLABORATIVE_TIER);
        let huge = RankingParams { collaborative_weight: 1e6, ..p.clone() };
        assert!(collaborative_score(-1e9, &huge) >= COLLABORATIVE_TIER / 2.0);
        assert!(collaborative_score(1e9, &huge) <= COLLABORATIVE_TIER * 1.5);
        let negative = RankingParams { collaborative_weight: -3.0, ..p };
        assert_eq!(collaborative_score(1.0, &negative), COLLABORATIVE_TIER);
    }
}
