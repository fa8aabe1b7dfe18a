//! Vector search over unit embeddings: an exact int8 scan, or an HNSW index where one pays.
//!
//! Every set is stored int8 with one scale per vector ([`omega_protocol::vector`]), a quarter
//! of the f32 bytes, and scanned with the exact integer dot product. An exact scan of 10,000
//! vectors takes well under a millisecond on one core, so the brain's own patterns (at most
//! `max_patterns`, changing at every `observe`) are always scanned. Sets that change rarely
//! and may be large — the catalogue, the global patterns pulled at each sync — get an
//! `instant-distance` HNSW index once they reach [`ANN_MIN_VECTORS`], built when the set is
//! replaced (never inside `recommend`). `instant-distance` cannot insert and fixes `ef_search`
//! at build time, which suits sets rebuilt whole.
//!
//! [`ANN_MIN_VECTORS`] comes from `omega-device-bench` (docs/benchmarks.md): below it the
//! scan is about as fast as an HNSW search and exact, and the build time is not repaid.

use instant_distance::{Builder, HnswMap, Point, Search};
use omega_protocol::vector::{EMBEDDING_DIM, QuantizedVector, dot_i8, quantize};

/// Sets at least this large get an HNSW index (measured crossover, see the module docs).
pub const ANN_MIN_VECTORS: usize = 20_000;
/// HNSW `ef_search` (fixed at build time by instant-distance).
pub const ANN_EF_SEARCH: usize = 64;
/// HNSW `ef_construction`.
pub const ANN_EF_CONSTRUCTION: usize = 100;

/// Int8 vectors in one contiguous buffer, searched exactly.
#[derive(Debug, Clone, Default)]
pub struct QuantMatrix {
    values: Vec<i8>,
    scales: Vec<f32>,
}

impl QuantMatrix {
    /// An empty matrix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.scales.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }

    /// Appends a quantised vector (must have [`EMBEDDING_DIM`] components).
    pub fn push(&mut self, q: &QuantizedVector) {
        debug_assert_eq!(q.values.len(), EMBEDDING_DIM);
        let mut row = q.values.clone();
        row.resize(EMBEDDING_DIM, 0);
        self.values.extend_from_slice(&row);
        self.scales.push(q.scale);
    }

    /// Appends an f32 vector, quantising it.
    pub fn push_f32(&mut self, v: &[f32]) {
        self.push(&quantize(v));
    }

    /// Overwrites vector `i`.
    pub fn set(&mut self, i: usize, q: &QuantizedVector) {
        let row = &mut self.values[i * EMBEDDING_DIM..(i + 1) * EMBEDDING_DIM];
        row.iter_mut().zip(q.values.iter().chain(std::iter::repeat(&0))).for_each(|(d, s)| *d = *s);
        self.scales[i] = q.scale;
    }

    /// Removes vector `i`, moving the last one into its place (like `Vec::swap_remove`).
    pub fn swap_remove(&mut self, i: usize) {
        let last = self.len() - 1;
        if i != last {
            let (head, tail) = self.values.split_at_mut(last * EMBEDDING_DIM);
            head[i * EMBEDDING_DIM..(i + 1) * EMBEDDING_DIM].copy_from_slice(tail);
            self.scales[i] = self.scales[last];
        }
        self.values.truncate(last * EMBEDDING_DIM);
        self.scales.truncate(last);
    }

    /// Vector `i`.
    pub fn get(&self, i: usize) -> QuantizedVector {
        QuantizedVector { values: self.row(i).to_vec(), scale: self.scales[i] }
    }

    fn row(&self, i: usize) -> &[i8] {
        &self.values[i * EMBEDDING_DIM..(i + 1) * EMBEDDING_DIM]
    }

    /// Cosine of vector `i` with `q`.
    pub fn similarity(&self, i: usize, q: &QuantizedVector) -> f32 {
        dot_i8(self.row(i), &q.values) as f32 * self.scales[i] * q.scale
    }

    /// Cosine of every vector with `q`, in order.
    pub fn scan(&self, q: &QuantizedVector) -> Vec<f32> {
        self.values
            .chunks_exact(EMBEDDING_DIM)
            .zip(&self.scales)
            .map(|(row, s)| dot_i8(row, &q.values) as f32 * s * q.scale)
            .collect()
    }

    /// The `k` most similar vectors, best first: `(index, cosine)`.
    pub fn top_k(&self, q: &QuantizedVector, k: usize) -> Vec<(u32, f32)> {
        top_k(self.scan(q).into_iter().enumerate().map(|(i, s)| (i as u32, s)), k)
    }

    /// Bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.values.capacity() + self.scales.capacity() * 4
    }
}

/// The `k` highest-scoring items, best first; ties broken by the lower index.
pub fn top_k(items: impl Iterator<Item = (u32, f32)>, k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut v: Vec<(u32, f32)> = items.collect();
    let by_score = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if v.len() > k {
        v.select_nth_unstable_by(k - 1, by_score);
        v.truncate(k);
    }
    v.sort_by(by_score);
    v
}

/// A point of the HNSW graph: an int8 unit vector; distance is `1 - cosine`.
#[derive(Debug, Clone)]
struct QPoint(QuantizedVector);

impl Point for QPoint {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - self.0.dot(&other.0)
    }
}

/// How a set is searched.
enum Searcher {
    Exact,
    Hnsw(HnswMap<QPoint, u32>),
}

/// A searchable, immutable set of unit vectors.
pub struct VectorIndex {
    matrix: QuantMatrix,
    searcher: Searcher,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("len", &self.matrix.len())
            .field("hnsw", &self.is_hnsw())
            .finish()
    }
}

/// Which search structure to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    /// Exact scan below [`ANN_MIN_VECTORS`], HNSW from there on.
    Auto,
    /// Always the exact scan.
    Exact,
    /// Always HNSW.
    Hnsw,
}

impl VectorIndex {
    /// Builds the index over `matrix`. An HNSW build costs seconds for tens of thousands of
    /// vectors: call this when a set is replaced, never per query.
    pub fn build(matrix: QuantMatrix, kind: IndexKind) -> Self {
        let hnsw = match kind {
            IndexKind::Auto => matrix.len() >= ANN_MIN_VECTORS,
            IndexKind::Exact => false,
            IndexKind::Hnsw => !matrix.is_empty(),
        };
        let searcher = if hnsw {
            let points: Vec<QPoint> = (0..matrix.len()).map(|i| QPoint(matrix.get(i))).collect();
            let ids: Vec<u32> = (0..matrix.len() as u32).collect();
            Searcher::Hnsw(
                Builder::default()
                    .ef_search(ANN_EF_SEARCH)
                    .ef_construction(ANN_EF_CONSTRUCTION)
                    .seed(0x0e6a)
                    .build(points, ids),
            )
        } else {
            Searcher::Exact
        };
        VectorIndex { matrix, searcher }
    }

    /// An empty index.
    pub fn empty() -> Self {
        VectorIndex { matrix: QuantMatrix::new(), searcher: Searcher::Exact }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.matrix.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.matrix.is_empty()
    }

    /// True when searches go through HNSW.
    pub fn is_hnsw(&self) -> bool {
        matches!(self.searcher, Searcher::Hnsw(_))
    }

    /// The vectors.
    pub fn matrix(&self) -> &QuantMatrix {
        &self.matrix
    }

    /// The `k` nearest vectors to `q`, best first: `(index, cosine)`. Cosines are exact
    /// (int8) for whatever the search returns.
    pub fn search(&self, q: &QuantizedVector, k: usize) -> Vec<(u32, f32)> {
        match &self.searcher {
            Searcher::Exact => self.matrix.top_k(q, k),
            Searcher::Hnsw(map) => {
                let mut search = Search::default();
                let point = QPoint(q.clone());
                let found = map.search(&point, &mut search).take(k);
                top_k(found.map(|item| (*item.value, 1.0 - item.distance)), k)
            }
        }
    }

    /// Bytes held (vectors; the HNSW graph adds ~`64 * 4` bytes and a copy of each vector).
    pub fn heap_bytes(&self) -> usize {
        let graph = if self.is_hnsw() { self.len() * (64 * 4 + EMBEDDING_DIM + 32) } else { 0 };
        self.matrix.heap_bytes() + graph
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega_protocol::vector::l2_normalize;

    fn unit(seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut v: Vec<f32> = (0..EMBEDDING_DIM)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        l2_normalize(&mut v);
        v
    }

    fn matrix(n: u64) -> QuantMatrix {
        let mut m = QuantMatrix::new();
        (0..n).for_each(|i| m.push_f32(&unit(i)));
        m
    }

    #[test]
    fn exact_search_finds_the_vector_itself_first() {
        let m = matrix(50);
        let q = quantize(&unit(17));
        let top = m.top_k(&q, 3);
        assert_eq!(top[0].0, 17);
        assert!(top[0].1 > 0.99);
        assert!(top[0].1 >= top[1].1 && top[1].1 >= top[2].1);
    }

    #[test]
    fn swap_remove_and_set_keep_rows_consistent() {
        let mut m = matrix(5);
        let last = m.get(4);
        m.swap_remove(1);
        assert_eq!(m.len(), 4);
        assert_eq!(m.get(1), last);
        m.swap_remove(3);
        assert_eq!(m.len(), 3);
        let q = quantize(&unit(99));
        m.set(0, &q);
        assert_eq!(m.get(0), q);
    }

    #[test]
    fn top_k_table() {
        let cases: Vec<(Vec<f32>, usize, Vec<u32>)> = vec![
            (vec![0.1, 0.9, 0.5], 2, vec![1, 2]),
            (vec![0.5, 0.5, 0.9], 3, vec![2, 0, 1]),
            (vec![0.3], 5, vec![0]),
            (vec![0.3, 0.4], 0, vec![]),
            (vec![], 3, vec![]),
        ];
        for (scores, k, want) in cases {
            let got: Vec<u32> = top_k(scores.iter().enumerate().map(|(i, s)| (i as u32, *s)), k)
                .into_iter()
                .map(|(i, _)| i)
                .collect();
            assert_eq!(got, want, "scores {scores:?} k {k}");
        }
    }

    #[test]
    fn hnsw_agrees_with_exact_on_a_small_set() {
        let idx = VectorIndex::build(matrix(120), IndexKind::Hnsw);
        assert!(idx.is_hnsw());
        let exact = VectorIndex::build(matrix(120), IndexKind::Exact);
        let mut hits = 0;
        for s in 1000..1020 {
            let q = quantize(&unit(s));
            let a: Vec<u32> = idx.search(&q, 10).into_iter().map(|x| x.0).collect();
            let b: Vec<u32> = exact.search(&q, 10).into_iter().map(|x| x.0).collect();
            hits += a.iter().filter(|x| b.contains(x)).count();
        }
        assert!(hits as f32 / 200.0 >= 0.9, "recall {}", hits as f32 / 200.0);
        assert!(!VectorIndex::build(matrix(10), IndexKind::Auto).is_hnsw());
        assert!(VectorIndex::empty().search(&quantize(&unit(1)), 3).is_empty());
    }
}
