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
use crate::privacy::{Noise, NoiseSeed, Plan};
use omega_protocol::types::{AggregatedPattern, ContentType, DayType, PatternContext, TimeSlot};
use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize};
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
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq)]
pub struct DpRound {
    /// From [`crate::privacy::plan`].
    pub plan: Plan,
    /// Most groups per device.
    pub max_groups_per_device: u32,
    /// Where the noise comes from (see [`crate::privacy`]).
    pub seed: NoiseSeed,
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
    if let Some(dp) = &cfg.dp {
        // One unit per content: grouping by embedding lets one device's embedding move others
        // between groups, which no noise calibrated per device would cover.
        let by_content = merge_by_content(groups);
        let (out, mut stats) = match cfg.collab {
            Some(collab) => dp_collaborative(intake, &by_content, cfg, dp, &collab),
            None => dp_profiles(intake, &by_content, cfg, dp),
        };
        stats.groups = groups.len() as u64;
        stats.suppressed = stats.groups - stats.published;
        return (out, stats);
    }
    let all: Vec<Vec<Share>> =
        groups.iter().map(|g| shares(items, g, interests, cfg.profile_mix)).collect();
    let collab_vectors = match cfg.collab {
        Some(c) => collaborative(groups, &all, cfg.min_sources, &c),
        None => HashMap::new(),
    };
    let mut first_of_content: HashMap<u32, ()> = HashMap::new();
    let mut out = Vec::new();
    let mut stats = AggregateStats { groups: groups.len() as u64, ..Default::default() };
    for (gi, (g, sh)) in groups.iter().zip(&all).enumerate() {
        let main = first_of_content.insert(g.content, ()).is_none();
        let n = sh.len() as u32;
        if n < cfg.min_sources {
            stats.suppressed += 1;
            continue;
        }
        let mut embedding = vec![0.0f32; EMBEDDING_DIM];
        let (mut w, mut q) = (0.0f32, 0.0f32);
        for s in sh {
            embedding.iter_mut().zip(&s.vector).for_each(|(a, x)| *a += s.weight * x);
            w += s.weight;
            q += s.weight * s.quality;
        }
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
            quality: (q / w.max(f32::MIN_POSITIVE)).clamp(0.0, 1.0),
            source_devices: n,
            total_samples: sh.iter().map(|s| s.samples).sum(),
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

/// Noise stream of the selection release.
const SELECT_STREAM: u64 = 1;
/// Noise stream of the second release (Gram matrix or sums).
const RELEASE_STREAM: u64 = 2;

/// The groups of each content merged into one (groups come sorted by content).
fn merge_by_content(groups: &[Group]) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for g in groups {
        match out.last_mut() {
            Some(last) if last.content == g.content => last.members.extend(&g.members),
            _ => out.push(g.clone()),
        }
    }
    out
}

/// Every group's shares (no interests: a DP round publishes no fleet-centred profile), the
/// noisy selection over all groups, and the round's stats so far: the common first step of
/// both DP releases.
fn dp_selection(
    items: &[Contribution],
    groups: &[Group],
    cfg: &AggregateConfig,
    dp: &DpRound,
) -> (Vec<Vec<Share>>, Vec<Selected>, AggregateStats) {
    let all: Vec<Vec<Share>> = groups.iter().map(|g| shares(items, g, None, 0.0)).collect();
    let units: Vec<usize> = (0..groups.len()).collect();
    let selected = dp_select(&all, &units, cfg.min_sources, dp);
    let stats = AggregateStats {
        groups: groups.len() as u64,
        suppressed: (groups.len() - selected.len()) as u64,
        ..Default::default()
    };
    (all, selected, stats)
}

/// A group the noisy selection released, with its noisy device count.
struct Selected {
    group: usize,
    devices: f64,
}

/// The selection release of a DP round ([`crate::privacy`]): over `units` (group indices,
/// ascending), each device counts `c` in its `m` heaviest units; a unit is released when its
/// capped device count reaches k and its noisy count reaches the threshold. Returns the
/// released units with their noisy device counts (in devices, at least k).
fn dp_select(all: &[Vec<Share>], units: &[usize], min_sources: u32, dp: &DpRound) -> Vec<Selected> {
    let only: Vec<Vec<&Share>> = all
        .iter()
        .enumerate()
        .map(|(gi, sh)| if units.binary_search(&gi).is_ok() { sh.iter().collect() } else { vec![] })
        .collect();
    let allowed = top_groups_per_source(&only, dp.max_groups_per_device);
    let sel = &dp.plan.select;
    let mut noise = Noise::new(&dp.seed, SELECT_STREAM);
    let mut out = Vec::new();
    for &gi in units {
        let capped = all[gi].iter().filter(|s| allowed.contains_key(&(s.source, gi))).count();
        let count = capped as f64 * sel.contribution + noise.gaussian(sel.sigma);
        let devices = count / sel.contribution;
        if capped >= min_sources as usize && devices >= sel.release_threshold {
            out.push(Selected { group: gi, devices: devices.max(f64::from(min_sources)) });
        }
    }
    out
}

/// A DP round without collaborative vectors: noisy selection of contents, then the noisy
/// sums of the selected contents' per-device unit vectors and qualities; counts are the noisy
/// ones. Audience interests are not mixed in: they are centred on the fleet mean, so one
/// device would move every other device's vector.
fn dp_profiles(
    intake: &Intake,
    groups: &[Group],
    cfg: &AggregateConfig,
    dp: &DpRound,
) -> (Vec<AggregatedPattern>, AggregateStats) {
    let items = &intake.items;
    let (all, selected, mut stats) = dp_selection(items, groups, cfg, dp);
    // The second release: each device's m heaviest selected groups.
    let chosen: Vec<Vec<&Share>> = all
        .iter()
        .enumerate()
        .map(
            |(gi, sh)| {
                if selected.iter().any(|s| s.group == gi) { sh.iter().collect() } else { vec![] }
            },
        )
        .collect();
    let allowed = top_groups_per_source(&chosen, dp.max_groups_per_device);
    let rel = &dp.plan.release;
    let c = rel.contribution as f32;
    let mut noise = Noise::new(&dp.seed, RELEASE_STREAM);
    let mut out = Vec::new();
    for sel in &selected {
        let (gi, g) = (sel.group, &groups[sel.group]);
        let mine = all[gi].iter().filter(|s| allowed.contains_key(&(s.source, gi)));
        let mut embedding = vec![0.0f32; EMBEDDING_DIM];
        let mut qsum = 0.0f64;
        for s in mine {
            embedding.iter_mut().zip(&s.vector).for_each(|(a, x)| *a += c * x);
            qsum += rel.contribution * f64::from(s.quality);
        }
        embedding.iter_mut().for_each(|a| *a += noise.gaussian(rel.sigma) as f32);
        qsum += noise.gaussian(rel.sigma);
        if !l2_normalize(&mut embedding) {
            stats.suppressed += 1;
            continue;
        }
        let quality = (qsum / (sel.devices * rel.contribution)).clamp(0.0, 1.0) as f32;
        let devices = sel.devices.round() as u32;
        let content_id = intake.contents.get(g.content).clone();
        out.push(AggregatedPattern {
            id: aggregate_id(&content_id, None),
            content_id: Some(content_id),
            embedding,
            quality,
            source_devices: devices,
            total_samples: u64::from(devices),
            // The dominant context is an exact statistic: a DP round publishes none.
            context: PatternContext::default(),
            region: String::new(),
        });
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

/// A DP round with collaborative vectors: the noisy selection picks the contents (main
/// groups), then the noisy Gram matrix over the picked contents only is the second release
/// ([`collab::dp_item_vectors`]); quality is the round's public floor and counts are the noisy
/// ones.
fn dp_collaborative(
    intake: &Intake,
    groups: &[Group],
    cfg: &AggregateConfig,
    dp: &DpRound,
    collab: &CollabConfig,
) -> (Vec<AggregatedPattern>, AggregateStats) {
    let items = &intake.items;
    let (all, selected, mut stats) = dp_selection(items, groups, cfg, dp);
    let index: HashMap<usize, u32> =
        selected.iter().enumerate().map(|(k, s)| (s.group, k as u32)).collect();
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
    let n = selected.len();
    let m = dp.max_groups_per_device as usize;
    let mut noise = Noise::new(&dp.seed, RELEASE_STREAM);
    let vectors = collab::dp_item_vectors(&sets, n, m, collab, dp.plan.release.sigma, &mut noise);
    let mut out = Vec::new();
    for (k, sel) in selected.iter().enumerate() {
        let embedding = vectors[k * EMBEDDING_DIM..][..EMBEDDING_DIM].to_vec();
        let devices = sel.devices.round() as u32;
        let g = &groups[sel.group];
        let content_id = intake.contents.get(g.content).clone();
        out.push(AggregatedPattern {
            id: collaborative_vector_id(&content_id),
            content_id: Some(content_id),
            embedding,
            quality: cfg.min_quality,
            source_devices: devices,
            total_samples: u64::from(devices),
            context: PatternContext::default(),
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
