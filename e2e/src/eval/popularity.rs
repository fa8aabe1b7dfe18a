//! The popularity baseline: every user gets the items most interacted with in training.

use super::{Scorer, Split, Stage};

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
    }
}
