//! The `evaluations` and `eval_members` tables: one row per evaluation of a
//! jobset at a commit, and one member per job it found (with the build the
//! job maps to, or the job's own evaluation error).

use serde::Serialize;

use super::{Ex, Result, now, run};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Evaluation {
    pub id: i64,
    pub jobset_id: i64,
    /// `running`, `succeeded` or `failed`.
    pub status: String,
    pub commit_sha: String,
    pub git_ref: String,
    pub flake_ref: String,
    pub lock_hash: Option<String>,
    pub config_hash: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub duration_ms: Option<i64>,
    pub workers: i64,
    pub jobs: i64,
    pub error_jobs: i64,
    pub new_builds: i64,
    pub forced: bool,
    pub error: Option<String>,
    pub stderr: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewEvaluation<'a> {
    pub jobset_id: i64,
    pub commit_sha: &'a str,
    pub git_ref: &'a str,
    pub flake_ref: &'a str,
    pub config_hash: &'a str,
    pub workers: i64,
    pub forced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Member {
    pub eval_id: i64,
    pub job: String,
    pub build_id: Option<i64>,
    pub is_new: bool,
    pub error: Option<String>,
}

/// What an evaluation ended with.
#[derive(Debug, Clone, Default)]
pub struct Outcome<'a> {
    pub lock_hash: Option<&'a str>,
    pub jobs: i64,
    pub error_jobs: i64,
    pub new_builds: i64,
    pub error: Option<&'a str>,
    pub stderr: Option<&'a str>,
}

macro_rules! cols {
    () => {
        "id, jobset_id, status, commit_sha, git_ref, flake_ref, lock_hash, config_hash, started_at, finished_at, \
         duration_ms, workers, jobs, error_jobs, new_builds, forced, error, stderr"
    };
}

pub async fn create(ex: Ex<'_>, e: &NewEvaluation<'_>) -> Result<Evaluation> {
    let sql = concat!(
        "INSERT INTO evaluations (jobset_id, status, commit_sha, git_ref, flake_ref, config_hash, started_at, workers, forced)
         VALUES ($1, 'running', $2, $3, $4, $5, $6, $7, $8) RETURNING ",
        cols!()
    );
    Ok(run!(ex, c => sqlx::query_as(sql)
        .bind(e.jobset_id).bind(e.commit_sha).bind(e.git_ref).bind(e.flake_ref).bind(e.config_hash)
        .bind(now()).bind(e.workers).bind(e.forced)
        .fetch_one(&mut *c).await?))
}

/// Marks an evaluation finished: `failed` when `o.error` is set.
pub async fn finish(ex: Ex<'_>, id: i64, duration_ms: i64, o: &Outcome<'_>) -> Result<()> {
    let status = if o.error.is_some() {
        "failed"
    } else {
        "succeeded"
    };
    run!(ex, c => sqlx::query(
        "UPDATE evaluations SET status = $2, finished_at = $3, duration_ms = $4, lock_hash = $5, jobs = $6,
             error_jobs = $7, new_builds = $8, error = $9, stderr = $10 WHERE id = $1")
        .bind(id).bind(status).bind(now()).bind(duration_ms).bind(o.lock_hash).bind(o.jobs)
        .bind(o.error_jobs).bind(o.new_builds).bind(o.error).bind(o.stderr)
        .execute(&mut *c).await?.rows_affected());
    Ok(())
}

pub async fn get(ex: Ex<'_>, id: i64) -> Result<Option<Evaluation>> {
    let sql = concat!("SELECT ", cols!(), " FROM evaluations WHERE id = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(id).fetch_optional(&mut *c).await?))
}

/// The newest evaluations of a jobset, newest first.
pub async fn latest(ex: Ex<'_>, jobset_id: i64, limit: i64) -> Result<Vec<Evaluation>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM evaluations WHERE jobset_id = $1 ORDER BY id DESC LIMIT $2"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(jobset_id).bind(limit).fetch_all(&mut *c).await?))
}

pub async fn add_member(ex: Ex<'_>, m: &Member) -> Result<()> {
    run!(ex, c => sqlx::query(
        "INSERT INTO eval_members (eval_id, job, build_id, is_new, error) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (eval_id, job) DO UPDATE SET build_id = excluded.build_id, is_new = excluded.is_new, error = excluded.error")
        .bind(m.eval_id).bind(&m.job).bind(m.build_id).bind(m.is_new).bind(&m.error)
        .execute(&mut *c).await?.rows_affected());
    Ok(())
}

pub async fn members(ex: Ex<'_>, eval_id: i64) -> Result<Vec<Member>> {
    Ok(run!(ex, c => sqlx::query_as(
        "SELECT eval_id, job, build_id, is_new, error FROM eval_members WHERE eval_id = $1 ORDER BY job")
        .bind(eval_id).fetch_all(&mut *c).await?))
}
