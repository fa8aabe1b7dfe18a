//! `omega-sim`: a constellation on one machine. Shard servers run in-process and listen on
//! loopback gRPC; one virtual TV per MovieLens-100K user, each a real [`Brain`] with the real
//! MiniLM model (one loaded model and one embedding cache shared by all TVs) and its own
//! SQLite file, replays the user's ratings in time order as viewing events, syncs on the
//! jittered 5-15 minute schedule in simulated time, and federation rounds run on the hour.
//! At the end every method is evaluated by the same harness ([`crate::eval`]).
//!
//! Simulated time. A TV is *on* from each of its viewing events until `session_hours` after
//! it; while on it syncs every 5-15 minutes (uniform jitter, the interval the shard hands out
//! at registration). After the last rating of the data set every TV is switched on once more
//! for `eval_hours` (the evening after), still syncing on schedule, and then asked to rank
//! its user's held-out item. Federation rounds run at every full simulated hour at which the
//! shards hold at least `round_min_growth` more pushed patterns than at the last round (an
//! hour without enough new data is idle and skipped; ML-100K has 2,222 hours with ratings
//! spread over 215 days, and a round reads everything).
//!
//! Methods, one run, each over `seeds` seeds (negatives, MF's initialisation and sampling,
//! the sync jitter): `popularity`, `popularity_dp` (one Gaussian release of per-user
//! normalised counts at the DP pass's whole budget), `mf_bpr`, `mf_bce`, `ease` (full rank),
//! `central_reference` (the federated scorer fitted centrally) and `federated_offline` (one
//! round in-process, every vector held), all from [`crate::eval::suite`] on a thread of their
//! own (rayon inside) while the fleet runs; `local_only` (a twin brain per user that never
//! syncs), `federated` (the syncing TVs, k-anonymity on) and `federated_dp` (a second pass
//! with fresh shards and TVs whose rounds add Gaussian noise: `dp_releases` rounds, evenly
//! spaced over the replay, that together spend the pass's (ε, δ) per device). The report
//! gives every metric as mean ± 95 % interval ([`crate::eval::stats`]) and paired
//! comparisons of `federated` with its central reference and with the better MF.

mod pass;

use crate::eval::federated::{content_id, watch_fraction};
use crate::eval::mf::{Loss, TuneOptions};
use crate::eval::stats::{self, Interval, Metric, Paired};
use crate::eval::suite::{self, Chosen, Selection};
use crate::eval::{self, Quality, Split, Stage, Ties, UserQuality};
use crate::movielens::{MovieLens, MovieLensError};
use indicatif::{MultiProgress, ProgressDrawTarget};
use omega_device::{Catalogue, CatalogueItem, DeviceError, Embedder, EmbedderConfig};
use omega_protocol::{ContentType, ViewingEvent};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use pass::{PassOutcome, RoundPoint, Transport};

/// What can stop a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// MovieLens could not be loaded.
    #[error(transparent)]
    MovieLens(#[from] MovieLensError),
    /// The brain, its model or its sync client failed.
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    /// A shard server could not start.
    #[error("shard server: {0}")]
    Shard(String),
    /// The file system refused.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
}

/// How a simulation runs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Only the first N users (all when `None`).
    pub users: Option<usize>,
    /// Shard servers (devices are spread round-robin).
    pub shards: usize,
    /// Postgres for the shard (one shard only); the embedded store otherwise.
    pub database_url: Option<String>,
    /// First seed of the negative draw, sync jitter and MF; seed `i` of `seeds` is
    /// `seed + i`.
    pub seed: u64,
    /// Seeds every method runs with.
    pub seeds: usize,
    /// Seeds whose fleets run at the same time.
    pub parallel_seeds: usize,
    /// How equal timestamps are ordered in the leave-one-out split.
    pub ties: Ties,
    /// The held-out item ranked: `Test` for reported numbers, `Validation` (fit on train
    /// only) to choose a setting of the TVs or the federation.
    pub holdout: Stage,
    /// Search the baselines' hyper-parameters on the validation item in this run (otherwise
    /// `chosen` is used as given).
    pub tune: bool,
    /// The command line, recorded in the report's selections when `tune` is on.
    pub command: String,
    /// How long a TV stays on after a viewing event.
    pub session_hours: f64,
    /// How long every TV is on after the replay, before it is evaluated.
    pub eval_hours: f64,
    /// Simulated hours between rounds.
    pub round_every_hours: f64,
    /// Growth of the pushed patterns since the last round below which an hour is idle.
    pub round_min_growth: f64,
    /// k of k-anonymity.
    pub min_sources: u32,
    /// Run the DP pass: the (ε, δ) per device it spends in total over the whole simulated
    /// period, split evenly between `dp_releases` rounds.
    pub dp: Option<(f64, f64)>,
    /// Rounds (releases) of the DP pass, evenly spaced over the replay's events, the last one
    /// just after the replay (so the TVs fetch it in the evaluation evening).
    pub dp_releases: u32,
    /// Hyper-parameters of the centralised baselines and the federated scorer.
    pub chosen: Chosen,
    /// Where the TVs' SQLite files go (a fresh temporary directory when `None`).
    pub data_dir: Option<PathBuf>,
    /// Users evaluated after every round for the quality-per-round curve.
    pub curve_users: usize,
    /// Draw progress bars.
    pub progress: bool,
    /// The TVs' learning and ranking parameters.
    pub ranking: omega_device::RankingParams,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            users: None,
            shards: 1,
            database_url: None,
            seed: eval::DEFAULT_SEED,
            seeds: 1,
            parallel_seeds: 2,
            ties: Ties::FileOrder,
            holdout: Stage::Test,
            tune: false,
            command: "omega-sim".into(),
            session_hours: 2.0,
            eval_hours: 6.0,
            round_every_hours: 1.0,
            round_min_growth: 0.02,
            min_sources: 3,
            dp: Some((8.0, 1e-6)),
            dp_releases: 1,
            chosen: suite::recorded().0,
            data_dir: None,
            curve_users: 200,
            progress: true,
            ranking: omega_device::RankingParams::default(),
        }
    }
}

impl SimConfig {
    fn check(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Config(m.into()));
        if self.shards == 0 || self.shards > 16 {
            return bad("--shards must be 1..=16");
        }
        if self.database_url.is_some() && self.shards != 1 {
            return bad("--database-url runs one shard (use --shards 1)");
        }
        if !(self.session_hours > 0.0 && self.eval_hours > 0.0 && self.round_every_hours > 0.0) {
            return bad("--session-hours, --eval-hours and --round-every-hours must be > 0");
        }
        if !(0.0..=10.0).contains(&self.round_min_growth) {
            return bad("--round-min-growth must be in 0..=10");
        }
        if !(1..=1000).contains(&self.dp_releases) {
            return bad("--dp-releases must be 1..=1000");
        }
        if let Some((e, d)) = self.dp
            && !(e > 0.0 && e.is_finite() && d > 0.0 && d < 1.0)
        {
            return bad("--epsilon must be > 0 and --delta in (0, 1)");
        }
        if self.min_sources == 0 {
            return bad("--min-sources must be >= 1");
        }
        if self.users == Some(0) {
            return bad("--users must be >= 1");
        }
        if !(1..=20).contains(&self.seeds) {
            return bad("--seeds must be 1..=20");
        }
        if self.tune && self.holdout == Stage::Validation {
            return bad("--tune selects on the validation item; it cannot also report it");
        }
        Ok(())
    }
}

/// One method over all seeds.
#[derive(Debug, Clone, Serialize)]
pub struct MethodSummary {
    /// Method name.
    pub method: String,
    /// Sampled HR@10, mean ± 95 % interval.
    pub hr10: Interval,
    /// Sampled NDCG@10.
    pub ndcg10: Interval,
    /// Full-ranking HR@10.
    pub full_hr10: Interval,
    /// Full-ranking NDCG@10.
    pub full_ndcg10: Interval,
    /// Sampled HR@10 of each seed, in seed order.
    pub hr10_per_seed: Vec<f64>,
}

/// `a` against `b`, user by user.
#[derive(Debug, Clone, Serialize)]
pub struct PairedRow {
    /// The first method.
    pub a: String,
    /// The method it is compared with.
    pub b: String,
    /// Sampled HR@10, a − b.
    pub hr10: Paired,
    /// Sampled NDCG@10, a − b.
    pub ndcg10: Paired,
    /// Full-ranking HR@10, a − b.
    pub full_hr10: Paired,
}

/// The JSON report (`omega-sim --json`).
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// Sampled HR@10 per method (mean over seeds).
    pub hr10: BTreeMap<String, f64>,
    /// Sampled NDCG@10 per method (mean over seeds).
    pub ndcg10: BTreeMap<String, f64>,
    /// Full-ranking HR@10 per method (mean over seeds).
    pub full_hr10: BTreeMap<String, f64>,
    /// Full-ranking NDCG@10 per method (mean over seeds).
    pub full_ndcg10: BTreeMap<String, f64>,
    /// Every method with its intervals, in table order.
    pub methods: Vec<MethodSummary>,
    /// Paired comparisons.
    pub paired: Vec<PairedRow>,
    /// How every hyper-parameter was chosen (always on the validation item).
    pub selection: Vec<Selection>,
    /// Tie rule of the split.
    pub ties: Ties,
    /// The held-out item ranked.
    pub holdout: Stage,
    /// Seeds run.
    pub seeds: Vec<u64>,
    /// Wire sizes, latency and what the TVs hold, of the first seed's federated pass.
    #[serde(flatten)]
    pub transport: Transport,
    /// Federation rounds of the first seed's federated pass.
    pub rounds: u32,
    /// Federation rounds of the first seed's DP pass.
    pub rounds_dp: u32,
    /// Users (TVs) simulated.
    pub users: usize,
    /// Users evaluated (with a held-out item).
    pub users_evaluated: usize,
    /// Syncs of the first seed's federated pass.
    pub syncs: u64,
    /// Viewing events replayed per pass.
    pub events: u64,
    /// Quality per round (first seed's federated pass).
    pub curve: Vec<RoundPoint>,
    /// Quality per round (first seed's DP pass).
    pub curve_dp: Vec<RoundPoint>,
    /// Privacy spent per device by the DP pass: ε composed over all its rounds (zCDP).
    pub dp_epsilon: Option<f64>,
    /// δ of [`SimReport::dp_epsilon`], composed likewise.
    pub dp_delta: Option<f64>,
    /// Patterns the TVs received in `similar` (first seed's federated pass).
    pub served: u64,
    /// Of them, any that was not a published aggregate with at least k sources: 0 when the
    /// shards keep the promise.
    pub served_below_k: u64,
    /// [`SimReport::served`] of the first seed's DP pass.
    pub served_dp: u64,
    /// [`SimReport::served_below_k`] of the first seed's DP pass.
    pub served_below_k_dp: u64,
    /// Wall-clock seconds of the whole run.
    pub wall_secs: f64,
}

impl SimReport {
    /// The summary of `method`, if it ran.
    pub fn method(&self, method: &str) -> Option<&MethodSummary> {
        self.methods.iter().find(|m| m.method == method)
    }
}

/// Everything a pass needs: the split of its seed, catalogue, events.
pub(crate) struct World {
    pub split: Split,
    pub seed: u64,
    pub holdout: Stage,
    pub embedder: Arc<Embedder>,
    pub catalogue: Arc<Catalogue>,
    /// Every user's interactions at `holdout` as viewing events, in time order.
    pub events: Vec<(u32, ViewingEvent)>,
    pub progress: MultiProgress,
}

fn genres(ml: &MovieLens, item: u32) -> Vec<String> {
    ml.movies[item as usize]
        .genres
        .iter()
        .take(omega_protocol::validate::MAX_GENRES)
        .map(|g| g.to_lowercase())
        .collect()
}

/// The catalogue a TV knows: every film, embedded once.
fn catalogue_items(ml: &MovieLens) -> Vec<CatalogueItem> {
    (0..ml.n_items() as u32)
        .map(|i| CatalogueItem {
            content_id: content_id(i),
            title: ml.movies[i as usize].title.clone(),
            genres: genres(ml, i),
            content_type: ContentType::Movie,
        })
        .collect()
}

fn events(ml: &MovieLens, split: &Split, holdout: Stage) -> Vec<(u32, ViewingEvent)> {
    let mut out: Vec<(u32, ViewingEvent)> = split
        .users
        .iter()
        .enumerate()
        .flat_map(|(u, us)| us.history(holdout).into_iter().map(move |r| (u as u32, r)))
        .map(|(u, r)| {
            let ev = ViewingEvent {
                content_id: content_id(r.item),
                title: ml.movies[r.item as usize].title.clone(),
                genres: genres(ml, r.item),
                content_type: ContentType::Movie,
                started_at_ms: r.timestamp * 1000,
                watch_fraction: watch_fraction(r.rating),
                context: None,
            };
            (u, ev)
        })
        .collect();
    out.sort_by_key(|(u, e)| (e.started_at_ms, *u));
    out
}

/// Table order of the methods.
const METHOD_ORDER: [&str; 10] = [
    "popularity",
    "popularity_dp",
    "local_only",
    "mf_bpr",
    "mf_bce",
    "ease",
    "central_reference",
    "federated_offline",
    "federated",
    "federated_dp",
];

/// Runs the whole simulation and evaluation.
pub async fn run(cfg: SimConfig) -> Result<SimReport, SimError> {
    cfg.check()?;
    let start = std::time::Instant::now();
    let mut ml = MovieLens::load_default()?;
    if let Some(n) = cfg.users {
        ml = ml.first_users(n);
    }
    let seeds: Vec<u64> = (0..cfg.seeds as u64).map(|i| cfg.seed.wrapping_add(i)).collect();
    let splits: Arc<Vec<Split>> =
        Arc::new(seeds.iter().map(|&s| Split::with_ties(&ml, s, cfg.ties)).collect());
    let progress = if cfg.progress {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    };
    let note = {
        let progress = progress.clone();
        let on = cfg.progress;
        move |m: &str| {
            // Above the bars on a terminal; plain lines when stderr is a file or a pipe.
            if on && progress.is_hidden() {
                eprintln!("omega-sim: {m}");
            } else if on {
                let _ = progress.println(format!("omega-sim: {m}"));
            }
        }
    };
    let embedder =
        Arc::new(Embedder::new(EmbedderConfig { cache_capacity: 80_000, ..Default::default() })?);
    note(&format!(
        "{} users, {} films, {} ratings, {} seed(s), {} ties, holdout {:?}; embedding the catalogue",
        ml.n_users(),
        ml.n_items(),
        ml.ratings.len(),
        seeds.len(),
        cfg.ties,
        cfg.holdout,
    ));
    let catalogue = Arc::new(Catalogue::build(catalogue_items(&ml), &embedder)?);

    // The centralised baselines and the offline round run beside the fleet.
    let offline = {
        let (splits, seeds, note) = (splits.clone(), seeds.clone(), note.clone());
        let (base, tune, command) = (cfg.chosen, cfg.tune, cfg.command.clone());
        let (holdout, k, dp) = (cfg.holdout, cfg.min_sources, cfg.dp);
        tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let (chosen, selection) = if tune {
                note("baselines: searching MF (BPR, BCE) and EASE on the validation item");
                suite::select(&splits[0], &base, TuneOptions::default(), &command)
            } else {
                (base, suite::recorded().1)
            };
            for s in &selection {
                note(&format!("chosen on validation: {}: {}", s.what, s.chosen));
            }
            let runs: Vec<Vec<suite::MethodRun>> = seeds
                .iter()
                .zip(splits.iter())
                .map(|(&seed, split)| {
                    let r = suite::run_seed(split, &chosen, holdout, seed, k, dp);
                    note(&format!(
                        "baselines of seed {seed} done ({:.0} s): {}",
                        t.elapsed().as_secs_f64(),
                        r.iter()
                            .map(|(m, q)| format!("{m} {:.3}", Quality::mean_of(q).hr10))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    r
                })
                .collect();
            (chosen, selection, runs)
        })
    };

    let tmp;
    let base = match &cfg.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()
                .map_err(|source| SimError::Io { what: "temporary directory".into(), source })?;
            tmp.path().to_path_buf()
        }
    };
    // Seeds' fleets are independent: up to `parallel_seeds` run at once, one per core.
    let limit = Arc::new(tokio::sync::Semaphore::new(cfg.parallel_seeds.max(1)));
    let mut tasks = Vec::with_capacity(seeds.len());
    for (i, &seed) in seeds.iter().enumerate() {
        let split = splits[i].clone();
        let events = events(&ml, &split, cfg.holdout);
        let world = World {
            split,
            seed,
            holdout: cfg.holdout,
            embedder: embedder.clone(),
            catalogue: catalogue.clone(),
            events,
            progress: progress.clone(),
        };
        let dir = base.join(format!("seed-{seed}"));
        let (cfg, limit, note) = (cfg.clone(), limit.clone(), note.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit
                .acquire_owned()
                .await
                .map_err(|e| SimError::Config(format!("seed scheduler closed: {e}")))?;
            note(&format!("seed {seed}: federated pass (k-anonymity)"));
            let fed = pass::run(&world, &cfg, &dir.join("federated"), None, true).await?;
            let dp = match cfg.dp {
                Some(dp) => {
                    note(&format!(
                        "seed {seed}: federated_dp pass (epsilon {}, delta {})",
                        dp.0, dp.1
                    ));
                    Some(pass::run(&world, &cfg, &dir.join("federated_dp"), Some(dp), false).await?)
                }
                None => None,
            };
            Ok::<_, SimError>((fed, dp, world.events.len() as u64))
        }));
    }
    let mut per_method: BTreeMap<&str, Vec<Vec<UserQuality>>> = BTreeMap::new();
    let mut first: Option<(PassOutcome, Option<PassOutcome>)> = None;
    let mut events_n = 0;
    for t in tasks {
        let (fed, dp, n) =
            t.await.map_err(|e| SimError::Config(format!("a seed's fleet failed: {e}")))??;
        events_n = n;
        per_method
            .entry("local_only")
            .or_default()
            .push(fed.local_only.clone().unwrap_or_default());
        per_method.entry("federated").or_default().push(fed.quality.clone());
        if let Some(d) = &dp {
            per_method.entry("federated_dp").or_default().push(d.quality.clone());
        }
        if first.is_none() {
            first = Some((fed, dp));
        }
    }
    note("fleet done; waiting for the baselines");
    let (chosen, selection, offline_runs) = offline
        .await
        .map_err(|e| SimError::Config(format!("the baselines' thread failed: {e}")))?;
    for runs in offline_runs {
        for (m, q) in runs {
            if let Some(name) = METHOD_ORDER.iter().find(|n| **n == m) {
                per_method.entry(name).or_default().push(q);
            }
        }
    }
    let methods: Vec<MethodSummary> = METHOD_ORDER
        .iter()
        .filter_map(|m| per_method.get(m).map(|runs| (m, runs)))
        .map(|(m, runs)| MethodSummary {
            method: m.to_string(),
            hr10: stats::over_seeds(runs, Metric::Hr10),
            ndcg10: stats::over_seeds(runs, Metric::Ndcg10),
            full_hr10: stats::over_seeds(runs, Metric::FullHr10),
            full_ndcg10: stats::over_seeds(runs, Metric::FullNdcg10),
            hr10_per_seed: runs.iter().map(|r| Quality::mean_of(r).hr10).collect(),
        })
        .collect();
    let mf = match chosen.mf_best {
        Loss::Bpr => "mf_bpr",
        Loss::Bce => "mf_bce",
    };
    let paired: Vec<PairedRow> = [("federated", "central_reference"), ("federated", mf)]
        .into_iter()
        .filter_map(|(a, b)| Some((a, b, per_method.get(a)?, per_method.get(b)?)))
        .map(|(a, b, ra, rb)| PairedRow {
            a: a.into(),
            b: b.into(),
            hr10: stats::paired(ra, rb, Metric::Hr10),
            ndcg10: stats::paired(ra, rb, Metric::Ndcg10),
            full_hr10: stats::paired(ra, rb, Metric::FullHr10),
        })
        .collect();
    let pick = |f: fn(&MethodSummary) -> f64| -> BTreeMap<String, f64> {
        methods.iter().map(|m| (m.method.clone(), f(m))).collect()
    };
    let (fed, dp) = first.ok_or_else(|| SimError::Config("no seed ran".into()))?;
    Ok(SimReport {
        hr10: pick(|m| m.hr10.mean),
        ndcg10: pick(|m| m.ndcg10.mean),
        full_hr10: pick(|m| m.full_hr10.mean),
        full_ndcg10: pick(|m| m.full_ndcg10.mean),
        methods,
        paired,
        selection,
        ties: cfg.ties,
        holdout: cfg.holdout,
        seeds,
        transport: fed.transport.clone(),
        rounds: fed.rounds,
        rounds_dp: dp.as_ref().map_or(0, |d| d.rounds),
        users: ml.n_users(),
        users_evaluated: fed.quality.len(),
        syncs: fed.syncs,
        events: events_n,
        curve: fed.curve,
        curve_dp: dp.as_ref().map(|d| d.curve.clone()).unwrap_or_default(),
        dp_epsilon: dp.as_ref().and_then(|d| d.epsilon_spent).map(|e| e.0),
        dp_delta: dp.as_ref().and_then(|d| d.epsilon_spent).map(|e| e.1),
        served: fed.served,
        served_below_k: fed.served_below_k,
        served_dp: dp.as_ref().map_or(0, |d| d.served),
        served_below_k_dp: dp.as_ref().map_or(0, |d| d.served_below_k),
        wall_secs: start.elapsed().as_secs_f64(),
    })
}

/// The report as markdown: the quality table (mean ± 95 % interval), the paired
/// comparisons, the selections and the transport numbers.
pub fn markdown(r: &SimReport) -> String {
    let interval = if r.seeds.len() > 1 {
        format!("mean of {} seeds ± 95 % t-interval over seeds", r.seeds.len())
    } else {
        "one seed ± 95 % interval over users".to_string()
    };
    let mut s = format!(
        "{} ties, {:?} item, seeds {:?}; {interval}\n\n\
         | method | HR@10 | NDCG@10 | full HR@10 | full NDCG@10 |\n|---|---:|---:|---:|---:|\n",
        r.ties, r.holdout, r.seeds
    );
    for m in &r.methods {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            m.method, m.hr10, m.ndcg10, m.full_hr10, m.full_ndcg10
        ));
    }
    if !r.paired.is_empty() {
        s.push_str(
            "\nPaired, per user (a − b, averaged over seeds, ± 95 % interval over users):\n\n\
             | a − b | HR@10 | NDCG@10 | full HR@10 | seeds a > b (HR@10) |\n|---|---:|---:|---:|---:|\n",
        );
        for p in &r.paired {
            s.push_str(&format!(
                "| {} − {} | {:+.4} ± {:.4} | {:+.4} ± {:.4} | {:+.4} ± {:.4} | {}/{} |\n",
                p.a,
                p.b,
                p.hr10.difference.mean,
                p.hr10.difference.half_width,
                p.ndcg10.difference.mean,
                p.ndcg10.difference.half_width,
                p.full_hr10.difference.mean,
                p.full_hr10.difference.half_width,
                p.hr10.seeds_a_above,
                p.hr10.seeds
            ));
        }
    }
    s.push_str("\nChosen on the validation item:\n\n");
    for sel in &r.selection {
        let hr =
            sel.validation_hr10.map(|h| format!(", validation HR@10 {h:.4}")).unwrap_or_default();
        s.push_str(&format!(
            "- {}: {} ({} configurations{hr}; `{}`)\n",
            sel.what, sel.chosen, sel.configurations, sel.command
        ));
    }
    s.push_str(&format!(
        "\n{} users ({} evaluated), {} events, {} syncs, {} rounds ({} DP); bytes per sync p50: \
         up {} B (pushing syncs {} B), down {} B (max {} B); recommend p99 {:.2} ms; {:.0} s\n\n\
         Served to TVs: {} patterns, {} below k (DP pass: {}, {} below k)\n",
        r.users,
        r.users_evaluated,
        r.events,
        r.syncs,
        r.rounds,
        r.rounds_dp,
        r.transport.bytes_up_p50,
        r.transport.bytes_up_push_p50,
        r.transport.bytes_down_p50,
        r.transport.bytes_down_max,
        r.transport.recommend_p99_ms,
        r.wall_secs,
        r.served,
        r.served_below_k,
        r.served_dp,
        r.served_below_k_dp,
    ));
    s
}

/// Checks that every selection of a JSON report was made on the validation item: an error
/// names the first selection made on any other split (or a report without selections).
pub fn check_selection(report: &serde_json::Value) -> Result<usize, String> {
    let sel = report
        .get("selection")
        .and_then(|s| s.as_array())
        .filter(|s| !s.is_empty())
        .ok_or("the report has no selection records")?;
    for s in sel {
        let split = s.get("split").and_then(|v| v.as_str()).unwrap_or("(missing)");
        if split != "validation" {
            let what = s.get("what").and_then(|v| v.as_str()).unwrap_or("(unnamed)");
            return Err(format!("{what} was selected on the {split} split"));
        }
    }
    Ok(sel.len())
}
