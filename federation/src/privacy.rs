//! Differential privacy for what a round publishes: where the noise comes from, how much of
//! it, which contents may be released at all, and what the releases cost over rounds.
//!
//! **Unit of privacy: one device.** Neighbouring inputs differ by all the patterns of one
//! device. To bound what one device can move, it contributes to at most `m` contents (its `m`
//! heaviest; the rest of its patterns are left out of the noisy releases), each with weight
//! `c = 1/sqrt(m)`.
//!
//! **A DP round makes two Gaussian releases**, both with noise from [`Noise`]:
//!
//! 1. *Selection* (a share [`SELECT_SHARE`] of the round's zCDP budget ρ). Every content any
//!    device backs gets a noisy count `c·devices + N(0, σ_s²)` (L2 sensitivity 1). A content is
//!    released only when its true device count reaches k (`min_sources`) **and** its noisy
//!    count reaches `τ = k·c + σ_s·Φ⁻¹(1 − δ_s/m)`. The k gate is part of the mechanism, not a
//!    filter in front of it: removing one device changes which contents pass the gate only for
//!    contents it brings from k−1 to k devices, and such a content passes `τ` with probability
//!    at most `δ_s/m`, so at most `δ_s` over its `m` contents. No exact count is published:
//!    a released content's device count is the noisy one.
//! 2. *Release* (the rest of ρ) over the selected contents only, so the universe of the second
//!    release is the output of the first: the Gram matrix of the devices' content sets (L2
//!    sensitivity 1, [`crate::collab::dp_item_vectors`]), or, without collaborative vectors,
//!    each content's sum of unit vectors and quality (sensitivity `sqrt(2)`).
//!
//! Noise is `N(0, σ²)` drawn with `rand_distr`'s `StandardNormal` from a ChaCha20 stream whose
//! seed is either 32 bytes from the operating system's CSPRNG (the default) or an HMAC of the
//! round id under a secret key (`FEDERATION_NOISE_KEY`), so that a rerun is identical. Never
//! from anything public.
//!
//! **Accounting (zCDP).** A Gaussian release with sensitivity Δ and noise σ is
//! `Δ²/(2σ²)`-zCDP; the round's ε and δ fix its ρ so that one round alone is (ε, δ)-DP:
//! `ρ + 2·sqrt(ρ·ln(2/δ)) = ε`, the other δ/2 going to selection. Rounds compose by adding ρ
//! and the selection δs: over rounds with total ρ_T and selection deltas Σδ_s, a device gets
//! `(ρ_T + 2·sqrt(ρ_T·ln(2/δ)), δ/2 + Σδ_s)`-DP ([`compose`]). [`charge`] keeps that per
//! device per period in a [`PrivacyLedger`] and refuses a round that would exceed the budget.

use hmac::{Hmac, Mac};
use omega_protocol::admin::{LedgerDay, PrivacyAccounting, PrivacyLedger};
use rand::{Rng, SeedableRng, TryRngCore};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;
use sha2::Sha256;

/// Share of a round's zCDP budget spent on selecting contents (the rest on the release).
pub const SELECT_SHARE: f64 = 0.25;

const DAY_MS: i64 = 86_400_000;

/// Parameters of a noisy round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpParams {
    /// Epsilon of one round alone.
    pub epsilon: f64,
    /// Delta of one round alone (half for the zCDP conversion, half for selection).
    pub delta: f64,
    /// Most contents one device contributes to.
    pub max_groups_per_device: u32,
}

/// Noise of one Gaussian release.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Noise standard deviation per released coordinate.
    pub sigma: f64,
    /// L2 sensitivity of the whole release.
    pub sensitivity: f64,
    /// Each device's weight in each of its contents.
    pub contribution: f64,
    /// Selection only: the noisy count (in units of `contribution`) a content needs.
    pub release_threshold: f64,
}

/// What a round's [`DpParams`] mean for its two releases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// zCDP ρ of the whole round.
    pub rho: f64,
    /// δ spent on selection.
    pub delta_select: f64,
    /// δ of the zCDP to (ε, δ) conversion.
    pub delta_convert: f64,
    /// Noisy counts.
    pub select: Calibration,
    /// Gram matrix (collaborative vectors) or sums (profiles).
    pub release: Calibration,
}

/// Standard normal CDF.
pub fn phi(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// Inverse of [`phi`] by bisection (monotone; 1e-12 is plenty for thresholds).
pub fn phi_inv(p: f64) -> f64 {
    let (mut lo, mut hi) = (-40.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if phi(mid) < p { lo = mid } else { hi = mid }
    }
    0.5 * (lo + hi)
}

/// Epsilon of ρ-zCDP at `delta` (Bun & Steinke 2016, Proposition 1.3).
pub fn epsilon_of(rho: f64, delta: f64) -> f64 {
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

/// The ρ whose [`epsilon_of`] at `delta` is `epsilon`.
pub fn rho_of(epsilon: f64, delta: f64) -> f64 {
    let l = (1.0 / delta).ln().sqrt();
    let r = -l + (l * l + epsilon).sqrt();
    r * r
}

/// The (ε, δ) of each of `rounds` rounds whose composition (as [`compose`] does it: ρ adds
/// up, each round pays its selection δ/2, one δ/2 converts) is exactly `(epsilon, delta)`:
/// a budget split evenly between a known number of releases.
pub fn per_round(epsilon: f64, delta: f64, rounds: u32) -> (f64, f64) {
    let r = f64::from(rounds.max(1));
    let round_delta = 2.0 * delta / (1.0 + r);
    let rho = rho_of(epsilon, round_delta / 2.0) / r;
    (epsilon_of(rho, round_delta / 2.0), round_delta)
}

/// Noise of a Gaussian release of sensitivity `sens` that costs `rho`.
pub fn sigma_for(rho: f64, sens: f64) -> f64 {
    sens / (2.0 * rho).sqrt()
}

/// Derives the noise and threshold of a round. `gram`: the release is the collaborative
/// Gram matrix (sensitivity 1), else noisy sums (sensitivity `sqrt(2)`).
pub fn plan(p: &DpParams, min_sources: u32, gram: bool) -> Plan {
    let m = f64::from(p.max_groups_per_device.max(1));
    let c = 1.0 / m.sqrt();
    let (delta_select, delta_convert) = (p.delta / 2.0, p.delta / 2.0);
    let rho = rho_of(p.epsilon, delta_convert);
    let sigma_s = sigma_for(rho * SELECT_SHARE, 1.0);
    let tau = f64::from(min_sources.max(1)) * c + sigma_s * phi_inv(1.0 - delta_select / m);
    let select = Calibration {
        sigma: sigma_s,
        sensitivity: 1.0,
        contribution: c,
        release_threshold: tau / c,
    };
    let sens = if gram { 1.0 } else { 2f64.sqrt() };
    let release = Calibration {
        sigma: sigma_for(rho * (1.0 - SELECT_SHARE), sens),
        sensitivity: sens,
        contribution: c,
        release_threshold: 0.0,
    };
    Plan { rho, delta_select, delta_convert, select, release }
}

/// The round-alone part of the summary's accounting (the runner adds the composition).
pub fn accounting(p: &DpParams, plan: &Plan) -> PrivacyAccounting {
    PrivacyAccounting {
        epsilon: p.epsilon,
        delta: p.delta,
        noise_sigma: plan.release.sigma,
        l2_sensitivity: plan.release.sensitivity,
        rho: plan.rho,
        composed_epsilon: p.epsilon,
        composed_delta: p.delta,
        rounds_in_period: 1,
        budget_epsilon: 0.0,
        period_days: 0,
        ledger: PrivacyLedger::default(),
    }
}

/// Seed of a round's noise. Its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct NoiseSeed([u8; 32]);

impl std::fmt::Debug for NoiseSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseSeed(..)")
    }
}

/// Why noise or a budget could not be had.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// The operating system's random source failed.
    #[error("no entropy from the operating system: {0}")]
    Entropy(String),
    /// The key is too short to be a secret.
    #[error("the noise key has {0} bytes; at least 16 are needed")]
    ShortKey(usize),
    /// The round would spend more than the budget.
    #[error(
        "privacy budget exhausted: this round would bring the composed epsilon over the last {period_days} day(s) to {would_be:.3} (delta {delta:.2e}), above the budget {budget}; {rounds} round(s) already spent {spent:.3}"
    )]
    BudgetExhausted {
        /// Composed epsilon of the rounds already in the period.
        spent: f64,
        /// With this round.
        would_be: f64,
        /// Composed delta with this round.
        delta: f64,
        /// The budget.
        budget: f64,
        /// The period.
        period_days: u32,
        /// Rounds already in the period.
        rounds: u32,
    },
    /// The ledger carried in is not a ledger.
    #[error("malformed privacy ledger: {0}")]
    MalformedLedger(String),
}

impl NoiseSeed {
    /// 32 bytes from the operating system's CSPRNG: nobody can regenerate the noise.
    pub fn from_os() -> Result<Self, PrivacyError> {
        let mut s = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut s)
            .map_err(|e| PrivacyError::Entropy(e.to_string()))?;
        Ok(NoiseSeed(s))
    }

    /// HMAC-SHA256 of the round id under a secret key: a rerun of the round draws the same
    /// noise, and without the key nobody can.
    pub fn keyed(key: &[u8], round_id: &str) -> Result<Self, PrivacyError> {
        if key.len() < 16 {
            return Err(PrivacyError::ShortKey(key.len()));
        }
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .map_err(|_| PrivacyError::ShortKey(key.len()))?;
        mac.update(b"omega/noise/v2\0");
        mac.update(round_id.as_bytes());
        Ok(NoiseSeed(mac.finalize().into_bytes().into()))
    }

    /// A fixed seed, for tests and benchmarks.
    pub fn fixed(bytes: [u8; 32]) -> Self {
        NoiseSeed(bytes)
    }
}

/// The noise stream of a round.
#[derive(Debug, Clone)]
pub struct Noise(ChaCha20Rng);

impl Noise {
    /// The stream of `seed`; `stream` separates the releases of one round.
    pub fn new(seed: &NoiseSeed, stream: u64) -> Self {
        let mut rng = ChaCha20Rng::from_seed(seed.0);
        rng.set_stream(stream);
        Noise(rng)
    }

    /// One draw of `N(0, sigma²)`.
    pub fn gaussian(&mut self, sigma: f64) -> f64 {
        let z: f64 = self.0.sample(StandardNormal);
        sigma * z
    }
}

/// The per-device budget of a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Most composed epsilon per device per period.
    pub epsilon: f64,
    /// Length of the period, days (a sliding window of whole UTC days).
    pub period_days: u32,
}

/// What a device has spent, composed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Composed {
    /// Composed epsilon.
    pub epsilon: f64,
    /// Composed delta.
    pub delta: f64,
    /// Total zCDP ρ.
    pub rho: f64,
    /// Rounds composed.
    pub rounds: u32,
}

/// Composes the ledger's days (all of them) plus nothing else, converting at `delta_convert`.
pub fn compose(days: &[LedgerDay], delta_convert: f64) -> Composed {
    let rho: f64 = days.iter().map(|d| d.rho).sum();
    let select: f64 = days.iter().map(|d| d.delta_select).sum();
    let rounds = days.iter().map(|d| d.rounds).sum();
    let epsilon = if rho > 0.0 { epsilon_of(rho, delta_convert) } else { 0.0 };
    let delta = if rounds > 0 { delta_convert + select } else { 0.0 };
    Composed { epsilon, delta, rho, rounds }
}

/// Charges a round of [`Plan`] at `now_ms` to `ledger` under `budget`: the days of the
/// period (the last `period_days` UTC days, today included) plus this round must stay within
/// the budget, else nothing is charged and the round must release nothing. Returns the new
/// ledger (days outside the period dropped) and the composed guarantee with this round.
pub fn charge(
    ledger: &PrivacyLedger,
    budget: &Budget,
    plan: &Plan,
    now_ms: i64,
) -> Result<(PrivacyLedger, Composed), PrivacyError> {
    for d in &ledger.days {
        let ok = d.rho.is_finite() && d.rho >= 0.0 && d.delta_select.is_finite();
        if !ok || d.delta_select < 0.0 || d.delta_select >= 1.0 {
            return Err(PrivacyError::MalformedLedger(format!("day {}: {d:?}", d.day)));
        }
    }
    let today = now_ms.div_euclid(DAY_MS);
    let first = today - i64::from(budget.period_days.max(1)) + 1;
    let mut days: Vec<LedgerDay> =
        ledger.days.iter().filter(|d| d.day >= first && d.day <= today).cloned().collect();
    let before = compose(&days, plan.delta_convert);
    match days.iter_mut().find(|d| d.day == today) {
        Some(d) => {
            d.rho += plan.rho;
            d.delta_select += plan.delta_select;
            d.rounds += 1;
        }
        None => days.push(LedgerDay {
            day: today,
            rho: plan.rho,
            delta_select: plan.delta_select,
            rounds: 1,
        }),
    }
    days.sort_by_key(|d| d.day);
    let after = compose(&days, plan.delta_convert);
    if after.epsilon > budget.epsilon * (1.0 + 1e-9) || after.delta >= 1.0 {
        return Err(PrivacyError::BudgetExhausted {
            spent: before.epsilon,
            would_be: after.epsilon,
            delta: after.delta,
            budget: budget.epsilon,
            period_days: budget.period_days,
            rounds: before.rounds,
        });
    }
    Ok((PrivacyLedger { days }, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_and_its_inverse_match_known_quantiles() {
        for (x, p) in [(0.0, 0.5), (1.959_963_984_540_054, 0.975), (-1.0, 0.158_655_253_931_457)] {
            assert!((phi(x) - p).abs() < 1e-12, "phi({x})");
            assert!((phi_inv(p) - x).abs() < 1e-9, "phi_inv({p})");
        }
    }

    #[test]
    fn rho_and_epsilon_invert_each_other() {
        // (epsilon, delta)
        for (eps, delta) in [(0.5, 1e-6), (1.0, 1e-5), (8.0, 5e-7), (30.0, 1e-9)] {
            let rho = rho_of(eps, delta);
            assert!(rho > 0.0 && (epsilon_of(rho, delta) - eps).abs() < 1e-9, "{eps} {delta}");
        }
        // ε = 8 at δ = 1e-6 is ρ ≈ 0.91 (the target of the evaluation).
        assert!((rho_of(8.0, 1e-6) - 0.912).abs() < 0.01, "{}", rho_of(8.0, 1e-6));
    }

    #[test]
    fn a_budget_split_between_rounds_composes_back_to_it() {
        for (eps, delta, rounds) in [(8.0, 1e-6, 1), (8.0, 1e-6, 4), (2.0, 1e-5, 30)] {
            let (e, d) = per_round(eps, delta, rounds);
            let p = DpParams { epsilon: e, delta: d, max_groups_per_device: 16 };
            let plan = plan(&p, 3, true);
            let budget = Budget { epsilon: eps, period_days: 30 };
            let mut ledger = PrivacyLedger::default();
            let mut composed = None;
            for i in 0..rounds {
                let (l, c) = charge(&ledger, &budget, &plan, i64::from(i) * 3_600_000)
                    .unwrap_or_else(|e| panic!("round {i} of {rounds}: {e}"));
                ledger = l;
                composed = Some(c);
            }
            let c = composed.expect("charged");
            assert!((c.epsilon - eps).abs() < 1e-9 && (c.delta - delta).abs() < 1e-15, "{c:?}");
            assert!(e < eps || rounds == 1, "{e}");
            // One more round is over the budget.
            let later = i64::from(rounds) * 3_600_000;
            assert!(charge(&ledger, &budget, &plan, later).is_err(), "{rounds} + 1 rounds");
        }
    }

    #[test]
    fn one_round_alone_is_exactly_its_epsilon_and_delta() {
        let p = DpParams { epsilon: 2.0, delta: 1e-6, max_groups_per_device: 16 };
        let plan = plan(&p, 3, true);
        let budget = Budget { epsilon: 2.0, period_days: 30 };
        let (ledger, c) = charge(&PrivacyLedger::default(), &budget, &plan, 0).expect("fits");
        assert!((c.epsilon - 2.0).abs() < 1e-9 && (c.delta - 1e-6).abs() < 1e-18, "{c:?}");
        assert_eq!(ledger.days.len(), 1);
        // The split of ρ between the two releases adds up to the round's ρ.
        let spent = plan.select.sensitivity.powi(2) / (2.0 * plan.select.sigma.powi(2))
            + plan.release.sensitivity.powi(2) / (2.0 * plan.release.sigma.powi(2));
        assert!((spent - plan.rho).abs() < 1e-12);
    }

    #[test]
    fn the_selection_threshold_admits_k_devices_with_probability_at_most_delta_over_m() {
        for (k, m) in [(3u32, 16u32), (1, 4), (10, 1)] {
            let p = DpParams { epsilon: 4.0, delta: 1e-6, max_groups_per_device: m };
            let s = plan(&p, k, true).select;
            // The noisy count of a content with exactly k devices passes τ with probability
            // P(Z >= (τ - k)·c/σ).
            let z = (s.release_threshold - f64::from(k)) * s.contribution / s.sigma;
            let pass = 1.0 - phi(z);
            assert!(pass <= p.delta / 2.0 / f64::from(m) * 1.000_001, "k={k} m={m}: {pass}");
        }
    }

    #[test]
    fn charging_table() {
        let p = DpParams { epsilon: 1.0, delta: 1e-7, max_groups_per_device: 8 };
        let plan = plan(&p, 3, true);
        let day = 86_400_000i64;
        // (budget, period, days of the previous rounds (one round each), now (days), fits?)
        let cases: Vec<(f64, u32, Vec<i64>, i64, bool)> = vec![
            (1.0, 7, vec![], 10, true),
            (1.0, 7, vec![10], 10, false),
            (1.0, 7, vec![3], 10, true), // day 3 left the 7-day window (4..=10)
            (1.0, 7, vec![4], 10, false), // day 4 is in it
            // Three rounds of ε = 1 compose to ε ≈ 1.75 by zCDP (not 3).
            (1.7, 7, vec![9, 10], 10, false),
            (1.8, 7, vec![9, 10], 10, true),
        ];
        for (budget, period_days, previous, now, fits) in cases {
            let mut ledger = PrivacyLedger::default();
            for d in &previous {
                let b = Budget { epsilon: 1e9, period_days: 10_000 };
                ledger = charge(&ledger, &b, &plan, d * day).expect("unbounded").0;
            }
            let r = charge(&ledger, &Budget { epsilon: budget, period_days }, &plan, now * day);
            assert_eq!(r.is_ok(), fits, "{budget} {period_days} {previous:?} {now}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().starts_with("privacy budget exhausted"), "{e}");
            }
        }
    }

    #[test]
    fn composition_is_subadditive_in_epsilon_and_additive_in_delta() {
        let p = DpParams { epsilon: 0.5, delta: 1e-8, max_groups_per_device: 8 };
        let plan = plan(&p, 3, true);
        let mut ledger = PrivacyLedger::default();
        let b = Budget { epsilon: 1e9, period_days: 365 };
        let mut last = None;
        for r in 0..100 {
            let (l, c) = charge(&ledger, &b, &plan, r * 3_600_000).expect("fits");
            ledger = l;
            last = Some(c);
        }
        let c = last.expect("charged");
        assert_eq!(c.rounds, 100);
        assert!(c.epsilon < 100.0 * 0.5 && c.epsilon > 0.5 * 10.0, "{c:?}");
        assert!((c.delta - (5e-9 + 100.0 * 5e-9)).abs() < 1e-15, "{c:?}");
    }

    #[test]
    fn malformed_ledgers_are_refused() {
        let p = DpParams { epsilon: 1.0, delta: 1e-7, max_groups_per_device: 8 };
        let plan = plan(&p, 3, true);
        let b = Budget { epsilon: 10.0, period_days: 7 };
        for bad in [f64::NAN, -1.0] {
            let l = PrivacyLedger {
                days: vec![LedgerDay { day: 0, rho: bad, delta_select: 0.0, rounds: 1 }],
            };
            assert!(matches!(charge(&l, &b, &plan, 0), Err(PrivacyError::MalformedLedger(_))));
        }
    }

    #[test]
    fn noise_has_the_asked_spread_and_keys_decide_it() {
        let seed = NoiseSeed::keyed(b"0123456789abcdef", "r1").expect("key");
        let mut n = Noise::new(&seed, 0);
        let xs: Vec<f64> = (0..20_000).map(|_| n.gaussian(2.0)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05, "{mean} {var}");
        let first = |s: &NoiseSeed, stream| Noise::new(s, stream).gaussian(1.0);
        assert_eq!(first(&seed, 0), xs[0] / 2.0, "same key and round: same noise");
        assert_ne!(first(&seed, 0), first(&seed, 1), "streams differ");
        let other_key = NoiseSeed::keyed(b"fedcba9876543210", "r1").expect("key");
        assert_ne!(first(&seed, 0), first(&other_key, 0), "the round id alone does not decide");
        assert!(matches!(NoiseSeed::keyed(b"short", "r1"), Err(PrivacyError::ShortKey(5))));
        let (a, b) = (NoiseSeed::from_os().expect("os"), NoiseSeed::from_os().expect("os"));
        assert_ne!(a, b, "two draws of 256 bits from the OS");
        assert_eq!(format!("{a:?}"), "NoiseSeed(..)");
    }
}
