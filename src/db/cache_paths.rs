//! The `cache_paths` table: the index of what Kiln's binary cache holds,
//! one row per store path with its narinfo fields, so "is it cached?" is one
//! indexed lookup and garbage collection can reason over references.

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
}

macro_rules! cols {
    () => {
        "hash_part, store_path, nar_hash, nar_size, file_hash, file_size, nar_file, compression, refs, deriver, ca, \
         origin, created_at"
    };
}

/// Records a path; returns false if it was already there (first one wins:
/// a store path's contents never change).
pub async fn insert(ex: Ex<'_>, p: &CachePath) -> Result<bool> {
    let n = run!(ex, c => sqlx::query(concat!("INSERT INTO cache_paths (", cols!(), ")
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (hash_part) DO NOTHING"))
        .bind(&p.hash_part).bind(&p.store_path).bind(&p.nar_hash).bind(p.nar_size).bind(&p.file_hash)
        .bind(p.file_size).bind(&p.nar_file).bind(&p.compression).bind(&p.refs).bind(&p.deriver)
        .bind(&p.ca).bind(&p.origin).bind(p.created_at)
        .execute(&mut *c).await?.rows_affected());
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

/// The store paths garbage collection starts from: outputs of builds in
/// remaining evaluations, of pinned builds, uploads since `upload_cutoff`,
/// and everything stored since the oldest unfinished build was queued.
pub async fn retention_roots(ex: Ex<'_>, upload_cutoff: i64) -> Result<Vec<String>> {
    Ok(run!(ex, c => sqlx::query_scalar(
        "SELECT bo.path FROM build_outputs bo JOIN eval_members m ON m.build_id = bo.build_id
         UNION SELECT bo.path FROM build_outputs bo JOIN builds b ON b.id = bo.build_id WHERE b.keep = TRUE
         UNION SELECT store_path FROM cache_paths WHERE origin = 'upload' AND created_at >= $1
         UNION SELECT store_path FROM cache_paths
             WHERE created_at >= (SELECT MIN(created_at) FROM builds WHERE finished = FALSE)")
        .bind(upload_cutoff).fetch_all(&mut *c).await?))
}

/// Every path as (hash part, references, NAR file, file size).
pub async fn all_for_gc(ex: Ex<'_>) -> Result<Vec<(String, String, String, i64)>> {
    Ok(run!(ex, c => sqlx::query_as("SELECT hash_part, refs, nar_file, file_size FROM cache_paths")
        .fetch_all(&mut *c).await?))
}

/// Which of `hash_parts` the cache holds as Kiln's own (any origin but an
/// upload): a few hundred a query.
pub async fn own_among(mut ex: Ex<'_>, hash_parts: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for chunk in hash_parts.chunks(400) {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT hash_part FROM cache_paths WHERE origin <> 'upload' AND hash_part IN {}",
            super::builds::values_placeholders(ex.backend(), 1, chunk.len(), 1)
        ));
        let rows: Vec<String> = run!(ex.re(), c => {
            let mut q = sqlx::query_scalar(sql);
            for h in chunk {
                q = q.bind(*h);
            }
            q.fetch_all(&mut *c).await?
        });
        out.extend(rows);
    }
    Ok(out)
}
