//! Centralised matrix factorisation: the baseline that sees every user's data pooled.
//!
//! Implicit feedback with sampled negatives, either BPR (pairwise) or binary cross-entropy
//! with `negatives` sampled non-interacted items per positive (the NCF/GMF recipe). Plain
//! SGD with L2 regularisation; deterministic for a seed. [`tune`] picks the hyper-parameters
//! (learning rate, dimension, penalty) and the number of epochs on the **validation** item
//! only, then refits on train + validation to score the test item.

use super::{EvalOptions, Quality, Scorer, Split, Stage, evaluate};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Bayesian personalised ranking: log-sigmoid of positive minus negative score.
    Bpr,
    /// Binary cross-entropy on the positive and each sampled negative.
    Bce,
}

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MfConfig {
    /// Latent dimension.
    pub dim: usize,
    /// SGD step.
    pub lr: f32,
    /// L2 penalty.
    pub reg: f32,
    /// Passes over the positives.
    pub epochs: usize,
    /// Sampled negatives per positive.
    pub negatives: usize,
    /// Objective.
    pub loss: Loss,
    /// Seed of initialisation and sampling.
    pub seed: u64,
}

impl Default for MfConfig {
    fn default() -> Self {
        MfConfig {
            dim: 32,
            lr: 0.05,
            reg: 0.01,
            epochs: 30,
            negatives: 4,
            loss: Loss::Bce,
            seed: 7,
        }
    }
}

/// A fitted model: user and item factors plus item biases.
#[derive(Debug, Clone)]
pub struct Mf {
    dim: usize,
    users: Vec<f32>,
    items: Vec<f32>,
    bias: Vec<f32>,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Training state: the model plus what sampling needs.
struct Trainer {
    mf: Mf,
    cfg: MfConfig,
    positives: Vec<(u32, u32)>,
    seen: Vec<HashSet<u32>>,
    n_items: u32,
    rng: StdRng,
}

impl Trainer {
    fn new(split: &Split, stage: Stage, cfg: MfConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let n_users = split.users.len();
        let mut init = |n: usize| -> Vec<f32> {
            (0..n * cfg.dim).map(|_| rng.random_range(-0.05f32..0.05)).collect()
        };
        let mf = Mf {
            dim: cfg.dim,
            users: init(n_users),
            items: init(split.n_items),
            bias: vec![0.0; split.n_items],
        };
        let mut seen = vec![HashSet::new(); n_users];
        let mut positives = Vec::new();
        for (u, us) in split.users.iter().enumerate() {
            for r in us.history(stage) {
                if seen[u].insert(r.item) {
                    positives.push((u as u32, r.item));
                }
            }
        }
        Trainer { mf, cfg, positives, seen, n_items: split.n_items as u32, rng }
    }

    fn negative(&mut self, u: u32) -> u32 {
        loop {
            let j = self.rng.random_range(0..self.n_items);
            if !self.seen[u as usize].contains(&j) {
                return j;
            }
        }
    }

    fn epoch(&mut self) {
        let mut order = std::mem::take(&mut self.positives);
        order.shuffle(&mut self.rng);
        for &(u, i) in &order {
            match self.cfg.loss {
                Loss::Bce => {
                    self.step_bce(u, i, 1.0);
                    for _ in 0..self.cfg.negatives {
                        let j = self.negative(u);
                        self.step_bce(u, j, 0.0);
                    }
                }
                Loss::Bpr => {
                    for _ in 0..self.cfg.negatives.max(1) {
                        let j = self.negative(u);
                        self.step_bpr(u, i, j);
                    }
                }
            }
        }
        self.positives = order;
    }

    fn step_bce(&mut self, u: u32, i: u32, label: f32) {
        let (d, lr, reg) = (self.cfg.dim, self.cfg.lr, self.cfg.reg);
        let g = label - sigmoid(self.mf.raw(u, i));
        let (pu, qi) = (u as usize * d, i as usize * d);
        for k in 0..d {
            let p = self.mf.users[pu + k];
            let q = self.mf.items[qi + k];
            self.mf.users[pu + k] += lr * (g * q - reg * p);
            self.mf.items[qi + k] += lr * (g * p - reg * q);
        }
        self.mf.bias[i as usize] += lr * (g - reg * self.mf.bias[i as usize]);
    }

    fn step_bpr(&mut self, u: u32, i: u32, j: u32) {
        let (d, lr, reg) = (self.cfg.dim, self.cfg.lr, self.cfg.reg);
        let g = sigmoid(-(self.mf.raw(u, i) - self.mf.raw(u, j)));
        let (pu, qi, qj) = (u as usize * d, i as usize * d, j as usize * d);
        for k in 0..d {
            let p = self.mf.users[pu + k];
            let a = self.mf.items[qi + k];
            let b = self.mf.items[qj + k];
            self.mf.users[pu + k] += lr * (g * (a - b) - reg * p);
            self.mf.items[qi + k] += lr * (g * p - reg * a);
            self.mf.items[qj + k] += lr * (-g * p - reg * b);
        }
        self.mf.bias[i as usize] += lr * (g - reg * self.mf.bias[i as usize]);
        self.mf.bias[j as usize] += lr * (-g - reg * self.mf.bias[j as usize]);
    }
}

impl Mf {
    fn raw(&self, u: u32, i: u32) -> f32 {
        let (d, pu, qi) = (self.dim, u as usize * self.dim, i as usize * self.dim);
        let dot: f32 =
            self.users[pu..pu + d].iter().zip(&self.items[qi..qi + d]).map(|(a, b)| a * b).sum();
        dot + self.bias[i as usize]
    }

    /// Fits on the interactions of `stage` for `cfg.epochs` epochs.
    pub fn fit(split: &Split, stage: Stage, cfg: MfConfig) -> Self {
        let mut t = Trainer::new(split, stage, cfg);
        for _ in 0..cfg.epochs {
            t.epoch();
        }
        t.mf
    }
}

impl Scorer for Mf {
    fn score(&mut self, user: u32, items: &[u32]) -> Vec<f32> {
        items.iter().map(|&i| self.raw(user, i)).collect()
    }
}

/// One configuration tried during tuning and its validation quality.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Configuration (with the best epoch count for it).
    pub config: MfConfig,
    /// Validation HR@10 / NDCG@10.
    pub validation: Quality,
}

/// Tuning result: every trial, the chosen configuration and the refitted model.
#[derive(Debug, Clone)]
pub struct Tuned {
    /// Trials in the order they ran.
    pub trials: Vec<Trial>,
    /// Configuration with the best validation HR@10 (NDCG@10 breaks ties).
    pub best: MfConfig,
    /// The model refitted on train + validation with `best`.
    pub model: Mf,
}

/// How long [`tune`] trains each configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TuneOptions {
    /// Most epochs a configuration trains.
    pub max_epochs: usize,
    /// Validation check every this many epochs (the best check picks the epoch count).
    pub check_every: usize,
    /// Stop a configuration after this many checks without a better validation HR@10.
    pub patience: usize,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions { max_epochs: 100, check_every: 5, patience: 3 }
    }
}

/// Grid search over `grid` on the validation item, configurations in parallel, each trained
/// for up to `opts.max_epochs` epochs and checked every `opts.check_every` epochs (the best
/// check picks its epoch count, early stopping after `opts.patience` checks without
/// progress); then a refit on train + validation.
pub fn tune(split: &Split, grid: &[MfConfig], opts: TuneOptions) -> Tuned {
    let trials = search(split, grid, opts);
    let best = best_of(&trials).map(|t| t.config).unwrap_or_default();
    let model = Mf::fit(split, Stage::Test, best);
    Tuned { trials, best, model }
}

fn better(a: &Quality, b: &Quality) -> bool {
    (a.hr10, a.ndcg10) > (b.hr10, b.ndcg10)
}

/// The trial with the best validation HR@10 (NDCG@10 breaks ties; the first of equals).
pub fn best_of(trials: &[Trial]) -> Option<Trial> {
    trials.iter().fold(None::<Trial>, |acc, t| match acc {
        Some(a) if !better(&t.validation, &a.validation) => Some(a),
        _ => Some(*t),
    })
}

/// The validation search of [`tune`] without the refit: the best check of every
/// configuration, in grid order.
pub fn search(split: &Split, grid: &[MfConfig], opts: TuneOptions) -> Vec<Trial> {
    let val = EvalOptions { stage: Stage::Validation, full_ranking: false };
    grid.par_iter()
        .filter_map(|&cfg| {
            let mut t = Trainer::new(split, Stage::Validation, cfg);
            let mut best: Option<Trial> = None;
            let mut since_best = 0;
            for epoch in 1..=opts.max_epochs {
                t.epoch();
                if epoch.is_multiple_of(opts.check_every.max(1)) || epoch == opts.max_epochs {
                    let q = evaluate(split, &mut t.mf, val);
                    if best.as_ref().is_none_or(|b| better(&q, &b.validation)) {
                        best = Some(Trial {
                            config: MfConfig { epochs: epoch, ..cfg },
                            validation: q,
                        });
                        since_best = 0;
                    } else {
                        since_best += 1;
                        if since_best >= opts.patience.max(1) {
                            break;
                        }
                    }
                }
            }
            best
        })
        .collect()
}

/// The grid the full evaluation searches for one loss: learning rate × dimension × L2
/// penalty (36 configurations; the epoch count is searched inside each, every 5 epochs up to
/// 100, with early stopping).
pub fn search_grid(loss: Loss, seed: u64) -> Vec<MfConfig> {
    let mut grid = Vec::new();
    for lr in [0.01, 0.03, 0.1] {
        for dim in [32, 64, 128] {
            for reg in [0.001, 0.003, 0.01, 0.03] {
                grid.push(MfConfig { dim, lr, reg, loss, seed, ..MfConfig::default() });
            }
        }
    }
    grid
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::movielens::{Movie, MovieLens, Rating};

    /// Two taste groups: users of group g interact with items of block g, in random order.
    fn two_groups() -> Split {
        let mut rng = StdRng::seed_from_u64(1);
        let mut ratings = Vec::new();
        for u in 0..60u32 {
            let block = (u % 2) * 100;
            let mut items: Vec<u32> = (0..100).map(|i| block + i).collect();
            items.shuffle(&mut rng);
            for (t, &item) in items.iter().take(20).enumerate() {
                ratings.push(Rating { user: u, item, rating: 4.0, timestamp: t as i64 });
            }
        }
        let ml = MovieLens {
            user_ids: (0..60).collect(),
            movies: (0..400)
                .map(|i| Movie { item_id: i, title: String::new(), year: None, genres: vec![] })
                .collect(),
            ratings,
        };
        Split::new(&ml, 5)
    }

    #[test]
    fn both_losses_learn_block_structure_far_above_random() {
        let split = two_groups();
        let opts = EvalOptions { stage: Stage::Test, full_ranking: true };
        for loss in [Loss::Bce, Loss::Bpr] {
            let cfg = MfConfig { dim: 8, epochs: 40, loss, ..MfConfig::default() };
            let q = evaluate(&split, &mut Mf::fit(&split, Stage::Test, cfg), opts);
            // Random would be 0.1; the right block holds about a third of the unseen items.
            assert!(q.hr10 > 0.5, "{loss:?}: {q:?}");
        }
    }

    #[test]
    fn fitting_is_deterministic_for_a_seed() {
        let split = two_groups();
        let cfg = MfConfig { dim: 4, epochs: 3, ..MfConfig::default() };
        let a = Mf::fit(&split, Stage::Test, cfg).score(0, &[1, 2, 3]);
        let b = Mf::fit(&split, Stage::Test, cfg).score(0, &[1, 2, 3]);
        assert_eq!(a, b);
    }

    #[test]
    fn tuning_selects_on_validation_and_records_the_epoch() {
        let split = two_groups();
        let grid = [
            MfConfig { dim: 8, reg: 0.01, ..MfConfig::default() },
            MfConfig { dim: 8, lr: 0.0, ..MfConfig::default() }, // never learns
        ];
        let opts = TuneOptions { max_epochs: 20, check_every: 5, patience: 2 };
        let tuned = tune(&split, &grid, opts);
        assert_eq!(tuned.trials.len(), 2);
        assert_eq!(tuned.best.lr, 0.05);
        assert!(tuned.best.epochs.is_multiple_of(5) && tuned.best.epochs <= 20);
        // The learner that never learns stops early: it never beats its first check.
        assert_eq!(tuned.trials[1].config.epochs, 5);
        assert_eq!(search_grid(Loss::Bpr, 1).len(), 36);
    }
}
