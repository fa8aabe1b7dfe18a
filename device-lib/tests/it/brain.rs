//! The brain's behaviour: learning, recommending, scoring, deltas, global patterns, limits,
//! bad input.

use crate::common::{SAT_EVENING, catalogue, embedder, event};
use omega_device::{
    Brain, BrainConfig, DeviceError, Embedder, EmbedderConfig, RecommendContext, Source,
    UNKNOWN_SCORE,
};
use omega_protocol::validate;
use omega_protocol::{
    DayType, GlobalPatterns, Pattern, PatternContext, TimeSlot, TrendSignal, TrendTarget,
    ViewingEvent,
};
use uuid::Uuid;

pub fn brain_with(cfg: BrainConfig) -> Brain {
    Brain::open_shared(cfg, embedder(), Some(catalogue())).expect("brain opens")
}

pub fn brain() -> Brain {
    brain_with(BrainConfig { device_id: Some("tv-test".into()), ..Default::default() })
}

pub fn evening() -> RecommendContext {
    RecommendContext {
        now_ms: Some(SAT_EVENING + 3_600_000),
        time_slot: Some(TimeSlot::Evening),
        day_type: Some(DayType::Weekend),
        ..Default::default()
    }
}

#[test]
fn observe_creates_then_smooths_a_pattern_per_content_and_context() {
    let mut b = brain();
    let first = b.observe(&event("heat", 0.9, 0)).expect("observe");
    assert!(first.created);
    assert_eq!((first.sample_count, first.success_rate), (1, 0.9));
    let second = b.observe(&event("heat", 0.5, 60)).expect("observe");
    assert!(!second.created);
    assert_eq!(second.pattern_id, first.pattern_id);
    assert_eq!(second.sample_count, 2);
    assert!((second.success_rate - 0.7).abs() < 1e-6);
    // Another context (derived from the clock: Monday 08:00 UTC) is another pattern.
    let mut monday = event("heat", 1.0, 0);
    monday.context = None;
    monday.started_at_ms = 1_704_700_800_000 + 8 * 3_600_000;
    let third = b.observe(&monday).expect("observe");
    assert!(third.created);
    assert_ne!(third.pattern_id, first.pattern_id);
    let s = b.stats();
    assert_eq!((s.patterns, s.watched), (2, 1));
}

#[test]
fn recommend_follows_taste_excludes_watched_and_explains() {
    let mut b = brain();
    for (i, id) in ["godfather", "goodfellas"].iter().enumerate() {
        b.observe(&event(id, 0.95, i as i64 * 150)).expect("observe");
    }
    b.observe(&event("frozen", 0.05, 400)).expect("observe");
    let recs = b.recommend(&evening(), 5).expect("recommend");
    assert_eq!(recs.len(), 5);
    assert!(recs.windows(2).all(|w| w[0].score >= w[1].score));
    for r in &recs {
        assert!(!["godfather", "goodfellas", "frozen"].contains(&r.content_id.as_str()));
        assert_eq!(r.source, Source::Catalogue);
        assert!(r.reason.starts_with("because you watched"), "{}", r.reason);
    }
    let top3: Vec<&str> = recs.iter().take(3).map(|r| r.content_id.as_str()).collect();
    let crime = ["casino", "scarface", "departed", "heat"];
    assert!(top3.iter().all(|c| crime.contains(c)), "top 3 should be crime films: {top3:?}");
    assert!(b.recommend(&evening(), 0).expect("k = 0").is_empty());
    assert_eq!(b.recommend(&evening(), 1_000).expect("capped").len(), 15);
}

#[test]
fn a_new_brain_still_recommends_from_the_context() {
    let b = brain();
    let recs = b.recommend(&RecommendContext::default(), 3).expect("cold start");
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|r| r.reason.starts_with("for")), "{recs:?}");
}

#[test]
fn score_ranks_candidates_and_flags_unknown_ids() {
    let mut b = brain();
    b.observe(&event("godfather", 1.0, 0)).expect("observe");
    let ids: Vec<String> = ["goodfellas", "nemo", "no-such-content", "godfather"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let scores = b.score(&evening(), &ids).expect("score");
    assert_eq!(scores.len(), 4);
    assert!(scores[0] > scores[1], "{scores:?}");
    assert_eq!(scores[2], UNKNOWN_SCORE);
    assert!(scores[3] >= 0.0);
    assert!(b.score(&evening(), &[]).expect("empty").is_empty());
    let too_many = vec!["x".to_string(); 10_001];
    assert!(matches!(b.score(&evening(), &too_many), Err(DeviceError::Invalid(_))));
}

#[test]
fn delta_is_stable_until_acknowledged_and_nothing_is_lost_meanwhile() {
    let mut b = brain();
    assert!(b.prepare_delta().expect("empty").is_none());
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    b.observe(&event("nemo", 0.1, 10)).expect("observe"); // below share_min_success: kept local
    let d1 = b.prepare_delta().expect("delta").expect("something to send");
    assert_eq!(d1.local_version, 1);
    assert_eq!(d1.added.len(), 1);
    assert_eq!(d1.added[0].content_id, "heat");
    assert_eq!(d1.model_id, omega_protocol::DEFAULT_MODEL_ID);
    // Offline: more viewing while the delta is unacknowledged.
    b.observe(&event("heat", 0.5, 100)).expect("observe");
    b.observe(&event("casino", 0.8, 200)).expect("observe");
    let retry = b.prepare_delta().expect("delta").expect("same delta");
    assert_eq!(retry, d1, "a retry sends the very same delta");
    assert!(b.stats().delta_in_flight);
    assert!(matches!(b.acknowledge(7), Err(DeviceError::State(_))));
    b.acknowledge(1).expect("ack");
    b.acknowledge(1).expect("a repeated ack is a no-op");
    let d2 = b.prepare_delta().expect("delta").expect("the changes made meanwhile");
    assert_eq!(d2.local_version, 2);
    assert_eq!(d2.added.iter().map(|p| p.content_id.as_str()).collect::<Vec<_>>(), vec!["casino"]);
    assert_eq!(d2.updated.len(), 1);
    assert_eq!(d2.updated[0].id, d1.added[0].id);
    assert_eq!(d2.updated[0].extra_samples, 1);
    assert!((d2.updated[0].success_rate - 0.7).abs() < 1e-6);
    b.acknowledge(2).expect("ack");
    assert!(b.prepare_delta().expect("nothing left").is_none());
    let s = b.stats();
    assert_eq!((s.local_version, s.acked_version, s.delta_in_flight), (2, 2, false));
}

#[test]
fn capacity_evicts_the_least_valuable_pattern_and_tells_the_shard() {
    let mut b = brain_with(BrainConfig { max_patterns: 3, ..Default::default() });
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    b.observe(&event("nemo", 0.0, 1)).expect("observe"); // the worst
    b.observe(&event("casino", 0.8, 2)).expect("observe");
    let d = b.prepare_delta().expect("delta").expect("some");
    b.acknowledge(d.local_version).expect("ack");
    let out = b.observe(&event("planet", 0.9, 3)).expect("observe");
    let s = b.stats();
    assert_eq!((s.patterns, s.evictions), (3, 1));
    assert!(out.evicted.is_some());
    // nemo was never sent (below the share threshold): nothing to remove on the shard.
    let d = b.prepare_delta().expect("delta").expect("planet");
    assert!(d.removed.is_empty());
    b.acknowledge(d.local_version).expect("ack");
    // Now evict one the shard knows.
    b.observe(&event("derby", 0.95, 10_000)).expect("observe");
    let d = b.prepare_delta().expect("delta").expect("derby + removal");
    assert_eq!(d.removed.len(), 1);
}

fn global_pattern(content_id: &str, text: &str, quality: f32) -> Pattern {
    Pattern {
        id: Uuid::now_v7(),
        content_id: content_id.into(),
        embedding: embedder().embed(text).expect("embed"),
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        success_rate: quality,
        sample_count: 10,
        context: PatternContext { time_slot: TimeSlot::Evening, ..Default::default() },
        created_at_ms: SAT_EVENING,
        updated_at_ms: SAT_EVENING,
    }
}

pub fn global(version: u64) -> GlobalPatterns {
    GlobalPatterns {
        similar: vec![global_pattern(
            "sopranos",
            "evening weekend series: The Sopranos. crime, drama",
            0.95,
        )],
        trending: vec![TrendSignal {
            target: TrendTarget::ContentId("worldcup".into()),
            score: 3.0,
            region: "eu".into(),
        }],
        global_version: version,
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
    }
}

#[test]
fn global_patterns_and_trends_feed_recommendations() {
    let mut b = brain();
    b.observe(&event("godfather", 1.0, 0)).expect("observe");
    b.apply_global(global(5)).expect("apply");
    let s = b.stats();
    assert_eq!((s.global_patterns, s.trends, s.global_version), (1, 1, 5));
    let recs = b.recommend(&evening(), 17).expect("recommend");
    let sopranos =
        recs.iter().find(|r| r.content_id == "sopranos").expect("global pattern recommended");
    assert_eq!(sopranos.source, Source::Global);
    let trend = recs.iter().find(|r| r.content_id == "worldcup").expect("trend recommended");
    assert_eq!(trend.source, Source::Trending);
    assert_eq!(trend.reason, "trending in eu");
    let scores = b.score(&evening(), &["sopranos".into(), "worldcup".into()]).expect("score");
    assert!(scores.iter().all(|s| *s > 0.0), "{scores:?}");
    // An older version arriving late changes nothing.
    let mut old = global(3);
    old.similar[0].content_id = "late".into();
    b.apply_global(old).expect("stale is ignored");
    assert_eq!(b.stats().global_patterns, 1);
}

#[test]
fn bad_global_patterns_are_refused_whole() {
    let mut b = brain();
    b.apply_global(global(1)).expect("apply");
    let mut other_model = global(2);
    other_model.model_id = "another-model".into();
    assert!(matches!(b.apply_global(other_model), Err(DeviceError::ModelMismatch { .. })));
    let mut nan = global(2);
    nan.similar[0].embedding[3] = f32::NAN;
    assert!(matches!(b.apply_global(nan), Err(DeviceError::Invalid(_))));
    let mut short = global(2);
    short.similar[0].embedding.truncate(10);
    assert!(matches!(b.apply_global(short), Err(DeviceError::Invalid(_))));
    let mut rate = global(2);
    rate.similar[0].success_rate = 1.5;
    assert!(matches!(b.apply_global(rate), Err(DeviceError::Invalid(_))));
    let mut negative = global(2);
    negative.similar[0].created_at_ms = -1;
    let err = b.apply_global(negative).expect_err("negative created_at_ms");
    assert!(err.to_string().contains("global.similar[0].created_at_ms"), "{err}");
    let mut future = global(2);
    future.similar[0].updated_at_ms = i64::MAX;
    let err = b.apply_global(future).expect_err("absurd updated_at_ms");
    assert!(err.to_string().contains("global.similar[0].updated_at_ms"), "{err}");
    let s = b.stats();
    assert_eq!((s.global_patterns, s.global_version), (1, 1), "nothing half-applied");
}

#[test]
fn bad_events_are_refused_and_leave_patterns_intact() {
    let mut b = brain();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    type Mutation = Box<dyn Fn(&mut ViewingEvent)>;
    let bad: Vec<(&str, Mutation)> = vec![
        ("NaN fraction", Box::new(|e| e.watch_fraction = f32::NAN)),
        ("inf fraction", Box::new(|e| e.watch_fraction = f32::INFINITY)),
        ("fraction 1.5", Box::new(|e| e.watch_fraction = 1.5)),
        ("empty id", Box::new(|e| e.content_id.clear())),
        ("oversized id", Box::new(|e| e.content_id = "x".repeat(257))),
        ("oversized title", Box::new(|e| e.title = "t".repeat(10_000))),
        ("17 genres", Box::new(|e| e.genres = vec!["g".into(); 17])),
        ("negative time", Box::new(|e| e.started_at_ms = -1)),
        ("year 2200", Box::new(|e| e.started_at_ms = validate::MAX_TIMESTAMP_MS + 1)),
        ("i64::MAX time", Box::new(|e| e.started_at_ms = i64::MAX)),
    ];
    for (name, mutate) in bad {
        let mut e = event("casino", 0.5, 1);
        mutate(&mut e);
        assert!(matches!(b.observe(&e), Err(DeviceError::Invalid(_))), "{name}");
    }
    for json in [
        r#"{"content_id": 5, "started_at_ms": 1, "watch_fraction": 0.5}"#,
        r#"{"content_id": "a", "started_at_ms": "soon", "watch_fraction": 0.5}"#,
        r#"{"content_id": "a", "started_at_ms": 1, "watch_fraction": 0.5, "content_type": "opera"}"#,
        r#"{"content_id": "a""#,
    ] {
        assert!(serde_json::from_str::<ViewingEvent>(json).is_err(), "{json}");
    }
    // 1e39 does not fit an f32: it parses as infinity, which validation refuses.
    let huge: ViewingEvent = serde_json::from_str(
        r#"{"content_id": "casino", "started_at_ms": 1, "watch_fraction": 1e39}"#,
    )
    .expect("parses");
    let err = b.observe(&huge).expect_err("1e39");
    assert!(err.to_string().contains("watch_fraction must be finite"), "{err}");
    let bad_ctx = RecommendContext { genres: vec!["g".repeat(300)], ..evening() };
    assert!(matches!(b.recommend(&bad_ctx, 3), Err(DeviceError::Invalid(_))));
    let bad_ctx = RecommendContext { now_ms: Some(-5), ..evening() };
    assert!(matches!(b.score(&bad_ctx, &["heat".into()]), Err(DeviceError::Invalid(_))));
    assert_eq!(b.stats().patterns, 1);
    assert_eq!(b.stats().watched, 1);
}

#[test]
fn bad_configs_are_refused() {
    let cases = [
        BrainConfig { max_patterns: 0, ..Default::default() },
        BrainConfig { share_min_success: f32::NAN, ..Default::default() },
        BrainConfig { device_id: Some(String::new()), ..Default::default() },
        BrainConfig { utc_offset_minutes: 100_000, ..Default::default() },
    ];
    for cfg in cases {
        assert!(
            matches!(
                Brain::open_shared(cfg.clone(), embedder(), None),
                Err(DeviceError::Invalid(_))
            ),
            "{cfg:?}"
        );
    }
    assert!(serde_json::from_str::<BrainConfig>(r#"{"max_patterns": "many"}"#).is_err());
    assert!(serde_json::from_str::<BrainConfig>(r#"{"no_such_option": 1}"#).is_err());
}

/// Sizes a C caller can set to anything: each is range-checked, with the field named, before
/// anything is allocated or loaded.
#[test]
fn every_size_in_a_config_is_range_checked_by_name() {
    let embedder_cfg = |f: fn(&mut EmbedderConfig)| {
        let mut c = BrainConfig::default();
        f(&mut c.embedder);
        c
    };
    let cases: Vec<(BrainConfig, &str)> = vec![
        (BrainConfig { max_watched: 0, ..Default::default() }, "max_watched = 0"),
        (BrainConfig { max_watched: usize::MAX, ..Default::default() }, "max_watched"),
        (BrainConfig { max_global_patterns: 1 << 40, ..Default::default() }, "max_global_patterns"),
        (BrainConfig { memory_budget_bytes: 0, ..Default::default() }, "memory_budget_bytes = 0"),
        (BrainConfig { memory_budget_bytes: usize::MAX, ..Default::default() }, "memory_budget"),
        (embedder_cfg(|e| e.cache_capacity = 1_000_000_000_000), "embedder.cache_capacity"),
        (embedder_cfg(|e| e.cache_capacity = 0), "embedder.cache_capacity = 0"),
        (embedder_cfg(|e| e.intra_threads = 0), "embedder.intra_threads = 0"),
        (embedder_cfg(|e| e.intra_threads = 100_000), "embedder.intra_threads"),
        (embedder_cfg(|e| e.max_tokens = 1), "embedder.max_tokens = 1"),
        (embedder_cfg(|e| e.max_tokens = 1 << 30), "embedder.max_tokens"),
        (embedder_cfg(|e| e.model_id.clear()), "embedder.model_id is required"),
    ];
    for (cfg, want) in cases {
        // Brain::open checks before it loads anything (so no model is loaded here).
        match Brain::open(cfg) {
            Err(e @ DeviceError::Invalid(_)) => assert!(e.to_string().contains(want), "{e}"),
            other => panic!("{want}: expected Invalid, got {other:?}"),
        }
    }
    let mut ranking = BrainConfig::default();
    ranking.ranking.seeds = 0;
    let err = Brain::open_shared(ranking, embedder(), None).expect_err("seeds 0");
    assert!(err.to_string().contains("ranking.seeds"), "{err}");
    // The embedder checks its own config too (without a prefix).
    let err = Embedder::new(EmbedderConfig { cache_capacity: usize::MAX, ..Default::default() })
        .expect_err("huge cache");
    assert!(err.to_string().contains("cache_capacity"), "{err}");
    // Capacity arithmetic saturates instead of overflowing.
    let huge = BrainConfig {
        max_global_patterns: usize::MAX,
        max_watched: usize::MAX,
        memory_budget_bytes: usize::MAX,
        ..Default::default()
    };
    assert_eq!(huge.effective_max_patterns(), 1);
}

#[test]
fn a_missing_model_is_an_asset_error_through_brain_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = BrainConfig {
        embedder: EmbedderConfig {
            model_path: Some(dir.path().join("no-model.onnx")),
            ..Default::default()
        },
        ..Default::default()
    };
    match Brain::open(cfg) {
        Err(e @ DeviceError::Asset { .. }) => {
            assert!(e.to_string().contains("no-model.onnx"), "{e}");
            assert_eq!(e.code(), omega_device::ErrorCode::Asset);
        }
        other => panic!("expected an asset error, got {other:?}"),
    }
}

#[test]
fn stats_report_sizes_and_budget() {
    let mut b = brain_with(BrainConfig { memory_budget_bytes: 8 << 20, ..Default::default() });
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let s = b.stats();
    assert!(!s.device_id.is_empty());
    assert!(s.max_patterns < 10_000, "the budget lowers the capacity: {}", s.max_patterns);
    assert!(s.memory_bytes > 384 && s.memory_bytes < s.memory_budget_bytes);
    assert_eq!(s.catalogue_items, 18);
    assert_eq!(s.model_id, omega_protocol::DEFAULT_MODEL_ID);
    assert_eq!(s.unsynced_changes, 1);
}

#[test]
fn the_catalogue_searches_real_embeddings() {
    let cat = catalogue();
    let b = brain();
    assert_eq!(b.catalogue().map(|c| c.len()), Some(cat.len()));
    assert!(!cat.is_empty() && !cat.index().is_hnsw());
    assert_eq!(cat.model_id(), embedder().model_id());
    assert_eq!(cat.items().len(), 18);
    assert!(cat.heap_bytes() > 18 * 384);
    let q = omega_protocol::vector::quantize(
        &embedder().embed("kids: an animated film for children").expect("embed"),
    );
    let top: Vec<&str> =
        cat.search(&q, 4).iter().map(|(i, _)| cat.item(*i as usize).content_id.as_str()).collect();
    let kids = ["toystory", "lionking", "frozen", "nemo"];
    assert!(top.iter().filter(|c| kids.contains(c)).count() >= 3, "{top:?}");
    let pos = cat.position("nemo").expect("nemo");
    assert_eq!(cat.get("nemo").map(|i| i.title.as_str()), Some("Finding Nemo"));
    assert!((cat.similarity(pos, &cat.embedding(pos)) - 1.0).abs() < 0.01);
}

/// A content's collaborative item vector `v` as the federation publishes it.
fn collaborative(content_id: &str, v: &[f32]) -> Pattern {
    let mut embedding = vec![0.0f32; omega_protocol::vector::EMBEDDING_DIM];
    embedding[..v.len()].copy_from_slice(v);
    Pattern {
        id: omega_protocol::types::collaborative_vector_id(content_id),
        content_id: content_id.into(),
        embedding,
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        success_rate: 0.9,
        sample_count: 30,
        context: PatternContext::default(),
        created_at_ms: SAT_EVENING,
        updated_at_ms: SAT_EVENING,
    }
}

fn collaborative_global(version: u64) -> GlobalPatterns {
    GlobalPatterns {
        similar: vec![
            // Watched: the profile is (0.5, 0.5, 0, ...) + (0.5, 0.3, 0, ...).
            collaborative("heat", &[0.5, 0.5]),
            collaborative("godfather", &[0.5, 0.3]),
            // Candidates, in the expected order: along the profile, orthogonal, against it.
            collaborative("cand-good", &[0.6, 0.6]),
            collaborative("cand-short", &[0.1, 0.1]),
            collaborative("cand-orthogonal", &[0.0, 0.0, 0.9]),
            collaborative("cand-bad", &[-0.7, -0.5]),
        ],
        trending: vec![],
        global_version: version,
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
    }
}

#[test]
fn collaborative_vectors_rank_by_the_query_over_what_was_watched() {
    let mut b = brain();
    b.observe(&event("heat", 1.0, 0)).expect("observe");
    b.observe(&event("godfather", 0.9, 10)).expect("observe");
    // A plain (v7) global pattern: content-scored, below every collaborative candidate.
    let mut g = collaborative_global(4);
    g.similar.extend(global(4).similar);
    b.apply_global(g).expect("apply");
    assert_eq!((b.stats().collaborative_vectors, b.stats().global_patterns), (6, 7));
    let ids: Vec<String> =
        ["cand-good", "cand-short", "cand-orthogonal", "cand-bad", "sopranos", "never-heard"]
            .map(String::from)
            .into();
    let s = b.score(&evening(), &ids).expect("score");
    assert!(s[0] > s[1] && s[1] > s[2] && s[2] > s[3], "collaborative order: {s:?}");
    assert!(s[3] > s[4] && s[4] > 0.0, "content-only candidates rank below: {s:?}");
    assert_eq!(s[5], UNKNOWN_SCORE);
    // The score is tier + a_i · q / (1 + mix), q = unit(godfather + 2^(-1/3) heat) +
    // unit(godfather + heat) = (1.571, 1.238): cand-good = 0.6 * 2.809 / 2 = 0.843.
    let tier = omega_device::ranking::COLLABORATIVE_TIER;
    assert!((s[0] - tier - 0.843).abs() < 0.02, "{}", s[0] - tier);
    // recommend agrees and never offers what was watched.
    let recs = b.recommend(&evening(), 3).expect("recommend");
    assert_eq!(recs[0].content_id, "cand-good");
    assert_eq!(recs[0].source, Source::Global);
    assert!(recs.iter().all(|r| r.content_id != "heat" && r.content_id != "godfather"));
    // A newer round replaces the vectors (same ids), it does not pile up copies.
    let mut next = collaborative_global(5);
    next.similar[2] = collaborative("cand-good", &[-0.9, -0.6]);
    b.apply_global(next).expect("apply");
    let s = b.score(&evening(), &ids).expect("score");
    assert!(s[0] < s[3], "cand-good now points away: {s:?}");
}

#[test]
fn what_was_watched_last_weighs_most_in_collaborative_scores() {
    let g = GlobalPatterns {
        similar: vec![
            collaborative("long-ago", &[0.8, 0.0]),
            collaborative("last-night", &[0.0, 0.8]),
            collaborative("like-long-ago", &[0.9, 0.0]),
            collaborative("like-last-night", &[0.0, 0.9]),
        ],
        trending: vec![],
        global_version: 3,
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
    };
    let ids: Vec<String> = vec!["like-long-ago".into(), "like-last-night".into()];
    let mut b = brain();
    b.observe(&event("long-ago", 1.0, 0)).expect("observe");
    b.observe(&event("last-night", 1.0, 600)).expect("observe");
    b.apply_global(g.clone()).expect("apply");
    let s = b.score(&evening(), &ids).expect("score");
    // q = unit(last-night + 2^(-1/3) long-ago) + unit(both) = (1.329, 1.490): the two
    // candidates score 1.196 and 1.341, halved by the bound 1 + mix.
    assert!(s[1] > s[0] + 0.05, "the recent taste leads: {s:?}");
    // Watching the old favourite again makes it the most recent: the order flips, without a
    // new round (the query follows every observe).
    b.observe(&event("long-ago", 1.0, 1200)).expect("observe");
    let s = b.score(&evening(), &ids).expect("score");
    assert!(s[0] > s[1] + 0.05, "rewatched: {s:?}");
    // With an infinite half-life, history is all that counts: a tie.
    let mut cfg = BrainConfig { device_id: Some("tv-no-recency".into()), ..Default::default() };
    cfg.ranking.collaborative_query.half_life = f32::INFINITY;
    let mut flat = brain_with(cfg);
    flat.observe(&event("long-ago", 1.0, 0)).expect("observe");
    flat.observe(&event("last-night", 1.0, 600)).expect("observe");
    flat.apply_global(g).expect("apply");
    let s = flat.score(&evening(), &ids).expect("score");
    assert!((s[0] - s[1]).abs() < 0.01, "{s:?}");
}

#[test]
fn collaborative_ranking_needs_a_profile_and_can_be_turned_off() {
    // Nothing watched has a vector: content similarity alone (no tier).
    let mut b = brain();
    b.observe(&event("derby", 1.0, 0)).expect("observe");
    b.apply_global(collaborative_global(1)).expect("apply");
    let tier = omega_device::ranking::COLLABORATIVE_TIER;
    let s = b.score(&evening(), &["cand-good".into()]).expect("score");
    assert!(s[0] < tier, "{s:?}");
    // Turned off: the same.
    let mut cfg = BrainConfig { device_id: Some("tv-off".into()), ..Default::default() };
    cfg.ranking.collaborative_weight = 0.0;
    let mut off = brain_with(cfg);
    off.observe(&event("heat", 1.0, 0)).expect("observe");
    off.apply_global(collaborative_global(1)).expect("apply");
    let s = off.score(&evening(), &["cand-good".into()]).expect("score");
    assert!(s[0] < tier, "{s:?}");
}

#[test]
fn vectors_of_an_older_round_are_not_mixed_into_collaborative_scores() {
    let run = |current_round_only: bool| {
        let mut cfg = BrainConfig { device_id: Some("tv-rounds".into()), ..Default::default() };
        cfg.ranking.collaborative_current_round_only = current_round_only;
        let mut b = brain_with(cfg);
        b.observe(&event("heat", 1.0, 0)).expect("observe");
        b.apply_global(collaborative_global(1)).expect("round 1");
        assert_eq!(b.stats().collaborative_vectors, 6);
        // Round 2: so far only the vectors of heat and cand-good have arrived.
        let mut g2 = collaborative_global(2);
        g2.similar.retain(|p| p.content_id == "heat" || p.content_id == "cand-good");
        b.apply_global(g2).expect("round 2");
        let s = b.score(&evening(), &["cand-good".into(), "cand-short".into()]).expect("score");
        (b.stats(), s)
    };
    let tier = omega_device::ranking::COLLABORATIVE_TIER;
    let (stats, s) = run(true);
    assert_eq!((stats.global_patterns, stats.collaborative_vectors), (6, 2), "older kept, unused");
    assert!(s[0] >= tier - 1.0 && s[1] < tier - 1.0, "only round 2 is collaborative: {s:?}");
    let (stats, s) = run(false);
    assert_eq!(stats.collaborative_vectors, 6);
    assert!(s.iter().all(|x| *x >= tier - 1.0), "{s:?}");
}

#[test]
fn only_the_delta_in_flight_can_be_quarantined() {
    let mut b = brain();
    assert!(matches!(b.quarantine_delta(1), Err(DeviceError::State(_))), "no delta yet");
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    b.observe(&event("casino", 0.9, 1)).expect("observe");
    let d = b.prepare_delta().expect("delta").expect("some");
    assert!(matches!(b.quarantine_delta(d.local_version + 1), Err(DeviceError::State(_))));
    assert_eq!(b.quarantine_delta(d.local_version).expect("quarantine"), 2);
    let s = b.stats();
    assert_eq!((s.quarantined_deltas, s.delta_in_flight, s.acked_version), (1, false, 0));
    // The next delta carries only what changed since, under the next version.
    b.observe(&event("heat", 0.5, 2)).expect("observe");
    let next = b.prepare_delta().expect("delta").expect("the update");
    assert_eq!((next.local_version, next.added.len(), next.updated.len()), (2, 0, 1));
}

/// `recommend` and `score` rank by one rule: a recommended content's score is what `score`
/// gives it, whatever it is known by (catalogue, global pattern, collaborative vector,
/// trend). A centroid trend boosts a content by its MiniLM vector, never by its
/// collaborative vector (another space).
#[test]
fn recommend_and_score_agree_on_every_recommended_content() {
    let mut b = brain();
    b.observe(&event("heat", 1.0, 0)).expect("observe");
    b.observe(&event("godfather", 0.9, 10)).expect("observe");
    let mut g = collaborative_global(4);
    // A catalogue content with a collaborative vector, and a rising region right on it.
    g.similar.push(collaborative("goodfellas", &[0.6, 0.6]));
    g.similar.extend(global(4).similar);
    let centroid = embedder().embed("movie: Goodfellas. crime, drama").expect("embed");
    g.trending = vec![
        TrendSignal { target: TrendTarget::Centroid(centroid), score: 2.0, region: "eu".into() },
        TrendSignal {
            target: TrendTarget::ContentId("worldcup".into()),
            score: 3.0,
            region: "eu".into(),
        },
    ];
    b.apply_global(g).expect("apply");
    let recs = b.recommend(&evening(), 40).expect("recommend");
    let ids: Vec<String> = recs.iter().map(|r| r.content_id.clone()).collect();
    for want in ["goodfellas", "cand-good", "sopranos", "worldcup", "casino"] {
        assert!(ids.iter().any(|i| i == want), "{want} recommended: {ids:?}");
    }
    let scores = b.score(&evening(), &ids).expect("score");
    for (r, s) in recs.iter().zip(&scores) {
        assert!((r.score - s).abs() < 1e-4, "{}: recommend {} vs score {s}", r.content_id, r.score);
    }
    // The centroid sits on goodfellas' MiniLM vector: its boost lifts it above cand-good,
    // whose collaborative score alone is higher.
    let pos = |id: &str| ids.iter().position(|i| i == id).expect("recommended");
    assert!(pos("goodfellas") < pos("cand-good"), "{ids:?}");
}
