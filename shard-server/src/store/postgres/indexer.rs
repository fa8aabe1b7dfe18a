//! The pgvector indexer (`SIMILAR_INDEX=pgvector`): copies shareable patterns into the
//! HNSW-indexed `pattern_vectors`, duty-cycled while syncs flow.

use super::pool::db_err;
use super::writer::Activity;
use crate::store::StoreError;
use omega_protocol::validate::MIN_SHARED_QUALITY;
use sqlx::Row;
use sqlx::postgres::PgPool;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const INDEX_LOCK: i64 = 0x6f6d_6567_6169; // "omegai"
/// Without a sync written for this long, the indexer runs without pauses.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Copies up to `batch` patterns written since the indexer's cursor into `pattern_vectors`
/// (the shareable ones); returns how many rows it read, `None` when another indexer runs.
pub(super) async fn index_once(pool: &PgPool, batch: i64) -> Result<Option<usize>, StoreError> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(INDEX_LOCK)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    if !locked {
        return Ok(None);
    }
    let rows = sqlx::query(
        "WITH cur AS (SELECT last_seq, last_id FROM indexer_state WHERE id = 1)
         SELECT p.id, p.index_seq FROM patterns p, cur
         WHERE (p.index_seq, p.id) > (cur.last_seq, cur.last_id)
         ORDER BY p.index_seq, p.id LIMIT $1",
    )
    .bind(batch)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    let Some(last) = rows.last() else { return Ok(Some(0)) };
    let (last_id, last_seq): (Uuid, i64) =
        (last.try_get("id").map_err(db_err)?, last.try_get("index_seq").map_err(db_err)?);
    let ids =
        rows.iter().map(|r| r.try_get("id")).collect::<Result<Vec<Uuid>, _>>().map_err(db_err)?;
    sqlx::query(
        "INSERT INTO pattern_vectors (id, device_id, success_rate, embedding)
         SELECT id, device_id, success_rate, embedding FROM patterns
         WHERE id = ANY($1) AND success_rate >= $2 AND embedding IS NOT NULL
         ON CONFLICT (id) DO UPDATE SET success_rate = EXCLUDED.success_rate",
    )
    .bind(&ids)
    .bind(MIN_SHARED_QUALITY)
    .execute(&mut *tx)
    .await
    .map_err(db_err)?;
    sqlx::query("UPDATE indexer_state SET last_seq = $1, last_id = $2 WHERE id = 1")
        .bind(last_seq)
        .bind(last_id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(Some(rows.len()))
}

/// Duty-cycled while syncs flow: one batch, then a pause, so HNSW inserts never take a whole
/// core from syncs. With no sync written for [`IDLE_AFTER`], full batches follow each other
/// without a pause, so the backlog of a busy period drains in the next lull.
pub(super) async fn indexer(pool: PgPool, interval: Duration, batch: i64, activity: Arc<Activity>) {
    loop {
        match index_once(&pool, batch).await {
            Ok(Some(n)) if n as i64 >= batch && activity.idle_for(IDLE_AFTER) => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "vector indexing failed; will retry"),
        }
        tokio::time::sleep(interval).await;
    }
}
