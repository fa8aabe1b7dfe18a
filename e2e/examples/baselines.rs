//! The centralised baselines and the offline round on MovieLens-100K (the harness alone, no
//! devices): MF (BPR and BCE) and EASE searched on the validation item of the first seed, then
//! every offline method on the test item of each seed, mean ± 95 % interval over seeds.
//! `cargo run --release -p omega-e2e --example baselines [-- file-order|item-index [SEEDS
//! [recorded]]]`: `recorded` skips the search and uses the settings `eval::suite` records.
use omega_e2e::eval::mf::TuneOptions;
use omega_e2e::eval::stats::{self, Metric};
use omega_e2e::eval::{self, Stage, Ties, suite};
use omega_e2e::movielens::MovieLens;
use std::collections::BTreeMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ties = match std::env::args().nth(1).as_deref() {
        Some("item-index") => Ties::ItemIndex,
        _ => Ties::FileOrder,
    };
    let n_seeds: u64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let ml = MovieLens::load_default()?;
    let seeds: Vec<u64> = (0..n_seeds).map(|i| eval::DEFAULT_SEED + i).collect();
    let splits: Vec<eval::Split> =
        seeds.iter().map(|&s| eval::Split::with_ties(&ml, s, ties)).collect();
    let t = std::time::Instant::now();
    let command =
        format!("cargo run --release -p omega-e2e --example baselines -- {ties} {n_seeds}");
    let (chosen, selection) = if std::env::args().nth(3).as_deref() == Some("recorded") {
        suite::recorded()
    } else {
        suite::select(&splits[0], &suite::recorded().0, TuneOptions::default(), &command)
    };
    for s in &selection {
        println!(
            "{}: {} ({} configurations, validation HR@10 {:?})",
            s.what, s.chosen, s.configurations, s.validation_hr10
        );
    }
    println!("search took {:.0} s", t.elapsed().as_secs_f64());
    let mut runs: BTreeMap<String, Vec<Vec<eval::UserQuality>>> = BTreeMap::new();
    for (split, &seed) in splits.iter().zip(&seeds) {
        for (m, q) in suite::run_seed(split, &chosen, Stage::Test, seed, 3, None) {
            runs.entry(m).or_default().push(q);
        }
    }
    println!("{ties} ties, seeds {seeds:?}, {:.0} s in all", t.elapsed().as_secs_f64());
    println!("| method | HR@10 | NDCG@10 | full HR@10 | full NDCG@10 |\n|---|---:|---:|---:|---:|");
    for (m, r) in &runs {
        let i = |metric| stats::over_seeds(r, metric);
        println!(
            "| {m} | {} | {} | {} | {} |",
            i(Metric::Hr10),
            i(Metric::Ndcg10),
            i(Metric::FullHr10),
            i(Metric::FullNdcg10)
        );
    }
    Ok(())
}
