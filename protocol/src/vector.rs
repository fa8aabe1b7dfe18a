//! Embedding arithmetic shared by the device and the server.
//!
//! Embeddings are L2-normalised, so cosine similarity is a dot product. On the wire and in
//! in-memory scans they are int8 with one f32 scale per vector: `x[i] ~= q[i] * scale`, with
//! `scale = max|x| / 127`. For unit vectors this keeps cosine(original, decoded) above 0.999
//! in practice (the contract only promises 0.99), at a quarter of the bytes.

/// Dimension of every embedding (all-MiniLM-L6-v2).
pub const EMBEDDING_DIM: usize = 384;

/// An int8 vector with one scale.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedVector {
    /// Quantised components, each in `[-127, 127]`.
    pub values: Vec<i8>,
    /// Multiplier that maps the components back to f32; 0 for the zero vector.
    pub scale: f32,
}

impl QuantizedVector {
    /// The f32 vector this one approximates.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values.iter().map(|&q| f32::from(q) * self.scale).collect()
    }

    /// Approximate dot product with another quantised vector.
    pub fn dot(&self, other: &QuantizedVector) -> f32 {
        dot_i8(&self.values, &other.values) as f32 * self.scale * other.scale
    }

    /// The raw component bytes (two's complement), as they travel on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.values.iter().map(|&q| q.to_ne_bytes()[0]).collect()
    }

    /// Rebuilds a vector from wire bytes; the caller validates length and scale.
    pub fn from_bytes(bytes: &[u8], scale: f32) -> Self {
        QuantizedVector { values: bytes.iter().map(|&b| i8::from_ne_bytes([b])).collect(), scale }
    }
}

/// Quantises `v` to int8 with one scale (symmetric, round to nearest).
///
/// Non-finite inputs must be rejected before this point ([`crate::validate`]); a vector of
/// zeros yields scale 0.
pub fn quantize(v: &[f32]) -> QuantizedVector {
    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    if max == 0.0 || !max.is_finite() {
        return QuantizedVector { values: vec![0; v.len()], scale: 0.0 };
    }
    let scale = max / 127.0;
    let inv = 1.0 / scale;
    let values = v.iter().map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8).collect();
    QuantizedVector { values, scale }
}

/// Dot product of two int8 vectors, exact in i32.
///
/// Written as a plain loop over fixed chunks so that LLVM vectorises it (SSE2 `pmaddwd` on any
/// x86-64); a 384-dim product is ~100 instructions.
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0i32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += i32::from(x[i]) * i32::from(y[i]);
        }
    }
    let tail: i32 =
        ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| i32::from(*x) * i32::from(*y)).sum();
    acc.iter().sum::<i32>() + tail
}

/// Dot product of two f32 vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Euclidean norm.
pub fn norm(v: &[f32]) -> f32 {
    dot(v, v).sqrt()
}

/// Cosine similarity; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let d = norm(a) * norm(b);
    if d == 0.0 { 0.0 } else { dot(a, b) / d }
}

/// Scales `v` to unit length in place. Returns false (and leaves `v` alone) for a zero or
/// non-finite vector.
pub fn l2_normalize(v: &mut [f32]) -> bool {
    let n = norm(v);
    if n == 0.0 || !n.is_finite() {
        return false;
    }
    let inv = 1.0 / n;
    v.iter_mut().for_each(|x| *x *= inv);
    true
}

/// Weighted mean of unit vectors, re-normalised. `None` when the weights sum to zero or
/// the mean vanishes.
pub fn weighted_centroid<'a>(
    items: impl IntoIterator<Item = (&'a [f32], f32)>,
) -> Option<Vec<f32>> {
    let mut acc: Vec<f32> = Vec::new();
    let mut total = 0.0f32;
    for (v, w) in items {
        if acc.is_empty() {
            acc = vec![0.0; v.len()];
        }
        for (a, x) in acc.iter_mut().zip(v) {
            *a += w * x;
        }
        total += w;
    }
    if total <= 0.0 || acc.is_empty() {
        return None;
    }
    l2_normalize(&mut acc).then_some(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random_unit(rng: &mut StdRng) -> Vec<f32> {
        // Sum of uniforms: roughly Gaussian components, like real embeddings.
        let mut v: Vec<f32> = (0..EMBEDDING_DIM)
            .map(|_| (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum())
            .collect();
        assert!(l2_normalize(&mut v));
        v
    }

    #[test]
    fn quantisation_keeps_cosine_above_contract_on_random_unit_vectors() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut worst = 1.0f32;
        for _ in 0..1000 {
            let v = random_unit(&mut rng);
            let q = quantize(&v);
            worst = worst.min(cosine(&v, &q.dequantize()));
        }
        assert!(worst >= 0.99, "worst cosine {worst}");
    }

    #[test]
    fn quantised_dot_tracks_f32_dot() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..200 {
            let (a, b) = (random_unit(&mut rng), random_unit(&mut rng));
            let exact = dot(&a, &b);
            let approx = quantize(&a).dot(&quantize(&b));
            assert!((exact - approx).abs() < 0.02, "exact {exact} approx {approx}");
        }
    }

    #[test]
    fn dot_i8_matches_naive_sum_including_tail_and_extremes() {
        let a: Vec<i8> = (0..389).map(|i| ((i * 37) % 255) - 127).map(|x| x as i8).collect();
        let b: Vec<i8> = (0..389).map(|i| ((i * 91) % 255) - 127).map(|x| x as i8).collect();
        let naive: i32 = a.iter().zip(&b).map(|(x, y)| i32::from(*x) * i32::from(*y)).sum();
        assert_eq!(dot_i8(&a, &b), naive);
        let max = vec![-127i8; EMBEDDING_DIM];
        assert_eq!(dot_i8(&max, &max), 127 * 127 * EMBEDDING_DIM as i32);
    }

    #[test]
    fn zero_vector_quantises_to_zero_scale_and_does_not_normalise() {
        let z = vec![0.0f32; EMBEDDING_DIM];
        let q = quantize(&z);
        assert_eq!(q.scale, 0.0);
        assert!(q.values.iter().all(|&x| x == 0));
        let mut zz = z.clone();
        assert!(!l2_normalize(&mut zz));
        assert_eq!(cosine(&z, &z), 0.0);
    }

    #[test]
    fn bytes_round_trip_preserves_sign() {
        let q = QuantizedVector { values: vec![-127, -1, 0, 1, 127], scale: 0.5 };
        let back = QuantizedVector::from_bytes(&q.to_bytes(), q.scale);
        assert_eq!(back, q);
        assert_eq!(back.dequantize(), vec![-63.5, -0.5, 0.0, 0.5, 63.5]);
    }

    #[test]
    fn weighted_centroid_leans_to_heavier_vector_and_rejects_zero_weight() {
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 1.0];
        let c = weighted_centroid([(&a[..], 3.0), (&b[..], 1.0)]).expect("centroid");
        assert!(c[0] > c[1]);
        assert!((norm(&c) - 1.0).abs() < 1e-6);
        assert!(weighted_centroid([(&a[..], 0.0)]).is_none());
        assert!(weighted_centroid(std::iter::empty::<(&[f32], f32)>()).is_none());
    }
}
