//! The database: one query layer over embedded SQLite (the default) and
//! PostgreSQL. Every query is written once, in SQL both accept (`$1`
//! placeholders, `RETURNING`, `ON CONFLICT`), and run through [`run!`],
//! which compiles it for each backend's native driver; where the dialects
//! differ, the table's module says so in one place. Each table has its own
//! module holding all of its SQL. Migrations live in `migrations/sqlite/`
//! and `migrations/postgres/` and run at start and on `kiln db migrate`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgConnection, PgPool, Postgres, Sqlite, SqliteConnection, SqlitePool};
use thiserror::Error;

pub mod api_tokens;
pub mod builds;
pub mod cache_paths;
pub mod check_runs;
pub mod deployment_hosts;
pub mod deployments;
pub mod environments;
pub mod evaluations;
pub mod histograms;
pub mod jobsets;
pub mod machines;
pub mod outbox;
pub mod products;
pub mod projects;
pub mod steps;
pub mod webhook_deliveries;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    BadUrl(String),
    #[error("cannot create the database directory {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("stored data is invalid: {0}")]
    Invalid(String),
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A pool on one of the two backends. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A connection or transaction to run queries on; see [`run!`].
pub enum Ex<'c> {
    Sqlite(&'c mut SqliteConnection),
    Postgres(&'c mut PgConnection),
}

impl Ex<'_> {
    /// Reborrows, so one `Ex` can run several queries in a row.
    pub fn re(&mut self) -> Ex<'_> {
        match self {
            Ex::Sqlite(c) => Ex::Sqlite(c),
            Ex::Postgres(c) => Ex::Postgres(c),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Ex::Sqlite(_) => Backend::Sqlite,
            Ex::Postgres(_) => Backend::Postgres,
        }
    }
}

/// Runs `$body` with `$c` bound to the backend's native connection; the body
/// is compiled once per backend, so one SQL text serves both.
#[macro_export]
macro_rules! run {
    ($ex:expr, $c:ident => $body:expr) => {
        match $ex {
            $crate::db::Ex::Sqlite($c) => $body,
            $crate::db::Ex::Postgres($c) => $body,
        }
    };
}
pub use run;

pub enum Conn {
    Sqlite(sqlx::pool::PoolConnection<Sqlite>),
    Postgres(sqlx::pool::PoolConnection<Postgres>),
}

impl Conn {
    pub fn ex(&mut self) -> Ex<'_> {
        match self {
            Conn::Sqlite(c) => Ex::Sqlite(c),
            Conn::Postgres(c) => Ex::Postgres(c),
        }
    }
}

pub enum Tx {
    Sqlite(sqlx::Transaction<'static, Sqlite>),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

impl Tx {
    pub fn ex(&mut self) -> Ex<'_> {
        match self {
            Tx::Sqlite(t) => Ex::Sqlite(t),
            Tx::Postgres(t) => Ex::Postgres(t),
        }
    }

    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Db {
    /// Opens (creating if needed, for SQLite) the database at `url`.
    pub async fn connect(url: &str) -> Result<Db> {
        if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            let path = path.split('?').next().unwrap_or(path);
            if path.is_empty() {
                return Err(DbError::BadUrl(url.to_string()));
            }
            if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|source| DbError::CreateDir { path: dir.display().to_string(), source })?;
            }
            let opts = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // WAL makes NORMAL durable across process crashes; only a
                // power loss can drop the last commits.
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10))
                // 64 MiB of page cache per connection: recording an
                // evaluation inserts into several indexes keyed by hashes.
                .pragma("cache_size", "-65536")
                // Checkpoints (which copy the WAL back and sync) every
                // 64 MiB rather than 4: an evaluation's burst of commits
                // does not stop for one every other transaction.
                .pragma("wal_autocheckpoint", "16384")
                .pragma("temp_store", "memory");
            let pool = SqlitePoolOptions::new().max_connections(8).connect_with(opts).await?;
            Ok(Db::Sqlite(pool))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            Ok(Db::Postgres(pool))
        } else {
            Err(DbError::BadUrl(url.to_string()))
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    /// Connections open in the pool, and how many of them are idle.
    pub fn pool_use(&self) -> (u32, usize) {
        match self {
            Db::Sqlite(p) => (p.size(), p.num_idle()),
            Db::Postgres(p) => (p.size(), p.num_idle()),
        }
    }

    /// Applies pending migrations; returns how many were applied.
    pub async fn migrate(&self) -> Result<usize> {
        let before = self.applied_migrations().await.unwrap_or(0);
        match self {
            Db::Sqlite(p) => SQLITE_MIGRATIONS.run(p).await?,
            Db::Postgres(p) => POSTGRES_MIGRATIONS.run(p).await?,
        }
        Ok(self.applied_migrations().await? - before)
    }

    async fn applied_migrations(&self) -> Result<usize> {
        let mut c = self.conn().await?;
        let n: i64 = run!(c.ex(), c => sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success = TRUE").fetch_one(&mut *c).await?);
        Ok(n as usize)
    }

    pub async fn conn(&self) -> Result<Conn> {
        Ok(match self {
            Db::Sqlite(p) => Conn::Sqlite(p.acquire().await?),
            Db::Postgres(p) => Conn::Postgres(p.acquire().await?),
        })
    }

    /// Starts a write transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two writers queue on the busy timeout instead
    /// of failing when a read lock would have to be upgraded.
    pub async fn begin(&self) -> Result<Tx> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        let Ok(mut c) = self.conn().await else {
            return false;
        };
        run!(c.ex(), c => sqlx::query("SELECT 1").execute(&mut *c).await.is_ok())
    }
}

/// Now, in Unix seconds: every timestamp Kiln stores.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Runs a list query on SQLite and returns its rows from one JSON array.
/// sqlx-sqlite hands each row from its worker thread to the caller
/// separately, a channel send and a thread wake-up per row: the 800 cells
/// of a jobset's matrix cost 3 ms that way and 0.7 ms as one JSON row.
/// `row` is a `json_array(…)` of the columns, `rest` the `FROM …` clause
/// with `?` placeholders for `ids`; rows keep `rest`'s order.
pub(crate) async fn sqlite_json_rows<T: serde::de::DeserializeOwned>(
    c: &mut SqliteConnection,
    row: &str,
    rest: &str,
    ids: &[i64],
) -> Result<Vec<T>> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT json_group_array(json(r)) FROM (SELECT {row} AS r {rest})"));
    let mut q = sqlx::query_scalar::<_, String>(sql);
    for id in ids {
        q = q.bind(*id);
    }
    let text = q.fetch_one(&mut *c).await?;
    serde_json::from_str(&text).map_err(|e| DbError::Invalid(format!("JSON rows: {e}")))
}
