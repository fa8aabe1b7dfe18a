//! The centralised reference of the federated scorer: the same collaborative item vectors
//! (`omega_federation::collab::item_vectors`, the same rank, ridge and seed a round
//! uses) and the same recency query (`omega_protocol::collab::query`), fitted on every
//! user's training interactions pooled: no k-anonymity gate, no quality filter (every rating
//! counts, like for MF and EASE), no int8 wire encoding, every vector held by every user.
//! What federation costs is the distance from this reference.

use super::{Scorer, Split, Stage};
use omega_federation::collab::{CollabConfig, item_vectors};
use omega_protocol::collab::{self, QueryParams};
use omega_protocol::vector::{EMBEDDING_DIM, dot};

/// Seed of the subspace iteration, the one a federation round uses.
const ROUND_SEED: u64 = 0x00c0_11ab;

/// The fitted reference.
#[derive(Debug, Clone)]
pub struct CentralReference {
    vectors: Vec<f32>,
    queries: Vec<Vec<f32>>,
}

impl CentralReference {
    /// Fits the item vectors on the interactions of `stage` and builds every user's query.
    pub fn fit(
        split: &Split,
        stage: Stage,
        collab_cfg: &CollabConfig,
        query: &QueryParams,
    ) -> Self {
        let n = split.n_items;
        let sets: Vec<Vec<u32>> = split
            .users
            .iter()
            .map(|us| {
                let mut s: Vec<u32> = us.history(stage).iter().map(|r| r.item).collect();
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect();
        let vectors = item_vectors(&sets, n, collab_cfg, ROUND_SEED);
        let vector =
            |i: u32| &vectors[i as usize * EMBEDDING_DIM..(i as usize + 1) * EMBEDDING_DIM];
        let queries = split
            .users
            .iter()
            .map(|us| {
                let history = us.history(stage);
                let newest_first = history.iter().rev().map(|r| Some(vector(r.item)));
                collab::query(newest_first, query).unwrap_or_else(|| vec![0.0; EMBEDDING_DIM])
            })
            .collect();
        CentralReference { vectors, queries }
    }
}

impl Scorer for CentralReference {
    fn score(&mut self, user: u32, items: &[u32]) -> Vec<f32> {
        let q = &self.queries[user as usize];
        items
            .iter()
            .map(|&i| {
                dot(&self.vectors[i as usize * EMBEDDING_DIM..(i as usize + 1) * EMBEDDING_DIM], q)
            })
            .collect()
    }
}
