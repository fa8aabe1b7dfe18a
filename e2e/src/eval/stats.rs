//! Means with 95 % intervals over seeds, and paired comparisons over users.
//!
//! - A method's metric over `N >= 2` seeds: the mean of the per-seed means ± Student's
//!   `t(N−1, 0.975) · sd / sqrt(N)` (what moves between seeds: the negatives, MF's
//!   initialisation and sampling, the simulation's sync jitter). With one seed the interval is
//!   the normal one over users, `1.96 · sd_users / sqrt(users)`.
//! - A paired comparison of methods A and B: per user, the difference of their metric averaged
//!   over the seeds (same user, same negatives per seed), then the mean of the differences ±
//!   `1.96 · sd / sqrt(users)`. Users, not seeds, are the sampling unit: pairing removes the
//!   per-user difficulty both methods share.

use super::{Quality, UserQuality};
use serde::Serialize;
use std::collections::BTreeMap;

/// A mean and its 95 % interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Interval {
    /// The estimate.
    pub mean: f64,
    /// Half-width of the 95 % interval.
    pub half_width: f64,
}

impl Interval {
    /// Lower end.
    pub fn low(&self) -> f64 {
        self.mean - self.half_width
    }

    /// Upper end.
    pub fn high(&self) -> f64 {
        self.mean + self.half_width
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.4} ± {:.4}", self.mean, self.half_width)
    }
}

/// Student's t quantile `t(df, 0.975)`.
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        d if d <= TABLE.len() => TABLE[d - 1],
        _ => 1.96,
    }
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Mean and normal 95 % interval of independent samples.
pub fn normal_interval(xs: &[f64]) -> Interval {
    let (mean, sd) = mean_sd(xs);
    Interval { mean, half_width: 1.96 * sd / (xs.len().max(1) as f64).sqrt() }
}

/// Which metric of a [`UserQuality`] / [`Quality`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Sampled HR@10.
    Hr10,
    /// Sampled NDCG@10.
    Ndcg10,
    /// Full-ranking HR@10.
    FullHr10,
    /// Full-ranking NDCG@10.
    FullNdcg10,
}

impl Metric {
    /// All four, in table order.
    pub const ALL: [Metric; 4] =
        [Metric::Hr10, Metric::Ndcg10, Metric::FullHr10, Metric::FullNdcg10];

    /// The metric of one user.
    pub fn of_user(self, q: &UserQuality) -> f64 {
        match self {
            Metric::Hr10 => q.hr10,
            Metric::Ndcg10 => q.ndcg10,
            Metric::FullHr10 => q.full_hr10,
            Metric::FullNdcg10 => q.full_ndcg10,
        }
    }

    /// The metric of a whole run.
    pub fn of(self, q: &Quality) -> f64 {
        match self {
            Metric::Hr10 => q.hr10,
            Metric::Ndcg10 => q.ndcg10,
            Metric::FullHr10 => q.full_hr10,
            Metric::FullNdcg10 => q.full_ndcg10,
        }
    }
}

/// A method's metric over seeds: `runs[s]` is the per-user result of seed `s`.
pub fn over_seeds(runs: &[Vec<UserQuality>], metric: Metric) -> Interval {
    match runs {
        [] => Interval::default(),
        [one] => normal_interval(&one.iter().map(|q| metric.of_user(q)).collect::<Vec<_>>()),
        _ => {
            let means: Vec<f64> =
                runs.iter().map(|r| Quality::mean_of(r)).map(|q| metric.of(&q)).collect();
            let (mean, sd) = mean_sd(&means);
            Interval { mean, half_width: t975(means.len() - 1) * sd / (means.len() as f64).sqrt() }
        }
    }
}

/// A − B per user (averaged over seeds), its mean and 95 % interval, and how many seeds A's
/// mean was above B's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Paired {
    /// Mean of the per-user differences, with its interval.
    pub difference: Interval,
    /// Users in both methods' results.
    pub users: usize,
    /// Seeds where A's mean was above B's.
    pub seeds_a_above: usize,
    /// Seeds compared.
    pub seeds: usize,
}

/// Compares `a` and `b`, seed by seed (`a[s]` and `b[s]` share seed `s`), user by user.
pub fn paired(a: &[Vec<UserQuality>], b: &[Vec<UserQuality>], metric: Metric) -> Paired {
    let mut per_user: BTreeMap<u32, (f64, usize)> = BTreeMap::new();
    let mut seeds_a_above = 0;
    let seeds = a.len().min(b.len());
    for (ra, rb) in a.iter().zip(b) {
        let bs: BTreeMap<u32, f64> = rb.iter().map(|q| (q.user, metric.of_user(q))).collect();
        for q in ra {
            if let Some(vb) = bs.get(&q.user) {
                let e = per_user.entry(q.user).or_default();
                e.0 += metric.of_user(q) - vb;
                e.1 += 1;
            }
        }
        if metric.of(&Quality::mean_of(ra)) > metric.of(&Quality::mean_of(rb)) {
            seeds_a_above += 1;
        }
    }
    let diffs: Vec<f64> = per_user.values().map(|(d, n)| d / *n as f64).collect();
    Paired { difference: normal_interval(&diffs), users: diffs.len(), seeds_a_above, seeds }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(hr: &[f64]) -> Vec<UserQuality> {
        hr.iter()
            .enumerate()
            .map(|(u, &h)| UserQuality { user: u as u32, hr10: h, ..Default::default() })
            .collect()
    }

    #[test]
    fn one_seed_gives_the_normal_interval_over_users() {
        let i = over_seeds(&[users(&[1.0, 0.0, 1.0, 0.0])], Metric::Hr10);
        // sd = sqrt(1/3), n = 4.
        assert!((i.mean - 0.5).abs() < 1e-12);
        assert!((i.half_width - 1.96 * (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
    }

    #[test]
    fn several_seeds_give_a_t_interval_over_seed_means() {
        let runs = [users(&[1.0, 1.0]), users(&[0.0, 1.0]), users(&[0.5, 0.5])];
        let i = over_seeds(&runs, Metric::Hr10);
        // Seed means 1.0, 0.5, 0.5: mean 2/3, sd sqrt(1/12), t(2) = 4.303.
        assert!((i.mean - 2.0 / 3.0).abs() < 1e-12);
        assert!((i.half_width - 4.303 * (1.0f64 / 12.0).sqrt() / 3.0f64.sqrt()).abs() < 1e-9);
        assert!(i.low() < i.mean && i.mean < i.high());
    }

    #[test]
    fn paired_differences_average_seeds_per_user_first() {
        let a = [users(&[1.0, 1.0, 0.0]), users(&[1.0, 0.0, 0.0])];
        let b = [users(&[0.0, 1.0, 0.0]), users(&[0.0, 1.0, 0.0])];
        let p = paired(&a, &b, Metric::Hr10);
        // Per user: (1 + 1)/2 = 1, (0 − 1)/2 = −0.5, 0.
        assert_eq!((p.users, p.seeds, p.seeds_a_above), (3, 2, 1));
        assert!((p.difference.mean - 0.5 / 3.0).abs() < 1e-12);
        // Identical methods differ by exactly 0 with a zero-width interval.
        let same = paired(&a, &a, Metric::Hr10);
        assert_eq!((same.difference.mean, same.difference.half_width), (0.0, 0.0));
    }

    #[test]
    fn t_quantiles() {
        assert_eq!(t975(4), 2.776);
        assert_eq!(t975(1000), 1.96);
        assert!(t975(0).is_infinite());
    }
}
