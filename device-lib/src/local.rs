//! What this TV learned, in memory: its patterns (rows as stored, their vectors as one int8
//! matrix scanned for seeds, an index by content and context, the ids evicted since the shard
//! last heard of them) and what it watched (for exclusion and the collaborative query).
//!
//! These are plain collections: the brain writes a change to the database first and applies
//! it here only once committed; which pattern to evict and which content to forget are
//! decided here, from the values passed in.

use crate::index::QuantMatrix;
use crate::ranking::{self, RankingParams};
use crate::store::StoredPattern;
use omega_protocol::vector::QuantizedVector;
use omega_protocol::{DayType, TimeSlot};
use std::collections::HashMap;
use uuid::Uuid;

/// A pattern's identity: one per content and context.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PatternKey(String, TimeSlot, DayType);

impl PatternKey {
    /// The key of a content watched in a context.
    pub(crate) fn new(content_id: &str, time_slot: TimeSlot, day_type: DayType) -> Self {
        PatternKey(content_id.to_owned(), time_slot, day_type)
    }

    fn of(p: &StoredPattern) -> Self {
        PatternKey::new(&p.content_id, p.time_slot, p.day_type)
    }
}

/// The local patterns.
#[derive(Default)]
pub(crate) struct LocalPatterns {
    rows: Vec<StoredPattern>,
    vecs: QuantMatrix,
    by_key: HashMap<PatternKey, usize>,
    /// Evicted patterns the shard holds, to be `removed` in the next delta.
    removed: Vec<Uuid>,
    evictions: u64,
}

impl LocalPatterns {
    /// The patterns read from the database, and the removals not yet sent.
    pub(crate) fn load(rows: Vec<(StoredPattern, QuantizedVector)>, removed: Vec<Uuid>) -> Self {
        let mut local = LocalPatterns { removed, ..Default::default() };
        for (p, v) in rows {
            local.insert(p, &v);
        }
        local
    }

    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn rows(&self) -> &[StoredPattern] {
        &self.rows
    }

    pub(crate) fn get(&self, i: usize) -> &StoredPattern {
        &self.rows[i]
    }

    pub(crate) fn vectors(&self) -> &QuantMatrix {
        &self.vecs
    }

    pub(crate) fn vector(&self, i: usize) -> QuantizedVector {
        self.vecs.get(i)
    }

    pub(crate) fn find(&self, key: &PatternKey) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// A pattern about `content_id` (any context).
    pub(crate) fn position_of_content(&self, content_id: &str) -> Option<usize> {
        self.rows.iter().position(|p| p.content_id == content_id)
    }

    /// The pattern to evict for room at `now`: the lowest retention value (ranking rule),
    /// the oldest among equals.
    pub(crate) fn eviction_victim(&self, now: i64, p: &RankingParams) -> Option<usize> {
        let value = |x: &StoredPattern| {
            ranking::retention(
                x.success_rate,
                ranking::freshness(now.saturating_sub(x.updated_at_ms), p),
            )
        };
        self.rows
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                value(a).total_cmp(&value(b)).then(a.updated_at_ms.cmp(&b.updated_at_ms))
            })
            .map(|(i, _)| i)
    }

    pub(crate) fn insert(&mut self, p: StoredPattern, v: &QuantizedVector) {
        self.by_key.insert(PatternKey::of(&p), self.rows.len());
        self.vecs.push(v);
        self.rows.push(p);
    }

    /// Replaces pattern `i` (same key, same vector).
    pub(crate) fn replace(&mut self, i: usize, p: StoredPattern) {
        self.rows[i] = p;
    }

    /// Evicts pattern `i`; one the shard holds is remembered for the next delta's `removed`.
    pub(crate) fn evict(&mut self, i: usize) {
        let gone = self.rows.swap_remove(i);
        self.vecs.swap_remove(i);
        self.by_key.remove(&PatternKey::of(&gone));
        if let Some(moved) = self.rows.get(i) {
            self.by_key.insert(PatternKey::of(moved), i);
        }
        if gone.synced {
            self.removed.push(gone.id);
        }
        self.evictions += 1;
    }

    pub(crate) fn removed(&self) -> &[Uuid] {
        &self.removed
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Patterns `idx` went out in a delta, and so did the removals `removed`.
    pub(crate) fn mark_sent(&mut self, idx: &[usize], removed: &[Uuid]) {
        for &i in idx {
            let p = &mut self.rows[i];
            p.synced = true;
            p.pending_samples = 0;
            p.dirty = false;
        }
        self.removed.retain(|id| !removed.contains(id));
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        let strings: usize = self
            .rows
            .iter()
            .map(|p| {
                p.content_id.len()
                    + p.title.len()
                    + p.genres.iter().map(|g| g.len() + 24).sum::<usize>()
            })
            .sum();
        self.rows.capacity() * std::mem::size_of::<StoredPattern>()
            + strings
            + self.vecs.heap_bytes()
            + self.by_key.capacity() * (std::mem::size_of::<PatternKey>() + 8)
    }
}

/// The contents watched, with when each was last watched (unix ms).
#[derive(Default)]
pub(crate) struct Watched(HashMap<String, i64>);

impl Watched {
    pub(crate) fn load(rows: Vec<(String, i64)>) -> Self {
        Watched(rows.into_iter().collect())
    }

    pub(crate) fn contains(&self, content_id: &str) -> bool {
        self.0.contains_key(content_id)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The content to forget so that `content_id` fits within `max`: the longest unwatched
    /// (ties by id, so every run forgets the same), or none when it fits.
    pub(crate) fn to_forget(&self, content_id: &str, max: usize) -> Option<String> {
        if self.0.contains_key(content_id) || self.0.len() < max {
            return None;
        }
        self.0.iter().min_by_key(|(id, t)| (**t, (*id).clone())).map(|(id, _)| id.clone())
    }

    /// `content_id` watched at `at_ms`, after forgetting `forget`.
    pub(crate) fn record(&mut self, content_id: &str, at_ms: i64, forget: Option<&str>) {
        if let Some(old) = forget {
            self.0.remove(old);
        }
        let seen = self.0.entry(content_id.to_owned()).or_insert(at_ms);
        *seen = (*seen).max(at_ms);
    }

    /// Watched contents, newest first; equal times by content id, so sums over them are the
    /// same on every run.
    pub(crate) fn newest_first(&self) -> Vec<&str> {
        let mut order: Vec<(i64, &str)> = self.0.iter().map(|(c, &t)| (t, c.as_str())).collect();
        order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        order.into_iter().map(|(_, c)| c).collect()
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.0.keys().map(|k| k.len() + 48).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_unwatched_content_is_forgotten_first_and_only_when_full() {
        let w = Watched::load(vec![("a".into(), 30), ("b".into(), 10), ("c".into(), 10)]);
        // (content, max, expected)
        let cases = [
            ("d", 4, None),
            ("d", 3, Some("b")), // oldest, ties by id
            ("a", 3, None),      // already known: nothing to forget
        ];
        for (content, max, want) in cases {
            assert_eq!(w.to_forget(content, max).as_deref(), want, "{content} {max}");
        }
        let mut w = w;
        w.record("d", 40, Some("b"));
        w.record("a", 5, None); // an older time never moves a content back
        assert_eq!(w.newest_first(), vec!["d", "a", "c"]);
    }
}
