//! What this TV holds from the federation: published aggregates (MiniLM embeddings, searched
//! by content similarity), contents' collaborative item vectors (aggregates of their own,
//! never searched by similarity), trends, and the global version they came with.
//!
//! Taking in an answer is two steps, so the brain can write to the database in between:
//! [`GlobalCache::plan`] decides what the cache becomes (merge, retention, cap) without
//! changing it, [`GlobalCache::commit`] installs that once it is durable.

use crate::index::{IndexKind, QuantMatrix, VectorIndex};
use crate::ranking::{self, RankingParams};
use crate::store::StoredGlobal;
use omega_protocol::vector::{QuantizedVector, quantize};
use omega_protocol::{GlobalPatterns, TrendSignal};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// The federation's knowledge held by this TV.
pub(crate) struct GlobalCache {
    rows: Vec<StoredGlobal>,
    index: VectorIndex,
    /// Per row: a collaborative vector (not a MiniLM embedding, so never similarity-searched).
    collab_flags: Vec<bool>,
    /// Contents whose collaborative vector is in use, by row (see `usable_collab`).
    collab: HashMap<String, usize>,
    /// Contents with a collaborative vector of any round: their vector is public.
    public: HashSet<String>,
    /// Rows that are not collaborative vectors, by content.
    by_content: HashMap<String, Vec<usize>>,
    /// Global version at which each aggregate was last received (this session only).
    received_in: HashMap<Uuid, u64>,
    version: u64,
    trends: Vec<TrendSignal>,
}

/// What the cache becomes after one answer (see [`GlobalCache::plan`]).
pub(crate) struct Merge {
    /// Every row kept, with its vector, best first.
    pub(crate) rows: Vec<(StoredGlobal, QuantizedVector)>,
    /// Rows received in this answer (to write).
    pub(crate) written: HashSet<Uuid>,
    /// Rows dropped by the cap (to delete).
    pub(crate) dropped: Vec<Uuid>,
    /// The trends that replace the ones held, if they do.
    pub(crate) trends: Option<Vec<TrendSignal>>,
    /// The new global version.
    pub(crate) version: u64,
}

impl GlobalCache {
    /// The cache as read from the database (every collaborative vector counts as current).
    pub(crate) fn load(
        rows: Vec<(StoredGlobal, QuantizedVector)>,
        version: u64,
        trends: Vec<TrendSignal>,
    ) -> Self {
        let mut cache = GlobalCache {
            rows: Vec::new(),
            index: VectorIndex::empty(),
            collab_flags: Vec::new(),
            collab: HashMap::new(),
            public: HashSet::new(),
            by_content: HashMap::new(),
            received_in: HashMap::new(),
            version,
            trends,
        };
        cache.install(rows, None);
        cache
    }

    /// What taking in `global` at `now` makes of the cache: received rows replace those with
    /// the same id, then the `max` best by retention value stay. `None` when `global` is
    /// older than what is held (answers may arrive out of order).
    pub(crate) fn plan(
        &self,
        global: &GlobalPatterns,
        now: i64,
        p: &RankingParams,
        max: usize,
    ) -> Option<Merge> {
        if global.global_version < self.version {
            return None;
        }
        let mut merged: HashMap<Uuid, (StoredGlobal, QuantizedVector)> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, g)| (g.id, (g.clone(), self.index.matrix().get(i))))
            .collect();
        let mut written = HashSet::new();
        for s in &global.similar {
            let g = StoredGlobal {
                id: s.id,
                content_id: s.content_id.clone(),
                success_rate: s.success_rate,
                sample_count: s.sample_count,
                time_slot: s.context.time_slot,
                day_type: s.context.day_type,
                content_type: s.context.content_type,
                genres: s.context.genres.clone(),
                updated_at_ms: s.updated_at_ms,
            };
            written.insert(s.id);
            merged.insert(s.id, (g, quantize(&s.embedding)));
        }
        let value = |g: &StoredGlobal| {
            ranking::retention(
                g.success_rate,
                ranking::freshness(now.saturating_sub(g.updated_at_ms), p),
            )
        };
        let mut rows: Vec<(StoredGlobal, QuantizedVector)> = merged.into_values().collect();
        rows.sort_by(|a, b| value(&b.0).total_cmp(&value(&a.0)).then(a.0.id.cmp(&b.0.id)));
        let dropped = rows.iter().skip(max).map(|(g, _)| g.id).collect();
        rows.truncate(max);
        let replace_trends = global.global_version > self.version || !global.trending.is_empty();
        Some(Merge {
            rows,
            written,
            dropped,
            trends: replace_trends.then(|| global.trending.clone()),
            version: global.global_version,
        })
    }

    /// Installs a planned merge (once it is durable). With `current_round_only`, only the
    /// collaborative vectors received for this version are used.
    pub(crate) fn commit(&mut self, merge: Merge, current_round_only: bool) {
        for id in &merge.written {
            self.received_in.insert(*id, merge.version);
        }
        for id in &merge.dropped {
            self.received_in.remove(id);
        }
        if let Some(trends) = merge.trends {
            self.trends = trends;
        }
        self.version = merge.version;
        self.install(merge.rows, current_round_only.then_some(merge.version));
    }

    fn install(&mut self, rows: Vec<(StoredGlobal, QuantizedVector)>, current: Option<u64>) {
        let mut matrix = QuantMatrix::new();
        rows.iter().for_each(|(_, v)| matrix.push(v));
        self.rows = rows.into_iter().map(|(g, _)| g).collect();
        self.index = VectorIndex::build(matrix, IndexKind::Auto);
        self.collab_flags = self.rows.iter().map(StoredGlobal::is_collaborative).collect();
        self.public.clear();
        self.collab.clear();
        self.by_content.clear();
        for (i, g) in self.rows.iter().enumerate() {
            if !self.collab_flags[i] {
                self.by_content.entry(g.content_id.clone()).or_default().push(i);
                continue;
            }
            self.public.insert(g.content_id.clone());
            // Loaded from the database: the round is unknown, so it counts as current.
            let usable =
                current.is_none_or(|v| self.received_in.get(&g.id).is_none_or(|&r| r == v));
            if usable {
                self.collab.insert(g.content_id.clone(), i);
            }
        }
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn is_hnsw(&self) -> bool {
        self.index.is_hnsw()
    }

    pub(crate) fn trends(&self) -> &[TrendSignal] {
        &self.trends
    }

    pub(crate) fn row(&self, i: usize) -> &StoredGlobal {
        &self.rows[i]
    }

    pub(crate) fn vector(&self, i: usize) -> QuantizedVector {
        self.index.matrix().get(i)
    }

    /// Rows near `q` by content similarity (collaborative vectors left out).
    pub(crate) fn search(&self, q: &QuantizedVector, k: usize) -> Vec<(usize, f32)> {
        self.index
            .search(q, k)
            .into_iter()
            .map(|(i, sim)| (i as usize, sim))
            .filter(|(i, _)| !self.collab_flags[*i])
            .collect()
    }

    /// Rows about `content_id` that are not collaborative vectors.
    pub(crate) fn content_rows(&self, content_id: &str) -> &[usize] {
        self.by_content.get(content_id).map_or(&[], Vec::as_slice)
    }

    /// The collaborative vector of `content_id` in use, if any.
    pub(crate) fn collab_vector(&self, content_id: &str) -> Option<QuantizedVector> {
        self.collab.get(content_id).map(|&i| self.vector(i))
    }

    /// Contents whose collaborative vector is in use.
    pub(crate) fn collab_contents(&self) -> impl Iterator<Item = &str> {
        self.collab.keys().map(String::as_str)
    }

    /// Collaborative vectors in use.
    pub(crate) fn collab_count(&self) -> usize {
        self.collab.len()
    }

    /// True when the federation published a collaborative vector for `content_id` (any
    /// round held): the content is public, known to many devices.
    pub(crate) fn is_public(&self, content_id: &str) -> bool {
        self.public.contains(content_id)
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.rows.capacity() * std::mem::size_of::<StoredGlobal>() + self.index.heap_bytes()
    }
}
