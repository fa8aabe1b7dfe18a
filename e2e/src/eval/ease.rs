//! EASE (Steck 2019), full rank: the strong centralised item-item baseline.
//!
//! `G = XᵀX` over every user's interactions (one per distinct item), `P = (G + λI)⁻¹`,
//! `B_ij = −P_ij / P_jj` with a zero diagonal, and a user scores item `i` by
//! `Σ_{j ∈ history} B_ji`. The federated scorer's collaborative vectors are a low-rank,
//! symmetric approximation of this model, so EASE bounds what that family can reach with
//! every user's data pooled. λ is chosen on the validation item ([`tune`]).

use super::{EvalOptions, Quality, Scorer, Split, Stage, evaluate};
use rayon::prelude::*;
use serde::Serialize;

/// The λ values [`tune`] tries by default.
pub const DEFAULT_LAMBDAS: [f64; 8] = [50.0, 100.0, 200.0, 300.0, 500.0, 800.0, 1200.0, 2000.0];

/// λ used without `--tune`: the validation item's choice among [`DEFAULT_LAMBDAS`]
/// (file-order ties, seed 42, 943 users; the command is `suite::BASELINES_SELECTION_COMMAND`).
pub const CHOSEN_LAMBDA: f64 = 200.0;

/// A fitted model, over the items with at least one training interaction (any other item
/// has an all-zero row and column in `G`, so its weights are exactly zero: leaving it out
/// changes no score and shrinks the inversion).
#[derive(Debug, Clone)]
pub struct Ease {
    /// Items of the model.
    m: usize,
    /// Catalogue item -> model index.
    index: Vec<Option<u32>>,
    /// `m × m`, row-major.
    b: Vec<f32>,
    /// Per user, model indices of the history.
    histories: Vec<Vec<u32>>,
}

/// Inverts the symmetric positive definite row-major `n × n` matrix `a` in place
/// (Gauss-Jordan without pivoting, which is stable for SPD matrices). Rows are updated in
/// parallel.
pub fn invert_spd(a: &mut [f64], n: usize) {
    let mut pivot_row = vec![0.0; n];
    for k in 0..n {
        let piv = a[k * n + k];
        a[k * n + k] = 1.0;
        for (p, x) in pivot_row.iter_mut().zip(&mut a[k * n..(k + 1) * n]) {
            *x /= piv;
            *p = *x;
        }
        a.par_chunks_mut(n).enumerate().filter(|(i, _)| *i != k).for_each(|(_, row)| {
            let f = row[k];
            if f != 0.0 {
                row[k] = 0.0;
                for (x, p) in row.iter_mut().zip(&pivot_row) {
                    *x -= f * p;
                }
            }
        });
    }
}

impl Ease {
    /// Fits on the interactions of `stage` with ridge `lambda`.
    pub fn fit(split: &Split, stage: Stage, lambda: f64) -> Self {
        let mut index: Vec<Option<u32>> = vec![None; split.n_items];
        let mut m = 0u32;
        let histories: Vec<Vec<u32>> = split
            .users
            .iter()
            .map(|us| {
                let mut h: Vec<u32> = us.history(stage).iter().map(|r| r.item).collect();
                h.sort_unstable();
                h.dedup();
                h.iter()
                    .map(|&i| {
                        *index[i as usize].get_or_insert_with(|| {
                            m += 1;
                            m - 1
                        })
                    })
                    .collect()
            })
            .collect();
        let m = m as usize;
        let mut g = vec![0.0f64; m * m];
        for h in &histories {
            for &i in h {
                let row = &mut g[i as usize * m..(i as usize + 1) * m];
                for &j in h {
                    row[j as usize] += 1.0;
                }
            }
        }
        for i in 0..m {
            g[i * m + i] += lambda;
        }
        invert_spd(&mut g, m);
        let diag: Vec<f64> = (0..m).map(|j| g[j * m + j]).collect();
        let b = g
            .iter()
            .enumerate()
            .map(|(idx, p)| {
                let (i, j) = (idx / m, idx % m);
                if i == j { 0.0 } else { (-p / diag[j]) as f32 }
            })
            .collect();
        Ease { m, index, b, histories }
    }
}

impl Scorer for Ease {
    fn score(&mut self, user: u32, items: &[u32]) -> Vec<f32> {
        let h = &self.histories[user as usize];
        items
            .iter()
            .map(|&i| match self.index.get(i as usize).copied().flatten() {
                Some(c) => h.iter().map(|&j| self.b[j as usize * self.m + c as usize]).sum(),
                None => 0.0,
            })
            .collect()
    }
}

/// One λ tried and its validation quality.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Trial {
    /// Ridge.
    pub lambda: f64,
    /// Validation HR@10 / NDCG@10.
    pub validation: Quality,
}

/// Tries every λ on the validation item (fit on train only); returns the trials and the
/// best λ (HR@10, then NDCG@10).
pub fn tune(split: &Split, lambdas: &[f64]) -> (Vec<Trial>, f64) {
    let opts = EvalOptions { stage: Stage::Validation, full_ranking: false };
    let trials: Vec<Trial> = lambdas
        .iter()
        .map(|&lambda| Trial {
            lambda,
            validation: evaluate(split, &mut Ease::fit(split, Stage::Validation, lambda), opts),
        })
        .collect();
    let best = trials
        .iter()
        .fold(None::<&Trial>, |acc, t| match acc {
            Some(a)
                if (t.validation.hr10, t.validation.ndcg10)
                    <= (a.validation.hr10, a.validation.ndcg10) =>
            {
                Some(a)
            }
            _ => Some(t),
        })
        .map_or(CHOSEN_LAMBDA, |t| t.lambda);
    (trials, best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::movielens::{Movie, MovieLens, Rating};

    #[test]
    fn inverse_times_matrix_is_identity() {
        let n = 5;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = 1.0 / (1.0 + (i as f64 - j as f64).abs());
            }
            a[i * n + i] += 2.0;
        }
        let mut inv = a.clone();
        invert_spd(&mut inv, n);
        for i in 0..n {
            for j in 0..n {
                let x: f64 = (0..n).map(|k| a[i * n + k] * inv[k * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((x - want).abs() < 1e-10, "({i}, {j}) = {x}");
            }
        }
    }

    #[test]
    fn co_watched_items_score_above_unrelated_ones() {
        // Items 0-9 are always watched together, 10-19 too; every user sees one block.
        let mut ratings = Vec::new();
        for u in 0..20u32 {
            let block = (u % 2) * 10;
            // Rotated, so every item is someone's history (not everyone's held-out item).
            for t in 0..10 {
                let item = block + (t + u) % 10;
                ratings.push(Rating { user: u, item, rating: 4.0, timestamp: i64::from(t) });
            }
        }
        let ml = MovieLens {
            user_ids: (0..20).collect(),
            movies: (0..150)
                .map(|i| Movie { item_id: i, title: String::new(), year: None, genres: vec![] })
                .collect(),
            ratings,
        };
        let split = Split::new(&ml, 1);
        let mut e = Ease::fit(&split, Stage::Test, 10.0);
        let s = e.score(0, &[9, 15, 100]);
        assert!(s[0] > s[1] && s[0] > s[2], "{s:?}");
        let q = evaluate(&split, &mut e, EvalOptions { stage: Stage::Test, full_ranking: true });
        assert_eq!(q.hr10, 1.0);
        let (trials, best) = tune(&split, &[1.0, 10.0]);
        assert_eq!(trials.len(), 2);
        assert!([1.0, 10.0].contains(&best));
    }
}
