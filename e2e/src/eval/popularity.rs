//! The popularity baseline: every user gets the items most interacted with in training.
//! `popularity_dp` is its differentially private version at the DP pass's budget.

use super::{Scorer, Split, Stage};
use omega_federation::privacy::{Noise, NoiseSeed, rho_of, sigma_for};
use std::collections::HashSet;

/// Interaction counts per item over all users' training data.
#[derive(Debug, Clone)]
pub struct Popularity {
    counts: Vec<f32>,
}

impl Popularity {
    /// Counts interactions at `stage` (train, or train + validation).
    pub fn fit(split: &Split, stage: Stage) -> Self {
        let mut counts = vec![0.0; split.n_items];
        for r in split.pooled(stage) {
            counts[r.item as usize] += 1.0;
        }
        Popularity { counts }
    }

    /// One Gaussian release of per-user-normalised counts, (ε, δ)-DP per user: each user
    /// adds `1/sqrt(n)` to each of the `n` distinct items they interacted with (L2 norm 1, so
    /// sensitivity 1), every item of the catalogue (public) gets noise of the σ that
    /// ρ = `rho_of(epsilon, delta)` allows. No selection: the catalogue is the universe.
    pub fn fit_dp(split: &Split, stage: Stage, epsilon: f64, delta: f64, seed: u64) -> Self {
        let mut counts = vec![0.0f64; split.n_items];
        for u in &split.users {
            let items: HashSet<u32> = u.history(stage).iter().map(|r| r.item).collect();
            let w = 1.0 / (items.len().max(1) as f64).sqrt();
            items.iter().for_each(|&i| counts[i as usize] += w);
        }
        let sigma = sigma_for(rho_of(epsilon, delta), 1.0);
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        let mut noise = Noise::new(&NoiseSeed::fixed(key), 0);
        let counts = counts.into_iter().map(|c| (c + noise.gaussian(sigma)) as f32).collect();
        Popularity { counts }
    }

    /// Interactions of `item` in training.
    pub fn count(&self, item: u32) -> f32 {
        self.counts.get(item as usize).copied().unwrap_or(0.0)
    }
}

impl Scorer for Popularity {
    fn score(&mut self, _user: u32, items: &[u32]) -> Vec<f32> {
        items.iter().map(|&i| self.count(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{EvalOptions, evaluate};
    use crate::movielens::{Movie, MovieLens, Rating};

    #[test]
    fn ranks_by_training_counts_only() {
        // Item 0 is everyone's favourite; user 3's test item is item 0 as well.
        let mut ratings = Vec::new();
        for u in 0..4u32 {
            for (t, item) in [(1, 10 + u), (2, 0), (3, 20 + u)].into_iter().enumerate() {
                ratings.push(Rating {
                    user: u,
                    item: item.1,
                    rating: 5.0,
                    timestamp: t as i64 + item.0,
                });
            }
        }
        let ml = MovieLens {
            user_ids: vec![1, 2, 3, 4],
            movies: (0..200)
                .map(|i| Movie { item_id: i + 1, title: String::new(), year: None, genres: vec![] })
                .collect(),
            ratings,
        };
        let split = Split::new(&ml, 3);
        let mut pop = Popularity::fit(&split, Stage::Test);
        assert_eq!(pop.count(0), 4.0); // validation items count at the test stage
        assert_eq!(pop.score(0, &[0, 10, 99]), vec![4.0, 1.0, 0.0]);
        assert_eq!(Popularity::fit(&split, Stage::Validation).count(0), 0.0);
        let q = evaluate(&split, &mut pop, EvalOptions { stage: Stage::Test, full_ranking: false });
        assert_eq!(q.users, 4);
        // DP: a huge budget keeps the order (item 0 first), a tiny one drowns it; the same
        // seed draws the same noise.
        let dp = |eps: f64, seed: u64| Popularity::fit_dp(&split, Stage::Test, eps, 1e-6, seed);
        let loose = dp(1e6, 1);
        assert!(loose.count(0) > loose.count(10) && loose.count(10) > loose.count(99));
        // Two training items per user at the test stage: each adds 1/sqrt(2) to item 0.
        assert!((loose.count(0) - 4.0 / 2f32.sqrt()).abs() < 0.05, "{}", loose.count(0));
        assert_eq!(dp(1.0, 7).counts, dp(1.0, 7).counts);
        let tight = dp(0.01, 7);
        assert!(tight.counts.iter().map(|c| c.abs()).sum::<f32>() / 200.0 > 10.0);
    }
}
