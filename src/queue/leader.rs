//! Which process runs the queue: exactly one per database. On PostgreSQL
//! it is the holder of an advisory lock, taken on a connection kept open
//! for the process's life, so the lock goes when the process does, however
//! it dies; on SQLite, the holder of a lock on `<state_dir>/queue.lock`.
//! Another coordinator on the same database waits, trying once a second,
//! and takes over.

use std::time::Duration;

use tracing::info;

use crate::db::{Conn, Db, DbError, run};

/// The advisory lock key: "kiln" and "queue" in ASCII.
const LOCK_KEY: i64 = 0x6b69_6c6e_7175_6575;
const RETRY: Duration = Duration::from_secs(1);

/// Who may run the queue.
pub enum Leadership {
    /// Always this process (`kiln build`, tests of the queue alone).
    Alone,
    /// The holder of the database's lock.
    Database { db: Db, state_dir: std::path::PathBuf },
    /// Never this process (`kiln serve` without the queue role).
    Never,
}

/// Held while this process runs the queue.
pub enum Guard {
    Alone,
    Postgres(Conn),
    File(std::fs::File),
}

/// How long the lock's connection may take to answer before the lock is
/// taken as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl Guard {
    /// Whether this process still holds the lock. A PostgreSQL advisory
    /// lock lives as long as its session: if that connection ended (the
    /// server restarted, the backend was terminated), another process may
    /// hold the lock already, and this one must stop at once.
    pub async fn still_held(&mut self) -> bool {
        match self {
            Guard::Alone | Guard::File(_) => true,
            Guard::Postgres(c) => {
                let ping = async {
                    let r: Result<i64, sqlx::Error> =
                        run!(c.ex(), c => sqlx::query_scalar("SELECT 1::BIGINT").fetch_one(&mut *c).await);
                    r.is_ok()
                };
                tokio::time::timeout(CHECK_TIMEOUT, ping).await.unwrap_or(false)
            }
        }
    }
}

impl Leadership {
    /// Waits until this process may run the queue.
    pub async fn acquire(&self) -> Result<Guard, DbError> {
        let (db, state_dir) = match self {
            Leadership::Alone => return Ok(Guard::Alone),
            Leadership::Never => std::future::pending().await,
            Leadership::Database { db, state_dir } => (db, state_dir),
        };
        let mut said = false;
        loop {
            if let Some(g) = try_acquire(db, state_dir).await? {
                if said {
                    info!("this process runs the queue now");
                }
                return Ok(g);
            }
            if !said {
                info!("another process runs the queue: standing by to take over");
                said = true;
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Takes the queue's lock if no other process holds it, without waiting:
/// `kiln build` on a database where `kiln serve` runs the queue must not
/// run a second queue beside it.
pub async fn try_acquire(db: &Db, state_dir: &std::path::Path) -> Result<Option<Guard>, DbError> {
    Ok(match db {
        Db::Postgres(_) => {
            let mut c = db.conn().await?;
            let held: bool = run!(c.ex(), c => sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LOCK_KEY).fetch_one(&mut *c).await?);
            held.then_some(Guard::Postgres(c))
        }
        Db::Sqlite(_) => {
            let path = state_dir.join("queue.lock");
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| DbError::Invalid(format!("{}: {e}", path.display())))?;
            f.try_lock().is_ok().then_some(Guard::File(f))
        }
    })
}
