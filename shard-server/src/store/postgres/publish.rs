//! Publishing a round's aggregates and trends, and reading them back.

use super::pool::db_err;
use super::rows::{genres_json, wire_embedding};
use crate::store::{MAX_GLOBAL_VERSION, Publish, Published, StoreError, next_global_version};
use omega_protocol::pb;
use omega_protocol::vector::QuantizedVector;
use pgvector::Vector;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};
use uuid::Uuid;

/// Every aggregate of the latest round.
pub(super) async fn read_aggregates<'e, E>(db: E) -> Result<Vec<pb::AggregatedPattern>, StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let rows = sqlx::query(
        "SELECT id, content_id, embedding, quality, source_devices, total_samples,
                time_slot, day_type, content_type, genres, region
         FROM global_patterns",
    )
    .fetch_all(db)
    .await
    .map_err(db_err)?;
    rows.iter()
        .map(|r| {
            let id: Uuid = r.try_get("id")?;
            let emb: Vector = r.try_get("embedding")?;
            let sources: i64 = r.try_get("source_devices")?;
            let samples: i64 = r.try_get("total_samples")?;
            Ok(pb::AggregatedPattern {
                id: id.as_bytes().to_vec(),
                content_id: r.try_get("content_id")?,
                embedding: Some(wire_embedding(&emb)),
                quality: r.try_get("quality")?,
                source_devices: u32::try_from(sources.max(0)).unwrap_or(u32::MAX),
                total_samples: samples.max(0) as u64,
                context: Some(pb::PatternContext {
                    time_slot: i32::from(r.try_get::<i16, _>("time_slot")?),
                    day_type: i32::from(r.try_get::<i16, _>("day_type")?),
                    content_type: i32::from(r.try_get::<i16, _>("content_type")?),
                    genres: r.try_get("genres")?,
                }),
                region: r.try_get("region")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db_err)
}

pub(super) fn trend_from_row(row: &PgRow) -> Result<pb::TrendSignal, sqlx::Error> {
    let content: Option<String> = row.try_get("content_id")?;
    let centroid: Option<Vector> = row.try_get("centroid")?;
    let target = match (content, centroid) {
        (Some(c), _) => Some(pb::trend_signal::Target::ContentId(c)),
        (None, Some(v)) => Some(pb::trend_signal::Target::Centroid(wire_embedding(&v))),
        (None, None) => None,
    };
    Ok(pb::TrendSignal { target, score: row.try_get("score")?, region: row.try_get("region")? })
}

/// Installs a round's aggregates and trends in one transaction; a round id published before
/// changes nothing.
pub(super) async fn publish(primary: &PgPool, p: Publish) -> Result<Published, StoreError> {
    let mut tx = primary.begin().await.map_err(db_err)?;
    let fresh: Option<String> = sqlx::query_scalar(
        "INSERT INTO published_rounds (round_id, global_version) VALUES ($1, 0)
         ON CONFLICT (round_id) DO NOTHING RETURNING round_id",
    )
    .bind(&p.round_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_err)?;
    let current: i64 =
        sqlx::query_scalar("SELECT global_version FROM global_state WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
    if fresh.is_none() {
        tx.rollback().await.map_err(db_err)?;
        return Ok(Published { applied: false, global_version: current as u64 });
    }
    let current = u64::try_from(current).unwrap_or(0);
    let version = next_global_version(p.global_version, current)
        .ok_or(StoreError::VersionExhausted(MAX_GLOBAL_VERSION))?;
    let version =
        i64::try_from(version).map_err(|_| StoreError::VersionExhausted(MAX_GLOBAL_VERSION))?;
    sqlx::query("UPDATE published_rounds SET global_version = $2 WHERE round_id = $1")
        .bind(&p.round_id)
        .bind(version)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    sqlx::query("DELETE FROM global_patterns").execute(&mut *tx).await.map_err(db_err)?;
    sqlx::query("DELETE FROM trends").execute(&mut *tx).await.map_err(db_err)?;
    let mut a_id = Vec::new();
    let mut a_content = Vec::new();
    let mut a_emb = Vec::new();
    let mut a_q = Vec::new();
    let mut a_src = Vec::new();
    let mut a_n = Vec::new();
    let (mut a_slot, mut a_day, mut a_ct) = (Vec::new(), Vec::new(), Vec::new());
    let mut a_genres = Vec::new();
    let mut a_region = Vec::new();
    for a in &p.patterns {
        let (Ok(id), Some(e)) = (Uuid::from_slice(&a.id), a.embedding.as_ref()) else {
            continue;
        };
        let c = a.context.as_ref();
        a_id.push(id);
        a_content.push(a.content_id.clone());
        a_emb.push(Vector::from(QuantizedVector::from_bytes(&e.values, e.scale).dequantize()));
        a_q.push(a.quality);
        a_src.push(i64::from(a.source_devices));
        a_n.push(a.total_samples.min(i64::MAX as u64) as i64);
        a_slot.push(c.map_or(0, |c| c.time_slot) as i16);
        a_day.push(c.map_or(0, |c| c.day_type) as i16);
        a_ct.push(c.map_or(0, |c| c.content_type) as i16);
        a_genres.push(genres_json(c));
        a_region.push(a.region.clone());
    }
    sqlx::query(
        "INSERT INTO global_patterns (id, content_id, embedding, quality, source_devices,
             total_samples, time_slot, day_type, content_type, genres, region)
         SELECT id, c, e, q, s, n, ts, dt, ct, ARRAY(SELECT jsonb_array_elements_text(g::jsonb)), r
         FROM unnest($1::uuid[], $2::text[], $3::vector[], $4::real[], $5::int8[],
                     $6::int8[], $7::int2[], $8::int2[], $9::int2[], $10::text[], $11::text[])
              AS x(id, c, e, q, s, n, ts, dt, ct, g, r)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&a_id)
    .bind(&a_content)
    .bind(&a_emb)
    .bind(&a_q)
    .bind(&a_src)
    .bind(&a_n)
    .bind(&a_slot)
    .bind(&a_day)
    .bind(&a_ct)
    .bind(&a_genres)
    .bind(&a_region)
    .execute(&mut *tx)
    .await
    .map_err(db_err)?;
    let mut trends = p.trends.clone();
    trends.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut t_pos = Vec::new();
    let mut t_content: Vec<Option<String>> = Vec::new();
    let mut t_centroid: Vec<Option<Vector>> = Vec::new();
    let mut t_score = Vec::new();
    let mut t_region = Vec::new();
    for (i, t) in trends.iter().enumerate() {
        let (c, v) = match &t.target {
            Some(pb::trend_signal::Target::ContentId(c)) => (Some(c.clone()), None),
            Some(pb::trend_signal::Target::Centroid(e)) => (
                None,
                Some(Vector::from(QuantizedVector::from_bytes(&e.values, e.scale).dequantize())),
            ),
            None => continue,
        };
        t_pos.push(i as i32);
        t_content.push(c);
        t_centroid.push(v);
        t_score.push(t.score);
        t_region.push(t.region.clone());
    }
    sqlx::query(
        "INSERT INTO trends (position, content_id, centroid, score, region)
         SELECT * FROM unnest($1::int4[], $2::text[], $3::vector[], $4::real[], $5::text[])",
    )
    .bind(&t_pos)
    .bind(&t_content)
    .bind(&t_centroid)
    .bind(&t_score)
    .bind(&t_region)
    .execute(&mut *tx)
    .await
    .map_err(db_err)?;
    sqlx::query(
        "UPDATE global_state SET global_version = $1, round_id = $2, published_at = now()
         WHERE id = 1",
    )
    .bind(version)
    .bind(&p.round_id)
    .execute(&mut *tx)
    .await
    .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(Published { applied: true, global_version: version as u64 })
}
