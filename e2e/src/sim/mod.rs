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
//! Methods, one run: `popularity` and `centralized_mf` (pooled data, [`crate::eval::mf`]),
//! `local_only` (a twin brain per user that never syncs), `federated` (the syncing TVs,
//! k-anonymity on) and `federated_dp` (a second pass with fresh shards and TVs whose rounds
//! add Gaussian noise for (ε, δ)-DP).

mod pass;

use crate::eval::federated::{content_id, watch_fraction};
use crate::eval::mf::{Loss, Mf, MfConfig};
use crate::eval::popularity::Popularity;
use crate::eval::{self, EvalOptions, Quality, Split, Stage};
use crate::movielens::{MovieLens, MovieLensError};
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
    /// Seed of the negative draw, sync jitter and MF.
    pub seed: u64,
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
    /// Run the DP pass (ε, δ).
    pub dp: Option<(f64, f64)>,
    /// Centralised MF hyper-parameters.
    pub mf: MfConfig,
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
            session_hours: 2.0,
            eval_hours: 6.0,
            round_every_hours: 1.0,
            round_min_growth: 0.02,
            min_sources: 3,
            dp: Some((8.0, 1e-6)),
            mf: chosen_mf(eval::DEFAULT_SEED),
            data_dir: None,
            curve_users: 200,
            progress: true,
            ranking: omega_device::RankingParams::default(),
        }
    }
}

/// The MF configuration `cargo run --release -p omega-e2e --example baselines` picks on the
/// validation item (BPR, dim 64, L2 0.01, 45 epochs; see `docs/quality.md`).
pub fn chosen_mf(seed: u64) -> MfConfig {
    MfConfig { dim: 64, reg: 0.01, epochs: 45, loss: Loss::Bpr, seed, ..MfConfig::default() }
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
        if self.min_sources == 0 {
            return bad("--min-sources must be >= 1");
        }
        if self.users == Some(0) {
            return bad("--users must be >= 1");
        }
        Ok(())
    }
}

/// The JSON report (`omega-sim --json`).
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// Sampled HR@10 per method.
    pub hr10: BTreeMap<String, f64>,
    /// Sampled NDCG@10 per method.
    pub ndcg10: BTreeMap<String, f64>,
    /// Full-ranking HR@10 per method.
    pub full_hr10: BTreeMap<String, f64>,
    /// Full-ranking NDCG@10 per method.
    pub full_ndcg10: BTreeMap<String, f64>,
    /// Wire sizes, latency and what the TVs hold, of the federated pass.
    #[serde(flatten)]
    pub transport: Transport,
    /// Federation rounds of the federated pass.
    pub rounds: u32,
    /// Federation rounds of the DP pass.
    pub rounds_dp: u32,
    /// Users (TVs) simulated.
    pub users: usize,
    /// Users evaluated (with a held-out item).
    pub users_evaluated: usize,
    /// Syncs of the federated pass.
    pub syncs: u64,
    /// Viewing events replayed per pass.
    pub events: u64,
    /// Quality per round (federated pass).
    pub curve: Vec<RoundPoint>,
    /// Quality per round (DP pass).
    pub curve_dp: Vec<RoundPoint>,
    /// Privacy spent per device by the DP pass: ε composed over all its rounds (zCDP).
    pub dp_epsilon: Option<f64>,
    /// δ of [`SimReport::dp_epsilon`], composed likewise.
    pub dp_delta: Option<f64>,
    /// Diagnostic: what one round over everyone's training interactions teaches when every
    /// TV could hold every published vector (`eval::federated`, in-process, no transport,
    /// no simulated time): the federated pass's ceiling.
    pub federated_offline: Quality,
    /// Wall-clock seconds of the whole run.
    pub wall_secs: f64,
}

/// Everything the passes share: data, split, catalogue, events.
pub(crate) struct World {
    pub ml: MovieLens,
    pub split: Split,
    pub embedder: Arc<Embedder>,
    pub catalogue: Arc<Catalogue>,
    /// Every user's interactions at [`Stage::Test`] as viewing events, in time order.
    pub events: Vec<(u32, ViewingEvent)>,
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

fn events(ml: &MovieLens, split: &Split) -> Vec<(u32, ViewingEvent)> {
    let mut out: Vec<(u32, ViewingEvent)> = split
        .users
        .iter()
        .enumerate()
        .flat_map(|(u, us)| us.history(Stage::Test).into_iter().map(move |r| (u as u32, r)))
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

/// Runs the whole simulation and evaluation.
pub async fn run(cfg: SimConfig) -> Result<SimReport, SimError> {
    cfg.check()?;
    let start = std::time::Instant::now();
    let mut ml = MovieLens::load_default()?;
    if let Some(n) = cfg.users {
        ml = ml.first_users(n);
    }
    let split = Split::new(&ml, cfg.seed);
    let embedder =
        Arc::new(Embedder::new(EmbedderConfig { cache_capacity: 80_000, ..Default::default() })?);
    let note = |m: &str| {
        if cfg.progress {
            eprintln!("omega-sim: {m}");
        }
    };
    note(&format!(
        "{} users, {} films, {} ratings; embedding the catalogue",
        ml.n_users(),
        ml.n_items(),
        ml.ratings.len()
    ));
    let catalogue = Arc::new(Catalogue::build(catalogue_items(&ml), &embedder)?);
    let events = events(&ml, &split);
    let world = World { ml, split, embedder, catalogue, events };

    note("baselines: popularity, centralised MF");
    let test = EvalOptions { stage: Stage::Test, full_ranking: true };
    let mut qualities: Vec<(String, Quality)> = Vec::new();
    let pop = eval::evaluate(&world.split, &mut Popularity::fit(&world.split, Stage::Test), test);
    qualities.push(("popularity".into(), pop));
    let mut mf = Mf::fit(&world.split, Stage::Test, cfg.mf);
    qualities.push(("centralized_mf".into(), eval::evaluate(&world.split, &mut mf, test)));

    let tmp;
    let base = match &cfg.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()
                .map_err(|source| SimError::Io { what: "temporary directory".into(), source })?;
            tmp.path().to_path_buf()
        }
    };
    note("federated pass (k-anonymity)");
    let fed = pass::run(&world, &cfg, &base.join("federated"), None, true).await?;
    qualities.push(("local_only".into(), fed.local_only.unwrap_or_default()));
    qualities.push(("federated".into(), fed.quality));
    let dp = match cfg.dp {
        Some(dp) => {
            note(&format!("federated_dp pass (epsilon {}, delta {})", dp.0, dp.1));
            let out = pass::run(&world, &cfg, &base.join("federated_dp"), Some(dp), false).await?;
            qualities.push(("federated_dp".into(), out.quality));
            Some(out)
        }
        None => None,
    };
    let round_cfg =
        omega_federation::RoundConfig { min_sources: cfg.min_sources, ..Default::default() };
    let offline = crate::eval::federated::round(&world.split, Stage::Test, &round_cfg, "offline");
    let mut offline_scorer = crate::eval::federated::FederatedScorer::new(
        &world.split,
        Stage::Test,
        &offline.patterns,
        cfg.min_sources,
        &cfg.ranking.collaborative_query,
    );
    let federated_offline = eval::evaluate(&world.split, &mut offline_scorer, test);
    let pick = |f: fn(&Quality) -> f64| -> BTreeMap<String, f64> {
        qualities.iter().map(|(m, q)| (m.clone(), f(q))).collect()
    };
    Ok(SimReport {
        hr10: pick(|q| q.hr10),
        ndcg10: pick(|q| q.ndcg10),
        full_hr10: pick(|q| q.full_hr10),
        full_ndcg10: pick(|q| q.full_ndcg10),
        transport: fed.transport.clone(),
        rounds: fed.rounds,
        rounds_dp: dp.as_ref().map_or(0, |d| d.rounds),
        users: world.ml.n_users(),
        users_evaluated: pop.users,
        syncs: fed.syncs,
        events: world.events.len() as u64,
        curve: fed.curve,
        curve_dp: dp.as_ref().map(|d| d.curve.clone()).unwrap_or_default(),
        dp_epsilon: dp.as_ref().and_then(|d| d.epsilon_spent).map(|e| e.0),
        dp_delta: dp.as_ref().and_then(|d| d.epsilon_spent).map(|e| e.1),
        federated_offline,
        wall_secs: start.elapsed().as_secs_f64(),
    })
}

/// The report as a markdown table (one row per method), plus the transport numbers.
pub fn markdown(r: &SimReport) -> String {
    let mut s = String::from(
        "| method | HR@10 | NDCG@10 | full HR@10 | full NDCG@10 |\n|---|---:|---:|---:|---:|\n",
    );
    for m in ["popularity", "local_only", "centralized_mf", "federated", "federated_dp"] {
        let Some(hr) = r.hr10.get(m) else { continue };
        let g = |t: &BTreeMap<String, f64>| t.get(m).copied().unwrap_or(0.0);
        s.push_str(&format!(
            "| {m} | {hr:.4} | {:.4} | {:.4} | {:.4} |\n",
            g(&r.ndcg10),
            g(&r.full_hr10),
            g(&r.full_ndcg10)
        ));
    }
    let o = &r.federated_offline;
    s.push_str(&format!(
        "| *diagnostic: one round offline, every vector held* | {:.4} | {:.4} | {:.4} | {:.4} |\n",
        o.hr10, o.ndcg10, o.full_hr10, o.full_ndcg10
    ));
    s.push_str(&format!(
        "\n{} users ({} evaluated), {} events, {} syncs, {} rounds ({} DP); bytes per sync p50: \
         up {} B (pushing syncs {} B), down {} B (max {} B); recommend p99 {:.2} ms; {:.0} s\n",
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
        r.wall_secs
    ));
    s
}
