//! Conversions between rows and wire messages.

use omega_protocol::pb;
use omega_protocol::vector::{QuantizedVector, quantize};
use pgvector::Vector;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

pub(super) fn vector(p: &pb::Pattern) -> Option<Vector> {
    let e = p.embedding.as_ref()?;
    Some(Vector::from(QuantizedVector::from_bytes(&e.values, e.scale).dequantize()))
}

pub(super) fn wire_embedding(v: &Vector) -> pb::Embedding {
    let q = quantize(v.as_slice());
    pb::Embedding { values: q.to_bytes(), scale: q.scale }
}

pub(super) fn genres_json(c: Option<&pb::PatternContext>) -> String {
    serde_json::to_string(&c.map(|c| c.genres.clone()).unwrap_or_default())
        .unwrap_or_else(|_| "[]".into())
}

pub(super) fn row_pattern(row: &PgRow) -> Result<pb::Pattern, sqlx::Error> {
    let id: Uuid = row.try_get("id")?;
    let emb: Option<Vector> = row.try_get("embedding")?;
    let samples: i64 = row.try_get("sample_count")?;
    Ok(pb::Pattern {
        id: id.as_bytes().to_vec(),
        content_id: row.try_get("content_id")?,
        embedding: emb.as_ref().map(wire_embedding),
        success_rate: row.try_get("success_rate")?,
        sample_count: u32::try_from(samples).unwrap_or(u32::MAX),
        context: Some(pb::PatternContext {
            time_slot: i32::from(row.try_get::<i16, _>("time_slot")?),
            day_type: i32::from(row.try_get::<i16, _>("day_type")?),
            content_type: i32::from(row.try_get::<i16, _>("content_type")?),
            genres: row.try_get("genres")?,
        }),
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}
