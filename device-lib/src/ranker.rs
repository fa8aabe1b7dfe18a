//! The one ranker behind [`crate::Brain::recommend`] and [`crate::Brain::score`].
//!
//! A content's score comes from one rule, [`Ranker::score`], whichever call asks:
//! `recommend` only chooses which contents to score (neighbours of the seeds in the catalogue
//! and the global patterns, contents with a collaborative vector, trending contents) and
//! keeps the best unwatched ones, so a recommended content's score is exactly what `score`
//! gives it. The rule itself is built of the pure functions of [`crate::ranking`].

use crate::catalogue::Catalogue;
use crate::global_cache::GlobalCache;
use crate::local::{LocalPatterns, Watched};
use crate::ranking::{self, RankingParams, Recommendation, Source};
use omega_protocol::TrendTarget;
use omega_protocol::vector::{QuantizedVector, quantize};
use std::collections::{HashMap, HashSet};

/// A strong local pattern, standing for the taste in the asked context.
struct Seed {
    vector: QuantizedVector,
    weight: f32,
    reason: String,
}

/// What the ranker reads: the brain's parts, borrowed.
pub(crate) struct Parts<'a> {
    pub(crate) params: &'a RankingParams,
    pub(crate) catalogue: Option<&'a Catalogue>,
    pub(crate) local: &'a LocalPatterns,
    pub(crate) global: &'a GlobalCache,
    pub(crate) watched: &'a Watched,
    /// The collaborative query over what was watched, if any vector of a watched content is
    /// held.
    pub(crate) collab_query: Option<&'a QuantizedVector>,
}

/// The context to rank for, resolved: its vector, its words, and "now".
pub(crate) struct Moment<'a> {
    pub(crate) vector: QuantizedVector,
    pub(crate) text: &'a str,
    pub(crate) now_ms: i64,
}

/// Scores contents for one context.
pub(crate) struct Ranker<'a> {
    parts: Parts<'a>,
    now: i64,
    seeds: Vec<Seed>,
    /// Boosts by content id, with the trend's region.
    trend_by_content: HashMap<&'a str, (f32, &'a str)>,
    /// Centroid trends with their boost.
    trend_centroids: Vec<(QuantizedVector, f32)>,
}

/// One content's score and where it comes from.
struct Scored {
    score: f32,
    source: Source,
    reason: String,
}

impl<'a> Ranker<'a> {
    /// The ranker for `moment`: its seeds are the strongest local patterns near the context
    /// (the context itself when none).
    pub(crate) fn new(parts: Parts<'a>, moment: Moment<'_>) -> Self {
        let p = parts.params;
        let now = moment.now_ms;
        let sims = parts.local.vectors().scan(&moment.vector);
        let weights = parts.local.rows().iter().zip(&sims).enumerate().map(|(i, (pat, sim))| {
            let fresh = ranking::freshness(now.saturating_sub(pat.updated_at_ms), p);
            (i as u32, ranking::seed_weight(*sim, pat.success_rate, fresh))
        });
        let top = crate::index::top_k(weights.filter(|(_, w)| *w > 0.0), p.seeds);
        let mut seeds: Vec<Seed> = top
            .into_iter()
            .map(|(i, w)| Seed {
                vector: parts.local.vector(i as usize),
                weight: w,
                reason: format!("because you watched {}", parts.local.get(i as usize).title),
            })
            .collect();
        if seeds.is_empty() {
            let reason = if moment.text.is_empty() {
                "for now".to_string()
            } else {
                format!("for {}", moment.text)
            };
            seeds.push(Seed { vector: moment.vector, weight: p.cold_start_weight, reason });
        }
        let trends = parts.global.trends();
        let max = trends.iter().map(|t| t.score).fold(0.0f32, f32::max);
        let mut trend_by_content: HashMap<&str, (f32, &str)> = HashMap::new();
        let mut trend_centroids = Vec::new();
        for t in trends {
            let b = ranking::trend_boost(t.score, max, p);
            match &t.target {
                TrendTarget::ContentId(c) => {
                    let e = trend_by_content.entry(c.as_str()).or_insert((0.0, t.region.as_str()));
                    e.0 = e.0.max(b);
                }
                TrendTarget::Centroid(v) => trend_centroids.push((quantize(v), b)),
            }
        }
        Ranker { parts, now, seeds, trend_by_content, trend_centroids }
    }

    /// Up to `k` unwatched contents, best first (ties by content id).
    pub(crate) fn recommend(&self, k: usize) -> Vec<Recommendation> {
        let Parts { params: p, catalogue, global, watched, .. } = &self.parts;
        let n = p.neighbours_per_seed.max(k);
        let mut candidates: HashSet<&str> = HashSet::new();
        for seed in &self.seeds {
            if let Some(cat) = catalogue {
                for (pos, _) in cat.search(&seed.vector, n) {
                    candidates.insert(&cat.item(pos as usize).content_id);
                }
            }
            for (i, _) in global.search(&seed.vector, n) {
                candidates.insert(&global.row(i).content_id);
            }
        }
        if self.parts.collab_query.is_some() {
            candidates.extend(global.collab_contents());
        }
        candidates.extend(self.trend_by_content.keys().copied());
        let recs = candidates.into_iter().filter(|c| !watched.contains(c)).filter_map(|c| {
            self.score(c).map(|s| Recommendation {
                content_id: c.to_owned(),
                score: s.score,
                reason: s.reason,
                source: s.source,
            })
        });
        ranking::merge(recs, |id| watched.contains(id), k)
    }

    /// The score of each content, in order; [`crate::UNKNOWN_SCORE`] for one known nowhere.
    pub(crate) fn scores(&self, content_ids: &[String]) -> Vec<f32> {
        content_ids
            .iter()
            .map(|c| self.score(c).map_or(ranking::UNKNOWN_SCORE, |s| s.score))
            .collect()
    }

    /// The best seed-based score of a content with vector `v`, and the seed behind it.
    fn best_over_seeds(
        &self,
        v: &QuantizedVector,
        success: f32,
        fresh: f32,
        w: f32,
    ) -> (f32, usize) {
        self.seeds
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (ranking::candidate_score(s.weight, s.vector.dot(v), success, fresh, w), i)
            })
            .fold((0.0f32, 0), |best, x| if x.0 > best.0 { x } else { best })
    }

    /// The one scoring rule. A content with a collaborative vector in use (and a query) is
    /// scored by it, else by its catalogue item near the seeds; its global patterns near the
    /// seeds score too, and the best counts. A content known only from a local pattern is
    /// scored like a catalogue item. Trends add their boost: by content id, and by centroid
    /// against the content's MiniLM vector (never its collaborative vector, which lives in
    /// another space). `None` for a content known nowhere.
    fn score(&self, id: &str) -> Option<Scored> {
        let Parts { params: p, catalogue, local, global, collab_query, .. } = &self.parts;
        let mut best: Option<Scored> = None;
        let catalogue_pos = catalogue.and_then(|c| c.position(id));
        if let (Some(q), Some(v)) = (collab_query, global.collab_vector(id)) {
            let s = ranking::collaborative_score(v.dot(q), p);
            keep(&mut best, s, Source::Global, || "watched by viewers who share your taste".into());
        } else if let (Some(cat), Some(pos)) = (catalogue, catalogue_pos) {
            let (s, seed) = self.best_over_seeds(&cat.embedding(pos), 1.0, 1.0, p.catalogue_weight);
            keep(&mut best, s, Source::Catalogue, || self.seeds[seed].reason.clone());
        }
        for &gi in global.content_rows(id) {
            let g = global.row(gi);
            let fresh = ranking::freshness(self.now.saturating_sub(g.updated_at_ms), p);
            let (s, _) =
                self.best_over_seeds(&global.vector(gi), g.success_rate, fresh, p.global_weight);
            keep(&mut best, s, Source::Global, || "liked by viewers like you".into());
        }
        // A linear scan of the local patterns: only for a content known nowhere else.
        let known_elsewhere = best.is_some() || catalogue_pos.is_some();
        let local_pos = if known_elsewhere { None } else { local.position_of_content(id) };
        if best.is_none()
            && let Some(i) = local_pos
        {
            let (s, seed) = self.best_over_seeds(&local.vector(i), 1.0, 1.0, p.catalogue_weight);
            keep(&mut best, s, Source::Catalogue, || self.seeds[seed].reason.clone());
        }
        // The content's MiniLM vector: catalogue item, else a global pattern, else local.
        if !self.trend_centroids.is_empty() {
            let vector = catalogue_pos
                .zip(*catalogue)
                .map(|(pos, cat)| cat.embedding(pos))
                .or_else(|| global.content_rows(id).first().map(|&gi| global.vector(gi)))
                .or_else(|| {
                    local_pos.or_else(|| local.position_of_content(id)).map(|i| local.vector(i))
                });
            if let (Some(v), Some(b)) = (vector, best.as_mut()) {
                b.score +=
                    self.trend_centroids.iter().map(|(c, w)| w * c.dot(&v).max(0.0)).sum::<f32>();
            }
        }
        if let Some(&(boost, region)) = self.trend_by_content.get(id) {
            match best.as_mut() {
                Some(b) => b.score += boost,
                None => {
                    let reason = if region.is_empty() {
                        "trending".to_string()
                    } else {
                        format!("trending in {region}")
                    };
                    best = Some(Scored { score: boost, source: Source::Trending, reason });
                }
            }
        }
        best
    }
}

/// Keeps `score` in `best` when it is the first or a higher one.
fn keep(best: &mut Option<Scored>, score: f32, source: Source, reason: impl FnOnce() -> String) {
    if best.as_ref().is_none_or(|b| score > b.score) {
        *best = Some(Scored { score, source, reason: reason() });
    }
}
