//! The centralised baselines on MovieLens-100K (the harness alone, no devices): MF (BPR and
//! BCE) and EASE searched on the validation item, then every offline method on the test item.
//! `cargo run --release -p omega-e2e --example baselines [-- item-index]`.
use omega_e2e::eval::mf::TuneOptions;
use omega_e2e::eval::{self, Quality, Stage, Ties, report, suite};
use omega_e2e::movielens::MovieLens;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ties = match std::env::args().nth(1).as_deref() {
        Some("item-index") => Ties::ItemIndex,
        _ => Ties::FileOrder,
    };
    let ml = MovieLens::load_default()?;
    let split = eval::Split::with_ties(&ml, eval::DEFAULT_SEED, ties);
    let t = std::time::Instant::now();
    let command = format!("cargo run --release -p omega-e2e --example baselines -- {ties}");
    let (chosen, selection) =
        suite::select(&split, &suite::recorded().0, TuneOptions::default(), &command);
    for s in &selection {
        println!(
            "{}: {} ({} configurations, {:?})",
            s.what, s.chosen, s.configurations, s.validation_hr10
        );
    }
    println!("search took {:?}", t.elapsed());
    let runs = suite::run_seed(&split, &chosen, Stage::Test, eval::DEFAULT_SEED, 3);
    let rows: Vec<report::MethodRow> = runs
        .iter()
        .map(|(m, q)| report::MethodRow { method: m.clone(), quality: Quality::mean_of(q) })
        .collect();
    print!("{}", report::markdown_table(&rows));
    Ok(())
}
