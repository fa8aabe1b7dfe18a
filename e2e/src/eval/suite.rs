//! The centralised baselines and the offline federated round, seed by seed, in parallel:
//! what `omega-sim` runs next to its simulated fleet.
//!
//! Every hyper-parameter is chosen on the **validation** item: either in the run ([`select`],
//! `omega-sim --tune`, which the full evaluation does) or by an earlier such run whose choice is
//! recorded here ([`recorded`]) with the command that made it. Each choice is reported as a
//! [`Selection`]; `split` is always `validation`.

use super::ease::{self, Ease};
use super::federated::{FederatedScorer, round};
use super::mf::{self, Loss, Mf, MfConfig, TuneOptions};
use super::popularity::Popularity;
use super::reference::CentralReference;
use super::{EvalOptions, Split, Stage, UserQuality, evaluate_per_user};
use omega_federation::collab::CollabConfig;
use omega_federation::round::RoundConfig;
use omega_protocol::collab::QueryParams;
use rayon::prelude::*;
use serde::Serialize;

/// The command whose validation search chose the recorded MF (both losses) and EASE
/// settings: the `baselines` example (file-order ties, 943 users, searched on seed 42's
/// validation item; 36 MF configurations per loss with early-stopped epochs, 8 EASE λ).
pub const BASELINES_SELECTION_COMMAND: &str =
    "cargo run --release -p omega-e2e --example baselines -- file-order 5";

/// The command that chose the federated scorer's round rank, ridge and query.
pub const FEDERATED_SELECTION_COMMAND: &str =
    "cargo run --release -p omega-e2e --example federation_quality (item-index ties)";

/// One hyper-parameter choice and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Selection {
    /// What was chosen (a method's hyper-parameters).
    pub what: String,
    /// The choice.
    pub chosen: String,
    /// The held-out item the choice was made on: always `validation`.
    pub split: Stage,
    /// Configurations compared.
    pub configurations: usize,
    /// Validation HR@10 of the choice, when measured in this run.
    pub validation_hr10: Option<f64>,
    /// The command that made the choice.
    pub command: String,
}

/// Hyper-parameters of every offline method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chosen {
    /// MF with BPR.
    pub mf_bpr: MfConfig,
    /// MF with binary cross-entropy.
    pub mf_bce: MfConfig,
    /// The MF loss that did better on validation (the paired comparison's MF).
    pub mf_best: Loss,
    /// EASE's ridge.
    pub ease_lambda: f64,
    /// The round's collaborative vectors (federated, offline round and central reference).
    pub collab: CollabConfig,
    /// The TV's query.
    pub query: QueryParams,
}

/// The settings a run uses without `--tune`, each with the record of the validation search
/// that chose it: MF (both losses) and EASE by [`BASELINES_SELECTION_COMMAND`], the round and
/// query by [`FEDERATED_SELECTION_COMMAND`]. A `--tune` run searches MF and EASE again.
pub fn recorded() -> (Chosen, Vec<Selection>) {
    let mf_bpr = MfConfig {
        dim: 64,
        lr: 0.03,
        reg: 0.01,
        epochs: 30,
        negatives: 4,
        loss: Loss::Bpr,
        seed: 0,
    };
    let mf_bce = MfConfig {
        dim: 128,
        lr: 0.01,
        reg: 0.01,
        epochs: 65,
        negatives: 4,
        loss: Loss::Bce,
        seed: 0,
    };
    let chosen = Chosen {
        mf_bpr,
        mf_bce,
        // BCE's validation HR@10 (0.7105) was above BPR's (0.7084) in that search.
        mf_best: Loss::Bce,
        ease_lambda: ease::CHOSEN_LAMBDA,
        collab: CollabConfig::default(),
        query: QueryParams::default(),
    };
    let sel = |what: &str, chosen: String, configurations: usize, command: &str| Selection {
        what: what.into(),
        chosen,
        split: Stage::Validation,
        configurations,
        validation_hr10: None,
        command: command.into(),
    };
    let mf_configurations = mf::search_grid(Loss::Bpr, 0).len();
    let selections = vec![
        sel("mf_bpr", describe_mf(&mf_bpr), mf_configurations, BASELINES_SELECTION_COMMAND),
        sel("mf_bce", describe_mf(&mf_bce), mf_configurations, BASELINES_SELECTION_COMMAND),
        sel(
            "ease",
            format!("lambda {}", ease::CHOSEN_LAMBDA),
            ease::DEFAULT_LAMBDAS.len(),
            BASELINES_SELECTION_COMMAND,
        ),
        sel(
            "federated (round rank and ridge, TV query)",
            describe_federated(&chosen.collab, &chosen.query),
            20 * 18,
            FEDERATED_SELECTION_COMMAND,
        ),
    ];
    (chosen, selections)
}

fn describe_mf(c: &MfConfig) -> String {
    format!(
        "{:?}, dim {}, lr {}, L2 {}, {} epochs, {} negatives",
        c.loss, c.dim, c.lr, c.reg, c.epochs, c.negatives
    )
}

fn describe_federated(c: &CollabConfig, q: &QueryParams) -> String {
    format!("rank {}, lambda_rel {}, half-life {}, mix {}", c.dim, c.lambda_rel, q.half_life, q.mix)
}

/// Searches MF (both losses) and EASE on the validation item of `split` (fit on train only),
/// in parallel; the federated scorer keeps `base`'s round and query (chosen by
/// [`FEDERATED_SELECTION_COMMAND`]). `command` is recorded in the selections.
pub fn select(
    split: &Split,
    base: &Chosen,
    opts: TuneOptions,
    command: &str,
) -> (Chosen, Vec<Selection>) {
    let ((bpr, bce), (ease_trials, lambda)) = rayon::join(
        || rayon::join(|| mf_search(split, Loss::Bpr, opts), || mf_search(split, Loss::Bce, opts)),
        || ease::tune(split, &ease::DEFAULT_LAMBDAS),
    );
    let ease_hr = ease_trials.iter().find(|t| t.lambda == lambda).map(|t| t.validation.hr10);
    let mf_best = if (bpr.1.hr10, bpr.1.ndcg10) >= (bce.1.hr10, bce.1.ndcg10) {
        Loss::Bpr
    } else {
        Loss::Bce
    };
    let chosen = Chosen { mf_bpr: bpr.0, mf_bce: bce.0, mf_best, ease_lambda: lambda, ..*base };
    let sel = |what: &str, chosen: String, configurations: usize, hr: Option<f64>| Selection {
        what: what.into(),
        chosen,
        split: Stage::Validation,
        configurations,
        validation_hr10: hr,
        command: command.into(),
    };
    let (_, recorded_sel) = recorded();
    let mut selections = vec![
        sel("mf_bpr", describe_mf(&bpr.0), bpr.2, Some(bpr.1.hr10)),
        sel("mf_bce", describe_mf(&bce.0), bce.2, Some(bce.1.hr10)),
        sel("ease", format!("lambda {lambda}"), ease_trials.len(), ease_hr),
    ];
    selections.extend(recorded_sel.into_iter().filter(|s| s.what.starts_with("federated")));
    (chosen, selections)
}

/// The best configuration of `loss` on validation, its validation quality and how many
/// configurations were compared.
fn mf_search(split: &Split, loss: Loss, opts: TuneOptions) -> (MfConfig, super::Quality, usize) {
    let trials = mf::search(split, &mf::search_grid(loss, 0), opts);
    let best = mf::best_of(&trials);
    (
        best.map_or_else(
            || match loss {
                Loss::Bpr => recorded().0.mf_bpr,
                Loss::Bce => recorded().0.mf_bce,
            },
            |t| t.config,
        ),
        best.map(|t| t.validation).unwrap_or_default(),
        trials.len(),
    )
}

/// One method's per-user results.
pub type MethodRun = (String, Vec<UserQuality>);

/// Runs every offline method on `split` (one seed), in parallel: popularity, MF (BPR, BCE),
/// EASE, the central reference and the offline federated round (k = `min_sources`). Fits on
/// the interactions of `holdout` and ranks its item. `seed` seeds MF. With `dp` (the total
/// (ε, δ) of the DP pass), also `popularity_dp` at that budget.
pub fn run_seed(
    split: &Split,
    chosen: &Chosen,
    holdout: Stage,
    seed: u64,
    min_sources: u32,
    dp: Option<(f64, f64)>,
) -> Vec<MethodRun> {
    let opts = EvalOptions { stage: holdout, full_ranking: true };
    let mut methods =
        vec!["popularity", "mf_bpr", "mf_bce", "ease", "central_reference", "federated_offline"];
    if dp.is_some() {
        methods.push("popularity_dp");
    }
    methods
        .par_iter()
        .map(|&m| {
            let q = match (m, dp) {
                ("popularity", _) => {
                    evaluate_per_user(split, &mut Popularity::fit(split, holdout), opts)
                }
                ("popularity_dp", Some((e, d))) => {
                    let mut p = Popularity::fit_dp(split, holdout, e, d, seed);
                    evaluate_per_user(split, &mut p, opts)
                }
                ("mf_bpr" | "mf_bce", _) => {
                    let cfg = if m == "mf_bpr" { chosen.mf_bpr } else { chosen.mf_bce };
                    let mut model = Mf::fit(split, holdout, MfConfig { seed, ..cfg });
                    evaluate_per_user(split, &mut model, opts)
                }
                ("ease", _) => evaluate_per_user(
                    split,
                    &mut Ease::fit(split, holdout, chosen.ease_lambda),
                    opts,
                ),
                ("central_reference", _) => {
                    let mut r =
                        CentralReference::fit(split, holdout, &chosen.collab, &chosen.query);
                    evaluate_per_user(split, &mut r, opts)
                }
                _ => {
                    let cfg = RoundConfig {
                        min_sources,
                        collab: Some(chosen.collab),
                        ..RoundConfig::default()
                    };
                    let out = round(split, holdout, &cfg, &format!("offline-{seed}"));
                    let mut s = FederatedScorer::new(
                        split,
                        holdout,
                        &out.patterns,
                        min_sources,
                        &chosen.query,
                    );
                    evaluate_per_user(split, &mut s, opts)
                }
            };
            (m.to_string(), q)
        })
        .collect()
}
