//! The sync path: group commit of concurrent syncs into one transaction that bumps the
//! devices' versions and appends their operations to `pattern_intake`.

use super::pool::db_err;
use super::rows::{genres_json, vector};
use crate::store::{StoreError, SyncApplied, SyncWrite};
use pgvector::Vector;
use sqlx::Row;
use sqlx::postgres::PgPool;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Intake operations (`pattern_intake.op`).
pub(super) const OP_PUT: i16 = 1;
pub(super) const OP_UPDATE: i16 = 2;
pub(super) const OP_REMOVE: i16 = 3;
/// Most syncs in one group commit.
const MAX_BATCH: usize = 512;

/// When the sync writers last wrote, so the background steps can tell whether syncs are
/// flowing.
#[derive(Debug)]
pub(super) struct Activity {
    origin: Instant,
    last_write_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity { origin: Instant::now(), last_write_ms: AtomicU64::new(0) }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that "never written" (0) reads as long ago from the very start.
        self.origin.elapsed().as_millis() as u64 + 1
    }

    pub(super) fn wrote(&self) {
        self.last_write_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// True when no sync was written within `quiet`.
    pub(super) fn idle_for(&self, quiet: Duration) -> bool {
        let last = self.last_write_ms.load(Ordering::Relaxed);
        last == 0 || self.now_ms().saturating_sub(last) >= quiet.as_millis() as u64
    }
}

/// One sync waiting for its group commit.
pub(super) struct Job {
    pub(super) write: SyncWrite,
    pub(super) reply: oneshot::Sender<Result<SyncApplied, StoreError>>,
}

/// Columns of `pattern_intake` rows, for one `unnest` insert.
#[derive(Default)]
struct IntakeCols {
    device: Vec<String>,
    op: Vec<i16>,
    id: Vec<Uuid>,
    content: Vec<Option<String>>,
    emb: Vec<Option<Vector>>,
    rate: Vec<Option<f32>>,
    samples: Vec<Option<i64>>,
    slot: Vec<Option<i16>>,
    day: Vec<Option<i16>>,
    ctype: Vec<Option<i16>>,
    genres: Vec<Option<String>>,
    created: Vec<Option<i64>>,
    updated: Vec<Option<i64>>,
}

impl IntakeCols {
    fn push_write(&mut self, w: &SyncWrite) {
        for p in &w.added {
            let Ok(id) = Uuid::from_slice(&p.id) else { continue };
            let c = p.context.as_ref();
            self.device.push(w.device_id.clone());
            self.op.push(OP_PUT);
            self.id.push(id);
            self.content.push(Some(p.content_id.clone()));
            self.emb.push(vector(p));
            self.rate.push(Some(p.success_rate));
            self.samples.push(Some(i64::from(p.sample_count)));
            self.slot.push(Some(c.map_or(0, |c| c.time_slot) as i16));
            self.day.push(Some(c.map_or(0, |c| c.day_type) as i16));
            self.ctype.push(Some(c.map_or(0, |c| c.content_type) as i16));
            self.genres.push(Some(genres_json(c)));
            self.created.push(Some(p.created_at_ms));
            self.updated.push(Some(p.updated_at_ms));
        }
        for u in &w.updated {
            let Ok(id) = Uuid::from_slice(&u.id) else { continue };
            self.meta(&w.device_id, OP_UPDATE, id);
            let last = self.op.len() - 1;
            self.rate[last] = Some(u.success_rate);
            self.samples[last] = Some(i64::from(u.extra_samples));
            self.updated[last] = Some(w.now_ms);
        }
        for id in &w.removed {
            self.meta(&w.device_id, OP_REMOVE, *id);
        }
    }

    fn meta(&mut self, device: &str, op: i16, id: Uuid) {
        self.device.push(device.to_owned());
        self.op.push(op);
        self.id.push(id);
        self.content.push(None);
        self.emb.push(None);
        self.rate.push(None);
        self.samples.push(None);
        self.slot.push(None);
        self.day.push(None);
        self.ctype.push(None);
        self.genres.push(None);
        self.created.push(None);
        self.updated.push(None);
    }
}

async fn write_batch(
    pool: &PgPool,
    jobs: &[SyncWrite],
) -> Result<HashMap<String, Result<SyncApplied, StoreError>>, StoreError> {
    let ids: Vec<String> = jobs.iter().map(|j| j.device_id.clone()).collect();
    // Versions are validated to fit (`MAX_LOCAL_VERSION`); saturate rather than wrap anyway.
    let versions: Vec<i64> =
        jobs.iter().map(|j| i64::try_from(j.local_version).unwrap_or(i64::MAX)).collect();
    let adds: Vec<Option<Vector>> =
        jobs.iter().map(|j| j.interest_add.clone().map(Vector::from)).collect();
    let mut tx = pool.begin().await.map_err(db_err)?;
    let rows = sqlx::query(
        "UPDATE devices d SET local_version = v.lv, last_sync_at = now(), syncs = d.syncs + 1,
             interest = CASE WHEN v.add IS NULL THEN d.interest
                             WHEN d.interest IS NULL THEN v.add
                             ELSE d.interest + v.add END
         FROM unnest($1::text[], $2::bigint[], $3::vector[]) AS v(device_id, lv, add)
         WHERE d.device_id = v.device_id AND d.local_version < v.lv
         RETURNING d.device_id, d.region, d.local_version, d.interest",
    )
    .bind(&ids)
    .bind(&versions)
    .bind(&adds)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    let mut out: HashMap<String, Result<SyncApplied, StoreError>> = HashMap::new();
    for r in &rows {
        let interest: Option<Vector> = r.try_get("interest").map_err(db_err)?;
        out.insert(
            r.try_get("device_id").map_err(db_err)?,
            Ok(SyncApplied {
                applied: true,
                acknowledged_version: r.try_get::<i64, _>("local_version").map_err(db_err)? as u64,
                region: r.try_get("region").map_err(db_err)?,
                interest: interest.map(|v| v.to_vec()),
            }),
        );
    }
    if out.len() < jobs.len() {
        let missing: Vec<String> = ids.iter().filter(|i| !out.contains_key(*i)).cloned().collect();
        let rows = sqlx::query(
            "SELECT device_id, region, local_version, interest FROM devices
             WHERE device_id = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        for r in &rows {
            let interest: Option<Vector> = r.try_get("interest").map_err(db_err)?;
            out.insert(
                r.try_get("device_id").map_err(db_err)?,
                Ok(SyncApplied {
                    applied: false,
                    acknowledged_version: r.try_get::<i64, _>("local_version").map_err(db_err)?
                        as u64,
                    region: r.try_get("region").map_err(db_err)?,
                    interest: interest.map(|v| v.to_vec()),
                }),
            );
        }
        for m in missing {
            out.entry(m).or_insert(Err(StoreError::UnknownDevice));
        }
    }
    let mut cols = IntakeCols::default();
    for j in jobs {
        if matches!(out.get(&j.device_id), Some(Ok(a)) if a.applied) {
            cols.push_write(j);
        }
    }
    if !cols.op.is_empty() {
        sqlx::query(
            "INSERT INTO pattern_intake (device_id, op, pattern_id, content_id, embedding,
                 success_rate, sample_count, time_slot, day_type, content_type, genres,
                 created_at_ms, updated_at_ms)
             SELECT d, o, p, c, e, s, n, ts, dt, ct,
                    CASE WHEN g IS NULL THEN NULL
                         ELSE ARRAY(SELECT jsonb_array_elements_text(g::jsonb)) END,
                    ca, ua
             FROM unnest($1::text[], $2::int2[], $3::uuid[], $4::text[], $5::vector[],
                         $6::real[], $7::int8[], $8::int2[], $9::int2[], $10::int2[],
                         $11::text[], $12::int8[], $13::int8[])
                  AS x(d, o, p, c, e, s, n, ts, dt, ct, g, ca, ua)",
        )
        .bind(&cols.device)
        .bind(&cols.op)
        .bind(&cols.id)
        .bind(&cols.content)
        .bind(&cols.emb)
        .bind(&cols.rate)
        .bind(&cols.samples)
        .bind(&cols.slot)
        .bind(&cols.day)
        .bind(&cols.ctype)
        .bind(&cols.genres)
        .bind(&cols.created)
        .bind(&cols.updated)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)?;
    Ok(out)
}

/// Group commit: takes every queued sync (one per device per batch) into one transaction.
pub(super) async fn writer(pool: PgPool, mut rx: mpsc::Receiver<Job>, activity: Arc<Activity>) {
    let mut deferred: VecDeque<Job> = VecDeque::new();
    loop {
        let mut batch: Vec<Job> = Vec::new();
        let mut devices: HashSet<String> = HashSet::new();
        let mut later = VecDeque::new();
        while let Some(j) = deferred.pop_front() {
            if batch.len() < MAX_BATCH && devices.insert(j.write.device_id.clone()) {
                batch.push(j);
            } else {
                later.push_back(j);
            }
        }
        deferred = later;
        if batch.is_empty() {
            match rx.recv().await {
                Some(j) => {
                    devices.insert(j.write.device_id.clone());
                    batch.push(j);
                }
                None => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) if devices.insert(j.write.device_id.clone()) => batch.push(j),
                Ok(j) => deferred.push_back(j),
                Err(_) => break,
            }
        }
        let writes: Vec<SyncWrite> = batch.iter().map(|j| j.write.clone()).collect();
        activity.wrote();
        match write_batch(&pool, &writes).await {
            Ok(mut results) => {
                for j in batch {
                    let r = results
                        .remove(&j.write.device_id)
                        .unwrap_or(Err(StoreError::UnknownDevice));
                    let _ = j.reply.send(r);
                }
            }
            // A row the database refuses fails the whole transaction: each sync of the batch
            // is then written on its own, so only the one carrying it fails.
            Err(StoreError::Database(msg)) if batch.len() > 1 => {
                tracing::warn!(error = %msg, syncs = batch.len(), "group commit failed; writing its syncs one by one");
                for j in batch {
                    let r = match write_batch(&pool, std::slice::from_ref(&j.write)).await {
                        Ok(mut results) => results
                            .remove(&j.write.device_id)
                            .unwrap_or(Err(StoreError::UnknownDevice)),
                        Err(e) => Err(e),
                    };
                    let _ = j.reply.send(r);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let unavailable = matches!(e, StoreError::Unavailable(_));
                for j in batch {
                    let err = if unavailable {
                        StoreError::Unavailable(msg.clone())
                    } else {
                        StoreError::Database(msg.clone())
                    };
                    let _ = j.reply.send(Err(err));
                }
            }
        }
    }
}
