//! The `cache_paths` table: the index of what Kiln's binary cache holds,
//! one row per store path with its narinfo fields, where it came from (a
//! build or an upload) and whether Kiln signed it, so "is it cached?" and
//! "did Kiln build it?" are indexed lookups and garbage collection can
//! reason over references. The retention roots that collection starts
//! from are here too, since they are defined by what the cache must keep.

use serde::Serialize;

use super::{Ex, Result, run};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct CachePath {
    pub hash_part: String,
    pub store_path: String,
    pub nar_hash: String,
    pub nar_size: i64,
    pub file_hash: String,
    pub file_size: i64,
    /// Relative to the cache root, e.g. `nar/<filehash>.nar.zst`.
    pub nar_file: String,
    pub compression: String,
    /// Space-separated base names, as in a narinfo.
    pub refs: String,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    /// `build` or `upload`.
    pub origin: String,
    pub created_at: i64,
    /// Whether the narinfo carries Kiln's signature.
    pub kiln_signed: bool,
}

macro_rules! cols {
    () => {
        "hash_part, store_path, nar_hash, nar_size, file_hash, file_size, nar_file, compression, refs, deriver, ca, \
         origin, created_at, kiln_signed"
    };
}

/// Binds a row's columns in `cols!()` order.
macro_rules! bind_row {
    ($q:expr, $p:expr) => {
        $q.bind(&$p.hash_part)
            .bind(&$p.store_path)
            .bind(&$p.nar_hash)
            .bind($p.nar_size)
            .bind(&$p.file_hash)
            .bind($p.file_size)
            .bind(&$p.nar_file)
            .bind(&$p.compression)
            .bind(&$p.refs)
            .bind(&$p.deriver)
            .bind(&$p.ca)
            .bind(&$p.origin)
            .bind($p.created_at)
            .bind($p.kiln_signed)
    };
}

/// Records a path; returns false if it was already there (first one wins:
/// a store path's contents never change).
pub async fn insert(ex: Ex<'_>, p: &CachePath) -> Result<bool> {
    let sql = concat!(
        "INSERT INTO cache_paths (",
        cols!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ON CONFLICT (hash_part) DO NOTHING"
    );
    let n = run!(ex, c => bind_row!(sqlx::query(sql), p).execute(&mut *c).await?.rows_affected());
    Ok(n == 1)
}

/// Records a path Kiln built, replacing the row of an upload of the same
/// path (the real output wins over whatever was uploaded); any other row
/// stays. Returns whether the row is now `p`.
pub async fn insert_or_replace_upload(ex: Ex<'_>, p: &CachePath) -> Result<bool> {
    let sql = concat!(
        "INSERT INTO cache_paths (",
        cols!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
         ON CONFLICT (hash_part) DO UPDATE SET store_path = excluded.store_path, nar_hash = excluded.nar_hash,
             nar_size = excluded.nar_size, file_hash = excluded.file_hash, file_size = excluded.file_size,
             nar_file = excluded.nar_file, compression = excluded.compression, refs = excluded.refs,
             deriver = excluded.deriver, ca = excluded.ca, origin = excluded.origin,
             created_at = excluded.created_at, kiln_signed = excluded.kiln_signed
         WHERE cache_paths.origin = 'upload'"
    );
    let n = run!(ex, c => bind_row!(sqlx::query(sql), p).execute(&mut *c).await?.rows_affected());
    Ok(n == 1)
}

pub async fn get(ex: Ex<'_>, hash_part: &str) -> Result<Option<CachePath>> {
    let sql = concat!("SELECT ", cols!(), " FROM cache_paths WHERE hash_part = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(hash_part).fetch_optional(&mut *c).await?))
}

pub async fn contains(ex: Ex<'_>, hash_part: &str) -> Result<bool> {
    Ok(run!(ex, c => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM cache_paths WHERE hash_part = $1")
        .bind(hash_part).fetch_one(&mut *c).await?)
        > 0)
}

pub async fn delete(ex: Ex<'_>, hash_part: &str) -> Result<bool> {
    let n = run!(ex, c => sqlx::query("DELETE FROM cache_paths WHERE hash_part = $1")
        .bind(hash_part).execute(&mut *c).await?.rows_affected());
    Ok(n == 1)
}

/// True if some path still points at this NAR file.
pub async fn nar_file_in_use(ex: Ex<'_>, nar_file: &str) -> Result<bool> {
    Ok(run!(ex, c => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM cache_paths WHERE nar_file = $1")
        .bind(nar_file).fetch_one(&mut *c).await?)
        > 0)
}

/// Of these hash parts, the ones in the cache as Kiln's own (built or
/// substituted, not uploaded): one query per 500.
pub async fn own(ex: Ex<'_>, hash_parts: &[&str]) -> Result<Vec<String>> {
    matching(ex, hash_parts, "origin <> 'upload' AND").await
}

/// Of `hash_parts`, those in the cache, whatever their origin.
pub async fn present(ex: Ex<'_>, hash_parts: &[&str]) -> Result<Vec<String>> {
    matching(ex, hash_parts, "").await
}

async fn matching(mut ex: Ex<'_>, hash_parts: &[&str], condition: &'static str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for chunk in hash_parts.chunks(500) {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT hash_part FROM cache_paths WHERE {condition} hash_part IN {}",
            super::builds::values_placeholders(ex.backend(), 1, chunk.len(), 1)
        ));
        let found: Vec<String> = run!(ex.re(), c => {
            let mut q = sqlx::query_scalar(sql);
            for h in chunk {
                q = q.bind(*h);
            }
            q.fetch_all(&mut *c).await?
        });
        out.extend(found);
    }
    Ok(out)
}

/// The steps the queue still needs: the step closures (through
/// `step_deps`) of unfinished builds' top steps, plus running steps. A
/// step no unfinished build needs any more (its builds were cancelled) is
/// not in it, even if its row still says `waiting`.
const LIVE_STEPS: &str = "WITH RECURSIVE live(id) AS (
        SELECT id FROM (
            SELECT top_step_id AS id FROM builds WHERE finished = FALSE AND top_step_id IS NOT NULL
            UNION SELECT id FROM steps WHERE state = 'running') seeds
        UNION SELECT d.dep_id FROM step_deps d JOIN live l ON d.step_id = l.id) ";

/// The store paths garbage collection starts from (decision 014):
/// - outputs of builds in the jobsets' remaining evaluations;
/// - outputs of the newest successful build of every job, which is what
///   `/job/…/latest` answers, even when the evaluation it came from was
///   pruned after newer evaluations failed;
/// - outputs of pinned builds;
/// - uploads since `upload_cutoff`;
/// - outputs of the steps unfinished builds need (built already, or built
///   as inputs of steps still to run);
/// - whatever was stored since `young_cutoff`, so an output stored moments
///   before its step is recorded as built is never collected.
pub async fn retention_roots(ex: Ex<'_>, upload_cutoff: i64, young_cutoff: i64) -> Result<Vec<String>> {
    let sql = sqlx::AssertSqlSafe(format!(
        "{LIVE_STEPS}
         SELECT bo.path FROM build_outputs bo JOIN eval_members m ON m.build_id = bo.build_id
         UNION SELECT bo.path FROM build_outputs bo WHERE bo.build_id IN (
             SELECT MAX(id) FROM builds WHERE finished = TRUE AND build_status = 0 GROUP BY jobset_id, job)
         UNION SELECT bo.path FROM build_outputs bo JOIN builds b ON b.id = bo.build_id WHERE b.keep = TRUE
         UNION SELECT store_path FROM cache_paths WHERE origin = 'upload' AND created_at >= $1
         UNION SELECT store_path FROM cache_paths WHERE created_at >= $2
         UNION SELECT o.path FROM step_outputs o JOIN live l ON l.id = o.step_id"
    ));
    Ok(run!(ex, c => sqlx::query_scalar(sql).bind(upload_cutoff).bind(young_cutoff).fetch_all(&mut *c).await?))
}

/// The derivations of the steps unfinished builds still have to build: the
/// outputs of their inputs are retention roots too, including inputs that
/// were already in the cache when the build was queued (those have no step).
pub async fn queued_step_drvs(ex: Ex<'_>) -> Result<Vec<String>> {
    let sql = sqlx::AssertSqlSafe(format!(
        "{LIVE_STEPS}
         SELECT s.drv_path FROM steps s JOIN live l ON l.id = s.id WHERE s.state IN ('waiting', 'runnable', 'running')"
    ));
    Ok(run!(ex, c => sqlx::query_scalar(sql).fetch_all(&mut *c).await?))
}

/// Every path as (hash part, references, NAR file, file size).
pub async fn all_for_gc(ex: Ex<'_>) -> Result<Vec<(String, String, String, i64)>> {
    Ok(run!(ex, c => sqlx::query_as("SELECT hash_part, refs, nar_file, file_size FROM cache_paths")
        .fetch_all(&mut *c).await?))
}
