//! The federation's output, evaluated offline: every user's training interactions become the
//! quality patterns their TV would export, one federation round runs in-process
//! (`omega_federation::federate`, the same code `omega-shard federate` runs), the
//! published aggregates go through the wire encoding (int8) and its validation, and each
//! user ranks candidates the way a TV does with collaborative vectors: `score(i) = a_i · q`,
//! `q` the collaborative query over the history (`omega_protocol::collab`).
//!
//! No device, shard or transport limit is involved: this measures what the federation can
//! teach, not what a TV receives within its 5 KB per sync (that is `omega-sim`'s job).
//! Content embeddings are stand-ins (a fixed pseudo-random unit vector per item): the
//! collaborative vectors' dot products do not depend on them (they only anchor the rotation
//! into the shared space), but MiniLM-based audience profiles do, so those are measured with
//! the real model elsewhere.

use super::{Scorer, Split, Stage};
use omega_federation::intake::Intake;
use omega_federation::privacy::NoiseSeed;
use omega_federation::round::{RoundConfig, RoundOutput, federate};
use omega_protocol::collab::{self, QueryParams};
use omega_protocol::pb;
use omega_protocol::types::{
    AggregatedPattern, content_aggregate_id, embedding_to_wire, is_collaborative_vector,
};
use omega_protocol::vector::{EMBEDDING_DIM, dot, l2_normalize};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::{HashMap, HashSet};

/// How a star rating becomes a watch fraction (the TV's success signal): a film rated at all
/// was watched; low stars mean it was likely abandoned part-way.
pub fn watch_fraction(stars: f32) -> f32 {
    match stars.round() as i32 {
        i32::MIN..=1 => 0.4,
        2 => 0.6,
        3 => 0.85,
        4 => 0.95,
        _ => 1.0,
    }
}

/// A fixed pseudo-random unit vector standing in for an item's content embedding.
pub fn stand_in_embedding(item: u32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(0x5eed ^ u64::from(item));
    let mut v: Vec<f32> = (0..EMBEDDING_DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    l2_normalize(&mut v);
    v
}

/// The content id of dense item `item`.
pub fn content_id(item: u32) -> String {
    format!("ml-item-{item}")
}

/// What every user's TV would export at `stage`, as one shard's export batch.
pub fn export_batch(split: &Split, stage: Stage) -> pb::ExportBatch {
    let embeddings: Vec<pb::Embedding> =
        (0..split.n_items as u32).map(|i| embedding_to_wire(&stand_in_embedding(i))).collect();
    let mut patterns = Vec::new();
    for (u, us) in split.users.iter().enumerate() {
        for (k, r) in us.history(stage).iter().enumerate() {
            let mut id = vec![0u8; 16];
            id[..4].copy_from_slice(&(u as u32).to_le_bytes());
            id[4..8].copy_from_slice(&(k as u32).to_le_bytes());
            patterns.push(pb::ExportedPattern {
                pattern: Some(pb::Pattern {
                    id,
                    content_id: content_id(r.item),
                    embedding: Some(embeddings[r.item as usize].clone()),
                    success_rate: watch_fraction(r.rating),
                    sample_count: 1,
                    context: None,
                    created_at_ms: r.timestamp * 1000,
                    updated_at_ms: r.timestamp * 1000,
                }),
                source: format!("tv-{u}").into_bytes(),
                region: "ml".into(),
            });
        }
    }
    pb::ExportBatch {
        patterns,
        shard_id: 1,
        model_id: "stand-in".into(),
        last: true,
        cursor: vec![],
    }
}

/// Runs one round over everyone's patterns at `stage`.
pub fn round(split: &Split, stage: Stage, cfg: &RoundConfig, round_id: &str) -> RoundOutput {
    let mut intake = Intake::default();
    // One model for the whole batch: this cannot fail.
    let _ = intake.add_batch(&export_batch(split, stage), cfg.min_quality);
    // A fixed evaluation key: offline measurements must be repeatable; production rounds draw
    // from the OS or a secret key.
    let seed = NoiseSeed::keyed(b"omega offline evaluation, not a secret", round_id);
    federate(&intake, cfg, &seed.unwrap_or_else(|_| NoiseSeed::fixed([7; 32])))
}

/// Ranks with the published aggregates, as a TV would after receiving them.
#[derive(Debug, Clone)]
pub struct FederatedScorer {
    vectors: HashMap<u32, Vec<f32>>,
    devices: HashMap<u32, u32>,
    queries: Vec<Vec<f32>>,
    /// Weight of `ln(source_devices)` added to the dot product (0: none).
    pub popularity_weight: f32,
}

impl FederatedScorer {
    /// Decodes `published` through the wire (int8, validation against `min_sources`) and
    /// builds each user's query from the vectors of their history at `stage` with `query`.
    pub fn new(
        split: &Split,
        stage: Stage,
        published: &[AggregatedPattern],
        min_sources: u32,
        query: &QueryParams,
    ) -> Self {
        let by_content: HashMap<String, u32> =
            (0..split.n_items as u32).map(|i| (content_id(i), i)).collect();
        let mut vectors = HashMap::new();
        let mut devices = HashMap::new();
        let mut collaborative = HashSet::new();
        for a in published {
            let Ok(back) = AggregatedPattern::from_wire("a", a.to_wire(), min_sources) else {
                continue;
            };
            let Some(content) = back.content_id.as_deref() else { continue };
            let Some(&item) = by_content.get(content) else { continue };
            // A content's collaborative vector when the round made one; its main audience
            // profile otherwise (rounds without collaborative vectors); never a secondary group.
            if is_collaborative_vector(&back.id, content) {
                collaborative.insert(item);
            } else if back.id != content_aggregate_id(content) || collaborative.contains(&item) {
                continue;
            }
            vectors.insert(item, back.embedding);
            devices.insert(item, back.source_devices);
        }
        // The TV's rule (`omega_protocol::collab`): history newest first.
        let queries = split
            .users
            .iter()
            .map(|us| {
                let history = us.history(stage);
                let newest_first = history.iter().rev().map(|r| vectors.get(&r.item));
                collab::query(newest_first.map(|v| v.map(Vec::as_slice)), query)
                    .unwrap_or_else(|| vec![0.0; EMBEDDING_DIM])
            })
            .collect();
        FederatedScorer { vectors, devices, queries, popularity_weight: 0.0 }
    }

    /// True when `item` has a published vector.
    pub fn has(&self, item: u32) -> bool {
        self.vectors.contains_key(&item)
    }

    /// Contents with a published vector.
    pub fn covered(&self) -> usize {
        self.vectors.len()
    }
}

impl Scorer for FederatedScorer {
    fn score(&mut self, user: u32, items: &[u32]) -> Vec<f32> {
        let q = &self.queries[user as usize];
        // A content without an aggregate (fewer than k devices) ranks below every other.
        items
            .iter()
            .map(|i| {
                self.vectors.get(i).map_or(-1e9, |v| {
                    let n = self.devices.get(i).copied().unwrap_or(1).max(1) as f32;
                    dot(v, q) + self.popularity_weight * n.ln()
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_fraction_table() {
        for (stars, want) in
            [(1.0, 0.4), (2.0, 0.6), (3.0, 0.85), (4.0, 0.95), (5.0, 1.0), (0.0, 0.4)]
        {
            assert_eq!(watch_fraction(stars), want);
        }
    }

    #[test]
    fn stand_in_embeddings_are_fixed_unit_vectors() {
        let a = stand_in_embedding(3);
        assert_eq!(a, stand_in_embedding(3));
        assert!((dot(&a, &a) - 1.0).abs() < 1e-5);
        assert!(dot(&a, &stand_in_embedding(4)).abs() < 0.3);
    }
}
