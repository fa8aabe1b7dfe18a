//! Collaborative item vectors: what the federation learns from *which devices liked what*.
//!
//! The round sees, per pseudonymous device, the set of contents it has quality patterns for.
//! From those sets it learns one vector per content such that a TV scores a candidate `i` by
//! `score(i) = a_i · Σ_{j ∈ what it watched} a_j` — an item-item model delivered as one
//! published aggregate per content, nothing per user:
//!
//! 1. `G = XᵀX`, the content co-occurrence matrix of the device × content incidence `X`,
//!    restricted to contents with at least `min_sources` devices (k-anonymity);
//! 2. its top `dim` eigenpairs `(s_k, v_k)` by randomized subspace iteration (never forming
//!    `G`: each step is two passes over the device sets);
//! 3. `a_i = (v_k,i · sqrt(s_k / (s_k + λ)))_k` — the low-rank part of the EASE item-item
//!    ridge solution (`G(G + λI)⁻¹`), with `λ = lambda_rel × mean(diag G)`;
//! 4. the `dim` coordinates written into the first `dim` of the 384 wire dimensions, the rest
//!    zero: the vector is not a MiniLM embedding (it is published under its own id,
//!    `omega_protocol::types::collaborative_vector_id`, next to the content's audience
//!    profile), and its zero tail compresses to almost nothing, so a 5 KB answer carries ~4x
//!    more of them than of dense 384-dim vectors;
//! 5. scaled so the longest vector has length 1. The **length carries the strength** of a
//!    content's evidence (popular, consistently co-watched contents are longer): consumers
//!    must not re-normalise these vectors.
//!
//! Measured on MovieLens-100K (`docs/quality.md`): at MF's level, where MiniLM-only audience
//! profiles reach about 0.45 HR@10.

use crate::privacy::Noise;
use omega_protocol::vector::EMBEDDING_DIM;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;

/// Settings of the collaborative vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CollabConfig {
    /// Rank of the item model (<= 384).
    pub dim: usize,
    /// Ridge strength relative to the mean item popularity.
    pub lambda_rel: f64,
    /// Subspace iterations.
    pub iterations: usize,
}

impl Default for CollabConfig {
    fn default() -> Self {
        CollabConfig { dim: 32, lambda_rel: 4.0, iterations: 6 }
    }
}

/// Eigen-decomposition of a small symmetric matrix (row-major `n × n`) by cyclic Jacobi
/// rotations. Returns eigenvalues (descending) and eigenvectors as columns (row-major).
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        let total: f64 = a.iter().map(|x| x * x).sum();
        if off <= 1e-22 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a[y * n + y].total_cmp(&a[x * n + x]));
    let values = order.iter().map(|&i| a[i * n + i]).collect();
    let mut vecs = vec![0.0; n * n];
    for (col, &i) in order.iter().enumerate() {
        for k in 0..n {
            vecs[k * n + col] = v[k * n + i];
        }
    }
    (values, vecs)
}

/// Orthonormalises the `r` columns of a row-major `n × r` matrix (modified Gram–Schmidt);
/// a column that vanishes is left zero.
fn orthonormalize(q: &mut [f64], n: usize, r: usize) {
    for c in 0..r {
        for prev in 0..c {
            let d: f64 = (0..n).map(|i| q[i * r + c] * q[i * r + prev]).sum();
            for i in 0..n {
                q[i * r + c] -= d * q[i * r + prev];
            }
        }
        let norm = (0..n).map(|i| q[i * r + c].powi(2)).sum::<f64>().sqrt();
        let inv = if norm > 1e-12 { 1.0 / norm } else { 0.0 };
        for i in 0..n {
            q[i * r + c] *= inv;
        }
    }
}

/// `Y = X·Q` then `Z = Xᵀ·Y` for the incidence given as per-device content lists.
fn gram_times(sets: &[Vec<u32>], q: &[f64], n: usize, r: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; sets.len() * r];
    for (s, items) in sets.iter().enumerate() {
        let row = &mut y[s * r..(s + 1) * r];
        for &j in items {
            row.iter_mut().zip(&q[j as usize * r..][..r]).for_each(|(a, b)| *a += b);
        }
    }
    let mut z = vec![0.0; n * r];
    for (s, items) in sets.iter().enumerate() {
        let row = &y[s * r..(s + 1) * r];
        for &j in items {
            z[j as usize * r..][..r].iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
    }
    (y, z)
}

/// Top eigenpairs of a symmetric `n × n` operator given as `apply(Q) = G·Q` (row-major
/// `n × r`), by randomized subspace iteration. Returns eigenvalues (descending) and the
/// eigenvectors as the columns of a row-major `n × r` matrix.
fn top_eigen(
    apply: impl Fn(&[f64]) -> Vec<f64>,
    n: usize,
    r: usize,
    iterations: usize,
    seed: u64,
) -> (Vec<f64>, Vec<f64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    // The random start of the iteration: not privacy noise, so a fixed seed is fine.
    let mut q: Vec<f64> = (0..n * r).map(|_| rng.sample(StandardNormal)).collect();
    orthonormalize(&mut q, n, r);
    for _ in 0..iterations {
        q = apply(&q);
        orthonormalize(&mut q, n, r);
    }
    // T = Qᵀ G Q (r × r), then G ≈ (Q W) Λ (Q W)ᵀ.
    let gq = apply(&q);
    let mut t = vec![0.0; r * r];
    for i in 0..n {
        for a in 0..r {
            let qa = q[i * r + a];
            if qa != 0.0 {
                for b in 0..r {
                    t[a * r + b] += qa * gq[i * r + b];
                }
            }
        }
    }
    for a in 0..r {
        for b in a + 1..r {
            let m = 0.5 * (t[a * r + b] + t[b * r + a]);
            t[a * r + b] = m;
            t[b * r + a] = m;
        }
    }
    let (values, w) = symmetric_eigen(&t, r);
    let mut vecs = vec![0.0; n * r];
    for i in 0..n {
        for k in 0..r {
            vecs[i * r + k] = (0..r).map(|m| q[i * r + m] * w[m * r + k]).sum();
        }
    }
    (values, vecs)
}

/// Shrinks the top `d` eigen-directions like EASE, writes them into the first `d` of the 384
/// dimensions, and scales so the longest vector has length 1.
fn finish(values: &[f64], vecs: &[f64], n: usize, r: usize, d: usize, lambda: f64) -> Vec<f32> {
    let shrink: Vec<f64> = values
        .iter()
        .take(d)
        .map(|&s| if s > 0.0 { (s / (s + lambda)).sqrt() } else { 0.0 })
        .collect();
    let mut out = vec![0.0f32; n * EMBEDDING_DIM];
    let mut max_norm = 0.0f64;
    for i in 0..n {
        let mut norm = 0.0;
        for (k, f) in shrink.iter().enumerate() {
            let v = vecs[i * r + k] * f;
            out[i * EMBEDDING_DIM + k] = v as f32;
            norm += v * v;
        }
        max_norm = max_norm.max(norm.sqrt());
    }
    if max_norm > 0.0 {
        out.iter_mut().for_each(|x| *x = (f64::from(*x) / max_norm) as f32);
    }
    out
}

/// Item vectors (row-major `n × 384`, non-zero only in the first `cfg.dim` dimensions) for `n`
/// contents from per-device content sets (indices `< n`). Deterministic for a seed. Empty
/// input gives zero vectors.
pub fn item_vectors(sets: &[Vec<u32>], n: usize, cfg: &CollabConfig, seed: u64) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    let d = cfg.dim.min(EMBEDDING_DIM).min(n).max(1);
    let r = (d + 16).min(n);
    let (values, vecs) = top_eigen(|q| gram_times(sets, q, n, r).1, n, r, cfg.iterations, seed);
    let diag_mean = sets.iter().map(|s| s.len()).sum::<usize>() as f64 / n as f64;
    finish(&values, &vecs, n, r, d, cfg.lambda_rel * diag_mean)
}

/// The differentially private variant (the "Analyze Gauss" mechanism): each device's set
/// holds at most `m` contents, each entering with weight `1/sqrt(m)`, so one device moves
/// the Gram matrix by at most 1 in Frobenius norm; symmetric `N(0, sigma²)` noise is added
/// to every entry of the upper triangle (mirrored), and everything after is post-processing.
/// The `n` contents must have been selected before (by the round's noisy selection), so that
/// which rows exist does not depend on any one device.
pub fn dp_item_vectors(
    sets: &[Vec<u32>],
    n: usize,
    m: usize,
    cfg: &CollabConfig,
    sigma: f64,
    noise: &mut Noise,
) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    let c = 1.0 / m.max(1) as f64;
    let mut g = vec![0.0f64; n * n];
    for set in sets {
        for &a in set.iter().take(m) {
            for &b in set.iter().take(m) {
                g[a as usize * n + b as usize] += c;
            }
        }
    }
    for a in 0..n {
        for b in a..n {
            let z = noise.gaussian(sigma);
            g[a * n + b] += z;
            if a != b {
                g[b * n + a] += z;
            }
        }
    }
    let diag: Vec<f64> = (0..n).map(|i| g[i * n + i]).collect();
    let d = cfg.dim.min(EMBEDDING_DIM).min(n).max(1);
    let r = (d + 16).min(n);
    let apply = |q: &[f64]| {
        let mut z = vec![0.0; n * r];
        for i in 0..n {
            let row = &g[i * n..(i + 1) * n];
            let out = &mut z[i * r..(i + 1) * r];
            for (j, &gij) in row.iter().enumerate() {
                if gij != 0.0 {
                    out.iter_mut().zip(&q[j * r..(j + 1) * r]).for_each(|(o, x)| *o += gij * x);
                }
            }
        }
        z
    };
    let (values, vecs) = top_eigen(apply, n, r, cfg.iterations, 0x00c0_11ab);
    let diag_mean = diag.iter().map(|x| x.max(0.0)).sum::<f64>() / n as f64;
    finish(&values, &vecs, n, r, d, cfg.lambda_rel * diag_mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_finds_eigenpairs_of_a_known_matrix() {
        // [[2, 1], [1, 2]] has eigenvalues 3 and 1.
        let (vals, vecs) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        assert!((vals[0] - 3.0).abs() < 1e-12 && (vals[1] - 1.0).abs() < 1e-12);
        assert!((vecs[0].abs() - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
        assert!((vecs[0] - vecs[2]).abs() < 1e-12, "first eigenvector is (1, 1)/sqrt2");
    }

    #[test]
    fn vectors_score_co_watched_contents_above_others_in_their_first_dimensions() {
        // Two tastes: devices of taste t watch contents of block t (5 each).
        let sets: Vec<Vec<u32>> = (0..40u32)
            .map(|s| {
                let block = (s % 2) * 5;
                (0..5).filter(|k| (s + k) % 5 != 0).map(|k| block + k).collect()
            })
            .collect();
        let n = 10;
        let cfg = CollabConfig { dim: 4, lambda_rel: 1.0, iterations: 8 };
        let v = item_vectors(&sets, n, &cfg, 1);
        let dot = |i: usize, j: usize| -> f32 {
            (0..EMBEDDING_DIM).map(|c| v[i * EMBEDDING_DIM + c] * v[j * EMBEDDING_DIM + c]).sum()
        };
        assert!(dot(0, 1) > dot(0, 6) + 0.1, "same block {} other {}", dot(0, 1), dot(0, 6));
        let norms: Vec<f32> = (0..n).map(|i| dot(i, i).sqrt()).collect();
        assert!(norms.iter().all(|&x| x <= 1.0 + 1e-5) && norms.iter().any(|&x| x > 0.999));
        assert_eq!(v, item_vectors(&sets, n, &cfg, 1), "deterministic");
        // Only the first `dim` dimensions carry the model: the tail is zero.
        assert!((0..n).all(|i| {
            v[i * EMBEDDING_DIM + cfg.dim..(i + 1) * EMBEDDING_DIM].iter().all(|x| *x == 0.0)
        }));
    }
}
