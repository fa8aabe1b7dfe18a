//! Collaborative serving: which aggregates a device receives when the federation has
//! published collaborative item vectors (`docs/quality.md`).
//!
//! A TV ranks candidate `i` by `a_i · q`, `q` its query over what it watched, so it needs the
//! vectors of the contents it watched and of the best candidates. A collaborative vector
//! compresses to ~100 bytes (only its first dimensions are non-zero), so ~45 fit in a 5 KB
//! answer; the shard pages a per-device ranked list over successive syncs:
//!
//! - [`Catalog`]: every published collaborative vector (id
//!   `== collaborative_vector_id(content_id)`, non-empty content id, a non-zero embedding),
//!   content id -> (dequantised vector, served pattern). Built once per global version;
//!   ~2 KB per content (20 MB for 10,000).
//! - [`Catalog::ranked`]: with `q` the collaborative query over the device's contents, newest
//!   first (`omega_protocol::collab`, the rule the TV itself ranks with), the list interleaves
//!   1:1 the device's own contents (newest first: they weigh most in the TV's query) and the
//!   other contents by `a_i · q`, best first, at most [`OTHER_CANDIDATES`] of them. Recomputed
//!   on every sync: O(aggregates × 384) multiply-adds (~4 M for 10,000 contents, a few ms).
//! - [`Cursors`]: where each device is in its list, in memory and bounded; a sync serves
//!   [`WINDOW`] items from the cursor, the budget fitter keeps a prefix of them, and the cursor
//!   moves past what was sent, back to 0 at the end of the list (or when the global version
//!   changes). Losing a cursor (eviction, restart, another replica) only restarts the paging.

use crate::store::embedded::aggregate_pattern;
use crate::store::{Store, StoreError};
use crate::sync::coarse_times;
use omega_protocol::collab::{QueryParams, query};
use omega_protocol::pb;
use omega_protocol::types::collaborative_vector_id;
use omega_protocol::vector::{EMBEDDING_DIM, QuantizedVector};
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use uuid::Uuid;

/// Other contents kept in a device's ranked list (its own contents come on top): enough for
/// a TV on for an evening to hold every vector of a catalogue of a few thousand contents,
/// the best first.
pub const OTHER_CANDIDATES: usize = 3_000;

/// List items offered to the budget fitter per sync: the most an answer may carry
/// (`validate::MAX_SIMILAR`), more than the ~45 compact vectors that fit in 5 KB.
pub const WINDOW: usize = omega_protocol::validate::MAX_SIMILAR;

/// Most devices whose cursor is remembered.
pub const MAX_CURSORS: usize = 1_000_000;

const CURSOR_SHARDS: usize = 16;

/// One content's main aggregate.
#[derive(Debug, Clone)]
struct Entry {
    content_id: String,
    vector: Vec<f32>,
    pattern: pb::Pattern,
}

/// The contents with a collaborative vector at one global version.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    version: u64,
    /// Sorted by content id, so ties break the same way everywhere.
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl Catalog {
    /// Builds the catalog of `version` from the published aggregates. Kept: aggregates whose
    /// id is their content's collaborative vector id and whose embedding is a non-zero, finite
    /// 384-dim vector; ignored: every other one (no content id, audience profiles, bad ids).
    /// Aggregates that fewer than `min_sources` devices back are ignored too. Served
    /// patterns carry the group id and `at_ms` rounded down to the hour.
    pub fn build(
        version: u64,
        aggregates: &[pb::AggregatedPattern],
        min_sources: u32,
        at_ms: i64,
    ) -> Self {
        let mut entries: Vec<Entry> = aggregates
            .iter()
            .filter(|a| !a.content_id.is_empty() && a.source_devices >= min_sources)
            .filter(|a| {
                Uuid::from_slice(&a.id).is_ok_and(|id| id == collaborative_vector_id(&a.content_id))
            })
            .filter_map(|a| {
                let e = a.embedding.as_ref().filter(|e| e.values.len() == EMBEDDING_DIM)?;
                let vector = QuantizedVector::from_bytes(&e.values, e.scale).dequantize();
                let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
                (norm.is_finite() && norm > 0.0).then(|| Entry {
                    content_id: a.content_id.clone(),
                    vector,
                    pattern: coarse_times(aggregate_pattern(a, at_ms)),
                })
            })
            .collect();
        entries.sort_by(|a, b| a.content_id.cmp(&b.content_id));
        entries.dedup_by(|a, b| a.content_id == b.content_id);
        let index = entries.iter().enumerate().map(|(i, e)| (e.content_id.clone(), i)).collect();
        Catalog { version, entries, index }
    }

    /// The global version it was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Contents with a vector.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no content has a vector (collaborative serving does not apply).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The served pattern of `content_id`'s main aggregate, if it has one.
    pub fn pattern(&self, content_id: &str) -> Option<&pb::Pattern> {
        self.index.get(content_id).map(|&i| &self.entries[i].pattern)
    }

    /// The device's ranked list, as catalog positions: its own contents that have a vector,
    /// newest first, interleaved 1:1 with the best [`OTHER_CANDIDATES`] other contents by
    /// `a_i · q`, `q` the collaborative query over `contents` (given newest first, as
    /// [`Store::device_contents`] returns them; `omega_protocol::collab`, the rule the TV
    /// ranks with). Empty when none of `contents` has a vector.
    pub fn ranked(&self, contents: &[String]) -> Vec<usize> {
        let mut mine = vec![false; self.entries.len()];
        let mut own = Vec::new();
        let mut seen = HashSet::new();
        let mut order = Vec::with_capacity(contents.len());
        for c in contents.iter().filter(|c| seen.insert(c.as_str())) {
            let pos = self.index.get(c).copied();
            if let Some(i) = pos {
                mine[i] = true;
                own.push(i);
            }
            order.push(pos);
        }
        let vectors = order.iter().map(|pos| pos.map(|i| self.entries[i].vector.as_slice()));
        let Some(q) = query(vectors, &QueryParams::default()) else {
            return Vec::new();
        };
        let mut others: Vec<(f32, usize)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, _)| !mine[*i])
            .map(|(i, e)| (dot(&e.vector, &q), i))
            .collect();
        // Ties break on catalog position, i.e. content id.
        let best = |a: &(f32, usize), b: &(f32, usize)| -> Ordering {
            b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
        };
        if others.len() > OTHER_CANDIDATES {
            others.select_nth_unstable_by(OTHER_CANDIDATES - 1, best);
            others.truncate(OTHER_CANDIDATES);
        }
        others.sort_by(best);
        let mut out = Vec::with_capacity(own.len() + others.len());
        let (mut a, mut b) = (own.into_iter(), others.into_iter().map(|(_, i)| i));
        loop {
            match (a.next(), b.next()) {
                (None, None) => break,
                (x, y) => out.extend(x.into_iter().chain(y)),
            }
        }
        out
    }

    /// Served patterns of `ranked[from..]`, at most [`WINDOW`] of them.
    pub fn window(&self, ranked: &[usize], from: usize) -> Vec<pb::Pattern> {
        ranked.iter().skip(from).take(WINDOW).map(|&i| self.entries[i].pattern.clone()).collect()
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[derive(Debug, Clone, Copy)]
struct Cursor {
    version: u64,
    position: usize,
}

/// Per-device positions in the ranked list, bounded: a full shard of the map forgets one
/// arbitrary device (whose paging then restarts at 0).
#[derive(Debug)]
pub struct Cursors {
    per_shard: usize,
    shards: Vec<Mutex<HashMap<String, Cursor>>>,
}

impl Cursors {
    /// Remembers at most `max` devices (at least one per internal shard).
    pub fn new(max: usize) -> Self {
        Cursors {
            per_shard: max.div_ceil(CURSOR_SHARDS).max(1),
            shards: (0..CURSOR_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, device: &str) -> &Mutex<HashMap<String, Cursor>> {
        let h = device.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        &self.shards[h as usize % CURSOR_SHARDS]
    }

    /// Where `device` resumes in a list of `len` items at `version`: 0 when it has no cursor,
    /// when the cursor is of another version, or past the end of the list.
    pub fn position(&self, device: &str, version: u64, len: usize) -> usize {
        let Ok(map) = self.shard(device).lock() else { return 0 };
        map.get(device)
            .filter(|c| c.version == version && c.position < len)
            .map_or(0, |c| c.position)
    }

    /// Moves `device` past the `served` items sent from `from`, back to 0 at the end of a
    /// list of `len` items.
    pub fn advance(&self, device: &str, version: u64, from: usize, served: usize, len: usize) {
        let next = from.saturating_add(served);
        let position = if next >= len { 0 } else { next };
        let Ok(mut map) = self.shard(device).lock() else { return };
        if map.len() >= self.per_shard
            && !map.contains_key(device)
            && let Some(evict) = map.keys().next().cloned()
        {
            map.remove(&evict);
        }
        map.insert(device.to_owned(), Cursor { version, position });
    }

    /// Devices remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().filter_map(|s| s.lock().ok()).map(|m| m.len()).sum()
    }

    /// True when no cursor is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one sync serves through the collaborative path.
#[derive(Debug, Clone)]
pub struct Page {
    /// Candidates for `similar`, in list order (the fitter keeps a prefix).
    pub patterns: Vec<pb::Pattern>,
    /// Global version of the catalog used.
    pub version: u64,
    /// List position of the first pattern.
    pub from: usize,
    /// Length of the device's list.
    pub len: usize,
}

/// The shared collaborative-serving state: the catalog of the current global version and
/// the per-device cursors.
#[derive(Debug)]
pub struct Collab {
    catalog: RwLock<Option<Arc<Catalog>>>,
    rebuild: tokio::sync::Mutex<()>,
    /// Per-device cursors.
    pub cursors: Cursors,
}

impl Default for Collab {
    fn default() -> Self {
        Collab::new(MAX_CURSORS)
    }
}

impl Collab {
    /// Empty state remembering at most `max_cursors` devices.
    pub fn new(max_cursors: usize) -> Self {
        Collab {
            catalog: RwLock::new(None),
            rebuild: tokio::sync::Mutex::new(()),
            cursors: Cursors::new(max_cursors),
        }
    }

    fn cached(&self, version: u64) -> Option<Arc<Catalog>> {
        let c = self.catalog.read().ok()?;
        c.as_ref().filter(|c| c.version == version).cloned()
    }

    /// The catalog of `version`, rebuilt from [`Store::aggregates`] when the version changed
    /// (one rebuild at a time; concurrent syncs wait for it rather than repeat it).
    pub async fn catalog(
        &self,
        store: &dyn Store,
        version: u64,
        min_sources: u32,
        now_ms: i64,
    ) -> Result<Arc<Catalog>, StoreError> {
        if let Some(c) = self.cached(version) {
            return Ok(c);
        }
        let _one = self.rebuild.lock().await;
        if let Some(c) = self.cached(version) {
            return Ok(c);
        }
        let aggregates = store.aggregates().await?;
        let built = Arc::new(Catalog::build(version, &aggregates, min_sources, now_ms));
        tracing::debug!(version, contents = built.len(), "collaborative catalog rebuilt");
        if let Ok(mut c) = self.catalog.write() {
            *c = Some(built.clone());
        }
        Ok(built)
    }

    /// The page `device` gets from `catalog`, given its contents; `None` when collaborative
    /// serving does not apply (empty catalog, or none of its contents has a vector).
    pub fn page(&self, catalog: &Catalog, device: &str, contents: &[String]) -> Option<Page> {
        if catalog.is_empty() {
            return None;
        }
        let ranked = catalog.ranked(contents);
        if ranked.is_empty() {
            return None;
        }
        let from = self.cursors.position(device, catalog.version, ranked.len());
        Some(Page {
            patterns: catalog.window(&ranked, from),
            version: catalog.version,
            from,
            len: ranked.len(),
        })
    }

    /// Records that `served` patterns of `page` went into the answer.
    pub fn served(&self, device: &str, page: &Page, served: usize) {
        self.cursors.advance(device, page.version, page.from, served, page.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega_protocol::types::aggregate_id;
    use omega_protocol::vector::quantize;

    fn vector(parts: &[(usize, f32)]) -> Vec<f32> {
        let mut v = vec![0.0f32; EMBEDDING_DIM];
        for &(axis, x) in parts {
            v[axis] = x;
        }
        v
    }

    fn aggregate_with_id(id: Uuid, content: &str, v: &[f32]) -> pb::AggregatedPattern {
        let q = quantize(v);
        pb::AggregatedPattern {
            id: id.as_bytes().to_vec(),
            content_id: content.into(),
            embedding: Some(pb::Embedding { values: q.to_bytes(), scale: q.scale }),
            quality: 0.9,
            source_devices: 5,
            total_samples: 12,
            context: Some(pb::PatternContext::default()),
            region: String::new(),
        }
    }

    fn collab_vector(content: &str, v: &[f32]) -> pb::AggregatedPattern {
        aggregate_with_id(collaborative_vector_id(content), content, v)
    }

    fn names(c: &Catalog, ranked: &[usize]) -> Vec<String> {
        ranked.iter().map(|&i| c.entries[i].content_id.clone()).collect()
    }

    fn contents(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn catalog_keeps_only_collaborative_vectors() {
        let v = vector(&[(0, 0.5)]);
        let aggs = vec![
            collab_vector("a", &v),
            collab_vector("", &v),
            aggregate_with_id(aggregate_id("b", Some(&[1i8; EMBEDDING_DIM])), "b", &v),
            // A content's audience profile (a MiniLM embedding) is not a collaborative vector.
            aggregate_with_id(aggregate_id("p", None), "p", &v),
            aggregate_with_id(Uuid::now_v7(), "c", &v),
            collab_vector("zero", &vector(&[])),
            pb::AggregatedPattern { id: vec![1, 2, 3], ..collab_vector("short-id", &v) },
        ];
        let c = Catalog::build(7, &aggs, 3, 1_700_000_123_456);
        assert_eq!(c.len(), 1);
        assert_eq!(c.version(), 7);
        let p = c.pattern("a").expect("a");
        assert_eq!(p.id, collaborative_vector_id("a").as_bytes().to_vec(), "group id kept");
        assert_eq!(p.created_at_ms % 3_600_000, 0, "time rounded to the hour");
        assert!(c.pattern("b").is_none() && c.pattern("c").is_none() && c.pattern("p").is_none());
        assert!(Catalog::build(1, &[], 3, 0).is_empty());
    }

    #[test]
    fn ranked_interleaves_own_contents_and_best_candidates() {
        let aggs = vec![
            collab_vector("A", &vector(&[(0, 0.6)])),
            collab_vector("B", &vector(&[(0, 0.5), (1, 0.5)])),
            collab_vector("x-best", &vector(&[(0, 0.9), (1, 0.1)])),
            collab_vector("x-second", &vector(&[(0, 0.4), (1, 0.4)])),
            collab_vector("x-third", &vector(&[(1, 0.5)])),
            collab_vector("x-none", &vector(&[(2, 1.0)])),
        ];
        let c = Catalog::build(1, &aggs, 3, 0);
        let r = c.ranked(&contents(&["B", "unknown", "A", "B"]));
        // Own contents newest first (B, then A; the repeated B is older and ignored).
        // q = unit(B + 2^(-2/3) A) + unit(B + A) ~ (1.78, 0.91): x-best 1.69,
        // x-second 1.08, x-third 0.45, x-none 0.
        assert_eq!(names(&c, &r), ["B", "x-best", "A", "x-second", "x-third", "x-none"]);
        // Recency decides: A last makes x-best (along A) lead by more, and A comes first.
        let r = c.ranked(&contents(&["A", "B"]));
        assert_eq!(names(&c, &r), ["A", "x-best", "B", "x-second", "x-third", "x-none"]);
        // A device whose newest content leans to axis 1 gets x-third before x-best.
        let aggs_1 = vec![
            collab_vector("C", &vector(&[(1, 1.0)])),
            collab_vector("D", &vector(&[(0, 1.0)])),
            collab_vector("y0", &vector(&[(0, 0.5)])),
            collab_vector("y1", &vector(&[(1, 0.5)])),
        ];
        let c1 = Catalog::build(1, &aggs_1, 3, 0);
        let r1 = c1.ranked(&contents(&["C", "D"]));
        assert_eq!(names(&c1, &r1), ["C", "y1", "D", "y0"]);
        let r1 = c1.ranked(&contents(&["D", "C"]));
        assert_eq!(names(&c1, &r1), ["D", "y0", "C", "y1"]);
        assert!(c.ranked(&contents(&["unknown"])).is_empty());
        assert!(c.ranked(&[]).is_empty());
        let w = c.window(&r, 4);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].content_id, "x-third");
    }

    #[test]
    fn ranked_keeps_at_most_the_top_other_candidates() {
        let mut aggs = vec![collab_vector("own", &vector(&[(0, 1.0)]))];
        for i in 0..OTHER_CANDIDATES + 50 {
            aggs.push(collab_vector(&format!("c{i:04}"), &vector(&[(0, 0.001 * i as f32 + 0.01)])));
        }
        let c = Catalog::build(1, &aggs, 3, 0);
        let r = c.ranked(&contents(&["own"]));
        assert_eq!(r.len(), 1 + OTHER_CANDIDATES);
        let n = names(&c, &r);
        assert_eq!(n[0], "own");
        assert_eq!(n[1], format!("c{:04}", OTHER_CANDIDATES + 49), "longest projection first");
        let mut distinct = n.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), n.len());
    }

    #[test]
    fn cursors_advance_wrap_reset_and_stay_bounded() {
        let cur = Cursors::new(CURSOR_SHARDS);
        assert_eq!(cur.position("tv", 1, 10), 0);
        cur.advance("tv", 1, 0, 4, 10);
        assert_eq!(cur.position("tv", 1, 10), 4);
        assert_eq!(cur.position("tv", 2, 10), 0, "a new version restarts");
        assert_eq!(cur.position("tv", 1, 3), 0, "a shorter list restarts");
        cur.advance("tv", 1, 4, 6, 10);
        assert_eq!(cur.position("tv", 1, 10), 0, "wraps at the end");
        for i in 0..1000 {
            cur.advance(&format!("d{i}"), 1, 0, 1, 10);
        }
        assert!(cur.len() <= CURSOR_SHARDS, "{}", cur.len());
    }

    #[test]
    fn pages_walk_the_list_without_repeats_then_wrap() {
        let mut aggs = vec![collab_vector("own", &vector(&[(0, 1.0)]))];
        for i in 0..30 {
            aggs.push(collab_vector(&format!("c{i:02}"), &vector(&[(0, 0.01 * (i + 1) as f32)])));
        }
        let catalog = Catalog::build(3, &aggs, 3, 0);
        let collab = Collab::new(100);
        let mine = contents(&["own"]);
        let mut seen = Vec::new();
        while seen.len() < 31 {
            let page = collab.page(&catalog, "tv", &mine).expect("page");
            assert_eq!(page.len, 31);
            let served = page.patterns.len().min(10);
            seen.extend(page.patterns[..served].iter().map(|p| p.content_id.clone()));
            collab.served("tv", &page, served);
        }
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 31, "{seen:?}");
        let again = collab.page(&catalog, "tv", &mine).expect("wrapped");
        assert_eq!(again.from, 0);
        assert_eq!(again.patterns[0].content_id, "own");
        assert!(collab.page(&catalog, "tv", &contents(&["nothing"])).is_none());
        assert!(collab.page(&Catalog::default(), "tv", &mine).is_none());
    }
}
