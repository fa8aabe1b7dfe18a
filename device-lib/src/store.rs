//! The brain's SQLite file: patterns, sync versions, the unacknowledged delta, global patterns.
//!
//! WAL journal, every change in one transaction, `PRAGMA user_version` = [`SCHEMA_VERSION`].
//! Opening never rewrites a file it does not understand: a corrupt file, or one written by a
//! newer library, is an error and the file stays as it is. Embeddings are stored int8 (384
//! bytes + a scale), as they travel.

use crate::error::{DeviceError, Result};
use omega_protocol::validate::{self, ValidationError};
use omega_protocol::vector::{EMBEDDING_DIM, QuantizedVector};
use omega_protocol::{ContentType, DayType, TimeSlot};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use std::path::Path;
use uuid::Uuid;

/// Schema version this library writes and reads.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE patterns (
    id BLOB PRIMARY KEY,
    content_id TEXT NOT NULL,
    title TEXT NOT NULL,
    time_slot INTEGER NOT NULL,
    day_type INTEGER NOT NULL,
    content_type INTEGER NOT NULL,
    genres TEXT NOT NULL,
    embedding BLOB NOT NULL,
    scale REAL NOT NULL,
    success_rate REAL NOT NULL,
    sample_count INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    synced INTEGER NOT NULL,
    pending_samples INTEGER NOT NULL,
    dirty INTEGER NOT NULL,
    UNIQUE (content_id, time_slot, day_type)
);
CREATE TABLE removed (id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE outbox (local_version INTEGER PRIMARY KEY, delta BLOB NOT NULL);
CREATE TABLE watched (content_id TEXT PRIMARY KEY, last_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE global_patterns (
    id BLOB PRIMARY KEY,
    content_id TEXT NOT NULL,
    embedding BLOB NOT NULL,
    scale REAL NOT NULL,
    success_rate REAL NOT NULL,
    sample_count INTEGER NOT NULL,
    time_slot INTEGER NOT NULL,
    day_type INTEGER NOT NULL,
    content_type INTEGER NOT NULL,
    genres TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE catalogue_embeddings (text TEXT PRIMARY KEY, embedding BLOB NOT NULL, scale REAL NOT NULL) WITHOUT ROWID;
";

/// A pattern this TV learned, as stored (its embedding travels beside it).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPattern {
    /// UUID v7.
    pub id: Uuid,
    /// Content.
    pub content_id: String,
    /// Title (stays on the device; used for reasons).
    pub title: String,
    /// Part of the day.
    pub time_slot: TimeSlot,
    /// Weekday or weekend.
    pub day_type: DayType,
    /// Kind of content.
    pub content_type: ContentType,
    /// Genres.
    pub genres: Vec<String>,
    /// Smoothed watch fraction.
    pub success_rate: f32,
    /// Observations.
    pub sample_count: u32,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms.
    pub updated_at_ms: i64,
    /// Already part of a delta (the server knows it, or will at the next retry).
    pub synced: bool,
    /// Observations since the last delta.
    pub pending_samples: u32,
    /// Changed since the last delta.
    pub dirty: bool,
}

/// A pattern pulled from the shard.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredGlobal {
    /// Id on the shard.
    pub id: Uuid,
    /// Content (may be empty for a cross-content aggregate).
    pub content_id: String,
    /// Success rate / quality.
    pub success_rate: f32,
    /// Observations behind it.
    pub sample_count: u32,
    /// Part of the day.
    pub time_slot: TimeSlot,
    /// Weekday or weekend.
    pub day_type: DayType,
    /// Kind of content.
    pub content_type: ContentType,
    /// Genres.
    pub genres: Vec<String>,
    /// Unix ms.
    pub updated_at_ms: i64,
}

impl StoredPattern {
    /// Checks the values a row holds against the contract (a file can be edited behind the
    /// library's back, and a value out of range would otherwise reach every delta).
    pub fn check(&self) -> Result<(), ValidationError> {
        validate::check_required_string("content_id", &self.content_id)?;
        validate::check_string("title", &self.title)?;
        validate::check_genres("genres", &self.genres)?;
        validate::check_rate("success_rate", self.success_rate)?;
        if self.sample_count == 0 {
            return Err(ValidationError::OutOfRange {
                field: "sample_count".into(),
                value: 0.0,
                min: 1.0,
                max: f64::from(u32::MAX),
            });
        }
        validate::check_timestamp("created_at_ms", self.created_at_ms)?;
        validate::check_timestamp("updated_at_ms", self.updated_at_ms)
    }
}

impl StoredGlobal {
    /// True for a content's collaborative item vector (not a MiniLM embedding).
    pub fn is_collaborative(&self) -> bool {
        omega_protocol::types::is_collaborative_vector(&self.id, &self.content_id)
    }

    /// Checks the values a row holds against the contract.
    pub fn check(&self) -> Result<(), ValidationError> {
        validate::check_string("content_id", &self.content_id)?;
        validate::check_genres("genres", &self.genres)?;
        validate::check_rate("success_rate", self.success_rate)?;
        validate::check_timestamp("updated_at_ms", self.updated_at_ms)
    }
}

/// The rows of a table read at open: those usable, and a description of each row skipped
/// because its values are unreadable or out of range. Skipped rows stay in the file (never
/// wiped); a pattern whose row was skipped is learned afresh, replacing the row, the next
/// time its content is watched in its context.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Loaded<T> {
    /// Usable rows.
    pub rows: Vec<T>,
    /// Why each skipped row was skipped.
    pub skipped: Vec<String>,
}

/// True for errors about one row's values (a tampered cell), as opposed to the file itself.
fn is_row_error(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
    )
}

/// Collects rows, skipping (and describing) those with unusable values; other errors (I/O,
/// corruption found mid-scan) fail the whole read.
fn load_rows<T>(
    rows: impl Iterator<Item = rusqlite::Result<T>>,
    table: &str,
    check: impl Fn(&T) -> Result<(), ValidationError>,
) -> rusqlite::Result<Loaded<T>> {
    let mut out = Loaded { rows: Vec::new(), skipped: Vec::new() };
    for (i, row) in rows.enumerate() {
        match row {
            Ok(v) => match check(&v) {
                Ok(()) => out.rows.push(v),
                Err(e) => out.skipped.push(format!("{table} row {i}: {e}")),
            },
            Err(e) if is_row_error(&e) => out.skipped.push(format!("{table} row {i}: {e}")),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The SQLite file (or an in-memory database).
pub struct Store {
    conn: Connection,
    path: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

fn enum_i(v: impl Into<omega_protocol::pb::TimeSlot>) -> i32 {
    v.into() as i32
}

/// Creates the database file readable by its owner only (it holds the device token), or
/// narrows an existing one to that. SQLite gives its journal and WAL files the database
/// file's permissions.
fn owner_only(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mode = std::fs::metadata(path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

impl Store {
    /// Opens (creating if absent, readable by its owner only) the database at `path`, or an in-memory one for `None`.
    /// `durable` = `synchronous=FULL` (every commit reaches the disk); otherwise `NORMAL`
    /// (still consistent after a crash, may lose the last commits on power loss).
    pub fn open(path: Option<&Path>, durable: bool) -> Result<Store> {
        let name = path.map_or_else(|| ":memory:".to_string(), |p| p.display().to_string());
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if let Some(p) = path {
            owner_only(p).map_err(|e| DeviceError::db(&name, e))?;
        }
        let conn = match path {
            Some(p) => Connection::open_with_flags(p, flags),
            None => Connection::open_in_memory(),
        }
        .map_err(|e| DeviceError::db(&name, e))?;
        let mut store = Store { conn, path: name };
        store.init(durable)?;
        Ok(store)
    }

    /// Path shown in errors.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> DeviceError {
        DeviceError::db(&self.path, e)
    }

    fn init(&mut self, durable: bool) -> Result<()> {
        // Reading the header first: a corrupt or foreign file fails here, before any write.
        let version: i64 =
            self.conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| {
                self.err(format!("not a readable Omega database ({e}); left untouched"))
            })?;
        if version > SCHEMA_VERSION {
            return Err(DeviceError::SchemaTooNew {
                path: self.path.clone(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let check: String = self
            .conn
            .pragma_query_value(None, "quick_check", |r| r.get(0))
            .map_err(|e| self.err(format!("integrity check failed ({e}); left untouched")))?;
        if check != "ok" {
            return Err(self.err(format!("database is corrupt ({check}); left untouched")));
        }
        if version == 0 {
            let tables: i64 = self
                .conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(|e| self.err(e))?;
            if tables != 0 {
                return Err(self.err(
                    "schema version 0 but tables exist: not an Omega database; left untouched",
                ));
            }
        }
        let pragmas = format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; PRAGMA foreign_keys = ON;",
            if durable { "FULL" } else { "NORMAL" }
        );
        self.conn.execute_batch(&pragmas).map_err(|e| self.err(e))?;
        if version == 0 {
            let tx = self.conn.transaction().map_err(|e| DeviceError::db(&self.path, e))?;
            tx.execute_batch(SCHEMA).map_err(|e| DeviceError::db(&self.path, e))?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(|e| DeviceError::db(&self.path, e))?;
            tx.commit().map_err(|e| DeviceError::db(&self.path, e))?;
        }
        Ok(())
    }

    /// Runs `f` in one transaction: all of it is written, or nothing.
    pub fn write<T>(&mut self, f: impl FnOnce(&Tx<'_>) -> rusqlite::Result<T>) -> Result<T> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| DeviceError::db(&path, e))?;
        let out = f(&Tx(&tx)).map_err(|e| DeviceError::db(&path, e))?;
        tx.commit().map_err(|e| DeviceError::db(&path, e))?;
        Ok(out)
    }

    /// Checkpoints the WAL into the main file and closes the connection.
    pub fn close(self) -> Result<()> {
        let path = self.path.clone();
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(|e| DeviceError::db(&path, e))?;
        self.conn.close().map_err(|(_, e)| DeviceError::db(&path, e))
    }

    /// A meta value.
    pub fn meta<T: rusqlite::types::FromSql>(&self, key: &str) -> Result<Option<T>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Every local pattern with its embedding; rows with unusable values are skipped.
    pub fn patterns(&self) -> Result<Loaded<(StoredPattern, QuantizedVector)>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, content_id, title, time_slot, day_type, content_type, genres, \
                 embedding, scale, success_rate, sample_count, created_at_ms, updated_at_ms, \
                 synced, pending_samples, dirty FROM patterns ORDER BY created_at_ms, id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                let p = StoredPattern {
                    id: uuid_col(r, 0)?,
                    content_id: r.get(1)?,
                    title: r.get(2)?,
                    time_slot: time_slot(r.get(3)?),
                    day_type: day_type(r.get(4)?),
                    content_type: content_type(r.get(5)?),
                    genres: genres_col(r, 6)?,
                    success_rate: r.get(9)?,
                    sample_count: r.get(10)?,
                    created_at_ms: r.get(11)?,
                    updated_at_ms: r.get(12)?,
                    synced: r.get(13)?,
                    pending_samples: r.get(14)?,
                    dirty: r.get(15)?,
                };
                Ok((p, vector_col(r, 7, 8)?))
            })
            .map_err(|e| self.err(e))?;
        load_rows(rows, "patterns", |(p, _)| p.check()).map_err(|e| self.err(e))
    }

    /// Pattern ids removed locally that the shard has not been told about.
    pub fn removed(&self) -> Result<Vec<Uuid>> {
        let mut st =
            self.conn.prepare("SELECT id FROM removed ORDER BY id").map_err(|e| self.err(e))?;
        let rows = st.query_map([], |r| uuid_col(r, 0)).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>().map_err(|e| self.err(e))
    }

    /// The unacknowledged delta, encoded, if any.
    pub fn outbox(&self) -> Result<Option<(u64, Vec<u8>)>> {
        self.conn
            .query_row(
                "SELECT local_version, delta FROM outbox ORDER BY local_version LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Content ids watched, with when.
    pub fn watched(&self) -> Result<Vec<(String, i64)>> {
        let mut st = self
            .conn
            .prepare("SELECT content_id, last_ms FROM watched")
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>().map_err(|e| self.err(e))
    }

    /// Global patterns with their embeddings; rows with unusable values are skipped.
    pub fn globals(&self) -> Result<Loaded<(StoredGlobal, QuantizedVector)>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, content_id, embedding, scale, success_rate, sample_count, time_slot, \
                 day_type, content_type, genres, updated_at_ms FROM global_patterns ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                let g = StoredGlobal {
                    id: uuid_col(r, 0)?,
                    content_id: r.get(1)?,
                    success_rate: r.get(4)?,
                    sample_count: r.get(5)?,
                    time_slot: time_slot(r.get(6)?),
                    day_type: day_type(r.get(7)?),
                    content_type: content_type(r.get(8)?),
                    genres: genres_col(r, 9)?,
                    updated_at_ms: r.get(10)?,
                };
                Ok((g, vector_col(r, 2, 3)?))
            })
            .map_err(|e| self.err(e))?;
        load_rows(rows, "global_patterns", |(g, _)| g.check()).map_err(|e| self.err(e))
    }

    /// A cached catalogue embedding for `text`.
    pub fn catalogue_embedding(&self, text: &str) -> Result<Option<QuantizedVector>> {
        self.conn
            .query_row(
                "SELECT embedding, scale FROM catalogue_embeddings WHERE text = ?1",
                [text],
                |r| vector_col(r, 0, 1),
            )
            .optional()
            .map_err(|e| self.err(e))
    }
}

/// The writes of one transaction.
pub struct Tx<'a>(&'a Transaction<'a>);

impl Tx<'_> {
    /// Sets a meta value.
    pub fn set_meta(&self, key: &str, value: impl rusqlite::ToSql) -> rusqlite::Result<()> {
        self.0
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map(|_| ())
    }

    /// Inserts or replaces a local pattern.
    pub fn put_pattern(&self, p: &StoredPattern, v: &QuantizedVector) -> rusqlite::Result<()> {
        self.0
            .execute(
                "INSERT OR REPLACE INTO patterns (id, content_id, title, time_slot, day_type, \
                 content_type, genres, embedding, scale, success_rate, sample_count, \
                 created_at_ms, updated_at_ms, synced, pending_samples, dirty) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    p.id.as_bytes().as_slice(),
                    p.content_id,
                    p.title,
                    enum_i(p.time_slot),
                    omega_protocol::pb::DayType::from(p.day_type) as i32,
                    omega_protocol::pb::ContentType::from(p.content_type) as i32,
                    genres_json(&p.genres),
                    v.to_bytes(),
                    v.scale,
                    p.success_rate,
                    p.sample_count,
                    p.created_at_ms,
                    p.updated_at_ms,
                    p.synced,
                    p.pending_samples,
                    p.dirty,
                ],
            )
            .map(|_| ())
    }

    /// Marks a pattern as part of a delta.
    pub fn mark_sent(&self, id: Uuid) -> rusqlite::Result<()> {
        self.0
            .execute(
                "UPDATE patterns SET synced = 1, pending_samples = 0, dirty = 0 WHERE id = ?1",
                [id.as_bytes().as_slice()],
            )
            .map(|_| ())
    }

    /// Deletes a local pattern; remembers its id for the shard when the shard knows it.
    pub fn delete_pattern(&self, id: Uuid, tell_shard: bool) -> rusqlite::Result<()> {
        self.0.execute("DELETE FROM patterns WHERE id = ?1", [id.as_bytes().as_slice()])?;
        if tell_shard {
            self.0.execute(
                "INSERT OR IGNORE INTO removed (id) VALUES (?1)",
                [id.as_bytes().as_slice()],
            )?;
        }
        Ok(())
    }

    /// Forgets removals that went out in a delta.
    pub fn clear_removed(&self, ids: &[Uuid]) -> rusqlite::Result<()> {
        for id in ids {
            self.0.execute("DELETE FROM removed WHERE id = ?1", [id.as_bytes().as_slice()])?;
        }
        Ok(())
    }

    /// Stores the delta awaiting acknowledgement.
    pub fn put_outbox(&self, version: u64, encoded: &[u8]) -> rusqlite::Result<()> {
        self.0
            .execute(
                "INSERT OR REPLACE INTO outbox (local_version, delta) VALUES (?1, ?2)",
                params![version as i64, encoded],
            )
            .map(|_| ())
    }

    /// Drops acknowledged deltas.
    pub fn clear_outbox(&self, up_to: u64) -> rusqlite::Result<()> {
        self.0.execute("DELETE FROM outbox WHERE local_version <= ?1", [up_to as i64]).map(|_| ())
    }

    /// Records a watched content.
    pub fn put_watched(&self, content_id: &str, at_ms: i64) -> rusqlite::Result<()> {
        self.0
            .execute(
                "INSERT INTO watched (content_id, last_ms) VALUES (?1, ?2) \
                 ON CONFLICT (content_id) DO UPDATE SET last_ms = max(last_ms, excluded.last_ms)",
                params![content_id, at_ms],
            )
            .map(|_| ())
    }

    /// Forgets a watched content.
    pub fn delete_watched(&self, content_id: &str) -> rusqlite::Result<()> {
        self.0.execute("DELETE FROM watched WHERE content_id = ?1", [content_id]).map(|_| ())
    }

    /// Inserts or replaces a global pattern.
    pub fn put_global(&self, g: &StoredGlobal, v: &QuantizedVector) -> rusqlite::Result<()> {
        self.0
            .execute(
                "INSERT OR REPLACE INTO global_patterns (id, content_id, embedding, scale, \
                 success_rate, sample_count, time_slot, day_type, content_type, genres, \
                 updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    g.id.as_bytes().as_slice(),
                    g.content_id,
                    v.to_bytes(),
                    v.scale,
                    g.success_rate,
                    g.sample_count,
                    enum_i(g.time_slot),
                    omega_protocol::pb::DayType::from(g.day_type) as i32,
                    omega_protocol::pb::ContentType::from(g.content_type) as i32,
                    genres_json(&g.genres),
                    g.updated_at_ms,
                ],
            )
            .map(|_| ())
    }

    /// Deletes a global pattern.
    pub fn delete_global(&self, id: Uuid) -> rusqlite::Result<()> {
        self.0
            .execute("DELETE FROM global_patterns WHERE id = ?1", [id.as_bytes().as_slice()])
            .map(|_| ())
    }

    /// Caches a catalogue embedding.
    pub fn put_catalogue_embedding(&self, text: &str, v: &QuantizedVector) -> rusqlite::Result<()> {
        self.0
            .execute(
                "INSERT OR REPLACE INTO catalogue_embeddings (text, embedding, scale) VALUES (?1, ?2, ?3)",
                params![text, v.to_bytes(), v.scale],
            )
            .map(|_| ())
    }
}

fn genres_json(g: &[String]) -> String {
    serde_json::to_string(g).unwrap_or_else(|_| "[]".into())
}

fn conversion_err(col: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Blob,
        Box::new(std::io::Error::new(std::io::ErrorKind::InvalidData, msg)),
    )
}

fn uuid_col(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Uuid> {
    let b: Vec<u8> = r.get(i)?;
    Uuid::from_slice(&b).map_err(|e| conversion_err(i, e.to_string()))
}

fn genres_col(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Vec<String>> {
    let s: String = r.get(i)?;
    serde_json::from_str(&s).map_err(|e| conversion_err(i, e.to_string()))
}

fn vector_col(r: &rusqlite::Row<'_>, vi: usize, si: usize) -> rusqlite::Result<QuantizedVector> {
    let b: Vec<u8> = r.get(vi)?;
    let scale: f32 = r.get(si)?;
    if b.len() != EMBEDDING_DIM || !scale.is_finite() || scale < 0.0 {
        return Err(conversion_err(vi, format!("embedding of {} bytes, scale {scale}", b.len())));
    }
    Ok(QuantizedVector::from_bytes(&b, scale))
}

fn time_slot(v: i32) -> TimeSlot {
    TimeSlot::from_wire("time_slot", v).unwrap_or_default()
}

fn day_type(v: i32) -> DayType {
    DayType::from_wire("day_type", v).unwrap_or_default()
}

fn content_type(v: i32) -> ContentType {
    ContentType::from_wire("content_type", v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega_protocol::vector::quantize;

    fn vector(seed: usize) -> QuantizedVector {
        let mut v = vec![0.0f32; EMBEDDING_DIM];
        v[seed % EMBEDDING_DIM] = 1.0;
        quantize(&v)
    }

    fn pattern(content: &str, created: i64) -> StoredPattern {
        StoredPattern {
            id: Uuid::now_v7(),
            content_id: content.into(),
            title: content.to_uppercase(),
            time_slot: TimeSlot::Evening,
            day_type: DayType::Weekend,
            content_type: ContentType::Movie,
            genres: vec!["crime".into()],
            success_rate: 0.8,
            sample_count: 2,
            created_at_ms: created,
            updated_at_ms: created + 1,
            synced: false,
            pending_samples: 1,
            dirty: true,
        }
    }

    fn global(content: &str) -> StoredGlobal {
        StoredGlobal {
            id: Uuid::now_v7(),
            content_id: content.into(),
            success_rate: 0.9,
            sample_count: 7,
            time_slot: TimeSlot::Night,
            day_type: DayType::Weekday,
            content_type: ContentType::Series,
            genres: vec![],
            updated_at_ms: 5,
        }
    }

    #[test]
    fn every_table_round_trips_in_memory() {
        let mut st = Store::open(None, true).expect("open");
        assert_eq!(st.path(), ":memory:");
        let (a, b) = (pattern("a", 10), pattern("b", 20));
        let g = global("g");
        st.write(|tx| {
            tx.put_pattern(&a, &vector(1))?;
            tx.put_pattern(&b, &vector(2))?;
            tx.set_meta("answer", 42i64)?;
            tx.put_outbox(3, b"delta-3")?;
            tx.put_outbox(4, b"delta-4")?;
            tx.put_watched("a", 100)?;
            tx.put_watched("a", 50)?; // older: last_ms keeps the max
            tx.put_watched("b", 70)?;
            tx.put_global(&g, &vector(3))?;
            tx.put_catalogue_embedding("text", &vector(4))
        })
        .expect("write");
        let loaded = st.patterns().expect("patterns");
        assert!(loaded.skipped.is_empty());
        assert_eq!(loaded.rows, vec![(a.clone(), vector(1)), (b.clone(), vector(2))]);
        assert_eq!(st.meta::<i64>("answer").expect("meta"), Some(42));
        assert_eq!(st.meta::<i64>("nothing").expect("meta"), None);
        assert_eq!(st.outbox().expect("outbox"), Some((3, b"delta-3".to_vec())));
        let mut watched = st.watched().expect("watched");
        watched.sort();
        assert_eq!(watched, vec![("a".to_string(), 100), ("b".to_string(), 70)]);
        assert_eq!(st.globals().expect("globals").rows, vec![(g.clone(), vector(3))]);
        assert_eq!(st.catalogue_embedding("text").expect("cat"), Some(vector(4)));
        assert_eq!(st.catalogue_embedding("other").expect("cat"), None);

        st.write(|tx| {
            tx.mark_sent(a.id)?;
            tx.delete_pattern(b.id, true)?;
            tx.clear_outbox(3)?;
            tx.delete_watched("b")?;
            tx.delete_global(g.id)
        })
        .expect("write");
        let rows = st.patterns().expect("patterns").rows;
        assert_eq!(rows.len(), 1);
        let sent = &rows[0].0;
        assert!(sent.synced && !sent.dirty && sent.pending_samples == 0);
        assert_eq!(st.removed().expect("removed"), vec![b.id]);
        assert_eq!(st.outbox().expect("outbox"), Some((4, b"delta-4".to_vec())));
        assert_eq!(st.watched().expect("watched").len(), 1);
        assert!(st.globals().expect("globals").rows.is_empty());
        st.write(|tx| {
            tx.clear_removed(&[b.id])?;
            tx.delete_pattern(a.id, false)
        })
        .expect("write");
        assert!(st.removed().expect("removed").is_empty(), "an unsent pattern is not reported");
        st.close().expect("close");
    }

    #[test]
    fn a_failed_transaction_writes_nothing() {
        let mut st = Store::open(None, true).expect("open");
        let a = pattern("a", 1);
        let err = st
            .write(|tx| {
                tx.put_pattern(&a, &vector(1))?;
                tx.0.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                Ok(())
            })
            .expect_err("fails");
        assert!(matches!(err, DeviceError::Database { .. }), "{err}");
        assert!(st.patterns().expect("patterns").rows.is_empty(), "rolled back");
    }

    #[test]
    fn durability_sets_the_sync_mode_and_wal_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (durable, want) in [(true, 2i64), (false, 1)] {
            let path = dir.path().join(format!("s-{durable}.sqlite"));
            let st = Store::open(Some(&path), durable).expect("open");
            let mode: i64 =
                st.conn.pragma_query_value(None, "synchronous", |r| r.get(0)).expect("pragma");
            assert_eq!(mode, want, "durable = {durable}: FULL is 2, NORMAL is 1");
            let journal: String =
                st.conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).expect("pragma");
            assert_eq!(journal, "wal");
            let version: i64 =
                st.conn.pragma_query_value(None, "user_version", |r| r.get(0)).expect("pragma");
            assert_eq!(version, SCHEMA_VERSION);
        }
    }

    #[test]
    fn rows_with_unusable_values_are_skipped_not_fatal() {
        let mut st = Store::open(None, true).expect("open");
        let good = pattern("good", 1);
        let mut bad_rate = pattern("bad-rate", 2);
        bad_rate.success_rate = 3.0;
        let mut bad_time = pattern("bad-time", 3);
        bad_time.updated_at_ms = i64::MAX;
        st.write(|tx| {
            tx.put_pattern(&good, &vector(1))?;
            tx.put_pattern(&bad_rate, &vector(2))?;
            tx.put_pattern(&bad_time, &vector(3))?;
            let mut g = global("g");
            g.success_rate = f32::INFINITY;
            tx.put_global(&g, &vector(4))
        })
        .expect("write");
        st.conn
            .execute("UPDATE patterns SET embedding = x'00' WHERE content_id = 'good'", [])
            .expect("short embedding");
        let loaded = st.patterns().expect("a bad row is no error");
        assert!(loaded.rows.is_empty());
        assert_eq!(loaded.skipped.len(), 3, "{:?}", loaded.skipped);
        assert!(loaded.skipped.iter().any(|s| s.contains("success_rate = 3")), "{loaded:?}");
        assert!(loaded.skipped.iter().any(|s| s.contains("updated_at_ms")), "{loaded:?}");
        assert!(loaded.skipped.iter().any(|s| s.contains("embedding of 1 bytes")), "{loaded:?}");
        let globals = st.globals().expect("globals");
        assert_eq!((globals.rows.len(), globals.skipped.len()), (0, 1));
    }
}
