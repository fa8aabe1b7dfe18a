//! Quality of what one federation round teaches, on MovieLens-100K, next to the baselines.
//! Tunes the collaborative vectors' rank and ridge and the TV's query (recency half-life,
//! whole-history weight) on the validation item, then reports the test item. `cargo run --release -p omega-e2e --example federation_quality`.
use omega_e2e::eval::federated::{FederatedScorer, round};
use omega_e2e::eval::{self, EvalOptions, Stage, popularity::Popularity, report};
use omega_e2e::movielens::MovieLens;
use omega_federation::collab::CollabConfig;
use omega_federation::privacy::DpParams;
use omega_federation::round::RoundConfig;
use omega_protocol::collab::QueryParams;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ml = MovieLens::load_default()?;
    let split = eval::Split::new(&ml, eval::DEFAULT_SEED);
    let val = EvalOptions { stage: Stage::Validation, full_ranking: false };
    let test = EvalOptions { stage: Stage::Test, full_ranking: true };
    // Rank and ridge of the round, and the TV's query (recency half-life, whole-history
    // weight), chosen together on the validation item.
    let half_lives = [1.0f32, 2.0, 3.0, 5.0, 8.0, f32::INFINITY];
    let mixes = [0.0f32, 0.5, 1.0];
    let mut best: Option<((f64, f64), CollabConfig, QueryParams)> = None;
    for dim in [16, 24, 32, 48] {
        for lambda_rel in [1.0, 2.0, 4.0, 8.0, 16.0] {
            let collab = CollabConfig { dim, lambda_rel, ..CollabConfig::default() };
            let cfg = RoundConfig { collab: Some(collab), ..RoundConfig::default() };
            let t = std::time::Instant::now();
            let out = round(&split, Stage::Validation, &cfg, "tune");
            let elapsed = t.elapsed();
            for &half_life in &half_lives {
                for &mix in &mixes {
                    let query = QueryParams { half_life, mix };
                    let mut s = FederatedScorer::new(
                        &split,
                        Stage::Validation,
                        &out.patterns,
                        cfg.min_sources,
                        &query,
                    );
                    let q = eval::evaluate(&split, &mut s, val);
                    println!(
                        "dim {dim} lambda_rel {lambda_rel} half_life {half_life} mix {mix}: val HR@10 {:.4} NDCG@10 {:.4} ({} contents, round {elapsed:?})",
                        q.hr10,
                        q.ndcg10,
                        s.covered(),
                    );
                    if best.as_ref().is_none_or(|b| (q.hr10, q.ndcg10) > b.0) {
                        best = Some(((q.hr10, q.ndcg10), collab, query));
                    }
                }
            }
        }
    }
    let (collab, query) = best.map(|b| (b.1, b.2)).unwrap_or_default();
    println!("chosen {collab:?} {query:?}");
    let cfg = RoundConfig { collab: Some(collab), ..RoundConfig::default() };
    let out = round(&split, Stage::Test, &cfg, "test");
    println!("round: {:?}", out.stats);
    // The uniform query (every watched content alike), for comparison.
    let uniform = QueryParams { half_life: f32::INFINITY, mix: 0.0 };
    let mut s_uniform = FederatedScorer::new(&split, Stage::Test, &out.patterns, 3, &uniform);
    let fed_uniform = eval::evaluate(&split, &mut s_uniform, test);
    // Popularity weight, chosen on the validation item.
    let val_out = round(&split, Stage::Validation, &cfg, "tune");
    let mut best_beta = (0.0f32, (0.0, 0.0));
    for beta in [0.0f32, 0.001, 0.003, 0.01, 0.03] {
        let mut s = FederatedScorer::new(&split, Stage::Validation, &val_out.patterns, 3, &query);
        s.popularity_weight = beta;
        let q = eval::evaluate(&split, &mut s, val);
        println!("popularity weight {beta}: val HR@10 {:.4} NDCG@10 {:.4}", q.hr10, q.ndcg10);
        if (q.hr10, q.ndcg10) > best_beta.1 {
            best_beta = (beta, (q.hr10, q.ndcg10));
        }
    }
    let mut scorer = FederatedScorer::new(&split, Stage::Test, &out.patterns, 3, &query);
    scorer.popularity_weight = best_beta.0;
    let uncovered =
        split.users.iter().filter_map(|u| u.test).filter(|r| !scorer.has(r.item)).count();
    println!("test items without a published vector (fewer than k fans): {uncovered}");
    let fed = eval::evaluate(&split, &mut scorer, test);
    // Diagnostic: the same round if every interaction, not only quality ones, were shared.
    let all_cfg = RoundConfig { min_quality: 0.0, ..cfg };
    let out_all = round(&split, Stage::Test, &all_cfg, "test-all");
    let mut s_all = FederatedScorer::new(&split, Stage::Test, &out_all.patterns, 3, &query);
    let fed_all = eval::evaluate(&split, &mut s_all, test);
    let mut dp_rows = vec![report::MethodRow {
        method: "diagnostic: federated over all interactions (min_quality 0)".into(),
        quality: fed_all,
    }];
    for (m, with_collab) in [(16, false), (4, true), (8, true), (16, true)] {
        let dp_cfg = RoundConfig {
            collab: with_collab.then_some(collab),
            dp: Some(DpParams { epsilon: 8.0, delta: 1e-6, max_groups_per_device: m }),
            ..RoundConfig::default()
        };
        let out_dp = round(&split, Stage::Test, &dp_cfg, "test-dp");
        println!("dp round m={m} collab={with_collab}: {:?} {:?}", out_dp.stats, out_dp.privacy);
        let mut dp_scorer = FederatedScorer::new(&split, Stage::Test, &out_dp.patterns, 3, &query);
        let q = eval::evaluate(&split, &mut dp_scorer, test);
        let what = if with_collab { "collaborative" } else { "profiles, stand-in embeddings" };
        dp_rows.push(report::MethodRow {
            method: format!("federated_dp (m = {m}, {what})"),
            quality: q,
        });
    }
    let pop = eval::evaluate(&split, &mut Popularity::fit(&split, Stage::Test), test);
    let rows = vec![
        report::MethodRow { method: "popularity".into(), quality: pop },
        report::MethodRow { method: "federated (one round, offline)".into(), quality: fed },
        report::MethodRow {
            method: "federated, uniform query (no recency)".into(),
            quality: fed_uniform,
        },
    ];
    let rows: Vec<report::MethodRow> = rows.into_iter().chain(dp_rows).collect();
    print!("{}", report::markdown_table(&rows));
    Ok(())
}
