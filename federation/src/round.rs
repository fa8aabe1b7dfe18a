//! One round as a pure function: what the shards exported in, what to publish out.

use crate::aggregate::{self, AggregateConfig, AggregateStats, DpRound, Interests};
use crate::collab::CollabConfig;
use crate::group;
use crate::intake::Intake;
use crate::privacy::{self, DpParams, NoiseSeed};
use crate::trends::{self, TrendConfig};
use omega_protocol::admin::PrivacyAccounting;
use omega_protocol::types::{AggregatedPattern, TrendSignal};

/// Decisions of a round (the flags of `omega-shard federate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundConfig {
    /// Patterns below this success rate are ignored.
    pub min_quality: f32,
    /// k of k-anonymity.
    pub min_sources: u32,
    /// Trend decay per hour.
    pub trend_decay: f64,
    /// Cosine at which two embeddings of one content mean the same thing.
    pub group_threshold: f32,
    /// Weight of the audience's interest in published embeddings.
    pub profile_mix: f32,
    /// Differential privacy, when asked for.
    pub dp: Option<DpParams>,
    /// Collaborative item vectors (plain rounds only; DP rounds publish noisy profiles).
    pub collab: Option<CollabConfig>,
}

impl Default for RoundConfig {
    fn default() -> Self {
        RoundConfig {
            min_quality: 0.8,
            min_sources: 3,
            trend_decay: 0.95,
            group_threshold: group::DEFAULT_THRESHOLD,
            profile_mix: DEFAULT_PROFILE_MIX,
            dp: None,
            collab: Some(CollabConfig::default()),
        }
    }
}

/// Default [`RoundConfig::profile_mix`] (see `docs/quality.md` for the measurement).
pub const DEFAULT_PROFILE_MIX: f32 = 0.5;
/// Default most groups per device in a DP round.
pub const DEFAULT_DP_MAX_GROUPS: u32 = 16;

/// What a round publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundOutput {
    /// Aggregates, sorted by id.
    pub patterns: Vec<AggregatedPattern>,
    /// Trends (none in a DP round: their counts are not noised).
    pub trends: Vec<TrendSignal>,
    /// Group counts.
    pub stats: AggregateStats,
    /// Present in a DP round.
    pub privacy: Option<PrivacyAccounting>,
}

/// Groups, weighs, anonymises and finds trends. `seed` is where a DP round's noise comes from
/// ([`NoiseSeed::from_os`] or [`NoiseSeed::keyed`]; never anything public); plain rounds do not
/// use it.
pub fn federate(intake: &Intake, cfg: &RoundConfig, seed: &NoiseSeed) -> RoundOutput {
    let placed = intake.with_content_vectors();
    let intake = placed.as_ref().unwrap_or(intake);
    let order = intake.canonical_order();
    let groups = group::group(intake, &order, cfg.group_threshold);
    let dp = cfg.dp.map(|p| DpRound {
        plan: privacy::plan(&p, cfg.min_sources, cfg.collab.is_some()),
        max_groups_per_device: p.max_groups_per_device,
        seed: seed.clone(),
    });
    let interests = (cfg.profile_mix > 0.0 && dp.is_none()).then(|| Interests::compute(intake));
    let acfg = AggregateConfig {
        min_sources: cfg.min_sources,
        profile_mix: cfg.profile_mix,
        dp: dp.clone(),
        collab: cfg.collab,
        min_quality: cfg.min_quality,
    };
    let (patterns, stats) = aggregate::aggregate(intake, &groups, interests.as_ref(), &acfg);
    // Trends are exact counts: a DP round publishes none.
    let trends = if cfg.dp.is_some() {
        Vec::new()
    } else {
        trends::detect(
            intake,
            &groups,
            &TrendConfig { decay: cfg.trend_decay, min_sources: cfg.min_sources },
        )
    };
    let privacy = cfg.dp.zip(dp).map(|(p, d)| privacy::accounting(&p, &d.plan));
    RoundOutput { patterns, trends, stats, privacy }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::aggregate_id;
    use crate::collab::CollabConfig;
    use crate::privacy::DpParams;
    use omega_protocol::pb;
    use omega_protocol::types::embedding_to_wire;
    use omega_protocol::types::{AggregatedPattern, PatternContext, is_collaborative_vector};
    use omega_protocol::vector::{EMBEDDING_DIM, cosine, l2_normalize};
    use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

    fn unit(rng: &mut StdRng) -> Vec<f32> {
        let mut v: Vec<f32> = (0..EMBEDDING_DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        l2_normalize(&mut v);
        v
    }

    /// A small perturbation of `base` (a context variant or quantisation noise).
    fn near(base: &[f32], rng: &mut StdRng, amount: f32) -> Vec<f32> {
        let mut v: Vec<f32> =
            base.iter().map(|x| x + amount * rng.random_range(-1.0f32..1.0) / 20.0).collect();
        l2_normalize(&mut v);
        v
    }

    struct Row {
        device: String,
        content: String,
        emb: Vec<f32>,
        success: f32,
    }

    fn row(device: &str, content: &str, emb: &[f32], success: f32) -> Row {
        Row { device: device.into(), content: content.into(), emb: emb.to_vec(), success }
    }

    fn intake_of(rows: &[Row]) -> Intake {
        let patterns: Vec<pb::ExportedPattern> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(i as u64).to_le_bytes());
                pb::ExportedPattern {
                    pattern: Some(pb::Pattern {
                        id: id.to_vec(),
                        content_id: r.content.clone(),
                        // An empty row embedding: uploaded without one.
                        embedding: (!r.emb.is_empty()).then(|| embedding_to_wire(&r.emb)),
                        success_rate: r.success,
                        sample_count: 3,
                        context: None,
                        created_at_ms: 0,
                        updated_at_ms: 1_000 + i as i64,
                    }),
                    source: r.device.as_bytes().to_vec(),
                    region: "eu".into(),
                }
            })
            .collect();
        let mut intake = Intake::default();
        let batch =
            pb::ExportBatch { patterns, shard_id: 1, model_id: "m".into(), ..Default::default() };
        intake.add_batch(&batch, 0.0).expect("one model");
        intake
    }

    /// A keyed seed: reruns with the same round id draw the same noise.
    fn seed(round_id: &str) -> NoiseSeed {
        NoiseSeed::keyed(b"a test key of 32 bytes, not real", round_id).expect("long key")
    }

    fn plain(k: u32) -> RoundConfig {
        RoundConfig {
            min_sources: k,
            profile_mix: 0.0,
            min_quality: 0.0,
            collab: None,
            ..RoundConfig::default()
        }
    }

    #[test]
    fn patterns_without_embedding_count_for_their_content() {
        let mut rng = StdRng::seed_from_u64(11);
        let x = unit(&mut rng);
        // One device sent x's embedding, two left it out: three devices back x. Nobody sent
        // y's: its patterns have no vector to be placed by.
        let rows = [
            row("d0", "x", &x, 0.9),
            row("d1", "x", &[], 0.9),
            row("d2", "x", &[], 0.8),
            row("d3", "y", &[], 0.9),
            row("d4", "y", &[], 0.9),
            row("d5", "y", &[], 0.9),
        ];
        let intake = intake_of(&rows);
        assert_eq!((intake.items.len(), intake.without_embedding), (6, 5));
        let placed = intake.with_content_vectors().expect("some had no embedding");
        assert_eq!((placed.items.len(), placed.unplaced), (3, 3));
        let out = federate(&intake, &plain(3), &seed("r"));
        assert_eq!(out.patterns.len(), 1, "{:?}", out.patterns);
        let p = &out.patterns[0];
        assert_eq!((p.content_id.as_deref(), p.source_devices), (Some("x"), 3));
        assert!(cosine(&p.embedding, &x) > 0.99);
        // The same with collaborative vectors: the embedding-less devices are in x's audience.
        let collab = RoundConfig { collab: Some(CollabConfig::default()), ..plain(3) };
        let out = federate(&intake, &collab, &seed("r"));
        assert!(out.patterns.iter().all(|p| p.content_id.as_deref() == Some("x")));
        assert!(out.patterns.iter().all(|p| p.source_devices == 3), "{:?}", out.patterns);
        // All embedded: nothing to place.
        assert!(intake_of(&[row("d0", "x", &x, 0.9)]).with_content_vectors().is_none());
    }

    #[test]
    fn k_anonymity_table() {
        let mut rng = StdRng::seed_from_u64(1);
        let x = unit(&mut rng);
        // (devices agreeing on content x, k, published?)
        for (devices, k, published) in
            [(2, 3, false), (3, 3, true), (5, 3, true), (5, 6, false), (1, 1, true)]
        {
            let rows: Vec<Row> =
                (0..devices).map(|d| row(&format!("d{d}"), "x", &x, 0.9)).collect();
            let out = federate(&intake_of(&rows), &plain(k), &seed("r"));
            assert_eq!(out.patterns.len(), usize::from(published), "{devices} devices, k={k}");
            assert_eq!(out.stats.suppressed, u64::from(!published));
            if let Some(p) = out.patterns.first() {
                assert_eq!(p.source_devices, devices);
                assert_eq!(p.id, aggregate_id("x", None));
                assert!(cosine(&p.embedding, &x) > 0.99);
            }
        }
    }

    #[test]
    fn a_device_repeating_a_pattern_1000_times_counts_once() {
        let mut rng = StdRng::seed_from_u64(2);
        let (x, other) = (unit(&mut rng), unit(&mut rng));
        let mut rows: Vec<Row> =
            (0..1000).map(|_| row("spammer", "x", &near(&x, &mut rng, 0.1), 1.0)).collect();
        rows.push(row("honest", "x", &near(&x, &mut rng, 0.1), 0.9));
        assert!(
            federate(&intake_of(&rows), &plain(3), &seed("r")).patterns.is_empty(),
            "2 devices < k"
        );
        // With a third device the group is published as 3 devices, and the spammer's 1,000
        // copies weigh like one: its own direction does not dominate the average.
        let mut rows: Vec<Row> =
            (0..1000).map(|_| row("spammer", "x", &near(&other, &mut rng, 0.1), 1.0)).collect();
        rows.push(row("honest1", "x", &x, 0.9));
        rows.push(row("honest2", "x", &x, 0.9));
        let cfg = RoundConfig { group_threshold: -1.0, ..plain(3) };
        let out = federate(&intake_of(&rows), &cfg, &seed("r"));
        assert_eq!(out.patterns.len(), 1);
        assert_eq!(out.patterns[0].source_devices, 3);
        assert!(
            cosine(&out.patterns[0].embedding, &x) > cosine(&out.patterns[0].embedding, &other)
        );
    }

    #[test]
    fn poisoned_patterns_from_fewer_than_k_devices_are_never_published() {
        let mut rng = StdRng::seed_from_u64(3);
        let x = unit(&mut rng);
        let mut rows: Vec<Row> =
            (0..3).map(|d| row(&format!("honest{d}"), "x", &x, 0.85)).collect();
        // Two colluding devices: perfect success, random embeddings, on x and on their own ids.
        for p in 0..2 {
            for n in 0..50 {
                rows.push(row(&format!("poison{p}"), "x", &unit(&mut rng), 1.0));
                rows.push(row(&format!("poison{p}"), &format!("spam{n}"), &unit(&mut rng), 1.0));
            }
        }
        for mix in [0.0, 0.5] {
            let out = federate(
                &intake_of(&rows),
                &RoundConfig { profile_mix: mix, ..plain(3) },
                &seed("r"),
            );
            assert_eq!(out.patterns.len(), 1, "mix {mix}: only the honest group");
            let p = &out.patterns[0];
            assert_eq!((p.content_id.as_deref(), p.source_devices), (Some("x"), 3));
            assert!((p.quality - 0.85).abs() < 1e-6, "the poison's 1.0 does not leak into quality");
            if mix == 0.0 {
                assert!(cosine(&p.embedding, &x) > 0.99);
            }
            assert!(out.trends.iter().all(|t| !format!("{:?}", t.target).contains("spam")));
        }
    }

    #[test]
    fn output_does_not_depend_on_arrival_order_and_reruns_are_identical() {
        let mut rng = StdRng::seed_from_u64(4);
        let contents: Vec<Vec<f32>> = (0..20).map(|_| unit(&mut rng)).collect();
        let mut rows = Vec::new();
        for d in 0..30 {
            for (c, e) in contents.iter().enumerate().filter(|(c, _)| (c + d) % 3 != 0) {
                rows.push(row(&format!("d{d}"), &format!("c{c}"), &near(e, &mut rng, 0.2), 0.9));
            }
        }
        let cfg = RoundConfig { min_quality: 0.0, ..RoundConfig::default() };
        assert!(cfg.collab.is_some(), "the default path, collaborative vectors included");
        let a = federate(&intake_of(&rows), &cfg, &seed("r"));
        rows.shuffle(&mut rng);
        let b = federate(&intake_of(&rows), &cfg, &seed("r"));
        assert_eq!(a.patterns.len(), 40, "an audience profile and a collaborative vector each");
        let collab = |p: &&AggregatedPattern| {
            p.content_id.as_deref().is_some_and(|c| is_collaborative_vector(&p.id, c))
        };
        assert_eq!(a.patterns.iter().filter(collab).count(), 20);
        for p in a.patterns.iter().filter(collab) {
            assert!(p.embedding[CollabConfig::default().dim..].iter().all(|x| *x == 0.0));
        }
        // Summation order is canonical, so even the floats match after a reshuffle.
        assert_eq!(
            a.patterns.iter().map(|p| p.id).collect::<Vec<_>>(),
            b.patterns.iter().map(|p| p.id).collect::<Vec<_>>()
        );
        for (x, y) in a.patterns.iter().zip(&b.patterns) {
            assert!(cosine(&x.embedding, &y.embedding) > 0.999_99);
        }
        assert_eq!(federate(&intake_of(&rows), &cfg, &seed("r")), b);
    }

    #[test]
    fn dp_rounds_are_reproducible_noisy_and_drop_small_groups() {
        let mut rng = StdRng::seed_from_u64(5);
        let (big, small) = (unit(&mut rng), unit(&mut rng));
        let mut rows: Vec<Row> =
            (0..400).map(|d| row(&format!("d{d}"), "big", &big, 0.9)).collect();
        rows.extend((0..4).map(|d| row(&format!("s{d}"), "small", &small, 0.9)));
        let dp = DpParams { epsilon: 8.0, delta: 1e-6, max_groups_per_device: 4 };
        let cfg = RoundConfig { dp: Some(dp), ..plain(3) };
        let intake = intake_of(&rows);
        let a = federate(&intake, &cfg, &seed("round-1"));
        assert_eq!(a, federate(&intake, &cfg, &seed("round-1")), "same key and round, same noise");
        assert_ne!(
            a.patterns,
            federate(&intake, &cfg, &seed("round-2")).patterns,
            "other round, other noise"
        );
        let os = NoiseSeed::from_os().expect("entropy");
        assert_ne!(a.patterns, federate(&intake, &cfg, &os).patterns, "OS noise differs");
        assert_eq!(a.patterns.len(), 1, "the 4-device content is below the noisy threshold");
        let p = &a.patterns[0];
        assert!(cosine(&p.embedding, &big) > 0.8 && cosine(&p.embedding, &big) < 0.9999);
        assert!((350..=450).contains(&p.source_devices), "{}", p.source_devices);
        assert_eq!(p.context, PatternContext::default(), "no exact context in a DP round");
        assert!(a.trends.is_empty());
        // The published count is the noisy one: over a few seeds it is not always the truth.
        let counts: Vec<u32> = (0..8)
            .map(|i| federate(&intake, &cfg, &seed(&format!("s{i}"))).patterns[0].source_devices)
            .collect();
        assert!(counts.iter().any(|&c| c != 400), "{counts:?}");
        let acc = a.privacy.expect("accounting");
        assert_eq!((acc.epsilon, acc.delta), (8.0, 1e-6));
        assert!((acc.l2_sensitivity - 2f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn dp_rounds_with_collaborative_vectors_release_only_well_backed_contents() {
        let mut rng = StdRng::seed_from_u64(7);
        let bases: Vec<Vec<f32>> = (0..6).map(|_| unit(&mut rng)).collect();
        let mut rows = Vec::new();
        // 300 devices watch contents 0-4 (two tastes); 4 devices watch content 5.
        for d in 0..300 {
            for (c, base) in bases.iter().enumerate().take(5) {
                if (c + d) % 2 == 0 || c == 0 {
                    rows.push(row(&format!("d{d}"), &format!("c{c}"), base, 0.9));
                }
            }
        }
        rows.extend((0..4).map(|d| row(&format!("s{d}"), "c5", &bases[5], 0.9)));
        let dp = DpParams { epsilon: 8.0, delta: 1e-6, max_groups_per_device: 4 };
        let collab = Some(CollabConfig { dim: 4, lambda_rel: 1.0, iterations: 6 });
        let cfg = RoundConfig { dp: Some(dp), collab, min_quality: 0.8, ..plain(3) };
        let intake = intake_of(&rows);
        let a = federate(&intake, &cfg, &seed("r1"));
        assert_eq!(a, federate(&intake, &cfg, &seed("r1")));
        let published: Vec<&str> =
            a.patterns.iter().filter_map(|p| p.content_id.as_deref()).collect();
        assert_eq!(published.len(), 5, "{published:?}");
        assert!(!published.contains(&"c5"), "4 devices are far below the noisy threshold");
        assert!(a.patterns.iter().all(|p| p.quality == 0.8 && p.source_devices >= 3));
        assert!(
            a.patterns
                .iter()
                .all(|p| is_collaborative_vector(&p.id, p.content_id.as_deref().unwrap_or(""))),
            "a DP round with collaborative vectors releases only those"
        );
        let acc = a.privacy.expect("accounting");
        assert_eq!(acc.l2_sensitivity, 1.0);
    }

    #[test]
    fn audience_profiles_pull_a_content_towards_what_its_fans_also_like() {
        let mut rng = StdRng::seed_from_u64(6);
        let (x, fans_taste, others_taste) = (unit(&mut rng), unit(&mut rng), unit(&mut rng));
        let mut rows = Vec::new();
        for d in 0..5 {
            rows.push(row(&format!("fan{d}"), "x", &x, 0.9));
            rows.push(row(
                &format!("fan{d}"),
                &format!("f{d}"),
                &near(&fans_taste, &mut rng, 0.3),
                0.9,
            ));
            rows.push(row(
                &format!("other{d}"),
                &format!("o{d}"),
                &near(&others_taste, &mut rng, 0.3),
                0.9,
            ));
        }
        let intake = intake_of(&rows);
        let get = |mix: f32| {
            let out = federate(&intake, &RoundConfig { profile_mix: mix, ..plain(3) }, &seed("r"));
            out.patterns
                .into_iter()
                .find(|p| p.content_id.as_deref() == Some("x"))
                .expect("x")
                .embedding
        };
        let (pure, profiled) = (get(0.0), get(0.5));
        assert!(cosine(&profiled, &fans_taste) > cosine(&pure, &fans_taste) + 0.2);
        assert!(cosine(&profiled, &fans_taste) > cosine(&profiled, &others_taste));
    }
}
