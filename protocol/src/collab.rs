//! The collaborative scoring rule: how a set of watched contents becomes one query vector
//! against the federation's collaborative item vectors.
//!
//! The federation publishes one item vector `a_i` per content (`docs/quality.md`); a viewer is
//! scored against candidate `i` by `a_i · q`. Three parties must agree on `q` — the TV that
//! ranks, the shard that decides which vectors a TV receives first, and the evaluation
//! harness — so the rule lives here, once.
//!
//! `q = unit(Σ_k 2^(−k/h) a_k) + mix · unit(Σ_k a_k)`, with `k = 0` the most recently watched
//! content and `h` the half-life in contents. The first term follows what the viewer is into
//! *now* (on MovieLens-100K the next film is far better predicted by the last few than by the
//! whole history); the second keeps the long-run taste in. Both are normalised so neither
//! term's scale depends on how much was watched, which keeps scores of long and short
//! histories comparable. A content without a vector still takes its place in the order (its
//! recency counts), it just adds nothing.

use crate::vector::{EMBEDDING_DIM, l2_normalize};
use serde::{Deserialize, Serialize};

/// Half-life of the recency term, in contents (chosen on the validation item of
/// MovieLens-100K, `docs/quality.md`).
pub const DEFAULT_HALF_LIFE: f32 = 3.0;

/// Weight of the whole-history term against the recency term (chosen with the half-life).
pub const DEFAULT_MIX: f32 = 1.0;

/// Largest `|a_i · q|` for vectors of at most unit length: `1 + mix` bounds it.
pub fn score_bound(p: &QueryParams) -> f32 {
    1.0 + p.mix.max(0.0)
}

/// The two knobs of the query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryParams {
    /// Half-life of the recency term in contents; must be > 0 (infinity: no recency).
    pub half_life: f32,
    /// Weight of the whole-history term (>= 0; 0: recency only).
    pub mix: f32,
}

impl Default for QueryParams {
    fn default() -> Self {
        QueryParams { half_life: DEFAULT_HALF_LIFE, mix: DEFAULT_MIX }
    }
}

impl QueryParams {
    /// True when both knobs are usable (positive half-life, finite non-negative mix).
    pub fn is_valid(&self) -> bool {
        self.half_life > 0.0 && !self.half_life.is_nan() && self.mix.is_finite() && self.mix >= 0.0
    }
}

/// The query of a viewer whose watched contents are given newest first, each with its item
/// vector if one is known. `None` when no content has a (non-zero) vector, or when `p` is not
/// valid. Vectors shorter or longer than [`EMBEDDING_DIM`] are ignored like missing ones.
pub fn query<'a, I>(newest_first: I, p: &QueryParams) -> Option<Vec<f32>>
where
    I: IntoIterator<Item = Option<&'a [f32]>>,
{
    if !p.is_valid() {
        return None;
    }
    let mut recent = vec![0.0f32; EMBEDDING_DIM];
    let mut all = vec![0.0f32; EMBEDDING_DIM];
    let decay = 0.5f32.powf(1.0 / p.half_life);
    let mut w = 1.0f32;
    let mut any = false;
    for v in newest_first {
        if let Some(v) = v.filter(|v| v.len() == EMBEDDING_DIM) {
            for ((r, a), x) in recent.iter_mut().zip(all.iter_mut()).zip(v) {
                *r += w * x;
                *a += x;
            }
            any = true;
        }
        w *= decay;
    }
    if !any || !l2_normalize(&mut recent) {
        return None;
    }
    if p.mix > 0.0 && l2_normalize(&mut all) {
        recent.iter_mut().zip(&all).for_each(|(r, a)| *r += p.mix * a);
    }
    Some(recent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::dot;

    fn axis(i: usize, len: f32) -> Vec<f32> {
        let mut v = vec![0.0; EMBEDDING_DIM];
        v[i] = len;
        v
    }

    #[test]
    fn recent_contents_weigh_more_and_missing_vectors_keep_their_place() {
        let (a, b) = (axis(0, 1.0), axis(1, 1.0));
        let p = QueryParams { half_life: 1.0, mix: 0.0 };
        // Newest a, then b: a weighs 1, b 1/2.
        let q = query([Some(&a[..]), Some(&b[..])], &p).expect("query");
        assert!((q[0] / q[1] - 2.0).abs() < 1e-5, "{} {}", q[0], q[1]);
        assert!((dot(&q, &q) - 1.0).abs() < 1e-5, "recency term is unit length");
        // A content without a vector in between still ages b by one more step.
        let q = query([Some(&a[..]), None, Some(&b[..])], &p).expect("query");
        assert!((q[0] / q[1] - 4.0).abs() < 1e-4, "{} {}", q[0], q[1]);
    }

    #[test]
    fn the_whole_history_term_adds_equal_weights() {
        let (a, b) = (axis(0, 1.0), axis(1, 1.0));
        let recency_only = QueryParams { half_life: 0.001, mix: 0.0 };
        let q = query([Some(&a[..]), Some(&b[..])], &recency_only).expect("query");
        assert!(q[1].abs() < 1e-6, "b decayed away: {}", q[1]);
        let mixed = QueryParams { half_life: 0.001, mix: 1.0 };
        let q = query([Some(&a[..]), Some(&b[..])], &mixed).expect("query");
        let half = std::f32::consts::FRAC_1_SQRT_2;
        assert!((q[0] - (1.0 + half)).abs() < 1e-5 && (q[1] - half).abs() < 1e-5, "{q:?}");
        let no_recency = QueryParams { half_life: f32::INFINITY, mix: 0.0 };
        let q = query([Some(&a[..]), Some(&b[..])], &no_recency).expect("query");
        assert!((q[0] - q[1]).abs() < 1e-6);
        assert!(dot(&q, &q) <= score_bound(&no_recency).powi(2) + 1e-5);
    }

    #[test]
    fn nothing_usable_gives_no_query() {
        let p = QueryParams::default();
        assert!(query(std::iter::empty(), &p).is_none());
        assert!(query([None, None], &p).is_none());
        let zero = vec![0.0; EMBEDDING_DIM];
        assert!(query([Some(&zero[..])], &p).is_none());
        let short = [1.0f32; 3];
        assert!(query([Some(&short[..])], &p).is_none(), "wrong length ignored");
        let a = axis(2, 0.5);
        for bad in [
            QueryParams { half_life: 0.0, mix: 0.5 },
            QueryParams { half_life: f32::NAN, mix: 0.5 },
            QueryParams { half_life: 3.0, mix: -1.0 },
            QueryParams { half_life: 3.0, mix: f32::INFINITY },
        ] {
            assert!(!bad.is_valid());
            assert!(query([Some(&a[..])], &bad).is_none(), "{bad:?}");
        }
    }
}
