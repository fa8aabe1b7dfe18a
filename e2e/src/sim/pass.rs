//! One pass of the simulation: shards, TVs, the replay in simulated time, rounds, evaluation.

use super::{SimConfig, SimError, World};
use crate::eval::federated::content_id;
use crate::eval::{self, EvalOptions, TOP_K, UserQuality};
use crate::load::spawn::free_port;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use omega_device::{Brain, BrainConfig, RecommendContext, SyncClient, SyncConfig, UNKNOWN_SCORE};
use omega_protocol::admin::RoundOutcome;
use omega_shard::federation::{FederateArgs, FederationMetrics};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: f64 = 3_600_000.0;
/// Region every simulated TV registers in.
const REGION: &str = "ml";

/// Quality after one round (a sample of users, their TVs as they are at that moment).
#[derive(Debug, Clone, Serialize)]
pub struct RoundPoint {
    /// 1-based round number.
    pub round: u32,
    /// Simulated time of the round, unix ms.
    pub sim_time_ms: i64,
    /// Patterns the round read.
    pub patterns_in: u64,
    /// Aggregates it published (audience profiles and collaborative vectors).
    pub published: u64,
    /// Sampled HR@10 of the sampled users' held-out item.
    pub hr10: f64,
    /// Sampled NDCG@10.
    pub ndcg10: f64,
    /// Wall-clock duration of the round, ms.
    pub duration_ms: u64,
}

/// What a pass measured.
#[derive(Debug, Clone, Default)]
pub struct PassOutcome {
    /// The syncing TVs' quality, per evaluated user.
    pub quality: Vec<UserQuality>,
    /// The never-syncing twins' quality per evaluated user, when they ran.
    pub local_only: Option<Vec<UserQuality>>,
    /// Wire sizes, latency and what the TVs hold.
    pub transport: Transport,
    /// Rounds run.
    pub rounds: u32,
    /// Syncs made.
    pub syncs: u64,
    /// Quality per round.
    pub curve: Vec<RoundPoint>,
    /// (ε, δ) per device composed over every DP round of the pass, as the last round
    /// reported it.
    pub epsilon_spent: Option<(f64, f64)>,
    /// Patterns the TVs received in `similar` over all syncs.
    pub served: u64,
    /// Of them, those that were not a published aggregate with at least k sources (k =
    /// `min_sources`) in the round the shards served at the time.
    pub served_below_k: u64,
}

/// What a pass's syncs cost on the wire and what its TVs end up holding (flat in the
/// JSON report).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Transport {
    /// Wire bytes (zstd + gRPC prefix) device -> shard per sync, median over all syncs.
    pub bytes_up_p50: u64,
    /// Shard -> device, median over all syncs.
    pub bytes_down_p50: u64,
    /// Device -> shard, median over the syncs that pushed a delta.
    pub bytes_up_push_p50: u64,
    /// Largest download of any sync.
    pub bytes_down_max: u64,
    /// `Brain::recommend(k = 10)` latency p99 over the TVs at the end, ms.
    pub recommend_p99_ms: f64,
    /// Global patterns a TV holds at the end (median over TVs).
    pub globals_p50: u64,
    /// Of them, collaborative item vectors (main aggregates), median over TVs.
    pub collab_vectors_p50: u64,
    /// Share of the evaluated users whose held-out item had a collaborative vector on their
    /// TV (scored in the collaborative tier).
    pub target_held: f64,
    /// Median over TVs of the share of their watched contents with a collaborative vector
    /// on the TV (what their query is built from).
    pub watched_held_p50: f64,
}

#[derive(Parser)]
struct ServeWrapper {
    #[command(flatten)]
    serve: omega_shard::ServeArgs,
}

/// Shard servers running in this process on loopback ports.
struct Shards {
    grpc: Vec<String>,
    admin: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

async fn start_shards(
    n: usize,
    database_url: Option<&str>,
    dir: &Path,
) -> Result<Shards, SimError> {
    let mut shards = Shards { grpc: Vec::new(), admin: Vec::new(), tasks: Vec::new() };
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| SimError::Io { what, source }
    };
    for i in 0..n {
        let data = dir.join(format!("shard-{i}"));
        std::fs::create_dir_all(&data).map_err(io("shard data directory"))?;
        let port = || free_port().map_err(io("free port"));
        let (g, a) = (port()?, port()?);
        let args = ServeWrapper::try_parse_from([
            "omega-shard".to_string(),
            format!("--shard-id={}", i + 1),
            format!("--region={REGION}"),
            format!("--grpc-addr=127.0.0.1:{g}"),
            format!("--admin-grpc-addr=127.0.0.1:{a}"),
            format!("--rest-addr=127.0.0.1:{}", port()?),
            format!("--metrics-addr=127.0.0.1:{}", port()?),
            format!("--data-dir={}", data.display()),
            "--device-secret=omega-sim-device-secret-0123456789".into(),
            // Simulated time runs thousands of times faster than the wall clock.
            "--rate-limit-per-minute=1000000".into(),
            "--rate-limit-burst=1000000".into(),
            "--similar-cache-secs=0".into(),
            format!("--database-url={}", database_url.unwrap_or("")),
        ])
        .map_err(|e| SimError::Shard(e.to_string()))?
        .serve;
        shards.tasks.push(tokio::spawn(async move {
            if let Err(e) = omega_shard::server::serve(args, Default::default()).await {
                tracing::error!(error = %e, "shard server stopped");
            }
        }));
        let url = format!("http://127.0.0.1:{g}");
        let mut ready = false;
        for _ in 0..300 {
            if crate::load::connect(&url, 1).await.is_ok() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ready {
            return Err(SimError::Shard(format!("shard {} did not start in 30 s", i + 1)));
        }
        shards.grpc.push(url);
        shards.admin.push(format!("http://127.0.0.1:{a}"));
    }
    Ok(shards)
}

/// The DP pass's releases: after the event at each `i/releases` fraction of `events` (the last
/// one after the last event).
fn release_times(events: &[(u32, omega_protocol::ViewingEvent)], releases: u32) -> VecDeque<i64> {
    let n = events.len();
    (1..=releases as usize)
        .filter_map(|i| events.get((n * i / releases as usize).saturating_sub(1)))
        .map(|(_, e)| e.started_at_ms)
        .collect()
}

/// How many of `received` are not an aggregate of `published` (id -> source devices) with
/// at least `k` sources: a pattern relayed from one device, or an aggregate below k.
fn below_k(received: &[uuid::Uuid], published: &HashMap<uuid::Uuid, u32>, k: u32) -> usize {
    received.iter().filter(|id| published.get(id).is_none_or(|&n| n < k)).count()
}

struct Tv {
    brain: Brain,
    twin: Option<Brain>,
    client: Option<SyncClient>,
    shard: usize,
    device_id: String,
    on_until: i64,
    sync_scheduled: bool,
}

fn p(values: &mut [u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * q).round() as usize]
}

fn context_at(ms: i64) -> RecommendContext {
    RecommendContext { now_ms: Some(ms), ..Default::default() }
}

/// Scores `items` for user `u` with `brain`, as of the user's held-out interaction.
fn score(brain: &Brain, world: &World, u: u32, items: &[u32]) -> Vec<f32> {
    let us = &world.split.users[u as usize];
    let at = us.target(world.holdout).map_or(0, |r| r.timestamp * 1000);
    let ids: Vec<String> = items.iter().map(|&i| content_id(i)).collect();
    brain.score(&context_at(at), &ids).unwrap_or_else(|e| {
        tracing::warn!(error = %e, user = u, "score failed");
        vec![UNKNOWN_SCORE; items.len()]
    })
}

fn bar(cfg: &SimConfig, world: &World, len: u64, template: &str) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let pb = world.progress.add(ProgressBar::new(len));
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

struct Run<'a> {
    world: &'a World,
    cfg: &'a SimConfig,
    dp: Option<(f64, f64)>,
    shards: Shards,
    tvs: Vec<Tv>,
    rng: StdRng,
    syncs: u64,
    bytes_up: Vec<u64>,
    bytes_down: Vec<u64>,
    bytes_up_push: Vec<u64>,
    accepted_total: u64,
    accepted_at_round: u64,
    rounds: u32,
    curve: Vec<RoundPoint>,
    curve_users: Vec<u32>,
    epsilon_spent: Option<(f64, f64)>,
    ledger: String,
    metrics: FederationMetrics,
    label: &'static str,
    seed: u64,
    /// Where rounds keep their state (the published output is read back from there).
    rounds_dir: PathBuf,
    /// Source devices of every aggregate of the round the shards serve now, by id.
    published: HashMap<uuid::Uuid, u32>,
    served: u64,
    served_below_k: u64,
    /// DP pass: event times after which a release is due (one per release, in order).
    dp_schedule: VecDeque<i64>,
}

impl Run<'_> {
    fn jitter(&mut self) -> i64 {
        self.rng.random_range(5 * MINUTE_MS..=15 * MINUTE_MS)
    }

    async fn sync(&mut self, u: usize, at: i64) -> Result<(), SimError> {
        let tv = &mut self.tvs[u];
        if tv.client.is_none() {
            let mut c = SyncClient::connect(SyncConfig {
                endpoint: self.shards.grpc[tv.shard].clone(),
                // The simulated shards listen in plaintext on loopback.
                allow_plaintext: true,
                region: REGION.into(),
                ..Default::default()
            })
            .await?;
            c.register(&tv.device_id, REGION, tv.brain.embedder().model_id()).await?;
            tv.client = Some(c);
        }
        let Some(client) = tv.client.as_mut() else { return Ok(()) };
        match client.sync_at(&mut tv.brain, at).await {
            Ok(r) => {
                self.syncs += 1;
                self.bytes_up.push(r.bytes_up as u64);
                self.bytes_down.push(r.bytes_down as u64);
                if r.local_version.is_some() {
                    self.bytes_up_push.push(r.bytes_up as u64);
                }
                self.accepted_total += u64::from(r.patterns_accepted);
                // What the TV received, checked against what the federation published.
                let k = self.cfg.min_sources;
                self.served += r.similar_ids.len() as u64;
                self.served_below_k += below_k(&r.similar_ids, &self.published, k) as u64;
            }
            // A TV whose sync fails keeps its outbox and tries again at the next sync.
            Err(e) => tracing::warn!(error = %e, device = %tv.device_id, "sync failed"),
        }
        Ok(())
    }

    /// Runs a round when enough new patterns arrived (any at all when `final_round`).
    /// A DP pass runs only its scheduled releases, at the first round hour after each.
    async fn maybe_round(&mut self, at_ms: i64, final_round: bool) {
        let new = self.accepted_total - self.accepted_at_round;
        let growth = new as f64 / self.accepted_at_round.max(1) as f64;
        if self.dp.is_some() {
            if new == 0 || self.dp_schedule.front().is_none_or(|&t| at_ms <= t) {
                return;
            }
            self.dp_schedule.pop_front();
        } else if new == 0 || (!final_round && growth < self.cfg.round_min_growth) {
            return;
        }
        self.accepted_at_round = self.accepted_total;
        self.rounds += 1;
        let mut args = FederateArgs::new(
            &format!("sim-{}-{}-{}-{}", self.label, self.seed, self.rounds, at_ms),
            self.shards.admin.clone(),
        );
        args.min_sources = self.cfg.min_sources;
        let state_dir = self.rounds_dir.join(self.rounds.to_string());
        args.state_dir = Some(state_dir.clone());
        if let Some((e, d)) = self.dp {
            let (round_e, round_d) =
                omega_federation::privacy::per_round(e, d, self.cfg.dp_releases);
            args.epsilon = Some(round_e);
            args.delta = Some(round_d);
            // The whole pass is one period with the pass's budget, carried round to round in
            // the ledger as a FederationRound's status does: a release past it is refused.
            args.budget_epsilon = Some(e);
            args.period_days = 36_500;
            args.privacy_ledger = self.ledger.clone();
        }
        let summary = omega_shard::federation::run(&args, &self.metrics).await;
        if summary.outcome == RoundOutcome::Failed {
            tracing::warn!(message = ?summary.message, "federation round failed");
        }
        self.read_published(&state_dir, &args.round_id);
        if let Some(p) = &summary.privacy {
            self.epsilon_spent = Some((p.composed_epsilon, p.composed_delta));
            self.ledger = serde_json::to_string(&p.ledger).unwrap_or_default();
        }
        let (hr, ndcg) = self.curve_quality();
        self.curve.push(RoundPoint {
            round: self.rounds,
            sim_time_ms: at_ms,
            patterns_in: summary.patterns_in,
            published: summary.patterns_aggregated + summary.collaborative_vectors,
            hr10: hr,
            ndcg10: ndcg,
            duration_ms: summary.duration_ms,
        });
    }

    /// Replaces [`Run::published`] with what the round published, read back from its
    /// state directory (a round that published nothing leaves the shards, and the map, as
    /// they were), then removes that directory.
    fn read_published(&mut self, state_dir: &Path, round_id: &str) {
        let store = omega_shard::federation::checkpoint::Store::new(Some(state_dir), round_id);
        match store.load_output() {
            Ok(Some(req)) => {
                self.published = req
                    .patterns
                    .iter()
                    .filter_map(|a| Some((uuid::Uuid::from_slice(&a.id).ok()?, a.source_devices)))
                    .collect();
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reading the round's output failed"),
        }
        if let Err(e) = std::fs::remove_dir_all(state_dir) {
            tracing::warn!(error = %e, "removing the round's state failed");
        }
    }

    fn curve_quality(&self) -> (f64, f64) {
        let (mut hr, mut ndcg) = (0.0, 0.0);
        for &u in &self.curve_users {
            let us = &self.world.split.users[u as usize];
            let Some(t) = us.target(self.world.holdout) else { continue };
            let mut items = vec![t.item];
            items.extend_from_slice(us.negatives(self.world.holdout));
            let s = score(&self.tvs[u as usize].brain, self.world, u, &items);
            let (h, n) = eval::hit_and_ndcg(s[0], s[1..].iter().copied(), TOP_K);
            hr += h;
            ndcg += n;
        }
        let n = self.curve_users.len().max(1) as f64;
        (hr / n, ndcg / n)
    }
}

/// Runs one pass: `dp` adds noise to every round; `with_local` also runs the local-only twins.
pub(crate) async fn run(
    world: &World,
    cfg: &SimConfig,
    dir: &Path,
    dp: Option<(f64, f64)>,
    with_local: bool,
) -> Result<PassOutcome, SimError> {
    std::fs::create_dir_all(dir)
        .map_err(|source| SimError::Io { what: format!("{}", dir.display()), source })?;
    // The DP pass never uses Postgres: it would read the federated pass's patterns.
    let db = if dp.is_none() { cfg.database_url.as_deref() } else { None };
    let shards = start_shards(cfg.shards, db, dir).await?;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let mut tvs = Vec::with_capacity(world.split.users.len());
    for u in 0..world.split.users.len() {
        // Unique per run, so a reused Postgres never mistakes them for older TVs.
        let device_id = format!("tv-{}-{u:04}", &run_id[20..]);
        let bcfg = BrainConfig {
            db_path: Some(dir.join(format!("tv-{u:04}.sqlite"))),
            device_id: Some(device_id.clone()),
            durable: false,
            ranking: cfg.ranking.clone(),
            ..Default::default()
        };
        let brain =
            Brain::open_shared(bcfg, world.embedder.clone(), Some(world.catalogue.clone()))?;
        let twin = if with_local {
            let t =
                BrainConfig { device_id: Some(format!("{device_id}-local")), ..Default::default() };
            Some(Brain::open_shared(t, world.embedder.clone(), Some(world.catalogue.clone()))?)
        } else {
            None
        };
        tvs.push(Tv {
            brain,
            twin,
            client: None,
            shard: u % cfg.shards,
            device_id,
            on_until: i64::MIN,
            sync_scheduled: false,
        });
    }
    let evaluable: Vec<u32> = world
        .split
        .users
        .iter()
        .enumerate()
        .filter(|(_, us)| us.target(world.holdout).is_some())
        .map(|(u, _)| u as u32)
        .collect();
    let step = (evaluable.len() / cfg.curve_users.max(1)).max(1);
    let curve_users: Vec<u32> =
        evaluable.iter().step_by(step).take(cfg.curve_users).copied().collect();
    let mut run = Run {
        world,
        cfg,
        dp,
        shards,
        tvs,
        rng: StdRng::seed_from_u64(world.seed ^ 0x51_u64),
        syncs: 0,
        bytes_up: Vec::new(),
        bytes_down: Vec::new(),
        bytes_up_push: Vec::new(),
        accepted_total: 0,
        accepted_at_round: 0,
        rounds: 0,
        curve: Vec::new(),
        curve_users,
        epsilon_spent: None,
        ledger: String::new(),
        metrics: FederationMetrics::default(),
        label: if dp.is_some() { "dp" } else { "fed" },
        seed: world.seed,
        rounds_dir: dir.join("rounds"),
        published: HashMap::new(),
        served: 0,
        served_below_k: 0,
        dp_schedule: if dp.is_some() {
            release_times(&world.events, cfg.dp_releases)
        } else {
            VecDeque::new()
        },
    };

    // The replay: events, syncs and rounds in simulated time.
    let session = (cfg.session_hours * HOUR_MS) as i64;
    let round_step = (cfg.round_every_hours * HOUR_MS) as i64;
    let first = world.events.first().map_or(0, |e| e.1.started_at_ms);
    let last = world.events.last().map_or(0, |e| e.1.started_at_ms);
    let mut next_round = (first / round_step + 1) * round_step;
    let mut syncs: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
    let pb = bar(
        cfg,
        world,
        world.events.len() as u64,
        "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} events {msg}",
    );
    pb.set_prefix(format!("{} seed {}", run.label, world.seed));
    let mut next_event = 0;
    let mut eval_started = false;
    let mut now = first;
    let mut tick = Instant::now();
    loop {
        let t_event = world.events.get(next_event).map(|e| e.1.started_at_ms);
        let t_sync = syncs.peek().map(|r| r.0.0);
        let t = match (t_event, t_sync) {
            (None, None) if !eval_started => now.max(last) + 1,
            (None, None) => break,
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
        };
        now = t;
        while next_round <= t {
            run.maybe_round(next_round, next_round > last).await;
            next_round += round_step;
        }
        if t_event == Some(t) {
            let (u, ev) = &world.events[next_event];
            let tv = &mut run.tvs[*u as usize];
            tv.brain.observe(ev)?;
            if let Some(twin) = &mut tv.twin {
                twin.observe(ev)?;
            }
            tv.on_until = t + session;
            if !tv.sync_scheduled {
                tv.sync_scheduled = true;
                let at = t + run.jitter();
                syncs.push(Reverse((at, *u as usize)));
            }
            next_event += 1;
            pb.inc(1);
        } else if let Some(Reverse((at, u))) = syncs.pop() {
            run.sync(u, at).await?;
            let next = at + run.jitter();
            if next <= run.tvs[u].on_until {
                syncs.push(Reverse((next, u)));
            } else {
                run.tvs[u].sync_scheduled = false;
            }
        } else {
            // The replay is over: the evening after, every TV is on and syncs on schedule.
            eval_started = true;
            pb.set_message("replay done; evaluation evening");
            let eval_end = t + (cfg.eval_hours * HOUR_MS) as i64;
            for u in 0..run.tvs.len() {
                run.tvs[u].on_until = eval_end;
                if !run.tvs[u].sync_scheduled {
                    run.tvs[u].sync_scheduled = true;
                    let at = t + run.jitter();
                    syncs.push(Reverse((at, u)));
                }
            }
        }
        if tick.elapsed() > Duration::from_millis(250) {
            tick = Instant::now();
            let day = chrono::DateTime::from_timestamp_millis(t)
                .map(|d| d.format("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_default();
            pb.set_message(format!("{day} · {} syncs · {} rounds", run.syncs, run.rounds));
        }
    }
    // Whatever arrived after the last round.
    run.maybe_round(next_round, true).await;
    pb.finish_with_message(format!("{} syncs · {} rounds", run.syncs, run.rounds));

    // Evaluation.
    let test = EvalOptions { stage: world.holdout, full_ranking: true };
    let pe = bar(
        cfg,
        world,
        evaluable.len() as u64,
        "eval [{elapsed_precise}] {bar:30} {pos}/{len} users",
    );
    let tvs = &run.tvs;
    let mut fed_scorer = |u: u32, items: &[u32]| {
        if items.len() == world.split.n_items {
            pe.inc(1);
        }
        score(&tvs[u as usize].brain, world, u, items)
    };
    let quality = eval::evaluate_per_user(&world.split, &mut fed_scorer, test);
    pe.finish();
    let local_only = if with_local {
        let mut local_scorer = |u: u32, items: &[u32]| match &tvs[u as usize].twin {
            Some(twin) => score(twin, world, u, items),
            None => vec![UNKNOWN_SCORE; items.len()],
        };
        Some(eval::evaluate_per_user(&world.split, &mut local_scorer, test))
    } else {
        None
    };
    let mut latencies: Vec<u64> = Vec::with_capacity(evaluable.len());
    for &u in &evaluable {
        let at =
            world.split.users[u as usize].target(world.holdout).map_or(0, |r| r.timestamp * 1000);
        let t = Instant::now();
        if tvs[u as usize].brain.recommend(&context_at(at), 10).is_ok() {
            latencies.push(t.elapsed().as_micros() as u64);
        }
    }
    // Diagnostics: which vectors the TVs hold where it matters (a score in the collaborative
    // tier means the TV holds the content's vector).
    let tier = omega_device::ranking::COLLABORATIVE_TIER / 2.0;
    let (mut held_targets, mut watched_held) = (0usize, Vec::with_capacity(evaluable.len()));
    for &u in &evaluable {
        let us = &world.split.users[u as usize];
        let Some(t) = us.target(world.holdout) else { continue };
        let s = score(&tvs[u as usize].brain, world, u, &[t.item]);
        held_targets += usize::from(s[0] >= tier);
        let history: Vec<u32> = us.history(world.holdout).iter().map(|r| r.item).collect();
        if !history.is_empty() {
            let s = score(&tvs[u as usize].brain, world, u, &history);
            let held = s.iter().filter(|&&x| x >= tier).count();
            watched_held.push((held * 1000 / history.len()) as u64);
        }
    }
    let (mut globals, mut collab): (Vec<u64>, Vec<u64>) = tvs
        .iter()
        .map(|t| {
            let s = t.brain.stats();
            (s.global_patterns as u64, s.collaborative_vectors as u64)
        })
        .unzip();
    let out = PassOutcome {
        quality,
        local_only,
        transport: Transport {
            bytes_up_p50: p(&mut run.bytes_up, 0.5),
            bytes_down_p50: p(&mut run.bytes_down, 0.5),
            bytes_up_push_p50: p(&mut run.bytes_up_push, 0.5),
            bytes_down_max: p(&mut run.bytes_down, 1.0),
            recommend_p99_ms: p(&mut latencies, 0.99) as f64 / 1000.0,
            globals_p50: p(&mut globals, 0.5),
            collab_vectors_p50: p(&mut collab, 0.5),
            target_held: held_targets as f64 / evaluable.len().max(1) as f64,
            watched_held_p50: p(&mut watched_held, 0.5) as f64 / 1000.0,
        },
        rounds: run.rounds,
        syncs: run.syncs,
        curve: run.curve.clone(),
        epsilon_spent: run.epsilon_spent,
        served: run.served,
        served_below_k: run.served_below_k,
    };
    for tv in run.tvs.drain(..) {
        tv.brain.close()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_not_published_or_below_k_counts_as_served_below_k() {
        let id = |n: u128| uuid::Uuid::from_u128(n);
        let published: HashMap<uuid::Uuid, u32> = [(id(1), 3), (id(2), 7), (id(3), 2)].into();
        assert_eq!(below_k(&[id(1), id(2)], &published, 3), 0);
        // An aggregate with two sources, and an id the round never published (a relayed
        // device pattern).
        assert_eq!(below_k(&[id(1), id(3), id(9)], &published, 3), 2);
        assert_eq!(below_k(&[id(1), id(2)], &published, 4), 1);
        assert_eq!(below_k(&[id(1)], &HashMap::new(), 1), 1);
    }
}
