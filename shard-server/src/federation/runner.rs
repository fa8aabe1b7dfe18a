//! The round over real gRPC: export from every shard (resumable cursor, zstd), aggregate,
//! publish to every shard (idempotent on round id), with a checkpoint between the steps.

use super::FederationError;
use super::checkpoint::{OutputCounts, RoundState, Store, from_hex, to_hex};
use super::config::FederateArgs;
use super::metrics::FederationMetrics;
use omega_federation::intake::Intake;
use omega_federation::privacy;
use omega_federation::round::{self, RoundConfig};
use omega_protocol::admin::{RoundOutcome, RoundSummary, ShardFailure};
use omega_protocol::pb::{self, shard_admin_client::ShardAdminClient};
use omega_protocol::types::is_collaborative_vector;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::codec::CompressionEncoding;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument as _;
use uuid::Uuid;

/// Largest message accepted from a shard (an export batch of a few thousand patterns).
const MAX_MESSAGE: usize = 64 << 20;

/// Adds the shards' admin token to every call.
#[derive(Debug, Clone)]
pub struct AdminCredential(Option<MetadataValue<Ascii>>);

impl Interceptor for AdminCredential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client of one shard's admin service.
pub type AdminClient = ShardAdminClient<InterceptedService<Channel, AdminCredential>>;

/// A client for one shard's admin service, presenting `args.admin_token` if set.
pub async fn connect(url: &str, args: &FederateArgs) -> Result<AdminClient, FederationError> {
    let timeout = args.timeout();
    let err = |e: &dyn std::fmt::Display| FederationError::Unreachable {
        endpoint: url.into(),
        reason: e.to_string(),
    };
    let channel = Endpoint::from_shared(url.to_owned())
        .map_err(|e| err(&e))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| err(&e))?;
    let credential = match args.admin_token.as_deref() {
        Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
            FederationError::Unreachable {
                endpoint: url.into(),
                reason: "ADMIN_TOKEN is not a valid header value".into(),
            }
        })?),
        None => None,
    };
    Ok(ShardAdminClient::with_interceptor(channel, AdminCredential(credential))
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Runs one round and records it in `metrics`. Never panics and never returns early: every
/// failure ends up in the summary (`outcome: failed`, `message`). Traced as `federation.round`
/// with the phases `collect`, `aggregate` and `publish`.
#[tracing::instrument(
    name = "federation.round",
    skip_all,
    fields(round_id = %args.round_id, trace_id = tracing::field::Empty)
)]
pub async fn run(args: &FederateArgs, metrics: &FederationMetrics) -> RoundSummary {
    omega_telemetry::record_trace_id(&tracing::Span::current());
    let start = Instant::now();
    let mut summary = RoundSummary {
        round_id: args.round_id.clone(),
        outcome: RoundOutcome::Failed,
        shards_total: args.shards.len() as u32,
        shards_completed: 0,
        shards_failed: Vec::new(),
        patterns_in: 0,
        groups: 0,
        patterns_aggregated: 0,
        collaborative_vectors: 0,
        groups_suppressed: 0,
        trends_detected: 0,
        global_version: 0,
        privacy: None,
        already_published: false,
        duration_ms: 0,
        message: None,
    };
    if let Err(e) = run_into(args, &mut summary).await {
        summary.outcome = RoundOutcome::Failed;
        summary.message = Some(e.to_string());
    }
    summary.duration_ms = start.elapsed().as_millis() as u64;
    metrics.record(&summary);
    summary
}

fn failure(endpoint: &str, e: &FederationError) -> ShardFailure {
    ShardFailure { endpoint: endpoint.into(), error: e.to_string() }
}

async fn run_into(args: &FederateArgs, summary: &mut RoundSummary) -> Result<(), FederationError> {
    let cfg = args.round_config()?;
    if args.shards.is_empty() {
        return Err(FederationError::NoShards);
    }
    let store = Arc::new(Store::new(args.state_dir.as_deref(), &args.round_id));
    let state = Arc::new(Mutex::new(store.load(&args.round_id, &args.shards)?));
    let saved = match (snapshot(&state)?.output, store.load_output()?) {
        (Some(counts), Some(req)) => Some((counts, req)),
        _ => None,
    };
    let (counts, req) = match saved {
        Some(s) => s,
        None => {
            let exports = export_all(args, &cfg, &store, &state)
                .instrument(tracing::info_span!("collect", shards = args.shards.len()))
                .await;
            let mut ok = Vec::new();
            for (endpoint, r) in args.shards.iter().zip(exports) {
                match r {
                    Ok(batches) => ok.push(batches),
                    Err(e) => summary.shards_failed.push(failure(endpoint, &e)),
                }
            }
            if !summary.shards_failed.is_empty() && (!args.allow_partial || ok.is_empty()) {
                let names: Vec<&str> =
                    summary.shards_failed.iter().map(|f| f.endpoint.as_str()).collect();
                return Err(FederationError::ShardsFailed {
                    shards: names.join(", "),
                    resumable: store.persistent(),
                });
            }
            let aggregate = tracing::info_span!("aggregate");
            let entered = aggregate.enter();
            let mut intake = Intake::default();
            for batches in &ok {
                for b in batches {
                    intake.add_batch(b, cfg.min_quality)?;
                }
            }
            // The budget is checked before any noise is drawn: a refused round releases
            // nothing (its exports stay in this process).
            let charged = match &cfg.dp {
                Some(p) => {
                    let plan = privacy::plan(p, cfg.min_sources, cfg.collab.is_some());
                    let budget = args.budget(p)?;
                    let ledger = args.ledger()?;
                    let (ledger, composed) =
                        privacy::charge(&ledger, &budget, &plan, crate::clock::now_ms())?;
                    Some((budget, ledger, composed))
                }
                None => None,
            };
            let seed = args.noise_seed()?;
            let out = round::federate(&intake, &cfg, &seed);
            drop(entered);
            let (global_version, shard_model) = next_global_version(args).await;
            // A round that read nothing still publishes (an empty set is the truth), under
            // the shards' own model.
            let model_id = intake.model_id.clone().or(shard_model).unwrap_or_default();
            let req = pb::PublishGlobalRequest {
                round_id: args.round_id.clone(),
                global_version,
                patterns: out.patterns.iter().map(|p| p.to_wire()).collect(),
                trends: out.trends.iter().map(|t| t.to_wire()).collect(),
                model_id,
            };
            let privacy = out.privacy.clone().zip(charged).map(|(mut acc, (b, ledger, c))| {
                acc.composed_epsilon = c.epsilon;
                acc.composed_delta = c.delta;
                acc.rounds_in_period = c.rounds;
                acc.budget_epsilon = b.epsilon;
                acc.period_days = b.period_days;
                acc.ledger = ledger;
                acc
            });
            let counts = OutputCounts {
                patterns_in: intake.items.len() as u64,
                groups: out.stats.groups,
                suppressed: out.stats.suppressed,
                privacy,
            };
            store.save_output(&req)?;
            lock(&state)?.output = Some(counts.clone());
            store.save(&snapshot(&state)?)?;
            (counts, req)
        }
    };
    summary.patterns_in = counts.patterns_in;
    summary.groups = counts.groups;
    summary.groups_suppressed = counts.suppressed;
    let collaborative = req
        .patterns
        .iter()
        .filter(|p| {
            Uuid::from_slice(&p.id).is_ok_and(|id| is_collaborative_vector(&id, &p.content_id))
        })
        .count() as u64;
    summary.collaborative_vectors = collaborative;
    summary.patterns_aggregated = req.patterns.len() as u64 - collaborative;
    summary.trends_detected = req.trends.len() as u64;
    summary.global_version = req.global_version;
    summary.privacy = counts.privacy.clone();

    // Publish to every shard that does not have the round yet (also to one whose export
    // failed: it may be back, and then it serves the round too).
    let pending: Vec<usize> = {
        let st = lock(&state)?;
        (0..args.shards.len()).filter(|&i| !st.shards[i].published).collect()
    };
    let results =
        futures::future::join_all(pending.iter().map(|&i| publish(args, &args.shards[i], &req)))
            .instrument(tracing::info_span!("publish", shards = pending.len()))
            .await;
    let (mut applied, mut replayed) = (0, 0);
    for (&i, r) in pending.iter().zip(results) {
        match r {
            Ok(resp) => {
                if resp.applied {
                    applied += 1
                } else {
                    replayed += 1
                }
                summary.global_version = summary.global_version.max(resp.global_version);
                lock(&state)?.shards[i].published = true;
            }
            Err(e) => {
                if !summary.shards_failed.iter().any(|f| f.endpoint == args.shards[i]) {
                    summary.shards_failed.push(failure(&args.shards[i], &e));
                }
            }
        }
    }
    store.save(&snapshot(&state)?)?;
    let st = snapshot(&state)?;
    // A shard completed the round when it serves the result; one that was unreachable while
    // the round read (and came back for a rerun) serves it without having contributed.
    summary.shards_completed = st.shards.iter().filter(|s| s.published).count() as u32;
    let served_only = st.shards.iter().filter(|s| s.published && !s.exported).count();
    summary.already_published =
        applied == 0 && replayed > 0 || (pending.is_empty() && st.output.is_some());
    let all_published = st.shards.iter().all(|s| s.published);
    summary.outcome = if all_published && summary.shards_failed.is_empty() {
        RoundOutcome::Succeeded
    } else if args.allow_partial && st.shards.iter().any(|s| s.published) {
        RoundOutcome::Partial
    } else if all_published {
        RoundOutcome::Succeeded
    } else {
        return Err(FederationError::ShardsFailed {
            shards: summary
                .shards_failed
                .iter()
                .map(|f| f.endpoint.clone())
                .collect::<Vec<_>>()
                .join(", "),
            resumable: store.persistent(),
        });
    };
    if !summary.shards_failed.is_empty() {
        summary.message = Some(format!(
            "completed without {} shard(s); rerun with the same --round-id to complete it",
            summary.shards_failed.len()
        ));
    } else if served_only > 0 {
        summary.message = Some(format!(
            "{served_only} shard(s) received the round without contributing patterns (unreachable when it read them)"
        ));
    }
    Ok(())
}

fn lock(
    state: &Mutex<RoundState>,
) -> Result<std::sync::MutexGuard<'_, RoundState>, FederationError> {
    state.lock().map_err(|_| FederationError::Internal("checkpoint lock poisoned".into()))
}

fn snapshot(state: &Mutex<RoundState>) -> Result<RoundState, FederationError> {
    Ok(lock(state)?.clone())
}

/// One more than the highest version any shard serves (1 when none answers), and the model
/// of the first shard that answers.
async fn next_global_version(args: &FederateArgs) -> (u64, Option<String>) {
    let asks = args.shards.iter().map(|url| async move {
        let mut c = connect(url, args).await.ok()?;
        let s =
            tokio::time::timeout(args.timeout(), c.stats(pb::StatsRequest {})).await.ok()?.ok()?;
        let s = s.into_inner();
        Some((s.global_version, s.model_id))
    });
    let answers: Vec<(u64, String)> =
        futures::future::join_all(asks).await.into_iter().flatten().collect();
    let version = answers.iter().map(|a| a.0).max().unwrap_or(0) + 1;
    (version, answers.into_iter().map(|a| a.1).find(|m| !m.is_empty()))
}

async fn export_all(
    args: &FederateArgs,
    cfg: &RoundConfig,
    store: &Arc<Store>,
    state: &Arc<Mutex<RoundState>>,
) -> Vec<Result<Vec<pb::ExportBatch>, FederationError>> {
    let tasks = args
        .shards
        .iter()
        .enumerate()
        .map(|(i, url)| export_shard(args, cfg, i, url, store, state));
    futures::future::join_all(tasks).await
}

/// Exports one shard, resuming from its checkpointed cursor, retrying `attempts` times.
async fn export_shard(
    args: &FederateArgs,
    cfg: &RoundConfig,
    shard: usize,
    url: &str,
    store: &Store,
    state: &Mutex<RoundState>,
) -> Result<Vec<pb::ExportBatch>, FederationError> {
    let progress = lock(state)?.shards[shard].clone();
    let mut batches = store.spooled(shard, progress.batches)?;
    if (batches.len() as u64) < progress.batches {
        // The spool lost batches the checkpoint counted: start this shard over.
        store.reset_spool(shard)?;
        batches.clear();
        let mut st = lock(state)?;
        st.shards[shard].cursor.clear();
        st.shards[shard].batches = 0;
        st.shards[shard].exported = false;
    }
    if lock(state)?.shards[shard].exported {
        return Ok(batches);
    }
    let mut last_err =
        FederationError::Unreachable { endpoint: url.into(), reason: "no attempt".into() };
    for attempt in 0..args.attempts.max(1) {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
        }
        match export_once(args, cfg, shard, url, store, state, &mut batches).await {
            Ok(()) => return Ok(batches),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

async fn export_once(
    args: &FederateArgs,
    cfg: &RoundConfig,
    shard: usize,
    url: &str,
    store: &Store,
    state: &Mutex<RoundState>,
    batches: &mut Vec<pb::ExportBatch>,
) -> Result<(), FederationError> {
    let status = |e: tonic::Status| FederationError::Unreachable {
        endpoint: url.into(),
        reason: e.to_string(),
    };
    let timed_out =
        || FederationError::Unreachable { endpoint: url.into(), reason: "timed out".into() };
    let mut client = connect(url, args).await?;
    let after = from_hex(&lock(state)?.shards[shard].cursor);
    let req = pb::ExportPatternsRequest {
        min_quality: cfg.min_quality,
        round_id: args.round_id.clone(),
        batch_size: args.batch_size,
        after,
    };
    let mut stream = tokio::time::timeout(args.timeout(), client.export_patterns(req))
        .await
        .map_err(|_| timed_out())?
        .map_err(status)?
        .into_inner();
    loop {
        let next = tokio::time::timeout(args.timeout(), stream.message())
            .await
            .map_err(|_| timed_out())?;
        let Some(batch) = next.map_err(status)? else {
            return Err(FederationError::Unreachable {
                endpoint: url.into(),
                reason: "export ended before its last batch".into(),
            });
        };
        store.append(shard, &batch)?;
        let last = batch.last;
        {
            let mut st = lock(state)?;
            let p = &mut st.shards[shard];
            p.cursor = to_hex(&batch.cursor);
            p.batches += 1;
            p.exported = last;
        }
        batches.push(batch);
        store.save(&snapshot(state)?)?;
        if last {
            return Ok(());
        }
    }
}

async fn publish(
    args: &FederateArgs,
    url: &str,
    req: &pb::PublishGlobalRequest,
) -> Result<pb::PublishGlobalResponse, FederationError> {
    let mut last_err =
        FederationError::Unreachable { endpoint: url.into(), reason: "no attempt".into() };
    for attempt in 0..args.attempts.max(1) {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
        }
        let r = async {
            let mut c = connect(url, args).await?;
            tokio::time::timeout(args.timeout(), c.publish_global(req.clone()))
                .await
                .map_err(|_| FederationError::Unreachable {
                    endpoint: url.into(),
                    reason: "timed out".into(),
                })?
                .map(|r| r.into_inner())
                .map_err(|e| FederationError::Unreachable {
                    endpoint: url.into(),
                    reason: e.to_string(),
                })
        }
        .await;
        match r {
            Ok(resp) => return Ok(resp),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}
