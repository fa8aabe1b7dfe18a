//! From groups to published aggregates: weighting, k-anonymity, optional noise.
//!
//! Inside a group, each distinct device counts **once**: its patterns there are averaged into
//! one unit vector, weighted by its heaviest pattern (success rate × samples, samples capped).
//! A device that sends the same pattern a thousand times is still one device with one weight.
//! Only groups with at least `min_sources` distinct devices are published.
//!
//! **Collaborative profiles.** The round sees, per pseudonymous device, all of its quality
//! patterns, so it knows each device's *interest vector* (the weighted mean of its pattern
//! embeddings). A group's published embedding mixes the group's own centroid with the
//! weighted mean of the interest vectors of the devices behind it — the profile of the
//! content's audience, in the same 384-dim space as everything else:
//! `y = normalise((1 − mix)·centroid_of_device + mix·interest_of_device)`. A TV whose interest
//! is close to a content's audience is then likely to enjoy it even when the content's own
//! text looks unlike what it watched; `mix = 0` is the plain federated average.
//!
//! **Collaborative vectors.** With `collab` set, each content whose main group has k devices
//! also gets its collaborative item vector ([`collab`]) as a second aggregate under
//! [`collaborative_vector_id`], with the main group's evidence (quality, devices, samples).

use crate::collab::{self, CollabConfig};
use crate::group::Group;
use crate::intake::{Contribution, Intake};
use crate::privacy::{Calibration, gaussian};
use omega_protocol::types::{AggregatedPattern, ContentType, DayType, PatternContext, TimeSlot};
use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize};
use rand::{SeedableRng, rngs::StdRng};
use std::collections::HashMap;

/// Unit interest vector per source ([`Intake::sources`] order), centred on the fleet mean
/// so that profiles differ in what is specific to an audience rather than in the part every
/// film description shares.
#[derive(Debug, Clone)]
pub struct Interests {
    vecs: Vec<f32>,
}

impl Interests {
    /// Computes every source's interest from all its patterns.
    pub fn compute(intake: &Intake) -> Self {
        let n = intake.sources.len();
        let mut vecs = vec![0.0f32; n * EMBEDDING_DIM];
        for c in &intake.items {
            let w = c.weight() * c.embedding.scale;
            let row = &mut vecs[c.source as usize * EMBEDDING_DIM..][..EMBEDDING_DIM];
            for (a, &q) in row.iter_mut().zip(&c.embedding.values) {
                *a += w * f32::from(q);
            }
        }
        let mut mean = vec![0.0f32; EMBEDDING_DIM];
        for row in vecs.chunks_exact_mut(EMBEDDING_DIM) {
            l2_normalize(row);
            mean.iter_mut().zip(row.iter()).for_each(|(m, x)| *m += x / n as f32);
        }
        for row in vecs.chunks_exact_mut(EMBEDDING_DIM) {
            row.iter_mut().zip(&mean).for_each(|(x, m)| *x -= m);
            l2_normalize(row);
        }
        Interests { vecs }
    }

    /// Source `s`'s unit interest vector.
    pub fn get(&self, s: u32) -> &[f32] {
        &self.vecs[s as usize * EMBEDDING_DIM..][..EMBEDDING_DIM]
    }
}

/// How groups become aggregates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AggregateConfig {
    /// k of k-anonymity: distinct devices a published group needs.
    pub min_sources: u32,
    /// Weight of the audience's interest in a published embedding, `[0, 1]`.
    pub profile_mix: f32,
    /// Present for a noisy (differentially private) round.
    pub dp: Option<DpRound>,
    /// Publish collaborative item vectors as the contents' main embeddings.
    pub collab: Option<CollabConfig>,
    /// The quality floor of the round: what a DP round publishes as `quality` (a public
    /// constant, so it costs no privacy budget).
    pub min_quality: f32,
}

/// Noise settings of a DP round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpRound {
    /// From [`crate::privacy::calibrate`] (noisy profiles).
    pub calibration: Calibration,
    /// From [`crate::privacy::calibrate_gram`] (collaborative vectors).
    pub gram: Calibration,
    /// Most groups per device.
    pub max_groups_per_device: u32,
    /// Seed of the noise (derived from the round id, so a rerun adds the same noise).
    pub seed: u64,
}

/// Counts of what happened to the groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggregateStats {
    /// Groups formed.
    pub groups: u64,
    /// Groups published.
    pub published: u64,
    /// Groups withheld (too few devices, or below the noisy threshold).
    pub suppressed: u64,
}

/// One device's share of one group.
struct Share {
    source: u32,
    weight: f32,
    quality: f32,
    samples: u64,
    vector: Vec<f32>,
}

fn shares(
    items: &[Contribution],
    g: &Group,
    interests: Option<&Interests>,
    mix: f32,
) -> Vec<Share> {
    let mut by_source: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut order = Vec::new();
    for &i in &g.members {
        let s = items[i].source;
        by_source.entry(s).or_insert_with(|| {
            order.push(s);
            Vec::new()
        });
        by_source.entry(s).or_default().push(i);
    }
    order
        .into_iter()
        .filter_map(|s| {
            let ms = &by_source[&s];
            let mut v = vec![0.0f32; EMBEDDING_DIM];
            let (mut wsum, mut qsum, mut wmax, mut samples) = (0.0f32, 0.0f32, 0.0f32, 0u64);
            for &i in ms {
                let c = &items[i];
                let w = c.weight();
                let k = w * c.embedding.scale;
                v.iter_mut().zip(&c.embedding.values).for_each(|(a, &q)| *a += k * f32::from(q));
                wsum += w;
                qsum += w * c.success_rate;
                wmax = wmax.max(w);
                samples += u64::from(c.sample_count);
            }
            if !l2_normalize(&mut v) || wsum <= 0.0 {
                return None;
            }
            if let Some(int) = interests.filter(|_| mix > 0.0) {
                v.iter_mut().zip(int.get(s)).for_each(|(a, b)| *a = (1.0 - mix) * *a + mix * b);
                l2_normalize(&mut v);
            }
            Some(Share { source: s, weight: wmax, quality: qsum / wsum, samples, vector: v })
        })
        .collect()
}

/// The group's dominant context: the most weighted value of each field, the leader's genres.
fn context(intake: &Intake, g: &Group) -> PatternContext {
    let mut slots: HashMap<TimeSlot, f32> = HashMap::new();
    let mut days: HashMap<DayType, f32> = HashMap::new();
    let mut types: HashMap<ContentType, f32> = HashMap::new();
    for &i in &g.members {
        let c = &intake.items[i];
        let ctx = intake.contexts.get(c.context);
        *slots.entry(ctx.time_slot).or_default() += c.weight();
        *days.entry(ctx.day_type).or_default() += c.weight();
        *types.entry(ctx.content_type).or_default() += c.weight();
    }
    fn top<K: Copy + Default + std::fmt::Debug>(m: HashMap<K, f32>) -> K {
        let mut v: Vec<(K, f32)> = m.into_iter().collect();
        // Heaviest, ties by the Debug name so the choice is stable.
        v.sort_by(|a, b| {
            b.1.total_cmp(&a.1).then_with(|| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)))
        });
        v.first().map(|x| x.0).unwrap_or_default()
    }
    PatternContext {
        time_slot: top(slots),
        day_type: top(days),
        content_type: top(types),
        genres: intake.contexts.get(intake.items[g.leader].context).genres.clone(),
    }
}

pub use omega_protocol::types::{aggregate_id, collaborative_vector_id};

/// Builds the published aggregates of a round (sorted by id) and counts.
pub fn aggregate(
    intake: &Intake,
    groups: &[Group],
    interests: Option<&Interests>,
    cfg: &AggregateConfig,
) -> (Vec<AggregatedPattern>, AggregateStats) {
    let items = &intake.items;
    if let (Some(dp), Some(collab)) = (cfg.dp, cfg.collab) {
        return dp_collaborative(intake, groups, cfg, &dp, &collab);
    }
    let all: Vec<Vec<Share>> =
        groups.iter().map(|g| shares(items, g, interests, cfg.profile_mix)).collect();
    let allowed = cfg.dp.map(|dp| top_groups_per_source(&all, dp.max_groups_per_device));
    let mut rng = StdRng::seed_from_u64(cfg.dp.map(|d| d.seed).unwrap_or(0));
    let collab_vectors = match (cfg.collab, cfg.dp) {
        (Some(c), None) => collaborative(groups, &all, cfg.min_sources, &c),
        _ => HashMap::new(),
    };
    let mut first_of_content: HashMap<u32, ()> = HashMap::new();
    let mut out = Vec::new();
    let mut stats = AggregateStats { groups: groups.len() as u64, ..Default::default() };
    for (gi, (g, sh)) in groups.iter().zip(&all).enumerate() {
        let main = first_of_content.insert(g.content, ()).is_none();
        let n = sh.len() as u32;
        let (sum, quality, sources, samples) = match (&cfg.dp, &allowed) {
            (Some(dp), Some(allowed)) => {
                let c = dp.calibration.contribution as f32;
                let mine: Vec<&Share> =
                    sh.iter().filter(|s| allowed.contains_key(&(s.source, gi))).collect();
                let sigma = dp.calibration.sigma;
                let mut draw = || gaussian(&mut rng, sigma);
                let mut sum = vec![0.0f32; EMBEDDING_DIM];
                for s in &mine {
                    sum.iter_mut().zip(&s.vector).for_each(|(a, x)| *a += c * x);
                }
                sum.iter_mut().for_each(|a| *a += draw());
                let count = mine.len() as f32 * c + draw();
                let qsum = mine.iter().map(|s| c * s.quality).sum::<f32>() + draw();
                let devices = f64::from(count) / dp.calibration.contribution;
                if n < cfg.min_sources || devices < dp.calibration.release_threshold {
                    stats.suppressed += 1;
                    continue;
                }
                let q = (qsum / count.max(f32::MIN_POSITIVE)).clamp(0.0, 1.0);
                let d = (devices.round() as u32).max(cfg.min_sources);
                (sum, q, d, u64::from(d))
            }
            _ => {
                if n < cfg.min_sources {
                    stats.suppressed += 1;
                    continue;
                }
                let mut sum = vec![0.0f32; EMBEDDING_DIM];
                let (mut w, mut q) = (0.0f32, 0.0f32);
                for s in sh {
                    sum.iter_mut().zip(&s.vector).for_each(|(a, x)| *a += s.weight * x);
                    w += s.weight;
                    q += s.weight * s.quality;
                }
                (
                    sum,
                    (q / w.max(f32::MIN_POSITIVE)).clamp(0.0, 1.0),
                    n,
                    sh.iter().map(|s| s.samples).sum(),
                )
            }
        };
        let mut embedding = sum;
        if !l2_normalize(&mut embedding) {
            stats.suppressed += 1;
            continue;
        }
        let content_id = intake.contents.get(g.content).clone();
        let leader = (!main).then(|| &items[g.leader].embedding.values[..]);
        let profile = AggregatedPattern {
            id: aggregate_id(&content_id, leader),
            content_id: Some(content_id.clone()),
            embedding,
            quality,
            source_devices: sources,
            total_samples: samples,
            context: context(intake, g),
            region: String::new(),
        };
        // The content's collaborative vector travels as an aggregate of its own, with the
        // main group's evidence: it is not a MiniLM embedding (see `collab`).
        if let Some(v) = collab_vectors.get(&gi) {
            out.push(AggregatedPattern {
                id: collaborative_vector_id(&content_id),
                embedding: v.clone(),
                ..profile.clone()
            });
            stats.published += 1;
        }
        out.push(profile);
        stats.published += 1;
    }
    out.sort_by_key(|a| a.id);
    (out, stats)
}

/// Collaborative vectors of the main group of every content that `min_sources` devices back,
/// keyed by group index (see [`collab`]).
fn collaborative(
    groups: &[Group],
    shares: &[Vec<Share>],
    min_sources: u32,
    cfg: &CollabConfig,
) -> HashMap<usize, Vec<f32>> {
    let mut seen_content = HashMap::new();
    let mut eligible = Vec::new(); // group indices, one per content
    for (gi, g) in groups.iter().enumerate() {
        if seen_content.insert(g.content, ()).is_none() && shares[gi].len() >= min_sources as usize
        {
            eligible.push(gi);
        }
    }
    let n = eligible.len();
    let mut sets: HashMap<u32, Vec<u32>> = HashMap::new();
    for (k, &gi) in eligible.iter().enumerate() {
        for s in &shares[gi] {
            sets.entry(s.source).or_default().push(k as u32);
        }
    }
    // Sources in a fixed order, so the result does not depend on hashing.
    let mut by_source: Vec<(u32, Vec<u32>)> = sets.into_iter().collect();
    by_source.sort_unstable_by_key(|(s, _)| *s);
    let sets: Vec<Vec<u32>> = by_source.into_iter().map(|(_, v)| v).collect();
    let vectors = collab::item_vectors(&sets, n, cfg, 0x00c0_11ab);
    eligible
        .into_iter()
        .enumerate()
        .map(|(k, gi)| (gi, vectors[k * EMBEDDING_DIM..][..EMBEDDING_DIM].to_vec()))
        .filter(|(_, v)| v.iter().any(|x| *x != 0.0))
        .collect()
}

/// A DP round with collaborative vectors: the noisy Gram matrix is the only data-dependent
/// release ([`collab::dp_item_vectors`]); contents are published when their noisy count passes
/// the threshold and k devices back them; quality is the round's public floor.
fn dp_collaborative(
    intake: &Intake,
    groups: &[Group],
    cfg: &AggregateConfig,
    dp: &DpRound,
    collab: &CollabConfig,
) -> (Vec<AggregatedPattern>, AggregateStats) {
    let items = &intake.items;
    let all: Vec<Vec<Share>> = groups.iter().map(|g| shares(items, g, None, 0.0)).collect();
    let mut stats = AggregateStats { groups: groups.len() as u64, ..Default::default() };
    let mut seen_content = HashMap::new();
    let mut candidates = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        if seen_content.insert(g.content, ()).is_none() && all[gi].len() >= cfg.min_sources as usize
        {
            candidates.push(gi);
        }
    }
    stats.suppressed = (groups.len() - candidates.len()) as u64;
    let index: HashMap<usize, u32> =
        candidates.iter().enumerate().map(|(k, &gi)| (gi, k as u32)).collect();
    let allowed = top_groups_per_source(
        &all.iter()
            .enumerate()
            .map(|(gi, sh)| if index.contains_key(&gi) { sh.iter().collect() } else { Vec::new() })
            .collect::<Vec<Vec<&Share>>>(),
        dp.max_groups_per_device,
    );
    let mut sets: HashMap<u32, Vec<(usize, u32)>> = HashMap::new();
    for &(s, gi) in allowed.keys() {
        sets.entry(s).or_default().push((gi, index[&gi]));
    }
    let mut by_source: Vec<(u32, Vec<(usize, u32)>)> = sets.into_iter().collect();
    by_source.sort_unstable_by_key(|(s, _)| *s);
    let sets: Vec<Vec<u32>> = by_source
        .into_iter()
        .map(|(_, mut v)| {
            v.sort_unstable();
            v.into_iter().map(|(_, k)| k).collect()
        })
        .collect();
    let n = candidates.len();
    let m = dp.max_groups_per_device as usize;
    let (vectors, diag) = collab::dp_item_vectors(&sets, n, m, collab, dp.gram.sigma, dp.seed);
    let mut out = Vec::new();
    for (k, &gi) in candidates.iter().enumerate() {
        if diag[k] < dp.gram.release_threshold {
            stats.suppressed += 1;
            continue;
        }
        let embedding = vectors[k * EMBEDDING_DIM..][..EMBEDDING_DIM].to_vec();
        let devices = ((diag[k] * m as f64).round() as u32).max(cfg.min_sources);
        let content_id = intake.contents.get(groups[gi].content).clone();
        out.push(AggregatedPattern {
            id: collaborative_vector_id(&content_id),
            content_id: Some(content_id),
            embedding,
            quality: cfg.min_quality,
            source_devices: devices,
            total_samples: u64::from(devices),
            context: context(intake, &groups[gi]),
            region: String::new(),
        });
        stats.published += 1;
    }
    out.sort_by_key(|a| a.id);
    (out, stats)
}

/// For DP: each source's `m` heaviest groups (ties by group index).
fn top_groups_per_source<S: std::borrow::Borrow<Share>>(
    all: &[Vec<S>],
    m: u32,
) -> HashMap<(u32, usize), ()> {
    let mut per_source: HashMap<u32, Vec<(f32, usize)>> = HashMap::new();
    for (gi, sh) in all.iter().enumerate() {
        for s in sh {
            let s = s.borrow();
            per_source.entry(s.source).or_default().push((s.weight, gi));
        }
    }
    let mut allowed = HashMap::new();
    for (s, mut gs) in per_source {
        gs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, gi) in gs.into_iter().take(m as usize) {
            allowed.insert((s, gi), ());
        }
    }
    allowed
}
