//! Sync bookkeeping: which local changes the next delta carries, the delta awaiting the
//! shard's acknowledgement, and the versions.
//!
//! A pattern not yet sent is `added` in the next delta, one changed since is `updated`, an
//! evicted one that the shard knows is `removed`. The delta built is persisted (the outbox)
//! and handed out again, same `local_version`, until acknowledged: retries are idempotent,
//! and whatever happens meanwhile waits for the next delta, so nothing is lost while the
//! shard is away.

use crate::error::{DeviceError, Result};
use crate::local::LocalPatterns;
use crate::store::StoredPattern;
use omega_protocol::types::utc_day_start;
use omega_protocol::validate::MAX_PATTERNS_PER_DELTA;
use omega_protocol::vector::QuantizedVector;
use omega_protocol::{Pattern, PatternContext, PatternDelta, PatternUpdate};
use uuid::Uuid;

/// The outbox and the versions of a brain.
#[derive(Default)]
pub(crate) struct Outbox {
    pending: Option<PatternDelta>,
    local_version: u64,
    acked_version: u64,
    quarantined: u64,
}

/// What the next delta carries: the removals, the updates, and the positions of the local
/// patterns it adds and updates.
pub(crate) struct Selection {
    pub(crate) removed: Vec<Uuid>,
    pub(crate) updated: Vec<PatternUpdate>,
    pub(crate) added_idx: Vec<usize>,
    pub(crate) updated_idx: Vec<usize>,
}

impl Selection {
    /// Positions of every local pattern the delta carries.
    pub(crate) fn sent_idx(&self) -> Vec<usize> {
        self.added_idx.iter().chain(&self.updated_idx).copied().collect()
    }
}

/// True when pattern `p` has a change the shard has not seen: an update of a pattern sent
/// before, or a new pattern good enough to share (a shard stores only good ones).
fn unsynced(p: &StoredPattern, share_min_success: f32) -> bool {
    if p.synced { p.dirty || p.pending_samples > 0 } else { p.success_rate >= share_min_success }
}

/// Changes waiting for the next delta.
pub(crate) fn unsynced_changes(local: &LocalPatterns, share_min_success: f32) -> usize {
    local.removed().len() + local.rows().iter().filter(|p| unsynced(p, share_min_success)).count()
}

/// The changes the next delta carries, at most [`MAX_PATTERNS_PER_DELTA`]: removals first,
/// then updates and additions in pattern order. `None` when there are none.
pub(crate) fn select(local: &LocalPatterns, share_min_success: f32) -> Option<Selection> {
    let mut budget = MAX_PATTERNS_PER_DELTA;
    let removed: Vec<Uuid> = local.removed().iter().take(budget).copied().collect();
    budget -= removed.len();
    let mut sel =
        Selection { removed, updated: Vec::new(), added_idx: Vec::new(), updated_idx: Vec::new() };
    for (i, p) in local.rows().iter().enumerate() {
        if budget == 0 {
            break;
        }
        if p.synced && (p.dirty || p.pending_samples > 0) {
            sel.updated.push(PatternUpdate {
                id: p.id,
                success_rate: p.success_rate,
                extra_samples: p.pending_samples,
            });
            sel.updated_idx.push(i);
            budget -= 1;
        }
    }
    for (i, p) in local.rows().iter().enumerate() {
        if budget == 0 {
            break;
        }
        if !p.synced && p.success_rate >= share_min_success {
            sel.added_idx.push(i);
            budget -= 1;
        }
    }
    let empty = sel.removed.is_empty() && sel.updated.is_empty() && sel.added_idx.is_empty();
    (!empty).then_some(sel)
}

/// A local pattern as it leaves the TV: only what the federation consumes. The content id,
/// the coarse context (time slot, day type, content type, genre hints), the success rate
/// and the sample count; its timestamps truncated to the start of their UTC day; the
/// embedding of its text (which names the title) only when `public` is false, i.e. the
/// federation has published no collaborative vector for the content. The title, the watch
/// times and the event-by-event history stay in the TV's database.
pub(crate) fn upload(
    p: &StoredPattern,
    v: &QuantizedVector,
    public: bool,
    model_id: &str,
) -> Pattern {
    Pattern {
        id: p.id,
        content_id: p.content_id.clone(),
        embedding: if public { Vec::new() } else { v.dequantize() },
        model_id: model_id.into(),
        success_rate: p.success_rate,
        sample_count: p.sample_count.max(1),
        context: PatternContext {
            time_slot: p.time_slot,
            day_type: p.day_type,
            content_type: p.content_type,
            genres: p.genres.clone(),
        },
        created_at_ms: utc_day_start(p.created_at_ms),
        updated_at_ms: utc_day_start(p.updated_at_ms),
    }
}

impl Outbox {
    pub(crate) fn load(
        pending: Option<PatternDelta>,
        local_version: u64,
        acked_version: u64,
        quarantined: u64,
    ) -> Self {
        Outbox { pending, local_version, acked_version, quarantined }
    }

    /// The delta awaiting acknowledgement.
    pub(crate) fn pending(&self) -> Option<&PatternDelta> {
        self.pending.as_ref()
    }

    pub(crate) fn local_version(&self) -> u64 {
        self.local_version
    }

    pub(crate) fn acked_version(&self) -> u64 {
        self.acked_version
    }

    pub(crate) fn quarantined(&self) -> u64 {
        self.quarantined
    }

    /// The version the next delta gets.
    pub(crate) fn next_version(&self) -> u64 {
        self.local_version + 1
    }

    /// `delta` was persisted as the outbox.
    pub(crate) fn prepared(&mut self, delta: PatternDelta) {
        self.local_version = delta.local_version;
        self.pending = Some(delta);
    }

    /// What acknowledging `version` does: `None` when nothing (an older version again),
    /// else whether it clears the delta in flight. A version never handed out is an error.
    pub(crate) fn plan_ack(&self, version: u64) -> Result<Option<bool>> {
        if version > self.local_version {
            return Err(DeviceError::State(format!(
                "acknowledged version {version} was never prepared (latest is {})",
                self.local_version
            )));
        }
        let clears = self.pending.as_ref().is_some_and(|d| d.local_version <= version);
        if !clears && version <= self.acked_version {
            return Ok(None);
        }
        Ok(Some(clears))
    }

    /// `version` was acknowledged (durably).
    pub(crate) fn acked(&mut self, version: u64, clears: bool) {
        if clears {
            self.pending = None;
        }
        self.acked_version = self.acked_version.max(version);
    }

    /// The changes the delta `version` carries, if it is the one in flight (only that one
    /// can be quarantined).
    pub(crate) fn plan_quarantine(&self, version: u64) -> Result<usize> {
        match &self.pending {
            Some(d) if d.local_version == version => {
                Ok(d.added.len() + d.updated.len() + d.removed.len())
            }
            _ => Err(DeviceError::State(format!(
                "delta {version} is not the one awaiting acknowledgement"
            ))),
        }
    }

    /// The delta in flight was dropped (durably); the count is now `count`.
    pub(crate) fn quarantined_now(&mut self, count: u64) {
        self.pending = None;
        self.quarantined = count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega_protocol::vector::{EMBEDDING_DIM, quantize};
    use omega_protocol::{ContentType, DayType, TimeSlot};

    fn stored(content: &str, rate: f32, synced: bool, dirty: bool) -> StoredPattern {
        StoredPattern {
            id: Uuid::from_u128(content.len() as u128 * 1_000 + u128::from(content.as_bytes()[0])),
            content_id: content.into(),
            title: format!("The {content}"),
            time_slot: TimeSlot::Evening,
            day_type: DayType::Weekend,
            content_type: ContentType::Movie,
            genres: vec!["crime".into()],
            success_rate: rate,
            sample_count: 2,
            created_at_ms: 1_704_573_000_000,
            updated_at_ms: 1_704_659_400_123,
            synced,
            pending_samples: u32::from(dirty),
            dirty,
        }
    }

    fn vector() -> QuantizedVector {
        quantize(&[1.0 / (EMBEDDING_DIM as f32).sqrt(); EMBEDDING_DIM])
    }

    fn delta(version: u64) -> PatternDelta {
        PatternDelta { local_version: version, model_id: "m".into(), ..Default::default() }
    }

    #[test]
    fn acknowledgement_table() {
        // (pending version, local, acked, acknowledged, expected: None for an error, else
        // what plan_ack answers)
        type Case = (Option<u64>, u64, u64, u64, Option<Option<bool>>);
        let cases: [Case; 6] = [
            (Some(3), 3, 2, 3, Some(Some(true))),
            (Some(3), 3, 2, 4, None), // never prepared: an error
            (Some(3), 3, 2, 2, Some(None)),
            (Some(3), 3, 2, 1, Some(None)),
            (None, 3, 1, 2, Some(Some(false))),
            (None, 3, 3, 3, Some(None)),
        ];
        for (pending, local, acked, ack, want) in cases {
            let o = Outbox::load(pending.map(delta), local, acked, 0);
            assert_eq!(o.plan_ack(ack).ok(), want, "{pending:?} {local} {acked} ack {ack}");
        }
    }

    #[test]
    fn only_the_delta_in_flight_can_be_quarantined() {
        let mut d = delta(5);
        d.removed = vec![Uuid::from_u128(1), Uuid::from_u128(2)];
        let mut o = Outbox::load(Some(d), 5, 4, 1);
        assert!(o.plan_quarantine(4).is_err());
        assert_eq!(o.plan_quarantine(5).ok(), Some(2));
        o.quarantined_now(2);
        assert!(o.pending().is_none() && o.plan_quarantine(5).is_err());
    }

    #[test]
    fn a_delta_carries_removals_updates_and_good_new_patterns() {
        let v = vector();
        let rows = vec![
            (stored("a-sent-changed", 0.9, true, true), v.clone()),
            (stored("b-sent-same", 0.9, true, false), v.clone()),
            (stored("c-new-good", 0.8, false, false), v.clone()),
            (stored("d-new-poor", 0.3, false, false), v),
        ];
        let local = LocalPatterns::load(rows, vec![Uuid::from_u128(7)]);
        let sel = select(&local, 0.7).expect("changes");
        assert_eq!(sel.removed, vec![Uuid::from_u128(7)]);
        assert_eq!((sel.updated_idx.clone(), sel.added_idx.clone()), (vec![0], vec![2]));
        assert_eq!(sel.updated[0].extra_samples, 1);
        assert_eq!(unsynced_changes(&local, 0.7), 3);
        assert!(select(&LocalPatterns::load(Vec::new(), Vec::new()), 0.7).is_none());
    }

    #[test]
    fn an_upload_is_coarse_and_leaves_the_embedding_of_a_public_content_out() {
        let p = stored("heat", 0.9, false, false);
        for (public, dims) in [(true, 0), (false, EMBEDDING_DIM)] {
            let u = upload(&p, &vector(), public, "m");
            assert_eq!(u.embedding.len(), dims, "public {public}");
            // 2024-01-06 20:30 and 2024-01-07 20:30:00.123 UTC -> their midnights.
            assert_eq!((u.created_at_ms, u.updated_at_ms), (1_704_499_200_000, 1_704_585_600_000));
            assert_eq!((u.content_id.as_str(), u.success_rate, u.sample_count), ("heat", 0.9, 2));
            assert_eq!(u.context.genres, p.genres);
        }
    }
}
