//! Trends: what is rising, per region.
//!
//! Each device counts once per content (its latest update there), decayed by `decay` per
//! hour of age: `score(t) = Σ_devices decay^((t − updated)/1h)`. A content is **rising** when
//! its score now exceeds its score one hour earlier (computed the same way over the patterns
//! that existed then): with decay 0.95 that means the last hour brought more than 5% of the
//! decayed past. "Now" is the round's data time ([`crate::intake::Intake::as_of_ms`]), so a
//! rerun over the same data finds the same trends. Rising **pattern centroids** are the same
//! score over coarse cells of the embedding space (6 random-hyperplane sign bits of each
//! group's centroid, fixed seed): a rising cell is published as the weighted mean of its
//! groups' centroids. Like aggregates, a trend needs `min_sources` distinct devices.

use crate::group::Group;
use crate::intake::Intake;
use omega_protocol::types::{TrendSignal, TrendTarget};
use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Content trends published per region.
pub const CONTENT_TRENDS_PER_REGION: usize = 24;
/// Centroid trends published per region.
pub const CENTROID_TRENDS_PER_REGION: usize = 8;
const HOUR_MS: f64 = 3_600_000.0;
const CELL_BITS: usize = 6;

/// Trend settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrendConfig {
    /// Decay per hour, `(0, 1]`.
    pub decay: f64,
    /// Distinct devices a trend needs.
    pub min_sources: u32,
}

/// Decayed score of latest-update times at `now` (updates after `now` are ignored).
fn score(updates: &[i64], now: i64, decay: f64) -> f64 {
    updates.iter().filter(|&&t| t <= now).map(|&t| decay.powf((now - t) as f64 / HOUR_MS)).sum()
}

/// Score now and one hour ago; `Some(now)` when rising.
fn rising(updates: &[i64], now: i64, decay: f64) -> Option<f64> {
    let (s_now, s_then) = (score(updates, now, decay), score(updates, now - HOUR_MS as i64, decay));
    (s_now > s_then).then_some(s_now)
}

/// Detects rising content and rising centroids per region.
pub fn detect(intake: &Intake, groups: &[Group], cfg: &TrendConfig) -> Vec<TrendSignal> {
    let now = intake.as_of_ms();
    let k = cfg.min_sources as usize;
    // (region, content) -> source -> latest update.
    let mut content: BTreeMap<(String, String), HashMap<u32, i64>> = BTreeMap::new();
    for c in &intake.items {
        let key = (intake.regions.get(c.region).clone(), intake.contents.get(c.content).clone());
        let t = content.entry(key).or_default().entry(c.source).or_insert(c.updated_at_ms);
        *t = (*t).max(c.updated_at_ms);
    }
    let mut per_region: BTreeMap<String, Vec<(f64, TrendTarget)>> = BTreeMap::new();
    for ((region, cid), by_source) in &content {
        if by_source.len() < k {
            continue;
        }
        let updates: Vec<i64> = by_source.values().copied().collect();
        if let Some(s) = rising(&updates, now, cfg.decay) {
            per_region
                .entry(region.clone())
                .or_default()
                .push((s, TrendTarget::ContentId(cid.clone())));
        }
    }
    let mut out = Vec::new();
    for (region, mut v) in per_region {
        v.sort_by(|a, b| {
            b.0.total_cmp(&a.0).then_with(|| format!("{:?}", a.1).cmp(&format!("{:?}", b.1)))
        });
        out.extend(v.into_iter().take(CONTENT_TRENDS_PER_REGION).map(|(s, target)| TrendSignal {
            target,
            score: s as f32,
            region: region.clone(),
        }));
    }
    out.extend(centroid_trends(intake, groups, cfg, now));
    out
}

/// Random hyperplanes of the coarse cells (fixed seed: the same cells every round).
fn hyperplanes() -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(0x0e6a_7e4d);
    (0..CELL_BITS)
        .map(|_| (0..EMBEDDING_DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect()
}

fn centroid_trends(
    intake: &Intake,
    groups: &[Group],
    cfg: &TrendConfig,
    now: i64,
) -> Vec<TrendSignal> {
    let planes = hyperplanes();
    // (region, cell) -> (sources' latest updates, weighted centroid sum)
    type Cell = (HashMap<u32, i64>, Vec<f32>);
    let mut cells: BTreeMap<(String, u8), Cell> = BTreeMap::new();
    for g in groups {
        let mut centroid = vec![0.0f32; EMBEDDING_DIM];
        for &i in &g.members {
            let c = &intake.items[i];
            let w = c.weight() * c.embedding.scale;
            centroid.iter_mut().zip(&c.embedding.values).for_each(|(a, &q)| *a += w * f32::from(q));
        }
        if !l2_normalize(&mut centroid) {
            continue;
        }
        let cell = planes.iter().enumerate().fold(0u8, |acc, (b, p)| {
            let d: f32 = p.iter().zip(&centroid).map(|(x, y)| x * y).sum();
            if d > 0.0 { acc | (1 << b) } else { acc }
        });
        let regions: HashSet<u32> = g.members.iter().map(|&i| intake.items[i].region).collect();
        for r in regions {
            let entry = cells
                .entry((intake.regions.get(r).clone(), cell))
                .or_insert_with(|| (HashMap::new(), vec![0.0; EMBEDDING_DIM]));
            for &i in g.members.iter().filter(|&&i| intake.items[i].region == r) {
                let c = &intake.items[i];
                let t = entry.0.entry(c.source).or_insert(c.updated_at_ms);
                *t = (*t).max(c.updated_at_ms);
            }
            let n = g.members.len() as f32;
            entry.1.iter_mut().zip(&centroid).for_each(|(a, x)| *a += n * x);
        }
    }
    let mut per_region: BTreeMap<String, Vec<(f64, u8, Vec<f32>)>> = BTreeMap::new();
    for ((region, cell), (sources, mut sum)) in cells {
        if sources.len() < cfg.min_sources as usize || !l2_normalize(&mut sum) {
            continue;
        }
        let updates: Vec<i64> = sources.values().copied().collect();
        if let Some(s) = rising(&updates, now, cfg.decay) {
            per_region.entry(region).or_default().push((s, cell, sum));
        }
    }
    let mut out = Vec::new();
    for (region, mut v) in per_region {
        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        out.extend(v.into_iter().take(CENTROID_TRENDS_PER_REGION).map(|(s, _, c)| TrendSignal {
            target: TrendTarget::Centroid(c),
            score: s as f32,
            region: region.clone(),
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_decays_per_hour_and_ignores_the_future() {
        let h = HOUR_MS as i64;
        let s = score(&[10 * h, 9 * h, 11 * h], 10 * h, 0.95);
        assert!((s - 1.95).abs() < 1e-9, "{s}");
    }

    #[test]
    fn rising_table() {
        let h = HOUR_MS as i64;
        let now = 100 * h;
        // (case, update times, rising?)
        let cases: Vec<(&str, Vec<i64>, bool)> = vec![
            ("all new in the last hour", vec![now - 10, now - 20, now - 30], true),
            ("all old, nothing new", vec![now - 5 * h, now - 6 * h, now - 7 * h], false),
            (
                "one new among many old: below 5% growth",
                [vec![now - 2 * h; 40], vec![now]].concat(),
                false,
            ),
            (
                "three new among ten old: rising",
                [vec![now - 2 * h; 10], vec![now; 3]].concat(),
                true,
            ),
        ];
        for (name, updates, want) in cases {
            assert_eq!(rising(&updates, now, 0.95).is_some(), want, "{name}");
        }
    }
}
