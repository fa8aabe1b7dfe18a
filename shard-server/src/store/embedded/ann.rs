//! In-memory approximate nearest-neighbour index over int8 embeddings: an inverted file.
//!
//! The first `lists` vectors inserted become the list centroids (on real MiniLM embeddings
//! these are a sample of the data, which is what k-means would start from); every later
//! vector joins the list of its nearest centroid. A query ranks the centroids and scans the
//! closest lists until it has probed `probes` lists *and* seen enough candidates. Inserts and
//! removals are O(lists) and O(1), so the index never needs a rebuild on the sync path.
//!
//! Vectors are stored contiguously per list, so a scan is a run of [`dot_i8`] calls over
//! adjacent memory. Scores are cosine similarities (embeddings are unit vectors).

use omega_protocol::vector::{EMBEDDING_DIM, dot_i8};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use uuid::Uuid;

/// Owner value of federated aggregates (never excluded by a device query).
pub const NO_OWNER: u32 = u32::MAX;

#[derive(Debug, Default)]
struct List {
    keys: Vec<Uuid>,
    owners: Vec<u32>,
    scales: Vec<f32>,
    vecs: Vec<i8>,
}

/// The index.
#[derive(Debug)]
pub struct Ann {
    max_lists: usize,
    probes: usize,
    centroids: Vec<i8>,
    centroid_scales: Vec<f32>,
    lists: Vec<List>,
    loc: HashMap<Uuid, (u32, u32)>,
}

#[derive(Debug, Clone, Copy)]
struct Hit {
    score: f32,
    list: u32,
    pos: u32,
}

impl PartialEq for Hit {
    fn eq(&self, o: &Self) -> bool {
        self.score.total_cmp(&o.score) == Ordering::Equal
    }
}
impl Eq for Hit {}
impl PartialOrd for Hit {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Hit {
    // Reversed: the max-heap's top is the worst hit kept so far.
    fn cmp(&self, o: &Self) -> Ordering {
        o.score.total_cmp(&self.score)
    }
}

/// A search result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour {
    /// Key given at insertion.
    pub key: Uuid,
    /// Owner given at insertion.
    pub owner: u32,
    /// Approximate cosine similarity.
    pub score: f32,
}

/// Converts wire bytes (two's complement) to i8.
pub fn to_i8(bytes: &[u8]) -> Vec<i8> {
    bytes.iter().map(|&b| i8::from_ne_bytes([b])).collect()
}

impl Ann {
    /// An empty index with at most `lists` lists, probing at least `probes` per query.
    pub fn new(lists: usize, probes: usize) -> Self {
        Ann {
            max_lists: lists.max(1),
            probes: probes.max(1),
            centroids: Vec::new(),
            centroid_scales: Vec::new(),
            lists: Vec::new(),
            loc: HashMap::new(),
        }
    }

    /// Vectors indexed.
    pub fn len(&self) -> usize {
        self.loc.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.loc.is_empty()
    }

    /// True when `key` is indexed.
    pub fn contains(&self, key: &Uuid) -> bool {
        self.loc.contains_key(key)
    }

    fn nearest_centroid(&self, v: &[i8]) -> usize {
        let mut best = (0usize, f32::MIN);
        for (i, c) in self.centroids.chunks_exact(EMBEDDING_DIM).enumerate() {
            let s = dot_i8(c, v) as f32 * self.centroid_scales[i];
            if s > best.1 {
                best = (i, s);
            }
        }
        best.0
    }

    /// Inserts (or replaces) `key`. `v` must have [`EMBEDDING_DIM`] components.
    pub fn insert(&mut self, key: Uuid, owner: u32, v: &[i8], scale: f32) {
        if v.len() != EMBEDDING_DIM {
            return;
        }
        self.remove(&key);
        let list = if self.lists.len() < self.max_lists {
            self.centroids.extend_from_slice(v);
            self.centroid_scales.push(scale);
            self.lists.push(List::default());
            self.lists.len() - 1
        } else {
            self.nearest_centroid(v)
        };
        let l = &mut self.lists[list];
        let pos = l.keys.len();
        l.keys.push(key);
        l.owners.push(owner);
        l.scales.push(scale);
        l.vecs.extend_from_slice(v);
        self.loc.insert(key, (list as u32, pos as u32));
    }

    /// Removes `key`; false when it was not indexed.
    pub fn remove(&mut self, key: &Uuid) -> bool {
        let Some((list, pos)) = self.loc.remove(key) else { return false };
        let l = &mut self.lists[list as usize];
        let (pos, last) = (pos as usize, l.keys.len() - 1);
        l.keys.swap_remove(pos);
        l.owners.swap_remove(pos);
        l.scales.swap_remove(pos);
        if pos != last {
            let (head, tail) = l.vecs.split_at_mut(last * EMBEDDING_DIM);
            head[pos * EMBEDDING_DIM..(pos + 1) * EMBEDDING_DIM].copy_from_slice(tail);
            if let Some(moved) = self.loc.get_mut(&l.keys[pos]) {
                moved.1 = pos as u32;
            }
        }
        l.vecs.truncate(last * EMBEDDING_DIM);
        true
    }

    /// Up to `k` nearest vectors to `q` whose owner is not `exclude`, best first.
    pub fn search(&self, q: &[i8], exclude: u32, k: usize) -> Vec<Neighbour> {
        if k == 0 || q.len() != EMBEDDING_DIM || self.is_empty() {
            return Vec::new();
        }
        let mut order: Vec<(f32, usize)> = self
            .centroids
            .chunks_exact(EMBEDDING_DIM)
            .enumerate()
            .map(|(i, c)| (dot_i8(c, q) as f32 * self.centroid_scales[i], i))
            .collect();
        order.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let want_seen = k.saturating_mul(4);
        let mut heap: BinaryHeap<Hit> = BinaryHeap::with_capacity(k + 1);
        let mut seen = 0usize;
        for (probed, &(_, li)) in order.iter().enumerate() {
            if probed >= self.probes && seen >= want_seen {
                break;
            }
            let l = &self.lists[li];
            for (pos, v) in l.vecs.chunks_exact(EMBEDDING_DIM).enumerate() {
                if l.owners[pos] == exclude && exclude != NO_OWNER {
                    continue;
                }
                seen += 1;
                let score = dot_i8(v, q) as f32 * l.scales[pos];
                if heap.len() < k {
                    heap.push(Hit { score, list: li as u32, pos: pos as u32 });
                } else if heap.peek().is_some_and(|w| score > w.score) {
                    heap.pop();
                    heap.push(Hit { score, list: li as u32, pos: pos as u32 });
                }
            }
        }
        let q_norm = (dot_i8(q, q) as f32).sqrt();
        let mut hits = heap.into_sorted_vec();
        hits.truncate(k);
        hits.into_iter()
            .map(|h| {
                let l = &self.lists[h.list as usize];
                let p = h.pos as usize;
                let v_norm = l.scales[p]
                    * (dot_i8(
                        &l.vecs[p * EMBEDDING_DIM..(p + 1) * EMBEDDING_DIM],
                        &l.vecs[p * EMBEDDING_DIM..(p + 1) * EMBEDDING_DIM],
                    ) as f32)
                        .sqrt();
                let denom = q_norm * v_norm;
                let score = if denom > 0.0 { h.score / denom } else { 0.0 };
                Neighbour { key: l.keys[p], owner: l.owners[p], score }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega_protocol::vector::{l2_normalize, quantize};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random_unit(rng: &mut StdRng) -> Vec<f32> {
        let mut v: Vec<f32> = (0..EMBEDDING_DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        l2_normalize(&mut v);
        v
    }

    #[test]
    fn finds_exact_matches_and_respects_owner_exclusion_and_removal() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut ann = Ann::new(16, 4);
        let mut keys = Vec::new();
        let mut vecs = Vec::new();
        for i in 0..500u32 {
            let v = random_unit(&mut rng);
            let q = quantize(&v);
            let key = Uuid::from_u128(u128::from(i) + 1);
            ann.insert(key, i % 5, &q.values, q.scale);
            keys.push(key);
            vecs.push(q);
        }
        assert_eq!(ann.len(), 500);
        let hits = ann.search(&vecs[42].values, NO_OWNER, 10);
        assert_eq!(hits[0].key, keys[42]);
        assert!((hits[0].score - 1.0).abs() < 1e-3, "{}", hits[0].score);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        let excl = ann.search(&vecs[42].values, 42 % 5, 10);
        assert!(excl.iter().all(|h| h.owner != 2));
        assert!(ann.remove(&keys[42]));
        assert!(!ann.remove(&keys[42]));
        assert!(ann.search(&vecs[42].values, NO_OWNER, 10).iter().all(|h| h.key != keys[42]));
        // Removing everything leaves consistent lists.
        for k in &keys {
            ann.remove(k);
        }
        assert!(ann.is_empty());
        assert!(ann.search(&vecs[0].values, NO_OWNER, 5).is_empty());
    }

    #[test]
    fn recall_against_brute_force_on_clustered_data() {
        let mut rng = StdRng::seed_from_u64(9);
        let centres: Vec<Vec<f32>> = (0..50).map(|_| random_unit(&mut rng)).collect();
        let mut ann = Ann::new(64, 8);
        let mut all = Vec::new();
        for i in 0..5000u32 {
            let c = &centres[i as usize % centres.len()];
            let mut v: Vec<f32> = c.iter().map(|x| x + rng.random_range(-0.05f32..0.05)).collect();
            l2_normalize(&mut v);
            let q = quantize(&v);
            ann.insert(Uuid::from_u128(u128::from(i) + 1), 0, &q.values, q.scale);
            all.push((Uuid::from_u128(u128::from(i) + 1), q));
        }
        let mut recall = 0.0;
        for centre in centres.iter().take(20) {
            let q = quantize(
                &random_unit(&mut rng)
                    .iter()
                    .zip(centre)
                    .map(|(a, b)| a * 0.3 + b)
                    .collect::<Vec<_>>(),
            );
            let mut exact: Vec<(f32, Uuid)> = all.iter().map(|(k, v)| (q.dot(v), *k)).collect();
            exact.sort_by(|a, b| b.0.total_cmp(&a.0));
            let truth: std::collections::HashSet<Uuid> = exact[..10].iter().map(|x| x.1).collect();
            let got = ann.search(&q.values, NO_OWNER, 10);
            recall += got.iter().filter(|h| truth.contains(&h.key)).count() as f64 / 10.0;
        }
        recall /= 20.0;
        assert!(recall >= 0.9, "recall@10 {recall}");
    }
}
