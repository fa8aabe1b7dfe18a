//! The merge: collapses intake operations per pattern into `patterns`, one generation per
//! transaction, and prunes old removal tombstones.

use super::TOMBSTONE_RETENTION;
use super::pool::db_err;
use super::similar_index::SimilarIndex;
use super::writer::{OP_PUT, OP_UPDATE};
use crate::store::StoreError;
use omega_protocol::validate::{MIN_SHARED_QUALITY, MIN_STORED_QUALITY};
use sqlx::Row;
use sqlx::postgres::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const MERGE_LOCK: i64 = 0x6f6d_6567_616d; // "omegam"
/// How often the merge task prunes tombstones past [`TOMBSTONE_RETENTION`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);

enum Final {
    Put { seq: i64, device: String, rate: f32, samples: i64, updated: i64 },
    Update { device: String, rate: f32, extra: i64, updated: i64 },
    Remove { device: String },
}

/// Moves up to `batch` intake rows into `patterns`; returns how many it consumed.
pub(super) async fn merge_once(pool: &PgPool, batch: i64) -> Result<usize, StoreError> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(MERGE_LOCK)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    if !locked {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT seq, device_id, op, pattern_id, success_rate, sample_count, updated_at_ms
         FROM pattern_intake ORDER BY seq LIMIT $1",
    )
    .bind(batch)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let generation: i64 = sqlx::query_scalar("SELECT nextval('pattern_index_gen')")
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    // Each device's operations on an id fold into one final operation per (id, device), in
    // seq order. Devices are kept apart: another device's removal or update of an id it does
    // not own is a no-op (the statements below are guarded by device), and must not hide
    // the owner's own operations in the same batch.
    let mut order: Vec<(Uuid, String)> = Vec::new();
    let mut fin: HashMap<(Uuid, String), Final> = HashMap::new();
    let mut merged_seqs: Vec<i64> = Vec::with_capacity(rows.len());
    for r in &rows {
        let seq: i64 = r.try_get("seq").map_err(db_err)?;
        let device: String = r.try_get("device_id").map_err(db_err)?;
        let op: i16 = r.try_get("op").map_err(db_err)?;
        let id: Uuid = r.try_get("pattern_id").map_err(db_err)?;
        let rate: Option<f32> = r.try_get("success_rate").map_err(db_err)?;
        let samples: Option<i64> = r.try_get("sample_count").map_err(db_err)?;
        let updated: Option<i64> = r.try_get("updated_at_ms").map_err(db_err)?;
        merged_seqs.push(seq);
        let key = (id, device.clone());
        let (rate, samples, updated) =
            (rate.unwrap_or(0.0), samples.unwrap_or(0), updated.unwrap_or(0));
        let previous = fin.remove(&key);
        if previous.is_none() {
            order.push(key.clone());
        }
        let next = match (op, previous) {
            (OP_PUT, _) => Final::Put { seq, device, rate, samples, updated },
            (OP_UPDATE, _) if rate < MIN_STORED_QUALITY => Final::Remove { device },
            (OP_UPDATE, Some(Final::Put { seq, device, samples: s, .. })) => {
                Final::Put { seq, device, rate, samples: s.saturating_add(samples), updated }
            }
            (OP_UPDATE, Some(Final::Update { device, extra, .. })) => {
                Final::Update { device, rate, extra: extra.saturating_add(samples), updated }
            }
            (OP_UPDATE, Some(r @ Final::Remove { .. })) => r,
            (OP_UPDATE, None) => Final::Update { device, rate, extra: samples, updated },
            _ => Final::Remove { device },
        };
        fin.insert(key, next);
    }
    let (mut rm_id, mut rm_dev) = (Vec::new(), Vec::new());
    let (mut put_seq, mut put_rate, mut put_n, mut put_upd) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut put_id, mut put_dev) = (Vec::new(), Vec::new());
    let (mut up_id, mut up_dev, mut up_rate, mut up_extra, mut up_upd) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One insert statement cannot write an id twice: when several devices put the same id in
    // one batch, the earliest put is the one tried (an id another device owns already is
    // never overwritten, whoever tries).
    let mut first_put: HashMap<Uuid, i64> = HashMap::new();
    for (key, f) in &fin {
        if let Final::Put { seq, .. } = f {
            let e = first_put.entry(key.0).or_insert(*seq);
            *e = (*e).min(*seq);
        }
    }
    for key in order {
        let id = key.0;
        match fin.remove(&key) {
            Some(Final::Remove { device }) => {
                rm_id.push(id);
                rm_dev.push(device);
            }
            Some(Final::Put { seq, device, rate, samples, updated })
                if first_put.get(&id) == Some(&seq) =>
            {
                put_id.push(id);
                put_dev.push(device);
                put_seq.push(seq);
                put_rate.push(rate);
                put_n.push(samples);
                put_upd.push(updated);
            }
            Some(Final::Put { .. }) | None => {}
            Some(Final::Update { device, rate, extra, updated }) => {
                up_id.push(id);
                up_dev.push(device);
                up_rate.push(rate);
                up_extra.push(extra);
                up_upd.push(updated);
            }
        }
    }
    // Change in the number of rows of `patterns`, kept in `merge_state`.
    let mut added: i64 = 0;
    if !rm_id.is_empty() {
        // Each deleted row leaves a tombstone of this generation, so that processes following
        // the merge into their in-memory index see removals too (the rows themselves are gone).
        let done = sqlx::query(
            "WITH gone AS (
                 DELETE FROM patterns p USING unnest($1::uuid[], $2::text[]) AS x(id, d)
                 WHERE p.id = x.id AND p.device_id = x.d RETURNING p.id)
             INSERT INTO pattern_removals (index_seq, id) SELECT $3, id FROM gone",
        )
        .bind(&rm_id)
        .bind(&rm_dev)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        added -= done.rows_affected() as i64;
        sqlx::query(
            "DELETE FROM pattern_vectors p USING unnest($1::uuid[], $2::text[]) AS x(id, d)
             WHERE p.id = x.id AND p.device_id = x.d",
        )
        .bind(&rm_id)
        .bind(&rm_dev)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    if !put_seq.is_empty() {
        // Ids that exist already are updated (or, another device's, left alone), not added;
        // merges are serialised, so nothing adds them between this count and the insert.
        let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM patterns WHERE id = ANY($1)")
            .bind(&put_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        added += put_id.len() as i64 - existing;
        sqlx::query(
            "INSERT INTO patterns (id, device_id, content_id, embedding, success_rate,
                 sample_count, time_slot, day_type, content_type, genres, created_at_ms,
                 updated_at_ms, index_seq)
             SELECT i.pattern_id, i.device_id, i.content_id, i.embedding, x.rate, x.n,
                    i.time_slot, i.day_type, i.content_type, i.genres, i.created_at_ms, x.upd, $5
             FROM unnest($1::int8[], $2::real[], $3::int8[], $4::int8[]) AS x(seq, rate, n, upd)
             JOIN pattern_intake i ON i.seq = x.seq
             ON CONFLICT (id) DO UPDATE SET index_seq = EXCLUDED.index_seq,
                 content_id = EXCLUDED.content_id,
                 embedding = EXCLUDED.embedding, success_rate = EXCLUDED.success_rate,
                 sample_count = EXCLUDED.sample_count, time_slot = EXCLUDED.time_slot,
                 day_type = EXCLUDED.day_type, content_type = EXCLUDED.content_type,
                 genres = EXCLUDED.genres, updated_at_ms = EXCLUDED.updated_at_ms
             WHERE patterns.device_id = EXCLUDED.device_id",
        )
        .bind(&put_seq)
        .bind(&put_rate)
        .bind(&put_n)
        .bind(&put_upd)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        // A re-put id may carry a new embedding: the indexer adds it back. Only the owner's:
        // a put of another device's id changed nothing above.
        sqlx::query(
            "DELETE FROM pattern_vectors v USING unnest($1::uuid[], $2::text[]) AS x(id, d)
             WHERE v.id = x.id AND v.device_id = x.d",
        )
        .bind(&put_id)
        .bind(&put_dev)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    if !up_id.is_empty() {
        sqlx::query(
            "UPDATE patterns p SET success_rate = x.rate, sample_count = p.sample_count + x.extra,
                 updated_at_ms = x.upd, index_seq = $6
             FROM unnest($1::uuid[], $2::text[], $3::real[], $4::int8[], $5::int8[])
                  AS x(id, d, rate, extra, upd)
             WHERE p.id = x.id AND p.device_id = x.d",
        )
        .bind(&up_id)
        .bind(&up_dev)
        .bind(&up_rate)
        .bind(&up_extra)
        .bind(&up_upd)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        // No longer shareable: out of the search now; still shareable: the indexer refreshes
        // the rate (the rows were re-queued through index_seq).
        sqlx::query(
            "DELETE FROM pattern_vectors v USING unnest($1::uuid[], $2::real[]) AS x(id, rate)
             WHERE v.id = x.id AND x.rate < $3",
        )
        .bind(&up_id)
        .bind(&up_rate)
        .bind(MIN_SHARED_QUALITY)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    // Exactly the rows read above, not "every seq up to the last one": sequence values are
    // taken at insert time but become visible at commit, so a writer's row with a lower seq
    // can commit after the SELECT above and would be deleted unmerged (an acknowledged sync
    // lost). It is merged by the next batch instead.
    sqlx::query("DELETE FROM pattern_intake WHERE seq = ANY($1)")
        .bind(&merged_seqs)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    // The generation commits with the changes: a follower that reads it also sees them.
    sqlx::query("UPDATE merge_state SET patterns = patterns + $1, generation = $2 WHERE id = 1")
        .bind(added)
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(rows.len())
}

/// Deletes tombstones older than [`TOMBSTONE_RETENTION`] and records the highest generation
/// deleted, so that a follower behind it knows it must reload.
pub(super) async fn prune_tombstones(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query(
        "WITH gone AS (
             DELETE FROM pattern_removals
             WHERE removed_at < now() - make_interval(secs => $1) RETURNING index_seq)
         UPDATE merge_state
         SET removals_pruned_to = GREATEST(removals_pruned_to, (SELECT max(index_seq) FROM gone))
         WHERE id = 1 AND EXISTS (SELECT 1 FROM gone)",
    )
    .bind(TOMBSTONE_RETENTION.as_secs_f64())
    .execute(pool)
    .await
    .map_err(db_err)?;
    Ok(())
}

pub(super) async fn merger(
    pool: PgPool,
    interval: Duration,
    batch: i64,
    memory: Option<Arc<SimilarIndex>>,
) {
    let mut pruned = Instant::now();
    loop {
        let merged = merge_once(&pool, batch).await;
        if let (Ok(n), Some(m)) = (&merged, &memory)
            && *n > 0
        {
            m.wake();
        }
        match merged {
            Ok(n) if n as i64 >= batch => continue, // backlog: keep going
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "intake merge failed; will retry"),
        }
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            if let Err(e) = prune_tombstones(&pool).await {
                tracing::warn!(error = %e, "pruning removal tombstones failed; will retry");
            }
        }
        tokio::time::sleep(interval).await;
    }
}
