//! `omega-load`: many simulated devices syncing against one shard server over real gRPC.
//!
//! Each device registers once, then syncs back to back: a delta of random patterns built with
//! `omega-protocol` (random unit embeddings, success rates uniform in [0.5, 1], so ~60% pass
//! the shard's 0.7 filter), now and then an update or a removal of one of its earlier
//! patterns. Devices are spread over `concurrency` workers; each worker syncs its devices in
//! turn, one request in flight at a time. (With every device in flight at once, 2,000 devices
//! at 2,500 syncs/s would mean 0.8 s per sync by Little's law, whatever the server does.)

pub mod echo;
pub mod flood;
pub mod report;
pub mod spawn;

use omega_protocol::pb;
use omega_protocol::pb::constellation_client::ConstellationClient;
use omega_protocol::types::{
    ContentType, DayType, Pattern, PatternContext, PatternDelta, PatternUpdate, TimeSlot,
};
use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize};
use omega_protocol::wire::grpc_zstd_size;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use report::{Report, Sample};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `http://host:port` of the shard's `Constellation` service.
    pub target: String,
    /// Simulated devices.
    pub devices: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// HTTP/2 connections shared by the workers.
    pub connections: usize,
    /// How long to sync after registration.
    pub duration: Duration,
    /// Patterns added per sync.
    pub patterns_per_sync: usize,
    /// Region devices register with.
    pub region: String,
    /// Model id on the deltas.
    pub model_id: String,
    /// Prefix of device ids (unique per run unless given).
    pub device_prefix: String,
    /// Random seed.
    pub seed: u64,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Cannot connect.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// Registration failed.
    #[error("registering device {0} failed: {1}")]
    Register(String, String),
}

struct Device {
    id: String,
    token: String,
    local_version: u64,
    own: Vec<Uuid>,
    known_global: u64,
}

const GENRES: &[&str] = &[
    "drama",
    "comedy",
    "action",
    "thriller",
    "crime",
    "romance",
    "documentary",
    "animation",
    "horror",
    "sci-fi",
    "family",
    "sports",
];

/// A random unit embedding (uniform components, normalised).
pub fn random_embedding(rng: &mut StdRng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..EMBEDDING_DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    l2_normalize(&mut v);
    v
}

/// A random pattern of `model_id`.
pub fn random_pattern(rng: &mut StdRng, model_id: &str, now_ms: i64) -> Pattern {
    let slots = [TimeSlot::Morning, TimeSlot::Afternoon, TimeSlot::Evening, TimeSlot::Night];
    let types =
        [ContentType::Movie, ContentType::Series, ContentType::Documentary, ContentType::Kids];
    let n_genres = rng.random_range(1..=3);
    Pattern {
        id: Uuid::now_v7(),
        content_id: format!("content-{}", rng.random_range(0..50_000)),
        embedding: random_embedding(rng),
        model_id: model_id.into(),
        success_rate: rng.random_range(0.5f32..=1.0),
        sample_count: rng.random_range(1..20),
        context: PatternContext {
            time_slot: slots[rng.random_range(0..slots.len())],
            day_type: if rng.random_bool(0.3) { DayType::Weekend } else { DayType::Weekday },
            content_type: types[rng.random_range(0..types.len())],
            genres: (0..n_genres)
                .map(|_| GENRES[rng.random_range(0..GENRES.len())].into())
                .collect(),
        },
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn next_delta(dev: &mut Device, rng: &mut StdRng, cfg: &LoadConfig) -> PatternDelta {
    let now = now_ms();
    let added: Vec<Pattern> =
        (0..cfg.patterns_per_sync).map(|_| random_pattern(rng, &cfg.model_id, now)).collect();
    let mut updated = Vec::new();
    let mut removed = Vec::new();
    if !dev.own.is_empty() && rng.random_bool(0.3) {
        let id = dev.own[rng.random_range(0..dev.own.len())];
        updated.push(PatternUpdate {
            id,
            success_rate: rng.random_range(0.6f32..=1.0),
            extra_samples: 1,
        });
    }
    if dev.own.len() > 24 && rng.random_bool(0.2) {
        let id = dev.own.swap_remove(0);
        if !updated.iter().any(|u| u.id == id) {
            removed.push(id);
        }
    }
    PatternDelta {
        added,
        updated,
        removed,
        local_version: dev.local_version + 1,
        model_id: cfg.model_id.clone(),
    }
}

/// Opens `n` channels to `target`.
pub async fn connect(target: &str, n: usize) -> Result<Vec<Channel>, LoadError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ep = Endpoint::from_shared(target.to_owned())
            .map_err(|e| LoadError::Connect(target.into(), e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        out.push(ep.connect().await.map_err(|e| LoadError::Connect(target.into(), e.to_string()))?);
    }
    Ok(out)
}

/// A `Constellation` client with zstd both ways.
pub fn client(ch: Channel) -> ConstellationClient<Channel> {
    ConstellationClient::new(ch)
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(omega_protocol::validate::MAX_MESSAGE_BYTES)
}

/// Live counters for the progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    /// Successful syncs.
    pub ok: AtomicU64,
    /// Failed syncs.
    pub errors: AtomicU64,
}

/// Registrations in flight per connection.
const REGISTER_STREAMS_PER_CONNECTION: usize = 8;

/// Registers one device. A shard limits registrations per client address
/// (`REGISTER_RATE_*`), and all simulated devices share this one: when refused with
/// RESOURCE_EXHAUSTED, wait and try again (for up to ~2 minutes), like a real client.
async fn register(
    c: &mut ConstellationClient<Channel>,
    req: pb::RegisterRequest,
) -> Result<tonic::Response<pb::RegisterResponse>, tonic::Status> {
    let mut wait = Duration::from_millis(100);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match c.register(req.clone()).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// Registers the devices, then syncs for `cfg.duration`. `progress` is updated live.
pub async fn run(cfg: &LoadConfig, progress: Arc<Progress>) -> Result<Report, LoadError> {
    let channels = connect(&cfg.target, cfg.connections).await?;
    let mut devices = Vec::with_capacity(cfg.devices);
    // Register with bounded concurrency: at most the shard's default
    // MAX_STREAMS_PER_CONNECTION per connection. A fresh HTTP/2 connection does not know the
    // server's stream limit until its SETTINGS arrive, and a burst of streams beyond it is
    // refused, which the shard's reset-flood guard may answer by closing the connection.
    let ids: Vec<String> =
        (0..cfg.devices).map(|i| format!("{}-{i:06}", cfg.device_prefix)).collect();
    for chunk in ids.chunks(REGISTER_STREAMS_PER_CONNECTION * channels.len()) {
        let mut set = tokio::task::JoinSet::new();
        for (k, id) in chunk.iter().enumerate() {
            let mut c = client(channels[k % channels.len()].clone());
            let req = pb::RegisterRequest {
                device_id: id.clone(),
                region: cfg.region.clone(),
                model_id: cfg.model_id.clone(),
                client_version: "omega-load".into(),
                ..Default::default()
            };
            let id = id.clone();
            set.spawn(async move {
                let r = register(&mut c, req).await;
                (id, r.map(|r| r.into_inner().device_token))
            });
        }
        while let Some(r) = set.join_next().await {
            let Ok((id, r)) = r else { continue };
            let token = r.map_err(|e| LoadError::Register(id.clone(), e.message().to_owned()))?;
            devices.push(Device { id, token, local_version: 0, own: Vec::new(), known_global: 0 });
        }
    }
    let workers = cfg.concurrency.clamp(1, devices.len().max(1));
    let mut groups: Vec<Vec<Device>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, d) in devices.into_iter().enumerate() {
        groups[i % workers].push(d);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (w, group) in groups.into_iter().enumerate() {
        let mut c = client(channels[w % channels.len()].clone());
        let stop = stop.clone();
        let cfg = cfg.clone();
        let progress = progress.clone();
        set.spawn(async move {
            let mut rng = StdRng::seed_from_u64(cfg.seed ^ (w as u64).wrapping_mul(0x9E37_79B9));
            let mut group = group;
            let mut samples = Vec::new();
            let mut errors: Vec<String> = Vec::new();
            'outer: loop {
                for dev in group.iter_mut() {
                    if stop.load(Ordering::Relaxed) {
                        break 'outer;
                    }
                    let delta = next_delta(dev, &mut rng, &cfg);
                    let msg = pb::SyncRequest {
                        device_id: dev.id.clone(),
                        delta: Some(delta.to_wire()),
                        known_global_version: dev.known_global,
                    };
                    // Measuring compresses the message again: sample one sync in 8.
                    let measure = samples.len() % 8 == 0;
                    let up = if measure { grpc_zstd_size(&msg) } else { 0 };
                    let mut req = tonic::Request::new(msg);
                    if let Ok(v) = format!("Bearer {}", dev.token).parse() {
                        req.metadata_mut().insert("authorization", v);
                    }
                    let t0 = Instant::now();
                    match c.sync(req).await {
                        Ok(resp) => {
                            let elapsed = t0.elapsed();
                            let resp = resp.into_inner();
                            let down = if measure { grpc_zstd_size(&resp) } else { 0 };
                            dev.local_version =
                                resp.acknowledged_version.max(dev.local_version + 1);
                            dev.known_global = resp.global.as_ref().map_or(0, |g| g.global_version);
                            dev.own.extend(
                                delta.added.iter().filter(|p| p.success_rate >= 0.7).map(|p| p.id),
                            );
                            if dev.own.len() > 32 {
                                dev.own.drain(..dev.own.len() - 32);
                            }
                            samples.push(Sample {
                                latency_us: elapsed.as_micros() as u32,
                                up: up as u32,
                                down: down as u32,
                                similar: resp.global.as_ref().map_or(0, |g| g.similar.len() as u16),
                            });
                            progress.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => {
                            errors.push(format!("{:?}", status.code()));
                            progress.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            (samples, errors)
        });
    }
    tokio::time::sleep(cfg.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok((s, e)) = r {
            samples.extend(s);
            errors.extend(e);
        }
    }
    Ok(Report::build(samples, errors, started.elapsed(), cfg.devices, workers))
}
