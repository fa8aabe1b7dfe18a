//! Vector search over unit embeddings: an exact int8 scan, or an HNSW index where one pays.
//!
//! Every set is stored int8 with one scale per vector ([`omega_protocol::vector`]), a quarter
//! of the f32 bytes, and scanned with the exact integer dot product. An exact scan of 10,000
//! vectors takes well under a millisecond on one core, so the brain's own patterns (at most
//! `max_patterns`, changing at every `observe`) are always scanned. Sets that change rarely
//! and may be large — the catalogue, the global patterns pulled at each sync — get an
//! `instant-distance` HNSW index once they reach [`ANN_MIN_VECTORS`], built on a background
//! thread when the set is replaced (never inside `recommend`; exact scans answer meanwhile). `instant-distance` cannot insert and fixes `ef_search`
//! at build time, which suits sets rebuilt whole.
//!
//! [`ANN_MIN_VECTORS`] comes from `omega-device-bench` (docs/benchmarks.md): below it the
//! scan is about as fast as an HNSW search and exact, and the build time is not repaid.

use instant_distance::{Builder, HnswMap, Point, Search};
use omega_protocol::vector::{EMBEDDING_DIM, QuantizedVector, dot_i8, quantize};
use std::sync::{Arc, OnceLock};

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

type Hnsw = HnswMap<QPoint, u32>;

/// A searchable, immutable set of unit vectors.
///
/// An HNSW build takes seconds to over a minute (12-75 s for 5,000-20,000 vectors on this
/// machine), far too long to hold up `open` or a sync; so [`VectorIndex::build`] builds the
/// graph on a background thread and searches exactly until it is ready. The answers are
/// exact meanwhile, only slower; the switch is one atomic load per search.
pub struct VectorIndex {
    matrix: QuantMatrix,
    /// `None`: exact scan only. `Some`: an HNSW graph, filled in once built.
    hnsw: Option<Arc<OnceLock<Hnsw>>>,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("len", &self.matrix.len())
            .field("hnsw", &self.is_hnsw())
            .field("hnsw_pending", &self.hnsw_pending())
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

fn wants_hnsw(matrix: &QuantMatrix, kind: IndexKind) -> bool {
    match kind {
        IndexKind::Auto => matrix.len() >= ANN_MIN_VECTORS,
        IndexKind::Exact => false,
        IndexKind::Hnsw => !matrix.is_empty(),
    }
}

fn build_graph(points: Vec<QPoint>) -> Hnsw {
    let ids: Vec<u32> = (0..points.len() as u32).collect();
    Builder::default()
        .ef_search(ANN_EF_SEARCH)
        .ef_construction(ANN_EF_CONSTRUCTION)
        .seed(0x0e6a)
        .build(points, ids)
}

fn points(matrix: &QuantMatrix) -> Vec<QPoint> {
    (0..matrix.len()).map(|i| QPoint(matrix.get(i))).collect()
}

impl VectorIndex {
    /// The index over `matrix`. When `kind` asks for HNSW, the graph is built on a background
    /// thread and searches scan exactly until it is ready (see the type's docs); returns at
    /// once either way. A build cannot be cancelled: replacing the index lets it finish and
    /// drops it.
    pub fn build(matrix: QuantMatrix, kind: IndexKind) -> Self {
        if !wants_hnsw(&matrix, kind) {
            return VectorIndex { matrix, hnsw: None };
        }
        let cell = Arc::new(OnceLock::new());
        let filled = Arc::clone(&cell);
        let pts = points(&matrix);
        let spawned = std::thread::Builder::new().name("omega-hnsw".into()).spawn(move || {
            let _ = filled.set(build_graph(pts));
        });
        match spawned {
            Ok(_) => VectorIndex { matrix, hnsw: Some(cell) },
            Err(e) => {
                tracing::warn!(error = %e, "no thread for the HNSW build; searching exactly");
                VectorIndex { matrix, hnsw: None }
            }
        }
    }

    /// Like [`VectorIndex::build`], but builds the graph before returning (benchmarks, and
    /// tests that need the HNSW path).
    pub fn build_blocking(matrix: QuantMatrix, kind: IndexKind) -> Self {
        if !wants_hnsw(&matrix, kind) {
            return VectorIndex { matrix, hnsw: None };
        }
        let cell = OnceLock::new();
        let _ = cell.set(build_graph(points(&matrix)));
        VectorIndex { matrix, hnsw: Some(Arc::new(cell)) }
    }

    /// An empty index.
    pub fn empty() -> Self {
        VectorIndex { matrix: QuantMatrix::new(), hnsw: None }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.matrix.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.matrix.is_empty()
    }

    /// True when searches go through HNSW (the graph is built).
    pub fn is_hnsw(&self) -> bool {
        self.graph().is_some()
    }

    /// True while an HNSW graph is being built in the background (searches are exact).
    pub fn hnsw_pending(&self) -> bool {
        self.hnsw.as_ref().is_some_and(|c| c.get().is_none())
    }

    fn graph(&self) -> Option<&Hnsw> {
        self.hnsw.as_ref().and_then(|c| c.get())
    }

    /// The vectors.
    pub fn matrix(&self) -> &QuantMatrix {
        &self.matrix
    }

    /// The `k` nearest vectors to `q`, best first: `(index, cosine)`. Cosines are exact
    /// (int8) for whatever the search returns.
    pub fn search(&self, q: &QuantizedVector, k: usize) -> Vec<(u32, f32)> {
        match self.graph() {
            None => self.matrix.top_k(q, k),
            Some(map) => {
                let mut search = Search::default();
                let point = QPoint(q.clone());
                let found = map.search(&point, &mut search).take(k);
                top_k(found.map(|item| (*item.value, 1.0 - item.distance)), k)
            }
        }
    }

    /// Bytes held (vectors; the HNSW graph adds ~`64 * 4` bytes and a copy of each vector).
    pub fn heap_bytes(&self) -> usize {
        let graph =
            if self.hnsw.is_some() { self.len() * (64 * 4 + EMBEDDING_DIM + 32) } else { 0 };
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
        let idx = VectorIndex::build_blocking(matrix(120), IndexKind::Hnsw);
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

    #[test]
    fn a_large_set_answers_exactly_at_once_and_switches_to_hnsw_when_built() {
        // Large enough that the build takes seconds (in a debug build the distance function is
        // unoptimised: ~0.1 s per vector), so the first searches cannot find it done; small
        // enough to finish within the test.
        let n = 240;
        let started = std::time::Instant::now();
        let idx = VectorIndex::build(matrix(n), IndexKind::Hnsw);
        let exact = VectorIndex::build(matrix(n), IndexKind::Exact);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "build returned at once");
        assert!(idx.hnsw_pending() && !idx.is_hnsw(), "{idx:?}");
        let queries: Vec<QuantizedVector> = (5_000..5_020).map(|s| quantize(&unit(s))).collect();
        for q in &queries {
            assert_eq!(idx.search(q, 10), exact.search(q, 10), "exact while building");
        }
        while idx.hnsw_pending() {
            assert!(started.elapsed() < std::time::Duration::from_secs(300), "never built");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(idx.is_hnsw());
        let mut hits = 0;
        for q in &queries {
            let a = idx.search(q, 10);
            let b = exact.search(q, 10);
            hits += a.iter().filter(|x| b.iter().any(|y| y.0 == x.0)).count();
        }
        assert!(hits as f32 / 200.0 >= 0.9, "recall {}", hits as f32 / 200.0);
        // Auto stays exact below the crossover, and never starts a build there.
        let small = VectorIndex::build(matrix(10), IndexKind::Auto);
        assert!(!small.is_hnsw() && !small.hnsw_pending());
    }

    #[test]
    fn push_f32_quantises_and_sizes_are_reported() {
        let mut m = QuantMatrix::new();
        assert!(m.is_empty());
        let v = unit(3);
        m.push_f32(&v);
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(0), quantize(&v));
        assert!((m.similarity(0, &quantize(&v)) - 1.0).abs() < 0.01);
        assert!(m.heap_bytes() >= EMBEDDING_DIM + 4);
        let empty = VectorIndex::empty();
        assert!(empty.is_empty() && !empty.is_hnsw());
        assert_eq!(empty.len(), 0);
        assert_eq!(empty.heap_bytes(), 0);
        let exact = VectorIndex::build(matrix(100), IndexKind::Exact);
        assert_eq!(exact.len(), 100);
        assert!(exact.heap_bytes() >= 100 * EMBEDDING_DIM);
        let graph = VectorIndex::build_blocking(matrix(100), IndexKind::Hnsw);
        assert!(graph.is_hnsw() && !graph.hnsw_pending());
        assert!(graph.heap_bytes() > exact.heap_bytes(), "the graph is counted");
    }
}
