//! Popularity and tuned centralised MF on MovieLens-100K (the harness alone, no devices).
use omega_e2e::eval::{self, EvalOptions, Stage, mf, popularity::Popularity, report};
use omega_e2e::movielens::MovieLens;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ml = MovieLens::load_default()?;
    let split = eval::Split::new(&ml, eval::DEFAULT_SEED);
    let opts = EvalOptions { stage: Stage::Test, full_ranking: true };
    let pop = eval::evaluate(&split, &mut Popularity::fit(&split, Stage::Test), opts);
    let t = std::time::Instant::now();
    let mut tuned = mf::tune(&split, &mf::default_grid(7), 60, 5);
    for tr in &tuned.trials {
        println!(
            "{:?} -> val hr {:.4} ndcg {:.4}",
            tr.config, tr.validation.hr10, tr.validation.ndcg10
        );
    }
    println!("best {:?} in {:?}", tuned.best, t.elapsed());
    let mfq = eval::evaluate(&split, &mut tuned.model, opts);
    let rows = vec![
        report::MethodRow { method: "popularity".into(), quality: pop },
        report::MethodRow { method: "centralized_mf".into(), quality: mfq },
    ];
    print!("{}", report::markdown_table(&rows));
    Ok(())
}
