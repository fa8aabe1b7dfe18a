//! Differential privacy for the published averages: the Gaussian mechanism, calibrated
//! exactly, and its accounting over rounds.
//!
//! **Unit of privacy: one device in one round.** Neighbouring inputs differ by all the
//! patterns of one device. To bound what one device can move:
//!
//! 1. each device contributes to at most `m` groups (its `m` heaviest; the rest of its
//!    patterns are left out of the noisy release);
//! 2. in each of those groups it contributes exactly `c = 1/sqrt(m)` times a unit vector `y`
//!    (its mean pattern embedding in the group, mixed with its interest vector), plus `c` to
//!    the group's device count and `c·q` (q in [0, 1], its success rate) to the quality sum;
//! 3. so removing a device changes the released vector (all groups' sums, counts, quality
//!    sums) by at most `sqrt(m · c² · (1 + 1 + 1)) = sqrt(3)` in L2: the sensitivity `Δ`.
//!
//! Every released coordinate gets independent `N(0, σ²)` noise with `σ` the smallest value
//! for which the Gaussian mechanism is (ε, δ/2)-DP by the exact condition of Balle & Wang
//! (2018, "analytic Gaussian mechanism"), valid for every ε (the classic
//! `σ = Δ·sqrt(2 ln(1.25/δ))/ε` holds only for ε < 1). Which groups are released at all is
//! decided on the noisy count (Gaussian partition selection): a group is published only when
//! its noisy device count reaches `τ = 1 + σ·sqrt(m)·Φ⁻¹(1 − δ/(2m))`, so a group that only
//! one device backs is released with probability at most δ/2 over all of its `m` groups.
//! The k-anonymity gate (true distinct devices >= k) stays on top; as `τ` is far above k for
//! the settings used, it changes release probabilities by less than the δ/2 already spent.
//! Total per round: (ε, δ).
//!
//! **Over rounds**, releases compose. The Gaussian mechanism with sensitivity Δ and noise σ
//! is ρ-zCDP with `ρ = Δ²/(2σ²)`; T rounds give `T·ρ`, which converts to
//! `ε(δ) = Tρ + 2·sqrt(Tρ·ln(1/δ))` ([`compose_rounds`]). The round summary reports the
//! per-round guarantee; the simulator's report adds the composed one.

use omega_protocol::admin::PrivacyAccounting;
use rand::Rng;

/// Parameters of a noisy round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpParams {
    /// Per-round epsilon.
    pub epsilon: f64,
    /// Per-round delta (half for the noise, half for group selection).
    pub delta: f64,
    /// Most groups one device contributes to.
    pub max_groups_per_device: u32,
}

/// What [`calibrate`] derives from [`DpParams`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Noise standard deviation per released coordinate.
    pub sigma: f64,
    /// L2 sensitivity of the whole release.
    pub sensitivity: f64,
    /// Each device's weight in each of its groups.
    pub contribution: f64,
    /// Noisy device count a group needs to be released.
    pub release_threshold: f64,
}

/// One draw of `N(0, sigma²)` (Box–Muller).
pub fn gaussian(rng: &mut impl Rng, sigma: f64) -> f32 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    (sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
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

/// The δ the Gaussian mechanism with noise `sigma` and sensitivity `sens` achieves at
/// `epsilon` (Balle & Wang 2018, Theorem 8).
pub fn gaussian_delta(sigma: f64, sens: f64, epsilon: f64) -> f64 {
    let a = sens / (2.0 * sigma);
    let b = epsilon * sigma / sens;
    // e^ε·Φ(−a−b) computed in log space to stay finite for large ε.
    let tail = (epsilon + libm::log(phi(-a - b).max(f64::MIN_POSITIVE))).exp();
    (phi(a - b) - tail).max(0.0)
}

/// The smallest σ for which the Gaussian mechanism is (ε, δ)-DP at sensitivity `sens`.
pub fn analytic_sigma(epsilon: f64, delta: f64, sens: f64) -> f64 {
    let (mut lo, mut hi) = (1e-6 * sens, sens);
    while gaussian_delta(hi, sens, epsilon) > delta {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if gaussian_delta(mid, sens, epsilon) > delta { lo = mid } else { hi = mid }
    }
    hi
}

/// Derives noise and thresholds for a round.
pub fn calibrate(p: &DpParams) -> Calibration {
    let m = f64::from(p.max_groups_per_device.max(1));
    let sensitivity = 3f64.sqrt();
    let sigma = analytic_sigma(p.epsilon, p.delta / 2.0, sensitivity);
    let release_threshold = 1.0 + sigma * m.sqrt() * phi_inv(1.0 - p.delta / (2.0 * m));
    Calibration { sigma, sensitivity, contribution: 1.0 / m.sqrt(), release_threshold }
}

/// Calibration of the collaborative (Gram matrix) release: each device contributes a vector
/// of at most `m` entries `1/sqrt(m)`, so its outer product has Frobenius norm <= 1 (Δ = 1);
/// the noisy diagonal doubles as the noisy count for selecting contents, with the threshold
/// `τ = 1/m + σ·Φ⁻¹(1 − δ/(2m))` (in Gram units) for the same δ/2 selection guarantee.
pub fn calibrate_gram(p: &DpParams) -> Calibration {
    let m = f64::from(p.max_groups_per_device.max(1));
    let sigma = analytic_sigma(p.epsilon, p.delta / 2.0, 1.0);
    let release_threshold = 1.0 / m + sigma * phi_inv(1.0 - p.delta / (2.0 * m));
    Calibration { sigma, sensitivity: 1.0, contribution: 1.0 / m.sqrt(), release_threshold }
}

/// The per-round accounting for the summary.
pub fn accounting(p: &DpParams, c: &Calibration) -> PrivacyAccounting {
    PrivacyAccounting {
        epsilon: p.epsilon,
        delta: p.delta,
        noise_sigma: c.sigma,
        l2_sensitivity: c.sensitivity,
    }
}

/// Epsilon after `rounds` rounds of a Gaussian mechanism (σ, Δ) at total `delta`, by zCDP.
pub fn compose_rounds(sigma: f64, sensitivity: f64, rounds: u64, delta: f64) -> f64 {
    let rho = rounds as f64 * sensitivity * sensitivity / (2.0 * sigma * sigma);
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
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
    fn analytic_sigma_meets_delta_and_beats_the_classic_bound_where_that_holds() {
        // (epsilon, delta, sensitivity)
        for (eps, delta, sens) in [(0.5, 1e-5, 1.0), (1.0, 1e-6, 2.0), (8.0, 5e-7, 3f64.sqrt())] {
            let s = analytic_sigma(eps, delta, sens);
            assert!(gaussian_delta(s, sens, eps) <= delta * 1.000_001);
            assert!(gaussian_delta(s * 0.99, sens, eps) > delta, "not the smallest: {eps}");
            if eps < 1.0 {
                let classic = sens * (2.0 * (1.25 / delta).ln()).sqrt() / eps;
                assert!(s < classic, "{s} vs classic {classic}");
            }
        }
    }

    #[test]
    fn calibration_for_the_simulator_setting() {
        let c = calibrate(&DpParams { epsilon: 8.0, delta: 1e-6, max_groups_per_device: 16 });
        assert_eq!(c.contribution, 0.25);
        // sigma/Δ ≈ 0.67 at ε = 8; a group needs ~26 devices to pass the noisy threshold.
        assert!(c.sigma > 1.0 && c.sigma < 1.3, "{c:?}");
        assert!(c.release_threshold > 20.0 && c.release_threshold < 30.0, "{c:?}");
    }

    #[test]
    fn gaussian_draws_have_the_asked_spread() {
        use rand::{SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(3);
        let xs: Vec<f64> = (0..20_000).map(|_| f64::from(gaussian(&mut rng, 2.0))).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05, "{mean} {var}");
    }

    #[test]
    fn composition_grows_with_rounds() {
        let one = compose_rounds(1.0, 1.0, 1, 1e-6);
        let many = compose_rounds(1.0, 1.0, 100, 1e-6);
        assert!(one > 0.0 && many > 10.0 * one.sqrt() && many < 100.0 * one);
    }
}
