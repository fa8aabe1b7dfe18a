//! What a round reads: quality patterns from every shard, with their pseudonymous sources.
//!
//! Patterns are kept int8-quantised as they travel (388 bytes each instead of 1,536), so a
//! round over a million patterns fits in a few hundred megabytes. Strings that repeat
//! (sources, regions, content ids, contexts) are interned. A pattern that fails validation is
//! skipped and counted, never fatal: one bad row must not stop a round.
//!
//! A pattern may come without an embedding (a TV leaves the embedding of its title text out
//! when the content's collaborative vector is public). It is grouped by its content id: once
//! every batch is read, [`Intake::with_content_vectors`] gives it the embedding of the
//! heaviest pattern of the same content that carries one (ties by the embedding's bytes, so
//! the choice does not depend on arrival order). A content none of whose patterns in the
//! round carries an embedding has no vector to place it by: its patterns are counted in
//! [`Intake::unplaced`] and take no part in the round.

use omega_protocol::pb;
use omega_protocol::types::PatternContext;
use omega_protocol::validate;
use omega_protocol::vector::QuantizedVector;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// Observations beyond this add no more weight: a pattern seen 10,000 times on one TV is not
/// worth more than one seen `SAMPLE_CAP` times.
pub const SAMPLE_CAP: u32 = 50;

/// A distinct device: its shard and the shard's pseudonym for it.
pub type SourceKey = (u32, Vec<u8>);

/// Assigns dense indices to values, in first-seen order.
#[derive(Debug, Clone)]
pub struct Interner<T: Eq + Hash + Clone> {
    index: HashMap<T, u32>,
    values: Vec<T>,
}

impl<T: Eq + Hash + Clone> Default for Interner<T> {
    fn default() -> Self {
        Interner { index: HashMap::new(), values: Vec::new() }
    }
}

impl<T: Eq + Hash + Clone> Interner<T> {
    /// The index of `v`, adding it when new.
    pub fn intern(&mut self, v: &T) -> u32 {
        if let Some(&i) = self.index.get(v) {
            return i;
        }
        let i = self.values.len() as u32;
        self.index.insert(v.clone(), i);
        self.values.push(v.clone());
        i
    }

    /// The value at `i`.
    pub fn get(&self, i: u32) -> &T {
        &self.values[i as usize]
    }

    /// Every value, by index.
    pub fn values(&self) -> &[T] {
        &self.values
    }

    /// Number of distinct values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when nothing was interned.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// One exported pattern, compactly.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// Index into [`Intake::sources`].
    pub source: u32,
    /// Index into [`Intake::regions`].
    pub region: u32,
    /// Index into [`Intake::contents`].
    pub content: u32,
    /// Index into [`Intake::contexts`].
    pub context: u32,
    /// Pattern id (UUID bytes).
    pub id: [u8; 16],
    /// The embedding as it travelled; empty for a pattern uploaded without one, until
    /// [`Intake::with_content_vectors`] gives it its content's.
    pub embedding: QuantizedVector,
    /// `[0, 1]`.
    pub success_rate: f32,
    /// `>= 1`.
    pub sample_count: u32,
    /// Unix epoch milliseconds of the last update.
    pub updated_at_ms: i64,
}

impl Contribution {
    /// How much this pattern counts: success rate × samples (capped at [`SAMPLE_CAP`]).
    pub fn weight(&self) -> f32 {
        self.success_rate * self.sample_count.min(SAMPLE_CAP) as f32
    }
}

/// Everything a round has read so far.
#[derive(Debug, Clone, Default)]
pub struct Intake {
    /// Distinct devices.
    pub sources: Interner<SourceKey>,
    /// Regions.
    pub regions: Interner<String>,
    /// Content ids.
    pub contents: Interner<String>,
    /// Pattern contexts.
    pub contexts: Interner<PatternContext>,
    /// The patterns.
    pub items: Vec<Contribution>,
    /// Model of every embedding; the first shard's decides.
    pub model_id: Option<String>,
    /// Patterns skipped for failing validation or the quality floor.
    pub rejected: u64,
    /// Patterns skipped because the same (source, id) was already read.
    pub duplicates: u64,
    /// Patterns read without an embedding.
    pub without_embedding: u64,
    /// Of them, those whose content no pattern of the round carried an embedding for (see
    /// the module documentation); set by [`Intake::with_content_vectors`].
    pub unplaced: u64,
    seen: HashSet<(u32, [u8; 16])>,
}

/// Why a batch could not be taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IntakeError {
    /// The shard's model differs from the round's.
    #[error("shard {shard_id} serves model {got}, the round uses {expected}")]
    ModelMismatch {
        /// Shard.
        shard_id: u32,
        /// Its model.
        got: String,
        /// The round's model.
        expected: String,
    },
}

impl Intake {
    /// Takes one exported batch; patterns below `min_quality` or invalid are skipped.
    /// Returns how many patterns were added.
    pub fn add_batch(
        &mut self,
        batch: &pb::ExportBatch,
        min_quality: f32,
    ) -> Result<usize, IntakeError> {
        if !batch.patterns.is_empty() {
            match &self.model_id {
                None => self.model_id = Some(batch.model_id.clone()),
                Some(m) if *m != batch.model_id => {
                    return Err(IntakeError::ModelMismatch {
                        shard_id: batch.shard_id,
                        got: batch.model_id.clone(),
                        expected: m.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        let mut added = 0;
        for e in &batch.patterns {
            if self.add(batch.shard_id, e, min_quality) {
                added += 1;
            }
        }
        Ok(added)
    }

    fn add(&mut self, shard_id: u32, e: &pb::ExportedPattern, min_quality: f32) -> bool {
        let Some(p) = &e.pattern else {
            self.rejected += 1;
            return false;
        };
        let valid = validate::check_uploaded_pattern("pattern", p).is_ok()
            && validate::check_string("region", &e.region).is_ok()
            && !e.source.is_empty()
            && e.source.len() <= validate::MAX_STRING_BYTES;
        if !valid || p.success_rate < min_quality {
            self.rejected += 1;
            return false;
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&p.id);
        let source = self.sources.intern(&(shard_id, e.source.clone()));
        if !self.seen.insert((source, id)) {
            self.duplicates += 1;
            return false;
        }
        let context = PatternContext::from_wire("context", p.context.clone()).unwrap_or_default();
        self.items.push(Contribution {
            source,
            region: self.regions.intern(&e.region),
            content: self.contents.intern(&p.content_id),
            context: self.contexts.intern(&context),
            id,
            embedding: p.embedding.as_ref().map_or_else(
                || QuantizedVector { values: Vec::new(), scale: 0.0 },
                |e| QuantizedVector::from_bytes(&e.values, e.scale),
            ),
            success_rate: p.success_rate,
            sample_count: p.sample_count,
            updated_at_ms: p.updated_at_ms,
        });
        self.without_embedding += u64::from(p.embedding.is_none());
        true
    }

    /// This intake with every pattern read without an embedding given its content's (see
    /// the module documentation); `None` when every pattern carried one.
    pub fn with_content_vectors(&self) -> Option<Intake> {
        if self.without_embedding == 0 {
            return None;
        }
        let mut reference: HashMap<u32, usize> = HashMap::new();
        for (i, c) in self.items.iter().enumerate() {
            if c.embedding.values.is_empty() {
                continue;
            }
            let best = reference.entry(c.content).or_insert(i);
            let b = &self.items[*best];
            let heavier = c.weight().total_cmp(&b.weight()).then_with(|| {
                b.embedding
                    .values
                    .cmp(&c.embedding.values)
                    .then(b.embedding.scale.total_cmp(&c.embedding.scale))
            });
            if heavier.is_gt() {
                *best = i;
            }
        }
        let mut out = self.clone();
        let mut unplaced = 0;
        let mut kept = Vec::with_capacity(out.items.len());
        for mut c in std::mem::take(&mut out.items) {
            if c.embedding.values.is_empty() {
                match reference.get(&c.content) {
                    Some(&r) => c.embedding = self.items[r].embedding.clone(),
                    None => {
                        unplaced += 1;
                        continue;
                    }
                }
            }
            kept.push(c);
        }
        out.items = kept;
        out.unplaced = unplaced;
        Some(out)
    }

    /// The latest update among all patterns: the round's notion of "now" (data time, so a
    /// rerun over the same data computes the same trends, and a simulation in the past works).
    pub fn as_of_ms(&self) -> i64 {
        self.items.iter().map(|c| c.updated_at_ms).max().unwrap_or(0)
    }

    /// Indices of `items` in a canonical order that does not depend on the order shards
    /// answered in: by content id, then source (shard, pseudonym), then pattern id.
    pub fn canonical_order(&self) -> Vec<usize> {
        let content_rank = ranks(self.contents.values());
        let source_rank = ranks(self.sources.values());
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        order.sort_unstable_by_key(|&i| {
            let c = &self.items[i];
            (content_rank[c.content as usize], source_rank[c.source as usize], c.id)
        });
        order
    }
}

/// Rank of each value in sorted order.
fn ranks<T: Ord>(values: &[T]) -> Vec<u32> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_unstable_by(|&a, &b| values[a].cmp(&values[b]));
    let mut rank = vec![0u32; values.len()];
    for (r, i) in idx.into_iter().enumerate() {
        rank[i] = r as u32;
    }
    rank
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use omega_protocol::types::embedding_to_wire;
    use omega_protocol::vector::EMBEDDING_DIM;

    pub(crate) fn exported(
        source: &str,
        content: &str,
        id: u8,
        emb: &[f32],
        success: f32,
    ) -> pb::ExportedPattern {
        pb::ExportedPattern {
            pattern: Some(pb::Pattern {
                id: vec![id; 16],
                content_id: content.into(),
                embedding: Some(embedding_to_wire(emb)),
                success_rate: success,
                sample_count: 2,
                context: None,
                created_at_ms: 1,
                updated_at_ms: i64::from(id),
            }),
            source: source.as_bytes().to_vec(),
            region: "eu".into(),
        }
    }

    fn batch(shard_id: u32, model: &str, patterns: Vec<pb::ExportedPattern>) -> pb::ExportBatch {
        pb::ExportBatch { patterns, cursor: vec![], shard_id, model_id: model.into(), last: true }
    }

    #[test]
    fn intake_filters_dedupes_and_checks_the_model() {
        let e = vec![0.05f32; EMBEDDING_DIM];
        let mut bad = exported("d1", "c", 9, &e, 0.9);
        bad.pattern.as_mut().map(|p| p.embedding.as_mut().map(|x| x.values.pop()));
        let mut intake = Intake::default();
        let n = intake
            .add_batch(
                &batch(
                    1,
                    "m",
                    vec![
                        exported("d1", "c", 1, &e, 0.9),
                        exported("d1", "c", 1, &e, 0.9), // same (source, id)
                        exported("d2", "c", 1, &e, 0.9), // same id, other device: kept
                        exported("d3", "c", 2, &e, 0.5), // below the floor
                        bad,                             // dimension 383
                    ],
                ),
                0.8,
            )
            .expect("same model");
        assert_eq!((n, intake.duplicates, intake.rejected), (2, 1, 2));
        // The same pseudonym on another shard is another device.
        intake.add_batch(&batch(2, "m", vec![exported("d1", "c", 1, &e, 0.9)]), 0.8).expect("ok");
        assert_eq!(intake.sources.len(), 3);
        let err = intake.add_batch(&batch(3, "other", vec![exported("d9", "c", 1, &e, 0.9)]), 0.8);
        assert!(matches!(err, Err(IntakeError::ModelMismatch { shard_id: 3, .. })));
    }

    #[test]
    fn a_pattern_without_embedding_takes_its_contents_heaviest_embedding() {
        let (a, b) = (vec![0.05f32; EMBEDDING_DIM], vec![-0.05f32; EMBEDDING_DIM]);
        let bare = |source: &str, content: &str, id: u8| {
            let mut e = exported(source, content, id, &a, 0.9);
            if let Some(p) = e.pattern.as_mut() {
                p.embedding = None;
            }
            e
        };
        let mut no_content = bare("d9", "c", 9);
        if let Some(p) = no_content.pattern.as_mut() {
            p.content_id.clear();
        }
        let rows = vec![
            bare("d1", "c", 1),
            exported("d2", "c", 2, &a, 0.8),
            exported("d3", "c", 3, &b, 0.95), // heavier: its embedding is c's
            bare("d4", "lonely", 4),
            no_content, // refused: nothing to group it by
        ];
        for rev in [false, true] {
            let mut rows = rows.clone();
            if rev {
                rows.reverse();
            }
            let mut intake = Intake::default();
            assert_eq!(intake.add_batch(&batch(1, "m", rows), 0.7).expect("ok"), 4);
            assert_eq!((intake.rejected, intake.without_embedding), (1, 2));
            let placed = intake.with_content_vectors().expect("two had none");
            assert_eq!((placed.items.len(), placed.unplaced), (3, 1));
            let one = placed.items.iter().find(|c| c.id[0] == 1).expect("placed");
            let three = placed.items.iter().find(|c| c.id[0] == 3).expect("kept");
            assert_eq!(one.embedding, three.embedding, "reversed: {rev}");
        }
    }

    #[test]
    fn canonical_order_ignores_arrival_order() {
        let e = vec![0.05f32; EMBEDDING_DIM];
        let rows = |rev: bool| {
            let mut v = vec![
                exported("b", "x", 1, &e, 0.9),
                exported("a", "y", 2, &e, 0.9),
                exported("a", "x", 3, &e, 0.9),
            ];
            if rev {
                v.reverse();
            }
            let mut intake = Intake::default();
            intake.add_batch(&batch(1, "m", v), 0.0).expect("ok");
            intake.canonical_order().into_iter().map(|i| intake.items[i].id[0]).collect::<Vec<_>>()
        };
        assert_eq!(rows(false), vec![3, 1, 2]);
        assert_eq!(rows(true), rows(false));
    }
}
