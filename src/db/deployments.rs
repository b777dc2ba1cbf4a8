//! The `deployments` table: one row per attempt to bring an environment's
//! hosts to one evaluation's closures. Its status moves `waiting` (manual
//! environments: until promoted) → `queued` → `running` → `succeeded` or
//! `failed`; a newer plan makes one that has not started `superseded`.
//! GitHub's mirror of it (`github_id`) and the last status queued for
//! GitHub (`github_reported`) live here too.

use serde::Serialize;

use super::{Ex, Result, now, run};

pub const WAITING: &str = "waiting";
pub const QUEUED: &str = "queued";
pub const RUNNING: &str = "running";
pub const SUCCEEDED: &str = "succeeded";
pub const FAILED: &str = "failed";
pub const SUPERSEDED: &str = "superseded";
pub const CANCELLED: &str = "cancelled";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Deployment {
    pub id: i64,
    pub environment_id: i64,
    pub eval_id: i64,
    /// `waiting` (for Promote), `queued`, `running`, `succeeded`, `failed`, `superseded`, `cancelled`.
    pub status: String,
    /// `auto`, `promoted`, `cli`, `api`.
    pub reason: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
}

impl Deployment {
    pub fn is_open(&self) -> bool {
        matches!(self.status.as_str(), WAITING | QUEUED | RUNNING)
    }
}

macro_rules! cols {
    () => {
        "id, environment_id, eval_id, status, reason, created_at, started_at, finished_at, error"
    };
}

pub async fn create(ex: Ex<'_>, environment_id: i64, eval_id: i64, status: &str, reason: &str) -> Result<Deployment> {
    let sql = concat!(
        "INSERT INTO deployments (environment_id, eval_id, status, reason, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING ",
        cols!()
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(environment_id).bind(eval_id).bind(status).bind(reason).bind(now())
        .fetch_one(&mut *c).await?))
}

pub async fn get(ex: Ex<'_>, id: i64) -> Result<Option<Deployment>> {
    let sql = concat!("SELECT ", cols!(), " FROM deployments WHERE id = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(id).fetch_optional(&mut *c).await?))
}

/// The environment's newest deployments first.
pub async fn of_environment(ex: Ex<'_>, environment_id: i64, limit: i64) -> Result<Vec<Deployment>> {
    let sql = concat!("SELECT ", cols!(), " FROM deployments WHERE environment_id = $1 ORDER BY id DESC LIMIT $2");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(environment_id).bind(limit).fetch_all(&mut *c).await?))
}

/// The newest evaluation planned for the environment by any deployment
/// that was not superseded or cancelled: planning takes only evaluations
/// newer than it, so deploying an older evaluation by hand (going back to
/// a known-good one) is not undone by planning the newest again.
pub async fn newest_planned_eval(ex: Ex<'_>, environment_id: i64) -> Result<Option<i64>> {
    let (max,): (Option<i64>,) = run!(ex, c => sqlx::query_as(
        "SELECT MAX(eval_id) FROM deployments WHERE environment_id = $1 AND status NOT IN ('superseded', 'cancelled')")
        .bind(environment_id).fetch_one(&mut *c).await?);
    Ok(max)
}

/// The environment's newest deployment (any status), and whether any of
/// its deployments is still open: what planning's memo is keyed on.
pub async fn newest_and_open(ex: Ex<'_>, environment_id: i64) -> Result<(Option<i64>, bool)> {
    let (newest, open): (Option<i64>, Option<i64>) = run!(ex, c => sqlx::query_as(
        "SELECT MAX(id), CAST(MAX(CASE WHEN status IN ('waiting', 'queued', 'running') THEN 1 ELSE 0 END) AS BIGINT)
         FROM deployments WHERE environment_id = $1")
        .bind(environment_id).fetch_one(&mut *c).await?);
    Ok((newest, open == Some(1)))
}

/// Deployments that are queued or running, oldest first.
pub async fn runnable(ex: Ex<'_>) -> Result<Vec<Deployment>> {
    let sql = concat!("SELECT ", cols!(), " FROM deployments WHERE status IN ('queued', 'running') ORDER BY id");
    Ok(run!(ex, c => sqlx::query_as(sql).fetch_all(&mut *c).await?))
}

/// Supersedes the environment's deployments that have not started, other
/// than `keep`.
pub async fn supersede_unstarted(ex: Ex<'_>, environment_id: i64, keep: i64) -> Result<u64> {
    Ok(run!(ex, c => sqlx::query(
        "UPDATE deployments SET status = 'superseded', finished_at = $3
         WHERE environment_id = $1 AND id <> $2 AND status IN ('waiting', 'queued')")
        .bind(environment_id).bind(keep).bind(now()).execute(&mut *c).await?.rows_affected()))
}

/// `waiting` → `queued` (Promote); false when it was not waiting.
pub async fn promote(ex: Ex<'_>, id: i64) -> Result<bool> {
    let n = run!(ex, c => sqlx::query(
        "UPDATE deployments SET status = 'queued', reason = 'promoted' WHERE id = $1 AND status = 'waiting'")
        .bind(id).execute(&mut *c).await?.rows_affected());
    Ok(n == 1)
}

pub async fn start(ex: Ex<'_>, id: i64) -> Result<()> {
    run!(ex, c => sqlx::query(
        "UPDATE deployments SET status = 'running', started_at = COALESCE(started_at, $2) WHERE id = $1")
        .bind(id).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(())
}

pub async fn finish(ex: Ex<'_>, id: i64, status: &str, error: Option<&str>) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE deployments SET status = $2, error = $3, finished_at = $4 WHERE id = $1")
        .bind(id).bind(status).bind(error).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Deployments by status, for `/metrics`.
pub async fn count_by_status(ex: Ex<'_>) -> Result<Vec<(String, i64)>> {
    Ok(run!(ex, c => sqlx::query_as("SELECT status, COUNT(*) FROM deployments GROUP BY status ORDER BY status")
        .fetch_all(&mut *c).await?))
}

/// Recent deployments whose status GitHub has not been told: `(id,
/// status)`, oldest first. Older ones are not reported (GitHub was
/// configured after them).
pub async fn unreported(ex: Ex<'_>, since: i64, limit: i64) -> Result<Vec<(i64, String)>> {
    Ok(run!(ex, c => sqlx::query_as(
        "SELECT id, status FROM deployments
         WHERE created_at >= $1 AND (github_reported IS NULL OR github_reported <> status)
         ORDER BY id LIMIT $2")
        .bind(since).bind(limit).fetch_all(&mut *c).await?))
}

pub async fn set_github_reported(ex: Ex<'_>, id: i64, status: &str) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE deployments SET github_reported = $2 WHERE id = $1")
        .bind(id).bind(status).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// The GitHub deployment created for deployment `id`, if any.
pub async fn github_id(ex: Ex<'_>, id: i64) -> Result<Option<i64>> {
    let v: Option<(Option<i64>,)> = run!(ex, c => sqlx::query_as("SELECT github_id FROM deployments WHERE id = $1")
        .bind(id).fetch_optional(&mut *c).await?);
    Ok(v.and_then(|(g,)| g))
}

pub async fn set_github_id(ex: Ex<'_>, id: i64, github_id: i64) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE deployments SET github_id = $2 WHERE id = $1")
        .bind(id).bind(github_id).execute(&mut *c).await?.rows_affected());
    Ok(())
}
