//! The evaluation protocol of NCF / PFedRec, so Omega's numbers compare with the literature.
//!
//! - Implicit feedback: every rating counts as an interaction, whatever its stars.
//! - Leave-one-out by time: per user the latest interaction is the **test** item and the
//!   second latest the **validation** item. Ratings with equal timestamps (common in
//!   MovieLens, where users rate in bursts: 415 of 943 users rated two or more films in their
//!   last second) are ordered by [`Ties`]: file order by default, as PFedRec's
//!   `rank(method='first')` does, or by dense item index. Either way the split is the same in
//!   every run.
//! - Sampled ranking: the target is ranked among 99 items the user never interacted with,
//!   drawn per user from a fixed seed (the draw depends only on the seed and the user's
//!   original id, so `--users N` runs see the same candidates). HR@10 and NDCG@10.
//! - Full ranking: the target is ranked among every item the user has not seen in training.
//! - Tuning uses [`Stage::Validation`] (train only, rank the validation item); final numbers
//!   use [`Stage::Test`] (train + validation, rank the test item), as model selection on the
//!   validation item and a final fit on everything but the test item is the honest protocol.
//! - Ties: a scorer that gives the target the same score as some candidates gets the
//!   expected metric under a uniformly random order of the tied items, so a constant scorer
//!   scores like a random one, no better.

pub mod ease;
pub mod federated;
pub mod mf;
pub mod popularity;
pub mod reference;
pub mod report;
pub mod stats;
pub mod suite;

use crate::movielens::{MovieLens, Rating};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Cut-off of HR@K and NDCG@K.
pub const TOP_K: usize = 10;
/// Sampled negatives per user.
pub const NEGATIVES: usize = 99;
/// Seed of the negative draw unless told otherwise.
pub const DEFAULT_SEED: u64 = 42;

/// How ratings with equal timestamps are ordered when the latest ones are held out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Ties {
    /// The order of the data file (PFedRec's `rank(method='first')`): of two ratings in the
    /// same second, the one further down the file is the later one.
    #[default]
    FileOrder,
    /// Dense item index: of two ratings in the same second, the higher index is the later
    /// one (this harness's rule before file order became the default).
    ItemIndex,
}

impl std::fmt::Display for Ties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ties::FileOrder => "file-order",
            Ties::ItemIndex => "item-index",
        })
    }
}

/// Which held-out item a metric is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Fit on train, rank the validation item (model selection).
    Validation,
    /// Fit on train + validation, rank the test item (reported numbers).
    Test,
}

/// One user's share of the split.
#[derive(Debug, Clone, Default)]
pub struct UserSplit {
    /// Training interactions in time order (without validation and test).
    pub train: Vec<Rating>,
    /// The second latest interaction.
    pub validation: Option<Rating>,
    /// The latest interaction.
    pub test: Option<Rating>,
    /// 99 never-interacted items to rank the test item among.
    pub test_negatives: Vec<u32>,
    /// 99 never-interacted items to rank the validation item among.
    pub validation_negatives: Vec<u32>,
}

impl UserSplit {
    /// Interactions a model may learn from at `stage`, in time order.
    pub fn history(&self, stage: Stage) -> Vec<Rating> {
        let mut h = self.train.clone();
        if stage == Stage::Test {
            h.extend(self.validation);
        }
        h
    }

    /// The held-out interaction of `stage`.
    pub fn target(&self, stage: Stage) -> Option<Rating> {
        match stage {
            Stage::Validation => self.validation,
            Stage::Test => self.test,
        }
    }

    /// The sampled negatives of `stage`.
    pub fn negatives(&self, stage: Stage) -> &[u32] {
        match stage {
            Stage::Validation => &self.validation_negatives,
            Stage::Test => &self.test_negatives,
        }
    }
}

/// The leave-one-out split of a whole data set.
#[derive(Debug, Clone)]
pub struct Split {
    /// Per dense user index.
    pub users: Vec<UserSplit>,
    /// Size of the catalogue.
    pub n_items: usize,
}

impl Split {
    /// Splits `ml` with file-order ties (the literature's rule); see [`Split::with_ties`].
    pub fn new(ml: &MovieLens, seed: u64) -> Self {
        Self::with_ties(ml, seed, Ties::FileOrder)
    }

    /// Splits `ml`, ordering equal timestamps by `ties`; users with fewer than 3 interactions
    /// keep everything as training and are not evaluated.
    pub fn with_ties(ml: &MovieLens, seed: u64, ties: Ties) -> Self {
        // `ml.ratings` is in file order, so a stable sort by time alone keeps it for ties.
        let mut per_user: Vec<Vec<Rating>> = vec![Vec::new(); ml.n_users()];
        for r in &ml.ratings {
            per_user[r.user as usize].push(*r);
        }
        let users = per_user
            .into_iter()
            .enumerate()
            .map(|(u, mut rs)| {
                match ties {
                    Ties::FileOrder => rs.sort_by_key(|r| r.timestamp),
                    Ties::ItemIndex => rs.sort_by_key(|r| (r.timestamp, r.item)),
                }
                if rs.len() < 3 {
                    return UserSplit { train: rs, ..Default::default() };
                }
                let seen: HashSet<u32> = rs.iter().map(|r| r.item).collect();
                let test = rs.pop();
                let validation = rs.pop();
                let mut rng = StdRng::seed_from_u64(
                    seed ^ u64::from(ml.user_ids[u]).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                let test_negatives = sample_negatives(&mut rng, ml.n_items(), &seen);
                let validation_negatives = sample_negatives(&mut rng, ml.n_items(), &seen);
                UserSplit { train: rs, validation, test, test_negatives, validation_negatives }
            })
            .collect();
        Split { users, n_items: ml.n_items() }
    }

    /// Every interaction models may train on at `stage`, all users pooled.
    pub fn pooled(&self, stage: Stage) -> Vec<Rating> {
        self.users.iter().flat_map(|u| u.history(stage)).collect()
    }
}

/// Draws up to [`NEGATIVES`] distinct items outside `seen`.
fn sample_negatives(rng: &mut StdRng, n_items: usize, seen: &HashSet<u32>) -> Vec<u32> {
    let available = n_items.saturating_sub(seen.len());
    let want = NEGATIVES.min(available);
    let mut picked = Vec::with_capacity(want);
    let mut taken = HashSet::with_capacity(want);
    while picked.len() < want {
        let i = rng.random_range(0..n_items as u32);
        if !seen.contains(&i) && taken.insert(i) {
            picked.push(i);
        }
    }
    picked
}

/// HR@K and NDCG@K of one ranking: the target's score against the others'. Ties are
/// resolved in expectation over a random order of the tied items.
pub fn hit_and_ndcg(target: f32, others: impl IntoIterator<Item = f32>, k: usize) -> (f64, f64) {
    let (mut higher, mut tied) = (0usize, 0usize);
    for s in others {
        if s > target || (s.is_nan() && !target.is_nan()) {
            higher += 1;
        } else if s == target || (s.is_nan() && target.is_nan()) {
            tied += 1;
        }
    }
    // The target's 0-based rank is uniform over higher..=higher+tied.
    let positions = (tied + 1) as f64;
    let (mut hit, mut ndcg) = (0.0, 0.0);
    for rank in higher..=(higher + tied).min(k.saturating_sub(1)) {
        hit += 1.0;
        ndcg += 1.0 / ((rank + 2) as f64).log2();
    }
    if higher >= k {
        return (0.0, 0.0);
    }
    (hit / positions, ndcg / positions)
}

/// Anything that scores items for a user.
pub trait Scorer {
    /// Scores `items` for dense user `user` (higher is better), one score per item.
    fn score(&mut self, user: u32, items: &[u32]) -> Vec<f32>;
}

impl<F: FnMut(u32, &[u32]) -> Vec<f32>> Scorer for F {
    fn score(&mut self, user: u32, items: &[u32]) -> Vec<f32> {
        self(user, items)
    }
}

/// Quality of one method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Sampled HR@10 (target among 99 negatives).
    pub hr10: f64,
    /// Sampled NDCG@10.
    pub ndcg10: f64,
    /// HR@10 over every item not seen in training.
    pub full_hr10: f64,
    /// NDCG@10 over every item not seen in training.
    pub full_ndcg10: f64,
    /// Users evaluated.
    pub users: usize,
}

/// Which metrics to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOptions {
    /// Held-out item.
    pub stage: Stage,
    /// Also rank against the whole catalogue (one score per item per user).
    pub full_ranking: bool,
}

/// One user's metrics (for paired comparisons between methods).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UserQuality {
    /// Dense user index.
    pub user: u32,
    /// Sampled HR@10.
    pub hr10: f64,
    /// Sampled NDCG@10.
    pub ndcg10: f64,
    /// Full-ranking HR@10 (0 when not computed).
    pub full_hr10: f64,
    /// Full-ranking NDCG@10 (0 when not computed).
    pub full_ndcg10: f64,
}

impl Quality {
    /// The mean of per-user metrics.
    pub fn mean_of(per_user: &[UserQuality]) -> Quality {
        let mut q = Quality { users: per_user.len(), ..Default::default() };
        for p in per_user {
            q.hr10 += p.hr10;
            q.ndcg10 += p.ndcg10;
            q.full_hr10 += p.full_hr10;
            q.full_ndcg10 += p.full_ndcg10;
        }
        if q.users > 0 {
            let n = q.users as f64;
            q.hr10 /= n;
            q.ndcg10 /= n;
            q.full_hr10 /= n;
            q.full_ndcg10 /= n;
        }
        q
    }
}

/// Evaluates `scorer` on every user of `split` that has a target at `stage`.
pub fn evaluate(split: &Split, scorer: &mut dyn Scorer, opts: EvalOptions) -> Quality {
    Quality::mean_of(&evaluate_per_user(split, scorer, opts))
}

/// Like [`evaluate`], one entry per evaluated user, in user order.
pub fn evaluate_per_user(
    split: &Split,
    scorer: &mut dyn Scorer,
    opts: EvalOptions,
) -> Vec<UserQuality> {
    let all_items: Vec<u32> = (0..split.n_items as u32).collect();
    let mut out = Vec::new();
    for (u, us) in split.users.iter().enumerate() {
        let Some(target) = us.target(opts.stage) else { continue };
        let u = u as u32;
        let mut items = vec![target.item];
        items.extend_from_slice(us.negatives(opts.stage));
        let scores = scorer.score(u, &items);
        let (hr, ndcg) = hit_and_ndcg(scores[0], scores[1..].iter().copied(), TOP_K);
        let mut q = UserQuality { user: u, hr10: hr, ndcg10: ndcg, ..Default::default() };
        if opts.full_ranking {
            let seen: HashSet<u32> = us.history(opts.stage).iter().map(|r| r.item).collect();
            let scores = scorer.score(u, &all_items);
            let t = scores[target.item as usize];
            let others = scores
                .iter()
                .enumerate()
                .filter(|(i, _)| *i as u32 != target.item && !seen.contains(&(*i as u32)))
                .map(|(_, s)| *s);
            let (hr, ndcg) = hit_and_ndcg(t, others, TOP_K);
            q.full_hr10 = hr;
            q.full_ndcg10 = ndcg;
        }
        out.push(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::movielens::Movie;

    fn ml(ratings: &[(u32, u32, i64)], n_items: u32) -> MovieLens {
        MovieLens {
            user_ids: (0..=ratings.iter().map(|r| r.0).max().unwrap_or(0))
                .map(|u| u + 100)
                .collect(),
            movies: (0..n_items)
                .map(|i| Movie {
                    item_id: i + 1,
                    title: format!("m{i}"),
                    year: None,
                    genres: vec![],
                })
                .collect(),
            ratings: ratings
                .iter()
                .map(|&(user, item, timestamp)| Rating { user, item, rating: 4.0, timestamp })
                .collect(),
        }
    }

    #[test]
    fn latest_is_test_second_latest_validation_and_ties_go_by_item() {
        // user 0: item 5 and 3 share the latest timestamp: 5 (higher index) is the test item.
        let d = ml(&[(0, 5, 30), (0, 1, 10), (0, 3, 30), (0, 2, 20), (1, 0, 1)], 300);
        let s = Split::with_ties(&d, DEFAULT_SEED, Ties::ItemIndex);
        let u = &s.users[0];
        assert_eq!(u.test.map(|r| r.item), Some(5));
        assert_eq!(u.validation.map(|r| r.item), Some(3));
        assert_eq!(u.train.iter().map(|r| r.item).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(u.history(Stage::Test).len(), 3);
        // A user with one interaction is not evaluated.
        assert!(s.users[1].test.is_none());
        assert_eq!(s.users[1].train.len(), 1);
    }

    #[test]
    fn file_order_ties_make_the_rating_further_down_the_file_the_later_one() {
        // Items 5 and 3 share the latest timestamp; 3 comes later in the file.
        let d = ml(&[(0, 5, 30), (0, 1, 10), (0, 3, 30), (0, 2, 20), (1, 0, 1)], 300);
        for s in [Split::new(&d, DEFAULT_SEED), Split::with_ties(&d, 1, Ties::FileOrder)] {
            let u = &s.users[0];
            assert_eq!(u.test.map(|r| r.item), Some(3));
            assert_eq!(u.validation.map(|r| r.item), Some(5));
            assert_eq!(u.train.iter().map(|r| r.item).collect::<Vec<_>>(), vec![1, 2]);
        }
        // Without ties both rules agree.
        let d = ml(&[(0, 5, 3), (0, 1, 1), (0, 3, 2)], 300);
        let (a, b) = (Split::new(&d, 1), Split::with_ties(&d, 1, Ties::ItemIndex));
        assert_eq!(a.users[0].test, b.users[0].test);
        assert_eq!(a.users[0].validation, b.users[0].validation);
    }

    #[test]
    fn negatives_are_99_distinct_unseen_items_and_reproducible() {
        let d = ml(&[(0, 5, 3), (0, 1, 1), (0, 3, 2)], 300);
        let a = Split::new(&d, 7);
        let b = Split::new(&d, 7);
        let c = Split::new(&d, 8);
        let negs = &a.users[0].test_negatives;
        assert_eq!(negs.len(), NEGATIVES);
        assert_eq!(negs.iter().collect::<HashSet<_>>().len(), NEGATIVES);
        assert!(negs.iter().all(|i| ![1, 3, 5].contains(i)));
        assert_eq!(negs, &b.users[0].test_negatives);
        assert_ne!(negs, &c.users[0].test_negatives);
        assert_ne!(negs, &a.users[0].validation_negatives);
    }

    #[test]
    fn hit_and_ndcg_table() {
        let l = |r: f64| 1.0 / (r + 2.0).log2();
        // (target, others, expected hr, expected ndcg)
        let cases: Vec<(f32, Vec<f32>, f64, f64)> = vec![
            (1.0, vec![0.0; 99], 1.0, 1.0),
            (0.5, vec![1.0; 3], 1.0, l(3.0)),
            (0.0, vec![1.0; 10], 0.0, 0.0),
            (0.5, [vec![1.0; 9], vec![0.0; 5]].concat(), 1.0, l(9.0)),
            // Tied with 3 others after 8 higher: rank 8..=11, two of four inside the top 10.
            (0.5, [vec![1.0; 8], vec![0.5; 3]].concat(), 0.5, (l(8.0) + l(9.0)) / 4.0),
            // A constant scorer over 100 items: HR@10 = 10/100.
            (0.0, vec![0.0; 99], 0.1, (0..10).map(|r| l(r as f64)).sum::<f64>() / 100.0),
        ];
        for (t, others, hr, ndcg) in cases {
            let (h, n) = hit_and_ndcg(t, others.clone(), TOP_K);
            assert!((h - hr).abs() < 1e-12 && (n - ndcg).abs() < 1e-12, "{t} {others:?}: {h} {n}");
        }
    }

    #[test]
    fn an_oracle_scores_one_and_full_ranking_skips_seen_items() {
        let d = ml(&[(0, 5, 3), (0, 1, 1), (0, 3, 2), (1, 7, 1), (1, 8, 2), (1, 9, 3)], 200);
        let s = Split::new(&d, 1);
        let targets: Vec<u32> =
            s.users.iter().map(|u| u.test.map(|r| r.item).unwrap_or(0)).collect();
        let mut oracle = |u: u32, items: &[u32]| {
            items.iter().map(|&i| if i == targets[u as usize] { 1.0 } else { 0.0 }).collect()
        };
        let opts = EvalOptions { stage: Stage::Test, full_ranking: true };
        let q = evaluate(&s, &mut oracle, opts);
        assert_eq!((q.users, q.hr10, q.ndcg10, q.full_hr10), (2, 1.0, 1.0, 1.0));
        // Scoring seen items highest must not hurt full ranking: they are excluded.
        let mut seen_first = |u: u32, items: &[u32]| {
            let seen: Vec<u32> =
                s.users[u as usize].history(Stage::Test).iter().map(|r| r.item).collect();
            items
                .iter()
                .map(|&i| {
                    if seen.contains(&i) {
                        2.0
                    } else if i == targets[u as usize] {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        assert_eq!(evaluate(&s, &mut seen_first, opts).full_hr10, 1.0);
    }
}
