//! Connection pools and the schema: migrations, the HNSW index, and how database errors map
//! to the store's error.

use crate::store::{StoreError, StoreOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Executor};
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::HNSW_INDEX;

/// The embedded migrations (`shard-server/migrations`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Maps a database error to the store's error, separating "unreachable" from the rest.
pub fn db_err(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &e {
        E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Tls(_) => {
            StoreError::Unavailable(e.to_string())
        }
        E::Protocol(_) => StoreError::Unavailable(e.to_string()),
        E::Database(d) => match d.code().as_deref() {
            Some(c) if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Database(e.to_string()),
        },
        _ => StoreError::Database(e.to_string()),
    }
}

/// A pool on `url` whose sessions show as `name` in `pg_stat_activity`.
pub(super) fn pool(url: &str, name: &str, size: u32, ef_search: u32) -> Result<PgPool, StoreError> {
    Ok(pool_of(connect_options(url, name)?, size, ef_search))
}

/// One session for reads of a whole table by design (the similarity index's load at start
/// and its rebuilds, which log their own timing): sqlx's slow-statement warning would fire on
/// every one of them, so statement logging is off here.
pub(super) fn bulk_read_pool(url: &str, name: &str, ef_search: u32) -> Result<PgPool, StoreError> {
    Ok(pool_of(connect_options(url, name)?.disable_statement_logging(), 1, ef_search))
}

fn connect_options(url: &str, name: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Database(format!("bad database URL: {e}")))?
        .application_name(name))
}

fn pool_of(opts: PgConnectOptions, size: u32, ef_search: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Duration::from_secs(300))
        // A broken connection fails one query and is dropped; pinging on every checkout
        // would add a round trip to every sync.
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                conn.execute(format!("SET hnsw.ef_search = {ef_search}").as_str()).await?;
                Ok(())
            })
        })
        .connect_lazy_with(opts)
}

/// Runs the migrations and creates the HNSW index (`omega-shard migrate`, and at start).
pub async fn migrate(pool: &PgPool, m: u32, ef_construction: u32) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => db_err(e),
        other => StoreError::Database(format!("migration failed: {other}")),
    })?;
    let existing: Option<Vec<String>> =
        sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE relname = $1")
            .bind(HNSW_INDEX)
            .fetch_optional(pool)
            .await
            .map_err(db_err)?
            .flatten();
    match existing {
        None => {
            // Created on an empty table at first start: cheap. The values are validated
            // integers, so formatting them into DDL is safe.
            let ddl = format!(
                "CREATE INDEX IF NOT EXISTS {HNSW_INDEX} ON pattern_vectors USING hnsw \
                 (embedding vector_cosine_ops) WITH (m = {m}, ef_construction = {ef_construction})"
            );
            pool.execute(ddl.as_str()).await.map_err(db_err)?;
        }
        Some(opts) => {
            let want = [format!("m={m}"), format!("ef_construction={ef_construction}")];
            if !want.iter().all(|w| opts.contains(w)) {
                tracing::warn!(
                    existing = ?opts,
                    wanted = ?want,
                    "the HNSW index was built with other parameters; they apply after \
                     `REINDEX INDEX CONCURRENTLY {HNSW_INDEX}`"
                );
            }
        }
    }
    Ok(())
}

/// Migrates the database at `url` through `pool`, retrying for up to 30 s while it comes up.
pub(super) async fn migrate_when_up(pool: &PgPool, opts: &StoreOptions) -> Result<(), StoreError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match migrate(pool, opts.hnsw_m, opts.hnsw_ef_construction).await {
            Ok(()) => return Ok(()),
            Err(StoreError::Unavailable(e)) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn primary_url(opts: &StoreOptions) -> Result<&str, StoreError> {
    opts.postgres_url.as_deref().ok_or_else(|| StoreError::Database("no DATABASE_URL".into()))
}

/// `omega-shard migrate`: the migrations and the HNSW index, nothing else (no background
/// tasks, no similarity index load).
pub async fn migrate_database(opts: &StoreOptions) -> Result<(), StoreError> {
    let primary = pool(primary_url(opts)?, "omega-shard-migrate", 2, opts.hnsw_ef_search)?;
    let done = migrate_when_up(&primary, opts).await;
    primary.close().await;
    done
}
